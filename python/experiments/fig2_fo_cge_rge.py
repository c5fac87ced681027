"""The paper's Fig. 2 on the embedded digits dataset: FO vs CGE vs RGE (q = d) training App. B
CNNs of several sizes with the same SGD recipe (momentum 0.9, wd 5e-4, cosine schedule), dense
(no pruning), so every method sees the same number of queries per step.

Every run goes through the trainer (``deepzero_kernels.train.run``), so it is exactly what
``python -m deepzero_kernels.train --estimator {fo,cge,rge} --sparsity 0 ...`` does. RGE uses
unit-norm Gaussian directions rescaled by d (an unbiased estimate), q = d directions per step.

    python python/experiments/fig2_fo_cge_rge.py --quick --out results/fig2      # 1.5-2.5 min here
    python python/experiments/fig2_fo_cge_rge.py --out results/fig2              # full sweep

Writes ``fig2.csv`` (one row per model size and method) and ``fig2.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default="2x4,2x8,2x16,3x16",
                    help="comma-separated DEPTHxWIDTH App. B CNNs")
    ap.add_argument("--methods", default="fo,cge,rge",
                    help="comma-separated: fo (backprop), cge, rge (q = d directions)")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs of every run")
    ap.add_argument("--batch-size", type=int, default=128, help="SGD batch size")
    ap.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (cosine schedule)")
    ap.add_argument("--rge-lr", type=float, default=None,
                    help="learning rate for RGE; None: --lr (RGE's variance may need a smaller one)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random generator of each run")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true",
                    help="sizes 2x4,2x8 and 3 epochs (1.5-2.5 min here, most of it RGE)")
    ap.add_argument("--out", default="results/fig2", help="folder for fig2.csv and fig2.png")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from deepzero_kernels import train  # noqa: E402


def parse_sizes(s):
    out = []
    for item in s.split(","):
        d, w = item.split("x")
        out.append((int(d), int(w)))
    return out


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.epochs = "2x4,2x8", 3
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError:
        ap.error(f"--sizes must look like 2x4,2x8, got {args.sizes!r}")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for depth, width in sizes:
        for method in args.methods.split(","):
            lr = args.rge_lr if (method == "rge" and args.rge_lr) else args.lr
            cfg, _ = train.parse_args(["--estimator", method, "--sparsity", "0", "--depth", str(depth),
                                       "--width", str(width), "--epochs", str(args.epochs),
                                       "--batch-size", str(args.batch_size), "--lr", str(lr),
                                       "--seed", str(args.seed), "--threads", str(args.threads),
                                       "--no-progress"])
            s = train.run(cfg, log=lambda m: None)
            row = {"depth": depth, "width": width, "parameters": s["parameters"], "method": method,
                   "queries_per_step": s["active_coordinates"] or 0, "lr": lr,
                   "best_test_acc": s["best_test_acc"], "final_test_acc": s["final_test_acc"],
                   "final_train_loss": s["history"][-1]["train_loss"], "seconds": s["wall_seconds"]}
            rows.append(row)
            print(f"CNN {depth}x{width} ({row['parameters']} params) {method:3s}: best test acc "
                  f"{100 * row['best_test_acc']:5.1f}%  final {100 * row['final_test_acc']:5.1f}%  "
                  f"train loss {row['final_train_loss']:.3f}  {row['seconds']:.1f}s", flush=True)
    with open(os.path.join(args.out, "fig2.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = {"fo": "FO training", "cge": "ZO CGE", "rge": "ZO RGE (q = d)"}
        for method in args.methods.split(","):
            rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["parameters"])
            ax.plot([r["parameters"] for r in rs], [100 * r["best_test_acc"] for r in rs], "o-",
                    label=labels.get(method, method))
        ax.set_xlabel("number of model parameters (= queries per step for CGE/RGE)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Fig. 2 on digits, App. B CNNs, {args.epochs} epochs")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "fig2.png"), dpi=100)
    except ImportError:
        pass
    print(f"wrote {args.out}/fig2.csv and fig2.png")
    return rows


if __name__ == "__main__":
    main()
