"""Correctness of the baselines against each other, in float64 on tiny models (runs with plain
``pytest bench/``; skipped by ``--benchmark-only``)."""
from __future__ import annotations

import copy

import pytest
import torch

import baselines as B
from deepzero_kernels.models import MLP, SimpleCNN, resnet20


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        return SimpleCNN(3, 10, depth=2, width=4), (4, 3, 8, 8)
    if kind == "resnet":
        return resnet20(widths=(4, 8, 8)), (4, 3, 8, 8)
    return MLP(48, 10, hidden=(8, 8)), (4, 3, 4, 4)


@pytest.mark.parametrize("kind", ["cnn", "resnet", "mlp"])
@pytest.mark.parametrize("train", [True, False])
def test_baselines_agree_float64(kind, train):
    model, shape = _tiny(kind)
    model = model.double().train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (shape[0],), generator=g)
    # the blocks compose to the model
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        h = x
        for b in B.decompose(model):
            h = b.fn(h)
        model.load_state_dict(state)  # the block pass updated BN running stats in train mode
        torch.testing.assert_close(h, model(x), rtol=1e-12, atol=1e-12)
    model.load_state_dict(state)
    coords = B.sample_coords(model, 3, seed=0)
    r = B.reference(model, x, y, coords)
    n = B.no_reuse(model, x, y, coords)
    v = B.vmap_cge(model, x, y, coords, chunk=4)
    torch.testing.assert_close(n, r, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(v, r, rtol=1e-9, atol=1e-11)
    # parameters and buffers restored
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k
    # the finite differences approximate the first-order gradient
    fo = B.gather(B.first_order(model, x, y), coords)
    assert torch.nn.functional.cosine_similarity(fo, r, dim=0) > 0.98
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k


def test_rge_loop_matches_directional_derivatives():
    model, shape = _tiny("cnn")
    model = model.double().train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (shape[0],), generator=g)
    # with coordinate directions, RGE's loop is CGE on those coordinates
    coords = B.sample_coords(model, 2, seed=0)
    params = dict(model.named_parameters())
    dirs = []
    for n, i in coords:
        u = {m: torch.zeros_like(p) for m, p in params.items()}
        u[n].view(-1)[i] = 1.0
        dirs.append(u)
    rg = B.rge_loop(model, x, y, dirs)
    r = B.reference(model, x, y, coords)
    torch.testing.assert_close(B.gather(rg, coords) * len(coords), r, rtol=1e-9, atol=1e-11)


def test_block_flops_resnet20():
    model = resnet20()
    flops, blocks = B.block_flops(model, torch.randn(1, 3, 32, 32))
    assert len(blocks) == 11
    # ResNet-20: about 41 M multiply-adds per 32x32 image
    assert 80e6 < sum(flops) < 84e6


def test_matmul_flops_counts_what_runs_and_keeps_the_engine_on_its_path():
    """``workloads.matmul_flops``: a conv and a linear by their formulas (2 x multiply-adds); around
    an estimate, the engine still runs its delta rules (``FlopCounterMode`` would not let it)."""
    import torch.nn as nn
    import workloads as W
    conv, lin = nn.Conv2d(3, 5, 3, padding=1), nn.Linear(7, 2)
    x = torch.randn(4, 3, 6, 6)
    assert W.matmul_flops(lambda: conv(x)) == 2 * 4 * 5 * 6 * 6 * 3 * 9
    assert W.matmul_flops(lambda: lin(torch.randn(4, 7))) == 2 * 4 * 7 * 2
    assert W.matmul_flops(lambda: torch.relu(x)) == 0
    model, shape = _tiny("cnn")
    cge = W.make_cge(model, "torch")
    xb, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    assert W.matmul_flops(lambda: cge.estimate(xb, y, masks=masks)) > 0
    assert cge.last_report.path != "functional" and cge.last_report.fast, cge.last_report
