"""Every Python package folder of the repository is listed in pyproject, so a wheel carries it; the lowest-deps
check pins exactly pyproject's lower bounds."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = config["package-dir"]
    for package, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([package, *rel.parts]) if rel.parts else package
            if "__pycache__" not in rel.parts:
                assert name in listed, f"{name} ({init.parent}) is missing from pyproject's packages list"


def _versions(requirements, operator: str) -> dict[str, Version]:
    found = {}
    for line in requirements:
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (version,) = [spec.version for spec in req.specifier if spec.operator == operator]
            found[canonicalize_name(req.name)] = Version(version)
    return found


def test_lowest_deps_pins_equal_the_lower_bounds():
    """.ci/check_lowest tests .ci/lowest-deps.txt: its pins must be pyproject's lower bounds, every one."""
    lower = _versions(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"], ">=")
    pinned = _versions((ROOT / ".ci" / "lowest-deps.txt").read_text().splitlines(), "==")
    assert pinned == lower
