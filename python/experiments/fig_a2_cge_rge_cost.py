"""The paper's Fig. A2 and Tab. A1 on this engine: the cost of one gradient estimate of CGE and
RGE (q = d, as many queries as CGE) as the App. B CNN deepens, with each naive loop dissected
into the paper's four stages: (1) direction vectors (DV), (2) weight perturbation (WP), (3) model
inference (MI), (4) other arithmetic (AO).

Methods, all on the same model, batch and mu, in the same run:

* ``rge_loop``: RGE as the paper times it, one direction at a time: draw a unit direction over
  all d weights (DV), write theta + mu u into the model (WP), forward and loss (MI), accumulate
  the finite difference times u (AO). q = d directions.
* ``cge_loop``: CGE as the paper times it: the basis vector is free (DV = 0), theta_i += mu by
  indexing and restore (WP), a full forward and loss (MI), one division per coordinate (AO).
* ``cge_reference``: the paper's released strategy, the same loop forwarded from the cached input
  of the block holding the coordinate (feature reuse; ``bench/baselines.py``), total only.
* ``rge_batched``: the library's ``RGE`` (vmapped chunks of directions, q = d), total only.
* ``cge_engine``: the library's ``CGE`` (delta engine, fused kernels), total only.

The paper's Fig. A2 plots 50 epochs of CIFAR-10 training; one estimate per size is what that
curve is made of (time per epoch = steps x time per estimate), so this measures the estimate.

    python python/experiments/fig_a2_cge_rge_cost.py --quick     # about a minute here
    python python/experiments/fig_a2_cge_rge_cost.py             # depths 1-6, about 5 min here

Writes ``fig_a2.csv`` (one row per size and method), ``fig_a2.json``, ``fig_a2.md`` (Tab. A1's
layout) and ``fig_a2.png`` (Fig. A2's layout: seconds per estimate against parameters) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("rge_loop", "cge_loop", "cge_reference", "rge_batched", "cge_engine")
STAGES = ("dv", "wp", "mi", "ao")


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--depths", default="1,2,3,4,5,6", help="comma-separated depths of the App. B CNN")
    ap.add_argument("--width", type=int, default=16, help="channels of the App. B CNN")
    ap.add_argument("--batch-size", type=int, default=128, help="samples in the batch of every estimate")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--mu", type=float, default=5e-3, help="finite-difference step")
    ap.add_argument("--repeats", type=int, default=1, help="estimates timed per size and method (the median is kept)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, batch and directions")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="depths 1-3, batch 32 (about a minute here)")
    ap.add_argument("--out", default="results/fig_a2", help="folder for the outputs")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
import torch  # noqa: E402

from deepzero_kernels import CGE, RGE  # noqa: E402
from deepzero_kernels.data import load_dataset  # noqa: E402
from deepzero_kernels.models import build_model  # noqa: E402
import baselines as B  # noqa: E402  (bench/baselines.py: the paper's reference strategy)


class _Clock:
    """Seconds spent per stage."""

    def __init__(self):
        self.s = dict.fromkeys(STAGES, 0.0)

    def add(self, stage, t0):
        now = time.perf_counter()
        self.s[stage] += now - t0
        return now


@torch.no_grad()
def rge_loop(model, x, y, mu, generator):
    """RGE, q = d unit directions one at a time, with the paper's four stages timed."""
    params = [p for p in model.parameters() if p.requires_grad]
    theta = torch.nn.utils.parameters_to_vector(params).clone()
    d = theta.numel()
    clock, grad = _Clock(), torch.zeros_like(theta)
    base = B.per_sample_ce(model(x), y).mean()
    for _ in range(d):
        t = time.perf_counter()
        u = torch.randn(d, generator=generator, dtype=theta.dtype)
        u /= u.norm()
        t = clock.add("dv", t)
        torch.nn.utils.vector_to_parameters(theta + mu * u, params)
        t = clock.add("wp", t)
        diff = B.per_sample_ce(model(x), y).mean() - base
        t = clock.add("mi", t)
        grad.add_(u, alpha=float(diff) / mu)
        clock.add("ao", t)
    torch.nn.utils.vector_to_parameters(theta, params)
    return grad, clock.s  # d/q * sum over q = d directions: the unbiased scale is the plain sum


@torch.no_grad()
def cge_loop(model, x, y, mu):
    """CGE, every coordinate by a full forward, with the paper's four stages timed."""
    clock = _Clock()
    base = B.per_sample_ce(model(x), y).mean()
    grads = {}
    for name, p in model.named_parameters():
        flat, g = p.view(-1), torch.zeros(p.numel(), dtype=p.dtype)
        for i in range(flat.numel()):
            t = time.perf_counter()
            old = float(flat[i])
            flat[i] = old + mu
            t = clock.add("wp", t)
            loss = B.per_sample_ce(model(x), y).mean()
            t = clock.add("mi", t)
            flat[i] = old
            t = clock.add("wp", t)
            g[i] = (loss - base) / mu
            clock.add("ao", t)
        grads[name] = g.view(p.shape)
    return grads, clock.s


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(method, model, x, y, mu, seed):
    """``(seconds, stages or None)`` of one estimate of ``method``."""
    g = torch.Generator().manual_seed(seed)
    if method == "rge_loop":
        sec, (_, stages) = _timed(lambda: rge_loop(model, x, y, mu, g))
        return sec, stages
    if method == "cge_loop":
        sec, (_, stages) = _timed(lambda: cge_loop(model, x, y, mu))
        return sec, stages
    if method == "cge_reference":
        coords = B.all_coords(model)
        return _timed(lambda: B.reference(model, x, y, coords, mu=mu))[0], None
    if method == "rge_batched":
        d = sum(p.numel() for p in model.parameters())
        rge = RGE(model, mu=mu, q=d)
        return _timed(lambda: rge.estimate(x, y, generator=g))[0], None
    cge = CGE(model, mu=mu)
    cge.estimate(x[:2], y[:2])  # trace and build kernels once: not part of an estimate
    return _timed(lambda: cge.estimate(x, y))[0], None


def run(args):
    depths = [int(v) for v in args.depths.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; choose from {', '.join(METHODS)}")
    ds = load_dataset("digits")
    x = ds.prepare(ds.x_train[:args.batch_size], train=False)
    y = ds.y_train[:args.batch_size]
    rows = []
    for depth in depths:
        torch.manual_seed(args.seed)
        model = build_model("cnn", in_channels=1, num_classes=10, width=args.width, depth=depth)
        model.train()
        d = sum(p.numel() for p in model.parameters())
        for method in methods:
            runs = sorted((measure(method, model, x, y, args.mu, args.seed) for _ in range(args.repeats)),
                          key=lambda r: r[0])
            sec, stages = runs[len(runs) // 2]
            row = {"depth": depth, "width": args.width, "parameters": d, "queries": d, "method": method,
                   "seconds": sec, **{f"{s}_s": (stages or {}).get(s) for s in STAGES}}
            rows.append(row)
            print(f"CNN {depth}x{args.width} ({d} params) {method:13s} {sec:8.3f} s"
                  + ("  " + " ".join(f"{s.upper()} {stages[s]:.3f}" for s in STAGES) if stages else ""),
                  flush=True)
    return rows


def write(args, rows):
    import csv
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fig_a2.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    info = {"settings": {k: v for k, v in vars(args).items()}, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    with open(os.path.join(args.out, "fig_a2.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(args.out, "fig_a2.md"), "w") as f:
        f.write(markdown(rows, args))
    plot(rows, os.path.join(args.out, "fig_a2.png"), args)


def markdown(rows, args) -> str:
    """Tab. A1's layout (RGE / CGE per stage) and every method's total."""
    by = {(r["parameters"], r["method"]): r for r in rows}
    sizes = sorted({r["parameters"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = [f"Seconds per gradient estimate, App. B CNN width {args.width}, batch {args.batch_size}, "
           f"{torch.get_num_threads()} threads.\n", "| parameters | " + " | ".join(methods) + " |",
           "|---" * (len(methods) + 1) + "|"]
    for d in sizes:
        out.append(f"| {d} | " + " | ".join(f"{by[(d, m)]['seconds']:.3f}" if (d, m) in by else "" for m in methods)
                   + " |")
    if all((d, m) in by for d in sizes for m in ("rge_loop", "cge_loop")):
        out += ["", "Tab. A1's dissection, RGE (q = d) / CGE (d), seconds:", "",
                "| parameters | (1) DV | (2) WP | (3) MI | (4) AO |", "|---|---|---|---|---|"]
        for d in sizes:
            r, c = by[(d, "rge_loop")], by[(d, "cge_loop")]
            out.append(f"| {d} | " + " | ".join(f"{r[s + '_s']:.3g} / {c[s + '_s']:.3g}" for s in STAGES) + " |")
    return "\n".join(out) + "\n"


def plot(rows, path, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = {"rge_loop": "RGE, loop (paper)", "cge_loop": "CGE, loop (paper)",
              "cge_reference": "CGE, paper's feature reuse", "rge_batched": "RGE, batched (library)",
              "cge_engine": "CGE, delta engine (library)"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["parameters"])
        ax.plot([r["parameters"] for r in rs], [r["seconds"] for r in rs], "o-", label=labels.get(m, m))
    ax.set_yscale("log")
    ax.set_xlabel("model parameters d (= queries per estimate, q = d for RGE)")
    ax.set_ylabel("seconds per gradient estimate (log)")
    ax.set_title(f"Fig. A2 / Tab. A1 on digits: App. B CNN width {args.width}, batch {args.batch_size}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.depths, args.batch_size = "1,2,3", 32
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    write(args, rows)
    print(f"wrote {args.out}/fig_a2.csv, fig_a2.json, fig_a2.md, fig_a2.png")
    return rows


if __name__ == "__main__":
    main()
