"""Build of the native extension ``deepzero_kernels._native`` (metadata: pyproject.toml).

The pure-Python package (torch backend) installs with no compiler. The native extension (csrc/:
C++/OpenMP kernels, plus CUDA kernels when torch has CUDA and nvcc is found) is built with torch's
cpp_extension and ninja when torch is importable at build time, i.e. with
``pip install --no-build-isolation``. It is optional: when it is not built here (no torch in an
isolated build environment, DZ_NO_NATIVE=1, a failed build) the install says why and the first use
builds it just in time into a cache (deepzero_kernels/kernels/native_build.py; DZ_NO_JIT=1 opts out).
DZ_NATIVE_REQUIRED=1 makes a skipped or failed build an error; DZ_NO_CUDA=1 leaves out the CUDA
kernels; DZ_NATIVE_ARCH=native adds -march=native; the CUDA architectures are sm_80 and sm_90
(+ PTX) unless TORCH_CUDA_ARCH_LIST says otherwise. The CPU kernels are compiled for baseline
x86-64 and AVX2+FMA, chosen at run time.

pip shows a build's output only with -v, so the reason a native build was skipped or failed is
also written to the terminal (/dev/tty) when there is one.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_native_build():
    """deepzero_kernels/kernels/native_build.py by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location("_dz_native_build",
                                                  os.path.join(ROOT, "deepzero_kernels", "kernels", "native_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NB = _load_native_build()


def say(msg: str) -> None:
    """A message the user sees: stderr, and the terminal too, since pip hides a build's output."""
    line = f"deepzero_kernels: {msg}"
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass


def required() -> bool:
    return NB.env_on("DZ_NATIVE_REQUIRED")


class BuildPyWithSources(build_py):
    """Also ship csrc/ inside the package (deepzero_kernels/_csrc) so that an install without the
    compiled extension can build it at first use. Editable installs use the checkout's csrc/."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dst = os.path.join(self.build_lib, "deepzero_kernels", "_csrc")
        src = os.path.join(ROOT, "csrc")
        for f in NB.source_files(src):
            out = os.path.join(dst, os.path.relpath(f, src))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copyfile(f, out)


def native_extension():
    """(ext_modules, cmdclass) for the native backend; ([], {...}) when it cannot or must not be built."""
    cmdclass = {"build_py": BuildPyWithSources}
    if NB.env_on("DZ_NO_NATIVE"):
        say("DZ_NO_NATIVE=1: the native extension is not built (the torch backend is used)")
        return [], cmdclass
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        msg = (f"torch is not importable in the build environment ({e}), so the native extension is "
               "not built now. Install with `pip install --no-build-isolation ...` after torch to build it "
               "here; otherwise it is built at first use (needs a C++ compiler; DZ_NO_JIT=1 opts out).")
        if required():
            raise RuntimeError(f"deepzero_kernels: DZ_NATIVE_REQUIRED=1 and {msg}")
        say(msg)
        return [], cmdclass
    ninja = NB.find_ninja()
    if ninja is None:
        say("ninja is not installed: the native extension is compiled without it (pip install ninja)")
    elif shutil.which("ninja") is None:  # torch's BuildExtension calls `ninja` through PATH
        os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + os.environ.get("PATH", "")

    csrc = "csrc"
    sources = [os.path.join(csrc, f) for f in NB.SOURCES]
    kwargs = dict(include_dirs=[os.path.join(ROOT, csrc)], extra_link_args=NB.LINK_FLAGS)
    if NB.want_cuda(torch, cpp_extension):
        ext = cpp_extension.CUDAExtension(
            "deepzero_kernels._native", sources + [os.path.join(csrc, f) for f in NB.CUDA_SOURCES],
            extra_compile_args={"cxx": NB.cxx_flags(True), "nvcc": NB.nvcc_flags()}, **kwargs)
    else:
        ext = cpp_extension.CppExtension("deepzero_kernels._native", sources,
                                         extra_compile_args={"cxx": NB.cxx_flags(False)}, **kwargs)

    # optional: a missing .so after a failed build is not copied into the package (see below)
    ext.optional = not required()

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension (ninja) whose failure is a warning unless DZ_NATIVE_REQUIRED=1."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler/ninja failure
                if required():
                    raise
                say(f"WARNING: building the native extension failed ({type(e).__name__}: {e}); it is "
                    "retried at first use, else the torch backend is used. Run pip with -v for the "
                    "compiler output.")

    cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=NB.find_ninja() is not None)
    return [ext], cmdclass


ext_modules, cmdclass = native_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
