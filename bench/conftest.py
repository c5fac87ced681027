"""pytest configuration of the benchmark suite: ``--quick`` / ``--full`` sizes, the parametrisation
of the cases, the machine's dense conv FLOP rate, and the summary printed at the end and written
to a new ``bench/results/runs/<device>[-<mode>]-<UTC time>-summary.json`` (never over the committed
``bench/results/<device>-summary.json``, which only ``--bench-summary PATH`` replaces).

    pytest bench/ --benchmark-only                       # default sizes (<= 10 min, 2-core CPU)
    pytest bench/ --benchmark-only --quick               # CI smoke run, tiny sizes, 1 round
    pytest bench/ --benchmark-only --full                # GPU sizes (ResNet-20 at batch 256)
    pytest bench/ --benchmark-only --benchmark-json=bench/results/run.json
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
try:  # the package may not be installed (pip install -e .) in a plain checkout
    import deepzero_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, _ROOT)

import workloads as W  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("deepzero-bench")
    g.addoption("--quick", action="store_true", default=False,
                help="tiny sizes, 1 round: a smoke run of every benchmark (CI)")
    g.addoption("--full", action="store_true", default=False,
                help="GPU sizes (ResNet-20 at batch 256, larger samples, more rounds)")
    g.addoption("--bench-summary", default=None,
                help="where to write the summary JSON (default: a new bench/results/runs/<device>-<UTC time>-summary.json; "
                     "give bench/results/<device>-summary.json to replace the committed reference)")


def pytest_configure(config):
    W.REGISTRY.mode = W.get_mode(config)


@pytest.fixture(scope="session")
def mode(request):
    return W.get_mode(request.config)


@pytest.fixture(scope="session")
def conv_rate(mode):
    """The machine's dense F.conv2d FLOP rate, measured once in this run."""
    if W.REGISTRY.conv is None:
        W.REGISTRY.conv = W.measure_conv_rate(mode)
    return W.REGISTRY.conv["flops_per_s"]


def pytest_generate_tests(metafunc):
    mode = W.get_mode(metafunc.config)
    engines = [f"engine-{b}" for b in W.engine_backends()]
    if "cge_case" in metafunc.fixturenames:
        cases, ids = [], []
        for name in W.workload_names(mode):
            if name == "scaling_chunk":
                methods = ["reference"] + [f"{e}-{v}" for e in engines
                                           for v in W.SIZES[mode]["scaling"]["variants"]]
            elif name.startswith("scaling_"):
                methods = ["reference"] + engines
            elif name == "resnet20_fc":
                methods = ["reference", "fo"] + engines
            else:
                methods = list(W.BASELINES) + engines
            for m in methods:
                cases.append((name, m))
                ids.append(f"{name}-{m}")
        metafunc.parametrize("cge_case", cases, ids=ids)
    if "rge_method" in metafunc.fixturenames:
        metafunc.parametrize("rge_method", ["loop", "batched"])  # RGE has no fused kernels: one engine


# ----------------------------------------------------------------------------- summary
def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def _time_at(row: dict, n: int) -> float:
    """A method's time projected to ``n`` coordinates in one call: its per-call part (``fixed_s``)
    once, the per-coordinate rest of its timed call in proportion."""
    return row["fixed_s"] + max(row["time_s"] - row["fixed_s"], 0.0) * n / row["n_pert"]


def build_summary(reg: W.Registry) -> dict:
    out = {
        "device": W.device_label(),
        "mode": reg.mode,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "conv_flops_per_s": reg.conv["flops_per_s"] if reg.conv else None,
        "conv_shapes": reg.conv["shapes"] if reg.conv else None,
        "engine_available": W.engine_available(),
        "notes": reg.notes,
        "workloads": {},
    }
    conv = out["conv_flops_per_s"]
    for group, g in reg.groups.items():
        methods = g["methods"]
        wl = {k: v for k, v in g.items() if k != "methods"}
        wl["methods"] = {}
        for m, r in methods.items():
            t = r.get("time_s")
            row = dict(r)
            if t:
                if r.get("n_pert"):
                    row["pert_per_s"] = r["n_pert"] / t
                if r.get("useful_flops"):
                    row["useful_flops_per_s"] = r["useful_flops"] / t
                    if conv:
                        row["efficiency"] = r["useful_flops"] / t / conv
            wl["methods"][m] = row
        # ratios: every engine variant against every baseline timed in the group
        wl["engine"] = {}
        base = {m: r for m, r in methods.items() if not m.startswith("engine")}
        for m, r in methods.items():
            if not m.startswith("engine") or not r.get("time_s"):
                continue
            e = {"pert_per_s": wl["methods"][m].get("pert_per_s"),
                 "efficiency": wl["methods"][m].get("efficiency"),
                 "speedup_vs": {}, "dense_speedup_vs": {}}
            for b, br in base.items():
                if br.get("time_s"):
                    # same coordinates, same batch: time ratio = throughput ratio
                    e["speedup_vs"][b] = br["time_s"] / r["time_s"]
                mask = wl.get("mask_1pct")
                if mask and all(q.get("fixed_s") is not None and q.get("n_pert") for q in (r, br)):
                    e.setdefault("mask_speedup_vs", {})[b] = _time_at(br, mask) / _time_at(r, mask)
                if br.get("matmul_flops") and r.get("matmul_flops"):
                    # the same ratio in conv/matmul FLOPs: what the engine's arithmetic alone would give
                    e.setdefault("flop_ratio_vs", {})[b] = br["matmul_flops"] / r["matmul_flops"]
                if r.get("dense_time_s") and br.get("dense_time_s"):
                    e["dense_speedup_vs"][b] = br["dense_time_s"] / r["dense_time_s"]
            if r.get("dense_time_s"):
                e["dense_time_s"] = r["dense_time_s"]
                if wl.get("dense_useful_flops") and conv:
                    e["dense_efficiency"] = wl["dense_useful_flops"] / r["dense_time_s"] / conv
            wl["engine"][m] = e
        out["workloads"][group] = wl
    # fused kernels: every backend against the reference backend (torch ops) timed in the same run
    out["kernels"] = {}
    for case, rows in reg.kernels.items():
        t_ref = rows.get("reference", {}).get("time_s")
        out["kernels"][case] = {}
        for b, r in rows.items():
            row = dict(r)
            if r.get("time_s"):
                row["gbytes_per_s"] = r["bytes"] / r["time_s"] / 1e9
                if t_ref:
                    row["speedup_vs_reference"] = t_ref / r["time_s"]
            out["kernels"][case][b] = row
    return out


def format_table(s: dict) -> str:
    lines = []
    conv = s.get("conv_flops_per_s")
    lines.append(f"device {s['device']}  mode {s['mode']}  torch {s['torch']}  threads {s['threads']}"
                 f"  dense conv rate {_fmt(conv / 1e9 if conv else None)} GFLOP/s")
    hdr = (f"{'workload':24} {'method':30} {'coords':>7} {'time s':>9} {'pert/s':>10} "
           f"{'eff':>6} {'x ref':>8} {'x noreuse':>9} {'x vmap':>8} {'x fo':>8} {'x loop':>8}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for group, wl in s["workloads"].items():
        for m, r in wl["methods"].items():
            e = wl["engine"].get(m, {})
            sv = e.get("speedup_vs", {})
            lines.append(
                f"{group:24} {m:30} {_fmt(r.get('n_pert'), 'd') if r.get('n_pert') else '-':>7} "
                f"{_fmt(r.get('time_s')):>9} {_fmt(r.get('pert_per_s')):>10} "
                f"{_fmt(r.get('efficiency'), '.2f'):>6} {_fmt(sv.get('reference')):>8} "
                f"{_fmt(sv.get('no_reuse')):>9} {_fmt(sv.get('vmap')):>8} {_fmt(sv.get('fo')):>8} "
                f"{_fmt(sv.get('loop')):>8}"
                + (f"  fallback evals {r['fallback_evaluations']}" if "fallback_evaluations" in r else "")
                + (f"  FLOPs x ref {_fmt(e['flop_ratio_vs'].get('reference'))}" if e.get("flop_ratio_vs") else "")
                + (f"  x ref at the whole mask {_fmt(e['mask_speedup_vs'].get('reference'))}"
                   if e.get("mask_speedup_vs") else ""))
        for m, e in wl["engine"].items():
            if e.get("dense_speedup_vs"):
                d = e["dense_speedup_vs"]
                lines.append(
                    f"{'':24}   extrapolated dense step ({wl.get('dense_coords')} coords): "
                    f"{m} {_fmt(e.get('dense_time_s'))} s; x ref {_fmt(d.get('reference'))}, "
                    f"x noreuse {_fmt(d.get('no_reuse'))}, x vmap {_fmt(d.get('vmap'))}, "
                    f"x fo {_fmt(d.get('fo'))}")
    if s.get("kernels"):
        lines.append(f"{'kernel case':24} {'backend':10} {'kernel':18} {'K':>5} {'time s':>10} {'GB/s':>8} "
                     f"{'x ref':>8}")
        for case, rows in s["kernels"].items():
            for b, r in rows.items():
                lines.append(f"{case:24} {b:10} {r.get('kernel', ''):18} {r.get('k', 0):>5} "
                             f"{_fmt(r.get('time_s')):>10} {_fmt(r.get('gbytes_per_s')):>8} "
                             f"{_fmt(r.get('speedup_vs_reference')):>8}")
    lines.append("x B = engine speed-up over baseline B on the same coordinates and batch "
                 "(baseline time / engine time); eff = reference-equivalent FLOP/s / dense conv rate")
    for n in s.get("notes", []):
        lines.append("note: " + n)
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    reg = W.REGISTRY
    if not reg.groups and not reg.kernels:
        return
    s = build_summary(reg)
    # A run never overwrites the committed references (bench/results/<device>-summary.json): by
    # default it writes a new file under bench/results/runs/ (ignored by git); a reference is
    # only replaced when its path is given with --bench-summary.
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = config.getoption("--bench-summary") or os.path.join(
        _HERE, "results", "runs", f"{s['device']}-{'' if reg.mode == 'default' else reg.mode + '-'}{stamp}-summary.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(s, f, indent=1, sort_keys=False, default=float)
    tr = terminalreporter
    tr.write_sep("=", "deepzero CGE benchmark summary")
    tr.write_line(format_table(s))
    tr.write_line(f"summary written to {os.path.relpath(path)}")
