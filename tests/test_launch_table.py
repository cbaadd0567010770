"""The launch table (hf_roast/backends/triton/launch.py) and its page in docs/kernels.md say the same thing."""

from pathlib import Path

from hf_roast.backends.triton.launch import LAUNCH_TABLE

DOC = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"
TARGETS = ("sm_80", "sm_89", "sm_90")


def _cell(b) -> str:
    return f"{b.m}x{b.n}x{b.k}, {b.num_warps} w, {b.num_stages} st"


def documented_rows() -> dict[tuple[str, str, str], list[str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("mm", "grad_z"):
            rows[cells[0], cells[1], cells[2]] = cells[3:]
    return rows


def test_the_documented_launch_table_is_the_code_s():
    documented = documented_rows()
    in_code = {(f, cls, tier) for (_, f, tier, cls) in LAUNCH_TABLE}
    assert set(documented) == in_code
    for (family, cls, tier), cells in documented.items():
        assert cells == [_cell(LAUNCH_TABLE[t, family, tier, cls]) for t in TARGETS], (family, tier, cls)
