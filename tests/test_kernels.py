"""Fused kernels of every available backend against naive definitions (float64), the fused
chains through the engine against the naive CGE loop, and input validation.

The naive definitions below perturb the weight, run the layers with plain torch ops and take the
difference; they share no code with ``kernels/reference.py``. Backends that are not available
here (native not built, triton not installed or not under ``TRITON_INTERPRET=1``) are skipped.
"""
import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deepzero_kernels as dz
from deepzero_kernels import kernels, models, ops

from conftest import naive_cge, rel_err

BACKENDS = ["torch"] + [b for b, (ok, _) in kernels.available("cpu").items() if ok]
ALL = ["torch", "native", "triton"]


def _backend(name):
    if name not in BACKENDS:
        pytest.skip(f"{name}: {kernels.available('cpu')[name][1]}")
    return kernels.get(name)


def _pool(v, k, s):
    return F.max_pool2d(v, k, s, ceil_mode=True) if k else v


def _block(x, w, stride, pad, dil, bn, bn_w, bn_b, residual, relu, pool, gap):
    """conv -> BN -> (+ residual) -> ReLU -> max pool -> global average, plain torch ops."""
    z = F.conv2d(x, w, None, stride, pad, dil)
    if bn == "batch":
        z = F.batch_norm(z, None, None, bn_w, bn_b, True, 0.0, 1e-5)
    elif bn == "eval":
        z = z * bn_w.view(1, -1, 1, 1) + bn_b.view(1, -1, 1, 1)
    if residual is not None:
        z = z + residual
    if relu:
        z = F.relu(z)
    z = _pool(z, *pool)
    return z.mean((2, 3)) if gap else z


CONV_CASES = [  # (B, C_in, H, W, C_out, kernel, stride, pad, dil, bn, relu, pool)
    (4, 3, 8, 8, 5, 3, 1, 1, 1, "batch", True, (2, 2)),
    (3, 2, 7, 5, 4, 3, 2, 1, 1, "batch", True, (2, 2)),   # odd sizes, ceil-mode borders
    (2, 3, 9, 9, 3, 3, 1, 2, 2, "eval", True, (3, 2)),    # dilation, overlapping pool
    (5, 4, 6, 6, 6, 1, 1, 0, 1, "batch", False, (0, 0)),  # 1x1 conv, no ReLU
    (1, 2, 5, 5, 3, 3, 1, 0, 1, "none", True, (0, 0)),    # B=1, no padding, no BN
    (3, 3, 1, 1, 2, 1, 1, 0, 1, "batch", True, (0, 0)),   # 1x1 spatial
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_delta_chain_matches_perturbed_forward(backend, case):
    kern = _backend(backend)
    b, c_in, h, w_, c_out, ks, st, pad, dil, bn, relu, pool = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    x = torch.randn(b, c_in, h, w_, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in, ks, ks, generator=g, dtype=torch.float64)
    bn_w = torch.rand(c_out, generator=g, dtype=torch.float64) + 0.5
    bn_b = torch.randn(c_out, generator=g, dtype=torch.float64)
    mu = 1e-3
    idx = torch.randperm(w.numel(), generator=g)[:7]
    args = (w, st, pad, dil, bn, bn_w, bn_b, None, relu, pool, False)
    base = _block(x, *args)
    z = F.conv2d(x, w, None, st, pad, dil)
    o, rem = idx // (c_in * ks * ks), idx % (c_in * ks * ks)
    c, u, v = rem // (ks * ks), (rem % (ks * ks)) // ks, rem % ks
    empty = x.new_empty(0)
    if bn == "batch":
        mean = z.mean((0, 2, 3), keepdim=True)
        bn_args = (1, (z - mean).contiguous(), torch.rsqrt(z.var((0, 2, 3), unbiased=False) + 1e-5), bn_w)
    elif bn == "eval":
        bn_args = (2, empty, empty, bn_w)
    else:
        bn_args = (0, empty, empty, empty)
    pre = _block(x, w, st, pad, dil, bn, bn_w, bn_b, None, False, (0, 0), False)
    relu_base = pre.contiguous() if relu else empty
    pool_base = base.contiguous() if pool[0] else empty
    out = kern.conv_delta_chain(x, c, u * dil - pad, v * dil - pad, o, mu, st, st, z.shape[2], z.shape[3], c_out,
                                *bn_args, relu_base, pool[0], pool[1], pool_base)
    assert out.shape == (b, idx.numel()) + base.shape[2:]
    for k in range(idx.numel()):
        w2 = w.clone()
        w2.view(-1)[idx[k]] += mu
        diff = _block(x, w2, *args[1:]) - base
        torch.testing.assert_close(out[:, k], diff[:, o[k]], atol=1e-12, rtol=1e-9)
        others = torch.ones(c_out, dtype=torch.bool)
        others[o[k]] = False
        assert diff[:, others].abs().max() < 1e-12  # only one channel changes


DENSE_CASES = [  # (B, C_in, H, W, C_out, kernel, stride, pad, dil, bn, residual, relu, pool, gap)
    (4, 3, 8, 8, 5, 3, 1, 1, 1, "batch", True, True, (0, 0), True),   # ResNet block tail
    (3, 4, 8, 8, 3, 3, 1, 1, 1, "batch", False, True, (2, 2), True),  # App. B CNN tail
    (2, 3, 7, 5, 4, 3, 2, 1, 1, "eval", False, True, (2, 2), False),
    (3, 2, 6, 6, 3, 3, 1, 2, 2, "batch", True, False, (0, 0), False),
    (1, 2, 4, 4, 2, 1, 1, 0, 1, "batch", False, True, (3, 2), False),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", DENSE_CASES)
def test_conv1ch_and_bn_act_dense_match_perturbed_forward(backend, case):
    kern = _backend(backend)
    b, c_in, h, w_, c_out, ks, st, pad, dil, bn, res, relu, pool, gap = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    x = torch.randn(b, c_in, h, w_, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in, ks, ks, generator=g, dtype=torch.float64)
    bn_w = torch.rand(c_out, generator=g, dtype=torch.float64) + 0.5
    bn_b = torch.randn(c_out, generator=g, dtype=torch.float64)
    z = F.conv2d(x, w, None, st, pad, dil)
    residual = torch.randn(z.shape, generator=g, dtype=torch.float64) if res else None
    k = 4
    channel = torch.randint(0, c_in, (k,), generator=g)
    delta = torch.randn(b, k, h, w_, generator=g, dtype=torch.float64)
    mode = {"batch": 1, "eval": 2}[bn]
    empty = x.new_empty(0)
    res_arg = residual if res else empty
    out = kern.conv1ch_chain(delta, channel, w, st, st, pad, pad, dil, dil, z.contiguous(), mode, bn_w, bn_b, 1e-5,
                             res_arg, relu, pool[0], pool[1], gap)
    v = torch.stack([z + F.conv2d(x.new_zeros(x.shape).index_copy(1, channel[i:i + 1], delta[:, i:i + 1]),
                                  w, None, st, pad, dil) for i in range(k)], 1)  # (B, K, C_out, Ho, Wo)
    dense = kern.bn_act_dense(v.contiguous(), mode, bn_w, bn_b, 1e-5, res_arg, relu, pool[0], pool[1], gap)
    for i in range(k):
        xi = x.clone()
        xi[:, channel[i]] += delta[:, i]
        want = _block(xi, w, st, pad, dil, bn, bn_w, bn_b, residual, relu, pool, gap)
        torch.testing.assert_close(out[:, i], want, atol=1e-11, rtol=1e-9)
        torch.testing.assert_close(dense[:, i], want, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("backend", ALL)
def test_channel_chain_matches_perturbed_forward(backend):
    kern = _backend(backend)
    g = torch.Generator().manual_seed(3)
    b, c, h, w = 3, 5, 7, 6
    z = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    bn_w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bn_b = torch.randn(c, generator=g, dtype=torch.float64)
    residual = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    channel = torch.tensor([4, 0, 2, 4])
    values = torch.randn(b, 4, h, w, generator=g, dtype=torch.float64)

    def fwd(t):
        return _pool(F.relu(F.batch_norm(t, None, None, bn_w, bn_b, True, 0.0, 1e-5) + residual), 2, 2)

    mean = z.mean((0, 2, 3), keepdim=True)
    inv = torch.rsqrt(z.var((0, 2, 3), unbiased=False) + 1e-5)
    pre = F.batch_norm(z, None, None, bn_w, bn_b, True, 0.0, 1e-5) + residual
    out = kern.channel_chain(values, channel, 1, (z - mean).contiguous(), inv, bn_w, pre.contiguous(), 2, 2,
                             fwd(z).contiguous())
    for k in range(4):
        zk = z.clone()
        zk[:, channel[k]] += values[:, k]
        torch.testing.assert_close(out[:, k], (fwd(zk) - fwd(z))[:, channel[k]], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("backend", ALL)
def test_cross_entropy_kernels_match_definition(backend):
    kern = _backend(backend)
    g = torch.Generator().manual_seed(4)
    b, n_in, n = 6, 5, 4
    x = torch.randn(b, n_in, generator=g, dtype=torch.float64)
    w = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    y = torch.randint(0, n, (b,), generator=g)

    def loss(feats, weight):
        return F.cross_entropy(F.linear(feats, weight, bias), y, reduction="none")

    logits = F.linear(x, w, bias)
    base = loss(x, w)
    idx = torch.tensor([0, 7, 19, 3])
    mu = 1e-2
    out = kern.linear_weight_ce(x, logits, y, idx, mu)
    assert out.dtype == torch.float64 and out.shape == (4, b)
    for k in range(4):
        w2 = w.clone()
        w2.view(-1)[idx[k]] += mu
        torch.testing.assert_close(out[k], loss(x, w2) - base, atol=1e-12, rtol=1e-9)
    values = torch.randn(b, 3, generator=g, dtype=torch.float64)
    channel = torch.tensor([4, 1, 4])
    out = kern.linear_rank1_ce(values, channel, w, logits, y)
    dense = torch.randn(b, 3, n_in, generator=g, dtype=torch.float64)
    out_dense = kern.linear_dense_ce(dense, x, w, logits, y)
    for k in range(3):
        x2 = x.clone()
        x2[:, channel[k]] += values[:, k]
        torch.testing.assert_close(out[k], loss(x2, w) - base, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(out_dense[k], loss(dense[:, k], w) - base, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("backend", [b for b in ALL if b != "torch"])
def test_float32_kernels_match_reference(backend):
    """float32 kernels agree with the torch reference within float32 rounding, on a larger
    App. B-like shape."""
    kern, torch_k = _backend(backend), kernels.get("torch")
    g = torch.Generator().manual_seed(5)
    b, c_in, c, h, k = 8, 3, 6, 10, 5
    x = torch.randn(b, c_in, h, h, generator=g)
    w = torch.randn(c, c_in, 3, 3, generator=g)
    z = F.conv2d(x, w, None, 1, 1)
    bn_w, bn_b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    pre = F.batch_norm(z, None, None, bn_w, bn_b, True, 0.0, 1e-5)
    pooled = _pool(F.relu(pre), 2, 2)
    mean = z.mean((0, 2, 3), keepdim=True)
    inv = torch.rsqrt(z.var((0, 2, 3), unbiased=False) + 1e-5)
    idx = torch.randperm(w.numel(), generator=g)[:k]
    o, rem = idx // 27, idx % 27
    c_, u, v = rem // 9, (rem % 9) // 3, rem % 3
    args = (x, c_, u - 1, v - 1, o, 1e-2, 1, 1, h, h, c, 1, (z - mean).contiguous(), inv, bn_w, pre.contiguous(),
            2, 2, pooled.contiguous())
    torch.testing.assert_close(kern.conv_delta_chain(*args), torch_k.conv_delta_chain(*args), atol=1e-5, rtol=1e-4)
    delta = torch.randn(b, k, 5, 5, generator=g)
    base = F.conv2d(pooled, w.new_ones(4, c, 3, 3), None, 1, 1).contiguous()
    w2 = torch.randn(4, c, 3, 3, generator=g)
    dargs = (delta, o, w2, 1, 1, 1, 1, 1, 1, base, 1, bn_w[:4].contiguous(), bn_b[:4].contiguous(), 1e-5,
             x.new_empty(0), True, 2, 2, True)
    torch.testing.assert_close(kern.conv1ch_chain(*dargs), torch_k.conv1ch_chain(*dargs), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- through the engine
def _with_kernels(est, name):
    """Run ``est``'s fused chains on backend ``name`` ('torch' = the reference kernels), through
    the engine's ``kernels`` injection point; returns the launch counts."""
    kern = kernels.get(name) if name == "torch" else _backend(name)
    calls = collections.Counter()

    class Counting:  # counts launches, so a test sees that the chains really matched
        def __getattr__(self, attr):
            fn = getattr(kern, attr)

            def run(*a, **kw):
                calls[attr] += 1
                return fn(*a, **kw)
            return run

    est.engine.kernels = Counting()
    return calls


MODELS = {
    "cnn": lambda: (models.SimpleCNN(3, 10, depth=2, width=5), (4, 3, 9, 9)),
    "resnet": lambda: (models.CifarResNet(1, widths=(4, 6, 8)), (3, 3, 8, 8)),
    "resnet_B": lambda: (models.CifarResNet(1, widths=(3, 5, 6), option="B"), (2, 3, 8, 8)),
}


# Triton's interpreter takes minutes for a ResNet: one CNN case covers its chains on CPU.
ENGINE_CASES = [(b, m, mode) for b in ALL for m in MODELS for mode in ("train", "eval")
                if b != "triton" or (m == "cnn" and mode == "train")]


@pytest.mark.parametrize("backend,model_name,mode", ENGINE_CASES)
def test_cge_with_fused_chains_matches_naive_loop(backend, model_name, mode):
    model, shape = MODELS[model_name]()
    model = model.double()
    getattr(model, mode)()
    if mode == "eval":
        for name, buf in model.named_buffers():
            if buf.dtype.is_floating_point:
                buf.uniform_(0.5, 1.5) if "var" in name else buf.normal_()
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, 10, (shape[0],))
    cge = dz.CGE(model, mu=1e-4, chunk_size=3)
    calls = _with_kernels(cge, backend)
    est = cge.estimate(x, y)
    assert not cge.engine.fallback_counts
    assert rel_err(est, naive_cge(model, x, y, 1e-4)) < 1e-8
    used = {"conv_delta_chain", "conv1ch_chain", "linear_weight_ce", "linear_dense_ce", "channel_chain"}
    if mode == "train":
        used |= {"bn_act_dense"}
    if model_name == "cnn":
        used = {"conv_delta_chain", "conv1ch_chain", "linear_weight_ce", "linear_rank1_ce", "linear_dense_ce",
                "channel_chain"}
    assert used <= set(calls), f"kernels never launched: {used - set(calls)}"


@pytest.mark.parametrize("backend", [b for b in ALL if b != "torch"])
def test_cge_float32_with_backend_close_to_float64_naive(backend):
    model = models.SimpleCNN(3, 10, depth=2, width=5)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    cge = dz.CGE(model, mu=5e-3)
    _with_kernels(cge, backend)
    est = cge.estimate(x, y)
    ref_est = naive_cge(model.double(), x.double(), y, 5e-3)
    assert rel_err(est, ref_est) < 2e-3


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("backend", ALL)
def test_bad_inputs_raise_clear_errors(backend):
    kern = _backend(backend)
    x = torch.randn(2, 3, 5, 5)
    i = torch.tensor([0, 1])
    z = torch.zeros(2, dtype=torch.long)
    good = (x, i, z, z, i, 0.1, 1, 1, 5, 5, 4)
    kern.conv_delta_chain(*good)  # the plain gather is valid
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        kern.conv_delta_chain(x.half(), *good[1:])
    with pytest.raises(ValueError, match="x must be contiguous"):
        kern.conv_delta_chain(x.transpose(2, 3), *good[1:])
    with pytest.raises(ValueError, match="src_channel out of range"):
        kern.conv_delta_chain(x, torch.tensor([0, 3]), *good[2:])
    with pytest.raises(TypeError, match="src_channel must have dtype torch.int64"):
        kern.conv_delta_chain(x, i.int(), *good[2:])
    with pytest.raises(ValueError, match="mu must be > 0"):
        kern.conv_delta_chain(*good[:5], 0.0, *good[6:])
    with pytest.raises(ValueError, match="mu must be a finite"):
        kern.conv_delta_chain(*good[:5], float("nan"), *good[6:])
    with pytest.raises(TypeError, match="bn_weight must have dtype"):
        kern.conv_delta_chain(*good, 2, None, None, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="relu_base must have shape"):
        kern.conv_delta_chain(*good, 0, None, None, None, torch.zeros(2, 4, 5, 4))
    with pytest.raises(ValueError, match="needs a ReLU"):
        kern.conv_delta_chain(*good, 0, None, None, None, None, 2, 2, torch.zeros(2, 4, 3, 3))
    logits, y = torch.randn(2, 4), torch.tensor([0, 4])
    with pytest.raises(ValueError, match="target out of range"):
        kern.linear_weight_ce(torch.randn(2, 3), logits, y, i, 0.1)
    with pytest.raises(ValueError, match="base must have shape"):
        kern.linear_dense_ce(torch.randn(2, 2, 3), torch.randn(3, 3), torch.randn(4, 3), logits, torch.tensor([0, 1]))


def test_backends_report_and_auto_never_fails():
    rep = ops.backends()
    assert set(rep) == {"torch", "native", "triton"}
    for ok, why in rep.values():
        assert isinstance(ok, bool) and why
    assert ops.resolve_backend("auto") in ("torch", "native")
    for name, (ok, _) in rep.items():
        if not ok:
            with pytest.raises(ValueError, match="not available"):
                dz.CGE(nn.Linear(2, 2), backend=name)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kw", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2),
                                dict(stride=1, padding="same", groups=2), dict(stride=(2, 1), padding=(0, 1))])
def test_public_conv_op_with_each_backend(backend, kw):
    _backend(backend)
    g = torch.Generator().manual_seed(6)
    groups = kw.get("groups", 1)
    x = torch.randn(3, 4, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    idx = torch.randperm(w.numel(), generator=g)[:5]
    out = ops.conv2d_perturbed(x, w, bias, idx, 0.01, backend=backend, **kw)
    for k in range(5):
        w2 = w.clone()
        w2.view(-1)[idx[k]] += 0.01
        torch.testing.assert_close(out[k], F.conv2d(x, w2, bias, **kw), atol=1e-12, rtol=1e-10)
