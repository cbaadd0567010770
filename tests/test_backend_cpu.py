"""The CPU backend (hf_roast/backends/cpu/): a fused gather-GEMV that never writes W, and a one-pass W build.

Checked against the PyTorch path (an independent implementation: it materialises W) on odd shapes whose
edge tiles are partial in both dimensions, for every mapper, sign mode and activation dtype, at 1, 2 and
7 rows; against an fp64 product of the materialised W; for allocations (nothing W-sized); for the
dispatch rules; and end to end, ``generate()`` gives the same tokens with and without it. The reference, the
PyTorch path called directly (``RoastLinearFunction`` and ``pytorch.materialize_weight`` without a
``NativeWeight``) or through ``backend="torch"``, builds W with PyTorch ops only, so it shares no code with
the C++ loop; the native W build, which dispatch hands the PyTorch path on CPU under ``auto``, is checked bit
for bit against those ops at the end. The C++ side's reading of the ops' arguments is checked too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import VOCAB, assert_close_scaled, tiny_gpt2, tiny_llama
from torch.profiler import ProfilerActivity, profile

from hf_roast import RoastConfig, get_roast_model, quant
from hf_roast.backends import dispatch, pytorch
from hf_roast.backends.cpu import build as cpu_build
from hf_roast.backends.cpu import ops as cpu
from hf_roast.backends.cpu import translate
from hf_roast.backends.pytorch import RoastLinearFunction, clear_scratch, materialize_weight
from hf_roast.mapping import LayerMapping, MappingPlan, ModuleSpec
from hf_roast.quant import QuantizedZ
from hf_roast.vocab import MAPPERS, SIGNS, Z_INT_BITS

pytestmark = pytest.mark.skipif(
    cpu.unavailable_reason() is not None, reason=f"no CPU kernel: {cpu.unavailable_reason()}"
)


def _mappings(mapper: str, sign: str, tile: tuple[int, int]):
    """Two modules with partial edge tiles in both dimensions; the second starts at a non-zero tile offset."""
    specs = [ModuleSpec("a", "linear", 100, 90, 0.7), ModuleSpec("b", "conv1d", 77, 131, 1.3)]
    plan = MappingPlan.build(specs, mapper=mapper, sign=sign, seed=5, tile=tile, compression=3.0)
    torch.manual_seed(0)
    z = torch.randn(plan.num_slots)
    return z, [LayerMapping.build(plan, spec) for spec in specs]


def _check_against_torch_path(z, layer_map: LayerMapping, dtypes, name: str) -> None:
    """The CPU path equals the PyTorch path at 1, 2 and 7 rows in each activation dtype (with a bias), and an
    fp64 product of the materialised (dequantised) W (fp32 activations, a leading batch dimension)."""
    for rows in (1, 2, 7):
        for dtype in dtypes:
            x = torch.randn(rows, layer_map.spec.cols).to(dtype)
            bias = torch.randn(layer_map.spec.rows)
            with torch.no_grad():
                expected = RoastLinearFunction.apply(x, z, bias, layer_map)
                actual = cpu.cpu_roast_linear(x, z, bias, layer_map)
            assert actual.dtype == dtype and actual.shape == expected.shape
            assert_close_scaled(actual, expected, dtype, f"{name}/{layer_map.spec.name}/{rows} rows/{dtype}")
    x = torch.randn(2, 3, layer_map.spec.cols)
    w = materialize_weight(z, layer_map, torch.float32, scratch=False).double()
    torch.testing.assert_close(
        cpu.cpu_roast_linear(x, z, None, layer_map), (x.double() @ w.t()).float(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("tile", [(8, 16), (32, 32), (4, 12)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("mapper", MAPPERS)
def test_cpu_path_equals_torch_path(mapper, sign, tile):
    z, mappings = _mappings(mapper, sign, tile)
    for layer_map in mappings:
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        _check_against_torch_path(z, layer_map, dtypes, f"{mapper}/{sign}/{tile}")


@pytest.mark.parametrize("sign", ["tile", "element"])
@pytest.mark.parametrize("mapper", MAPPERS)
def test_cpu_path_equals_torch_path_under_a_compression_pattern(mapper, sign):
    """Per-module segments of z: "b" reads its own segment (tile-slot tables, or hashednet's per-module
    segment), "a" and "c" the pooled one; the fused kernel reads the same tables as the PyTorch path."""
    specs = [
        ModuleSpec("a", "linear", 100, 90, 0.7),
        ModuleSpec("b", "conv1d", 77, 131, 1.3),
        ModuleSpec("c", "linear", 45, 90, 0.9),
    ]
    plan = MappingPlan.build(
        specs, mapper=mapper, sign=sign, seed=5, tile=(8, 16), compression=3.0, segments={"b": (2.0, ["b"])}
    )
    assert plan.spec("b").segment_tiles or not plan.is_tiled
    torch.manual_seed(0)
    z = torch.randn(plan.num_slots)
    for spec in specs:
        layer_map = LayerMapping.build(plan, spec)
        for rows in (1, 7):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, spec.cols).to(dtype)
                bias = torch.randn(spec.rows)
                with torch.no_grad():
                    expected = RoastLinearFunction.apply(x, z, bias, layer_map)
                    actual = cpu.cpu_roast_linear(x, z, bias, layer_map)
                assert_close_scaled(
                    actual, expected, dtype, f"{mapper}/{sign}/{spec.name}/{rows} rows/{dtype}"
                )


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_cpu_path_never_allocates_a_w_sized_tensor():
    spec = ModuleSpec("big", "linear", 512, 768, 1.0)
    plan = MappingPlan.build([spec], mapper="stable", sign="element", seed=0, tile=(32, 32), compression=4.0)
    layer_map = LayerMapping.build(plan, spec)
    z = torch.randn(plan.num_slots)
    x = torch.randn(3, spec.cols, dtype=torch.bfloat16)
    w_bytes = spec.rows * spec.cols * 2  # W in the activation dtype
    with torch.no_grad():
        clear_scratch()
        torch_peak = _largest_allocation(lambda: RoastLinearFunction.apply(x, z, None, layer_map))
        cpu_peak = _largest_allocation(lambda: cpu.cpu_roast_linear(x, z, None, layer_map))
    assert torch_peak >= w_bytes  # the measurement sees the PyTorch path's W
    assert 0 < cpu_peak < w_bytes // 32, (cpu_peak, w_bytes)  # the output (3 x 512 floats) and x in fp32


def _layer_and_input(rows: int):
    model = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16)))
    layer = model.model.layers[0].mlp.up_proj
    return model, layer, torch.randn(1, rows, layer.in_features)


def test_auto_dispatch_takes_the_cpu_path_for_few_rows_without_grad(monkeypatch):
    calls = []
    real = cpu.cpu_roast_linear
    monkeypatch.setattr(cpu, "cpu_roast_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    model, layer, x = _layer_and_input(cpu.MAX_ROWS)
    with torch.no_grad():
        y_cpu = layer(x)
    assert len(calls) == 1
    layer(x).sum().backward()  # z requires grad: training takes the PyTorch path
    with torch.no_grad():
        layer(torch.randn(1, cpu.MAX_ROWS + 1, layer.in_features))  # too many rows
        monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")  # switched off
        y_torch = layer(x)
    assert len(calls) == 1
    torch.testing.assert_close(y_cpu, y_torch, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cpu")  # forced: raises where it cannot run, never falls back
    with pytest.raises(RuntimeError, match="forward-only"):
        layer(x)
    with torch.no_grad(), pytest.raises(RuntimeError, match="at most"):
        layer(torch.randn(1, cpu.MAX_ROWS + 1, layer.in_features))
    with torch.no_grad():
        layer(x)
    assert len(calls) == 2


def _torch_path_output(layer, x):
    with torch.no_grad():
        return RoastLinearFunction.apply(
            x, layer.roast_store.read_z(), layer._parameters.get("bias"), layer.layer_mapping()
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cached_call_arguments_follow_every_change_of_z_tables_and_bias(dtype, monkeypatch):
    """Decode caches the layer's mapping and the kernel's constant arguments; each kind of change must
    reach the next call: z and bias updated in place (an optimizer step), z's memory replaced behind
    the same Parameter (``param.data = ...``), tables rebuilt, the model cast to another dtype and back."""
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cpu")  # every call below must run on the CPU path
    model, layer, x = _layer_and_input(3)
    with torch.no_grad():
        layer.bias = torch.nn.Parameter(torch.randn(layer.out_features))
    x = x.to(dtype)  # z stays fp32 (the CPU path's z); bf16 activations round W and the bias
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    mapping = layer.layer_mapping()
    assert layer.layer_mapping() is mapping  # cached between calls

    def check():
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got, _torch_path_output(layer, x), **tol)
        return got

    first = check()
    store = layer.roast_store
    with torch.no_grad():
        store.z.mul_(-2.0)  # in place: same memory
    assert not torch.allclose(check(), first)
    with torch.no_grad():
        layer.bias.add_(1.0)  # in place; under bf16 the kernel reads a rounded copy of the bias
    second = check()
    store.z.data = store.z.data.clone() * 0.5  # same Parameter, new memory
    assert not torch.allclose(check(), second)
    store.rebuild()  # fresh tables
    assert layer.layer_mapping() is not mapping
    check()
    model.to(torch.bfloat16).to(torch.float32)  # Module.to replaces every tensor's memory
    check()


def test_missing_compiler_warns_once_and_keeps_the_pytorch_path(monkeypatch):
    monkeypatch.setattr(cpu_build, "library", cpu_build.Library())
    monkeypatch.setattr(dispatch, "_warned_no_cpu_kernel", False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    model, layer, x = _layer_and_input(1)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
        layer(x)
    messages = [str(w.message) for w in caught if "CPU inference path" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]
    with torch.no_grad():
        torch.testing.assert_close(
            y, RoastLinearFunction.apply(x, model.roast_store.z, layer.bias, layer.layer_mapping())
        )
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cpu")
    with torch.no_grad(), pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        layer(x)


def test_a_second_load_reuses_the_cached_library():
    assert cpu.unavailable_reason() is None
    fresh = cpu_build.Library()
    assert fresh.load() is not None and fresh.build_seconds == 0.0  # found in the cache, not rebuilt


def _generate(model, monkeypatch, backend: str, prompt: torch.Tensor) -> torch.Tensor:
    monkeypatch.setenv(dispatch.ENV_BACKEND, backend)
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize(
    "make, dtype",
    [(tiny_llama, torch.float32), (tiny_llama, torch.bfloat16), (tiny_gpt2, torch.float32)],
    ids=["llama-fp32", "llama-bf16", "gpt2-fp32"],
)
def test_generate_gives_the_same_tokens_with_and_without_the_cpu_path(make, dtype, monkeypatch):
    model = get_roast_model(make().to(dtype), RoastConfig(compression=4.0, tile=(16, 16)))
    assert model.roast_store.z.dtype == torch.float32
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    calls = []
    real = cpu.cpu_roast_linear
    monkeypatch.setattr(cpu, "cpu_roast_linear", lambda *a: calls.append(1) or real(*a))
    with_cpu = _generate(model, monkeypatch, "cpu", prompt)  # forced: every linear call takes it
    assert len(calls) > 0
    n_calls = len(calls)
    without = _generate(model, monkeypatch, "torch", prompt)
    assert len(calls) == n_calls
    assert torch.equal(with_cpu, without)
    assert with_cpu.shape[1] == prompt.shape[1] + 12


# ---- packed z (z_bits 8 and 4) and 16-bit z -------------------------------------------------------------
@pytest.mark.parametrize("bits", Z_INT_BITS)
@pytest.mark.parametrize("group", [2, 6, 10, 128])
def test_the_kernel_dequantizes_exactly_like_quant_py(bits, group):
    """The kernel's reader (quant.py's element formulas translated to C, the group's scale hoisted per group)
    against QuantizedZ.values_at, bit for bit: every code (raw random bytes, so every nibble, even the unused
    -8), spans that start and end inside groups and at odd values (the high nibble of a byte)."""
    g = torch.Generator().manual_seed(bits * 1000 + group)
    numel = group * 37
    raw = torch.randint(0, 256, (QuantizedZ.codes_numel(numel, bits),), generator=g, dtype=torch.uint8)
    codes = raw.view(torch.int8) if bits == 8 else raw
    magnitude = 10.0 ** torch.randint(-3, 3, (numel // group,), generator=g)
    scales = torch.randn(numel // group, generator=g) * magnitude
    scales[0] = 0.0
    z = QuantizedZ(codes, scales, bits, group)
    spans = [(0, numel), (1, numel - 1), (group - 1, 2), (group + 1, 3 * group), (numel - 3, 3), (5, 0)]
    for start, n in spans:
        expected = z.values_at(torch.arange(start, start + n))
        assert torch.equal(cpu.dequantize(z, start, n), expected), (start, n)
    assert torch.equal(cpu.dequantize(z), z.dequantize())


def test_the_c_source_takes_the_quantisation_formulas_from_quant_py(monkeypatch):
    """The packing constants reach the kernel only through the translation of quant.py (no second copy)."""
    source = translate.c_formulas()
    for fn in quant.formula_functions():
        assert f" {fn.__name__}(" in source
    assert f"INT64_C({quant.NIBBLE_OFFSET})" in source
    monkeypatch.setattr(quant, "formula_constants", lambda: {"NIBBLE_OFFSET": 99})
    assert "INT64_C(99)" in translate.c_formulas()


# (tile, group): groups of two tile rows, groups straddling tile rows (16 values, rows of 12), one group a tile
PACKED_LAYOUTS = [((8, 16), 32), ((4, 12), 16), ((32, 32), 128), ((8, 16), 128)]


@pytest.mark.parametrize("layout", PACKED_LAYOUTS, ids=lambda lt: f"{lt[0][0]}x{lt[0][1]}-g{lt[1]}")
@pytest.mark.parametrize("bits", Z_INT_BITS)
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("mapper", MAPPERS)
def test_cpu_path_reads_packed_z_like_the_torch_path(mapper, sign, bits, layout):
    tile, group = layout
    z, mappings = _mappings(mapper, sign, tile)
    q = QuantizedZ.quantize(z, bits, group, tile[0] * tile[1])
    for layer_map in mappings:
        _check_against_torch_path(
            q, layer_map, (torch.float32, torch.bfloat16), f"{mapper}/{sign}/{bits} bits/{layout}"
        )


@pytest.mark.parametrize("z_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("mapper", MAPPERS)
def test_cpu_path_reads_16_bit_z_like_the_torch_path(mapper, sign, z_dtype):
    """A 16-bit z: the PyTorch path multiplies in z's dtype (scale and product rounded to it), then casts."""
    z, mappings = _mappings(mapper, sign, (8, 16))
    z = z.to(z_dtype)
    for layer_map in mappings:
        for rows in (1, 7):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = torch.randn(rows, layer_map.spec.cols).to(dtype)
                with torch.no_grad():
                    expected = RoastLinearFunction.apply(x, z, None, layer_map)
                    actual = cpu.cpu_roast_linear(x, z, None, layer_map)
                name = f"{mapper}/{sign}/z {z_dtype}/{layer_map.spec.name}/{rows} rows/{dtype}"
                assert_close_scaled(actual, expected, dtype, name)
        # the weights are the PyTorch path's, bit for bit: an exact product on one-hot rows
        if mapper == "stable":
            eye = torch.eye(layer_map.spec.cols)
            w = materialize_weight(z, layer_map, torch.float32, scratch=False)
            assert torch.equal(cpu.cpu_roast_linear(eye[:16], z, None, layer_map), w[:, :16].t())


@pytest.mark.parametrize("bits", Z_INT_BITS)
def test_cpu_path_on_packed_z_never_allocates_a_w_sized_tensor(bits):
    spec = ModuleSpec("big", "linear", 512, 768, 1.0)
    plan = MappingPlan.build([spec], mapper="stable", sign="element", seed=0, tile=(32, 32), compression=4.0)
    layer_map = LayerMapping.build(plan, spec)
    q = QuantizedZ.quantize(torch.randn(plan.num_slots), bits, 128, plan.tile_numel)
    x = torch.randn(3, spec.cols, dtype=torch.bfloat16)
    w_bytes = spec.rows * spec.cols * 2
    with torch.no_grad():
        clear_scratch()
        torch_peak = _largest_allocation(lambda: RoastLinearFunction.apply(x, q, None, layer_map))
        cpu_peak = _largest_allocation(lambda: cpu.cpu_roast_linear(x, q, None, layer_map))
    assert torch_peak >= w_bytes
    assert 0 < cpu_peak < w_bytes // 32, (cpu_peak, w_bytes)


def _counting(monkeypatch) -> list:
    calls = []
    real = cpu.cpu_roast_linear
    monkeypatch.setattr(cpu, "cpu_roast_linear", lambda *a: calls.append(type(a[1])) or real(*a))
    return calls


@pytest.mark.parametrize("bits", Z_INT_BITS)
def test_auto_dispatch_takes_the_cpu_path_for_packed_z(bits, monkeypatch):
    calls = _counting(monkeypatch)
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    model, layer, x = _layer_and_input(cpu.MAX_ROWS)
    model.quantize_z(bits, group_size=64)
    with torch.no_grad():
        y_cpu = layer(x)
        assert calls == [QuantizedZ]
        layer(torch.randn(1, cpu.MAX_ROWS + 1, layer.in_features))  # too many rows
        monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
        y_torch = layer(x)
    assert calls == [QuantizedZ]
    assert_close_scaled(y_cpu, y_torch, torch.float32, f"{bits} bits")
    monkeypatch.delenv(dispatch.ENV_BACKEND)
    layer(x.requires_grad_()).sum().backward()  # gradients for x: the PyTorch path, even with z packed
    assert calls == [QuantizedZ]


@pytest.mark.parametrize("bits", Z_INT_BITS)
def test_qat_in_eval_reads_the_grid_on_the_pytorch_path(bits, monkeypatch):
    """z_qat: the fp32 master read through its grid stays on the PyTorch path (a forced 'cpu' raises); its
    eval forward equals the packed model's, which takes the CPU path."""
    calls = _counting(monkeypatch)
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    config = RoastConfig(compression=4.0, tile=(16, 16), z_bits=bits, z_group_size=64, z_qat=True)
    qat = get_roast_model(tiny_llama(), config)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_qat = qat(ids).logits
        assert calls == []
        monkeypatch.setenv(dispatch.ENV_BACKEND, "cpu")
        with pytest.raises(RuntimeError, match="quantisation-aware training"):
            qat(ids)
        monkeypatch.delenv(dispatch.ENV_BACKEND)
        qat.quantize_z()
        y_packed = qat(ids).logits
    assert len(calls) > 0 and set(calls) == {QuantizedZ}
    assert_close_scaled(y_packed, y_qat, torch.float32, f"qat {bits} bits")


@pytest.mark.parametrize(
    "z, dtype",
    [(8, torch.float32), (4, torch.float32), (8, torch.bfloat16), ("bfloat16", torch.float32)],
    ids=["int8", "int4", "int8-bf16", "z-bf16"],
)
def test_generate_on_packed_z_gives_the_same_tokens_with_and_without_the_cpu_path(z, dtype, monkeypatch):
    if z == "bfloat16":
        model = get_roast_model(tiny_llama().to(dtype), RoastConfig(compression=4.0, tile=(16, 16), dtype=z))
        assert model.roast_store.z.dtype == torch.bfloat16
    else:
        model = get_roast_model(tiny_llama().to(dtype), RoastConfig(compression=4.0, tile=(16, 16)))
        model.quantize_z(z, group_size=32)
        assert model.roast_store.packed
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    calls = _counting(monkeypatch)
    with_cpu = _generate(model, monkeypatch, "cpu", prompt)
    n_calls = len(calls)
    assert n_calls > 0
    without = _generate(model, monkeypatch, "torch", prompt)
    assert len(calls) == n_calls
    assert torch.equal(with_cpu, without)
    assert with_cpu.shape[1] == prompt.shape[1] + 12


def _z_storages(z: torch.Tensor, tile_numel: int) -> dict[str, object]:
    group = 16 if tile_numel % 16 == 0 else tile_numel
    return {
        "fp32": z,
        "bf16": z.to(torch.bfloat16),
        "int8": QuantizedZ.quantize(z, 8, group, tile_numel),
        "int4": QuantizedZ.quantize(z, 4, group, tile_numel),
    }


@pytest.mark.parametrize("tile", [(8, 16), (32, 32), (4, 12)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("mapper", MAPPERS)
def test_native_weight_build_equals_the_pytorch_ops_bit_for_bit(mapper, sign, tile, monkeypatch):
    """On CPU (backend ``auto``) the PyTorch path builds an fp32 W with the CPU backend's build_weight: every
    weight equals what the PyTorch ops build, for every z storage (fp32, bf16, int8, int4), with partial edge
    tiles."""
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    z, mappings = _mappings(mapper, sign, tile)
    calls = []
    real = cpu.build_weight
    monkeypatch.setattr(cpu, "build_weight", lambda *a: calls.append(1) or real(*a))
    for name, stored in _z_storages(z, mappings[0].plan.tile_numel).items():
        for layer_map in mappings:
            expected = materialize_weight(stored, layer_map, torch.float32, scratch=False).clone()
            assert not calls, "the PyTorch path alone ran native code"
            actual = dispatch.materialize_weight(stored, layer_map, torch.float32, "auto", scratch=False)
            assert len(calls) == 1, "the native build did not run"
            calls.clear()
            assert actual.shape == expected.shape and actual.is_contiguous()
            assert torch.equal(actual, expected), f"{mapper}/{sign}/{tile}/{name}/{layer_map.spec.name}"


def test_native_weight_build_trains_exactly_like_the_pytorch_ops(monkeypatch):
    """Forward, backward (W rebuilt for grad_x) and row blocks: identical logits and gradients with the native
    build on (``auto``) and off (``backend="torch"``); it stays off for bf16 weights and under
    ``HF_ROAST_BACKEND=torch``, and its gate refuses while compiling."""
    monkeypatch.setattr(pytorch, "ROW_BLOCK_WEIGHTS", 2048)  # several row blocks per layer
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))

    def run(backend: str):
        torch.manual_seed(0)
        config = RoastConfig(compression=4.0, tile=(8, 8), sign="element", backend=backend)
        model = get_roast_model(tiny_llama(), config)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return out.logits.detach(), grads

    calls = []
    real = cpu.build_weight
    monkeypatch.setattr(cpu, "build_weight", lambda *a: calls.append(1) or real(*a))
    logits, grads = run("auto")
    assert calls, "training on CPU did not use the native build"
    calls.clear()
    ref_logits, ref_grads = run("torch")
    assert calls == [], "backend='torch' ran the native build"
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    z, mappings = _mappings("stable", "none", (8, 16))
    dispatch.materialize_weight(z, mappings[0], torch.bfloat16, "auto", scratch=False)
    dispatch.materialize_weight(z, mappings[0], torch.float32, "torch", scratch=False)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    dispatch.materialize_weight(z, mappings[0], torch.float32, "auto", scratch=False)
    assert calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "torch.compile" in cpu.unsupported_reason(z, mappings[0])
    assert dispatch.native_weight("auto", z.device) is None


def test_the_kernel_takes_the_geometry_fields_in_pythons_order_and_checks_its_arguments():
    """The C++ side fills its own argument structs from the ops' arguments, reading the geometry list by
    indices generated from :class:`Geometry` (so a reordered dataclass reorders them too), and refuses
    arguments it cannot read with an error that names them."""
    import dataclasses

    from hf_roast.backends.geometry import Geometry, geometry_of

    constants = cpu_build.c_constants()
    for i, field in enumerate(dataclasses.fields(Geometry)):
        assert f"static const int64_t GEO_{field.name} = {i};" in constants
    assert f"GEOMETRY_FIELDS = {len(dataclasses.fields(Geometry))};" in constants
    z, (_, lm) = _mappings("stable", "tile", (8, 16))
    x = torch.randn(2, lm.spec.cols)
    geometry = geometry_of(lm)
    op = torch.ops.hf_roast.roast_linear_cpu
    with pytest.raises(RuntimeError, match="geometry has"):
        op(x, z, None, None, lm.tile_slot, lm.tile_scale, geometry[:-1], [0, 0])
    with pytest.raises(RuntimeError, match="needs tile_slot"):
        op(x, z, None, None, None, lm.tile_scale, geometry, [0, 0])
    with pytest.raises(RuntimeError, match="features, the layer takes"):
        op(x[:, :-1], z, None, None, lm.tile_slot, lm.tile_scale, geometry, [0, 0])
    with pytest.raises(RuntimeError, match="8- or 4-bit"):
        op(x, z, None, None, lm.tile_slot, lm.tile_scale, geometry, [3, 32])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16 z"):
        op(x, z.double(), None, None, lm.tile_slot, lm.tile_scale, geometry, [0, 0])
    with pytest.raises(RuntimeError, match="activations"):
        op(x.double(), z, None, None, lm.tile_slot, lm.tile_scale, geometry, [0, 0])
    torch.testing.assert_close(
        op(x, z, None, None, lm.tile_slot, lm.tile_scale, geometry, [0, 0]),
        RoastLinearFunction.apply(x, z, None, lm),
    )


def test_a_second_copy_of_the_library_registers_nothing_twice(tmp_path, monkeypatch):
    """Another cache directory means another copy of the library in the same process: loading it must not
    register the ops' CPU kernels a second time (torch would warn, or refuse), and the ops keep working."""
    registrations = {name: torch._C._dispatch_dump(f"hf_roast::{name}") for name in cpu_build.OP_NAMES}
    assert all("\nCPU: registered at" in dump for dump in registrations.values())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    second = cpu_build.Library()
    assert second.load() is not None, second.error
    assert second.build_seconds > 0  # built anew in the new directory: a second copy
    assert str(tmp_path) in second.lib._name
    # a second registration would replace each CPU kernel by the copy's (torch only prints a warning)
    assert registrations == {
        name: torch._C._dispatch_dump(f"hf_roast::{name}") for name in cpu_build.OP_NAMES
    }
    z, (_, lm) = _mappings("roast", "tile", (8, 16))
    x = torch.randn(3, lm.spec.cols)
    with torch.no_grad():
        torch.testing.assert_close(
            cpu.cpu_roast_linear(x, z, None, lm), RoastLinearFunction.apply(x, z, None, lm)
        )
