"""CGE.estimate against the naive perturb-forward-restore loop, in float64."""
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_kernels import CGE, backends
from deepzero_kernels.models import MLP, CifarResNet, SimpleCNN

from conftest import assert_bitwise_unchanged, naive_cge, rel_err, snapshot

MU = 5e-3
TOL = 1e-9


def random_cnn(rng: random.Random, in_ch=3, classes=4):
    """A random Sequential CNN: conv (random stride/padding/dilation/groups/bias), optional BN,
    a random activation, optional pooling; then global pooling or flatten, linear layers."""
    layers, c = [], in_ch
    for i in range(rng.randint(1, 3)):
        groups = rng.choice([1, 1, 2]) if c % 2 == 0 else 1
        out = groups * rng.randint(1, 3)
        layers.append(nn.Conv2d(c, out, rng.choice([1, 2, 3]), stride=rng.choice([1, 1, 2]),
                                padding=rng.choice([0, 1]), dilation=rng.choice([1, 1, 2]) if i else 1,
                                groups=groups, bias=rng.random() < 0.5))
        if rng.random() < 0.7:
            layers.append(nn.BatchNorm2d(out, affine=rng.random() < 0.8))
        layers.append(rng.choice([nn.ReLU(), nn.LeakyReLU(0.1), nn.GELU(), nn.SiLU(), nn.Tanh(), nn.Sigmoid()]))
        if rng.random() < 0.5:
            layers.append(rng.choice([nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2, ceil_mode=True)]))
        c = out
    if rng.random() < 0.5:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    else:
        layers += [nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(4 * c, 5), nn.ReLU(), nn.Linear(5, classes)]
    return nn.Sequential(*layers)


def random_mlp(rng: random.Random, d_in=6, classes=3):
    layers, d = [], d_in
    for _ in range(rng.randint(1, 3)):
        h = rng.randint(2, 6)
        layers.append(nn.Linear(d, h, bias=rng.random() < 0.7))
        if rng.random() < 0.5:
            layers.append(nn.BatchNorm1d(h))
        layers.append(rng.choice([nn.ReLU(), nn.Tanh(), nn.GELU()]))
        d = h
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


@pytest.fixture(params=["torch", "native"])
def backend(request):
    """Every exactness test runs on each backend by name (never 'auto', whose choice depends
    on what was built)."""
    ok, why = backends()[request.param]
    if not ok:
        pytest.skip(f"backend {request.param!r} is not available: {why}")
    return request.param


def check(model, x, y, *, backend, masks=None, loss_fn=None, chunk_size=None, memory_budget=None):
    model = model.double()
    snap = snapshot(model)
    est = CGE(model, loss_fn, MU, chunk_size=chunk_size, memory_budget=memory_budget,
              backend=backend).estimate(x, y, masks)
    assert_bitwise_unchanged(model, snap)
    ref = naive_cge(model, x, y, MU, loss_fn, masks)
    assert set(est) == set(ref)
    assert rel_err(est, ref) < TOL, rel_err(est, ref)
    if masks:
        for n, m in masks.items():
            assert (est[n][~m] == 0).all()
    return est


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("train", [True, False])
def test_random_cnn(seed, train, backend):
    rng = random.Random(seed)
    model = random_cnn(rng)
    model.train(train)
    if not train:  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(rng.randint(2, 4), 3, rng.randint(5, 9), rng.randint(5, 9), dtype=torch.float64)
    try:
        model.double()(x)
    except RuntimeError:  # the random stack shrinks this input below a kernel: use a larger one
        x = torch.randn(x.shape[0], 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (x.shape[0],))
    check(model, x, y, chunk_size=rng.choice([None, 1, 3]), backend=backend)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("train", [True, False])
def test_random_mlp(seed, train, backend):
    rng = random.Random(100 + seed)
    model = random_mlp(rng).train(train)
    x = torch.randn(5, 6, dtype=torch.float64)
    check(model, x, torch.randint(0, 3, (5,)), chunk_size=rng.choice([None, 2, 7]), backend=backend)


@pytest.mark.parametrize("option", ["A", "B"])
@pytest.mark.parametrize("train", [True, False])
def test_resnet(option, train, backend):
    model = CifarResNet(1, num_classes=4, widths=(2, 4, 4), option=option).train(train)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    check(model, x, torch.randint(0, 4, (3,)), chunk_size=5, backend=backend)


@pytest.mark.parametrize("chunk", [1, 2, 7, None])
def test_every_chunk_size_and_masks(chunk, backend):
    model = SimpleCNN(2, 3, depth=2, width=3)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=g) < 0.4 for n, p in model.named_parameters()
             if n.endswith("weight") and p.dim() > 1}
    masks["features.0.weight"] = torch.zeros_like(masks["features.0.weight"])  # all-False: nothing
    est = check(model, x, y, masks=masks, chunk_size=chunk, backend=backend)
    assert (est["features.0.weight"] == 0).all()


def test_memory_budget_chunks_do_not_change_result():
    model = SimpleCNN(2, 3, depth=2, width=3).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    a = CGE(model, memory_budget=1).estimate(x, y)  # forces chunks of one perturbation
    b = CGE(model, memory_budget=1 << 30).estimate(x, y)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-15)


def test_result_does_not_depend_on_call_history():
    """A fresh estimator and a used one give bitwise the same estimate (resume relies on it)."""
    model = SimpleCNN(3, 4, depth=2, width=8)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    used = CGE(model, memory_budget=1 << 22)
    used.estimate(x[:8], y[:8])
    a = used.estimate(x, y)
    b = CGE(model, memory_budget=1 << 22).estimate(x, y)
    for n in a:
        assert torch.equal(a[n], b[n]), n


class UserBlock(nn.Module):
    """A user's own residual block: functional relu, slicing + F.pad shortcut, torch.flatten,
    in-place add and a view with x.size(0)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        out = F.relu(self.bn(self.conv1(x)))
        out = self.conv2(out)[:, :, : x.shape[2] // 2]  # shape-dependent slicing
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 1, 1))
        out += short
        out = torch.relu(out)
        out = F.max_pool2d(out, 2, ceil_mode=True)
        return self.fc(out.view(out.size(0), -1))


class FunctionalNet(nn.Module):
    """Parameters used through functional calls (get_attr) and a module without a delta rule."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2, 3, 3) * 0.3)
        self.scale = nn.Parameter(torch.rand(3) + 0.5)
        self.norm = nn.LayerNorm([3, 4, 4])
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = F.conv2d(x, self.w, padding=1)
        h = self.norm(h) * self.scale.view(1, -1, 1, 1)
        h = torch.flatten(F.adaptive_avg_pool2d(F.silu(h), 1), 1)
        return self.head(h)


@pytest.mark.parametrize("train", [True, False])
def test_user_modules(train, backend):
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    check(UserBlock().train(train), x, torch.randint(0, 3, (3,)), backend=backend)


def test_functional_parameters_and_unknown_modules(backend):
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    model = FunctionalNet()
    check(model, x, torch.randint(0, 2, (3,)), backend=backend)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.bn(self.a(x))
        return self.bn(self.b(x))


def test_untraceable_model_falls_back(backend):
    model = Untraceable()
    x = torch.randn(5, 4, dtype=torch.float64).abs()
    with pytest.warns(UserWarning, match="could not trace"):
        check(model, x, torch.randint(0, 3, (5,)), backend=backend)


def test_custom_loss_numpy_tail(backend):
    """A black-box loss: a NumPy function over the batched outputs."""
    def tail(outputs, targets):
        o = outputs.detach().cpu().numpy()
        t = targets.cpu().numpy()
        return torch.from_numpy(np.square(np.tanh(o) - t).sum(axis=1))
    model = SimpleCNN(1, 2, depth=1, width=3)
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    check(model, x, y, loss_fn=tail, backend=backend)


def test_float32_close_to_float64():
    model = SimpleCNN(3, 5, depth=2, width=6)
    x = torch.randn(16, 3, 12, 12)
    y = torch.randint(0, 5, (16,))
    est = CGE(model, mu=MU).estimate(x, y)
    ref = naive_cge(model.double(), x.double(), y, MU)
    num = sum((est[n].double() - ref[n]).square().sum() for n in ref).sqrt()
    den = sum(ref[n].square().sum() for n in ref).sqrt()
    assert num / den <= 5e-4, (num / den).item()


def test_backward_feeds_optimizer():
    model = MLP(6, 3, hidden=(5,)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    cge = CGE(model)
    grads = cge.backward(x, y)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])
    before = cge.last_loss
    opt.step()
    cge.estimate(x, y)
    assert cge.last_loss < before
    assert cge.num_perturbations == 2 * sum(p.numel() for p in model.parameters())
    assert cge.last_output.shape == (8, 3)


def test_frozen_parameters_are_skipped():
    model = MLP(6, 3, hidden=(5,)).double()
    model.net[1].weight.requires_grad_(False)
    est = CGE(model).estimate(torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,)))
    assert "net.1.weight" not in est and "net.1.bias" in est


def test_dropout_in_training_is_refused_and_eval_is_fine(backend):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    with pytest.raises(ValueError, match="Dropout"):
        CGE(model).estimate(x, y)
    model.eval()
    check(model, x, y, backend=backend)


class TestBadInput:
    model = MLP(6, 3, hidden=(5,))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))

    @pytest.mark.parametrize("mu", [0, -1.0, float("nan"), float("inf")])
    def test_mu(self, mu):
        with pytest.raises(ValueError, match="mu"):
            CGE(self.model, mu=mu)

    def test_batch(self):
        with pytest.raises(ValueError, match="batch size"):
            CGE(self.model).estimate(self.x, self.y[:3])
        with pytest.raises(TypeError, match="dtype"):
            CGE(self.model).estimate(self.x.double(), self.y)
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            CGE(self.model).estimate(self.x.numpy(), self.y)
        bad = self.x.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            CGE(self.model).estimate(bad, self.y)

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="x is on meta"):
            CGE(self.model).estimate(self.x.to("meta"), self.y)
        with pytest.raises(ValueError, match="device|meta"):
            conv2d = __import__("deepzero_kernels.ops", fromlist=["x"]).conv2d_perturbed
            conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3, device="meta"), None, torch.tensor([0]), 0.1)

    def test_progress_callback(self):
        seen = []
        CGE(self.model).estimate(self.x, self.y, on_chunk=lambda name, k: seen.append((name, k)))
        per_param = {}
        for name, k in seen:
            per_param[name] = per_param.get(name, 0) + k
        assert per_param == {n: p.numel() for n, p in self.model.named_parameters()}
        assert seen[0][0] == "net.3.weight"  # back to front: the classifier first

    def test_masks(self):
        cge = CGE(self.model)
        with pytest.raises(ValueError, match="unknown"):
            cge.estimate(self.x, self.y, {"nope": torch.ones(3, dtype=torch.bool)})
        with pytest.raises(ValueError, match="shape"):
            cge.estimate(self.x, self.y, {"net.1.weight": torch.ones(3, dtype=torch.bool)})
        with pytest.raises(TypeError, match="bool"):
            cge.estimate(self.x, self.y, {"net.1.weight": torch.ones(5, 6)})
        with pytest.raises(TypeError, match="dict"):
            cge.estimate(self.x, self.y, [torch.ones(5, 6, dtype=torch.bool)])

    def test_constructor(self):
        with pytest.raises(TypeError, match="model"):
            CGE(lambda x: x)
        with pytest.raises(TypeError, match="loss_fn"):
            CGE(self.model, loss_fn=3)
        with pytest.raises(ValueError, match="memory_budget"):
            CGE(self.model, memory_budget=0)
        with pytest.raises(ValueError, match="backend"):
            CGE(self.model, backend="gpu")

    def test_loss_fn_shape(self):
        cge = CGE(self.model, loss_fn=lambda o, t: F.cross_entropy(o, t))  # reduced: wrong
        with pytest.raises(ValueError, match="per-sample"):
            cge.estimate(self.x, self.y)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_no_host_sync_per_chunk(monkeypatch, backend):
    """Issue 16 item 8: the syncs of an estimate (tensor -> Python conversions) do not grow with
    its number of chunks: index ranges are checked once per estimate, not per kernel call, and the
    cross-entropy change does not ask whether it needs its fallback (as on a GPU)."""
    from deepzero_kernels import CGE
    from deepzero_kernels.models import build_model
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, width=4, depth=2)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    from deepzero_kernels import formulas
    monkeypatch.setattr(formulas, "_needs_fallback", lambda bad: True)  # what it does on a GPU
    counts = {"n": 0}
    for name in ("__int__", "__float__", "__bool__", "__index__", "item", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            counts["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def syncs(chunk_size):
        if backend not in backends():
            pytest.skip(f"{backend} not built")
        cge, chunks = CGE(model, chunk_size=chunk_size, backend=backend), [0]
        cge.estimate(x, y, on_chunk=lambda n, k: chunks.__setitem__(0, chunks[0] + 1))  # trace, kernels
        counts["n"], chunks[0] = 0, 0
        cge.estimate(x, y, on_chunk=lambda n, k: chunks.__setitem__(0, chunks[0] + 1))
        return counts["n"], chunks[0]
    few, n_few = syncs(4096)
    many, n_many = syncs(3)
    assert n_many > 10 * n_few
    assert many == few, (few, many)


def test_engine_checks_coordinates_once():
    """The engine skips the kernels' per-call index checks, so it checks coords itself."""
    from deepzero_kernels.engine import DeltaEngine
    from deepzero_kernels.models import build_model
    model = build_model("cnn", in_channels=1, num_classes=10, width=2, depth=1)
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))
    eng = DeltaEngine(model)
    n = model.fc.weight.numel()
    for coords, exc, msg in (({"fc.weight": torch.tensor([0, n])}, ValueError, "outside"),
                             ({"fc.weight": torch.tensor([-1])}, ValueError, "outside"),
                             ({"fc.weight": torch.tensor([0.0])}, TypeError, "int64"),
                             ({"nope": torch.tensor([0])}, ValueError, "not a parameter")):
        with pytest.raises(exc, match=msg):
            eng.run(x, y, coords, 1e-3)
