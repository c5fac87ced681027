"""Build and install deepzero_kernels.

The pure-Python package (torch backend) installs with no compiler. The native extension
``deepzero_kernels._native`` (csrc/: C++/OpenMP kernels, plus CUDA kernels when torch has CUDA
and nvcc is found) is built with torch's cpp_extension and ninja when torch is importable at
build time, i.e. with ``pip install --no-build-isolation``. It is optional: a failed build warns
and leaves the torch backend (set DZ_NATIVE_REQUIRED=1 to make it an error; DZ_NO_NATIVE=1 skips
it; DZ_NO_CUDA=1 leaves out the CUDA kernels; DZ_NATIVE_ARCH=native adds -march=native; the
CUDA architectures are sm_80 and sm_90 (+ PTX) unless TORCH_CUDA_ARCH_LIST says otherwise). The CPU
kernels are compiled for baseline x86-64 and AVX2+FMA, chosen at run time.
"""
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_extension():
    """(ext_modules, cmdclass) for the native backend, or ([], {}) when it cannot or must not be built."""
    if os.environ.get("DZ_NO_NATIVE") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("deepzero_kernels: torch is not importable at build time (use --no-build-isolation); "
              "skipping the native extension", file=sys.stderr)
        return [], {}

    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, f) for f in ("bindings.cpp", "cpu_kernels.cpp")]
    cxx = ["-O3", "-fopenmp"]  # torch adds its C++ standard
    arch = os.environ.get("DZ_NATIVE_ARCH")
    if arch:
        cxx.append(f"-march={arch}")
    link = ["-fopenmp"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, csrc)])
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None \
        and os.environ.get("DZ_NO_CUDA") != "1"
    if with_cuda:
        nvcc = ["-O3", "-DDZ_WITH_CUDA"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # else torch's cpp_extension uses that list
            # A100 / H100 code, plus PTX that newer GPUs compile at load time
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
        ext = cpp_extension.CUDAExtension(
            "deepzero_kernels._native", sources + [os.path.join(csrc, "cuda_kernels.cu")],
            extra_compile_args={"cxx": cxx + ["-DDZ_WITH_CUDA"], "nvcc": nvcc}, extra_link_args=link, **kwargs)
    else:
        ext = cpp_extension.CppExtension("deepzero_kernels._native", sources,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=link, **kwargs)

    # optional: a missing .so after a failed build is not copied into the package (see below)
    ext.optional = os.environ.get("DZ_NATIVE_REQUIRED") != "1"

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension (ninja) whose failure is a warning unless DZ_NATIVE_REQUIRED=1."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler/ninja failure
                if os.environ.get("DZ_NATIVE_REQUIRED") == "1":
                    raise
                print(f"deepzero_kernels: WARNING: building the native extension failed ({e}); "
                      "the torch backend is used", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()

setup(
    name="deepzero_kernels",
    version="0.1.0",
    description="Fused kernels and a trainer for zeroth-order (DeepZero) training of deep networks",
    packages=find_packages(include=["deepzero_kernels", "deepzero_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "train": ["scikit-learn", "tqdm", "matplotlib"],
        # triton: its kernels are tested on CPU under TRITON_INTERPRET=1 (Linux x86-64 wheels only)
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "tqdm", "matplotlib",
                 "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
