"""How the native extension ``deepzero_kernels._native`` is built: one home for its sources and
flags, used by ``setup.py`` at install time and by the just-in-time (JIT) build at first use.

Install time: ``pip install --no-build-isolation -e .`` compiles ``csrc/`` with torch's
cpp_extension (see setup.py). When that did not happen (torch was not importable in the build
environment, no compiler, a failed build), the first use of the native backend builds the same
sources with ``torch.utils.cpp_extension.load`` into a cache directory, once per machine, torch
version and source version, and later processes import the cached module directly.

Environment:
    DZ_NO_JIT=1           never build at first use (the torch backend is used instead)
    DZ_NO_NATIVE=1        no native extension at all, neither at install time nor JIT
    DZ_NATIVE_REQUIRED=1  a failed build (install time or JIT) is an error instead of a warning
    DZ_CACHE_DIR          cache directory (default $XDG_CACHE_HOME/deepzero_kernels, else
                          ~/.cache/deepzero_kernels)
    DZ_NO_CUDA=1, DZ_NATIVE_ARCH, TORCH_CUDA_ARCH_LIST: as for the install-time build

This module imports no torch at module level: setup.py loads it by path before torch may exist.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import threading
import time

__all__ = ["SOURCES", "CUDA_SOURCES", "csrc_dir", "cxx_flags", "nvcc_flags", "LINK_FLAGS", "cache_root",
           "find_compiler", "find_ninja", "jit_plan", "jit_build_dir", "load_jit", "cached_module_path"]

MODULE = "deepzero_kernels._native"
SOURCES = ("bindings.cpp", "cpu_kernels.cpp")
CUDA_SOURCES = ("cuda_kernels.cu",)
LINK_FLAGS = ["-fopenmp"]
_STAMP = "module.txt"     # written after a successful JIT build: the path of the built module
_FAILED = "FAILED.log"    # written after a failed JIT build: its output (no retry until removed)


def env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- sources and flags
def csrc_dir() -> str | None:
    """Directory holding the C++ sources: ``deepzero_kernels/_csrc`` in a wheel install, else the
    ``csrc/`` of the source checkout next to the package (editable installs). None if absent."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # deepzero_kernels/ (this is kernels/)
    for d in (os.path.join(pkg, "_csrc"), os.path.join(os.path.dirname(pkg), "csrc")):
        if all(os.path.isfile(os.path.join(d, s)) for s in SOURCES):
            return d
    return None


def source_files(csrc: str) -> list[str]:
    """Every file the build depends on (sources and headers, not the C++ tests), sorted."""
    out = []
    for root, dirs, files in os.walk(csrc):
        dirs[:] = sorted(d for d in dirs if d != "tests")
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith((".h", ".cpp", ".cu", ".cuh"))]
    return out


def cxx_flags(with_cuda: bool = False) -> list[str]:
    flags = ["-O3", "-fopenmp"]  # torch adds its C++ standard
    arch = os.environ.get("DZ_NATIVE_ARCH")
    if arch:
        flags.append(f"-march={arch}")
    if with_cuda:
        flags.append("-DDZ_WITH_CUDA")
    return flags


def nvcc_flags() -> list[str]:
    flags = ["-O3", "-DDZ_WITH_CUDA"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # else torch's cpp_extension uses that list
        # A100 / H100 code, plus PTX that newer GPUs compile at load time
        flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                  "-gencode=arch=compute_90,code=compute_90"]
    return flags


def want_cuda(torch, cpp_extension) -> bool:
    """CUDA kernels are built when torch has CUDA, nvcc is found and DZ_NO_CUDA is not set."""
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and not env_on("DZ_NO_CUDA")


# ----------------------------------------------------------------------------- tools
def find_compiler() -> str | None:
    """The C++ compiler torch's cpp_extension will call ($CXX, else c++), or None."""
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx.split()[0]) if cxx else None


def find_ninja() -> str | None:
    """ninja on PATH, else the one the ``ninja`` pip package installed (a venv's bin/ is not on
    PATH when its python is run without activating the venv)."""
    path = shutil.which("ninja")
    if path:
        return path
    for d in (os.path.dirname(sys.executable), _ninja_pkg_bin()):
        if d and os.path.isfile(os.path.join(d, "ninja")) and os.access(os.path.join(d, "ninja"), os.X_OK):
            return os.path.join(d, "ninja")
    return None


def _ninja_pkg_bin() -> str | None:
    try:
        import ninja  # the pip package
        return getattr(ninja, "BIN_DIR", None)
    except ImportError:
        return None


# ----------------------------------------------------------------------------- cache
def cache_root() -> str:
    """$DZ_CACHE_DIR, else $XDG_CACHE_HOME/deepzero_kernels, else ~/.cache/deepzero_kernels."""
    if os.environ.get("DZ_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["DZ_CACHE_DIR"]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "deepzero_kernels")


def jit_build_dir(csrc: str, torch_version: str, with_cuda: bool) -> str:
    """The build directory for these sources, flags, torch and Python: a change of any of them
    gives a new directory, so a stale module is never loaded."""
    h = hashlib.sha256()
    for f in source_files(csrc):
        h.update(os.path.relpath(f, csrc).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(repr((cxx_flags(with_cuda), LINK_FLAGS, nvcc_flags() if with_cuda else None,
                   os.environ.get("TORCH_CUDA_ARCH_LIST"), sys.platform)).encode())
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    safe_torch = "".join(c if c.isalnum() or c in ".-_" else "_" for c in torch_version)
    return os.path.join(cache_root(), f"native-{tag}-torch{safe_torch}{'-cuda' if with_cuda else ''}-{h.hexdigest()[:12]}")


def cached_module_path(build_dir: str) -> str | None:
    """The module a previous JIT build left in ``build_dir``, or None."""
    try:
        with open(os.path.join(build_dir, _STAMP)) as f:
            path = f.read().strip()
    except OSError:
        return None
    return path if path and os.path.isfile(path) else None


# ----------------------------------------------------------------------------- decision
def jit_plan() -> tuple[bool, str]:
    """Whether a JIT build can be attempted here: ``(True, build_dir)`` or ``(False, reason)``.
    Cheap: looks at the environment, the sources and the tools, compiles nothing."""
    if env_on("DZ_NO_NATIVE"):
        return False, "DZ_NO_NATIVE=1 is set"
    if env_on("DZ_NO_JIT"):
        return False, "the build at first use is disabled (DZ_NO_JIT=1): unset it, or build at install time"
    csrc = csrc_dir()
    if csrc is None:
        return False, ("the C++ sources (csrc/) are not part of this installation: install from a source "
                       "checkout with `pip install --no-build-isolation -e .`")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - the package needs torch anyway
        return False, f"torch is not importable ({e})"
    with_cuda = want_cuda(torch, cpp_extension)
    build_dir = jit_build_dir(csrc, torch.__version__, with_cuda)
    if cached_module_path(build_dir):
        return True, build_dir
    failed = os.path.join(build_dir, _FAILED)
    if os.path.isfile(failed):
        return False, f"the build at first use failed before (log: {failed}; delete that file to retry)"
    if find_compiler() is None:
        return False, (f"no C++ compiler found ({os.environ.get('CXX') or 'c++'} is not on PATH): install "
                       "one with OpenMP (e.g. apt-get install g++) or point CXX at it")
    if find_ninja() is None:
        return False, "ninja is not installed: pip install ninja"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return False, f"the Python headers are missing ({include}/Python.h): install python3-dev"
    return True, build_dir


# ----------------------------------------------------------------------------- build and load
def _import_built(path: str):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[MODULE] = mod
    return mod


class _Progress:
    """One line on stderr while the build runs: on a terminal it counts seconds in place; in a
    log it adds a line every 20 s."""

    def __init__(self, stream, msg: str):
        self.stream, self.msg = stream, msg
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._write(self.msg + (" ..." if not self.tty else ""), newline=not self.tty)
        self._thread.start()
        return self

    def _write(self, text, newline=True):
        try:
            self.stream.write(("\r" + text + "\033[K" if self.tty else text) + ("\n" if newline else ""))
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _run(self):
        spin = "|/-\\"
        i = 0
        while not self._stop.wait(1.0 if self.tty else 20.0):
            i += 1
            s = int(time.monotonic() - self.t0)
            if self.tty:
                self._write(f"{self.msg} {spin[i % 4]} {s} s", newline=False)
            else:
                self._write(f"deepzero_kernels: still building the native kernels ({s} s)")

    def done(self, text):
        self._stop.set()
        self._thread.join()
        self._write(f"{self.msg} {text}" if self.tty else f"deepzero_kernels: {text}")

    def __exit__(self, *exc):
        if not self._stop.is_set():  # left by an exception: stop the ticker, end the line
            self.done("interrupted")
        return False


def load_jit(stream=None):
    """The JIT-built native module: imported from the cache, or built there first (with a
    one-line message and progress on ``stream``, default stderr). Returns ``(module, None)`` or
    ``(None, reason)``; raises instead when DZ_NATIVE_REQUIRED=1 and the build fails."""
    ok, info = jit_plan()
    if not ok:
        return None, info
    build_dir = info
    path = cached_module_path(build_dir)
    if path:
        try:
            return _import_built(path), None
        except ImportError as e:
            return None, f"the cached native module {path} does not import ({e}); delete {build_dir} to rebuild"
    import torch
    from torch.utils import cpp_extension
    csrc = csrc_dir()
    with_cuda = want_cuda(torch, cpp_extension)
    sources = [os.path.join(csrc, s) for s in SOURCES + (CUDA_SOURCES if with_cuda else ())]
    os.makedirs(build_dir, exist_ok=True)
    ninja = find_ninja()
    if ninja and shutil.which("ninja") is None:  # cpp_extension calls `ninja` through PATH
        os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + os.environ.get("PATH", "")
    stream = stream or sys.stderr
    msg = (f"deepzero_kernels: building the native kernels for this machine (first use only, about a "
           f"minute on 2 cores; cache {build_dir}; DZ_NO_JIT=1 skips this)")
    with _Progress(stream, msg) as progress:
        t0 = time.monotonic()
        try:
            mod = cpp_extension.load(
                name="_native", sources=sources, extra_cflags=cxx_flags(with_cuda),
                extra_cuda_cflags=nvcc_flags() if with_cuda else None, extra_ldflags=LINK_FLAGS,
                extra_include_paths=[csrc], build_directory=build_dir, with_cuda=with_cuda, verbose=False)
        except Exception as e:  # noqa: BLE001 - compiler, linker or ninja failure
            log = os.path.join(build_dir, _FAILED)
            try:
                with open(log, "w") as f:
                    f.write(f"{type(e).__name__}: {e}\n")
            except OSError:
                pass
            progress.done(f"failed after {time.monotonic() - t0:.0f} s (log: {log}); the torch backend is used")
            if env_on("DZ_NATIVE_REQUIRED"):
                raise RuntimeError(f"deepzero_kernels: DZ_NATIVE_REQUIRED=1 and the native build failed: {e}") from e
            return None, f"the build at first use failed ({type(e).__name__}; log: {log})"
        progress.done(f"done in {time.monotonic() - t0:.0f} s")
    sys.modules[MODULE] = mod
    tmp = os.path.join(build_dir, f"{_STAMP}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(mod.__file__)
    os.replace(tmp, os.path.join(build_dir, _STAMP))
    return mod, None
