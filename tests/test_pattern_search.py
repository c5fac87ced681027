"""Pattern search (Chiang et al., 2023), the baseline of the paper's Fig. 5: it never accepts a
worse loss, leaves the model exactly as it was when nothing improves, shrinks its radius as
published, descends a convex loss, counts its queries, refuses bad arguments; and the Fig. 5
script's --quick run (``-m paper_experiment``)."""
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_kernels.baselines.pattern_search import PUBLISHED, PatternSearch
from deepzero_kernels.models import SimpleCNN

from conftest import assert_bitwise_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "python" / "experiments" / "fig5_pattern_search.py"


def mse(out, y):
    return ((out - y) ** 2).mean()


@torch.no_grad()
def plain_loss(model, x, y, loss_fn=F.cross_entropy):
    """The definition: one forward of the model as it is, buffers put back."""
    bufs = [(b, b.clone()) for b in model.buffers()]
    loss = float(loss_fn(model(x), y))
    for b, v in bufs:
        b.copy_(v)
    return loss


def at_minimum(p=3, n=8):
    """A linear least-squares problem whose minimum (loss 0) is the model's current weights, so
    every move of the pattern raises the loss."""
    model = nn.Linear(p, 1, bias=False).double()
    x = torch.randn(n, p, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def separable(n=64, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, (x @ w > 0).long(), w


# ----------------------------------------------------------------------------- the basic property
@pytest.mark.parametrize("train", [True, False])
def test_loss_on_the_searched_batch_never_increases(train):
    model = SimpleCNN(1, 4, depth=2, width=4).double().train(train)
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (16,))
    ps = PatternSearch(model, candidates=8, generator=torch.Generator().manual_seed(1))
    losses = [plain_loss(model, x, y)]
    for _ in range(25):
        st = ps.step(x, y)
        losses.append(plain_loss(model, x, y))
        assert st["loss"] <= st["loss_before"]
        assert math.isclose(st["loss_before"], losses[-2], rel_tol=1e-12)  # it judged the model as it is
        assert math.isclose(st["loss"], losses[-1], rel_tol=1e-12)         # and the move it wrote
        assert (losses[-1] < losses[-2]) == st["accepted"]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] and ps.num_accepted > 0


def test_minibatch_steps_never_raise_their_own_batch_loss():
    model = SimpleCNN(1, 4, depth=1, width=4).double().train()
    data_x, data_y = torch.randn(64, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (64,))
    ps = PatternSearch(model, candidates=4, generator=torch.Generator().manual_seed(2))
    for i in range(20):
        idx = torch.randperm(64, generator=torch.Generator().manual_seed(i))[:16]
        before = plain_loss(model, data_x[idx], data_y[idx])
        ps.step(data_x[idx], data_y[idx])
        assert plain_loss(model, data_x[idx], data_y[idx]) <= before * (1 + 1e-12)


def test_candidate_losses_are_the_definition():
    """The batched (vmapped) evaluation against the naive loop: perturb in place, forward, restore."""
    model = SimpleCNN(1, 3, depth=2, width=3).double().train()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    ps = PatternSearch(model, step_size=0.3, candidates=5)
    moves = torch.tensor([0, 1, 17, 2 * ps.dim - 1, 2 * ps.dim - 4])
    pert, values = ps._candidates(moves, 0.3)
    got = ps._losses(x, y, pert)
    params = dict(model.named_parameters())
    assert math.isclose(float(got[0]), plain_loss(model, x, y), rel_tol=1e-13)
    for k, (name, index, direction, value) in enumerate(values):
        flat = params[name].data.view(-1)
        old = flat[index].clone()
        assert float(value) == float(old) + direction * 0.3
        flat[index] = value
        want = plain_loss(model, x, y)
        flat[index] = old
        assert math.isclose(float(got[k + 1]), want, rel_tol=1e-13), (name, index, direction)


# ----------------------------------------------------------------------------- no move: exact restore, shrink
def test_nothing_improves_restores_exactly_and_halves_the_radius():
    model, x, y = at_minimum(p=3)
    snap = snapshot(model)
    ps = PatternSearch(model, mse, candidates=4)
    assert ps.step_size == PUBLISHED["step_size"] == 1.0
    for want in (0.5, 0.25, 0.125):
        st = ps.step(x, y)
        assert not st["accepted"] and st["shrunk"] and st["loss"] == st["loss_before"] == 0.0
        assert st["next_step_size"] == ps.step_size == want
        assert_bitwise_unchanged(model, snap)
    assert ps.num_shrinks == 3 and ps.num_accepted == 0


def test_bn_buffers_change_only_by_the_one_plain_forward():
    model = SimpleCNN(1, 3, depth=2, width=3).train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    twin = copy.deepcopy(model)
    ps = PatternSearch(model, loss_fn=lambda out, t: (out * 0).sum(), candidates=16)  # flat: no move wins
    st = ps.step(x, y)
    with torch.no_grad():
        twin(x)  # what DeepZero's trainer does once per step
    assert_bitwise_unchanged(model, snapshot(twin))
    assert not st["accepted"] and st["forwards"] == st["queries"] + 1
    ps_frozen = PatternSearch(model, loss_fn=lambda out, t: (out * 0).sum(), update_buffers=False)
    snap = snapshot(model)
    ps_frozen.step(x, y)
    assert_bitwise_unchanged(model, snap)


@pytest.mark.parametrize("shrink,expand", [(0.25, 1.0), (0.5, 2.0)])
def test_radius_follows_shrink_and_expand(shrink, expand):
    x, y, w = separable()
    model = nn.Linear(5, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.stack([3 * w, -3 * w]))  # the wrong way round: easy to improve
    ps = PatternSearch(model, step_size=0.5, shrink=shrink, expand=expand, candidates=64)
    st = ps.step(x, y)
    assert st["accepted"] and st["step_size"] == 0.5 and ps.step_size == 0.5 * expand
    m2, x2, y2 = at_minimum()
    ps2 = PatternSearch(m2, mse, step_size=0.5, shrink=shrink, expand=expand)
    ps2.step(x2, y2)
    assert ps2.step_size == 0.5 * shrink


# ----------------------------------------------------------------------------- it optimizes
def test_decreases_a_convex_loss_from_a_bad_start():
    x, y, w = separable(n=128, d=6, seed=3)
    model = nn.Linear(6, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.stack([2 * w, -2 * w]))
        model.bias.zero_()
    first = plain_loss(model, x, y)
    acc0 = float((model(x).argmax(1) == y).double().mean())
    ps = PatternSearch(model, candidates=4, generator=torch.Generator().manual_seed(0))
    for _ in range(300):
        ps.step(x, y)
    last = plain_loss(model, x, y)
    acc = float((model(x).argmax(1) == y).double().mean())
    assert acc0 < 0.05 and first > 1.0
    assert last < 0.2 * first and acc >= 0.95
    assert ps.num_shrinks >= 1  # it came close enough for radius 1 to overshoot


# ----------------------------------------------------------------------------- counting
def test_query_counts():
    model, x, y = at_minimum(p=3)  # 6 moves; chunks of 4: [4 moves + current] + [2 moves + current]
    ps = PatternSearch(model, mse, candidates=4)
    st = ps.step(x, y)
    assert (st["candidates"], st["queries"], st["forwards"]) == (6, 8, 8)
    ps.step(x, y)
    assert (ps.num_queries, ps.num_forwards, ps.num_steps) == (16, 16, 2)
    x2, y2, w = separable()
    m2 = nn.Linear(5, 2).double()
    with torch.no_grad():
        m2.weight.copy_(torch.stack([3 * w, -3 * w]))
    ps2 = PatternSearch(m2, candidates=7)
    st = ps2.step(x2, y2)  # the wrong-way model: the first chunk already improves
    assert st["accepted"] and (st["candidates"], st["queries"]) == (7, 8)


class _Unbatchable(nn.Module):
    """A forward vmap cannot batch (``.item()``): the search falls back to one call per model,
    so the calls can be counted."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1, bias=False).double()
        self.calls = [0]  # a list: the search puts the module's attributes back, not their contents

    def forward(self, x):
        self.calls[0] += 1
        scale = 1.0 + 0.0 * float(self.lin.weight.sum().item())
        return self.lin(x) * scale


def test_counted_queries_are_the_forwards_run():
    model = _Unbatchable()
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model.lin(x)
    ps = PatternSearch(model, mse, candidates=4)
    model.calls[0] = 0
    st = ps.step(x, y)
    chunks = 2  # each chunk first tries vmap once (one call that fails), then one call per model
    assert model.calls[0] - chunks == st["queries"] == 8


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_raise():
    model = nn.Linear(3, 2)
    for kw in ({"step_size": 0}, {"step_size": -1.0}, {"step_size": float("nan")}, {"step_size": float("inf")},
               {"shrink": 0}, {"shrink": 1.0}, {"shrink": 1.5}, {"expand": 0.5}, {"candidates": 0},
               {"candidates": 2.5}, {"candidates": True}):
        with pytest.raises(ValueError):
            PatternSearch(model, **kw)
    with pytest.raises(TypeError):
        PatternSearch(model, step_size="big")
    with pytest.raises(TypeError):
        PatternSearch(lambda x: x)
    with pytest.raises(TypeError):
        PatternSearch(model, loss_fn=3)
    with pytest.raises(TypeError):
        PatternSearch(model, generator=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        PatternSearch(nn.ReLU())
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        PatternSearch(frozen)


def test_bad_batches_raise():
    ps = PatternSearch(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="batch size"):
        ps.step(x, y[:3])
    with pytest.raises(TypeError):
        ps.step(x.numpy(), y)
    with pytest.raises(TypeError):
        ps.step(x, y.float())  # the default cross-entropy takes class indices
    with pytest.raises(ValueError, match="empty"):
        ps.step(x[:0], y[:0])
    with pytest.raises(RuntimeError):
        ps.step(torch.randn(4, 5), y)  # the model's own shape error
    per_sample = PatternSearch(nn.Linear(3, 2), loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    with pytest.raises(ValueError, match="scalar"):
        per_sample.step(x, y)
    nan_model = nn.Linear(3, 2)
    with torch.no_grad():
        nan_model.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="finite"):
        PatternSearch(nan_model).step(x, y)
    assert ps.num_steps == 0


# ----------------------------------------------------------------------------- the Fig. 5 script
@pytest.mark.paper_experiment
def test_quick_run(tmp_path):
    out = tmp_path / "fig5"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("fig5.csv", "fig5.json", "fig5.md", "fig5.png"):
        assert (out / f).stat().st_size > 0, f
    assert not list(out.glob("*.npz"))  # the per-size subsets are temporary
    info = json.loads((out / "fig5.json").read_text())
    rows = info["rows"]
    sizes = sorted({r["size"] for r in rows})
    assert len(sizes) >= 2 and {r["method"] for r in rows} == {"deepzero", "pattern_search"}
    assert len(rows) == 2 * len(sizes) and info["torch"] and info["threads"] == 1
    for r in rows:
        assert 0.0 <= r["final_test_acc"] <= 1.0 and r["wall_seconds"] > 0 and r["forward_queries"] > 0
        assert r["epochs"] == info["settings"]["epochs"] and len(r["history"]) == r["epochs"]
    by = {(r["method"], r["size"]): r for r in rows}
    big = sizes[-1]
    assert by[("deepzero", big)]["final_test_acc"] > 0.3  # chance is 0.1
    ps = by[("pattern_search", big)]
    assert ps["history"][-1]["train_loss"] < ps["history"][0]["train_loss"]
    assert ps["accepted_moves"] >= 1 and ps["forward_queries"] >= ps["steps"]
    assert "| size |" in (out / "fig5.md").read_text()
