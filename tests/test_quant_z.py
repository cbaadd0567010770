"""Quantised z (RoastConfig.z_bits 8 and 4): the grid, post-training quantisation, checkpoints, QAT."""

import json
import os

import pytest
import torch
from helpers import lm_losses, tiny_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_roast  # noqa: F401  (registers the quantizer)
from hf_roast import RoastConfig, RoastModel, get_roast_model
from hf_roast.backends.pytorch import materialize_weight
from hf_roast.checkpoint_format import FORMAT_VERSION
from hf_roast.layers import roast_layers
from hf_roast.mapping import LayerMapping, MappingPlan, ModuleSpec
from hf_roast.quant import QMAX, QuantizedZ, fake_quantize_groups

IDS = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(0))
TILE = (8, 16)


def compressed(bits=None, qat=False, group=128, compression=4.0, mapper="stable"):
    config = RoastConfig(compression=compression, tile=TILE, mapper=mapper, z_group_size=group)
    if bits is not None:
        config = RoastConfig(
            compression=compression, tile=TILE, mapper=mapper, z_bits=bits, z_group_size=group, z_qat=qat
        )
    return get_roast_model(tiny_llama(), config)


# ---- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"z_bits": 5}, "z_bits must be one of 32, 16, 8, 4"),
        ({"z_bits": True}, "z_bits must be one of"),
        ({"z_bits": 16}, "use dtype='bfloat16' or 'float16'"),
        ({"z_bits": 32, "dtype": "bfloat16"}, "use dtype='float32'"),
        ({"z_bits": 8, "dtype": "bfloat16"}, "leave dtype='float32'"),
        ({"z_bits": 8, "tile": (3, 5)}, "z_group_size=128 does not divide the 3x5 tile"),
        ({"z_group_size": 63}, "z_group_size must be an even int"),
        ({"z_qat": True}, "z_qat=True trains against an integer grid: set z_bits=8 or 4"),
        ({"z_bits": 8, "z_qat": 1}, "z_qat must be True or False"),
    ],
)
def test_bad_z_settings_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RoastConfig(**kwargs)


def test_z_bits_follows_dtype_when_not_given():
    assert RoastConfig().z_bits == 32
    assert RoastConfig(dtype="bfloat16").z_bits == 16
    assert RoastConfig(dtype="float16", z_bits=16).z_bits == 16
    assert RoastConfig(z_bits=4).z_packed and not RoastConfig(z_bits=4, z_qat=True).z_packed


def test_quantize_z_rejects_bad_bits_and_leaves_z_alone():
    model = compressed()
    z = model.roast_store.z.detach().clone()
    for bits in (3, 16, 32):
        with pytest.raises(ValueError, match="bits"):
            model.quantize_z(bits)
    with pytest.raises(ValueError, match="z_group_size"):
        model.quantize_z(8, group_size=48)  # does not divide the 8x16 tile
    assert torch.equal(model.roast_store.z, z) and model.roast_config.z_bits == 32
    model.quantize_z(8)
    with pytest.raises(ValueError, match="already packed"):
        model.quantize_z(4)


# ---- the grid ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("numel, group", [(90, 6), (130, 2), (3 * 128, 128), (7 * 64, 64)])
def test_round_trip_within_half_a_step_on_odd_sizes(bits, numel, group):
    g = torch.Generator().manual_seed(numel + group)
    z = torch.randn(numel, generator=g) * torch.rand(numel, generator=g) * 3
    z[: group // 2] = 0.0  # a partly zero group, and one with a single value
    q = QuantizedZ.quantize(z, bits, group)
    assert q.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.codes.numel() == numel * bits // 8 and q.scales.numel() == numel // group
    back = q.dequantize()
    step = q.scales.repeat_interleave(group)
    assert torch.all((back - z).abs() <= step / 2 * (1 + 1e-6) + 1e-12)
    # the largest value of every group is on the grid's end: exact up to fp32 rounding
    absmax = z.view(-1, group).abs().amax(1)
    assert torch.allclose(back.view(-1, group).abs().amax(1), absmax, rtol=1e-6, atol=0)
    # codes within the symmetric range; packing is lossless
    codes = torch.round(back / torch.where(step > 0, step, 1)).to(torch.int64)
    assert codes.abs().max() <= QMAX[bits]
    assert torch.equal(QuantizedZ.quantize(back, bits, group).codes, q.codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_tile_reads_equal_the_dequantised_spans(bits):
    g = torch.Generator().manual_seed(1)
    t, group = 128, 32
    z = torch.randn(10 * t, generator=g)
    q = QuantizedZ.quantize(z, bits, group, tile_numel=t)
    slots = torch.tensor([3, 0, 9, 3, 7])
    full = q.dequantize().view(-1, t)
    assert torch.equal(q.tiles(slots, t), full[slots])
    index = torch.tensor([[0, 1, 2], [1279, 640, 641]])
    assert torch.equal(q.values_at(index), q.dequantize()[index])
    # QAT reads the same grid from the fp32 master, tile by tile
    assert torch.equal(fake_quantize_groups(z.view(-1, t)[slots], bits, group), full[slots])


def test_group_must_lie_inside_a_tile():
    with pytest.raises(ValueError, match="does not divide the mapping tile"):
        QuantizedZ.quantize(torch.randn(3 * 96), 8, 64, tile_numel=96)


# ---- the PyTorch path --------------------------------------------------------------------------------
@pytest.mark.parametrize("mapper", ["stable", "roast", "hashednet"])
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantising_while_gathering_equals_a_dequantised_z(mapper, bits):
    specs = [ModuleSpec("q", "linear", 37, 45, 0.75), ModuleSpec("emb", "embedding", 13, 19, 0.5)]
    plan = MappingPlan.build(specs, mapper=mapper, sign="element", seed=3, tile=TILE, compression=3.0)
    z = torch.randn(plan.num_slots, generator=torch.Generator().manual_seed(2))
    q = QuantizedZ.quantize(z, bits, 64, plan.tile_numel)
    for spec in specs:
        lm = LayerMapping.build(plan, spec)
        for dtype in (torch.float32, torch.bfloat16):
            got = materialize_weight(q, lm, dtype, scratch=False)
            assert torch.equal(got, materialize_weight(q.dequantize(), lm, dtype, scratch=False))


@pytest.mark.parametrize("bits", [8, 4])
def test_ptq_weights_within_the_quantisation_error(bits):
    model = compressed()
    before = {n: layer.materialize_weight() for n, layer in model.roast_layers()}
    logits = model(IDS).logits
    model.quantize_z(bits)
    q = model.roast_store.read_z()
    step = q.scales.max().item()
    for name, layer in model.roast_layers():
        bound = abs(layer.spec.scale) * step / 2 * (1 + 1e-5)
        err = (layer.materialize_weight() - before[name]).abs().max().item()
        assert 0 < err <= bound, (name, err, bound)
    drift = (model(IDS).logits - logits).abs().max().item()
    assert drift < (0.05 if bits == 8 else 0.5)
    assert model.roast_store.z is None and not any(p is None for p in model.parameters())


# ---- checkpoints -------------------------------------------------------------------------------------
def _z_tensors(directory):
    with safe_open(os.path.join(directory, "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("roast_store.")}


@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_is_bit_identical_and_automodel_loads_it(tmp_path, bits):
    model = compressed().quantize_z(bits)
    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    stored = _z_tensors(tmp_path)
    assert set(stored) == {"roast_store.z_codes", "roast_store.z_scales"}
    assert torch.equal(stored["roast_store.z_codes"], model.roast_store.z_codes)
    assert torch.equal(stored["roast_store.z_scales"], model.roast_store.z_scales)
    raw = json.loads((tmp_path / "roast_config.json").read_text())
    assert raw["z_bits"] == bits and raw["z_group_size"] == 128 and raw["z_qat"] is False
    assert raw["format_version"] == FORMAT_VERSION == "1.4"
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "roast" and qc["z_bits"] == bits
    card = (tmp_path / "README.md").read_text()
    assert f"{bits}-bit integers" in card and f"{model.roast_store.z_nbytes:,}" in card

    loaded = RoastModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.roast_store.z_codes, model.roast_store.z_codes)
    assert torch.equal(loaded(IDS).logits, logits)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(auto(IDS).logits, logits)
    # saved again, the files are the same bytes
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("bits, group", [(8, 128), (4, 128), (4, 64)])
def test_checkpoint_bytes_of_z_fall_as_bits_over_32(tmp_path, bits, group):
    """z's bytes on disk: bits/32 of fp32's, plus one fp32 scale per group (4 / group bytes a value)."""
    model = compressed()
    model.save_pretrained(tmp_path / "fp32")
    model.quantize_z(bits, group_size=group)
    model.save_pretrained(tmp_path / "q")
    size = {k: os.path.getsize(tmp_path / k / "model.safetensors") for k in ("fp32", "q")}
    n = model.plan.num_slots
    z_fp32, z_q = 4 * n, n * bits // 8 + 4 * n // group
    assert model.roast_store.z_nbytes == z_q
    # the file shrinks by exactly z's saving, up to the safetensors header (two keys instead of one)
    assert abs((size["fp32"] - size["q"]) - (z_fp32 - z_q)) < 256
    ratio = z_q / z_fp32
    assert ratio == pytest.approx(bits / 32 * (1 + 32 / (bits * group)))
    if bits == 8 or group >= 256:
        assert ratio <= bits / 32 * 1.05


def test_merge_and_unload_is_the_dequantised_model():
    model = compressed().quantize_z(4)
    logits = model(IDS).logits
    weights = {n: layer.materialize_weight() for n, layer in model.roast_layers()}
    dense = model.merge_and_unload()
    for name, w in weights.items():
        assert torch.equal(dense.get_submodule(name).weight, w)
    assert torch.allclose(dense(IDS).logits, logits, atol=1e-5, rtol=0)


def test_golden_style_checkpoint_without_z_fields_loads_as_float(tmp_path):
    """A 1.1 checkpoint has no z_bits / z_group_size / z_qat: it loads as float z, as before."""
    model = compressed()
    model.save_pretrained(tmp_path)
    for name in ("roast_config.json", "config.json"):
        raw = json.loads((tmp_path / name).read_text())
        target = raw if name == "roast_config.json" else raw["quantization_config"]
        for key in ("z_bits", "z_group_size", "z_qat"):
            del target[key]
        target["format_version"] = "1.1"
        (tmp_path / name).write_text(json.dumps(raw))
    loaded = RoastModel.from_pretrained(tmp_path)
    assert loaded.roast_config.z_bits == 32 and not loaded.roast_store.packed
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_edited_z_bits_is_refused(tmp_path):
    compressed().quantize_z(8).save_pretrained(tmp_path)
    for name in ("roast_config.json", "config.json"):
        raw = json.loads((tmp_path / name).read_text())
        (raw if name == "roast_config.json" else raw["quantization_config"])["z_bits"] = 4
        (tmp_path / name).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="z_bits=4"):
        RoastModel.from_pretrained(tmp_path)


def test_compressing_with_z_bits_packs_z():
    model = compressed(bits=8)
    assert model.roast_store.packed and model.roast_config.z_packed
    reference = compressed().quantize_z(8)
    assert torch.equal(model.roast_store.z_codes, reference.roast_store.z_codes)
    assert torch.equal(model(IDS).logits, reference(IDS).logits)
    assert [n for n, _ in roast_layers(model.base_model)] == [n for n, _ in reference.roast_layers()]


# ---- training: quantisation-aware (fp32 master, straight-through) and post-training ------------------
def _train(model, steps, lr=3e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    losses = lm_losses(model, torch.optim.Adam(params, lr=lr), IDS, steps)
    model.eval()
    return losses


@pytest.mark.parametrize("mapper", ["stable", "hashednet"])
@pytest.mark.parametrize("bits", [8, 4])
def test_qat_forward_reads_the_grid_and_gradients_reach_the_master(mapper, bits):
    qat = compressed(bits=bits, qat=True, mapper=mapper)
    master = qat.roast_store.z
    assert isinstance(master, torch.nn.Parameter) and master.dtype == torch.float32
    packed = compressed(mapper=mapper).quantize_z(bits)
    assert torch.equal(qat(IDS).logits, packed(IDS).logits)  # the forward sees exactly the packed values
    # straight-through: dz equals the gradient of a float model holding the dequantised values
    float_model = compressed(mapper=mapper)
    with torch.no_grad():
        float_model.roast_store.z.copy_(packed.roast_store.read_z().dequantize())
    for m in (qat, float_model):
        m.zero_grad()
        m(input_ids=IDS, labels=IDS).loss.backward()
    assert master.grad is not None and master.grad.abs().sum() > 0
    assert torch.allclose(master.grad, float_model.roast_store.z.grad, rtol=1e-5, atol=1e-8)


def test_qat_trains_and_serves_what_it_trained(tmp_path):
    model = get_roast_model(
        tiny_llama(), RoastConfig(compression=4, tile=TILE, z_bits=4, z_qat=True, compress_embeddings=True)
    )
    start = model.roast_store.z.detach().clone()
    losses = _train(model, 12)
    assert losses[-1] < losses[0] - 0.5, losses
    assert not torch.equal(model.roast_store.z, start)  # the master moved
    logits = model(IDS).logits
    model.save_pretrained(tmp_path / "qat")  # the fp32 master, to resume training
    resumed = RoastModel.from_pretrained(tmp_path / "qat")
    assert resumed.roast_config.z_qat and torch.equal(resumed.roast_store.z, model.roast_store.z)
    assert torch.equal(resumed(IDS).logits, logits)
    model.quantize_z()  # bits from the config: serving gives exactly the trained forward
    assert model.roast_config.z_bits == 4 and model.roast_store.packed
    assert torch.equal(model(IDS).logits, logits)


def test_ptq_after_fp32_training_keeps_the_trained_loss():
    model = compressed()
    losses = _train(model, 12)
    assert losses[-1] < losses[0] - 0.5, losses
    with torch.no_grad():
        trained = model(input_ids=IDS, labels=IDS).loss.item()
        model.quantize_z(8)
        assert abs(model(input_ids=IDS, labels=IDS).loss.item() - trained) < 0.05
    # a packed z does not train, the other parameters still do
    assert all(p is not model.roast_store.z for p in model.parameters())
    _train(model, 1)


def test_forced_triton_refuses_qat(monkeypatch):
    monkeypatch.setenv("HF_ROAST_BACKEND", "triton")
    model = compressed(bits=8, qat=True)
    with pytest.raises(RuntimeError, match="quantisation-aware training .* PyTorch path only"):
        model(IDS)
