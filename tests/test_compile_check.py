"""The ahead-of-time compile check (``hf-roast check-gpu``): its matrix, and its CI subset run for real.

The CI subset compiles every kernel, activation dtype, z storage and row tier of the default mapping for
sm_80 and sm_90 with the launchers' own configurations, on this CPU-only machine (Triton compiles for a named
target with the ptxas in its wheel), and fails on a compile error, shared memory over the target's limit or a
register spill. It needs triton's NVIDIA backend, not a GPU; it takes a few minutes on two cores.
"""

import pytest

pytest.importorskip("triton")
from hf_roast.backends.triton import compile_check as cc  # noqa: E402
from hf_roast.backends.triton import launch  # noqa: E402

needs_compiler = pytest.mark.skipif(cc.unsupported_reason() is not None, reason=str(cc.unsupported_reason()))


def test_ci_subset_covers_every_kernel_dtype_z_storage_and_tier():
    cases = cc.matrix("ci")
    assert {c.target for c in cases} == {"sm_80", "sm_90"}
    assert {c.kernel for c in cases} == set(cc.KERNELS)
    assert {c.dtype for c in cases} == set(cc.DTYPES)
    assert {c.zstore for c in cases} - {"-"} == set(cc.ZSTORES)
    assert {c.tier for c in cases} - {"-"} == set(launch.TIERS)
    for kernel in ("fwd", "grad_input"):  # the whole product for the kernels that read z
        for tier in launch.TIERS:
            for dtype in cc.DTYPES:
                for zstore in cc.zstores_for(dtype):
                    assert cc.Case(kernel, "sm_90", tier, dtype, zstore) in cases
    assert len(set(cases)) == len(cases)


def test_full_matrix_adds_every_mapper_sign_and_the_int64_kernels():
    cases = cc.matrix("full", ["sm_89"])
    assert {(c.mapper, c.sign) for c in cases} == set(cc.MAPPER_SIGNS)
    assert any(c.wide for c in cases)
    assert {c.kernel for c in cases if c.mapper == "hashednet"} == set(cc.KERNELS)


def test_every_launch_table_entry_is_a_case_of_the_matrix():
    """A table entry no case compiles could launch unchecked: every (target, family, tier, class) is reached."""
    reached = set()
    for case in cc.matrix("full", list(launch.TARGETS)):
        if case.kernel in ("fwd", "grad_input", "grad_z"):
            family = "grad_z" if case.kernel == "grad_z" else "mm"
            hashed = (case.sign == "element" or case.mapper == "hashednet") and family == "mm"
            cls = launch.operand_class(case.dtype in cc.HALF, hashed)
            reached.add((cc.table_name(case.target), family, case.tier, cls))
    assert reached == set(launch.LAUNCH_TABLE)


def test_launches_take_the_tables_blocks():
    args = cc.build_launch(cc.Case("grad_z", "sm_89", "prefill", "bf16", "-")).args
    blocks = launch.LAUNCH_TABLE[("sm_89", "grad_z", "prefill", "half")]
    assert (args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]) == (blocks.m, blocks.n, blocks.k)
    assert (args["num_warps"], args["num_stages"]) == (blocks.num_warps, blocks.num_stages)
    fwd = cc.build_launch(cc.Case("fwd", "sm_100", "decode", "fp32", "int8")).args
    assert fwd["ZBITS"] == 8 and fwd["TILE_GRID"] and not fwd["WIDE"]
    assert fwd["BLOCK_K"] == launch.LAUNCH_TABLE[("sm_90", "mm", "decode", "fp32")].k
    assert cc.build_launch(cc.Case("fwd", "sm_80", "mid", "tf32", "fp32")).args["DOT_PRECISION"] == "tf32"
    assert cc.build_launch(cc.Case("fwd", "sm_80", "mid", "bf16", "act", wide=True)).args["WIDE"]


def test_ptx_lowering_and_verdicts():
    assert cc.dot_lowering("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert cc.dot_lowering("mma.sync.aligned.m16n8k16.row.col") == "mma"
    assert cc.dot_lowering("fma.rn.f32 %f1") == "fma"
    spill = cc.Result(
        cc.Case("fwd", "sm_90", "mid", "bf16", "act", "hashednet"), registers=255, spill=8, shared=1
    )
    spill.shared_limit = 2
    spill.judge()
    assert spill.ok  # hashednet spills are reported, not failed
    for mapper, problem in (("roast", "spills 8 B"), ("stable", "spills 8 B")):
        r = cc.Result(cc.Case("fwd", "sm_90", "mid", "bf16", "act", mapper), registers=255, spill=8, shared=3)
        r.shared_limit = 2
        r.judge()
        assert r.problems == ["shared 3 > 2", problem]


@needs_compiler
def test_ci_subset_compiles_within_the_limits_without_spills():
    results = cc.run_cases(cc.matrix("ci"))
    failing = [r.line() for r in results if not r.ok]
    assert not failing, "\n".join(failing)
    assert {r.dot for r in results if r.case.target == "sm_90" and r.case.tier == "prefill"} - {"-"} == {
        "wgmma"
    }
    assert {r.dot for r in results if r.case.target == "sm_80"} - {"-"} == {"mma"}
