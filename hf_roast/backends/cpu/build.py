"""Compile, cache and load the CPU kernel, and check that Python and C agree on its argument structs.

The kernel is built once per machine with the system's C++ compiler (``$CXX``, else ``c++`` / ``g++`` /
``clang++``) from :func:`source`: the translated formulas (:mod:`.translate`) followed by ``roast_cpu.cpp``,
shipped as package data. Libraries are cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, as
``torch.utils.cpp_extension`` caches its builds), keyed by the source, the flags, the compiler and the CPU,
so a second process loads the library in milliseconds. Without a compiler, :func:`unavailable_reason` says
why, and the backend's gate reports it.

The kernel takes its arguments as two C structs, ``Z`` and ``Args``, mirrored here by :class:`ZStruct` and
:class:`ArgsStruct`. Nothing in ctypes ties a mirror to its C struct, so a field added, dropped or
reordered on one side only would shift every later field and silently corrupt memory. Each load therefore
compares the sizes and field offsets the compiled library reports (``hf_roast_struct_layout``) with the mirrors'
and raises :class:`StructLayoutError` on any difference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path

from .translate import c_formulas

KERNEL_FILE = "roast_cpu.cpp"
"""The kernel's C++ source, package data of ``hf_roast.backends.cpu``."""

FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
)


class ZStruct(ctypes.Structure):
    """The C struct ``Z`` (roast_cpu.cpp): z's storage, float (``zkind``) or packed (``bits`` 8 or 4)."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("zkind", ctypes.c_int64),
        ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("bits", ctypes.c_int64),
        ("group", ctypes.c_int64),
    ]


class ArgsStruct(ctypes.Structure):
    """The C struct ``Args`` (roast_cpu.cpp): one call's pointers, geometry and hash constants."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("n_rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("z", ZStruct),
        ("tile_slot", ctypes.c_void_p),
        ("tile_scale", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("tr", ctypes.c_int64),
        ("tc", ctypes.c_int64),
        ("n_tr", ctypes.c_int64),
        ("n_tc", ctypes.c_int64),
        ("build", ctypes.c_int64),
        ("rounding", ctypes.c_int64),
        ("element_sign", ctypes.c_int64),
        ("tile_offset", ctypes.c_int64),
        ("segment_start", ctypes.c_int64),
        ("segment_size", ctypes.c_int64),
        ("slot_a", ctypes.c_int64),
        ("slot_b", ctypes.c_int64),
        ("sign_a", ctypes.c_int64),
        ("sign_b", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("threads", ctypes.c_int64),
    ]


STRUCTS = {0: ZStruct, 1: ArgsStruct}
"""The mirrors by the id ``hf_roast_struct_layout`` takes for their C struct."""


class StructLayoutError(RuntimeError):
    """A ctypes mirror disagrees with its C struct: calling the kernel would corrupt memory."""


def struct_layout(struct: type[ctypes.Structure]) -> tuple[int, dict[str, tuple[int, int]]]:
    """A ctypes structure's sizeof, and the offset and size of each field by name."""
    return ctypes.sizeof(struct), {
        name: (getattr(struct, name).offset, getattr(struct, name).size) for name, _ in struct._fields_
    }


def c_struct_layout(lib, which: int) -> tuple[int, dict[str, tuple[int, int]]]:
    """The same for the C struct ``which`` (0: ``Z``, 1: ``Args``), as the compiled library reports it."""
    name, offset, size = ctypes.c_char_p(), ctypes.c_int64(), ctypes.c_int64()
    n = lib.hf_roast_struct_layout(which, -1, ctypes.byref(name), ctypes.byref(offset), ctypes.byref(size))
    if n < 0:
        raise StructLayoutError(f"hf_roast CPU kernel: {KERNEL_FILE} reports no struct {which}")
    total, fields = size.value, {}
    for k in range(n):
        lib.hf_roast_struct_layout(which, k, ctypes.byref(name), ctypes.byref(offset), ctypes.byref(size))
        fields[name.value.decode()] = (offset.value, size.value)
    return total, fields


def check_struct_layouts(lib, structs: dict[int, type[ctypes.Structure]] = STRUCTS) -> None:
    """Raise :class:`StructLayoutError` unless every mirror has its C struct's size, and the same fields at
    the same offsets with the same sizes."""
    for which, struct in structs.items():
        c_side, py_side = c_struct_layout(lib, which), struct_layout(struct)
        if c_side != py_side:
            raise StructLayoutError(
                f"hf_roast CPU kernel: the ctypes mirror {struct.__name__} (hf_roast/backends/cpu/build.py) "
                f"does not match its C struct in {KERNEL_FILE}: C says (sizeof, {{field: (offset, size)}}) = "
                f"{c_side}, ctypes says {py_side}. Keep the fields of both (and hf_roast_struct_layout) alike."
            )


def kernel_source() -> str:
    """``roast_cpu.cpp`` as shipped with the package."""
    return files(__package__).joinpath(KERNEL_FILE).read_text()


def source() -> str:
    """The complete C++ source the library is compiled from: translated formulas, then the kernel."""
    return "#include <stdint.h>\n" + c_formulas() + "\n" + kernel_source()


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
    :attr:`lib` None; a library whose structs disagree with the mirrors raises, since that is a bug of
    this package, not of the machine."""

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
                except StructLayoutError:
                    self.tried = False  # a bug of this package: every call says so, none runs the kernel
                    raise
                except (OSError, subprocess.SubprocessError, NotImplementedError) as exc:
                    self.error = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
            return self.lib

    def _load(self):
        cxx = compiler()
        if cxx is None:
            raise OSError("no C++ compiler found (set CXX, or install g++ / clang++)")
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        src = source()
        key = hashlib.sha256("\0".join([src, " ".join(FLAGS), version, _cpu_key()]).encode()).hexdigest()[:20]
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
                    [cxx, *FLAGS, str(src_path), "-o", tmp], capture_output=True, text=True
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
        lib.hf_roast_struct_layout.argtypes = [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3
        lib.hf_roast_struct_layout.restype = ctypes.c_int64
        check_struct_layouts(lib)
        lib.hf_roast_gemv.argtypes = [ctypes.POINTER(ArgsStruct)]
        lib.hf_roast_gemv.restype = ctypes.c_int
        lib.hf_roast_build_weight.argtypes = [ctypes.POINTER(ArgsStruct), ctypes.c_void_p]
        lib.hf_roast_build_weight.restype = ctypes.c_int
        lib.hf_roast_dequantize.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
        lib.hf_roast_dequantize.restype = ctypes.c_int
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
