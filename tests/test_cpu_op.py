"""The C++ kernel as the CPU implementation of the ``hf_roast::`` ops (hf_roast/backends/cpu_kernels.py).

Torch picks the kernel by device: the ops called on CPU tensors run the C++ kernel (counted by
``cpu.kernel_calls()``, not timed), for a few rows as its fused GEMV and for more as its one-pass W build and
one GEMM, and match the PyTorch path (an independent implementation that materialises W with PyTorch ops)
on odd shapes, float and packed z, fp32 and bf16 activations. ``torch.compile`` of a model traces each
RoastLinear as one op node, and ``generate()`` with a static cache gives eager's tokens.

The suite runs the Triton interpreter on machines without a GPU, and there the ops' CPU kernels are the
Triton ones (see cpu_kernels.py): these tests switch it off (``triton_owns_cpu`` patched) to see what a
production process sees; tests/test_kernels.py checks the other side.
"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, assert_close_scaled, tiny_llama

from hf_roast import RoastConfig, get_roast_model
from hf_roast.backends import cpu_kernels, dispatch
from hf_roast.backends.cpu import ops as cpu
from hf_roast.backends.custom_ops import call_linear
from hf_roast.backends.pytorch import RoastLinearFunction
from hf_roast.mapping import LayerMapping, MappingPlan, ModuleSpec
from hf_roast.quant import QuantizedZ

pytestmark = pytest.mark.skipif(
    cpu.unavailable_reason() is not None, reason=f"no CPU kernel: {cpu.unavailable_reason()}"
)


@pytest.fixture
def native_cpu(monkeypatch):
    """A production process: the ops' CPU kernels are the C++ ones, whatever the suite's interpreter says."""
    monkeypatch.setattr(cpu_kernels, "triton_owns_cpu", lambda: False)
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    torch._dynamo.reset()  # compiled code folds triton_owns_cpu: no cache from another test
    yield
    torch._dynamo.reset()


def _layer(mapper: str, sign: str) -> tuple[torch.Tensor, LayerMapping]:
    """A conv1d-kind module of 77 x 131 with 8 x 16 tiles: partial edge tiles in both dimensions, a non-zero
    tile offset (it is the plan's second module)."""
    specs = [ModuleSpec("a", "linear", 100, 90, 0.7), ModuleSpec("b", "conv1d", 77, 131, 1.3)]
    plan = MappingPlan.build(specs, mapper=mapper, sign=sign, seed=5, tile=(8, 16), compression=3.0)
    z = torch.randn(plan.num_slots, generator=torch.Generator().manual_seed(1))
    return z, LayerMapping.build(plan, plan.spec("b"))


Z_KINDS = ["fp32", "bf16", "int8", "int4"]


def _z(z: torch.Tensor, kind: str, tile_numel: int):
    if kind == "fp32":
        return z
    if kind == "bf16":
        return z.to(torch.bfloat16)
    return QuantizedZ.quantize(z, int(kind[3:]), 32, tile_numel)


@pytest.mark.parametrize("zkind", Z_KINDS)
@pytest.mark.parametrize("mapper, sign", [("stable", "element"), ("roast", "tile"), ("hashednet", "none")])
def test_the_op_runs_the_cpp_kernel_on_cpu_and_matches_the_pytorch_path(mapper, sign, zkind, native_cpu):
    z, lm = _layer(mapper, sign)
    z = _z(z, zkind, lm.plan.tile_numel)
    g = torch.Generator().manual_seed(2)
    for rows, branch in ((1, "gemv"), (7, "gemv"), (cpu.MAX_ROWS + 9, "weight")):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, rows, 131, generator=g).to(dtype)
            bias = torch.randn(77, generator=g)
            before = cpu.kernel_calls()
            with torch.no_grad():
                got = call_linear(x, z, bias, lm)  # torch.ops.hf_roast.roast_linear[_packed] on CPU tensors
                want = RoastLinearFunction.apply(x, z, bias, lm)
            assert cpu.kernel_calls()[branch] == before[branch] + 1, (rows, cpu.kernel_calls())
            assert got.dtype == want.dtype == dtype and got.shape == want.shape == (1, rows, 77)
            if branch == "weight":
                # the same W, built in one pass as the PyTorch path builds it on CPU, and the same GEMM
                assert torch.equal(got, want), (rows, dtype)
            else:
                assert_close_scaled(got, want, dtype, f"{mapper}/{zkind}/{rows} rows/{dtype}")


def test_the_op_on_cpu_has_no_backward_kernel_and_says_so(native_cpu):
    z, lm = _layer("stable", "tile")
    x = torch.randn(2, 131, requires_grad=True)
    y = call_linear(x, z, None, lm)  # the forward runs (C++); its backward op has no CPU kernel
    with pytest.raises(NotImplementedError, match="PyTorch path"):
        y.sum().backward()


def _op_nodes(graphs) -> list[str]:
    return [
        str(node.target)
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function"
        and str(node.target).startswith("hf_roast.")  # an op, e.g. hf_roast.roast_linear
    ]


@pytest.mark.parametrize("z_bits", [None, 8], ids=["float-z", "int8-z"])
def test_compiled_generate_with_a_static_cache_runs_the_op_and_gives_eager_tokens(z_bits, native_cpu):
    model = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16)))
    if z_bits:
        model.quantize_z(z_bits)
    hf = model.base_model  # the transformers model, whose forward generate() calls
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))

    def generate():
        with torch.no_grad():
            return hf.generate(
                prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static"
            )

    eager = generate()
    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    torch._dynamo.utils.counters.clear()
    eager_forward = hf.forward
    hf.forward = torch.compile(eager_forward, backend=recording_inductor)
    try:
        before = cpu.kernel_calls()
        compiled = generate()
    finally:
        hf.forward = eager_forward
    assert torch.equal(compiled, eager)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, breaks
    nodes = _op_nodes(graphs)
    n_linear = 7 * 2  # q, k, v, o, gate, up, down in each of two layers
    # one node per layer, the CPU path's op (float and packed z alike), in the prefill and decode graphs
    assert nodes.count("hf_roast.roast_linear_cpu.default") == n_linear * len(graphs), (nodes, len(graphs))
    # the C++ kernel ran inside the compiled graphs: the GEMV for decode (1 row, 5 tokens x 14 layers)
    assert cpu.kernel_calls()["gemv"] - before["gemv"] >= 5 * n_linear


def test_a_compiled_training_step_on_cpu_keeps_the_pytorch_path(native_cpu):
    """The op has no CPU backward: a compiled call that needs gradients is traced on the PyTorch path."""
    model = get_roast_model(tiny_llama(num_hidden_layers=1), RoastConfig(compression=4.0, tile=(16, 16)))
    layer = model.base_model.model.layers[0].mlp.up_proj
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 3, layer.in_features)
    compiled = torch.compile(layer, backend=recording, fullgraph=True)
    compiled(x).square().sum().backward()
    assert graphs and not _op_nodes(graphs)
    grad = model.roast_store.z.grad.clone()
    model.zero_grad()
    layer(x).square().sum().backward()
    torch.testing.assert_close(grad, model.roast_store.z.grad)


@pytest.mark.parametrize("zkind", ["fp32", "int4"])
def test_the_cpu_paths_own_ops_pass_opcheck(zkind, native_cpu):
    """The C++-only ops' schemas (the out= mutation of roast_weight_cpu included) and fake implementations agree
    with their C++ kernels: torch.library.opcheck runs them eagerly, under FakeTensor and through dynamo."""
    from hf_roast.backends.cpu.ops import _z_operands
    from hf_roast.backends.geometry import geometry_of

    z, lm = _layer("roast", "tile")
    z = _z(z, zkind, lm.plan.tile_numel)
    data, scales, zformat = _z_operands(z)
    geometry = geometry_of(lm)
    x = torch.randn(3, 131, generator=torch.Generator().manual_seed(3))
    ops = torch.ops.hf_roast
    torch.library.opcheck(
        ops.roast_linear_cpu.default,
        (x, data, scales, torch.randn(77), lm.tile_slot, lm.tile_scale, geometry, zformat),
    )
    out = torch.empty(77, 131)
    torch.library.opcheck(
        ops.roast_weight_cpu.default, (data, scales, lm.tile_slot, lm.tile_scale, geometry, zformat, out)
    )
    if zkind == "int4":
        torch.library.opcheck(ops.roast_dequantize_cpu.default, (z.codes, z.scales, 4, z.group_size, 6, 50))
