"""The paper's Fig. A3 on the embedded digits dataset: LPR-guided dynamic sparsity (DeepZero) against the two direct ways of using ZO-GraSP, M1 and M2, and uniform random ratios, as the sparsity grows, with the dense FO model as the reference.

The paper (Sec. 4, "Integrating sparsity with CGE"; App. E, Alg. 1 and Fig. A3) compares ways to
choose the sparse gradient coordinates S_t at step t; every method trains the dense model with a
gradient masked to S_t (gradient sparsity, not weight sparsity). Fig. A3 compares them "in the FO
training regime", the backprop gradient masked to S_t (``--regime fo``); ``--regime zo`` uses
Sparse-CGE on S_t instead (DeepZero's own setting, much slower).

* ``lpr`` (SR/LPR-guided, DeepZero, Alg. 1/2): ZO-GraSP at initialisation gives the layer-wise
  pruning ratios; random masks obeying them are redrawn every ``--mask-interval`` epochs.
  Runs through the trainer: ``train --sparsity-method zo_grasp``.
* ``m1`` (alternate ZO-GraSP and sparse training): the ZO-GraSP mask itself is recomputed from
  the current weights every ``--m1-period`` steps (the paper: every iteration; default here:
  once per epoch, for cost) and used as the gradient mask. ZO-GraSP queries grow with the number
  of recomputations: the paper's point against M1.
* ``m2`` (pruning before training): the ZO-GraSP mask at initialisation, kept fixed.
* ``random`` (uniform random ratios): random masks with the same density in every layer,
  redrawn every ``--mask-interval`` epochs; the trainer's ``--sparsity-method random``.
* ``dense``: FO training without a mask (the reference line).

M1 and M2 use masks the trainer does not produce, so they run in this script's training loop,
which is the trainer's step for step: the same model init, data order, optimiser (SGD, momentum
0.9, weight decay 5e-4, warm-up + cosine lr), generators and ZO-GraSP batch (so M2's mask at
initialisation and M1's first one are exactly the mask whose layer densities ``lpr`` uses).
Differences between methods come from the masks alone: at ``--sparsities 0`` every method gives
bitwise the same run, and the loop with ``lpr``/``random`` masks reproduces the trainer's runs
bitwise (tests/test_exp_sparsity_batch.py checks both).

    python python/experiments/fig_a3_sparsity.py --quick --threads 1 --out results/fig_a3_quick  # ~65 s here
    python python/experiments/fig_a3_sparsity.py --threads 1 --out results/fig_a3                # ~11 min here (est.)
    python python/experiments/fig_a3_sparsity.py --dataset cifar10 --data-dir DIR --model resnet20 \\
        --epochs 50 --batch-size 256 --warmup-epochs 0 --repeats 1 --out results/fig_a3_cifar   # paper's model/data/recipe

Writes ``fig_a3.csv`` (one row per method, sparsity and seed), ``fig_a3.json`` (settings, rows,
layer densities, machine), ``fig_a3.md`` (test accuracy by method and sparsity; ZO-GraSP cost per
method) and ``fig_a3.png`` (test accuracy against sparsity) to ``--out``.
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

METHODS = ("lpr", "m1", "m2", "random")
LABELS = {"lpr": "LPR-guided (DeepZero)", "m1": "M1: ZO-GraSP recomputed", "m2": "M2: ZO-GraSP at init, fixed",
          "random": "uniform random ratios", "dense": "dense FO"}


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sparsities", default="0.5,0.7,0.9,0.95",
                    help="comma-separated pruning ratios (fraction of conv/linear weights outside the mask)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated, from: lpr, m1, m2, random (the dense FO reference always runs)")
    ap.add_argument("--regime", choices=("fo", "zo"), default="fo",
                    help="fo: backprop gradient masked to the pattern (the paper's Fig. A3); "
                         "zo: Sparse-CGE on the pattern")
    ap.add_argument("--m1-period", type=int, default=0,
                    help="M1 recomputes its ZO-GraSP mask every this many steps; 0 = once per epoch "
                         "(1 = every iteration, the paper's M1)")
    ap.add_argument("--mask-interval", type=int, default=5,
                    help="lpr and random redraw their masks every this many epochs (K_sparse)")
    ap.add_argument("--grasp-q", type=int, default=192, help="RGE directions of every ZO-GraSP call (paper: 192)")
    ap.add_argument("--mu", type=float, default=5e-3, help="finite-difference step of ZO-GraSP and CGE")
    ap.add_argument("--dataset", choices=("digits", "synthetic", "cifar10"), default="digits",
                    help="digits: embedded 8x8 digits; synthetic: Gaussian class clusters; cifar10: --data-dir")
    ap.add_argument("--data-dir", default="data", help="CIFAR-10 directory (cifar-10-batches-py or its parent)")
    ap.add_argument("--model", default="cnn", help="trainer model name: cnn (App. B, --depth/--width), resnet20, ...")
    ap.add_argument("--depth", type=int, default=2, help="conv blocks of the App. B CNN")
    ap.add_argument("--width", type=int, default=16, help="channels of the App. B CNN")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of every run")
    ap.add_argument("--batch-size", type=int, default=128, help="SGD batch size (also ZO-GraSP's batch)")
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate (warm-up, then cosine decay)")
    ap.add_argument("--warmup-epochs", type=float, default=1.0, help="linear lr warm-up in epochs")
    ap.add_argument("--repeats", type=int, default=2, help="seeds --seed, --seed + 1, ... per method and sparsity")
    ap.add_argument("--seed", type=int, default=0, help="first seed (model init, data order, masks, ZO-GraSP)")
    ap.add_argument("--device", default="auto", help="torch device of every run: auto (cuda if available), cpu, cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true",
                    help="sparsities 0.7,0.95, 5 epochs, one seed (about 65 s here with --threads 1)")
    ap.add_argument("--out", default="results/fig_a3", help="folder for fig_a3.{csv,json,md,png}")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from deepzero_kernels import data as D  # noqa: E402
from deepzero_kernels import train  # noqa: E402
from deepzero_kernels.pruning import (layer_densities, prunable_weights, prune_masks, random_masks,  # noqa: E402
                                      zo_grasp_scores)

TRAINER_METHODS = ("lpr", "random", "dense")  # run by train.run; m1, m2 by train_loop


# ----------------------------------------------------------------------------- configuration
def make_cfg(args, method: str, sparsity: float, seed: int) -> dict:
    """The trainer's resolved config for one run (the loop reads the same fields)."""
    dense = method == "dense"
    argv = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--model", args.model,
            "--depth", str(args.depth), "--width", str(args.width),
            "--estimator", "fo" if dense or args.regime == "fo" else "cge",
            "--sparsity", "0" if dense else repr(sparsity),
            "--sparsity-method", "random" if method == "random" else "zo_grasp",
            "--grasp-q", str(args.grasp_q), "--mu", repr(args.mu), "--mask-interval", str(args.mask_interval),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", repr(args.lr),
            "--warmup-epochs", repr(args.warmup_epochs), "--seed", str(seed), "--device", args.device,
            "--threads", str(args.threads), "--no-progress"]
    cfg, _ = train.parse_args(argv)
    return cfg


def grasp_queries(cfg: dict) -> int:
    """Loss queries of one ZO-GraSP call: two RGE estimates of q directions, each with its base."""
    return 2 * cfg["grasp_q"] + 2


# ----------------------------------------------------------------------------- the masks
def zo_grasp_on_batch(cfg: dict, model, ds, gen: torch.Generator, device) -> dict:
    """ZO-GraSP scores on one training batch drawn from ``gen`` (the trainer's draw: a random
    batch of ``--batch-size``, not augmented; then q directions from the same generator)."""
    idx = torch.randperm(ds.x_train.shape[0], generator=gen)[:cfg["batch_size"]]
    xb = ds.prepare(ds.x_train[idx].to(device), train=False)
    return zo_grasp_scores(model, xb, ds.y_train[idx].to(device), q=cfg["grasp_q"], mu=cfg["mu"], generator=gen)


def init_densities(args, sparsities) -> dict:
    """The layer densities ZO-GraSP at initialisation gives at each sparsity (seed ``--seed``):
    the ratios ``lpr`` obeys and ``m2``'s fixed mask has (the scores do not depend on the sparsity)."""
    cfg = make_cfg(args, "m2", max(sparsities), args.seed)
    device = train.resolve_device(cfg["device"])
    ds = D.load_dataset(cfg["dataset"], cfg["data_dir"], augment=cfg["augment"], seed=cfg["seed"],
                        synthetic_shape=cfg["synthetic_shape"], synthetic_n=cfg["synthetic_size"]).to(device)
    model = train.make_model(cfg, ds).to(device).train()
    scores = zo_grasp_on_batch(cfg, model, ds, train.generators(cfg["seed"])["grasp"], device)
    return {str(s): layer_densities(prune_masks(scores, s)) for s in sparsities}


class MaskSchedule:
    """The gradient masks of one method over a run (``masks_at`` before every step).

    ZO-GraSP scores one training batch drawn from the ``grasp`` generator, exactly as the
    trainer's :func:`~deepzero_kernels.train.choose_densities` does, so the first call of every
    method sees the same batch and directions. ``lpr`` and ``random`` redraw with the ``mask``
    generator at the epochs the trainer does (``epoch % mask_interval == 0``)."""

    def __init__(self, method, cfg, model, ds, gens, device, steps_per_epoch, m1_period=0):
        if method not in METHODS + ("dense",):
            raise ValueError(f"unknown method {method!r}")
        self.method, self.cfg, self.model, self.ds, self.gens, self.device = method, cfg, model, ds, gens, device
        self.steps_per_epoch = steps_per_epoch
        self.period = m1_period or steps_per_epoch  # M1's recomputation period in steps
        self.masks, self.densities = None, None
        self.grasp_calls, self.updates, self.turnover = 0, [], []  # updates: the step of each new mask
        if method in ("lpr", "m1", "m2"):
            self.masks = self.zo_grasp_masks()
            self.densities = layer_densities(self.masks)
            if method == "lpr":
                self.masks = None  # only the ratios are kept; masks are drawn at the first epoch
            else:
                self.updates.append(0)  # the mask of step 0
        elif method == "random":
            self.densities = {n: 1.0 - cfg["sparsity"] for n in prunable_weights(model)}

    def zo_grasp_masks(self) -> dict:
        """ZO-GraSP (eq. 3) on the current weights and a fresh batch; masks at ``cfg['sparsity']``."""
        scores = zo_grasp_on_batch(self.cfg, self.model, self.ds, self.gens["grasp"], self.device)
        self.grasp_calls += 1
        return {k: v.to(self.device) for k, v in prune_masks(scores, self.cfg["sparsity"]).items()}

    def masks_at(self, epoch: int, step: int):
        """The masks of step ``step`` of epoch ``epoch`` (redrawn/recomputed when the method says)."""
        t = epoch * self.steps_per_epoch + step
        if self.method in ("lpr", "random") and step == 0 and epoch % self.cfg["mask_interval"] == 0:
            self.masks = {k: v.to(self.device) for k, v in
                          random_masks(self.model, self.densities, generator=self.gens["mask"]).items()}
            self.updates.append(t)
        elif self.method == "m1" and t > 0 and t % self.period == 0:
            new = self.zo_grasp_masks()
            kept = sum(int(m.sum()) for m in self.masks.values())
            same = sum(int((m & new[k]).sum()) for k, m in self.masks.items())
            self.turnover.append(1.0 - same / kept if kept else 0.0)
            self.masks = new
            self.updates.append(t)
        return self.masks


# ----------------------------------------------------------------------------- the training loop
def _gradient(model, est, x, y, masks, bn_forward: bool) -> tuple:
    """Fill ``.grad`` (FO: backprop, then masked; ZO: Sparse-CGE on the masks), as the trainer's
    step does. Returns ``(output, loss, perturbations)``."""
    if est is None:
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        if masks is not None:
            for n, p in model.named_parameters():
                if n in masks and p.grad is not None:
                    p.grad.mul_(masks[n])
        return out.detach(), loss.item(), 0
    before = est.num_perturbations
    est.backward(x, y, masks=masks)
    if bn_forward:  # CGE leaves BatchNorm's running statistics alone: one forward updates them
        with torch.no_grad():
            model(x)
    return est.last_output, est.last_loss, est.num_perturbations - before


def _setup(cfg: dict, method: str, m1_period: int) -> tuple:
    """Data, model, generators, optimiser and mask schedule, built as the trainer builds them."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = train.resolve_device(cfg["device"])
    ds = D.load_dataset(cfg["dataset"], cfg["data_dir"], augment=cfg["augment"], seed=cfg["seed"],
                        synthetic_shape=cfg["synthetic_shape"], synthetic_n=cfg["synthetic_size"]).to(device)
    model = train.make_model(cfg, ds).to(device)
    model.train()
    gens = train.generators(cfg["seed"])
    spe = math.ceil(ds.x_train.shape[0] / cfg["batch_size"])
    opt, sched = train.build_optimizer(cfg, model, spe)
    masks = MaskSchedule(method, cfg, model, ds, gens, device, spe, m1_period)
    est, _ = train.build_estimator(cfg, model)
    return device, ds, model, gens, spe, opt, sched, masks, est


def train_loop(cfg: dict, method: str, *, m1_period: int = 0, on_step=None) -> dict:
    """Train with ``method``'s masks under the trainer's recipe (``cfg`` from ``train.parse_args``;
    ``cfg['estimator']``: fo or cge). ``on_step(model, masks)`` runs after each gradient, before
    the update. Returns a summary with the keys of ``train.run``'s plus the mask schedule's."""
    t_start = time.perf_counter()
    device, ds, model, gens, spe, opt, sched, ms, est = _setup(cfg, method, m1_period)
    bn_forward = est is not None and train.has_running_stats(model)
    bs, history, perts = cfg["batch_size"], [], 0
    for epoch in range(cfg["epochs"]):
        ep = {"loss": 0.0, "correct": 0, "n": 0, "seconds": 0.0, "perturbations": 0, "mask_seconds": 0.0}
        perm = torch.randperm(ds.x_train.shape[0], generator=gens["data"])  # masks use their own generators
        for step in range(spe):
            t0 = time.perf_counter()
            masks = ms.masks_at(epoch, step)
            ep["mask_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            idx = perm[step * bs:(step + 1) * bs]
            x = ds.prepare(ds.x_train[idx.to(ds.x_train.device)].to(device), train=True, generator=gens["aug"])
            y = ds.y_train[idx.to(ds.y_train.device)].to(device)
            opt.zero_grad(set_to_none=True)
            out, loss, k = _gradient(model, est, x, y, masks, bn_forward)
            if not math.isfinite(loss):
                raise RuntimeError(f"{method}: training diverged at epoch {epoch + 1} (loss {loss}); lower --lr")
            if on_step is not None:
                on_step(model, masks)
            opt.step()
            sched.step()
            ep["loss"] += loss * y.shape[0]
            ep["correct"] += int((out.argmax(1) == y).sum())
            ep["n"] += y.shape[0]
            ep["perturbations"] += k
            ep["seconds"] += time.perf_counter() - t0
        perts += ep["perturbations"]
        test_loss, test_acc = train.evaluate(model, ds, cfg["eval_batch_size"], device)
        history.append({"epoch": epoch + 1, "train_loss": ep["loss"] / ep["n"], "train_acc": ep["correct"] / ep["n"],
                        "test_loss": test_loss, "test_acc": test_acc, "lr": opt.param_groups[0]["lr"],
                        "seconds": ep["seconds"], "mask_seconds": ep["mask_seconds"],
                        "perturbations": ep["perturbations"]})
    return {"best_test_acc": max(h["test_acc"] for h in history), "final_test_acc": history[-1]["test_acc"],
            "history": history, "perturbations": perts, "zo_grasp_calls": ms.grasp_calls,
            "zo_grasp_queries": ms.grasp_calls * grasp_queries(cfg), "densities": ms.densities,
            "masks_used": len(ms.updates), "m1_turnover": ms.turnover,
            "wall_seconds": time.perf_counter() - t_start, "model": model}


def run_method(args, method: str, sparsity: float, seed: int) -> dict:
    """One run: the trainer for lpr/random/dense, the loop for m1/m2. Returns a CSV row (+ extras)."""
    cfg = make_cfg(args, method, sparsity, seed)
    t0 = time.perf_counter()
    if method in TRAINER_METHODS:
        s = train.run(cfg, log=lambda m: None)
        calls = 1 if cfg["sparsity_method"] == "zo_grasp" else 0
        used = sum(h["masks_redrawn"] for h in s["history"]) if cfg["sparsity_method"] != "none" else 0
        extra = {"zo_grasp_calls": calls, "masks_used": used, "m1_turnover": []}
    else:
        s = train_loop(cfg, method, m1_period=args.m1_period)
        extra = {k: s[k] for k in ("zo_grasp_calls", "masks_used", "m1_turnover")}
    wall = time.perf_counter() - t0  # setup, ZO-GraSP, training, evaluation (train.run's own excludes setup)
    secs = [h["seconds"] for h in s["history"]]
    return {"method": method, "sparsity": 0.0 if method == "dense" else sparsity, "seed": seed,
            "regime": "fo" if method == "dense" else args.regime,
            "final_test_acc": s["final_test_acc"], "best_test_acc": s["best_test_acc"],
            "final_train_loss": s["history"][-1]["train_loss"], "zo_grasp_calls": extra["zo_grasp_calls"],
            "zo_grasp_queries": s["zo_grasp_queries"], "train_perturbations": s["perturbations"],
            "masks_used": extra["masks_used"],
            "m1_mean_turnover": statistics.mean(extra["m1_turnover"]) if extra["m1_turnover"] else "",
            "step_seconds": sum(secs), "wall_seconds": wall}


# ----------------------------------------------------------------------------- outputs
def _mean_std(vals):
    m = statistics.mean(vals)
    return m, (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _cell(vals) -> str:
    m, s = _mean_std([100 * v for v in vals])
    return f"{m:.1f}" + (f" ± {s:.1f}" if len(vals) > 1 else "")


def markdown(args, rows, methods, sparsities) -> str:
    dense = [r["final_test_acc"] for r in rows if r["method"] == "dense"]
    head = ["method"] + [f"sparsity {s:g}" for s in sparsities]
    lines = [f"Final test accuracy (%), {args.regime.upper()} training with sparse gradients, {args.dataset}, "
             f"{args.model}, {args.epochs} epochs, mean ± std over {args.repeats} seed(s); dense FO: "
             f"{_cell(dense)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        lines.append("| " + " | ".join([LABELS[m]] + [_cell([r["final_test_acc"] for r in rows if r["method"] == m
                                                              and r["sparsity"] == s]) for s in sparsities]) + " |")
    lines += ["", "Cost per run (ZO-GraSP queries: 2q + 2 loss evaluations per call; wall time: setup, ZO-GraSP, "
                  "training and evaluation):", "",
              "| method | ZO-GraSP calls | ZO-GraSP queries | masks used | training perturbations | wall s |",
              "|---|---|---|---|---|---|"]
    for m in methods + ["dense"]:
        rs = [r for r in rows if r["method"] == m]
        lines.append(f"| {LABELS[m]} | {rs[0]['zo_grasp_calls']} | {rs[0]['zo_grasp_queries']:,} | "
                     f"{rs[0]['masks_used']} | {statistics.mean(r['train_perturbations'] for r in rs):,.0f} | "
                     f"{statistics.mean(r['wall_seconds'] for r in rs):.1f} |")
    turn = [r["m1_mean_turnover"] for r in rows if r["method"] == "m1" and r["m1_mean_turnover"] != ""]
    if turn:
        lines += ["", f"M1 recomputed its mask every {args.m1_period or 'epoch'}{' steps' if args.m1_period else ''}; "
                      f"each recomputation replaced {100 * statistics.mean(turn):.1f}% of the kept coordinates "
                      f"(mean over runs)."]
    return "\n".join(lines) + "\n"


def plot(args, rows, methods, sparsities, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, m in enumerate(methods):
        stats = [_mean_std([100 * r["final_test_acc"] for r in rows if r["method"] == m and r["sparsity"] == s])
                 for s in sparsities]
        ax.errorbar(sparsities, [a for a, _ in stats], yerr=[e for _, e in stats], marker="os^v"[i % 4],
                    capsize=3, label=LABELS[m])
    dm, ds_ = _mean_std([100 * r["final_test_acc"] for r in rows if r["method"] == "dense"])
    ax.axhline(dm, color="k", ls="--", label=f"{LABELS['dense']} ({dm:.1f}%)")
    if ds_:
        ax.axhspan(dm - ds_, dm + ds_, color="k", alpha=0.1)
    ax.set_xlabel("sparsity (pruning ratio of conv/linear weights)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_xticks(sparsities)
    ax.set_title(f"Fig. A3 on {args.dataset}: {args.model}, {args.regime.upper()} training with sparse gradients, "
                 f"{args.epochs} epochs", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def machine() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def write_outputs(args, rows, densities, methods, sparsities, seconds) -> None:
    with open(os.path.join(args.out, "fig_a3.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "fig_a3.json"), "w") as f:
        json.dump({"settings": vars(args), "rows": rows, "layer_densities": densities,
                   "seconds": round(seconds, 1), "machine": machine()}, f, indent=1)
    with open(os.path.join(args.out, "fig_a3.md"), "w") as f:
        f.write(markdown(args, rows, methods, sparsities))
    plot(args, rows, methods, sparsities, os.path.join(args.out, "fig_a3.png"))


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        args.sparsities, args.epochs, args.repeats = "0.7,0.95", 5, 1
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        ap.error(f"--sparsities must be comma-separated numbers, got {args.sparsities!r}")
    if not all(0 <= s < 1 for s in sparsities):
        ap.error(f"--sparsities must be in [0, 1), got {args.sparsities}")
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        ap.error(f"--methods: unknown {', '.join(bad)} (choose from {', '.join(METHODS)})")
    if args.repeats < 1 or args.m1_period < 0:
        ap.error("--repeats must be >= 1 and --m1-period >= 0")
    return args, methods, sparsities


def main(argv=None):
    args, methods, sparsities = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0, rows = time.perf_counter(), []
    seeds = range(args.seed, args.seed + args.repeats)
    densities = init_densities(args, sparsities)  # first: it also pays the one-time imports (data, engine)
    for seed in seeds:
        rows.append(run_method(args, "dense", 0.0, seed))
        print(f"seed {seed} dense FO: final test acc {100 * rows[-1]['final_test_acc']:5.1f}%", flush=True)
        for s in sparsities:
            for m in methods:
                r = run_method(args, m, s, seed)
                rows.append(r)
                print(f"seed {seed} sparsity {s:g} {m:6s}: final test acc {100 * r['final_test_acc']:5.1f}% "
                      f"(best {100 * r['best_test_acc']:5.1f}%), ZO-GraSP queries {r['zo_grasp_queries']:,}, "
                      f"{r['wall_seconds']:.1f}s", flush=True)
    write_outputs(args, rows, densities, methods, sparsities, time.perf_counter() - t0)
    print(markdown(args, rows, methods, sparsities))
    print(f"wrote {args.out}/fig_a3.{{csv,json,md,png}} in {time.perf_counter() - t0:.0f}s")
    return rows


if __name__ == "__main__":
    main()
