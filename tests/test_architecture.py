"""The import structure of hf_roast, checked from the source (see docs/architecture.md).

Every ``import`` of ``hf_roast/`` and ``scripts/`` (``hf_roast.scripts``) is parsed with ``ast``, module-level
and lazy (inside functions) alike, with relative imports resolved. The test fails on any import circle, on an
import that goes up the layers, on a module that no layer lists, on any import from a backend
(``hf_roast/backends/``: ``pytorch``, ``cpu/``, ``triton/``) into hf_roast other than the vocabularies and the
mapping layer (and the op contract: ``custom_ops``, ``geometry``), on a backend importing another, on the op
contract importing a backend, and on a module above the backends reaching one other than through the front
(``dispatch``, and ``cpu_kernels``, which registers the ops' CPU kernels) or the PyTorch path's helpers. Nothing in the repo may be importable as a top-level
``kernels``: that name is Hugging Face's kernel-hub package, which transformers imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {
    "hf_roast": ROOT / "hf_roast",
    "hf_roast.scripts": ROOT / "scripts",
}

LAYERS = {
    1: ["vocab", "config", "atomic"],
    2: ["mapping", "quant", "checkpoint_format"],
    3: [
        "backends",
        "backends.geometry",
        "backends.custom_ops",
        "backends.pytorch",
        "backends.cpu",
        "backends.cpu.*",
        "backends.triton",
        "backends.triton.*",
    ],
    4: ["backends.dispatch", "backends.cpu_kernels"],
    5: ["layers", "balance", "sliceout"],
    6: ["targets", "initialization", "calibration", "compress", "report"],
    7: ["checkpoint", "checkpoint.*", "quantizer"],
    8: ["model", "optim", "distill", "recovery"],
    9: ["", "cli", "scripts", "scripts.*"],
}
"""Layer of each module (names relative to ``hf_roast``; ``""`` is the package itself). A module may import
from its own layer (without a circle) and from the layers below it, never from above."""

TRITON = "hf_roast.backends.triton"
DISPATCH = "hf_roast.backends.dispatch"
FRONT = {DISPATCH, "hf_roast.backends.cpu_kernels"}
"""The front of the backends: dispatch chooses a path per call; cpu_kernels registers the ops' CPU kernels
(the C++ kernel, or the Triton interpreter in tests). Only these import more than one execution path."""
OP_CONTRACT = {"hf_roast.backends.geometry", "hf_roast.backends.custom_ops"}
"""The ops every path implements (schemas, fake implementations, autograd) and their Geometry: shared by
the paths, part of none."""
KERNELS_MAY_IMPORT = {"hf_roast.vocab", "hf_roast.mapping", "hf_roast.quant", *OP_CONTRACT}
"""What any backend (execution path) may import from hf_roast outside its own package."""


def _modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The hf_roast modules ``name`` imports, anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in MODULES:  # `import hf_roast.x.y` of a name, not a module: its module
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == "hf_roast" or source.startswith("hf_roast.")):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in MODULES else source)
    found.discard(name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int | None:
    relative = "" if name == "hf_roast" else name.removeprefix("hf_roast.")
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            if relative == pattern or (pattern.endswith(".*") and relative.startswith(pattern[:-1])):
                return layer
    return None


def test_the_parser_sees_lazy_and_relative_imports():
    assert f"{TRITON}.ops" in GRAPH[DISPATCH]  # lazy, relative, into the Triton backend
    assert f"{TRITON}.available" in GRAPH[DISPATCH]
    assert "hf_roast.backends.cpu.ops" in GRAPH[DISPATCH]  # `from .cpu import ops as cpu`
    assert "hf_roast.backends.custom_ops" in GRAPH[f"{TRITON}.ops"]  # absolute, into the op contract
    assert f"{TRITON}.roast_matmul" in GRAPH[f"{TRITON}.ops"]  # `from . import roast_matmul`
    assert "hf_roast.mapping" in GRAPH[f"{TRITON}.roast_matmul"]  # absolute into hf_roast
    assert "hf_roast.backends.pytorch" in GRAPH["hf_roast.calibration"]  # inside a function
    assert "hf_roast" in GRAPH["hf_roast.scripts.compress_folder"]  # scripts/ is hf_roast.scripts


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                circle = path[path.index(target) :] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_every_module_has_a_layer_and_imports_only_downward():
    unplaced = sorted(name for name in MODULES if _layer(name) is None)
    assert not unplaced, f"modules with no layer in tests/test_architecture.py LAYERS: {unplaced}"
    upward = sorted(
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(name)
    )
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


BACKENDS = ("hf_roast.backends.pytorch", "hf_roast.backends.cpu", TRITON)
"""The execution paths: a module or a subpackage each. None imports another: where the PyTorch path uses the
CPU backend's one-pass W build, dispatch hands it down (``pytorch.NativeWeight``)."""


def _backend_of(name: str) -> str | None:
    return next((b for b in BACKENDS if name == b or name.startswith(b + ".")), None)


def test_execution_paths_never_import_one_another():
    edges = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if _backend_of(name)
        for target in targets
        if _backend_of(target) and _backend_of(target) != _backend_of(name)
    )
    assert not edges, "execution paths importing one another (docs/architecture.md):\n" + "\n".join(edges)


def test_the_library_never_imports_the_research_harness():
    """``benchmarks/`` lives in a clone, not in the wheel: nothing installed may import it."""
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            found += [
                f"{name} imports {m}" for m in modules if m == "benchmarks" or m.startswith("benchmarks.")
            ]
    assert not found, "\n".join(found)


def test_only_dispatch_imports_the_backends():
    """Above the backends, only the front (dispatch) picks a path; the layers and the conversion may use
    the PyTorch path's helpers (the W build and its adjoint), and the entry points (scripts) anything."""
    outside = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if not _backend_of(name) and name not in FRONT and _layer(name) < 9
        for target in targets
        if _backend_of(target) and _backend_of(target) != "hf_roast.backends.pytorch"
    )
    assert not outside, "modules that reach a backend other than through dispatch:\n" + "\n".join(outside)


def test_backends_import_only_the_mapping_layer():
    """Paths take a LayerMapping and tensors: below them only the vocabularies, the mapping and the
    quantisation formulas, never the config, layers or models."""
    outside = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if _backend_of(name)
        for target in targets
        if not _backend_of(target) and target != "hf_roast.backends" and target not in KERNELS_MAY_IMPORT
    )
    assert not outside, "a backend reaches into hf_roast beyond the mapping layer:\n" + "\n".join(outside)


def test_the_op_contract_imports_no_execution_path():
    """``custom_ops`` and ``geometry`` define what every path implements; they sit below all of them."""
    edges = sorted(f"{name} imports {t}" for name in OP_CONTRACT for t in GRAPH[name] if _backend_of(t))
    assert not edges, "\n".join(edges)
