"""``hf-roast check-gpu``: compile every fused kernel launch for real GPUs ahead of time, without a GPU.

    hf-roast check-gpu                  # every target, kernel, dtype, z storage, tier, mapper and sign
    hf-roast check-gpu --subset ci      # sm_80 and sm_90, the default mapping (what CI runs)

Exits non-zero on a compile error, shared memory over a target's limit, or a register spill of the stable
or roast mappers. The work is in :mod:`hf_roast.backends.triton.compile_check` (it needs triton, no GPU).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        try:
            import triton  # noqa: F401
        except ImportError:
            print(__doc__)  # --help works where triton (an optional extra) is not installed
            return 0
    try:
        from hf_roast.backends.triton import compile_check
    except ImportError as exc:
        print(f"hf-roast check-gpu needs triton (pip install 'hf-roast[triton]'): {exc}", file=sys.stderr)
        return 2
    return compile_check.main(argv)


if __name__ == "__main__":
    sys.exit(main())
