"""Train your own model on your own data with the DeepZero trainer, from the command line.

The trainer imports ``--model package.module:factory`` and ``--dataset package.module:factory``
(or reads ``--dataset file.npz`` / ``file.pt`` holding ``x_train, y_train, x_test, y_test``). Run
from this directory (``python -m`` puts it on the import path)::

    cd python/examples
    python -m deepzero_kernels.train --model own_model_and_data:make_model \\
        --dataset own_model_and_data:make_data --epochs 5 --sparsity 0.5 --batch-size 64

or write the data once and train on the file::

    python own_model_and_data.py --write-npz my_data.npz
    python -m deepzero_kernels.train --model own_model_and_data:make_model --dataset my_data.npz

``make_model`` receives those of ``num_classes``, ``in_channels`` and ``image_size`` its signature
names (from the data); ``make_data`` returns the four tensors (a dict, a tuple, or a
``deepzero_kernels.data.Dataset``). Labels are integer classes; inputs float ``(N, C, H, W)``.

Run as a script, this file only writes the data file (a few seconds), so it has no ``--quick``:
the training is the trainer's command above (``--epochs 1`` for a short run).
"""
import argparse


def build_parser():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="As a script this file only writes make_data() to an .npz file (a few seconds), so it "
               "has no --quick. Train with: cd python/examples && python -m deepzero_kernels.train "
               "--model own_model_and_data:make_model --dataset own_model_and_data:make_data "
               "(see the module docstring).")
    ap.add_argument("--write-npz", metavar="FILE", required=True, help="write make_data() to FILE (.npz)")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class TinyNet(nn.Module):
    """A small CNN with a squeeze-excitation gate and a residual branch: user code, no registration."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.branch = nn.Conv2d(width, width, 3, padding=1)
        self.gate = nn.Linear(width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        g = torch.sigmoid(self.gate(h.mean([2, 3])))[:, :, None, None]
        h = h + F.relu(self.branch(h)) * g
        return self.head(h.mean([2, 3]))


def make_model(num_classes: int, in_channels: int) -> nn.Module:
    return TinyNet(in_channels, num_classes)


def make_data(n_train: int = 384, n_test: int = 128, classes: int = 4, seed: int = 0) -> dict:
    """Four classes of 1x12x12 images: a bright bar in one of four orientations, plus noise."""
    g = np.random.default_rng(seed)

    def images(n):
        y = g.integers(0, classes, n)
        x = g.normal(0.0, 0.3, (n, 1, 12, 12)).astype(np.float32)
        for i, c in enumerate(y):
            if c == 0:
                x[i, 0, 5:7, :] += 1.0
            elif c == 1:
                x[i, 0, :, 5:7] += 1.0
            elif c == 2:
                x[i, 0][np.eye(12, dtype=bool)] += 1.0
            else:
                x[i, 0][np.fliplr(np.eye(12, dtype=bool))] += 1.0
        return x, y

    x_train, y_train = images(n_train)
    x_test, y_test = images(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "num_classes": classes}


if __name__ == "__main__":
    args = build_parser().parse_args()
    np.savez(args.write_npz, **make_data())
    print(f"wrote {args.write_npz}")
