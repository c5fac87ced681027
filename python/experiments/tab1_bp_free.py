"""The paper's Tab. 1 (Sec. 5, "Comparison with input-weight alignment") on the embedded digits
dataset: DeepZero against the backprop-free FA, DFA and Align-ada on the 8-layer CNN of Boopathy &
Fiete (2022), each at two widths, test accuracy and wall time.

The network is ``deepzero_kernels.models.boopathy_cnn8`` (seven conv3x3-BN-ReLU layers of one width,
strides 1,1,1,2,1,2,1, global average pooling, a linear classifier). DeepZero is the trainer
(``deepzero_kernels.train.run``): Sparse-CGE with ZO-GraSP layer-wise pruning ratios (``--sparsity``
0.9, q = 192, mu = 5e-3), masks redrawn every 5 epochs, SGD momentum 0.9, weight decay 5e-4, cosine
learning rate without warm-up -- exactly ``python -m deepzero_kernels.train --model ... --sparsity
0.9 --sparsity-method zo_grasp --model cnn8 --width W ...``. FA, DFA and Align-ada
(``deepzero_kernels.baselines.feedback_alignment``) train the same network from the same
initialisation, on the same batches, with the trainer's own SGD + cosine schedule (``--bp-lr``), their
gradient replaced by the rule's. Each run is timed end to end (ZO-GraSP and the per-epoch test
evaluation included); accuracy is the final epoch's test accuracy. ``--methods`` may add ``bp``
(backprop, the trainer's ``--estimator fo``) at the baselines' widths as a reference.

The paper trains DeepZero at widths 32/64 and takes FA/DFA/Align-ada at widths 64/512 on CIFAR-10
(DeepZero 50 epochs, Boopathy & Fiete 150 epochs); the defaults here are a scaled-down digits version
(DeepZero 8/16, baselines 16/64), so the absolute numbers are not the paper's, only the comparison.

    python python/experiments/tab1_bp_free.py --quick --threads 1 --out results/tab1_bp_free_quick  # 55 s here
    python python/experiments/tab1_bp_free.py --threads 1 --out results/tab1_bp_free   # full (digits), ~11 min est.
    python python/experiments/tab1_bp_free.py --dataset cifar10 --data-dir DIR --dz-widths 32,64 \\
        --bp-widths 64,512 --dz-epochs 50 --bp-epochs 150 --batch-size 256   # the paper's setting (GPU)

Writes ``tab1_bp_free.csv`` (one row per method and width), ``.json`` (settings, results, machine),
``.md`` (the table in the paper's layout, next to the paper's numbers) and ``.png`` (accuracy and
time bars) to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import sys
import time

METHOD_NAMES = {"deepzero": "DeepZero", "fa": "FA", "dfa": "DFA", "align_ada": "Align-ada", "bp": "BP"}
# The paper's Tab. 1 (CIFAR-10, 8-layer CNN): method -> [(width, accuracy %, hours)].
PAPER_TAB1 = {"deepzero": [(32, 57.7, 4.34), (64, 64.1, 28.15)], "fa": [(64, 46.5, 0.36), (512, 45.4, 3.79)],
              "dfa": [(64, 49.9, 0.42), (512, 54.1, 3.52)], "align_ada": [(64, 49.9, 0.48), (512, 58.0, 4.59)]}


def build_parser():
    """The flags; the defaults are the full digits run (``main`` applies ``--quick``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dataset", choices=("digits", "synthetic", "cifar10"), default="digits",
                    help="digits: embedded 8x8 digits; synthetic: 3x32x32 Gaussian class clusters; "
                         "cifar10: python-format batches in --data-dir")
    ap.add_argument("--data-dir", default="data", help="CIFAR-10 directory (cifar-10-batches-py or its parent)")
    ap.add_argument("--methods", default="deepzero,fa,dfa,align_ada",
                    help="comma-separated, from: deepzero, fa, dfa, align_ada, bp (backprop reference)")
    ap.add_argument("--dz-widths", default="8,16", help="comma-separated CNN widths trained by DeepZero")
    ap.add_argument("--bp-widths", default="16,64",
                    help="comma-separated CNN widths trained by FA, DFA, Align-ada (and bp)")
    ap.add_argument("--dz-epochs", type=int, default=10, help="DeepZero training epochs")
    ap.add_argument("--bp-epochs", type=int, default=30, help="training epochs of FA, DFA, Align-ada and bp")
    ap.add_argument("--batch-size", type=int, default=128, help="training batch size of every method")
    ap.add_argument("--lr", type=float, default=0.1, help="DeepZero's peak learning rate (cosine schedule)")
    ap.add_argument("--bp-lr", type=float, default=0.1,
                    help="peak learning rate of FA, DFA, Align-ada and bp (cosine schedule)")
    ap.add_argument("--sparsity", type=float, default=0.9,
                    help="DeepZero's gradient sparsity (fraction of conv/linear weights not estimated)")
    ap.add_argument("--grasp-q", type=int, default=192, help="RGE directions of ZO-GraSP")
    ap.add_argument("--mu", type=float, default=5e-3, help="finite-difference step of CGE and ZO-GraSP")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and feedback matrices")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true",
                    help="DeepZero at widths 4,8 for 5 epochs, baselines at widths 8,16 for 10 epochs (~1 min here)")
    ap.add_argument("--out", default="results/tab1_bp_free", help="folder for tab1_bp_free.csv, .json, .md and .png")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from deepzero_kernels import data as D  # noqa: E402
from deepzero_kernels import train  # noqa: E402
from deepzero_kernels.baselines import feedback_alignment as bpfree  # noqa: E402


def widths_of(text: str, flag: str, ap) -> list:
    try:
        out = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        ap.error(f"{flag} must be comma-separated widths >= 1, got {text!r}")
    return out


def trainer_cfg(args, width: int, estimator: str, epochs: int, lr: float) -> dict:
    sparse = estimator == "cge" and args.sparsity > 0
    argv = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--model", "cnn8", "--width", str(width),
            "--estimator", estimator, "--sparsity", str(args.sparsity if sparse else 0),
            "--sparsity-method", "zo_grasp" if sparse else "none", "--grasp-q", str(args.grasp_q),
            "--mu", str(args.mu), "--mask-interval", "5", "--epochs", str(epochs),
            "--batch-size", str(args.batch_size), "--lr", str(lr), "--momentum", "0.9", "--weight-decay", "5e-4",
            "--scheduler", "cosine", "--warmup-epochs", "0", "--seed", str(args.seed), "--device", args.device,
            "--threads", str(args.threads), "--no-progress"]
    return train.parse_args(argv)[0]


def run_trainer(args, width: int, estimator: str, epochs: int, lr: float) -> dict:
    """DeepZero (``cge``) or backprop (``fo``) through the trainer; returns the summary."""
    return train.run(trainer_cfg(args, width, estimator, epochs, lr), log=lambda m: None)


def run_bp_free(args, method: str, width: int, ds) -> dict:
    """FA / DFA / Align-ada with the trainer's model initialisation, data order and SGD + cosine
    schedule; returns a summary shaped like the trainer's."""
    cfg = trainer_cfg(args, width, "fo", args.bp_epochs, args.bp_lr)
    device = train.resolve_device(cfg["device"])
    t0 = time.perf_counter()
    model = train.make_model(cfg, ds).to(device)
    model.train()
    rule = bpfree.make(method, model, seed=args.seed)
    steps = math.ceil(ds.x_train.shape[0] / cfg["batch_size"])
    opt, sched = train.build_optimizer(cfg, model, steps)
    gens = train.generators(cfg["seed"])
    history = []
    for epoch in range(cfg["epochs"]):
        loss_sum, n = 0.0, 0
        for idx in D.batches(ds.x_train.shape[0], cfg["batch_size"], generator=gens["data"]):
            x = ds.prepare(ds.x_train[idx].to(device), train=True, generator=gens["aug"])
            y = ds.y_train[idx].to(device)
            loss = rule.backward(x, y)
            opt.step()
            sched.step()
            loss_sum, n = loss_sum + float(loss) * len(idx), n + len(idx)
        test_loss, test_acc = train.evaluate(model, ds, 1000, device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / n, "test_loss": test_loss, "test_acc": test_acc})
        if not math.isfinite(loss_sum):
            break  # diverged: the table reports the accuracy it reached
    return {"final_test_acc": history[-1]["test_acc"], "best_test_acc": max(h["test_acc"] for h in history),
            "wall_seconds": time.perf_counter() - t0, "parameters": sum(p.numel() for p in model.parameters()),
            "active_coordinates": None, "history": history}


def one_run(args, method: str, width: int, ds) -> dict:
    if method == "deepzero":
        s = run_trainer(args, width, "cge", args.dz_epochs, args.lr)
        epochs, lr = args.dz_epochs, args.lr
    elif method == "bp":
        s = run_trainer(args, width, "fo", args.bp_epochs, args.bp_lr)
        epochs, lr = args.bp_epochs, args.bp_lr
    else:
        s = run_bp_free(args, method, width, ds)
        epochs, lr = args.bp_epochs, args.bp_lr
    hist = s["history"]
    return {"method": METHOD_NAMES[method], "width": width, "parameters": s["parameters"],
            "queries_per_step": s["active_coordinates"] or "", "epochs": epochs, "lr": lr,
            "test_acc": hist[-1]["test_acc"] if hist else float("nan"), "best_test_acc": s["best_test_acc"],
            "final_train_loss": hist[-1]["train_loss"] if hist else float("nan"), "seconds": s["wall_seconds"]}


def markdown(rows: list, args) -> str:
    """The table in the paper's layout (methods as columns, rows Width / Accuracy / Time), then
    the paper's own Tab. 1 for comparison."""
    head = "| Method | " + " | ".join(r["method"] for r in rows) + " |"
    lines = [f"Tab. 1 on {args.dataset}: 8-layer CNN of Boopathy & Fiete (2022); DeepZero {args.dz_epochs} "
             f"epochs (sparsity {args.sparsity}), FA/DFA/Align-ada {args.bp_epochs} epochs; final test accuracy, "
             "wall time of the whole run.", "", head, "|" + " --- |" * (len(rows) + 1),
             "| Width | " + " | ".join(str(r["width"]) for r in rows) + " |",
             "| Accuracy (%) | " + " | ".join(f"{100 * r['test_acc']:.1f}" for r in rows) + " |",
             "| Time (s) | " + " | ".join(f"{r['seconds']:.1f}" for r in rows) + " |", "",
             "The paper's Tab. 1 (CIFAR-10, time in hours):", ""]
    paper = [(METHOD_NAMES[m], w, a, t) for m, runs in PAPER_TAB1.items() for w, a, t in runs]
    lines += ["| Method | " + " | ".join(p[0] for p in paper) + " |", "|" + " --- |" * (len(paper) + 1),
              "| Width | " + " | ".join(str(p[1]) for p in paper) + " |",
              "| Accuracy (%) | " + " | ".join(f"{p[2]}" for p in paper) + " |",
              "| Time (h) | " + " | ".join(f"{p[3]}" for p in paper) + " |"]
    return "\n".join(lines) + "\n"


def plot(rows: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    colors = {"DeepZero": "C3", "FA": "C0", "DFA": "C1", "Align-ada": "C2", "BP": "C7"}
    labels = [f"{r['method']}\nw={r['width']}" for r in rows]
    xs = range(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.5 * len(rows) + 2), 4))
    for ax, key, ylabel in ((a1, "test_acc", "test accuracy (%)"), (a2, "seconds", "wall time (s, log scale)")):
        vals = [100 * r[key] if key == "test_acc" else r[key] for r in rows]
        bars = ax.bar(xs, vals, color=[colors.get(r["method"], "C4") for r in rows])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(ylabel)
    a1.set_ylim(0, 105)
    a2.set_yscale("log")
    a2.yaxis.set_major_formatter(ScalarFormatter())
    a2.yaxis.set_minor_formatter(NullFormatter())
    a1.set_title("accuracy")
    a2.set_title("time")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(rows: list, args, started: str) -> None:
    base = os.path.join(args.out, "tab1_bp_free")
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
               "platform": platform.platform(), "cpu_count": os.cpu_count(), "date": started,
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with open(base + ".json", "w") as f:
        json.dump({"settings": vars(args), "results": rows, "paper_tab1": PAPER_TAB1, "machine": machine}, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, args))
    try:
        plot(rows, base + ".png", f"Tab. 1 on {args.dataset}: 8-layer CNN (Boopathy & Fiete, 2022)")
    except ImportError as e:
        print(f"no plot: {e}")


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        args.dz_widths, args.bp_widths, args.dz_epochs, args.bp_epochs = "4,8", "8,16", 5, 10
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad or not methods:
        ap.error(f"--methods: unknown {bad or methods}; choose from {', '.join(METHOD_NAMES)}")
    dz_widths, bp_widths = widths_of(args.dz_widths, "--dz-widths", ap), widths_of(args.bp_widths, "--bp-widths", ap)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    cfg = trainer_cfg(args, dz_widths[0], "cge", max(1, args.dz_epochs), args.lr)  # flag errors before any work
    os.makedirs(args.out, exist_ok=True)
    ds = D.load_dataset(cfg["dataset"], cfg["data_dir"], augment=cfg["augment"], seed=cfg["seed"],
                        synthetic_shape=cfg["synthetic_shape"], synthetic_n=cfg["synthetic_size"])  # as the trainer
    ds = ds.to(train.resolve_device(cfg["device"]))
    rows = []
    for method in methods:
        for width in (dz_widths if method == "deepzero" else bp_widths):
            row = one_run(args, method, width, ds)
            rows.append(row)
            print(f"{row['method']:9s} width {width:4d} ({row['parameters']} params): test acc "
                  f"{100 * row['test_acc']:5.1f}%  train loss {row['final_train_loss']:.3f}  "
                  f"{row['seconds']:.1f}s", flush=True)
    write_outputs(rows, args, started)
    print(markdown(rows, args))
    print(f"wrote {args.out}/tab1_bp_free.csv, .json, .md and .png")
    return rows


if __name__ == "__main__":
    main()
