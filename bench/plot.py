"""Turn a benchmark summary JSON (bench/results/<device>-summary.json) into a PNG chart:
left, perturbations per second of every method per workload (log scale); right, the engine's
speed-up over each baseline (log scale, 1x line).

    python bench/plot.py bench/results/cpu-amd-epyc-summary.json [-o chart.png]
"""
from __future__ import annotations

import argparse
import json
import os


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary")
    ap.add_argument("-o", "--output", default=None, help="PNG path (default: next to the JSON)")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(a.summary) as f:
        s = json.load(f)
    wls = s["workloads"]
    names = list(wls)
    methods = []
    for w in wls.values():
        for m in w["methods"]:
            if m not in methods and w["methods"][m].get("pert_per_s"):
                methods.append(m)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, max(4, 0.45 * len(names) + 2)))
    h = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        ys, xs = [], []
        for i, n in enumerate(names):
            v = wls[n]["methods"].get(m, {}).get("pert_per_s")
            if v:
                ys.append(i + j * h - 0.4 + h / 2)
                xs.append(v)
        ax1.barh(ys, xs, height=h, label=m)
    ax1.set_yticks(range(len(names)), names)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("perturbations / s")
    ax1.legend(fontsize=7)
    conv = s.get("conv_flops_per_s")
    ax1.set_title(f"{s['device']} ({s['mode']}), dense conv {conv / 1e9:.1f} GFLOP/s" if conv
                  else s["device"])

    rows = []  # (label, {baseline: speedup})
    for n in names:
        for e, r in wls[n].get("engine", {}).items():
            rows.append((f"{n} {e}", r.get("speedup_vs", {})))
            if r.get("dense_speedup_vs"):
                rows.append((f"{n} {e} (extrapolated dense)", r["dense_speedup_vs"]))
    bases = []
    for _, d in rows:
        bases += [b for b in d if b not in bases]
    h = 0.8 / max(len(bases), 1)
    for j, b in enumerate(bases):
        ys, xs = [], []
        for i, (_, d) in enumerate(rows):
            if d.get(b):
                ys.append(i + j * h - 0.4 + h / 2)
                xs.append(d[b])
        ax2.barh(ys, xs, height=h, label=f"vs {b}")
    ax2.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xscale("log")
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_xlabel("engine speed-up (baseline time / engine time)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = a.output or os.path.splitext(a.summary)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
