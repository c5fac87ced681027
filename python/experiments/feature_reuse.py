"""The paper's Fig. 3 question on this engine: CGE training time with and without feature reuse,
with and without the delta engine, on the same model, data and coordinates.

Four ways to compute the same (sparse) CGE gradient, each used for a few SGD steps:

* ``loop``            -- the paper's baseline without reuse: for each coordinate, perturb the
                         weight in place, run the whole network from its input, restore;
* ``loop+reuse``      -- the paper's feature reuse, eq. (4): the same loop, but the forward starts
                         from the cached input of the block that holds the coordinate;
* ``batched``         -- no delta rules, no reuse: the engine's batched functional evaluation of
                         chunks of perturbed models from the network input (its fallback path);
* ``delta-engine``    -- this project's CGE (traced graph, typed deltas from the perturbed layer
                         on, i.e. feature reuse at layer granularity, batched suffix, closed-form
                         last layer).

First-order backprop of the same model is timed as the reference. All CGE variants start from
the same weights and masks, and the script checks that their gradients agree.

    python python/experiments/feature_reuse.py --quick --out results/feature_reuse   # about 15 s here
    python python/experiments/feature_reuse.py --model resnet20 --dataset synthetic --sparsity 0.999
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dataset", choices=("digits", "synthetic"), default="digits",
                    help="digits: embedded 8x8 digits; synthetic: 3x32x32 Gaussian class clusters")
    ap.add_argument("--model", choices=("cnn", "resnet20"), default="cnn",
                    help="cnn: App. B CNN (--depth, --width); resnet20: standard size")
    ap.add_argument("--depth", type=int, default=2, help="conv blocks of the cnn")
    ap.add_argument("--width", type=int, default=16, help="channels of the cnn")
    ap.add_argument("--sparsity", type=float, default=0.5,
                    help="fraction of conv/linear weights not estimated (uniform random masks)")
    ap.add_argument("--batch-size", type=int, default=128, help="training batch size")
    ap.add_argument("--steps", type=int, default=4, help="SGD steps timed per method")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9, weight decay 5e-4)")
    ap.add_argument("--mu", type=float, default=5e-3, help="finite-difference step")
    ap.add_argument("--methods", default="loop,loop+reuse,batched,delta-engine,fo",
                    help="comma-separated, from: loop, loop+reuse, batched, delta-engine, fo (backprop)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true",
                    help="3 steps of a width-8 CNN (about 15 s here, longer on busy cores)")
    ap.add_argument("--out", default="results/feature_reuse", help="folder for feature_reuse.csv, .json and .png")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from deepzero_kernels import data as D  # noqa: E402
from deepzero_kernels.models import CifarResNet, SimpleCNN, build_model  # noqa: E402


# ----------------------------------------------------------------------------- blocks for reuse
def blocks_of(model: nn.Module):
    """``[(fn, [param names])]`` whose composition is ``model.forward``: the granularity at which
    the paper caches inputs (one conv block / residual block at a time)."""
    if isinstance(model, SimpleCNN):
        feats = list(model.features)
        out = []
        for k in range(0, len(feats), 4):
            seq = nn.Sequential(*feats[k:k + 4])
            out.append((seq, [f"features.{k + j}.{n}" for j in range(4) for n, _ in feats[k + j].named_parameters()]))
        out.append((lambda h: model.fc(model.flatten(model.pool(h))), ["fc.weight", "fc.bias"]))
        return out
    if isinstance(model, CifarResNet):
        out = [(lambda h: F.relu(model.bn1(model.conv1(h))), ["conv1.weight", "bn1.weight", "bn1.bias"])]
        for lname in ("layer1", "layer2", "layer3"):
            for i, blk in enumerate(getattr(model, lname)):
                out.append((blk, [f"{lname}.{i}.{n}" for n, _ in blk.named_parameters()]))
        out.append((lambda h: model.fc(model.pool(h).flatten(1)), ["fc.weight", "fc.bias"]))
        return out
    return [(model, [n for n, _ in model.named_parameters()])]


@torch.no_grad()
def loop_cge(model, x, y, mu, masks, reuse: bool):
    """The paper's per-coordinate loop: perturb one weight in place, forward (from the block's
    cached input if ``reuse``, else from ``x``), per-sample loss difference, restore."""
    params = dict(model.named_parameters())
    saved_buffers = {n: b.clone() for n, b in model.named_buffers()}
    blocks = blocks_of(model)
    inputs, h = [], x
    for fn, _ in blocks:
        inputs.append(h)
        h = fn(h)
    base = F.cross_entropy(h, y, reduction="none").double()
    grads, count = {}, 0
    for bi, (_, names) in enumerate(blocks):
        start = bi if reuse else 0
        for name in names:
            p = params[name]
            flat = p.view(-1)
            g = torch.zeros(p.numel(), dtype=torch.float64)
            m = masks.get(name)
            idx = range(p.numel()) if m is None else m.reshape(-1).nonzero().squeeze(1).tolist()
            for i in idx:
                old = flat[i].clone()
                flat[i] += mu
                h = inputs[start]
                for fn, _ in blocks[start:]:
                    h = fn(h)
                flat[i] = old
                g[i] = (F.cross_entropy(h, y, reduction="none").double() - base).mean() / mu
                count += 1
            grads[name] = g.to(p.dtype).reshape(p.shape)
    for n, b in model.named_buffers():  # the loop's train-mode forwards moved BN running stats
        b.copy_(saved_buffers[n])
    return grads, count


# ----------------------------------------------------------------------------- timing
def train_steps(method, model, ds, masks, args, gen_seed):
    """``args.steps`` SGD steps with ``method``; returns (seconds of gradient work, #perturbations,
    first step's gradient)."""
    import deepzero_kernels as dz
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(gen_seed)
    est = None
    if method in ("delta-engine", "batched"):
        # "batched": the engine's functional path (batched whole-model calls from the input, no delta rules)
        est = dz.CGE(model, mu=args.mu, strategy="functional" if method == "batched" else "delta")
    seconds, perts, first = 0.0, 0, None
    if est is not None:  # untimed warm-up: tracing and first-call allocation are one-off costs
        idx = torch.randperm(ds.x_train.shape[0], generator=torch.Generator().manual_seed(99))[:args.batch_size]
        est.estimate(ds.prepare(ds.x_train[idx], train=False), ds.y_train[idx], masks=masks)
    for step in range(args.steps):
        idx = torch.randperm(ds.x_train.shape[0], generator=g)[:args.batch_size]
        x, y = ds.prepare(ds.x_train[idx], train=False), ds.y_train[idx]
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if method == "fo":
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            n = 0
        elif est is not None:
            n0 = est.num_perturbations
            grads = est.backward(x, y, masks=masks)
            n = est.num_perturbations - n0
        else:
            grads, n = loop_cge(model, x, y, args.mu, masks, reuse=(method == "loop+reuse"))
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
        seconds += time.perf_counter() - t0
        perts += n
        if first is None:
            first = {k: v.detach().clone() for k, v in grads.items()}
        with torch.no_grad():
            if method != "fo":
                model(x)  # BN running statistics, as the trainer does
        opt.step()
    return seconds, perts, first


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 0 <= args.sparsity < 1:
        ap.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.quick:
        args.steps, args.width = 3, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    import deepzero_kernels as dz

    ds = D.digits() if args.dataset == "digits" else D.synthetic((3, 32, 32), n_train=512, n_test=64)
    torch.manual_seed(0)
    model0 = build_model(args.model, in_channels=ds.in_channels, num_classes=10, image_size=ds.image_size,
                         depth=args.depth, width=args.width).train()
    masks = {}
    if args.sparsity > 0:
        dens = {n: 1 - args.sparsity for n in dz.pruning.prunable_weights(model0)}
        masks = dz.random_masks(model0, dens, generator=torch.Generator().manual_seed(1))
    rows, ref = [], None
    print(f"{args.model} on {args.dataset}: {sum(p.numel() for p in model0.parameters())} parameters, "
          f"sparsity {args.sparsity}, batch {args.batch_size}, {args.steps} steps per method, "
          f"{torch.get_num_threads()} threads")
    for method in args.methods.split(","):
        model = copy.deepcopy(model0)
        secs, perts, first = train_steps(method, model, ds, masks, args, gen_seed=2)
        row = {"method": method, "seconds_per_step": secs / args.steps, "perturbations_per_step": perts // args.steps,
               "perturbations_per_s": perts / secs if perts else None}
        if method != "fo":
            if ref is None:
                ref = first
            err = max(float((first[k].double() - ref[k].double()).abs().max()) for k in ref)
            scale = max(float(ref[k].double().abs().max()) for k in ref)
            row["max_grad_diff_vs_first"] = err / max(scale, 1e-30)
        rows.append(row)
        print(f"  {method:13s} {row['seconds_per_step']:8.3f} s/step  "
              + (f"{row['perturbations_per_s']:9.0f} pert/s" if perts else " " * 16)
              + (f"  rel. grad diff {row['max_grad_diff_vs_first']:.1e}" if "max_grad_diff_vs_first" in row else ""),
              flush=True)
    base = {r["method"]: r["seconds_per_step"] for r in rows}
    for r in rows:
        if "loop" in base:
            r["speedup_vs_loop"] = base["loop"] / r["seconds_per_step"]
        if "fo" in base:
            r["ratio_to_fo"] = r["seconds_per_step"] / base["fo"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "feature_reuse.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}, key=lambda k: k != "method"))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "feature_reuse.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print("speed-up vs loop: " + ", ".join(f"{r['method']} {r.get('speedup_vs_loop', float('nan')):.1f}x"
                                          for r in rows))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["method"] for r in rows], [r["seconds_per_step"] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("seconds per training step")
        ax.set_title(f"CGE step time, {args.model} on {args.dataset}, sparsity {args.sparsity}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "feature_reuse.png"), dpi=100)
    except ImportError:
        pass
    print(f"wrote {args.out}/feature_reuse.csv, .json, .png")
    return rows


if __name__ == "__main__":
    main()
