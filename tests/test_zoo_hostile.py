"""Hostile user code found by an adversarial pass: each case must be exact (against the float64
perturb-forward-restore loop of test_zoo) or refused clearly, and leave the model as it was."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, prune

import deepzero_kernels as dz
from test_zoo import DT, compare, naive_cge

MU = 1e-2


def _backend(name):
    ok, why = dz.backends()[name]
    if not ok:
        pytest.skip(f"{name}: {why}")
    return name


BACKENDS = ["torch", "native"]


def _state(model):
    """Everything an estimate must leave alone: state dict values and module attribute identities."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(m, dict(m.__dict__)) for m in model.modules()])


def _assert_unchanged(model, state):
    values, attrs = state
    for k, v in model.state_dict().items():
        assert torch.equal(v, values[k]), f"{k} changed"
    for m, d in attrs:
        assert set(m.__dict__) == set(d), f"{type(m).__name__} attributes added/removed"
        for k, v in d.items():
            assert m.__dict__[k] is v, f"{type(m).__name__}.{k} rebound"


def _check(model, x, y, backend, chunk_size=3):
    model = model.to(DT)
    state = _state(model)
    est = dz.CGE(model, mu=MU, backend=_backend(backend), chunk_size=chunk_size).estimate(x, y)
    _assert_unchanged(model, state)
    compare(est, naive_cge(model, x, y, MU), type(model).__name__)


class WritesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(2)
        return self.h(torch.tanh(self.a(x)))


class CachesFeatures(nn.Module):
    """Reassigns a buffer and caches an activation on itself in forward."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(4, 4), nn.Linear(4, 3)
        self.register_buffer("avg", torch.zeros(4))

    def forward(self, x):
        h = self.a(x)
        self.avg = 0.9 * self.avg + 0.1 * h.mean(0).detach()
        self.feat = h
        return self.h(torch.tanh(h - self.avg))


class MulKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(torch.tanh(torch.mul(self.a(x), other=2.0)))


class Pool2dOnUnbatched(nn.Module):
    """A 2-D pool applied to a (B, C, L) tensor treats it as one unbatched image."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.h = nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(F.max_pool2d(F.relu(self.bn(self.c(x))), 2).flatten(1))


def _hooked(kind):
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    if kind == "forward":
        m[0].register_forward_hook(lambda mod, i, o: o * 2)
    elif kind == "pre":
        m[2].register_forward_pre_hook(lambda mod, i: (i[0] * 2,))
    else:  # a hook that reads its module's own weight
        m[2].register_forward_hook(lambda mod, i, o: o * mod.weight.sum())
    return m


def _pruned_cnn():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)).to(DT)
    prune.l1_unstructured(m[2], "weight", 0.5)
    prune.l1_unstructured(m[0], "weight", 0.3)
    return m


VEC = lambda: (torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))  # noqa: E731


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_that_writes_its_input(backend):
    model = WritesInput().to(DT)
    x, y = VEC()
    x_before = x.clone()
    state = _state(model)
    est = dz.CGE(model, mu=MU, backend=_backend(backend), chunk_size=3).estimate(x, y)
    assert torch.equal(x, x_before), "the estimate changed the caller's x"
    _assert_unchanged(model, state)

    def oracle_model(inp):  # the definition: every forward sees the caller's x
        return model(inp.clone())
    ref = naive_cge(_CloneInput(model), x, y, MU)
    compare(est, {k.removeprefix("m."): v for k, v in ref.items()}, "WritesInput")


class _CloneInput(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x.clone())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["forward", "pre", "reads_weight"])
def test_hooks_on_leaf_modules_run(kind, backend):
    _check(_hooked(kind), *VEC(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_pruning_reparametrisation(train, backend):
    model = _pruned_cnn().train(train)
    x, y = torch.randn(4, 2, 5, 5, dtype=DT), torch.randint(0, 3, (4,))
    _check(model, x, y, backend)
    assert torch.equal(model[2].weight, model[2].weight_orig * model[2].weight_mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spectral_norm_in_train_mode(backend):
    """The power iteration updates buffers in every forward: each evaluation must start from
    the same buffers, as in the definition."""
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(4, 4)), nn.Tanh(),
                          torch.nn.utils.spectral_norm(nn.Linear(4, 3))).to(DT).train()
    _check(model, *VEC(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_that_reassigns_state(backend):
    _check(CachesFeatures(), *VEC(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_cls", [MulKeyword, Pool2dOnUnbatched])
def test_unusual_call_forms(model_cls, backend):
    x = torch.randn(5, 2, 4, dtype=DT) if model_cls is Pool2dOnUnbatched else VEC()[0]
    # eval: a conv bias before a train-mode BatchNorm has a zero gradient the oracle only sees as noise
    _check(model_cls().eval(), x, torch.randint(0, 3, (5,)), backend)


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.flags = {"skip": True}
        self.a, self.b, self.h = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        nn.init.zeros_(self.b.weight)
        nn.init.zeros_(self.b.bias)  # a zero-initialised branch: the base output does not see it

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.flags["skip"]:
            h = h + self.b(h)
        return self.h(h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["dict_flag", "instance_forward"])
def test_change_invisible_in_the_base_output_retraces(change, backend):
    model = Flagged().to(DT)
    x, y = VEC()
    est = dz.CGE(model, mu=MU, backend=_backend(backend), chunk_size=3)
    est.estimate(x, y)
    if change == "dict_flag":
        model.flags["skip"] = False
    else:
        model.forward = lambda inp: model.h(torch.tanh(model.a(inp)))
    compare(est.estimate(x, y), naive_cge(model, x, y, MU), change)
