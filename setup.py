"""Build and install deepzero_kernels.

The pure-Python package (torch backend) installs with no compiler. The native extension
(csrc/, OpenMP + CUDA) is added by the kernels work and is optional: the package works
without it.
"""
from setuptools import find_packages, setup

setup(
    name="deepzero_kernels",
    version="0.1.0",
    description="Fused kernels and a trainer for zeroth-order (DeepZero) training of deep networks",
    packages=find_packages(include=["deepzero_kernels", "deepzero_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "train": ["scikit-learn", "tqdm", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "tqdm", "matplotlib"],
    },
)
