"""The native backend (deepzero_kernels._native) against the torch reference, kernel by kernel, on
random and awkward shapes (odd sizes, 1x1, ceil-mode borders, stride/dilation 2, padding 0/1/2,
K=1, B=1) in float32 and float64, plus its own argument checks. Skipped when the extension is not
built."""
import pytest
import torch
import torch.nn.functional as F

from deepzero_kernels import kernels
from deepzero_kernels.kernels import reference

native_mod = pytest.importorskip("deepzero_kernels._native", reason="the native extension is not built")

NAT, REF = kernels.get("native"), kernels.get("torch")
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True, params=["auto", "baseline"])
def cpu_isa(request):
    """Every test runs with the CPU kernels' AVX2 variant (where the CPU has it) and the baseline one."""
    native_mod.set_cpu_isa(request.param)
    yield native_mod.cpu_isa()
    native_mod.set_cpu_isa("auto")


def close(out, want, dtype, floor=1e-3):
    """float32 within ~1e-5 and float64 within ~1e-12 of the reference, relative to its scale (at
    least ``floor``, the inputs' scale: an exactly zero change is rounding noise in the reference)."""
    assert out.shape == want.shape and out.dtype == want.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = max(want.abs().max().item() if want.numel() else 1.0, floor)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol * scale)


def bn_base(z, eps=1e-5):
    """(x_hat, inv_std) of a batch-statistics BatchNorm of z (B, C, H, W)."""
    mean = z.mean((0, 2, 3), keepdim=True)
    return (z - mean).contiguous(), torch.rsqrt(z.var((0, 2, 3), unbiased=False) + eps)


def chain_args(g, dtype, b, c, h, w, bn_mode, relu, pool):
    """BatchNorm / ReLU / pool arguments of a one-channel chain on a (B, C, H, W) activation."""
    z = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    empty = torch.empty(0, dtype=dtype)
    bn_w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    if bn_mode == 1:
        xhat, inv = bn_base(z)
        bn = (1, xhat, inv, bn_w)
    elif bn_mode == 2:
        bn = (2, empty, empty, bn_w)
    else:
        bn = (0, empty, empty, empty)
    bn = (bn[0],) + tuple(t.to(dtype) for t in bn[1:])
    pre = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    relu_base = pre if relu else empty
    pk, ps = pool
    if pk:
        hp, wp = reference.pool_out(h, pk, ps), reference.pool_out(w, pk, ps)
        pool_base = reference.max_pool_clipped(pre.clamp_min(0), pk, ps, hp, wp).contiguous()
    else:
        pool_base = empty
    return bn + (relu_base, pk, ps, pool_base)


# (B, C_in, H, W, C_out, kh, kw, stride, pad, dil, bn_mode, relu, pool, K)
CONV_CASES = [
    (4, 3, 8, 8, 5, 3, 3, 1, 1, 1, 1, True, (2, 2), 7),
    (3, 2, 7, 5, 4, 3, 3, 2, 1, 1, 1, True, (2, 2), 5),     # odd sizes, stride 2, ceil borders
    (2, 3, 9, 9, 3, 3, 3, 1, 2, 2, 2, True, (3, 2), 6),     # dilation 2, pad 2, overlapping pool
    (5, 4, 6, 6, 6, 1, 1, 1, 0, 1, 1, False, (0, 0), 4),    # 1x1 conv, no ReLU
    (1, 2, 5, 5, 3, 3, 3, 1, 0, 1, 0, True, (0, 0), 3),     # B=1, pad 0, no BN
    (3, 3, 1, 1, 2, 1, 1, 1, 0, 1, 1, True, (0, 0), 2),     # 1x1 spatial
    (2, 3, 5, 7, 3, 2, 3, 2, 2, 2, 1, True, (3, 3), 1),     # K=1, non-square kernel, clipped 3x3 pool
    (3, 1, 6, 9, 7, 3, 3, 1, 1, 1, 2, False, (0, 0), 9),    # running-stat BN only
    (2, 2, 11, 11, 3, 3, 3, 2, 2, 1, 1, True, (2, 1), 13),  # pool stride 1; K >= 2*threads path
    (2, 2, 4, 4, 3, 3, 3, 1, 1, 1, 0, False, (0, 0), 3),    # delta only (no chain)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_delta_chain(case, dtype):
    b, c_in, h, w, c_out, kh, kw, st, pad, dil, bn_mode, relu, pool, k = case
    g = torch.Generator().manual_seed(sum(case[:10]))
    x = torch.randn(b, c_in, h, w, generator=g, dtype=dtype)
    ho, wo = (h + 2 * pad - dil * (kh - 1) - 1) // st + 1, (w + 2 * pad - dil * (kw - 1) - 1) // st + 1
    src = torch.randint(0, c_in, (k,), generator=g)
    outc = torch.randint(0, c_out, (k,), generator=g)
    off_h = torch.randint(0, kh, (k,), generator=g) * dil - pad
    off_w = torch.randint(0, kw, (k,), generator=g) * dil - pad
    chain = chain_args(g, dtype, b, c_out, ho, wo, bn_mode, relu, pool)
    args = (x, src, off_h, off_w, outc, 3e-3, st, st, ho, wo, c_out) + chain
    close(NAT.conv_delta_chain(*args), REF.conv_delta_chain(*args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(3, 4, 7, 6, 5, 1, True, (2, 2)), (1, 3, 1, 1, 1, 1, True, (0, 0)),
                                  (2, 5, 9, 8, 6, 2, True, (3, 2)), (4, 2, 5, 5, 3, 0, True, (2, 2)),
                                  (2, 3, 6, 4, 2, 1, False, (0, 0)), (2, 6, 3, 5, 11, 1, True, (2, 2))])
def test_channel_chain(case, dtype):
    b, c, h, w, k, bn_mode, relu, pool = case
    g = torch.Generator().manual_seed(h * w + k)
    values = torch.randn(b, k, h, w, generator=g, dtype=dtype) * 0.1
    channel = torch.randint(0, c, (k,), generator=g)
    args = (values, channel) + chain_args(g, dtype, b, c, h, w, bn_mode, relu, pool)
    # the reference's rounding noise scales with the BatchNorm gain (1/sqrt(eps) for a 1x1 batch of 1)
    gain = (args[4] * args[5]).abs().max().item() if bn_mode == 1 else 1.0
    close(NAT.channel_chain(*args), REF.channel_chain(*args), dtype, floor=0.1 * gain)


def dense_args(g, dtype, b, c, h, w, bn_mode, res, relu, pool, gap):
    empty = torch.empty(0, dtype=dtype)
    bn_w = torch.rand(c, generator=g, dtype=dtype) + 0.5 if bn_mode else empty
    bn_b = torch.randn(c, generator=g, dtype=dtype) if bn_mode else empty
    residual = torch.randn(b, c, h, w, generator=g, dtype=dtype) if res else empty
    return (bn_mode, bn_w, bn_b, 1e-5, residual, relu, pool[0], pool[1], gap)


# (B, K, C_in, H, W, C_out, kh, kw, stride, pad, dil, bn_mode, residual, relu, pool, gap)
DENSE_CASES = [
    (4, 3, 3, 8, 8, 5, 3, 3, 1, 1, 1, 1, True, True, (0, 0), True),    # ResNet block tail
    (3, 4, 4, 8, 8, 3, 3, 3, 1, 1, 1, 1, False, True, (2, 2), True),   # App. B CNN tail
    (2, 5, 3, 7, 5, 4, 3, 3, 2, 1, 1, 2, False, True, (2, 2), False),  # stride 2, odd sizes
    (3, 2, 2, 6, 6, 3, 3, 3, 1, 2, 2, 1, True, False, (0, 0), False),  # dilation 2, pad 2
    (1, 1, 2, 4, 4, 2, 1, 1, 1, 0, 1, 1, False, True, (3, 2), False),  # B=1, K=1, 1x1 conv
    (2, 3, 3, 5, 9, 7, 2, 3, 1, 0, 1, 0, True, True, (3, 3), True),    # no BN, clipped pool
    (2, 6, 5, 1, 1, 3, 1, 1, 1, 0, 1, 1, False, True, (0, 0), False),  # 1x1 spatial
    (3, 2, 2, 9, 7, 4, 3, 3, 2, 2, 2, 1, True, True, (2, 1), False),   # stride 2 + dilation 2
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DENSE_CASES)
def test_conv1ch_chain_and_bn_act_dense(case, dtype):
    b, k, c_in, h, w, c_out, kh, kw, st, pad, dil, bn_mode, res, relu, pool, gap = case
    g = torch.Generator().manual_seed(sum(case[:11]))
    weight = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=dtype)
    ho, wo = (h + 2 * pad - dil * (kh - 1) - 1) // st + 1, (w + 2 * pad - dil * (kw - 1) - 1) // st + 1
    base_out = torch.randn(b, c_out, ho, wo, generator=g, dtype=dtype)
    delta = torch.randn(b, k, h, w, generator=g, dtype=dtype)
    channel = torch.randint(0, c_in, (k,), generator=g)
    chain = dense_args(g, dtype, b, c_out, ho, wo, bn_mode, res, relu, pool, gap)
    args = (delta, channel, weight, st, st, pad, pad, dil, dil, base_out) + chain
    close(NAT.conv1ch_chain(*args), REF.conv1ch_chain(*args), dtype)
    values = torch.randn(b, k, c_out, ho, wo, generator=g, dtype=dtype)
    close(NAT.bn_act_dense(values, *chain), REF.bn_act_dense(values, *chain), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1ch_chain_asymmetric_stride_pad(dtype):
    g = torch.Generator().manual_seed(1)
    b, k, c_in, h, w, c_out = 2, 3, 3, 9, 6, 4
    weight = torch.randn(c_out, c_in, 3, 2, generator=g, dtype=dtype)
    sh, sw, ph, pw, dh, dw = 2, 1, 1, 2, 1, 2
    ho, wo = (h + 2 * ph - dh * 2 - 1) // sh + 1, (w + 2 * pw - dw * 1 - 1) // sw + 1
    base_out = torch.randn(b, c_out, ho, wo, generator=g, dtype=dtype)
    delta = torch.randn(b, k, h, w, generator=g, dtype=dtype)
    channel = torch.randint(0, c_in, (k,), generator=g)
    chain = dense_args(g, dtype, b, c_out, ho, wo, 1, True, True, (2, 2), False)
    args = (delta, channel, weight, sh, sw, ph, pw, dh, dw, base_out) + chain
    close(NAT.conv1ch_chain(*args), REF.conv1ch_chain(*args), dtype)


def ce_case(g, dtype, b, n_in, n, k):
    logits = torch.randn(b, n, generator=g, dtype=dtype) * 3
    target = torch.randint(0, n, (b,), generator=g)
    return logits, target


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 5, 4, 9), (1, 3, 2, 1), (17, 33, 10, 40)])
def test_cross_entropy_kernels(shape, dtype):
    b, n_in, n, k = shape
    g = torch.Generator().manual_seed(b + n_in)
    logits, target = ce_case(g, dtype, b, n_in, n, k)
    x = torch.randn(b, n_in, generator=g, dtype=dtype)
    idx = torch.randint(0, n * n_in, (k,), generator=g)
    close(NAT.linear_weight_ce(x, logits, target, idx, 0.3), REF.linear_weight_ce(x, logits, target, idx, 0.3),
          dtype)
    weight = torch.randn(n, n_in, generator=g, dtype=dtype)
    values = torch.randn(b, k, generator=g, dtype=dtype) * 0.5
    channel = torch.randint(0, n_in, (k,), generator=g)
    close(NAT.linear_rank1_ce(values, channel, weight, logits, target),
          REF.linear_rank1_ce(values, channel, weight, logits, target), dtype)
    dense = torch.randn(b, k, n_in, generator=g, dtype=dtype)
    close(NAT.linear_dense_ce(dense, x, weight, logits, target), REF.linear_dense_ce(dense, x, weight, logits, target),
          dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_logsumexp_fallback(dtype):
    """p_i rounds to 1 and the change is hugely negative: log1p(-1) = -inf, the logsumexp form is finite."""
    logits = torch.tensor([[60.0, 0.0, -3.0], [0.0, 1.0, 2.0]], dtype=dtype)
    target = torch.tensor([0, 2])
    x = torch.tensor([[-1000.0, 1.0], [2.0, 0.5]], dtype=dtype)
    idx = torch.tensor([0, 1, 5])
    out = NAT.linear_weight_ce(x, logits, target, idx, 1.0)
    assert torch.isfinite(out).all()
    close(out, REF.linear_weight_ce(x, logits, target, idx, 1.0), dtype)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=dtype)
    values = torch.tensor([[-900.0], [0.1]], dtype=dtype)
    channel = torch.tensor([0])
    out = NAT.linear_rank1_ce(values, channel, weight, logits, target)
    assert torch.isfinite(out).all()
    close(out, REF.linear_rank1_ce(values, channel, weight, logits, target), dtype)
    dense = torch.tensor([[[-900.0, 0.0]], [[0.1, 0.2]]], dtype=dtype)
    base = torch.zeros(2, 2, dtype=dtype)
    close(NAT.linear_dense_ce(dense, base, weight, logits, target),
          REF.linear_dense_ce(dense, base, weight, logits, target), dtype)


@pytest.mark.parametrize("k", [3, 9])  # both work splits: (k, b) items for few perturbations, k items else
def test_results_do_not_depend_on_thread_count(k):
    g = torch.Generator().manual_seed(5)
    b, c, h, w = 4, 3, 8, 8
    x = torch.randn(b, 2, h, w, generator=g)
    chain = chain_args(g, torch.float32, b, c, h, w, 1, True, (2, 2))
    args = (x, torch.randint(0, 2, (k,), generator=g), torch.randint(-1, 2, (k,), generator=g),
            torch.randint(-1, 2, (k,), generator=g), torch.randint(0, c, (k,), generator=g), 1e-2, 1, 1, h, w, c) + chain
    vals = torch.randn(b, k, h, w, generator=g) * 1e-2
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(NAT.conv_delta_chain(*args))
            outs.append(NAT.channel_chain(vals, args[4], *chain))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(outs[i % 2], o) for i, o in enumerate(outs))


def test_direct_calls_are_checked():
    """The extension checks its own arguments: a bad call is a RuntimeError, never a crash."""
    x = torch.randn(2, 3, 4, 4)
    e = x.new_empty(0)
    ch = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="out of range"):
        native_mod.channel_chain(x[:, :2].contiguous(), torch.tensor([0, 7]), 2, e, e, torch.ones(3), e, 0, 0, e)
    with pytest.raises(RuntimeError, match="contiguous"):
        native_mod.channel_chain(x.transpose(2, 3), ch, 2, e, e, torch.ones(3), e, 0, 0, e)
    with pytest.raises(RuntimeError, match="dtype"):
        native_mod.channel_chain(x, ch, 2, e, e, torch.ones(3, dtype=torch.float64), e, 0, 0, e)
    with pytest.raises(RuntimeError, match="needs a ReLU"):
        native_mod.channel_chain(x, ch, 2, e, e, torch.ones(3), e, 2, 2, e)
    with pytest.raises(RuntimeError, match="pool_base"):
        native_mod.channel_chain(x, ch, 0, e, e, e, torch.randn(2, 3, 4, 4), 2, 2, torch.randn(2, 3, 3, 3))
    with pytest.raises(RuntimeError, match="base_out"):
        native_mod.conv1ch_chain(x[:, :2].contiguous(), ch, torch.randn(5, 3, 3, 3), 1, 1, 1, 1, 1, 1, torch.randn(2, 5, 3, 3), 0, e, e,
                                 1e-5, e, True, 0, 0, False)
    with pytest.raises(RuntimeError, match="target"):
        native_mod.linear_weight_ce(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 4]), torch.tensor([1]), 0.1)
    with pytest.raises(RuntimeError, match="eps"):
        native_mod.bn_act_dense(torch.randn(2, 1, 3, 2, 2), 1, torch.ones(3), torch.zeros(3), 0.0, e, True, 0, 0, False)
    with pytest.raises(RuntimeError, match="CUDA|cuda"):
        native_mod.linear_weight_ce(torch.randn(2, 3, device="meta"), torch.randn(2, 4), torch.tensor([0, 1]),
                                    torch.tensor([1]), 0.1)


def test_has_cuda_matches_build():
    assert native_mod.has_cuda() in (True, False)
    if native_mod.has_cuda():
        assert torch.version.cuda is not None


@pytest.mark.skipif(not torch.cuda.is_available() or not native_mod.has_cuda(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    """The CUDA kernels against the reference on the GPU (every kernel, a few awkward shapes)."""
    dev = torch.device("cuda")
    nat, ref = kernels.get("native"), kernels.get("torch")
    for case in CONV_CASES:
        b, c_in, h, w, c_out, kh, kw, st, pad, dil, bn_mode, relu, pool, k = case
        g = torch.Generator().manual_seed(sum(case[:10]))
        x = torch.randn(b, c_in, h, w, generator=g, dtype=dtype)
        ho, wo = (h + 2 * pad - dil * (kh - 1) - 1) // st + 1, (w + 2 * pad - dil * (kw - 1) - 1) // st + 1
        src, outc = torch.randint(0, c_in, (k,), generator=g), torch.randint(0, c_out, (k,), generator=g)
        off_h = torch.randint(0, kh, (k,), generator=g) * dil - pad
        off_w = torch.randint(0, kw, (k,), generator=g) * dil - pad
        args = (x, src, off_h, off_w, outc, 3e-3, st, st, ho, wo, c_out) + chain_args(g, dtype, b, c_out, ho, wo,
                                                                                      bn_mode, relu, pool)
        args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
        close(nat.conv_delta_chain(*args).cpu(), ref.conv_delta_chain(*args).cpu(), dtype)
        vals = torch.randn(b, k, ho, wo, generator=g, dtype=dtype).to(dev)
        if bn_mode or relu:
            cargs = (vals, args[4]) + args[11:]
            close(nat.channel_chain(*cargs).cpu(), ref.channel_chain(*cargs).cpu(), dtype)
    for case in DENSE_CASES:
        b, k, c_in, h, w, c_out, kh, kw, st, pad, dil, bn_mode, res, relu, pool, gap = case
        g = torch.Generator().manual_seed(sum(case[:11]))
        weight = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=dtype)
        ho, wo = (h + 2 * pad - dil * (kh - 1) - 1) // st + 1, (w + 2 * pad - dil * (kw - 1) - 1) // st + 1
        base_out = torch.randn(b, c_out, ho, wo, generator=g, dtype=dtype)
        delta = torch.randn(b, k, h, w, generator=g, dtype=dtype)
        channel = torch.randint(0, c_in, (k,), generator=g)
        chain = dense_args(g, dtype, b, c_out, ho, wo, bn_mode, res, relu, pool, gap)
        args = (delta, channel, weight, st, st, pad, pad, dil, dil, base_out) + chain
        args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
        close(nat.conv1ch_chain(*args).cpu(), ref.conv1ch_chain(*args).cpu(), dtype)
        values = torch.randn(b, k, c_out, ho, wo, generator=g, dtype=dtype).to(dev)
        dchain = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in chain)
        close(nat.bn_act_dense(values, *dchain).cpu(), ref.bn_act_dense(values, *dchain).cpu(), dtype)
    for b, n_in, n, k in [(6, 5, 4, 9), (17, 33, 10, 40), (64, 64, 10, 300)]:
        g = torch.Generator().manual_seed(b)
        logits, target = (t.to(dev) for t in ce_case(g, dtype, b, n_in, n, k))
        x = torch.randn(b, n_in, generator=g, dtype=dtype).to(dev)
        idx = torch.randint(0, n * n_in, (k,), generator=g).to(dev)
        close(nat.linear_weight_ce(x, logits, target, idx, 0.3).cpu(),
              ref.linear_weight_ce(x, logits, target, idx, 0.3).cpu(), dtype)
        weight = torch.randn(n, n_in, generator=g, dtype=dtype).to(dev)
        values = (torch.randn(b, k, generator=g, dtype=dtype) * 0.5).to(dev)
        channel = torch.randint(0, n_in, (k,), generator=g).to(dev)
        close(nat.linear_rank1_ce(values, channel, weight, logits, target).cpu(),
              ref.linear_rank1_ce(values, channel, weight, logits, target).cpu(), dtype)
        dense = torch.randn(b, k, n_in, generator=g, dtype=dtype).to(dev)
        close(nat.linear_dense_ce(dense, x, weight, logits, target).cpu(),
              ref.linear_dense_ce(dense, x, weight, logits, target).cpu(), dtype)
