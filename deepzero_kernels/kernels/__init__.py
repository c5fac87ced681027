"""Fused-kernel backends of the perturbation ops, behind one registry and one validated interface.
A leaf package: it imports nothing of ``deepzero_kernels`` but :mod:`deepzero_kernels.formulas`.

* ``spec.py``: typed arguments (:class:`BnMode`, :class:`BnArgs`, :class:`PoolArgs`, :class:`ConvArgs`);
* ``reference.py``: the torch definition of each kernel (the semantics every backend keeps);
* ``validate.py``: argument checks and :class:`Kernels`, the validated entry points of a backend;
* ``registry.py``: the backends (``native``, ``triton``, ``reference``), their availability, the
  priority order of ``backend="auto"`` (:func:`resolve`) and :func:`get`;
* ``native.py``: the native operators ``torch.ops.deepzero.*`` (``csrc/``) and their fake
  implementations; ``native_build.py``: how the extension is built (sources, flags, the build at
  first use; setup.py loads it by path); ``triton_backend.py``: the Triton kernels.

``get(name)`` returns a :class:`Kernels` whose methods validate every argument (dtype, device,
contiguity, shape, index range) before a kernel sees it, so bad input is a Python exception, never
a crash.
"""
from __future__ import annotations

from . import reference
from .registry import BACKENDS, ENGINE_BACKENDS, PRIORITY, Backend, _reset_native, available, get, resolve
from .spec import NO_BN, NO_POOL, BnArgs, BnMode, ConvArgs, PoolArgs
from .validate import Kernels

__all__ = ["Kernels", "available", "get", "resolve", "KERNEL_NAMES", "BACKENDS", "PRIORITY", "ENGINE_BACKENDS",
           "Backend", "BnMode", "BnArgs", "PoolArgs", "ConvArgs", "NO_BN", "NO_POOL", "_reset_native"]

KERNEL_NAMES = tuple(reference.__all__)
