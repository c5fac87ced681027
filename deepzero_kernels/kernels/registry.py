"""The kernel backends behind one registry: each a :class:`Backend` object that says where it runs
(:meth:`Backend.available` ``-> (ok, reason)``) and loads its implementation; a priority order for
``backend="auto"``; :func:`resolve` and :func:`get`.

* ``native``: the operators ``torch.ops.deepzero.*`` of the extension ``deepzero_kernels._native``
  built from ``csrc/`` (OpenMP on CPU, CUDA on GPU); built just in time at first use when the
  install did not build it (``native_build.py``).
* ``triton``: ``triton_backend.py`` (GPU; on a CPU only under ``TRITON_INTERPRET=1``, for tests).
* ``reference``: ``reference.py``, the torch composition that defines every kernel.

The engine's backend names are ``auto``, ``torch`` (no fused kernel: the per-node delta rules),
``native`` and ``triton``.
"""
from __future__ import annotations

import abc

import importlib
import os
import warnings

import torch

from . import native, reference
from .validate import Kernels
from .selftest import check_kernels

__all__ = ["Backend", "BACKENDS", "PRIORITY", "ENGINE_BACKENDS", "available", "resolve", "get"]

INSTALL_FIX = ("reinstall from the source checkout with `pip install setuptools wheel ninja && pip install "
               "--no-build-isolation -e .` (see the README; `python -m deepzero_kernels.info` shows the details)")


class Backend(abc.ABC):
    """One kernel backend. ``auto_devices``: the device types where ``backend="auto"`` may pick it."""
    name = ""
    auto_devices: tuple = ()

    @abc.abstractmethod
    def load(self, jit: bool = True):
        """``(implementation, None)`` or ``(None, reason)``; the implementation has the functions of
        ``reference.py`` with its arguments."""

    def where(self, device: torch.device):
        """Why the loaded backend cannot run on ``device``, or None."""
        return None if device.type in ("cpu", "cuda") else f"{self.name} has no kernels for {device.type}"

    def runs_on(self, device: torch.device) -> str:
        """What runs on ``device`` when available (the reason of an ``ok``)."""
        return "available"

    def available(self, device: torch.device | str | None = None, *, jit: bool = True) -> tuple[bool, str]:
        device = torch.device(device or "cpu")
        impl, why = self.load(jit)
        if impl is not None:
            why = self.where(device)
        return why is None, why or self.runs_on(device)


class _Reference(Backend):
    name = "reference"

    def load(self, jit=True):
        return reference, None

    def where(self, device):
        return None

    def runs_on(self, device):
        return "always available: the torch composition that defines the kernels"


class _Native(Backend):
    name = "native"
    auto_devices = ("cpu", "cuda")

    def __init__(self):
        self.state: dict = {}  # the outcome of the first attempt: the module, or why there is none

    def module(self, jit: bool = True):
        """``(module, None)`` or ``(None, reason)``. The extension the install built is imported; when
        there is none and ``jit``, the first call builds it just in time into the cache
        (``native_build.py``; opt out with DZ_NO_JIT=1). The outcome is kept for the
        process: a missing backend costs one look, not one per call. With ``jit=False`` nothing is
        built and the reason says whether a first use would build it."""
        if "mod" in self.state:
            return self.state["mod"], None
        if jit and "why" in self.state:
            return None, self.state["why"]
        try:
            mod = importlib.import_module("deepzero_kernels._native")
            self.state["mod"] = mod
            return mod, None
        except ImportError as e:
            missing = f"the native extension was not built at install time ({e})"
        from . import native_build
        if not jit:
            ok, info = native_build.jit_plan()
            if ok and native_build.cached_module_path(info):
                return None, f"{missing}; a build from the first use is cached in {info} and is loaded on first use"
            if ok:
                return None, f"{missing}; it is built on first use of the native backend (cache {info})"
            return None, f"{missing}, and not built on first use: {info}. Or {INSTALL_FIX}"
        mod, why = native_build.load_jit()
        if mod is not None:
            self.state["mod"] = mod
            return mod, None
        self.state["why"] = f"{missing}, and not built on first use: {why}. Or {INSTALL_FIX}"
        return None, self.state["why"]

    def load(self, jit=True):
        mod, why = self.module(jit)
        if mod is None:
            return None, why
        if native.missing():
            return None, (f"the native extension {getattr(mod, '__file__', '')} was built from older sources (it "
                          f"registers no operator {native.missing()[0]}); {INSTALL_FIX}")
        native.register_fakes()  # the module registered the operators; torch.compile needs their shapes
        return native.ops(), None

    def where(self, device):
        if device.type == "cuda" and not self.state["mod"].has_cuda():
            return "the native extension was built without CUDA (torch had no CUDA at build time)"
        return None if device.type in ("cpu", "cuda") else f"the native extension has no kernels for {device.type}"

    def runs_on(self, device):
        return "OpenMP CPU kernels" if device.type == "cpu" else "CUDA kernels"


class _Triton(Backend):
    name = "triton"
    auto_devices = ("cuda",)  # on a CPU it is the interpreter: a test tool, never picked by auto

    def load(self, jit=True):
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return None, f"triton is not installed ({e})"
        try:
            return importlib.import_module("deepzero_kernels.kernels.triton_backend"), None
        except ImportError as e:
            return None, f"the triton kernels failed to import ({e})"

    def where(self, device):
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton runs on CPU only under TRITON_INTERPRET=1 (the slow interpreter, for tests)"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None if device.type in ("cpu", "cuda") else f"triton has no kernels for {device.type}"

    def runs_on(self, device):
        return "GPU kernels" if device.type == "cuda" else "CPU interpreter"


BACKENDS: dict[str, Backend] = {b.name: b for b in (_Native(), _Triton(), _Reference())}
PRIORITY = ("native", "triton")  # what backend="auto" tries, in order, before the torch rules
ENGINE_BACKENDS = ("auto", "torch", "triton", "native")


def _reset_native():
    """Forget the outcome of the native backend's first load (tests)."""
    BACKENDS["native"].state.clear()


def available(device: torch.device | str | None = None, *, jit: bool = True) -> dict:
    """``{name: (ok, reason)}`` of the optional backends (those in :data:`PRIORITY`) on ``device``
    (default CPU). With ``jit=False`` a missing native extension is not built just in time."""
    return {name: BACKENDS[name].available(device, jit=jit) for name in PRIORITY}


_warned: set = set()
# Devices on which backend="auto" first runs a backend's selftest (once per process and device).
SELFTEST_DEVICES = ("cuda",)
_selftests: dict = {}


def selftest(backend: str, device="cpu", dtype=torch.float32) -> dict:
    """Run every fused kernel of ``backend`` (``"native"``, ``"triton"``) on ``device`` on tiny
    random inputs against the ``reference`` backend. Returns ``{kernel: None if it agrees, else
    what went wrong}``; raises ValueError when the backend cannot be loaded at all."""
    return check_kernels(get(backend), get("reference"), device, dtype)


def _passes_selftest(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` passes :func:`~.selftest.selftest` on ``device`` (cached); a
    failure warns once, naming the kernels."""
    key = (name, str(device))
    if key not in _selftests:
        try:
            bad = {k: v for k, v in selftest(name, device).items() if v is not None}
        except Exception as e:  # noqa: BLE001 - whatever breaks, the backend is not used
            bad = {"(loading)": f"{type(e).__name__}: {e}"}
        why = "; ".join(f"{k}: {v}" for k, v in bad.items())
        if bad:
            warnings.warn(f"deepzero_kernels: the {name} backend failed its selftest on {device} and is not used "
                          f"by backend='auto' ({why})", stacklevel=4)
        _selftests[key] = (not bad, f"failed its selftest ({why})" if bad else "")
    return _selftests[key]


def resolve(name: str, device: torch.device | str | None = None) -> str:
    """The engine backend that ``name`` selects on ``device``: ``torch`` (the per-node rules),
    ``native`` or ``triton``.

    ``auto`` takes the first backend of :data:`PRIORITY` available on the device for which it is
    meant (``native`` when it is built for the device, ``triton`` on a GPU) and, on a GPU, passing
    its selftest (:mod:`.selftest`, once per process and device), else ``torch``: it
    never fails, and says once per device (a warning) which optional backend it could not use.
    Naming an unavailable backend is a ``ValueError`` with the reason."""
    if not isinstance(name, str) or name not in ENGINE_BACKENDS:
        raise ValueError(f"backend must be one of {ENGINE_BACKENDS}, got {name!r}")
    device = torch.device(device or "cpu")
    if name == "torch":
        return name
    if name != "auto":
        ok, why = BACKENDS[name].available(device)
        if not ok:
            raise ValueError(f"backend={name!r} is not available on {device.type}: {why}")
        return name
    missing = []
    for cand in PRIORITY:
        if device.type not in BACKENDS[cand].auto_devices:
            continue
        ok, why = BACKENDS[cand].available(device)
        if ok and device.type in SELFTEST_DEVICES:
            ok, why = _passes_selftest(cand, device)
        if ok:
            return cand
        missing.append(f" {cand}: {why}.")
    key = (device.type, tuple(missing))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"deepzero_kernels: backend='auto' falls back to the slower torch backend on {device.type} "
                      f"(the fused kernels are several times faster).{''.join(missing)}", stacklevel=4)
    return "torch"


def get(name: str) -> Kernels:
    """The validated kernels of backend ``name`` ('native', 'triton' or 'reference')."""
    if name not in BACKENDS:
        hint = " ('torch' runs the per-node rules and has no kernels; their torch composition is 'reference')" \
            if name == "torch" else ""
        raise ValueError(f"unknown kernel backend {name!r}: one of {tuple(BACKENDS)}{hint}")
    impl, why = BACKENDS[name].load()
    if impl is None:
        raise ValueError(f"backend={name!r} is not available: {why}")
    return Kernels(name, impl)
