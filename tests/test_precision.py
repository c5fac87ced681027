"""Delta arithmetic (issue 14): float32 estimates as accurate as float64, and safe under TF32.

Every delta formula is checked in float32 against the float64 difference of the same inputs,
and against the plain float32 difference, which must be far worse (so these tests can fail).
Whole models: float32 CGE against the float64 naive loop, relative norm over the active
coordinates; with TF32 emulated on the CPU (``precision.emulated_tf32``), the engine's TF32 and
bf16 delta maps against the same reference.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import naive_cge
from deepzero_kernels import CGE
from deepzero_kernels import formulas as fm
from deepzero_kernels.models import mobilenet_v2, resnet18, resnet20
from deepzero_kernels.precision import emulated_tf32, round_to_tf32
from deepzero_kernels.rules.pooling import max_pool_delta


def _pair(shape, scale=3.0, rel=1e-4, seed=0):
    """Base values and a small change, as float32, and the float64 truth's inputs (the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randn(shape, generator=g) * scale).float()
    d = (torch.randn(shape, generator=g) * scale * rel).float()
    return x0, d


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


ELEMENTWISE = [
    ("relu", fm.relu_delta, F.relu),
    ("relu6", lambda x, d: fm.clamp_delta(x, d, 0.0, 6.0), F.relu6),
    ("hardtanh", lambda x, d: fm.clamp_delta(x, d, -1.0, 1.0), F.hardtanh),
    ("leaky_relu", lambda x, d: fm.leaky_relu_delta(x, d, 0.1), lambda t: F.leaky_relu(t, 0.1)),
    ("sigmoid", lambda x, d: fm.promoted_delta(torch.sigmoid, x, d), torch.sigmoid),
    ("tanh", lambda x, d: fm.promoted_delta(torch.tanh, x, d), torch.tanh),
    ("silu", lambda x, d: fm.promoted_delta(F.silu, x, d), F.silu),
    ("hardsigmoid", fm.hardsigmoid_delta, F.hardsigmoid),
    ("hardswish", fm.hardswish_delta, F.hardswish),
    ("gelu", lambda x, d: fm.promoted_delta(F.gelu, x, d), F.gelu),
    ("gelu tanh", lambda x, d: fm.promoted_delta(lambda t: F.gelu(t, approximate="tanh"), x, d),
     lambda t: F.gelu(t, approximate="tanh")),
    ("elu (promoted)", lambda x, d: fm.promoted_delta(F.elu, x, d), F.elu),
]


@pytest.mark.parametrize("name,formula,fn", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_activation_delta_keeps_float32_digits(name, formula, fn):
    x0, d = _pair((4096,))
    truth = fn(x0.double() + d.double()) - fn(x0.double())
    got = formula(x0, d)
    assert got.dtype == torch.float32
    naive = fn(x0 + d) - fn(x0)
    assert _rel(got, truth) < 2e-6, name
    assert _rel(naive, truth) > 20 * _rel(got, truth), "the plain float32 difference should be far worse"


@pytest.mark.parametrize("name,formula,fn", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_activation_delta_exact_in_float64_at_any_size(name, formula, fn):
    # Large changes too (crossings of every kink, saturation): the formulas are identities.
    x0, d = _pair((2048,), rel=1.0, seed=1)
    x0, d = x0.double(), d.double()
    torch.testing.assert_close(formula(x0, d), fn(x0 + d) - fn(x0), rtol=1e-12, atol=1e-12)


def test_smooth_activation_delta_survives_huge_changes():
    x0 = torch.tensor([0.0, 5.0, -5.0, 120.0, -120.0, 120.0, -120.0, 30.0])
    d = torch.tensor([200.0, -300.0, 1e4, -300.0, 300.0, 1.0, -1.0, -1e-3])
    for fn in (torch.sigmoid, torch.tanh, F.silu, F.gelu):
        got = fm.promoted_delta(fn, x0, d)
        assert torch.isfinite(got).all(), fn
        torch.testing.assert_close(got, (fn(x0.double() + d.double()) - fn(x0.double())).float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_delta(log):
    x0, d = _pair((16, 10), seed=2)
    fn = (lambda t: torch.log_softmax(t, -1)) if log else (lambda t: torch.softmax(t, -1))
    s0 = torch.softmax(x0, -1)
    got = (fm.log_softmax_delta if log else fm.softmax_delta)(s0, d, -1)
    truth = fn(x0.double() + d.double()) - fn(x0.double())
    assert _rel(got, truth) < 1e-5
    assert _rel(fn(x0 + d) - fn(x0), truth) > 10 * _rel(got, truth)


def test_batch_norm_delta_dense_keeps_digits():
    # (B, K, C, H, W) deltas with per-(k, c) statistics, as the BatchNorm rule calls it.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 5, 5, generator=g) * 2 + 1
    d = torch.randn(8, 3, 4, 5, 5, generator=g) * 1e-4
    w = torch.rand(4, generator=g) + 0.5

    def bn(v):  # v (B, K, C, H, W) -> per-(k, c) batch norm
        m = v.mean((0, 3, 4), keepdim=True)
        return (v - m) * torch.rsqrt(v.var((0, 3, 4), unbiased=False, keepdim=True) + 1e-5) * w.view(1, 1, -1, 1, 1)

    x64, d64 = x.double()[:, None], d.double()
    truth = bn(x64 + d64) - bn(x64.expand_as(d64))
    mean = x.mean((0, 2, 3), keepdim=True)
    inv = torch.rsqrt(x.var((0, 2, 3), unbiased=False) + 1e-5)
    got = fm.batch_norm_delta((x - mean)[:, None], inv.view(1, 1, -1, 1, 1), w.view(1, 1, -1, 1, 1), d, (0, 3, 4))
    assert _rel(got, truth) < 1e-5


def test_max_pool_delta_exact_at_the_perturbed_argmax():
    x0, d = _pair((2, 3, 4, 8, 8), seed=4)  # (B, K, C, H, W)
    pool = lambda t: F.max_pool2d(t, 3, 2, return_indices=True)  # noqa: E731  overlapping windows
    m0 = F.max_pool2d(x0.reshape(-1, 4, 8, 8), 3, 2).reshape(2, 3, 4, 3, 3)
    got = max_pool_delta(pool, x0, d, m0)
    truth = (F.max_pool2d((x0.double() + d.double()).reshape(-1, 4, 8, 8), 3, 2)
             - F.max_pool2d(x0.double().reshape(-1, 4, 8, 8), 3, 2)).reshape(got.shape)
    assert _rel(got, truth) < 1e-6


def test_round_to_tf32_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0 + 2 ** -10, 1.0 + 2 ** -11 + 2 ** -13, 1.0 + 2 ** -12, -3.0, 0.0])
    got = round_to_tf32(x)
    assert got.tolist() == [1.0 + 2 ** -10, 1.0 + 2 ** -10, 1.0, -3.0, 0.0]
    assert torch.equal(round_to_tf32(x.double()), x.double())  # other dtypes are untouched


def test_emulated_tf32_follows_torch_flags():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    exact = F.conv2d(x, w)
    with emulated_tf32():
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # PyTorch's default, as on a GPU
        rounded = F.conv2d(x, w)
        torch.testing.assert_close(rounded, F.conv2d(round_to_tf32(x), round_to_tf32(w)), rtol=0, atol=0)
        old = torch.backends.cudnn.conv.fp32_precision
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        try:
            assert torch.equal(F.conv2d(x, w), exact)
        finally:
            torch.backends.cudnn.conv.fp32_precision = old
    assert not torch.equal(rounded, exact)
    assert F.conv2d is not None and torch.equal(F.conv2d(x, w), exact)  # restored


# ----------------------------------------------------------------------------- whole models
def _masks(model, per_tensor, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for n, p in model.named_parameters():
        m = torch.zeros(p.numel(), dtype=torch.bool)
        if n in names:
            m[torch.randperm(p.numel(), generator=g)[:per_tensor]] = True
        masks[n] = m.view(p.shape)
    return masks


def _pick(model, stride):
    """Every ``stride``-th conv/linear weight and BatchNorm weight, first and last always."""
    names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    return set(names[::stride]) | {names[0], names[-1]}


def _relnorm(est, ref, masks):
    num = sum((est[n].double() - ref[n])[masks[n]].square().sum() for n in ref)
    den = sum(ref[n][masks[n]].square().sum() for n in ref)
    return math.sqrt(num / den)


_MODELS = {
    "resnet20": lambda: resnet20(),
    "resnet18": lambda: resnet18(width=8),
    "mobilenet_v2": lambda: mobilenet_v2(width_mult=0.25, last_channels=64),
}
# MobileNetV2 in train mode at batch 4 is ill-conditioned at the 1e-4 level: moving its float64
# parameters by half a float32 ulp (6e-8) moves the exact float64 estimate by 1.7e-4, so no float32
# computation can be closer. At batch 16 that floor is well below the bound.
_BATCH = {"resnet20": 4, "resnet18": 4, "mobilenet_v2": 16}
_CACHE = {}


def _case(name):
    """A float32 model in train mode, a batch, the active coordinates and the float64 naive loop."""
    if name not in _CACHE:
        torch.manual_seed(0)
        model = _MODELS[name]()
        x = torch.randn(_BATCH[name], 3, 32, 32)
        y = torch.randint(0, 10, (_BATCH[name],))
        masks = _masks(model, 3, _pick(model, 6 if name == "resnet20" else 9))
        m64 = copy.deepcopy(model).double()
        ref = naive_cge(m64, x.double(), y, 5e-3, masks=masks)
        _CACHE[name] = (model, x, y, masks, ref)
    return _CACHE[name]


@pytest.mark.parametrize("base,bound", [("fp64", 1e-5), ("model", 1e-4)])
@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("name", list(_MODELS))
def test_float32_engine_matches_float64_naive_loop(name, backend, base, bound):
    # base="model": deltas around the float32 base pass (its rounding is the floor, ~1e-5 here and
    # ~1e-4 at full width); "fp64" (default): around a float64 base pass rounded once.
    from deepzero_kernels import ops
    if backend == "native" and not ops.backends()["native"][0]:
        pytest.skip("native backend not built")
    model, x, y, masks, ref = _case(name)
    cge = CGE(model, mu=5e-3, backend=backend, base_precision=base)
    est = cge.estimate(x, y, masks=masks)
    assert cge.last_report.base_note == ""
    assert _relnorm(est, ref, masks) <= bound


@pytest.mark.slow
@pytest.mark.parametrize("name,make", [("resnet18", lambda: resnet18()), ("mobilenet_v2", lambda: mobilenet_v2())])
def test_full_width_float32_engine_within_1e4_of_float64(name, make):
    # Issue 14's target at full width (64-wide ResNet-18, MobileNetV2 1.0, batch 16, train mode): the
    # float32 base pass alone gives 5e-4 / 6e-4 on a middle conv; the float64 base pass ~2e-6.
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 4]
    middle = names[len(names) // 2]
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    masks[middle].view(-1)[torch.randperm(masks[middle].numel())[:8]] = True
    ref = naive_cge(copy.deepcopy(model).double(), x.double(), y, 5e-3, masks=masks)
    est = CGE(model, mu=5e-3, backend="native").estimate(x, y, masks=masks)
    assert _relnorm(est, ref, masks) <= 1e-4


class _CastInForward(nn.Module):
    """A forward that casts a weight to float32 itself: in the float64 pass float64 activations meet
    it in F.linear, which refuses mixed dtypes, so that pass cannot run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return F.linear(h, self.w.float())


def test_base_precision_falls_back_to_the_models_pass_and_says_why():
    torch.manual_seed(0)
    model, x, y = _CastInForward(), torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    wide = CGE(model, mu=5e-3, backend="torch")
    est = wide.estimate(x, y, masks=masks)
    assert "float64 pass failed" in wide.last_report.base_note and "model's dtype" in str(wide.last_report)
    own = CGE(model, mu=5e-3, backend="torch", base_precision="model").estimate(x, y, masks=masks)
    assert all(torch.equal(est[n], own[n]) for n in est)  # the exact model pass, unchanged
    ref = naive_cge(model, x, y, 5e-3, masks=masks)  # (this model has no float64 version)
    assert _relnorm(est, ref, masks) <= 1e-2


def test_base_precision_changes_float32_estimates_only():
    model, x, y, masks, ref = _case("resnet20")
    wide = CGE(model, mu=5e-3, backend="torch").estimate(x, y, masks=masks)
    own = CGE(model, mu=5e-3, backend="torch", base_precision="model").estimate(x, y, masks=masks)
    assert not all(torch.equal(wide[n], own[n]) for n in wide)
    m64, x64 = copy.deepcopy(model).double(), x.double()
    a = CGE(m64, mu=5e-3, backend="torch").estimate(x64, y, masks=masks)
    b = CGE(m64, mu=5e-3, backend="torch", base_precision="model").estimate(x64, y, masks=masks)
    assert all(torch.equal(a[n], b[n]) for n in a)  # a float64 model has one pass either way
    with pytest.raises(ValueError, match="base_precision"):
        CGE(model, base_precision="fp16")


def test_float32_naive_loop_is_far_worse():
    # What the engine improves on: the paper's loop in float32 (difference of two losses).
    model, x, y, masks, ref = _case("resnet20")
    loop = naive_cge(model, x, y, 5e-3, masks=masks)
    est = CGE(model, mu=5e-3, backend="torch").estimate(x, y, masks=masks)
    assert _relnorm(loop, ref, masks) > 10 * _relnorm(est, ref, masks)


@pytest.mark.parametrize("precision,bound", [("fp32", 1e-4), ("tf32", 1e-3), ("bf16", 1e-2)])
def test_engine_under_emulated_tf32(precision, bound):
    model, x, y, masks, ref = _case("resnet20")
    with emulated_tf32():  # torch's flags say TF32 for convolutions, as on a GPU by default
        est = CGE(model, mu=5e-3, backend="torch", delta_precision=precision).estimate(x, y, masks=masks)
        loop = naive_cge(model, x, y, 5e-3, masks=masks)
    err = _relnorm(est, ref, masks)
    assert err <= bound
    assert _relnorm(loop, ref, masks) > 10 * bound  # the paper's loop under TF32: noise
    if precision == "fp32":  # the engine ignores torch's TF32 flags for its values
        plain = CGE(model, mu=5e-3, backend="torch").estimate(x, y, masks=masks)
        assert all(torch.equal(est[n], plain[n]) for n in est)


def test_delta_precision_is_checked():
    with pytest.raises(ValueError, match="delta_precision"):
        CGE(nn.Linear(3, 2), delta_precision="fp16")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_new_models_exact_in_float64(name, train):
    torch.manual_seed(1)
    model = _MODELS[name]().double()
    with torch.no_grad():  # running statistics of real activations (the initial ones shrink the signal to ~1e-9)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model(torch.randn(16, 3, 16, 16, dtype=torch.float64))
    model.train(train)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    masks = _masks(model, 2, _pick(model, 5), seed=1)
    ref = naive_cge(model, x, y, 1e-3, masks=masks)
    est = CGE(model, mu=1e-3, backend="torch").estimate(x, y, masks=masks)
    assert _relnorm(est, ref, masks) < 1e-9


@pytest.mark.parametrize("name", ["sdpa_attention", "layernorm_module", "layernorm_functional", "window_attention"])
def test_attention_and_layer_norm_carry_deltas_in_float32(name):
    # Softmax, matmul, scaled_dot_product_attention, LayerNorm (own parameters too), permute,
    # roll, broadcasting adds and gathers all have delta rules: no node falls back to values, and
    # float32 keeps float64's digits where the plain float32 loop does not.
    import test_zoo
    model, x, y, _ = test_zoo.ZOO[name]()
    model, x = model.float(), x.float()
    cge = CGE(model, mu=5e-3, backend="torch")
    est = cge.estimate(x, y)
    ref = naive_cge(copy.deepcopy(model).double(), x.double(), y, 5e-3)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    assert not cge.engine.fallback_counts, dict(cge.engine.fallback_counts)
    err = _relnorm(est, ref, masks)
    assert err <= 1e-5
    assert _relnorm(naive_cge(model, x, y, 5e-3), ref, masks) > 3 * err
