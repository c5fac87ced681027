"""The paper's Fig. A5 on the embedded digits dataset: DeepZero's test accuracy and training time per epoch against the batch size (Sparse-CGE, ZO-GraSP layer-wise pruning ratios, 90% sparsity).

Every run goes through the trainer (``deepzero_kernels.train.run``), exactly what
``python -m deepzero_kernels.train --estimator cge --sparsity 0.9 --sparsity-method zo_grasp
--batch-size B ...`` does; only the batch size (and, with ``--lr-scaling linear``, the learning
rate) changes between runs. As in the paper, every batch size trains for the same number of
epochs, so a larger batch takes fewer (but costlier) steps: at 1437 digits, 16 -> 90 steps per
epoch, 512 -> 3. ``--lr-scaling none`` (default) keeps one learning rate for all; ``linear``
uses ``lr * B / --lr-ref-batch``. The trainer draws ZO-GraSP's scoring batch with the run's batch
size, so the layer ratios are re-estimated at each size (on a larger batch for a larger size).

Time per epoch is the trainer's per-epoch training time (steps only: no evaluation, no
ZO-GraSP), the median over the run's epochs (the first one also traces the model).

    python python/experiments/fig_a5_batch_size.py --quick --threads 1 --out results/fig_a5_quick   # ~70 s here
    python python/experiments/fig_a5_batch_size.py --threads 1 --out results/fig_a5                 # ~7 min here (est.)
    python python/experiments/fig_a5_batch_size.py --dataset cifar10 --data-dir DIR --model resnet20 \\
        --batch-sizes 128,256,512,1024,2048,4096,8192 --epochs 50 --warmup-epochs 0 \\
        --out results/fig_a5_cifar                                                # the paper's setting

Writes ``fig_a5.csv`` (one row per batch size and seed), ``fig_a5.json`` (settings, rows, per-epoch
histories, machine), ``fig_a5.md`` and ``fig_a5.png`` (accuracy and time per epoch against the
batch size) to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch-sizes", default="16,32,64,128,256,512", help="comma-separated training batch sizes")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of every run (the same for all sizes)")
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate (warm-up, then cosine decay)")
    ap.add_argument("--lr-scaling", choices=("none", "linear"), default="none",
                    help="none: --lr for every batch size; linear: --lr * batch / --lr-ref-batch")
    ap.add_argument("--lr-ref-batch", type=int, default=128, help="batch size at which linear scaling gives --lr")
    ap.add_argument("--warmup-epochs", type=float, default=1.0, help="linear lr warm-up in epochs")
    ap.add_argument("--sparsity", type=float, default=0.9,
                    help="fraction of conv/linear weights Sparse-CGE leaves out per step (paper's Fig. A4/A5: 0.9)")
    ap.add_argument("--sparsity-method", choices=("zo_grasp", "random"), default="zo_grasp",
                    help="layer ratios from ZO-GraSP (DeepZero) or uniform")
    ap.add_argument("--mask-interval", type=int, default=5, help="redraw the random masks every this many epochs")
    ap.add_argument("--grasp-q", type=int, default=192, help="RGE directions of ZO-GraSP")
    ap.add_argument("--mu", type=float, default=5e-3, help="finite-difference step of CGE and ZO-GraSP")
    ap.add_argument("--dataset", choices=("digits", "synthetic", "cifar10"), default="digits",
                    help="digits: embedded 8x8 digits; synthetic: Gaussian class clusters; cifar10: --data-dir")
    ap.add_argument("--data-dir", default="data", help="CIFAR-10 directory (cifar-10-batches-py or its parent)")
    ap.add_argument("--model", default="cnn", help="trainer model name: cnn (App. B, --depth/--width), resnet20, ...")
    ap.add_argument("--depth", type=int, default=2, help="conv blocks of the App. B CNN")
    ap.add_argument("--width", type=int, default=16, help="channels of the App. B CNN")
    ap.add_argument("--repeats", type=int, default=1, help="seeds --seed, --seed + 1, ... per batch size")
    ap.add_argument("--seed", type=int, default=0, help="first seed (model init, data order, masks, ZO-GraSP)")
    ap.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true",
                    help="batch sizes 32,128,512 and 3 epochs (about 70 s here with --threads 1)")
    ap.add_argument("--out", default="results/fig_a5", help="folder for fig_a5.{csv,json,md,png}")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from deepzero_kernels import data as D  # noqa: E402
from deepzero_kernels import train  # noqa: E402


def scaled_lr(args, batch_size: int) -> float:
    return args.lr * batch_size / args.lr_ref_batch if args.lr_scaling == "linear" else args.lr


def make_cfg(args, batch_size: int, seed: int) -> dict:
    argv = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--model", args.model,
            "--depth", str(args.depth), "--width", str(args.width), "--estimator", "cge",
            "--sparsity", repr(args.sparsity), "--sparsity-method", args.sparsity_method,
            "--mask-interval", str(args.mask_interval), "--grasp-q", str(args.grasp_q), "--mu", repr(args.mu),
            "--epochs", str(args.epochs), "--batch-size", str(batch_size), "--lr", repr(scaled_lr(args, batch_size)),
            "--warmup-epochs", repr(args.warmup_epochs), "--seed", str(seed), "--device", args.device,
            "--threads", str(args.threads), "--no-progress"]
    cfg, _ = train.parse_args(argv)
    return cfg


def run_one(args, batch_size: int, seed: int, n_train: int) -> tuple:
    """One trainer run; returns ``(csv row, per-epoch history)``."""
    cfg = make_cfg(args, batch_size, seed)
    t0 = time.perf_counter()
    s = train.run(cfg, log=lambda m: None)
    wall = time.perf_counter() - t0
    h = s["history"]
    secs = [e["seconds"] for e in h]
    steps = math.ceil(n_train / batch_size)
    row = {"batch_size": batch_size, "seed": seed, "lr": cfg["lr"], "steps_per_epoch": steps,
           "total_steps": steps * cfg["epochs"], "final_test_acc": h[-1]["test_acc"], "best_test_acc": s["best_test_acc"],
           "final_train_loss": h[-1]["train_loss"], "epoch_seconds_median": statistics.median(secs),
           "epoch_seconds_mean": statistics.mean(secs),
           "perturbations_per_s": sum(e["perturbations"] for e in h) / max(sum(secs), 1e-9),
           # every step perturbs its whole batch: an epoch is active coordinates x training samples
           "perturbed_samples_per_s": (s["active_coordinates"] or 0) * n_train / statistics.median(secs),
           "active_coordinates": s["active_coordinates"], "parameters": s["parameters"],
           "zo_grasp_queries": s["zo_grasp_queries"], "wall_seconds": wall}
    return row, h


def _agg(rows, bs, key):
    vals = [r[key] for r in rows if r["batch_size"] == bs]
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def markdown(args, rows, sizes) -> str:
    n = args.repeats
    lines = [f"DeepZero (Sparse-CGE, {args.sparsity_method} ratios, sparsity {args.sparsity:g}) on {args.dataset}, "
             f"{args.model}, {args.epochs} epochs for every batch size, lr scaling {args.lr_scaling}"
             + (f", mean ± std over {n} seeds" if n > 1 else "") + ":", "",
             "| batch size | lr | steps/epoch | final test acc (%) | best test acc (%) | time/epoch (s, median) | "
             "perturbations/s | perturbed samples/s |", "|---|---|---|---|---|---|---|---|"]
    for bs in sizes:
        r0 = next(r for r in rows if r["batch_size"] == bs)
        cells = []
        for key, scale, fmt in (("final_test_acc", 100, ".1f"), ("best_test_acc", 100, ".1f"),
                                ("epoch_seconds_median", 1, ".2f")):
            m, s = _agg(rows, bs, key)
            cells.append(f"{scale * m:{fmt}}" + (f" ± {scale * s:{fmt}}" if n > 1 else ""))
        pps, pss = _agg(rows, bs, "perturbations_per_s")[0], _agg(rows, bs, "perturbed_samples_per_s")[0]
        lines.append(f"| {bs} | {r0['lr']:g} | {r0['steps_per_epoch']} | {' | '.join(cells)} | {pps:,.0f} | "
                     f"{pss:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(args, rows, sizes, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.4))
    acc = [_agg(rows, bs, "final_test_acc") for bs in sizes]
    sec = [_agg(rows, bs, "epoch_seconds_median") for bs in sizes]
    h1 = ax.errorbar(sizes, [100 * m for m, _ in acc], yerr=[100 * s for _, s in acc], color="C0", marker="o",
                     capsize=3, label="final test accuracy (left)")
    for bs, (m, _) in zip(sizes, acc):
        ax.annotate(f"{100 * m:.1f}", (bs, 100 * m), textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=8, color="C0")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%)", color="C0")
    top = max(100 * (m + s) for m, s in acc)
    ax.set_ylim(min(100 * (m - s) for m, s in acc) - 5, top + 0.12 * max(top, 10))
    ax2 = ax.twinx()
    h2 = ax2.errorbar(sizes, [m for m, _ in sec], yerr=[s for _, s in sec], color="C3", marker="s", ls="--",
                      capsize=3, label="training time per epoch (right)")
    ax2.set_ylabel("time per epoch (s)", color="C3")
    ax2.set_ylim(0, 1.15 * max(m + s for m, s in sec))
    ax.set_title(f"Fig. A5 on {args.dataset}: {args.model}, Sparse-CGE at sparsity {args.sparsity:g}, "
                 f"{args.epochs} epochs, lr scaling {args.lr_scaling}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(handles=[h1, h2], loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.epochs = "32,128,512", 3
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        ap.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not sizes or min(sizes) < 1 or args.repeats < 1 or args.lr_ref_batch < 1:
        ap.error("--batch-sizes, --repeats and --lr-ref-batch must be >= 1")
    if not 0 <= args.sparsity < 1:
        ap.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    return args, sorted(set(sizes))


def main(argv=None):
    args, sizes = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0, rows, histories = time.perf_counter(), [], {}
    cfg = make_cfg(args, sizes[0], args.seed)
    n_train = D.load_dataset(cfg["dataset"], cfg["data_dir"], augment=False, seed=cfg["seed"],
                             synthetic_shape=cfg["synthetic_shape"], synthetic_n=cfg["synthetic_size"]).x_train.shape[0]
    for seed in range(args.seed, args.seed + args.repeats):
        for bs in sizes:
            row, hist = run_one(args, bs, seed, n_train)
            rows.append(row)
            histories[f"{bs}/{seed}"] = hist
            print(f"seed {seed} batch {bs:5d} (lr {row['lr']:g}, {row['steps_per_epoch']} steps/epoch): final test acc "
                  f"{100 * row['final_test_acc']:5.1f}%, {row['epoch_seconds_median']:.2f} s/epoch, "
                  f"{row['perturbations_per_s']:,.0f} pert/s, {row['wall_seconds']:.1f}s", flush=True)
    with open(os.path.join(args.out, "fig_a5.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    with open(os.path.join(args.out, "fig_a5.json"), "w") as f:
        json.dump({"settings": vars(args), "rows": rows, "histories": histories,
                   "seconds": round(time.perf_counter() - t0, 1), "machine": info}, f, indent=1)
    md = markdown(args, rows, sizes)
    with open(os.path.join(args.out, "fig_a5.md"), "w") as f:
        f.write(md)
    plot(args, rows, sizes, os.path.join(args.out, "fig_a5.png"))
    print(md)
    print(f"wrote {args.out}/fig_a5.{{csv,json,md,png}} in {time.perf_counter() - t0:.0f}s")
    return rows


if __name__ == "__main__":
    main()
