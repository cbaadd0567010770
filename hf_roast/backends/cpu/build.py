"""Compile, cache and load the CPU kernel, whose entry points are torch ops.

The kernel is built once per machine with the system's C++ compiler (``$CXX``, else ``c++`` / ``g++`` /
``clang++``) from :func:`source`: the translated formulas (:mod:`.translate`), the constants it shares with
Python (:func:`c_constants`), then ``roast_cpu.cpp`` (the loops) and ``roast_cpu_op.cpp`` (their torch ops),
shipped as package data. It compiles against torch's own headers and libraries, as
``torch.utils.cpp_extension`` builds an extension. Libraries are cached in torch's extension directory
(``TORCH_EXTENSIONS_DIR``), keyed by the source, the flags, the compiler, torch's version and the CPU, so a
second process loads the library in milliseconds. Without a compiler, :func:`unavailable_reason` says why,
and the backend's gate reports it.

Loading the library registers the CPU kernels of ``hf_roast::roast_linear_cpu``, ``roast_weight_cpu`` and
``roast_dequantize_cpu`` (defined in :mod:`hf_roast.backends.custom_ops`), once per process. Python passes
tensors to those ops and never lays out a C struct itself: the C++ side fills its own argument structs from
the op's arguments, so no ctypes mirror can drift from them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path

import torch

from hf_roast.backends import custom_ops
from hf_roast.backends.geometry import Geometry
from hf_roast.mapping import is_tiled_mapper
from hf_roast.vocab import MAPPERS, SIGN_IDS

from .translate import c_formulas

KERNEL_FILES = ("roast_cpu.cpp", "roast_cpu_op.cpp")
"""The kernel's C++ sources, package data of ``hf_roast.backends.cpu``, compiled as one unit in this order."""

MAX_ROWS = 16
"""Most rows (batch x sequence) the fused GEMV takes per call: above it building W once is amortised over
enough rows that a GEMM wins (measured: see docs/backends.md)."""
MAX_TILE = 64
"""The kernel's stack buffers hold mapping tiles of at most 64 x 64 (and at most MAX_ROWS rows)."""
PARALLEL_GRAIN = 1 << 15
"""Multiply-adds per thread below which a call runs on fewer threads (one below twice this). The loop runs in
torch's own OpenMP pool, whose threads are still spinning from torch's previous op, so a fork/join costs about
a microsecond. On SmolLM2-135M at 16x (``python -m benchmarks.gemv_threads``: one process, 1 and 2 threads
interleaved, the cache flushed as the output layer flushes it), 2 threads took its q/o projections (332K
multiply-adds) 2-27 % faster and its k/v (110K) between 3 % slower and 18 % faster over four runs; the MLP's
(885K) gain 15-26 %. When calls came through ctypes and a Python op kernel, a larger grain (2^18: q/k/v/o on
one thread) had measured best. On a machine busy with other jobs a fork/join can wait a whole scheduler slice,
so there fewer threads (``torch.set_num_threads``) are faster."""

FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
    "-std=c++20",  # torch's headers need it (as torch.utils.cpp_extension compiles)
    "-w",  # torch's headers warn under -march=native; a failed build still reports its errors
)

OP_NAMES = ("roast_linear_cpu", "roast_weight_cpu", "roast_dequantize_cpu")
"""The ops whose CPU kernels the library registers (hf_roast_register_ops in roast_cpu_op.cpp)."""


def c_constants() -> str:
    """What the kernel shares with Python, as C constants generated from their one home: the order of
    :class:`~hf_roast.backends.geometry.Geometry`'s fields (the ops' ``geometry`` list), which mappers are
    tiled, the element-sign id, and the kernel's limits above."""
    fields = [f.name for f in dataclasses.fields(Geometry)]
    tiled = ", ".join("true" if is_tiled_mapper(m) else "false" for m in MAPPERS)
    lines = [
        f"static const size_t GEOMETRY_FIELDS = {len(fields)};",
        *(f"static const int64_t GEO_{name} = {i};" for i, name in enumerate(fields)),
        f"static const int64_t MAPPER_COUNT = {len(MAPPERS)};",
        f"static const bool TILED_MAPPER[{len(MAPPERS)}] = {{{tiled}}};",
        f"static const int64_t SIGN_ELEMENT = {SIGN_IDS['element']};",
        f"static const int64_t MAX_ROWS = {MAX_ROWS};",
        f"static const int64_t MAX_TILE = {MAX_TILE};",
        f"static const int64_t PARALLEL_GRAIN = {PARALLEL_GRAIN};",
    ]
    return "\n".join(lines)


def torch_flags() -> list[str]:
    """Compile and link flags for torch's headers and libraries (its ABI, include and library paths)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    libs = library_paths()
    return [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{path}" for path in include_paths()),
        *(f"-L{path}" for path in libs),
        *(f"-Wl,-rpath,{path}" for path in libs),
        "-lc10",
        "-ltorch_cpu",
    ]


def kernel_source() -> str:
    """The kernel's C++ files as shipped with the package, in compilation order."""
    return "\n".join(files(__package__).joinpath(name).read_text() for name in KERNEL_FILES)


def source() -> str:
    """The complete C++ source the library is compiled from: translated formulas, shared constants, kernel."""
    return (
        "#include <stdint.h>\n#include <stddef.h>\n"
        + c_formulas()
        + "\n"
        + c_constants()
        + "\n"
        + kernel_source()
    )


def compiler() -> str | None:
    """The C++ compiler to use (``$CXX``, else ``c++`` / ``g++`` / ``clang++`` on PATH), or None."""
    candidates = [os.environ.get("CXX")] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def build_dir() -> Path:
    """torch's extension cache (``$TORCH_EXTENSIONS_DIR``, else its default root), as cpp_extension uses."""
    from torch.utils.cpp_extension import get_default_build_root

    path = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "hf_roast_cpu"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags, so a shared cache never loads foreign code."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


class Library:
    """The compiled kernel, built or loaded once per process on first use (thread-safe).

    A machine that cannot build it (no compiler, a compiler error) leaves :attr:`error` set and
    :attr:`lib` None."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lib = None
        self.error: str | None = None
        self.tried = False
        self.build_seconds = 0.0

    def load(self):
        with self.lock:
            if not self.tried:
                self.tried = True
                try:
                    self.lib = self._load()
                except (OSError, subprocess.SubprocessError, NotImplementedError) as exc:
                    self.error = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
            return self.lib

    def _load(self):
        cxx = compiler()
        if cxx is None:
            raise OSError("no C++ compiler found (set CXX, or install g++ / clang++)")
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        src, flags = source(), [*FLAGS, *torch_flags()]
        parts = [src, " ".join(flags), version, torch.__version__, _cpu_key()]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
        directory = build_dir()
        target = directory / f"hf_roast_cpu_{key}.so"
        if not target.is_file():
            start = time.perf_counter()
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
            src_path = Path(tmp).with_suffix(".cpp")
            src_path.write_text(src)
            try:
                result = subprocess.run(
                    [cxx, str(src_path), "-o", tmp, *flags], capture_output=True, text=True
                )
                if result.returncode != 0:
                    raise OSError(f"{cxx} failed: {result.stderr[-1500:]}")
                os.replace(tmp, target)  # atomic: concurrent processes never load a half-written file
            finally:
                src_path.unlink(missing_ok=True)
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.build_seconds = time.perf_counter() - start
        lib = ctypes.CDLL(str(target))
        lib.hf_roast_kernel_calls.argtypes = [ctypes.c_int64]
        lib.hf_roast_kernel_calls.restype = ctypes.c_int64
        if not all(custom_ops.has_kernel(name, "CPU") for name in OP_NAMES):
            # once per process: a second copy of the library (another cache) must not register them again
            lib.hf_roast_register_ops()
        return lib


library = Library()
"""The process's one kernel library."""


def unavailable_reason() -> str | None:
    """None when the kernel is built (or builds now); otherwise why it cannot be (no compiler, build error)."""
    if library.lib is not None:  # built: no lock on the per-call path
        return None
    return None if library.load() is not None else library.error


def loaded_library():
    """The loaded library, or a RuntimeError saying why there is none."""
    lib = library.lib or library.load()
    if lib is None:
        raise RuntimeError(f"The hf-roast CPU kernel is not available: {library.error}")
    return lib
