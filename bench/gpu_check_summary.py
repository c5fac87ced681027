"""Summary of one ``bench/gpu_check.sh`` run: reads the folder it wrote (parts.jsonl,
selftest.json, precision.json, bench.json) and writes ``summary.json`` (everything in one file,
with the device) and ``summary.md`` there; prints the markdown.

    python bench/gpu_check_summary.py bench/results/gpu-check
"""
from __future__ import annotations

import json
import os
import sys


def _read(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _bench(bench: dict) -> dict:
    """Median seconds per benchmark, grouped, with each engine's same-run ratio to the group's reference."""
    groups = {}
    for b in (bench or {}).get("benchmarks", []):
        groups.setdefault(b.get("group") or "", {})[b["name"]] = b["stats"]["median"]
    out = {}
    for g, tests in groups.items():
        ref = next((v for k, v in tests.items() if k.endswith("-reference]")), None)
        out[g] = {k: {"median_s": v, "reference_over_this": (ref / v) if ref and v else None}
                  for k, v in sorted(tests.items())}
    return out


def _roofline(bench: dict, copy_bps) -> list:
    """Per fused-kernel benchmark: its minimum traffic (each input read once, the output written
    once; ``bench/test_kernels.py``), median time, achieved bytes/s and the fraction of the copy
    bandwidth measured in the same check."""
    rows = []
    for b in (bench or {}).get("benchmarks", []):
        nbytes = (b.get("extra_info") or {}).get("bytes")
        if nbytes:
            t, flops = b["stats"]["median"], (b.get("extra_info") or {}).get("flops")
            rows.append({"name": b["name"], "bytes": nbytes, "flops": flops, "median_s": t, "bytes_per_s": nbytes / t,
                         "flops_per_s": flops / t if flops else None,
                         "fraction_of_copy": nbytes / t / copy_bps if copy_bps else None})
    return rows


def summarize(folder: str) -> dict:
    parts = []
    try:
        with open(os.path.join(folder, "parts.jsonl")) as f:
            parts = [json.loads(line) for line in f if line.strip()]
    except OSError:
        pass
    bench = _read(os.path.join(folder, "bench.json"), {})
    info = (bench or {}).get("machine_info", {})
    return {"device": os.environ.get("DZ_CHECK_DEVICE", "cuda"), "machine": info.get("node"),
            "cpu": (info.get("cpu") or {}).get("brand_raw"), "parts": parts,
            "selftest": _read(os.path.join(folder, "selftest.json")),
            "precision": _read(os.path.join(folder, "precision.json")),
            "bandwidth": _read(os.path.join(folder, "bandwidth.json")),
            "roofline": _roofline(bench, (_read(os.path.join(folder, "bandwidth.json")) or {}).get("copy_bytes_per_s")),
            "bench": _bench(bench), "archs": _archs(_read(os.path.join(folder, "archs-summary.json")))}


def _archs(summary) -> dict:
    """Per architecture and engine backend: same-run time ratio and FLOP ratio against the paper's strategy."""
    out = {}
    for group, wl in ((summary or {}).get("workloads") or {}).items():
        for method, e in wl.get("engine", {}).items():
            out[f"{group} {method}"] = {"x_ref": e.get("speedup_vs", {}).get("reference"),
                                        "flops_x_ref": e.get("flop_ratio_vs", {}).get("reference")}
    return out


def markdown(s: dict) -> str:
    lines = [f"# GPU check ({s['device']})", "", "| part | rc | seconds |", "|---|---|---|"]
    lines += [f"| {p['part']} | {p['rc']} | {p['seconds']} |" for p in s["parts"]]
    bad = {k: {n: e for n, e in v.items() if e} for k, v in (s["selftest"] or {}).items()}
    lines += ["", "selftest: " + ("all kernels agree with the reference" if s["selftest"] and not any(bad.values())
                                  else json.dumps(bad or "not run"))]
    if s.get("archs"):
        lines += ["", "## architectures: engine against the paper's strategy (same run)", "",
                  "| workload | x ref, time | x ref, FLOPs |", "|---|---|---|"]
        lines += [f"| {k} | {v['x_ref'] or 0:.3g} | {v['flops_x_ref'] or 0:.3g} |" for k, v in s["archs"].items()]
    if s["roofline"]:
        lines += ["", "## fused kernels against the memory roofline (minimum bytes / median time)", "",
                  "| kernel | bytes | flops | median s | GB/s | GFLOP/s | fraction of copy bandwidth |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['bytes']:,} | {r['flops'] or 0:,} | {r['median_s']:.4g} | "
                  f"{r['bytes_per_s'] / 1e9:.3g} | {(r['flops_per_s'] or 0) / 1e9:.3g} | "
                  + (f"{r['fraction_of_copy']:.3f} |" if r["fraction_of_copy"] else "|") for r in s["roofline"]]
    for g, tests in s["bench"].items():
        lines += ["", f"## {g}", "", "| benchmark | median s | reference / this |", "|---|---|---|"]
        lines += [f"| {k} | {v['median_s']:.4g} | {v['reference_over_this']:.3g} |" if v["reference_over_this"]
                  else f"| {k} | {v['median_s']:.4g} | |" for k, v in tests.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    folder = (argv or sys.argv[1:] or ["bench/results/gpu-check"])[0]
    s = summarize(folder)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    md = markdown(s)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
