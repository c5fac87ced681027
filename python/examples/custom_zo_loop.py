"""Use the fused perturbation ops from your own zeroth-order loop (without deepzero_kernels.CGE).

A two-layer network trained by coordinate-wise finite differences: for each layer, one call to
``linear_perturbed`` / ``conv2d_perturbed`` evaluates the layer under many single-weight
perturbations at once (a rank-1 delta on the cached input, not one matmul per weight), and the
rest of the network runs on the batch of perturbed activations.

    python python/examples/custom_zo_loop.py            # 60 steps, about 10 s here
    python python/examples/custom_zo_loop.py --quick    # 15 steps, about 3 s here
"""
import argparse


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="ZO gradient steps (full batch of 128)")
    ap.add_argument("--mu", type=float, default=5e-3, help="finite-difference step")
    ap.add_argument("--lr", type=float, default=1.0, help="plain gradient-descent learning rate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the toy data and initial weights")
    ap.add_argument("--quick", action="store_true", help="15 steps instead of --steps (about 3 s here)")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deepzero_kernels.ops import conv2d_perturbed, linear_perturbed  # noqa: E402


def main(steps: int = 60, mu: float = 5e-3, lr: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # A toy task: is a noisy 6x6 image brighter or darker than average?
    x = torch.randn(128, 1, 6, 6, generator=g) + 0.5 * torch.randn(128, 1, 1, 1, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    conv_w = torch.randn(4, 1, 3, 3, generator=g) * 0.3
    fc_w = torch.randn(2, 4, generator=g) * 0.3
    fc_b = torch.zeros(2)

    def head(h):  # everything after the conv: relu, global average pool, linear
        return F.linear(F.relu(h).mean((-2, -1)), fc_w, fc_b)

    for step in range(steps):
        h = F.conv2d(x, conv_w, padding=1)          # cached layer output (B, 4, 6, 6)
        feats = F.relu(h).mean((-2, -1))            # cached classifier input (B, 4)
        base = F.cross_entropy(F.linear(feats, fc_w, fc_b), y, reduction="none")

        # Classifier weights: (K, B, 2) logits for all K = 8 perturbations in one call.
        idx = torch.arange(fc_w.numel())
        logits = linear_perturbed(feats, fc_w, fc_b, idx, mu)
        loss = F.cross_entropy(logits.reshape(-1, 2), y.repeat(len(idx)), reduction="none")
        g_fc = ((loss.view(len(idx), -1) - base).mean(1) / mu).view_as(fc_w)

        # Conv weights: (K, B, 4, 6, 6) perturbed conv outputs in one call, then the head.
        idx = torch.arange(conv_w.numel())
        outs = conv2d_perturbed(x, conv_w, None, idx, mu, padding=1)
        loss = F.cross_entropy(head(outs.flatten(0, 1)), y.repeat(len(idx)), reduction="none")
        g_conv = ((loss.view(len(idx), -1) - base).mean(1) / mu).view_as(conv_w)

        fc_w -= lr * g_fc
        conv_w -= lr * g_conv
        if step % 10 == 0 or step == steps - 1:
            acc = (head(F.conv2d(x, conv_w, padding=1)).argmax(1) == y).float().mean()
            print(f"step {step:3d}  loss {base.mean():.4f}  accuracy {acc:.3f}")
    return float(base.mean())


if __name__ == "__main__":
    args = build_parser().parse_args()
    main(steps=15 if args.quick else args.steps, mu=args.mu, lr=args.lr, seed=args.seed)
