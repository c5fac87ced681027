"""The paper's Fig. 5 on the embedded digits dataset: DeepZero (sparse CGE with ZO-GraSP
layer-wise ratios, 90% gradient sparsity) against pattern search (Chiang et al., 2023) as the
training set grows, at one fixed epoch budget for both: test accuracy, wall time and forward
queries per method and training-set size.

Both methods train the same model from the same initialisation on the same subset (the first n
images of one fixed-seed permutation of the training set, so the subsets are nested), see the
same batches in the same order, without augmentation, and are evaluated on the whole test set:

* ``deepzero``: the trainer, ``deepzero_kernels.train.run``, i.e. ``python -m deepzero_kernels.train
  --estimator cge --sparsity 0.9 --sparsity-method zo_grasp ...`` on the subset (a temporary .npz
  in --out): ZO-GraSP ratios at initialisation (q = 192), random masks obeying them redrawn every
  --mask-interval epochs, SGD with momentum 0.9, weight decay 5e-4, cosine lr 0.1, mu = 5e-3;
* ``pattern_search``: ``deepzero_kernels.baselines.pattern_search.PatternSearch`` with the published
  radius schedule (r0 = 1, halved after a step whose 2P coordinate moves all fail, never grown),
  the best of --ps-candidates random moves per batched evaluation, one search step per batch.

An epoch is one pass over the subset in batches of --batch-size for both: DeepZero takes an SGD
step per batch, pattern search a search step (one accepted coordinate move, or a shrink). Time
(``wall_seconds``) is each method's whole run after an untimed warm-up of both: data, model,
training, an evaluation per epoch, and for DeepZero ZO-GraSP and the trainer's one-step cost
calibration (``train_seconds``: the training loop with its evaluations alone). Forward queries
count every evaluation of the model on a batch: DeepZero's perturbed evaluations (by the delta
engine, cheaper than a forward), base and BatchNorm forwards and ZO-GraSP's queries; pattern
search's candidate and current models (full forwards) and BatchNorm forwards. The paper (Sec. 5,
Fig. 5): ResNet-20 on CIFAR-10 subsets of 100 to 32K images, 40 epochs for both, DeepZero at 90%
sparsity, on one A6000 GPU.

    python python/experiments/fig5_pattern_search.py --quick --threads 1      # 45-85 s here (2 shared cores)
    python python/experiments/fig5_pattern_search.py --threads 1             # 50..1437, 40 epochs: ~10 min (est.)
    python python/experiments/fig5_pattern_search.py --dataset cifar10 --data-dir DIR --model resnet20 \\
        --batch-size 256 --sizes 100,500,1000,2000,4000,8000,16000,32000   # the paper's setting (a GPU)

Writes ``fig5.csv`` (one row per size and method), ``fig5.json`` (settings, machine, the rows with
per-epoch histories), ``fig5.md`` (the table) and ``fig5.png`` (accuracy, time and queries against
the training-set size) to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time

METHODS = ("deepzero", "pattern_search")
DEFAULT_SIZES = {"digits": "50,100,200,400,800,1437", "cifar10": "100,500,1000,2000,4000,8000,16000,32000",
                 "synthetic": "64,128,256,512"}
QUICK_SIZES = {"digits": "100,400,1437", "cifar10": "100,500", "synthetic": "64,256"}
QUICK_EPOCHS = 6


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dataset", choices=tuple(DEFAULT_SIZES), default="digits",
                    help="digits: embedded 8x8 digits (1437 train / 360 test); cifar10: from --data-dir; "
                         "synthetic: 3x32x32 Gaussian class clusters (512 train)")
    ap.add_argument("--data-dir", default="data", help="CIFAR-10 python batches (cifar-10-batches-py or its parent)")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated training-set sizes; None: 50..1437 (digits), the paper's 100..32000 "
                         "(cifar10), 64..512 (synthetic)")
    ap.add_argument("--subset-seed", type=int, default=0,
                    help="seed of the permutation the nested subsets are cut from")
    ap.add_argument("--model", default="cnn", help="any trainer model: cnn (App. B CNN), resnet20 (the paper's), ...")
    ap.add_argument("--depth", type=int, default=2, help="conv blocks of the cnn")
    ap.add_argument("--width", type=int, default=16, help="channels of the cnn")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--epochs", type=int, default=40, help="epochs of both methods (the paper: 40)")
    ap.add_argument("--batch-size", type=int, default=128, help="batch of both methods (the paper's DeepZero: 256)")
    ap.add_argument("--eval-batch-size", type=int, default=1000, help="test evaluation batch")
    ap.add_argument("--sparsity", type=float, default=0.9, help="DeepZero's gradient sparsity")
    ap.add_argument("--lr", type=float, default=0.1, help="DeepZero's peak learning rate (cosine, no warm-up)")
    ap.add_argument("--mu", type=float, default=5e-3, help="DeepZero's CGE and ZO-GraSP finite-difference step")
    ap.add_argument("--grasp-q", type=int, default=192, help="ZO-GraSP's random directions")
    ap.add_argument("--mask-interval", type=int, default=5, help="epochs between DeepZero's mask redraws")
    ap.add_argument("--ps-step-size", type=float, default=1.0, help="pattern search's initial radius r0, as published")
    ap.add_argument("--ps-shrink", type=float, default=0.5,
                    help="radius factor after a step whose moves all failed, as published")
    ap.add_argument("--ps-expand", type=float, default=1.0,
                    help="radius factor after an accepted move, as published (no growth)")
    ap.add_argument("--ps-candidates", type=int, default=32,
                    help="moves per batched evaluation, the best taken (published: 1, or as many models as fit)")
    ap.add_argument("--ps-objective", choices=("batch", "full"), default="batch",
                    help="what a search step judges moves on: its mini-batch, or the whole subset (Chiang et al.'s "
                         "objective; each query then costs n images), ceil(n / batch) steps per epoch either way")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--keep-data", action="store_true", help="keep the per-size .npz subsets in --out")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model init, batch order, masks and moves")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true",
                    help=f"sizes 100,400,1437 of digits, {QUICK_EPOCHS} epochs (45-85 s here)")
    ap.add_argument("--out", default="results/fig5", help="folder for fig5.csv, .json, .md and .png")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from deepzero_kernels import data as D  # noqa: E402
from deepzero_kernels import train  # noqa: E402
from deepzero_kernels.baselines.pattern_search import PatternSearch  # noqa: E402


# ----------------------------------------------------------------------------- data
def load_base(args) -> D.Dataset:
    """The whole dataset, inputs as the model takes them (CIFAR-10 normalised, no augmentation)."""
    ds = D.load_dataset(args.dataset, args.data_dir, augment=False, seed=args.seed)
    for split in ("x_train", "x_test"):
        x = getattr(ds, split)
        setattr(ds, split, torch.cat([ds.prepare(x[i:i + 4096], train=False) for i in range(0, x.shape[0], 4096)]))
    return ds


def parse_sizes(text: str, available: int) -> list:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from None
    bad = [n for n in sizes if not 1 <= n <= available]
    if bad:
        raise ValueError(f"--sizes {bad}: the training set has {available} images (sizes 1..{available})")
    return sorted(set(sizes))


def write_subset(base: D.Dataset, order: torch.Tensor, n: int, folder: str) -> str:
    """The first ``n`` of ``order`` with the whole test set, as a .npz the trainer reads."""
    path = os.path.join(folder, f"subset_{n}.npz")
    idx = order[:n]
    np.savez(path, x_train=base.x_train[idx].numpy(), y_train=base.y_train[idx].numpy(),
             x_test=base.x_test.numpy(), y_test=base.y_test.numpy(), num_classes=np.array(base.num_classes))
    return path


# ----------------------------------------------------------------------------- the two methods
def trainer_argv(args, dataset: str) -> list:
    """DeepZero's recipe as trainer flags (the pattern-search run builds its model from these too)."""
    return ["--dataset", dataset, "--no-augment", "--model", args.model, "--depth", str(args.depth),
            "--width", str(args.width), "--estimator", "cge", "--sparsity", str(args.sparsity),
            "--sparsity-method", "zo_grasp", "--grasp-q", str(args.grasp_q), "--mu", str(args.mu),
            "--mask-interval", str(args.mask_interval), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
            "--lr", str(args.lr), "--warmup-epochs", "0", "--scheduler", "cosine", "--seed", str(args.seed),
            "--threads", str(args.threads), "--device", args.device, "--no-progress"]


def run_deepzero(args, path: str, n: int) -> dict:
    t0 = time.perf_counter()
    cfg, _ = train.parse_args(trainer_argv(args, path))
    s = train.run(cfg, log=lambda m: None)
    wall = time.perf_counter() - t0
    hist = [{k: h[k] for k in ("epoch", "train_loss", "test_loss", "test_acc", "seconds", "perturbations")}
            for h in s["history"]]
    return {"method": "deepzero", "size": n, "epochs": len(hist), "steps": len(hist) * -(-n // args.batch_size),
            "final_test_acc": s["final_test_acc"], "best_test_acc": s["best_test_acc"],
            "final_train_loss": hist[-1]["train_loss"], "wall_seconds": wall, "train_seconds": s["wall_seconds"],
            "step_seconds": sum(h["seconds"] for h in hist), "forward_queries": s["forward_equivalents"],
            "parameters": s["parameters"], "active_coordinates": s["active_coordinates"],
            "zo_grasp_queries": s["zo_grasp_queries"], "history": hist}


def ps_epoch(opt: PatternSearch, ds: D.Dataset, perm: torch.Tensor, batch_size: int, device,
             full: bool = False) -> dict:
    """One pass over the subset, one search step per batch (judged on the batch, or on the whole
    subset when ``full``); the epoch's training statistics (loss: before each step, on what it judged)."""
    loss_sum, seen, moves, q0, seconds = 0.0, 0, 0, opt.num_forwards, 0.0
    for lo in range(0, perm.numel(), batch_size):
        idx = perm if full else perm[lo:lo + batch_size]
        x, y = ds.prepare(ds.x_train[idx].to(device), train=False), ds.y_train[idx].to(device)
        t0 = time.perf_counter()
        st = opt.step(x, y)
        seconds += time.perf_counter() - t0
        loss_sum, seen = loss_sum + st["loss_before"] * idx.numel(), seen + idx.numel()
        moves += st["accepted"]
    return {"train_loss": loss_sum / seen, "accepted": moves, "forwards": opt.num_forwards - q0,
            "step_size": opt.step_size, "seconds": seconds}


def run_pattern_search(args, path: str, n: int) -> dict:
    """Pattern search with DeepZero's model, initialisation and batch order (the trainer's helpers)."""
    t0 = time.perf_counter()
    cfg, _ = train.parse_args(trainer_argv(args, path))
    device = train.resolve_device(cfg["device"])
    ds = D.load_dataset(path).to(device)
    model = train.make_model(cfg, ds).to(device).train()  # seeds torch with --seed, as the trainer does
    data_order = train.generators(args.seed)["data"]     # the trainer's stream of epoch permutations
    opt = PatternSearch(model, step_size=args.ps_step_size, shrink=args.ps_shrink, expand=args.ps_expand,
                        candidates=args.ps_candidates, generator=torch.Generator().manual_seed(args.seed * 1000 + 7))
    hist, t_train = [], time.perf_counter()
    for epoch in range(args.epochs):
        rec = ps_epoch(opt, ds, torch.randperm(n, generator=data_order), args.batch_size, device,
                       full=args.ps_objective == "full")
        test_loss, test_acc = train.evaluate(model, ds, args.eval_batch_size, device)
        hist.append({"epoch": epoch + 1, **rec, "test_loss": test_loss, "test_acc": test_acc})
    end = time.perf_counter()
    return {"method": "pattern_search", "size": n, "epochs": len(hist), "steps": opt.num_steps,
            "final_test_acc": hist[-1]["test_acc"], "best_test_acc": max(h["test_acc"] for h in hist),
            "final_train_loss": hist[-1]["train_loss"], "wall_seconds": end - t0, "train_seconds": end - t_train,
            "step_seconds": sum(h["seconds"] for h in hist), "forward_queries": opt.num_forwards,
            "parameters": opt.dim, "accepted_moves": opt.num_accepted, "shrinks": opt.num_shrinks,
            "final_step_size": opt.step_size, "history": hist}


# ----------------------------------------------------------------------------- outputs
def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def markdown(rows: list, args) -> str:
    by = {(r["method"], r["size"]): r for r in rows}
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    names = {"deepzero": "DeepZero", "pattern_search": "PS"}
    cols = [f"{names[m]} {what}" for what in ("test acc (%)", "time (s)", "queries") for m in methods]
    out = [f"{args.model} on {args.dataset} subsets, {args.epochs} epochs, batch {args.batch_size}; DeepZero: "
           f"CGE at sparsity {args.sparsity} (ZO-GraSP ratios); PS: pattern search (Chiang et al., 2023), "
           f"{args.ps_candidates} moves per evaluation. {torch.get_num_threads()} threads.\n",
           "| size | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    fmt = {"test acc (%)": lambda r: f"{100 * r['final_test_acc']:.1f}",
           "time (s)": lambda r: f"{r['wall_seconds']:.1f}", "queries": lambda r: f"{r['forward_queries']:,}"}
    for n in sorted({r["size"] for r in rows}):
        cells = [fmt[what](by[(m, n)]) if (m, n) in by else "" for what in fmt for m in methods]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows: list, path: str, args) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return
    labels = {"deepzero": f"DeepZero (CGE, {100 * args.sparsity:g}% sparse)", "pattern_search": "Pattern search"}
    panels = (("final_test_acc", "test accuracy (%)", 100.0, False), ("wall_seconds", "wall time (s)", 1.0, True),
              ("forward_queries", "forward queries", 1.0, True))
    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, ylabel, scale, logy) in zip(axes, panels):
        for m, style in zip(METHODS, ("o-", "s--")):
            rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["size"])
            if rs:
                ax.plot([r["size"] for r in rs], [scale * r[key] for r in rs], style, label=labels[m])
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sizes, [str(n) for n in sizes], fontsize=8)
        ax.set_yscale("log" if logy else "linear")
        ax.set_xlabel("training-set size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, frameon=False)
    fig.suptitle(f"Fig. 5 on {args.dataset}: {args.model}, {args.epochs} epochs for both, batch {args.batch_size}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(args, rows: list) -> None:
    flat = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    cols = list(dict.fromkeys(k for r in flat for k in r))
    with open(os.path.join(args.out, "fig5.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)
    with open(os.path.join(args.out, "fig5.json"), "w") as f:
        json.dump({"settings": vars(args), **machine(), "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "fig5.md"), "w") as f:
        f.write(markdown(rows, args))
    plot(rows, os.path.join(args.out, "fig5.png"), args)


# ----------------------------------------------------------------------------- main
def warm_up(args, base, order, methods) -> None:
    """One untimed epoch of each method on a few images: the process's one-off costs (lazy imports,
    allocator, kernel selection) would otherwise be charged to whichever run comes first."""
    n = min(16, base.x_train.shape[0])
    path = write_subset(base, order, n, args.out)
    short = argparse.Namespace(**{**vars(args), "epochs": 1})
    for m in methods:
        (run_deepzero if m == "deepzero" else run_pattern_search)(short, path, n)
    os.remove(path)


def settle(ap, args):
    """Quick-mode settings and the checks of the script's own flags (the trainer checks its own)."""
    if args.quick:
        args.sizes, args.epochs = args.sizes or QUICK_SIZES[args.dataset], QUICK_EPOCHS
    args.sizes = args.sizes or DEFAULT_SIZES[args.dataset]
    methods = args.methods.split(",")
    if not methods or any(m not in METHODS for m in methods):
        ap.error(f"--methods must be a comma-separated subset of {', '.join(METHODS)}, got {args.methods!r}")
    for flag, v in (("--ps-candidates", args.ps_candidates), ("--epochs", args.epochs),
                    ("--batch-size", args.batch_size)):
        if v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    try:
        PatternSearch(torch.nn.Linear(1, 1), step_size=args.ps_step_size, shrink=args.ps_shrink, expand=args.ps_expand)
    except (TypeError, ValueError) as e:
        ap.error(f"pattern search settings (--ps-*): {e}")
    train.parse_args(trainer_argv(args, "digits"))  # the trainer's checks of its flags: exits if bad
    return methods


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    methods = settle(ap, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args)
    try:
        sizes = parse_sizes(args.sizes, base.x_train.shape[0])
    except ValueError as e:
        ap.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    order = torch.randperm(base.x_train.shape[0], generator=torch.Generator().manual_seed(args.subset_seed))
    warm_up(args, base, order, methods)
    rows = []
    for n in sizes:
        path = write_subset(base, order, n, args.out)
        for m in methods:
            row = (run_deepzero if m == "deepzero" else run_pattern_search)(args, path, n)
            rows.append(row)
            print(f"n={n:6d} {m:15s} test acc {100 * row['final_test_acc']:5.1f}% "
                  f"(best {100 * row['best_test_acc']:5.1f}%)  {row['wall_seconds']:8.1f} s  "
                  f"{row['forward_queries']:>12,} forward queries", flush=True)
        if not args.keep_data:
            os.remove(path)
        write(args, rows)  # after every size: a long run's finished part is on disk
    print(markdown(rows, args))
    print(f"wrote {args.out}/fig5.csv, fig5.json, fig5.md, fig5.png")
    return rows


if __name__ == "__main__":
    main()
