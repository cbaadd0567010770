"""transformers-native loading of ROAST checkpoints: AutoModel*, generate, pipelines, Trainer, loud failures."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from helpers import VOCAB, inputs_for, tiny_bert_classifier, tiny_llama, tiny_t5
from safetensors import safe_open
from transformers.quantizers import auto as quantizer_auto

import hf_roast
from hf_roast import RoastConfig, RoastModel, get_roast_model
from hf_roast.mapping import gradient_scaler, plan_digest
from hf_roast.quantizer import RoastHfQuantizer, RoastQuantizationConfig

CFG = dict(compression=4.0, tile=(16, 16))


def _save(tmp_path, builder, **cfg):
    rm = get_roast_model(builder(), RoastConfig(**{**CFG, **cfg}))
    path = tmp_path / "ckpt"
    rm.save_pretrained(path)
    return rm, str(path)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(
    "builder, auto_cls, name",
    [
        (tiny_llama, tf.AutoModelForCausalLM, "llama"),
        (tiny_bert_classifier, tf.AutoModelForSequenceClassification, "bert"),
        (tiny_t5, tf.AutoModelForSeq2SeqLM, "t5"),
    ],
)
def test_auto_class_loads_identical_model(tmp_path, builder, auto_cls, name):
    rm, path = _save(tmp_path, builder)
    inputs = inputs_for(name)
    loaded = auto_cls.from_pretrained(path)
    assert type(loaded) is type(rm.base_model)
    assert torch.equal(_logits(rm, inputs), _logits(loaded, inputs))
    if name != "bert":
        gen_in = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
        expected = rm.generate(**gen_in, max_new_tokens=6, do_sample=False)
        assert torch.equal(expected, loaded.generate(**gen_in, max_new_tokens=6, do_sample=False))
    # RoastModel.from_pretrained reads the same format, bit-identically.
    wrapped = RoastModel.from_pretrained(path)
    assert torch.equal(_logits(rm, inputs), _logits(wrapped, inputs))


def test_loaded_model_has_no_dense_target_weight_and_z_once(tmp_path):
    rm, path = _save(tmp_path, tiny_llama)
    loaded = tf.AutoModelForCausalLM.from_pretrained(path)
    plan = loaded.roast_store.plan
    owned = dict(loaded.named_parameters())
    assert not any(n.endswith(s.name + ".weight") for n in owned for s in plan.modules)
    assert [n for n, p in owned.items() if p.numel() == plan.num_slots] == ["roast_store.z"]
    for s in plan.modules:  # a Roast layer owns its bias at most; the weight is read from z
        assert {n for n, _ in loaded.get_submodule(s.name).named_parameters()} <= {"bias"}
    assert sum(p.numel() for p in owned.values()) == sum(p.numel() for p in rm.parameters())
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert [k for k in keys if k.endswith(".z")] == ["roast_store.z"]
        # the only tensors named like the compressed weights are the empty markers
        for s in plan.modules:
            assert f.get_slice(s.name + ".weight").get_shape() == [0]


def test_config_json_carries_full_roast_config(tmp_path):
    rm, path = _save(tmp_path, tiny_llama)
    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    with open(os.path.join(path, "roast_config.json")) as f:
        roast = json.load(f)
    assert qc.pop("quant_method") == "roast"
    assert qc == roast
    assert qc["mapping_version"] == hf_roast.MAPPING_VERSION
    assert [m["name"] for m in qc["plan"]["modules"]] == [s.name for s in rm.plan.modules]
    assert {"rows", "cols", "scale"} <= set(qc["plan"]["modules"][0])
    # from_dict calls cls(**d): every stored key must be accepted, and round-trip.
    assert RoastQuantizationConfig.from_dict({"quant_method": "roast", **roast}).to_dict() == {
        "quant_method": "roast",
        **roast,
    }


def test_live_config_not_left_quantized_after_save(tmp_path):
    rm, path = _save(tmp_path, tiny_llama)
    assert "quantization_config" not in rm.config.to_dict()
    assert getattr(rm.base_model, "hf_quantizer", None) is None
    wrapped = RoastModel.from_pretrained(path)
    assert "quantization_config" not in wrapped.config.to_dict()
    dense = wrapped.merge_and_unload()
    dense.save_pretrained(tmp_path / "dense")
    with open(tmp_path / "dense" / "config.json") as f:
        assert "quantization_config" not in json.load(f)


def test_buffers_rebuilt_after_auto_load_and_gradients_match(tmp_path):
    rm, path = _save(tmp_path, tiny_llama)
    loaded = tf.AutoModelForCausalLM.from_pretrained(path)
    store, ref = loaded.roast_store, rm.roast_store
    assert torch.equal(store.scaler_inv, gradient_scaler(store.plan, store.scaler))
    assert torch.equal(store.scaler_inv, ref.scaler_inv)
    for (_, a), (_, b) in zip(rm.roast_layers(), RoastModel(loaded, rm.roast_config).roast_layers()):
        assert torch.equal(a.tile_slot, b.tile_slot) and torch.equal(a.tile_scale, b.tile_scale)
    inputs = inputs_for("llama")
    for model in (rm, loaded):
        model.train()
        model.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert torch.equal(rm.roast_store.z.grad, loaded.roast_store.z.grad)


def test_trainer_accepts_auto_loaded_model(tmp_path):
    _, path = _save(tmp_path, tiny_llama)
    loaded = tf.AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(loaded.hf_quantizer, RoastHfQuantizer)
    assert loaded.hf_quantizer.is_trainable and loaded.hf_quantizer.is_qat_trainable
    ids = torch.randint(3, VOCAB, (8, 10), generator=torch.Generator().manual_seed(1))
    # a list of rows, not a `datasets.Dataset`: .ci/check_lowest runs this test without `datasets`
    data = [{"input_ids": row, "labels": row} for row in ids.tolist()]
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    z0 = loaded.roast_store.z.detach().clone()
    tf.Trainer(model=loaded, args=args, train_dataset=data).train()
    assert not torch.equal(z0, loaded.roast_store.z.detach())


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t3", pad_token="t0", eos_token="t2")


def test_text_generation_pipeline_from_checkpoint_folder(tmp_path):
    rm, path = _save(tmp_path, tiny_llama)
    _tiny_tokenizer().save_pretrained(path)
    pipe = tf.pipeline("text-generation", model=path, device="cpu")
    out = pipe("t5 t6 t7", max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = torch.tensor([[5, 6, 7]])
    expected = rm.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
    )
    assert out.split() == [f"t{i}" for i in expected[0, 3:].tolist()]


def test_without_hf_roast_registered_loading_fails_loudly(tmp_path, monkeypatch):
    """What a user without ``import hf_roast`` gets: transformers skips the unknown quant_method; the markers
    then make the dense load fail instead of returning random target weights."""
    _, path = _save(tmp_path, tiny_llama)
    monkeypatch.delitem(quantizer_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "roast")
    monkeypatch.delitem(quantizer_auto.AUTO_QUANTIZER_MAPPING, "roast")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        tf.AutoModelForCausalLM.from_pretrained(path)


def test_without_import_in_fresh_interpreter_fails_loudly(tmp_path):
    _, path = _save(tmp_path, tiny_llama)
    code = textwrap.dedent(
        f"""
        import sys, transformers
        try:
            transformers.AutoModelForCausalLM.from_pretrained({path!r})
        except RuntimeError as e:
            assert "hf_roast" not in sys.modules
            print("LOUD", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOUD" in out.stdout, out.stderr[-2000:]


def _edit_json(path, name, edit):
    p = os.path.join(path, name)
    with open(p) as f:
        d = json.load(f)
    edit(d)
    with open(p, "w") as f:
        json.dump(d, f)


def test_mismatched_mapping_version_is_refused_by_auto_class(tmp_path):
    _, path = _save(tmp_path, tiny_llama)
    _edit_json(path, "config.json", lambda d: d["quantization_config"].update(mapping_version=999))
    with pytest.raises(ValueError, match="mapping version"):
        tf.AutoModelForCausalLM.from_pretrained(path)


def test_checkpoint_missing_z_is_refused_by_auto_class(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _save(tmp_path, tiny_llama)
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    del state["roast_store.z"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensors"):
        tf.AutoModelForCausalLM.from_pretrained(path)


def test_module_list_for_other_architecture_is_refused(tmp_path):
    _, path = _save(tmp_path, tiny_llama)

    def rename(d):  # a plan written for another architecture carries its own, matching digest
        d["plan"]["modules"][0].update(name="model.layers.0.self_attn.nope")
        d["plan_sha256"] = plan_digest(d["plan"])

    _edit_json(path, "config.json", lambda d: rename(d["quantization_config"]))
    _edit_json(path, "roast_config.json", rename)
    with pytest.raises(ValueError, match="module list"):
        tf.AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="module list"):
        RoastModel.from_pretrained(path)


def test_compressing_during_dense_load_is_refused_with_a_pointer():
    qc = RoastQuantizationConfig.from_dict({"quant_method": "roast", **_roast_dict()})
    with pytest.raises(ValueError, match="get_roast_model"):
        RoastHfQuantizer(qc, pre_quantized=False)


def _roast_dict():
    return get_roast_model(tiny_llama(), RoastConfig(**CFG)).roast_config_dict()


def test_registration_survives_a_second_import():
    import importlib

    import hf_roast.quantizer as q

    importlib.reload(q)
    assert quantizer_auto.AUTO_QUANTIZER_MAPPING["roast"].__name__ == "RoastHfQuantizer"
    assert quantizer_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["roast"].__name__ == "RoastQuantizationConfig"


MEMORY_SCRIPT = """
import json, sys, torch, transformers
import hf_roast

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

# Load a tiny checkpoint of the same architecture first: transformers imports modules lazily while
# loading (~150 MiB), which would otherwise count as the model's memory.
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2])
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS, so imports do not count
except OSError:
    pass
before = status("VmRSS")
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
# The loader may leave tensors backed by the mmapped file, whose pages count only once read: read every
# tensor, so that the peak covers everything the loaded model holds, not just what the loader copied.
with torch.no_grad():
    for t in list(model.parameters()) + list(model.buffers()):
        t.float().sum()
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS")}))
"""


def test_peak_memory_while_loading_is_far_below_dense_size(tmp_path):
    """A ~310 MB (fp32) Llama at 16x: loading must never hold the dense target weights."""
    dense = tiny_llama(
        vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8,
    )  # fmt: skip
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    assert dense_bytes > 300e6
    rm = get_roast_model(dense, RoastConfig(compression=16, init="random"))
    del dense
    path = tmp_path / "big"
    rm.save_pretrained(path)
    stored = rm.compression_report()["model"]["stored_bytes"]
    del rm
    _, warmup = _save(tmp_path, tiny_llama)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path), warmup], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    peak_growth = mem["peak"] - mem["before"]
    print(
        f"dense {dense_bytes / 2**20:.0f} MiB, stored {stored / 2**20:.1f} MiB, load peak +{peak_growth / 2**20:.1f} MiB"
    )
    # Measured: +25 MiB for this checkpoint (22 MiB stored) vs +299 MiB for its dense checkpoint, same script.
    assert peak_growth < dense_bytes / 4


def test_auto_loaded_model_saves_with_transformers_and_loads_across_auto_classes(tmp_path):
    rm, path = _save(tmp_path, tiny_llama)
    inputs = inputs_for("llama")
    with torch.no_grad():
        hidden = rm.base_model.model(**inputs).last_hidden_state
    base = tf.AutoModel.from_pretrained(path)  # LlamaModel: module names lose the "model." prefix
    assert type(base) is tf.LlamaModel
    with torch.no_grad():
        assert torch.equal(base(**inputs).last_hidden_state, hidden)
    base.save_pretrained(tmp_path / "resaved")  # the user calls the transformers model's own method
    # ...and still gets the whole checkpoint: roast_config.json and the card are not lost on a re-save
    assert (tmp_path / "resaved" / "roast_config.json").is_file()
    assert "hf_roast" in (tmp_path / "resaved" / "README.md").read_text()
    for model in (
        tf.AutoModel.from_pretrained(tmp_path / "resaved"),
        RoastModel.from_pretrained(tmp_path / "resaved"),
    ):
        with torch.no_grad():
            assert torch.equal(model(**inputs).last_hidden_state, hidden)
    head = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")  # and back: the prefix is added
    with torch.no_grad():
        assert torch.equal(head.model(**inputs).last_hidden_state, hidden)


# ---- device_map ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def biased_checkpoint(tmp_path_factory):
    """A Llama whose compressed layers own biases: offloading a layer leaves hf_roast tensors on meta."""
    rm = get_roast_model(tiny_llama(attention_bias=True, mlp_bias=True), RoastConfig(**CFG))
    path = tmp_path_factory.mktemp("biased") / "ckpt"
    rm.save_pretrained(path)
    return _logits(rm, inputs_for("llama")), str(path)


OFFLOAD_LAYER_1 = {
    "roast_store": "cpu",
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.mark.parametrize(
    "device_map, max_memory",
    [("auto", None), ({"": "cpu"}, None), (OFFLOAD_LAYER_1, None), ("auto", {"cpu": 100_000})],
    ids=["auto", "explicit", "explicit-disk-offload", "auto-disk-offload"],
)
def test_device_map_loads_identically(biased_checkpoint, tmp_path, device_map, max_memory):
    expected, path = biased_checkpoint
    loaded = tf.AutoModelForCausalLM.from_pretrained(
        path, device_map=device_map, max_memory=max_memory, offload_folder=str(tmp_path)
    )
    offloaded = [n for n, p in loaded.named_parameters() if p.device.type == "meta"]
    if device_map is OFFLOAD_LAYER_1:  # the offloaded layer's Roast biases wait on meta for their hook
        assert "model.layers.1.self_attn.q_proj.bias" in offloaded
    if max_memory is not None:  # the store is placed first, on the main device; the rest is offloaded
        assert loaded.hf_device_map["roast_store"] == "cpu" and "disk" in loaded.hf_device_map.values()
        assert offloaded
    assert loaded.roast_store.z.device.type == "cpu"
    assert torch.equal(_logits(loaded, inputs_for("llama")), expected)


def test_offloading_z_is_refused_with_a_fix(biased_checkpoint, tmp_path):
    _, path = biased_checkpoint
    with pytest.raises(ValueError, match="offloads 'roast_store'.*every compressed layer reads z directly"):
        tf.AutoModelForCausalLM.from_pretrained(
            path, device_map={**OFFLOAD_LAYER_1, "roast_store": "disk"}, offload_folder=str(tmp_path)
        )
