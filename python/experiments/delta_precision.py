"""Accuracy of float32 CGE against the float64 naive loop (issue 14): the engine's delta arithmetic
around a float64 base pass (the default) and around the model's float32 one, the paper's loop in
float32, and both with TF32 emulated on the CPU (inputs and weights of every convolution rounded to
a 10-bit mantissa, as cuDNN does by default on NVIDIA GPUs).

For each model (train mode, random 32x32 batch) a set of coordinates is drawn from one middle
layer and from every layer; the reference is the float64 naive loop (perturb, full forward,
restore) on the float64 copy of the same parameters. Errors are relative norms over the drawn
coordinates.

    python python/experiments/delta_precision.py --quick          # ResNet-20 only, 10 s to 1.5 min here
    python python/experiments/delta_precision.py --out results/precision

Writes ``precision.json`` to ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet18,mobilenet_v2",
                    help="comma-separated model factories of deepzero_kernels.models (standard sizes)")
    ap.add_argument("--batch-size", type=int, default=16, help="size of the random 32x32 batch")
    ap.add_argument("--middle", type=int, default=16, help="coordinates drawn from the middle conv layer")
    ap.add_argument("--spread", type=int, default=16, help="coordinates drawn over all layers")
    ap.add_argument("--mu", type=float, default=5e-3, help="finite-difference step")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, the batch and the drawn coordinates")
    ap.add_argument("--backend", default="torch", help="CGE backend of the engine rows: auto, torch, triton, native")
    ap.add_argument("--quick", action="store_true",
                    help="ResNet-20 only, batch 8, 8+8 coordinates (10 s to 1.5 min here, depending on other load)")
    ap.add_argument("--out", default=None, help="folder for precision.json (None: print the table only)")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from deepzero_kernels import CGE, models  # noqa: E402

try:
    from deepzero_kernels.precision import emulated_tf32
except ImportError:  # an older checkout (before issue 14): fp32 rows only
    emulated_tf32 = None

MODELS = ("resnet20", "resnet18", "mobilenet_v2")  # factories in deepzero_kernels.models


@torch.no_grad()
def naive(model, x, y, mu, coords):
    """The definition on the drawn coordinates only: perturb in place, forward, mean loss change."""
    params = dict(model.named_parameters())
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    base = F.cross_entropy(model(x), y, reduction="none").double()
    out = []
    for name, i in coords:
        p = params[name].view(-1)
        old = p[i].clone()
        p[i] += mu
        out.append(((F.cross_entropy(model(x), y, reduction="none").double() - base).mean() / mu).item())
        p[i] = old
        for n, b in model.named_buffers():
            b.copy_(bufs[n])
    return torch.tensor(out, dtype=torch.float64)


def engine(model, x, y, mu, coords, **kw):
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for name, i in coords:
        masks[name].view(-1)[i] = True
    g = CGE(model, mu=mu, **kw).estimate(x, y, masks=masks)
    return torch.tensor([g[name].reshape(-1)[i].item() for name, i in coords], dtype=torch.float64)


def draw(model, n_middle, n_all, seed):
    """(name, flat index) pairs: n_middle from the middle conv weight, n_all spread over all weights."""
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 4]
    middle = names[len(names) // 2]
    params = dict(model.named_parameters())
    pick = lambda n, k: [(n, int(i)) for i in torch.randperm(params[n].numel(), generator=gen)[:k]]  # noqa: E731
    every = [n for n, p in model.named_parameters()]
    spread = [every[int(j)] for j in torch.randint(len(every), (n_all,), generator=gen)]
    return middle, pick(middle, n_middle), [c for n in spread for c in pick(n, 1)]


def relnorm(a, b):
    return ((a - b).norm() / b.norm()).item()


def measure(name, batch, n_middle, n_all, mu, seed, backend):
    torch.manual_seed(seed)
    model = getattr(models, name)()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    middle, mid, spread = draw(model, n_middle, n_all, seed)
    m64 = copy.deepcopy(model).double()
    row = {"model": name, "batch": batch, "mu": mu, "middle_layer": middle, "backend": backend}
    for label, coords in (("middle", mid), ("all_layers", spread)):
        t0 = time.perf_counter()
        ref = naive(m64, x.double(), y, mu, coords)
        res = {"n": len(coords), "engine_fp32": relnorm(engine(model, x, y, mu, coords, backend=backend), ref)}
        if "base_precision" in CGE.__init__.__code__.co_varnames:  # newer than the first issue-14 version
            res["engine_fp32_fp32_base"] = relnorm(
                engine(model, x, y, mu, coords, backend=backend, base_precision="model"), ref)
        res["loop_fp32"] = relnorm(naive(model, x, y, mu, coords), ref)
        if emulated_tf32 is not None:
            with emulated_tf32():
                for prec in ("tf32", "bf16"):
                    res[f"engine_{prec}_under_tf32"] = relnorm(
                        engine(model, x, y, mu, coords, backend=backend, delta_precision=prec), ref)
                res["loop_under_tf32"] = relnorm(naive(model, x, y, mu, coords), ref)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        row[label] = res
        print(name, label, json.dumps(res), flush=True)
    return row


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.batch_size, a.middle, a.spread = "resnet20", 8, 8, 8
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure(m, a.batch_size, a.middle, a.spread, a.mu, a.seed, a.backend) for m in a.models.split(",")]
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "precision.json"), "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"{'model':14} {'coords':11} " + " ".join(f"{k:>24}" for k in rows[0]["middle"] if k not in ("n", "seconds")))
    for r in rows:
        for label in ("middle", "all_layers"):
            res = r[label]
            print(f"{r['model']:14} {label:11} " + " ".join(f"{v:24.2e}" for k, v in res.items()
                                                             if k not in ("n", "seconds")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
