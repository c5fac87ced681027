"""Shared test helpers: the naive definitions every fast path is checked against."""
import os

import pytest
import torch
import torch.nn.functional as F

# Without a GPU, Triton kernels run in its CPU interpreter; Triton reads this when first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The tests use tiny tensors: intra-op threads only add barrier overhead (and stall badly when
# other processes share the cores).
torch.set_num_threads(1)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str):
    """A script of the repository (``python/experiments/x.py``, ``bench/plot.py``) as a module,
    without running its ``__main__`` block."""
    import importlib.util
    path = os.path.join(ROOT, relpath)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


@torch.no_grad()
def naive_cge(model, x, y, mu, loss_fn=None, masks=None):
    """The definition: perturb one coordinate in place, full forward in the same mode, mean of
    per-sample loss differences, restore. Buffers (BN running stats) are restored too."""
    loss_fn = loss_fn or ce
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    base = loss_fn(model(x), y).double()
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = torch.zeros(p.numel(), dtype=torch.float64)
        m = None if masks is None or n not in masks else masks[n].reshape(-1)
        for i in range(p.numel()):
            if m is not None and not m[i]:
                continue
            old = p.view(-1)[i].clone()
            p.view(-1)[i] += mu
            g[i] = (loss_fn(model(x), y).double() - base).mean() / mu
            p.view(-1)[i] = old
            for bn, b in model.named_buffers():
                b.copy_(bufs[bn])
        out[n] = g.view(p.shape)
    return out


def rel_err(est: dict, ref: dict) -> float:
    """Largest per-parameter relative error (norm). A parameter whose true gradient is zero (a
    bias before a train-mode BatchNorm) is judged against 1e-3 of the whole gradient's norm:
    the naive loop's own rounding noise (~1e-16 * loss / mu) dominates there."""
    total = sum(r.double().square().sum() for r in ref.values()).sqrt().item()
    worst = 0.0
    for n, r in ref.items():
        e = est[n].double()
        scale = max(r.norm().item(), 1e-3 * total, 1e-300)
        worst = max(worst, (e - r).norm().item() / scale)
    return worst


def snapshot(model):
    return {k: v.detach().clone() for k, v in list(model.state_dict().items())}


def assert_bitwise_unchanged(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
