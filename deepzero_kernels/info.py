"""``python -m deepzero_kernels.info``: what this installation runs on, for bug reports.

Prints versions (Python, torch, Triton, NumPy, the C++ compiler, ninja), the CPU and the
instruction set the native kernels chose, CUDA devices, each backend's availability with the
reason, which fused kernels each backend has, thread settings, memory and cache locations.
Nothing is built: a missing native extension is reported, not compiled (``--build`` builds it
just in time, as a first use would). ``--json`` prints the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys

import torch

import deepzero_kernels
from . import kernels, runtime
from .kernels import KERNEL_NAMES, native_build

ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_PLACES",
            "MKL_NUM_THREADS", "KMP_BLOCKTIME", "DZ_CPU_ISA", "DZ_NO_JIT", "DZ_NO_NATIVE", "DZ_NATIVE_REQUIRED",
            "DZ_NO_CUDA", "DZ_CACHE_DIR", "DZ_NATIVE_ARCH", "TRITON_INTERPRET", "TRITON_CACHE_DIR",
            "TORCH_EXTENSIONS_DIR", "TORCH_CUDA_ARCH_LIST", "CUDA_VISIBLE_DEVICES", "CXX")


def _safe(fn, default="unknown"):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a report never fails
        return f"{default} ({type(e).__name__}: {e})"


def _first_line(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        lines = (out.stdout or out.stderr).strip().splitlines()
        return lines[0] if lines else "no output"
    except (OSError, subprocess.SubprocessError) as e:
        return f"not found ({type(e).__name__})"


def _module_version(name: str) -> str:
    try:
        mod = __import__(name)
    except Exception as e:  # noqa: BLE001 - e.g. a broken triton install
        return f"not installed ({type(e).__name__}: {e})" if not isinstance(e, ImportError) else "not installed"
    return getattr(mod, "__version__", "installed")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                                    if f in flags) or "none of sse4_2/avx/avx2/fma/avx512f"
    except OSError:
        pass
    return "unknown"


def _meminfo() -> dict:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                if k in ("MemTotal", "MemAvailable", "SwapTotal"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _gib(n) -> str:
    return f"{n / (1 << 30):.1f} GiB" if isinstance(n, (int, float)) else str(n)


def _available(device: str, build: bool) -> dict:
    """``kernels.available`` without a JIT build unless ``build``."""
    try:
        return kernels.available(device, jit=build)
    except TypeError:  # a kernels module without the jit switch
        return kernels.available(device)


def _backend_impl(name: str, build: bool):
    """``(implementation, None)`` of a kernel backend or ``(None, reason)``; builds nothing unless ``build``."""
    registry = getattr(kernels, "BACKENDS", None)
    try:
        if registry is not None and name in registry:
            return registry[name].load(jit=build) if name == "native" else registry[name].load()
        ok, why = _available("cpu", build).get(name, (False, "unknown backend"))
        if not ok and name == "native":
            return None, why
        k = kernels.get(name)
        return getattr(k, "impl", None) or getattr(k, "mod", None) or k, None
    except Exception as e:  # noqa: BLE001 - a report never fails
        return None, f"{type(e).__name__}: {e}"


def _has_kernel(impl, name: str) -> bool:
    try:
        return callable(getattr(impl, name))
    except Exception:  # noqa: BLE001 - torch.ops namespaces raise for an unknown operator
        return False


def _package_and_versions(r: dict, build: bool) -> None:
    """Where the package is, and the versions of what it runs on."""
    here = os.path.dirname(os.path.abspath(deepzero_kernels.__file__))
    r["deepzero_kernels"] = {
        "version": deepzero_kernels.__version__,
        "location": here,
        "source checkout (editable)": os.path.isfile(os.path.join(os.path.dirname(here), "setup.py")),
    }
    r["versions"] = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}, debug {torch.version.debug})",
        "triton": _module_version("triton"),
        "numpy": _module_version("numpy"),
        "C++ compiler": (f"{native_build.find_compiler()}: {_first_line([native_build.find_compiler(), '--version'])}"
                         if native_build.find_compiler() else "none found (c++ / $CXX)"),
        "nvcc": _first_line(["nvcc", "--version"]) if shutil.which("nvcc") else "not on PATH",
        "ninja": _first_line([native_build.find_ninja(), "--version"]) if native_build.find_ninja() else "not found",
    }


def _cpu_and_cuda(r: dict, build: bool) -> None:
    """The CPU (and the instruction set the native kernels chose) and the CUDA devices."""
    _available("cpu", build)  # loads the native extension (without building it unless asked)
    # the native backend: report without building, unless asked
    nat = sys.modules.get("deepzero_kernels._native")
    affinity = _safe(lambda: len(os.sched_getaffinity(0)))
    r["cpu"] = {
        "model": _cpu_model(),
        "logical CPUs (usable by this process)": f"{os.cpu_count()} ({affinity})",
        "instruction sets": _cpu_flags(),
        "native kernels' instruction set": _safe(lambda: nat.cpu_isa()) if nat is not None else "native extension not loaded",
        "native extension": getattr(nat, "__file__", None) or "not loaded",
        "load average (1, 5, 15 min)": _safe(lambda: " ".join(f"{v:.2f}" for v in os.getloadavg())),
    }
    cuda = {"available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda[f"cuda:{i}"] = f"{p.name}, sm_{p.major}{p.minor}, {_gib(p.total_memory)}"
    if nat is not None:
        cuda["native extension built with CUDA"] = _safe(lambda: nat.has_cuda())
    r["cuda"] = cuda


def _backends(r: dict, build: bool) -> None:
    """Each backend's availability with the reason, per device, and what 'auto' picks."""
    avail_cpu = _available("cpu", build)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    back = {}
    for dev in devices:
        av = {"torch": (True, "always available: the per-node delta rules, which define the semantics"),
              **(avail_cpu if dev == "cpu" else _available(dev, build))}
        for name, (ok, why) in av.items():
            back[f"{name} on {dev}"] = f"{'yes' if ok else 'NO'}: {why}"
        if dev == "cpu" and not build and not avail_cpu.get("native", (True,))[0]:
            back["auto on cpu picks"] = "native if a first use builds it, else torch"
            continue
        try:
            import warnings
            from .ops import resolve_backend
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back[f"auto on {dev} picks"] = resolve_backend("auto", torch.device(dev))
        except Exception as e:  # noqa: BLE001
            back[f"auto on {dev} picks"] = f"unknown ({type(e).__name__}: {e})"
    r["backends"] = back


def _fused_kernels(r: dict, build: bool) -> None:
    """Which fused kernels each backend has."""
    fused = {"torch": f"none: per-node rules (reference.py composes all {len(KERNEL_NAMES)} kernels in torch)"}
    for name in ("native", "triton"):
        impl, why = _backend_impl(name, build)
        if impl is None:
            fused[name] = f"none ({why})"
            continue
        have = [k for k in KERNEL_NAMES if _has_kernel(impl, k)]
        missing = [k for k in KERNEL_NAMES if k not in have]
        fused[name] = (f"{len(have)}/{len(KERNEL_NAMES)}: " + ", ".join(have)
                       + (f"; missing: {', '.join(missing)}" if missing else ""))
    r["fused kernels"] = fused


def _threads_memory_caches(r: dict, build: bool) -> None:
    """Thread settings, memory, cache locations and the relevant environment."""
    threads = {
        "torch intra-op threads": torch.get_num_threads(),
        "torch inter-op threads": torch.get_num_interop_threads(),
        "torch parallel backend": _safe(lambda: next((ln.split(":", 1)[1].strip() for ln in
                                                       torch.__config__.parallel_info().splitlines()
                                                       if ln.startswith("ATen parallel backend")), "unknown")),
        "OMP_WAIT_POLICY set by deepzero_kernels": runtime.omp_defaults_set() or "no (already set, or torch "
                                                                                       "was imported first)",
    }
    for k in ENV_VARS[:7]:
        threads[k] = os.environ.get(k, "(unset)")
    r["threads"] = threads
    mem = _meminfo()
    from .engine import default_memory_budget
    r["memory"] = {
        "total": _gib(mem.get("MemTotal", "unknown")),
        "available": _gib(mem.get("MemAvailable", "unknown")),
        "swap": _gib(mem.get("SwapTotal", "unknown")),
        "engine's default memory budget (cpu)": _safe(lambda: _gib(default_memory_budget(torch.device("cpu")))),
    }
    root = native_build.cache_root()
    builds = sorted(d for d in os.listdir(root) if d.startswith("native-")) if os.path.isdir(root) else []
    plan_ok, plan = native_build.jit_plan()
    r["caches"] = {
        "native JIT builds": root + (f" ({len(builds)} build(s): {', '.join(builds)})" if builds else " (empty)"),
        "native JIT build for this setup": plan if plan_ok else f"none: {plan}",
        "C++ sources for the JIT build": native_build.csrc_dir() or "not found",
        "triton": os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache"),
        "torch extensions (torch's own JIT builds)": os.environ.get("TORCH_EXTENSIONS_DIR")
        or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"),
    }
    r["environment"] = {k: os.environ[k] for k in ENV_VARS[7:] if k in os.environ} or {"(none of the DZ_/TRITON_/"
                                                                                        "TORCH_ variables set)": ""}


def collect(build: bool = False) -> dict:
    """The report: ``{section: {key: value}}`` (values are strings, numbers or lists)."""
    r: dict = {}
    for section in (_package_and_versions, _cpu_and_cuda, _backends, _fused_kernels, _threads_memory_caches):
        section(r, build)
    return r


def render(report: dict) -> str:
    lines = []
    for section, items in report.items():
        lines.append(f"== {section}")
        width = max((len(k) for k in items), default=0)
        for k, v in items.items():
            lines.append(f"  {k.ljust(width)}  {v}".rstrip())
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepzero_kernels.info",
                                description="Report versions, backends, fused kernels, threads and caches "
                                            "(paste it into a bug report).")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--build", action="store_true",
                   help="build the native kernels now if they are missing (as a first use would)")
    a = p.parse_args(argv)
    report = collect(build=a.build)
    print(json.dumps(report, indent=2, default=str) if a.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
