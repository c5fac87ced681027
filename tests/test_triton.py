"""Triton kernels against the torch backend, on small and awkward shapes.

Without CUDA they run on CPU under ``TRITON_INTERPRET=1``, set here before triton is imported
(triton decides interpreter mode when its own modules are imported, so a run that imported triton
earlier without it must set it itself, e.g. in conftest.py). The interpreter is slow: the shapes
are tiny, and the interpreter configs use small blocks so that the multi-block loops still run.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it before importing triton",
                    allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from deepzero_kernels import kernels  # noqa: E402
from deepzero_kernels.kernels import reference  # noqa: E402

# The interpreter evaluates both sides of tl.where: the overflow/log(0) lanes of the CE fallback warn.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KT, KR = kernels.get("triton"), kernels.get("torch")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}


def close(a, b, dtype, tol=None):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    tol = tol or TOL[dtype]
    scale = b.abs().max().item() if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(scale, 1e-30))


def rnd(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device=DEV)


def test_available_on_cpu_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("not running under the interpreter")
    ok, why = kernels.available("cpu")["triton"]
    assert ok, why


def _chain_args(b, c, h, w, bn_mode, relu, pool, dtype):
    x = rnd(b, c, h, w, dtype=dtype)
    xhat = x - x.mean((0, 2, 3), keepdim=True)
    inv_std = torch.rsqrt(xhat.square().mean((0, 2, 3)) + 1e-5)
    kw = dict(bn_mode=bn_mode, bn_xhat=xhat if bn_mode == 1 else None, bn_inv_std=inv_std if bn_mode == 1 else None,
              bn_weight=rnd(c, dtype=dtype) if bn_mode else None)
    if relu:
        kw["relu_base"] = rnd(b, c, h, w, dtype=dtype)
    if pool:
        pk, ps = pool
        hp, wp = reference.pool_out(h, pk, ps), reference.pool_out(w, pk, ps)
        kw.update(pool_k=pk, pool_s=ps, pool_base=reference.max_pool_clipped(
            kw["relu_base"].clamp_min(0), pk, ps, hp, wp).contiguous())
    return kw


# (B, K, C, H, W, bn_mode, relu, pool)
CHAIN_CASES = [
    (2, 3, 5, 8, 7, 1, True, (3, 2)),   # ceil-mode borders, B*H*W > block
    (1, 1, 3, 1, 1, 2, True, None),     # 1x1, K=1, B=1
    (3, 4, 6, 6, 5, 0, True, (2, 2)),
    (2, 5, 7, 5, 5, 1, False, None),
    (2, 3, 4, 3, 3, 2, False, None),
    (1, 2, 3, 5, 5, 1, True, (3, 3)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CHAIN_CASES)
def test_channel_chain(case, dtype):
    b, k, c, h, w, bn_mode, relu, pool = case
    kw = _chain_args(b, c, h, w, bn_mode, relu, pool, dtype)
    vals = rnd(b, k, h, w, dtype=dtype) * 0.3
    ch = torch.randint(0, c, (k,), device=DEV)
    relu_base = kw.pop("relu_base", torch.empty(0, dtype=dtype, device=DEV))
    args = (vals, ch, kw.pop("bn_mode"), kw.pop("bn_xhat"), kw.pop("bn_inv_std"), kw.pop("bn_weight"), relu_base)
    close(KT.channel_chain(*args, **kw), KR.channel_chain(*args, **kw), dtype)


# (B, K, C_in, C_out, H, W, kh, kw, stride, pad, dil, bn_mode, relu, pool)
CONV_CASES = [
    (2, 4, 3, 5, 7, 6, 3, 3, 1, 1, 1, 1, True, (3, 2)),
    (1, 1, 2, 3, 5, 5, 3, 3, 2, 0, 1, 2, True, None),
    (2, 3, 3, 4, 9, 7, 3, 3, 2, 2, 2, 1, False, None),
    (3, 5, 4, 6, 4, 4, 1, 1, 1, 0, 1, 0, True, (2, 2)),
    (2, 3, 2, 3, 5, 6, 3, 2, 1, 2, 2, 1, True, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_delta_chain(case, dtype):
    b, k, ci, co, h, w, kh, kw_, st, pad, dil, bn_mode, relu, pool = case
    ho, wo = (h + 2 * pad - dil * (kh - 1) - 1) // st + 1, (w + 2 * pad - dil * (kw_ - 1) - 1) // st + 1
    x = rnd(b, ci, h, w, dtype=dtype)
    kw = _chain_args(b, co, ho, wo, bn_mode, relu, pool, dtype)
    src, out = torch.randint(0, ci, (k,), device=DEV), torch.randint(0, co, (k,), device=DEV)
    off_h = torch.randint(0, kh, (k,), device=DEV) * dil - pad
    off_w = torch.randint(0, kw_, (k,), device=DEV) * dil - pad
    args = (x, src, off_h, off_w, out, 1e-2, st, st, ho, wo, co)
    close(KT.conv_delta_chain(*args, **kw), KR.conv_delta_chain(*args, **kw), dtype)


def _dense_kw(b, c, h, w, bn_mode, res, relu, pool, gavg, dtype):
    kw = dict(bn_mode=bn_mode, relu=relu, global_avg=gavg, eps=1e-5)
    if bn_mode:
        kw.update(bn_weight=rnd(c, dtype=dtype), bn_bias=rnd(c, dtype=dtype))
    if res:
        kw["residual"] = rnd(b, c, h, w, dtype=dtype)
    if pool:
        kw.update(pool_k=pool[0], pool_s=pool[1])
    return kw


# (B, K, C, H, W, bn_mode, residual, relu, pool, global_avg)
DENSE_CASES = [
    (2, 3, 5, 7, 6, 1, True, True, (3, 2), False),
    (2, 2, 3, 5, 5, 1, False, True, (2, 2), True),
    (1, 1, 1, 1, 1, 2, True, True, None, True),
    (3, 2, 4, 4, 4, 0, False, False, None, False),
    (2, 3, 6, 8, 8, 1, True, True, None, True),
    (1, 2, 3, 3, 3, 1, False, False, None, False),
    (2, 2, 11, 3, 4, 1, True, True, (2, 1), True),   # several channel blocks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DENSE_CASES)
def test_bn_act_dense(case, dtype):
    b, k, c, h, w, bn_mode, res, relu, pool, gavg = case
    vals = rnd(b, k, c, h, w, dtype=dtype) + 0.5
    kw = _dense_kw(b, c, h, w, bn_mode, res, relu, pool, gavg, dtype)
    close(KT.bn_act_dense(vals, **kw), KR.bn_act_dense(vals, **kw), dtype)


# (B, K, C_in, C_out, H, W, kh, kw, stride, pad, dil, bn_mode, residual, relu, pool, global_avg)
CONV1_CASES = [
    (2, 2, 4, 3, 6, 7, 3, 3, 1, 1, 1, 1, True, True, (3, 2), False),
    (1, 1, 2, 3, 5, 5, 3, 3, 2, 0, 1, 2, False, True, None, True),
    (2, 2, 3, 3, 7, 6, 3, 3, 1, 2, 2, 1, False, True, (2, 2), False),
    (3, 2, 3, 4, 4, 4, 1, 1, 2, 0, 1, 0, True, False, None, False),
    (2, 3, 2, 3, 1, 1, 3, 3, 1, 1, 1, 1, True, True, None, True),   # 1x1 spatial
    (2, 2, 3, 3, 5, 6, 3, 1, 1, 1, 1, 1, False, True, None, False),
    (2, 2, 3, 11, 4, 3, 3, 3, 1, 1, 1, 1, False, True, (2, 2), False),   # several channel blocks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV1_CASES)
def test_conv1ch_chain(case, dtype):
    b, k, ci, co, h, w, kh, kw_, st, pad, dil, bn_mode, res, relu, pool, gavg = case
    ho, wo = (h + 2 * pad - dil * (kh - 1) - 1) // st + 1, (w + 2 * pad - dil * (kw_ - 1) - 1) // st + 1
    delta = rnd(b, k, h, w, dtype=dtype) * 0.1
    weight = rnd(co, ci, kh, kw_, dtype=dtype)
    base = rnd(b, co, ho, wo, dtype=dtype)
    ch = torch.randint(0, ci, (k,), device=DEV)
    kw = _dense_kw(b, co, ho, wo, bn_mode, res, relu, pool, gavg, dtype)
    args = (delta, ch, weight, st, st, pad, pad, dil, dil, base)
    close(KT.conv1ch_chain(*args, **kw), KR.conv1ch_chain(*args, **kw), dtype)


def _ce_base(b, n, dtype, dominant=False):
    logits = rnd(b, n, dtype=dtype) * 2
    target = torch.randint(0, n, (b,), device=DEV)
    if dominant:  # p rounds to 1: log1p(p * expm1(d)) overflows and the kernels fall back
        logits[:, 0] = 60.0
        logits[0, 1] = 80.0
    return logits, target


# (B, K, N, N_in, dominant)
CE_CASES = [(3, 20, 37, 5, False), (1, 1, 2, 1, False), (4, 7, 10, 20, True)]


def ce_tol(dtype, dom):
    # p within 1e-9 of 1 and delta << 0: log1p(p * expm1(d)) amplifies one ulp of expm1 by 1/(1-p);
    # torch's own expm1 is not correctly rounded there, so the backends agree only to ~1e-8.
    return 1e-7 if dom and dtype == torch.float64 else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CE_CASES)
def test_linear_weight_ce(case, dtype):
    b, k, n, nin, dom = case
    logits, target = _ce_base(b, n, dtype, dom)
    x = rnd(b, nin, dtype=dtype) * (1e3 if dom else 1)
    idx = torch.randint(0, n * nin, (k,), device=DEV)
    if dom:
        idx[:2] = torch.tensor([0, nin], device=DEV)  # coordinates of the dominant logits
    args = (x, logits, target, idx, 0.5)
    close(KT.linear_weight_ce(*args), KR.linear_weight_ce(*args), dtype, ce_tol(dtype, dom))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CE_CASES)
def test_linear_rank1_ce(case, dtype):
    b, k, n, nin, dom = case
    logits, target = _ce_base(b, n, dtype, dom)
    values = rnd(b, k, dtype=dtype) * (300 if dom else 0.1)
    args = (values, torch.randint(0, nin, (k,), device=DEV), rnd(n, nin, dtype=dtype), logits, target)
    close(KT.linear_rank1_ce(*args), KR.linear_rank1_ce(*args), dtype, ce_tol(dtype, dom))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CE_CASES)
def test_linear_dense_ce(case, dtype):
    b, k, n, nin, dom = case
    logits, target = _ce_base(b, n, dtype, dom)
    base = rnd(b, nin, dtype=dtype)
    values = base[:, None] + rnd(b, k, nin, dtype=dtype) * (100 if dom else 0.05)
    args = (values.contiguous(), base, rnd(n, nin, dtype=dtype), logits, target)
    close(KT.linear_dense_ce(*args), KR.linear_dense_ce(*args), dtype, ce_tol(dtype, dom))


def test_bad_input_is_rejected_before_the_kernel():
    vals = rnd(2, 3, 4, 4, dtype=torch.float32)
    relu_base = rnd(2, 5, 4, 4, dtype=torch.float32)
    ch = torch.zeros(3, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="contiguous"):
        KT.channel_chain(vals.transpose(2, 3), ch, 0, None, None, None, relu_base)
    with pytest.raises(TypeError, match="dtype"):
        KT.channel_chain(vals, ch, 0, None, None, None, relu_base.double())
    with pytest.raises(ValueError, match="out of range"):
        KT.channel_chain(vals, ch + 5, 0, None, None, None, relu_base)
