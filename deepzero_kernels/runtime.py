"""Process-level settings and probes: the OpenMP wait policy, thread counts, resident memory.

Imported by ``deepzero_kernels/__init__.py`` before torch, with no torch import of its own.

**Waiting OpenMP threads.** torch's CPU kernels and the native kernels (which share torch's
libgomp) run every parallel region on a team of OpenMP threads. By default a thread that
reaches the end of a region spins for a while before it sleeps. On a machine whose cores are
shared with another busy process, that spinning takes the cores the slowest thread of the team
needs, and a run of many short regions (the engine's chunks) slows down by one or two orders of
magnitude. ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep at once. libgomp reads it
once, when torch is first imported, so :func:`apply_omp_defaults` sets it (unless the user
already set it, or torch was imported before deepzero_kernels, or ``DZ_OMP_DEFAULTS=0``).
"""
from __future__ import annotations

import os
import sys

__all__ = ["apply_omp_defaults", "omp_defaults_set", "rss_bytes", "peak_rss_bytes", "thread_settings", "import_object"]


def import_object(spec: str):
    """The object a user names as ``"package.module:name"`` (``--model``/``--dataset`` factories).
    Raises ``ValueError`` naming what could not be imported or found."""
    import importlib
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{spec!r} is not of the form package.module:factory")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or the module's own code failing
        raise ValueError(f"cannot import {module!r} for {spec!r} ({type(e).__name__}: {e}); is its directory "
                         "on PYTHONPATH (or the current directory)?") from None
    obj = mod
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module!r} has no attribute {name!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    return obj

_set: list = []


def apply_omp_defaults() -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process if nothing decided it yet. Returns what was
    set, or None. Must run before torch is imported to have any effect."""
    if os.environ.get("DZ_OMP_DEFAULTS", "1").strip() == "0":
        return None
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _set.append("OMP_WAIT_POLICY=PASSIVE")
    return _set[-1]


def omp_defaults_set() -> str | None:
    """What :func:`apply_omp_defaults` set in this process (None if nothing)."""
    return ", ".join(_set) or None


def rss_bytes() -> int | None:
    """Current resident set size of this process in bytes (Linux /proc), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far in bytes (None where unknown)."""
    try:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb * 1024 if sys.platform != "darwin" else kb
    except (ImportError, OSError):
        return None


def thread_settings() -> str:
    """One line: torch's intra-op threads and the OpenMP wait policy in force."""
    import torch
    policy = os.environ.get("OMP_WAIT_POLICY")
    src = " (set by deepzero_kernels)" if omp_defaults_set() else ""
    return (f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY="
            f"{policy + src if policy else 'unset (threads spin before sleeping)'}")
