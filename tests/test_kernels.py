"""Triton kernels vs the PyTorch path, and the PyTorch path vs an element-by-element dense reference.

The kernels run on CPU under the Triton interpreter: TRITON_INTERPRET=1 must be set before the kernel
module is imported (``triton.jit`` decides at decoration time); tests/conftest.py sets it for the session.
Shapes are small and odd (M = 1, dims that are multiples of no block, edge tiles) to keep the suite
fast and the masks honest.
"""

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

from hf_roast.backends import dispatch
from hf_roast.backends.pytorch import RoastEmbeddingFunction, RoastLinearFunction, materialize_weight
from hf_roast.backends.triton.available import interpreter_active
from hf_roast.layers import RoastLinear, RoastStore
from hf_roast.mapping import (
    MAPPERS,
    SIGNS,
    LayerMapping,
    MappingPlan,
    ModuleSpec,
    gradient_scaler,
    hash_sign,
    hashednet_slot,
    roast_slot,
    seed_constants,
    stable_slot,
)

triton = pytest.importorskip("triton")
from helpers import assert_close_scaled  # noqa: E402

from hf_roast.backends.triton import ops  # noqa: E402  (after TRITON_INTERPRET)
from hf_roast.backends.triton.roast_matmul import Blocks, forced_blocks, forced_fp32_precision  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreter_active() else "cpu")
REPO = pathlib.Path(__file__).resolve().parents[1]
TILE = (8, 16)


def test_kernels_can_run_here():
    """Fails loudly (instead of skipping every test) if the kernels were compiled for a GPU we lack."""
    assert DEVICE.type == "cuda" or interpreter_active(), (
        "TRITON_INTERPRET=1 came too late: another module imported hf_roast.backends.triton before this test file."
    )


# --------------------------------------------------------------------------------------------------
# Fixtures: a plan with two linears and an embedding, each with edge tiles in both dims.
# --------------------------------------------------------------------------------------------------
PATTERN = {"q+emb": (1.5, ["q", "emb"])}
"""A compression_pattern's segments: "q" and "emb" read from their own segment of z (after the pooled one)."""


def make_plan(
    mapper: str, sign: str, *, compression: float = 3.0, num_parameters: int | None = None, segments=None
):
    specs = [
        ModuleSpec("q", "linear", 37, 45, 0.75),  # 37 = 4*8 + 5 rows, 45 = 2*16 + 13 cols
        ModuleSpec("k", "linear", 21, 45, 1.25),
        ModuleSpec("emb", "embedding", 13, 19, 0.5),
    ]
    kwargs = {"num_parameters": num_parameters} if num_parameters else {"compression": compression}
    return MappingPlan.build(specs, mapper=mapper, sign=sign, seed=11, tile=TILE, segments=segments, **kwargs)


def layer_mapping(
    plan: MappingPlan, name: str, scaler: str = "v5", device: torch.device = DEVICE
) -> LayerMapping:
    spec = plan.spec(name)
    inv = gradient_scaler(plan, scaler, device)
    slots = plan.tile_slots(spec, device) if plan.is_tiled else None
    return LayerMapping(plan, spec, slots, plan.tile_scales(spec, device), inv)


def random_z(plan: MappingPlan, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(plan.num_slots, generator=g).to(DEVICE, dtype).requires_grad_()


def integer_data(*shape, seed: int) -> torch.Tensor:
    """Small integers: every fp32 product and sum is exact, so any summation order gives the same bits."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).to(DEVICE, torch.float32)


def run_linear(fn, x, z, bias, lm, grad_y):
    """(y, dx, dz, db) of one layer, starting from fresh leaves."""
    x = x.detach().requires_grad_()
    z = z.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    y = fn(x, z, bias, lm)
    leaves = [x, z] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(y, leaves, grad_y)
    return (y.detach(), *grads)


def kernel_linear(x, z, bias, lm):
    return ops.triton_roast_linear(x, z, bias, lm)


def torch_linear(x, z, bias, lm):
    return RoastLinearFunction.apply(x, z, bias, lm)


# --------------------------------------------------------------------------------------------------
# 1. The PyTorch path against an independent, element-by-element dense reference.
# --------------------------------------------------------------------------------------------------
def reference_index_and_scale(plan: MappingPlan, spec: ModuleSpec):
    """z index and lambda * sign of every weight, one Python int at a time from the formulas."""
    tr, tc = plan.tile
    t = tr * tc
    n_tile_cols = math.ceil(spec.cols / tc)
    slot_a, slot_b = seed_constants(plan.seed, "slot")
    sign_a, sign_b = seed_constants(plan.seed, "sign")
    index = torch.zeros(spec.rows, spec.cols, dtype=torch.int64)
    scale = torch.zeros(spec.rows, spec.cols, dtype=torch.float64)
    # a segment (compression_pattern): its own slot tiles, its tiles numbered among its modules' tiles
    start, n_slot_tiles, base = 0, plan.num_slot_tiles, spec.tile_offset
    if spec.segment_tiles:
        start, n_slot_tiles = spec.segment_start_tile, spec.segment_tiles
        before = plan.modules[: [s.name for s in plan.modules].index(spec.name)]
        base = sum(s.n_tiles(plan.tile) for s in before if s.segment_start_tile == start)
    for r in range(spec.rows):
        for c in range(spec.cols):
            g = spec.tile_offset + (r // tr) * n_tile_cols + c // tc
            v = g * t + (r % tr) * tc + c % tc
            g_seg = g - spec.tile_offset + base
            if plan.mapper == "stable":
                index[r, c] = (start + stable_slot(g_seg, n_slot_tiles, slot_a, slot_b)) * t + v % t
            elif plan.mapper == "roast":
                index[r, c] = (start + roast_slot(g_seg, n_slot_tiles, slot_a, slot_b)) * t + v % t
            else:
                index[r, c] = hashednet_slot(v, spec.segment_start, spec.segment_size, slot_a, slot_b)
            sign = {"none": 1, "tile": hash_sign(g, sign_a, sign_b), "element": hash_sign(v, sign_a, sign_b)}
            scale[r, c] = spec.scale * sign[plan.sign]
    return index, scale


@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("segments", [None, PATTERN], ids=["whole-z", "pattern"])
def test_torch_path_matches_elementwise_dense_reference(mapper, sign, segments):
    plan = make_plan(mapper, sign, segments=segments)
    lm = layer_mapping(plan, "q", device=torch.device("cpu"))  # the PyTorch path, against CPU references
    index, scale = reference_index_and_scale(plan, lm.spec)
    z = torch.randn(plan.num_slots, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w_ref = z[index] * scale
    # arange oracle: z = 0..m-1 with unit scale reads the index map back from the materialised weights.
    unit = LayerMapping(plan, lm.spec, lm.tile_slot, torch.ones_like(lm.tile_scale), None)
    arange_w = materialize_weight(
        torch.arange(plan.num_slots, dtype=torch.float64), unit, torch.float64, scratch=False
    )
    if sign == "element":
        arange_w = arange_w.abs()
    assert torch.equal(arange_w.long(), index)
    assert torch.equal(materialize_weight(z, lm, torch.float64, scratch=False), w_ref)

    x = torch.randn(2, 3, 45, dtype=torch.float64, requires_grad=True)
    zt = z.clone().requires_grad_()
    bias = torch.randn(37, dtype=torch.float64)
    y = RoastLinearFunction.apply(x, zt, bias, lm)
    grad_y = torch.randn_like(y)
    dx, dz = torch.autograd.grad(y, (x, zt), grad_y)
    torch.testing.assert_close(y, x @ w_ref.T + bias)
    torch.testing.assert_close(dx, grad_y @ w_ref)
    grad_w = grad_y.reshape(-1, 37).T @ x.detach().reshape(-1, 45)
    inv = lm.scaler_inv.double()
    unit_of = index // plan.scaler_unit()
    dz_ref = torch.zeros(plan.num_slots, dtype=torch.float64)
    for r in range(37):
        for c in range(45):
            dz_ref[index[r, c]] += scale[r, c] * grad_w[r, c] * inv[unit_of[r, c]]
    torch.testing.assert_close(dz, dz_ref)


# --------------------------------------------------------------------------------------------------
# 2. Kernels against the PyTorch path.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (3, 7)], ids=["M1", "M21"])
def test_linear_kernels_match_torch_path(mapper, sign, dtype, lead):
    plan = make_plan(mapper, sign)
    lm = layer_mapping(plan, "q")
    g = torch.Generator().manual_seed(2)
    z = random_z(plan)
    x = torch.randn(*lead, 45, generator=g).to(DEVICE, dtype)
    bias = torch.randn(37, generator=g).to(DEVICE, dtype)
    grad_y = torch.randn(*lead, 37, generator=g).to(DEVICE, dtype)
    with forced_blocks(Blocks(16, 16, 16)):  # several blocks in every dim, edge blocks partly masked
        got = run_linear(kernel_linear, x, z, bias, lm, grad_y)
    want = run_linear(torch_linear, x, z, bias, lm, grad_y)
    for name, a, b in zip(("y", "dx", "dz", "db"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close_scaled(a, b, torch.float32 if name == "dz" else dtype, name)


@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("sign", ["tile", "element"])
def test_kernels_match_torch_path_under_a_compression_pattern(mapper, sign):
    """Per-module segments of z: the kernels read the same tile-slot tables (or, for hashednet, the same
    per-module segments) as the PyTorch path, so every module reads and writes only its own segment."""
    plan = make_plan(mapper, sign, segments=PATTERN)
    assert plan.is_tiled == bool(plan.spec("q").segment_tiles)
    g = torch.Generator().manual_seed(13)
    z = random_z(plan)
    for name in ("q", "k"):  # one module in the key's segment, one in the pooled one
        lm = layer_mapping(plan, name)
        rows = lm.spec.rows
        x = torch.randn(3, 7, 45, generator=g).to(DEVICE)
        bias = torch.randn(rows, generator=g).to(DEVICE)
        grad_y = torch.randn(3, 7, rows, generator=g).to(DEVICE)
        with forced_blocks(Blocks(16, 16, 16)):
            got = run_linear(kernel_linear, x, z, bias, lm, grad_y)
        want = run_linear(torch_linear, x, z, bias, lm, grad_y)
        for part, a, b in zip(("y", "dx", "dz", "db"), got, want):
            assert_close_scaled(a, b, torch.float32, f"{name}/{part}")
        touched = (got[2] != 0).nonzero().flatten()
        lo, hi = (
            (lm.spec.segment_start_tile * plan.tile_numel, (lm.spec.segment_start_tile + lm.spec.segment_tiles) * plan.tile_numel)
            if plan.is_tiled
            else (lm.spec.segment_start, lm.spec.segment_start + lm.spec.segment_size)
        )  # fmt: skip
        assert lo <= touched.min() and touched.max() < hi, name
    lm = layer_mapping(plan, "emb")
    ids = torch.tensor([[0, 12, 5, 5, 7], [12, 1, 8, 0, 3]], device=DEVICE)
    e_kernel = ops.triton_roast_embedding(ids, z, lm, torch.float32)
    e_torch = RoastEmbeddingFunction.apply(ids, z, lm, torch.float32)
    assert torch.equal(e_kernel, e_torch)
    grad = torch.linspace(-1, 1, e_torch.numel(), device=DEVICE).view_as(e_torch)
    (dz_kernel,) = torch.autograd.grad(e_kernel, (z,), grad)
    (dz_torch,) = torch.autograd.grad(e_torch, (z,), grad)
    assert_close_scaled(dz_kernel, dz_torch, torch.float32, "emb/dz")


@pytest.mark.parametrize("mapper", MAPPERS)
def test_results_do_not_depend_on_block_sizes(mapper):
    """Exact (integer-valued) data: every block configuration must give the very same bits."""
    plan = make_plan(mapper, "element")
    lm = layer_mapping(plan, "q", scaler="none")
    z = integer_data(plan.num_slots, seed=3)
    x = integer_data(5, 45, seed=4)
    grad_y = integer_data(5, 37, seed=5)
    bias = integer_data(37, seed=6)
    # lambda = 0.75 is exact in binary, so z * lambda and all sums stay exact.
    results = []
    for blocks in (Blocks(16, 16, 16), Blocks(16, 64, 32), Blocks(32, 16, 128), Blocks(64, 128, 64), None):
        with forced_blocks(blocks):
            results.append(run_linear(kernel_linear, x, z, bias, lm, grad_y))
    want = run_linear(torch_linear, x, z, bias, lm, grad_y)
    for got in results:
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_linear_with_bf16_storage_of_z():
    plan = make_plan("stable", "tile")
    lm = layer_mapping(plan, "q")
    z = random_z(plan, torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 45, generator=g).to(DEVICE)
    grad_y = torch.randn(4, 37, generator=g).to(DEVICE)
    got = run_linear(kernel_linear, x, z, None, lm, grad_y)
    want = run_linear(torch_linear, x, z, None, lm, grad_y)
    assert got[2].dtype == torch.bfloat16
    for name, a, b in zip(("y", "dx"), got, want):
        assert_close_scaled(a, b, torch.float32, name)
    assert_close_scaled(got[2], want[2], torch.bfloat16, "dz")


@pytest.mark.parametrize("mapper", ["stable", "roast"])
def test_every_tile_on_one_slot_accumulates_all_contributions(mapper):
    """z of a single slot tile: all tiles of one kernel block add into the same addresses at once."""
    plan = make_plan(mapper, "tile", num_parameters=TILE[0] * TILE[1])
    lm = layer_mapping(plan, "q")
    assert int(lm.tile_slot.max()) == 0
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 45, generator=g).to(DEVICE)
    grad_y = torch.randn(6, 37, generator=g).to(DEVICE)
    with forced_blocks(Blocks(64, 64, 64)):
        got = run_linear(kernel_linear, x, random_z(plan), None, lm, grad_y)
    want = run_linear(torch_linear, x, random_z(plan), None, lm, grad_y)
    for name, a, b in zip(("y", "dx", "dz"), got, want):
        assert_close_scaled(a, b, torch.float32, name)


@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("scaler", ["v5", "v1", "none"])
def test_two_modules_sharing_z_accumulate_into_one_dz(mapper, scaler):
    plan = make_plan(mapper, "tile")
    q, k = layer_mapping(plan, "q", scaler), layer_mapping(plan, "k", scaler)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 45, generator=g).to(DEVICE)
    z0 = random_z(plan)

    def grad_of(linear):
        z = z0.detach().clone().requires_grad_()
        loss = linear(x, z, None, q).square().sum() + linear(x, z, None, k).sin().sum()
        loss.backward()
        return z.grad

    both = grad_of(kernel_linear)
    assert_close_scaled(both, grad_of(torch_linear), torch.float32, "dz")
    # Both modules really contribute; the tile mappers share slots (hashednet gives each its own segment).
    only_q = run_linear(kernel_linear, x, z0, None, q, torch.ones(2, 3, 37, device=DEVICE))[2]
    only_k = run_linear(kernel_linear, x, z0, None, k, torch.ones(2, 3, 21, device=DEVICE))[2]
    assert (only_q != 0).any() and (only_k != 0).any()
    assert ((only_q != 0) & (only_k != 0)).any() == plan.is_tiled


@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_kernels_match_torch_path(mapper, sign, dtype):
    plan = make_plan(mapper, sign)
    lm = layer_mapping(plan, "emb")
    ids = torch.tensor([[0, 12, 5, 5, 7], [12, 1, 8, 0, 3]], device=DEVICE)  # repeats and the last row
    out = {}
    for name, fn in (
        ("triton", lambda z: ops.triton_roast_embedding(ids, z, lm, dtype)),
        ("torch", lambda z: RoastEmbeddingFunction.apply(ids, z, lm, dtype)),
    ):
        z = random_z(plan)
        e = fn(z)
        grad = torch.linspace(-1, 1, e.numel(), device=DEVICE).view_as(e).to(dtype)
        (dz,) = torch.autograd.grad(e, (z,), grad)
        out[name] = (e.detach(), dz)
    assert out["triton"][0].dtype == dtype
    assert torch.equal(out["triton"][0], out["torch"][0])
    assert_close_scaled(out["triton"][1], out["torch"][1], torch.float32, "dz")


def test_embedding_kernel_rejects_out_of_range_ids():
    plan = make_plan("stable", "tile")
    lm = layer_mapping(plan, "emb")
    with pytest.raises(IndexError, match=r"\[0, 13\)"):
        ops.triton_roast_embedding(torch.tensor([0, 13], device=DEVICE), random_z(plan), lm, torch.float32)


# --------------------------------------------------------------------------------------------------
# 3. Dispatch.
# --------------------------------------------------------------------------------------------------
def make_layer(backend: str):
    plan = make_plan("stable", "tile")
    store = RoastStore(plan, scaler="v5").to(DEVICE)
    with torch.no_grad():
        store.z.copy_(torch.randn(plan.num_slots, generator=torch.Generator().manual_seed(0)))
    layer = RoastLinear(45, 37, store, plan.spec("q"), device=DEVICE)
    store.rebuild()
    store.backend = backend
    return layer


def test_forced_triton_backend_routes_a_layer_to_the_kernels(monkeypatch):
    calls = []
    real = ops.triton_roast_linear
    monkeypatch.setattr(ops, "triton_roast_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 45, device=DEVICE)
    layer = make_layer("triton")
    y = layer(x)
    assert calls == [1]
    layer.roast_store.backend = "torch"
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")  # the environment overrides the config
    layer(x)
    assert calls == [1, 1]


def test_auto_backend_uses_kernels_only_on_cuda():
    want = "triton" if DEVICE.type == "cuda" else "torch"
    assert dispatch.resolve_backend("auto", DEVICE, (torch.float32,)) == want
    assert dispatch.resolve_backend("auto", DEVICE, (torch.float64,)) == "torch"
    assert dispatch.resolve_backend("triton", torch.device("meta")) == "torch"


def test_forced_triton_explains_why_it_cannot_run(monkeypatch):
    with pytest.raises(RuntimeError, match="float64"):
        dispatch.resolve_backend("triton", DEVICE, (torch.float64,))
    import hf_roast.backends.triton.available as available

    monkeypatch.setattr(available, "interpreter_active", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="need CUDA"):
        dispatch.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="set it before"):
        dispatch.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setattr(available, "_triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        dispatch.resolve_backend("triton", torch.device("cpu"))
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_unknown_backend_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cuda")
    with pytest.raises(ValueError, match="HF_ROAST_BACKEND='cuda'"):
        dispatch.resolve_backend("auto", DEVICE)


# --------------------------------------------------------------------------------------------------
# 4. torch.library registration: once, fake/meta, opcheck, torch.compile.
# --------------------------------------------------------------------------------------------------
def test_ops_registered_once_even_when_the_kernel_package_is_imported_twice():
    assert ops.ops_registered()
    name = "triton_backend_copy_for_test"
    source = REPO / "hf_roast" / "backends" / "triton"
    spec = importlib.util.spec_from_file_location(
        name, source / "__init__.py", submodule_search_locations=[str(source)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
        copy = importlib.import_module(f"{name}.ops")  # runs the registration code a second time
        assert copy is not ops and copy.ops_registered()
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    schemas = torch._C._jit_get_schemas_for_operator("hf_roast::roast_linear")
    assert len(schemas) == 1


def op_args(mapper="stable", device=DEVICE):
    plan = make_plan(mapper, "element")
    lm = layer_mapping(plan, "q")
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, 45, generator=g).to(device).requires_grad_()
    z = random_z(plan).detach().to(device).requires_grad_()
    bias = torch.randn(37, generator=g).to(device).requires_grad_()

    def to(t):
        return t.to(device) if t is not None else None

    return (x, z, bias, to(lm.tile_slot), to(lm.tile_scale), to(lm.scaler_inv), ops.geometry_of(lm)), lm


def test_meta_tensors_get_shapes_from_the_fake_implementation():
    args, _ = op_args(device=torch.device("meta"))
    y = torch.ops.hf_roast.roast_linear(*args)
    assert y.device.type == "meta" and y.shape == (2, 5, 37) and y.dtype == torch.float32
    x, z, _, slot, scale, inv, geometry = args
    e = torch.ops.hf_roast.roast_embedding(
        torch.zeros(3, 4, dtype=torch.long, device="meta"), z, slot, scale, inv, geometry, torch.bfloat16
    )
    assert e.shape == (3, 4, 45) and e.dtype == torch.bfloat16


@pytest.mark.parametrize("mapper", ["stable", "hashednet"])
def test_opcheck(mapper):
    args, _ = op_args(mapper)
    torch.library.opcheck(torch.ops.hf_roast.roast_linear.default, args)
    z = args[1]
    plan = make_plan(mapper, "element")
    emb = layer_mapping(plan, "emb")
    ids = torch.tensor([[3, 0, 12], [3, 7, 1]], device=DEVICE)
    emb_args = (ids, z, emb.tile_slot, emb.tile_scale, emb.scaler_inv, ops.geometry_of(emb), torch.float32)
    torch.library.opcheck(torch.ops.hf_roast.roast_embedding.default, emb_args)


def test_torch_compile_traces_the_op_without_graph_breaks():
    args, lm = op_args()
    x, z, bias = args[:3]

    def step(x, z, bias):
        return ops.triton_roast_linear(x, z, bias, lm).relu().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    loss = compiled(x, z, bias)
    grads = torch.autograd.grad(loss, (x, z, bias))
    want_loss = step(x, z, bias)
    want = torch.autograd.grad(want_loss, (x, z, bias))
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_compiled_roast_layer_has_no_graph_break():
    layer = make_layer("triton")
    x = torch.randn(3, 45, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, layer(x))
    assert layer.roast_store.z.grad is not None and layer.roast_store.z.grad.abs().sum() > 0


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU tensors are the kernels' only under the interpreter")
def test_under_the_interpreter_the_ops_run_triton_on_cpu_not_the_cpp_kernel(monkeypatch):
    """The ops' CPU kernels (hf_roast/backends/cpu_kernels.py) hand CPU tensors to Triton while the
    interpreter runs, so every test here exercises the Triton kernels, never the C++ one."""
    from hf_roast.backends.cpu import ops as cpu_ops
    from hf_roast.backends.triton import roast_matmul as rm

    calls = []
    real = rm.linear_forward
    monkeypatch.setattr(rm, "linear_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    native = cpu_ops.unavailable_reason() is None  # without the library no C++ can run at all
    before = cpu_ops.kernel_calls() if native else {}
    plan = make_plan("stable", "tile")
    lm = layer_mapping(plan, "q")
    x = torch.randn(3, 45, device=DEVICE)
    with torch.no_grad():
        for z in (random_z(plan), packed_z(plan, 8)):
            torch.testing.assert_close(kernel_linear(x, z, None, lm), torch_linear(x, z, None, lm))
    assert len(calls) == 2
    assert (cpu_ops.kernel_calls() if native else {}) == before


# --------------------------------------------------------------------------------------------------
# 5. A whole model through the kernels.
# --------------------------------------------------------------------------------------------------
def test_tiny_llama_trains_identically_on_both_backends(monkeypatch):
    from helpers import tiny_llama

    from hf_roast import RoastConfig, get_roast_model

    model = get_roast_model(
        tiny_llama(vocab_size=100), RoastConfig(compression=4, tile=(16, 16), compress_embeddings=True)
    ).to(DEVICE)
    ids = torch.randint(0, 100, (2, 7), device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv(dispatch.ENV_BACKEND, backend)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), model.roast_store.z.grad.clone())
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert_close_scaled(results["triton"][1], results["torch"][1], torch.float32, "dz")


# --------------------------------------------------------------------------------------------------
# Packed z (RoastConfig.z_bits 8 / 4): the kernels read integer codes and dequantise in registers.
# --------------------------------------------------------------------------------------------------
def packed_z(plan: MappingPlan, bits: int, group: int = 32):
    from hf_roast.quant import QuantizedZ

    z = torch.randn(plan.num_slots, generator=torch.Generator().manual_seed(bits)) * 0.7
    return QuantizedZ.quantize(z, bits, group, plan.tile_numel).to(DEVICE)


def packed_linear(fn, x, q, bias, lm, grad_y):
    x = x.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    y = fn(x, q, bias, lm)
    return (y.detach(), *torch.autograd.grad(y, (x, bias), grad_y))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "mapper, sign, dtype, lead",
    [
        ("stable", "tile", torch.float32, (3, 7)),
        ("roast", "element", torch.bfloat16, (1,)),
        ("hashednet", "none", torch.float16, (5,)),
    ],
)
def test_packed_linear_kernels_match_torch_path(bits, mapper, sign, dtype, lead):
    plan = make_plan(mapper, sign)
    lm = layer_mapping(plan, "q")
    q = packed_z(plan, bits)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*lead, 45, generator=g).to(DEVICE, dtype)
    bias = torch.randn(37, generator=g).to(DEVICE, dtype)
    grad_y = torch.randn(*lead, 37, generator=g).to(DEVICE, dtype)
    with forced_blocks(Blocks(16, 16, 16)):
        got = packed_linear(kernel_linear, x, q, bias, lm, grad_y)
        # The same kernels on a float z holding the dequantised values read the same weights, so they give
        # the same bits where the dot's summation order is fixed: half precision, fp32 with "ieee" (FMA), and
        # every precision under the interpreter. fp32's tensor-core precisions (tf32x3, tf32) on a GPU do
        # not: on an H200 the two kernels came out ~1e-7 apart (relative; FP fusion off too).
        ref = packed_linear(kernel_linear, x, q.dequantize(), bias, lm, grad_y)
        with forced_fp32_precision("ieee"):
            got_fixed_order = packed_linear(kernel_linear, x, q, bias, lm, grad_y)
            ref_fixed_order = packed_linear(kernel_linear, x, q.dequantize(), bias, lm, grad_y)
    fixed_order = dtype != torch.float32 or interpreter_active()
    want = packed_linear(torch_linear, x, q, bias, lm, grad_y)
    for name, a, b, r, a_fixed, r_fixed in zip(
        ("y", "dx", "db"), got, want, ref, got_fixed_order, ref_fixed_order
    ):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        assert_close_scaled(a, b, dtype, name)
        assert_close_scaled(a_fixed, b, dtype, name)
        assert torch.equal(a_fixed, r_fixed), name
        if fixed_order:
            assert torch.equal(a, r), name


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_linear_kernels_are_exact_on_integer_data(bits):
    """Codes times power-of-two scales and small integer inputs: every sum is exact, so both paths agree bit for bit."""
    from hf_roast.quant import QuantizedZ

    plan = make_plan("stable", "element")
    lm = layer_mapping(plan, "q", scaler="none")
    z = integer_data(plan.num_slots, seed=8)
    z.view(-1, 32)[:, 0] = 7 if bits == 4 else 127  # absmax = qmax in every group: scale 1
    q = QuantizedZ.quantize(z, bits, 32, plan.tile_numel)
    assert torch.equal(q.dequantize(), z)  # integers on the grid
    x, grad_y, bias = integer_data(5, 45, seed=9), integer_data(5, 37, seed=10), integer_data(37, seed=11)
    got = packed_linear(kernel_linear, x, q, bias, lm, grad_y)
    want = packed_linear(torch_linear, x, q, bias, lm, grad_y)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mapper", ["stable", "hashednet"])
def test_packed_embedding_kernel_matches_torch_path(bits, mapper):
    plan = make_plan(mapper, "element")
    lm = layer_mapping(plan, "emb")
    q = packed_z(plan, bits)
    ids = torch.tensor([[0, 12, 5, 5, 7], [12, 1, 8, 0, 3]], device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        got = ops.triton_roast_embedding(ids, q, lm, dtype)
        assert got.dtype == dtype
        assert torch.equal(got, RoastEmbeddingFunction.apply(ids, q, lm, dtype))


def test_packed_model_runs_on_the_kernels(monkeypatch):
    """A packed tiny Llama forced onto the kernels gives the PyTorch path's logits; dX flows to the inputs."""
    from helpers import tiny_llama

    from hf_roast import RoastConfig, get_roast_model

    model = get_roast_model(
        tiny_llama(hidden_size=32, intermediate_size=48, num_hidden_layers=1),
        RoastConfig(compression=4, tile=TILE, z_bits=4, z_group_size=64, compress_embeddings=True),
    )
    model.to(DEVICE)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")  # the reference: on CUDA, auto would take the kernels
    want = model(ids).logits
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    calls = []
    real = ops.triton_roast_linear
    monkeypatch.setattr(ops, "triton_roast_linear", lambda *a: calls.append(1) or real(*a))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    got = model(ids).logits
    assert calls and torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    model(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
