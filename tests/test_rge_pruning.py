"""RGE against its naive loop, ZO-GraSP against autograd, and the mask helpers."""
import pytest
import torch
import torch.nn as nn

from deepzero_kernels import RGE, layer_densities, prune_masks, random_masks, zo_grasp_scores
from deepzero_kernels.models import MLP, SimpleCNN
from deepzero_kernels.pruning import prunable_weights, zo_hessian_gradient

from conftest import assert_bitwise_unchanged, ce, snapshot


@torch.no_grad()
def naive_rge(model, x, y, mu, u, names):
    """Eq. (1) one direction at a time: shift the parameters in place, forward, restore."""
    params = dict(model.named_parameters())
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    base = ce(model(x), y).double()
    g = torch.zeros(u.shape[1], dtype=torch.float64)
    for ui in u:
        off, saved = 0, {}
        for n in names:
            p = params[n]
            saved[n] = p.clone()
            p.add_(mu * ui[off:off + p.numel()].view(p.shape))
            off += p.numel()
        g += (ce(model(x), y).double() - base).mean() / mu * ui.double()
        for n in names:
            params[n].copy_(saved[n])
        for bn, b in model.named_buffers():
            b.copy_(bufs[bn])
    return g / u.shape[0]


@pytest.mark.parametrize("train", [True, False])
def test_rge_matches_naive_loop(train):
    model = SimpleCNN(2, 3, depth=2, width=3).double().train(train)
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    snap = snapshot(model)
    rge = RGE(model, mu=5e-3, q=7, chunk_size=3, scale="paper")
    est = rge.estimate(x, y, generator=torch.Generator().manual_seed(1))
    assert_bitwise_unchanged(model, snap)
    names = [n for n, _ in model.named_parameters()]
    u = rge.directions(names, torch.Generator().manual_seed(1))
    assert torch.allclose(u.norm(dim=1), torch.ones(7, dtype=torch.float64))
    ref = naive_rge(model, x, y, 5e-3, u, names)
    flat = torch.cat([est[n].reshape(-1) for n in names])
    torch.testing.assert_close(flat, ref, rtol=1e-9, atol=1e-13)
    assert rge.num_perturbations == 7


def test_rge_bad_q():
    with pytest.raises(ValueError, match="q"):
        RGE(MLP(4, 2), q=0)
    with pytest.raises(ValueError, match="scale"):
        RGE(MLP(4, 2), scale="biased")


def test_rge_unbiased_scale():
    """``scale="unbiased"`` (default) is eq. (1) times d: its mean over many directions
    approaches the float64 gradient; ``"paper"`` is exactly the unbiased estimate / d."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()  # d = 16 coordinates (a power of 2: / d is exact)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 4, (8,))
    params = dict(model.named_parameters())
    grad = torch.autograd.grad(ce(model(x), y).mean(), list(params.values()))
    true = torch.cat([g.reshape(-1) for g in grad])
    d, q = true.numel(), 20000
    unbiased = RGE(model, mu=1e-6, q=q, chunk_size=4000)
    assert unbiased.scale == "unbiased"
    u = unbiased.directions(list(params), torch.Generator().manual_seed(3))
    est = unbiased.estimate(x, y, directions=u)
    flat = torch.cat([est[n].reshape(-1) for n in params])
    assert float((flat - true).norm() / true.norm()) < 0.1  # sampling error ~ sqrt(d / q) = 0.03
    paper = RGE(model, mu=1e-6, q=q, chunk_size=4000, scale="paper").estimate(x, y, directions=u)
    for n in params:
        assert torch.equal(paper[n], est[n] / d), n


def _autograd_hvp(model, x, y, names, v):
    params = dict(model.named_parameters())
    loss = ce(model(x), y).mean()
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
    dot = sum((g * v[n]).sum() for g, n in zip(grads, names))
    return dict(zip(names, torch.autograd.grad(dot, [params[n] for n in names])))


def test_zo_hessian_gradient_approaches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    names = prunable_weights(model)
    d = sum(dict(model.named_parameters())[n].numel() for n in names)
    cos = []
    for q in (4, 16 * d):
        hg, g = zo_hessian_gradient(model, x, y, names=names, q=q, mu=1e-4,
                                    generator=torch.Generator().manual_seed(0))
        # With unit directions E[u u^T] = I/d: the estimate tends to H g / d.
        ref = _autograd_hvp(model, x, y, names, g)
        a = torch.cat([hg[n].reshape(-1) for n in names])
        b = torch.cat([ref[n].reshape(-1) for n in names]) / d
        cos.append((a @ b / (a.norm() * b.norm())).item())
        if q > 4:
            assert (a - b).norm() / b.norm() < 0.35
    assert cos[1] > 0.95 and cos[1] > cos[0]


def test_zo_grasp_scores_shapes_and_purity():
    model = SimpleCNN(1, 3, depth=2, width=4)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    snap = snapshot(model)
    scores = zo_grasp_scores(model, x, y, q=8, generator=torch.Generator().manual_seed(0))
    assert_bitwise_unchanged(model, snap)
    assert set(scores) == {"features.0.weight", "features.4.weight", "fc.weight"}
    for n, s in scores.items():
        assert s.shape == dict(model.named_parameters())[n].shape and torch.isfinite(s).all()
    again = zo_grasp_scores(model, x, y, q=8, generator=torch.Generator().manual_seed(0))
    for n in scores:
        assert torch.equal(scores[n], again[n])


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9, 0.999])
def test_prune_masks_exact_sparsity(sparsity):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, 3, 2, 2, generator=g), "c": torch.randn(11, generator=g)}
    masks = prune_masks(scores, sparsity)
    total = sum(s.numel() for s in scores.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round((1 - sparsity) * total)
    flat = torch.cat([s.abs().reshape(-1) for s in scores.values()])
    kept_vals = torch.cat([s.abs()[m] for s, m in zip(scores.values(), masks.values())])
    dropped = torch.cat([s.abs()[~m] for s, m in zip(scores.values(), masks.values())])
    if kept and dropped.numel():
        assert kept_vals.min() >= dropped.max()
    dens = layer_densities(masks)
    assert dens["a"] == masks["a"].sum().item() / 35
    assert flat.numel() == total


def test_random_masks_obey_densities():
    model = SimpleCNN(1, 3, depth=2, width=4)
    dens = {"features.0.weight": 0.25, "features.4.weight": 0.1, "fc.weight": 1.0}
    m1 = random_masks(model, dens, torch.Generator().manual_seed(0))
    m2 = random_masks(model, dens, torch.Generator().manual_seed(1))
    params = dict(model.named_parameters())
    for n, d in dens.items():
        assert m1[n].dtype == torch.bool and m1[n].shape == params[n].shape
        assert int(m1[n].sum()) == round(d * params[n].numel())
    assert not torch.equal(m1["features.4.weight"], m2["features.4.weight"])
    assert layer_densities(m1)["fc.weight"] == 1.0


def test_mask_helpers_bad_input():
    with pytest.raises(ValueError, match="sparsity"):
        prune_masks({"a": torch.randn(3)}, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        prune_masks({"a": torch.randn(3)}, -0.1)
    with pytest.raises(ValueError, match="non-finite"):
        prune_masks({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="unknown"):
        random_masks(MLP(4, 2), {"nope": 0.5})
    with pytest.raises(ValueError, match="densities"):
        random_masks(MLP(4, 2), {"net.1.weight": 1.5})
