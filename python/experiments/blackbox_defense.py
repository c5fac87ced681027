"""Certified black-box defense (paper section 6.2, App. G) on the embedded digits data:
denoised smoothing with a DnCNN-style denoiser in front of a classifier that is only queried.

1. Train a small CNN classifier (first order), then freeze it behind :class:`BlackBox`: NumPy
   images in, NumPy logits out, every query counted. From here on nothing differentiates it.
2. Pre-train the denoiser D with MSE on Gaussian-noised training images (Adam).
3. ZO-GraSP (eq. 3, RGE through the black box) on the pre-trained denoiser, 95 % pruning:
   the per-layer densities say which layers matter for fine-tuning.
4. Fine-tune D on the paper's loss (A2), ``E_{x,d} CE(f(D(x + d)), f(x))`` (target: the black
   box's own label of the clean image), with DeepZero: ``CGE`` on the ZO-GraSP sparse masks
   (plus, as the reference implementation does, the unmasked biases of the kept layers);
   ``loss_fn`` is the black-box NumPy tail. The white-box upper bound fine-tunes the same
   loss by backpropagating through the classifier (all of D's parameters).
5. Certify the smoothed classifier ``g(x) = argmax_c P(f(D(x + d)) = c)`` (Cohen et al. 2019:
   n0 samples select the class, n samples and a one-sided Clopper-Pearson bound give pA_lower,
   radius sigma * Phi^-1(pA_lower), abstain if pA_lower < 1/2) for: no denoiser, MSE-only,
   ZO fine-tuned, FO fine-tuned; report certified accuracy at several l2 radii.

Pixels are scaled to [0, 1]; sigma is relative to that range.

    python python/experiments/blackbox_defense.py --quick --out results/blackbox   # about a minute here
    python python/experiments/blackbox_defense.py --out results/blackbox           # < 15 min

Writes ``certified.csv``, ``certified.md``, ``results.json`` and ``certified.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sigmas", default="0.25,0.5", help="noise levels (pixels in [0, 1])")
    ap.add_argument("--radii", default="0,0.25,0.5,0.75,1.0", help="l2 radii of the certified-accuracy table")
    ap.add_argument("--zo-steps", type=int, default=150, help="fine-tuning steps (ZO and FO), batch 32")
    ap.add_argument("--pre-epochs", type=int, default=30, help="denoiser MSE pre-training epochs")
    ap.add_argument("--n0", type=int, default=100, help="Monte-Carlo samples that select the class to certify")
    ap.add_argument("--n", type=int, default=500, help="Monte-Carlo samples for certification")
    ap.add_argument("--alpha", type=float, default=0.001,
                    help="failure probability of the one-sided Clopper-Pearson bound")
    ap.add_argument("--n-test", type=int, default=None, help="certify the first N test images (None: all 360)")
    ap.add_argument("--seed", type=int, default=0, help="seed of training, noise and masks")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: half the cores, at most 4)")
    ap.add_argument("--quick", action="store_true",
                    help="first sigma only, 60 steps, n0 = 20, n = 200, 180 test images, fewer epochs "
                         "(about a minute here)")
    ap.add_argument("--out", default="results/blackbox", help="folder for certified.{csv,md,png} and results.json")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from deepzero_kernels import CGE, layer_densities, prune_masks, zo_grasp_scores  # noqa: E402
from deepzero_kernels.data import digits  # noqa: E402
from deepzero_kernels.models import SimpleCNN  # noqa: E402

METHODS = ("no denoiser", "MSE-only", "ZO fine-tuned", "FO fine-tuned")


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- data and models
def load_digits01():
    """The trainer's fixed digits split, pixels back on the [0, 1] scale (raw 0..16 / 16)."""
    d = digits()
    m, s = d.info["pixel_mean"], d.info["pixel_std"]
    return ((d.x_train * s + m) / 16).clamp(0, 1), d.y_train, ((d.x_test * s + m) / 16).clamp(0, 1), d.y_test


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017), small: conv-ReLU, (depth - 2) x conv-BN-ReLU, conv; residual
    output ``x - noise_estimate(x)``."""

    def __init__(self, depth: int = 5, width: int = 16):
        super().__init__()
        layers = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x - self.body(x)


class BlackBox:
    """A classifier the defender can only query: images (tensor or array) in, NumPy logits out.
    Counts queries (calls) and queried images."""

    def __init__(self, net: nn.Module):
        self._net = net.eval()
        for p in self._net.parameters():
            p.requires_grad_(False)
        self.calls = 0
        self.images = 0

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        self.calls += 1
        self.images += x.shape[0]
        return self._net(x).numpy()


def numpy_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy in NumPy (float64, log-sum-exp stabilised)."""
    z = logits.astype(np.float64)
    m = z.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(1))
    return lse - z[np.arange(z.shape[0]), labels]


def a2_tail(bb: BlackBox):
    """Loss (A2) as the engine's black-box tail: CE(f(denoised), f(clean)) per sample."""
    def loss_fn(denoised, labels):
        return numpy_ce(bb(denoised.cpu().numpy()), labels.cpu().numpy())
    return loss_fn


def batches(n, bs, gen):
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + bs] for i in range(0, n, bs)]


def train_classifier(xtr, ytr, xte, yte, *, epochs, width, seed):
    torch.manual_seed(seed)
    net = SimpleCNN(1, 10, depth=2, width=width)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in batches(len(xtr), 64, gen):
            opt.zero_grad()
            F.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    return net, acc


def pretrain_denoiser(xtr, sigma, *, epochs, depth, width, seed):
    torch.manual_seed(seed)
    den = DnCNN(depth, width)
    opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        den.train()
        for idx in batches(len(xtr), 64, gen):
            x = xtr[idx]
            noisy = x + sigma * torch.randn(x.shape, generator=gen)
            opt.zero_grad()
            F.mse_loss(den(noisy), x).backward()
            opt.step()
        sched.step()
    return den.eval()


@torch.no_grad()
def a2_loss(den, bb, x, labels, sigma, gen) -> float:
    """Mean loss (A2) on (x, labels) with fresh noise from ``gen`` (same gen state -> same noise)."""
    noisy = x + sigma * torch.randn(x.shape, generator=gen)
    return float(numpy_ce(bb(den(noisy).numpy()), labels.numpy()).mean())


def finetune(den, x, labels, sigma, *, method, steps, batch_size, lr, seed, bb, white_box=None,
             masks=None, dense=(), mu=5e-3, say=log):
    """Fine-tune ``den`` (eval mode: BatchNorm keeps its pre-trained statistics) on loss (A2).
    ``zo``: CGE through the black-box tail on ``masks`` plus the parameters ``dense``; all other
    parameters are frozen. ``fo``: Adam on backprop through ``white_box`` (every parameter).
    Returns ``{"loss_history": per-step mean losses}``, plus query counts for ``zo``."""
    den.eval()
    gen = torch.Generator().manual_seed(seed)
    history = []
    if method == "zo":
        trainable = set(masks) | set(dense)
        for n, p in den.named_parameters():
            p.requires_grad_(n in trainable)
        cge = CGE(den, loss_fn=a2_tail(bb), mu=mu)
    params = [p for p in den.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0, order, every = time.perf_counter(), [], max(1, steps // 5)
    for step in range(steps):
        if not order:
            order = batches(len(x), batch_size, gen)
        idx = order.pop()
        noisy = x[idx] + sigma * torch.randn(x[idx].shape, generator=gen)
        opt.zero_grad()
        if method == "zo":
            cge.backward(noisy, labels[idx], masks)
            history.append(cge.last_loss)
        else:
            loss = F.cross_entropy(white_box(den(noisy)), labels[idx])
            loss.backward()
            history.append(loss.item())
        opt.step()
        sched.step()
        if (step + 1) % every == 0:
            say(f"    {method} step {step + 1}/{steps}: loss (A2) {np.mean(history[-every:]):.4f} "
                f"({time.perf_counter() - t0:.1f} s)")
    for p in den.parameters():
        p.requires_grad_(True)
    info = {"loss_history": history}
    if method == "zo":
        info.update(queries=cge.num_queries, queried_samples=cge.num_queried_samples,
                    coords_per_step=int(sum(int(m.sum()) for m in masks.values())
                                        + sum(dict(den.named_parameters())[n].numel() for n in dense)))
    return info


# ----------------------------------------------------------------------------- certification
def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion."""
    from scipy.stats import beta
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


@torch.no_grad()
def class_counts(classify, x, sigma, n, gen, chunk=4096):
    """``(G, 10)`` counts of the base classifier's labels on n noisy copies of each image."""
    g = x.shape[0]
    counts = torch.zeros(g, 10, dtype=torch.long)
    per = max(1, chunk // g)
    done = 0
    while done < n:
        m = min(per, n - done)
        noisy = x.unsqueeze(1) + sigma * torch.randn((g, m) + tuple(x.shape[1:]), generator=gen)
        pred = classify(noisy.reshape((g * m,) + tuple(x.shape[1:]))).reshape(g, m)
        counts += F.one_hot(pred, 10).sum(1)
        done += m
    return counts


def certify(classify, x, y, sigma, *, n0, n, alpha, seed, group=16, label=""):
    """Cohen et al.'s CERTIFY for every test image. Returns (predictions (-1 = abstain), radii)."""
    from scipy.stats import norm
    gen = torch.Generator().manual_seed(seed)  # same noise for every method
    preds, radii = [], []
    t0 = time.perf_counter()
    for lo in range(0, len(x), group):
        xs = x[lo:lo + group]
        c_hat = class_counts(classify, xs, sigma, n0, gen).argmax(1)
        counts = class_counts(classify, xs, sigma, n, gen)
        for i in range(xs.shape[0]):
            k = int(counts[i, c_hat[i]])
            p_lower = clopper_pearson_lower(k, n, alpha)
            if p_lower < 0.5:
                preds.append(-1)
                radii.append(0.0)
            else:
                preds.append(int(c_hat[i]))
                radii.append(sigma * float(norm.ppf(p_lower)))
        if (lo // group) % 8 == 7:
            log(f"    certify {label}: {lo + xs.shape[0]}/{len(x)} ({time.perf_counter() - t0:.1f} s)")
    return np.array(preds), np.array(radii)


def certified_accuracy(preds, radii, y, r) -> float:
    return float(((preds == y) & (radii >= r)).mean())


# ----------------------------------------------------------------------------- the experiment
def run_experiment(*, sigmas=(0.25,), clf_epochs=20, clf_width=16, seed=0, verbose=True, **kw):
    """Train the black-box classifier once, then run the defense pipeline for each sigma
    (:func:`run_sigma`, which takes the remaining keywords). Returns a list of per-sigma dicts."""
    say = log if verbose else (lambda m: None)
    xtr, ytr, xte, yte = load_digits01()
    t = time.perf_counter()
    net, clean_acc = train_classifier(xtr, ytr, xte, yte, epochs=clf_epochs, width=clf_width, seed=seed)
    bb = BlackBox(net)
    dt = time.perf_counter() - t
    say(f"black-box classifier (App. B CNN 2x{clf_width}): clean test accuracy {clean_acc:.3f} ({dt:.1f} s)")
    out = []
    for sigma in sigmas:
        res = run_sigma(bb, (xtr, ytr, xte, yte), sigma=sigma, seed=seed, say=say, **kw)
        res.update(classifier_clean_accuracy=clean_acc, classifier_seconds=dt)
        out.append(res)
    return out


def run_sigma(bb, data, *, sigma, radii=(0.0, 0.25, 0.5, 0.75, 1.0), den_depth=5, den_width=16, pre_epochs=30,
              grasp_q=192, sparsity=0.95, zo_steps=150, fo_steps=None, batch_size=32, zo_lr=1e-2, fo_lr=1e-3,
              mu=5e-3, n_test=None, n0=100, n=500, alpha=0.001, seed=0, certify_methods=METHODS, say=log):
    """Denoiser pre-training, ZO-GraSP, ZO and FO fine-tuning and certification at one sigma."""
    fo_steps = zo_steps if fo_steps is None else fo_steps
    res = {"sigma": sigma, "config": {k: v for k, v in locals().items()
                                      if k not in ("bb", "data", "say", "certify_methods")}}
    res["config"]["radii"] = list(radii)
    timings = res["seconds"] = {}
    xtr, ytr, xte, yte = data
    if n_test is not None:
        xte, yte = xte[:n_test], yte[:n_test]
    # (A2)'s targets: the black box's labels of the clean training images (one batched query).
    labels = torch.from_numpy(bb(xtr.numpy()).argmax(1))

    t = time.perf_counter()
    den_mse = pretrain_denoiser(xtr, sigma, epochs=pre_epochs, depth=den_depth, width=den_width, seed=seed)
    timings["pretrain"] = time.perf_counter() - t
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 7)
        noisy = xte + sigma * torch.randn(xte.shape, generator=g)
        res["test_mse_noisy"] = F.mse_loss(noisy, xte).item()
        res["test_mse_denoised"] = F.mse_loss(den_mse(noisy), xte).item()
    say(f"[sigma={sigma}] denoiser MSE pre-training: test MSE {res['test_mse_noisy']:.4f} -> "
        f"{res['test_mse_denoised']:.4f} ({timings['pretrain']:.1f} s)")

    # ZO-GraSP through the black box on the pre-trained denoiser.
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(seed + 2)
    idx = torch.randperm(len(xtr), generator=gen)[:batch_size]
    noisy = xtr[idx] + sigma * torch.randn(xtr[idx].shape, generator=gen)
    scores = zo_grasp_scores(den_mse, noisy, labels[idx], q=grasp_q, mu=mu, loss_fn=a2_tail(bb),
                             generator=torch.Generator().manual_seed(seed + 3))
    masks = prune_masks(scores, sparsity)
    dens = layer_densities(masks)
    timings["zo_grasp"] = time.perf_counter() - t
    res["zo_grasp_densities"] = dens
    res["zo_grasp_kept"] = {k: int(m.sum()) for k, m in masks.items()}
    say(f"[sigma={sigma}] ZO-GraSP ({sparsity:.0%} pruned, q={grasp_q}, {timings['zo_grasp']:.1f} s): "
        + ", ".join(f"{k} {v:.1%}" for k, v in dens.items()))
    # Biases of the layers that keep weights are fine-tuned densely (cheap, as in the reference code).
    params = dict(den_mse.named_parameters())
    dense = [k.replace(".weight", ".bias") for k, m in masks.items()
             if m.any() and k.replace(".weight", ".bias") in params]
    masks = {k: m for k, m in masks.items() if m.any()}

    # Common held-out measure of (A2): the test images, fixed noise.
    def heldout(den):
        return a2_loss(den, bb, xte, torch.from_numpy(bb(xte.numpy()).argmax(1)), sigma,
                       torch.Generator().manual_seed(seed + 11))
    res["a2_test"] = {"MSE-only": heldout(den_mse)}

    import copy
    den_zo = copy.deepcopy(den_mse)
    t = time.perf_counter()
    say(f"[sigma={sigma}] ZO fine-tuning (sparse CGE, black-box tail): {zo_steps} steps")
    q0 = (bb.calls, bb.images)
    zo = finetune(den_zo, xtr, labels, sigma, method="zo", steps=zo_steps, batch_size=batch_size, lr=zo_lr,
                  seed=seed + 4, bb=bb, masks=masks, dense=dense, mu=mu, say=say)
    timings["zo_finetune"] = time.perf_counter() - t
    zo["black_box_calls"], zo["black_box_images"] = bb.calls - q0[0], bb.images - q0[1]
    res["zo"] = zo
    res["a2_test"]["ZO fine-tuned"] = heldout(den_zo)

    den_fo = copy.deepcopy(den_mse)
    t = time.perf_counter()
    say(f"[sigma={sigma}] FO fine-tuning (white-box upper bound): {fo_steps} steps")
    fo = finetune(den_fo, xtr, labels, sigma, method="fo", steps=fo_steps, batch_size=batch_size, lr=fo_lr,
                  seed=seed + 4, bb=bb, white_box=bb._net, say=say)
    timings["fo_finetune"] = time.perf_counter() - t
    res["fo"] = fo
    res["a2_test"]["FO fine-tuned"] = heldout(den_fo)
    say(f"[sigma={sigma}] held-out loss (A2): " + ", ".join(f"{k} {v:.4f}" for k, v in res["a2_test"].items()))

    classifiers = {
        "no denoiser": lambda z: torch.from_numpy(bb(z.numpy()).argmax(1)),
        "MSE-only": lambda z: torch.from_numpy(bb(den_mse(z).numpy()).argmax(1)),
        "ZO fine-tuned": lambda z: torch.from_numpy(bb(den_zo(z).numpy()).argmax(1)),
        "FO fine-tuned": lambda z: torch.from_numpy(bb(den_fo(z).numpy()).argmax(1)),
    }
    res["certified"] = {}
    y = yte.numpy()
    for name in certify_methods:
        t = time.perf_counter()
        preds, rads = certify(classifiers[name], xte, yte, sigma, n0=n0, n=n, alpha=alpha, seed=seed + 5,
                              label=name)
        timings[f"certify {name}"] = time.perf_counter() - t
        res["certified"][name] = {str(r): certified_accuracy(preds, rads, y, r) for r in radii}
        res["certified"][name]["abstain"] = float((preds == -1).mean())
        say(f"[sigma={sigma}] certified {name:14s}: " + "  ".join(
            f"r={r}: {res['certified'][name][str(r)]:.3f}" for r in radii)
            + f"  ({timings[f'certify {name}']:.1f} s)")
    return res


# ----------------------------------------------------------------------------- output
def write_outputs(results, out):
    os.makedirs(out, exist_ok=True)
    rows = []
    for res in results:
        radii = res["config"]["radii"]
        for name, ca in res["certified"].items():
            rows.append({"sigma": res["sigma"], "method": name, **{f"r={r}": ca[str(r)] for r in radii},
                         "abstain": ca["abstain"], "a2_test_loss": res["a2_test"].get(name, float("nan"))})
    with open(os.path.join(out, "certified.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    keys = [k for k in rows[0] if k.startswith("r=")]
    lines = ["| sigma | method | " + " | ".join(keys) + " | abstain | loss (A2), test |",
             "|---" * (len(keys) + 4) + "|"]
    for r in rows:
        lines.append(f"| {r['sigma']} | {r['method']} | " + " | ".join(f"{100 * r[k]:.1f} %" for k in keys)
                     + f" | {100 * r['abstain']:.1f} % | " + ("—" if math.isnan(r["a2_test_loss"])
                                                            else f"{r['a2_test_loss']:.3f}") + " |")
    with open(os.path.join(out, "certified.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    slim = [{k: v for k, v in r.items()} for r in results]
    for r in slim:
        for m in ("zo", "fo"):
            if m in r:
                r[m] = dict(r[m], loss_history=[float(v) for v in r[m]["loss_history"]])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(slim, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        radii = res["config"]["radii"]
        for name, ca in res["certified"].items():
            ax.plot(radii, [100 * ca[str(r)] for r in radii], marker="o", label=name)
        ax.set_xlabel("l2 radius r")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_title(f"digits, sigma = {res['sigma']}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "certified.png"), dpi=120)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None):
    a = build_parser().parse_args(argv)
    # 8x8 images make small convolutions: more threads mostly add barrier stalls, and a shared
    # machine's other half stays free.
    torch.set_num_threads(a.threads or max(1, min(4, (os.cpu_count() or 1) // 2)))
    kw = dict(zo_steps=a.zo_steps, pre_epochs=a.pre_epochs, n0=a.n0, n=a.n, alpha=a.alpha, n_test=a.n_test,
              seed=a.seed, radii=tuple(float(r) for r in a.radii.split(",")))
    sigmas = [float(s) for s in a.sigmas.split(",")]
    if a.quick:
        sigmas = sigmas[:1]
        kw.update(zo_steps=60, pre_epochs=15, clf_epochs=10, grasp_q=64, n0=20, n=200, n_test=180)
    t0 = time.perf_counter()
    results = run_experiment(sigmas=sigmas, **kw)
    table = write_outputs(results, a.out)
    print(table)
    print(f"total {time.perf_counter() - t0:.1f} s; wrote {a.out}/certified.{{csv,md,png}} and results.json")
    return results


if __name__ == "__main__":
    main()
