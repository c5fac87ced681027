"""Triton kernels of the perturbation ops (semantics: ``reference.py``; arguments validated by
``Kernels`` in ``__init__.py``).

Every function is one launch. ``conv_delta_chain`` / ``channel_chain`` run one program per
perturbation k; ``conv1ch_chain`` / ``bn_act_dense`` one per (k, block of output channels), so
that a conv tap of the delta is loaded once for the block. A program loops over its planes in
blocks, first for the BatchNorm statistics (accumulated in the input dtype), then to write the
output, recomputing the delta / convolution at each point instead of storing intermediates.
The cross-entropy kernels run one program per (block of k, sample b), in float64 whatever the
input dtype (the logit changes themselves are formed in the input dtype, as the reference does).

float64: everything runs in float64 for float64 inputs. ``libdevice.log1p/expm1`` do not exist
under the interpreter, so ``_log1p``/``_expm1`` are built from ``log``/``exp`` (Kahan's
formulations, within an ulp or two), and the same code is tested on CPU and runs on GPU.

On a GPU block sizes are autotuned; under ``TRITON_INTERPRET=1`` each kernel has one small
config (tuning would benchmark every config in the slow interpreter; small blocks also make the
tests cover the multi-block loops).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..formulas import pool_out
from .spec import BnMode

__all__ = ["conv_delta_chain", "channel_chain", "conv1ch_delta_chain", "conv1ch_chain", "bn_act_dense",
           "linear_weight_ce", "linear_rank1_ce", "linear_dense_ce"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BS_CAP = 16 if _INTERPRET else 64  # spatial width of the dense output tiles (<= every BLOCK)
# Index type of the block offsets: int32 on GPUs (cheap div/mod); int64 under the interpreter,
# which checks every int32 add/mul for overflow at several numpy ops each.
_IDX = tl.constexpr(tl.int64 if _INTERPRET else tl.int32)
# spec.BnMode as compile-time constants (the kernels' BN_MODE argument is its int value)
_BN_BATCH = tl.constexpr(int(BnMode.BATCH))
_BN_RUNNING = tl.constexpr(int(BnMode.RUNNING))
_BN_NONE = tl.constexpr(int(BnMode.NONE))


def _configs(interp: dict, gpu: list[dict], warps=(4, 8)):
    if _INTERPRET:
        return [triton.Config(interp, num_warps=1)]
    return [triton.Config(c, num_warps=w) for c in gpu for w in warps]


# ----------------------------------------------------------------------------- math helpers
@triton.jit
def _expm1(x):
    # Near 0, Kahan: (u - 1) * x / log(u) cancels the rounding error of u = exp(x); elsewhere
    # u - 1 is already within an ulp (and inf / -1 come out right).
    u = tl.exp(x)
    um1 = u - 1.0
    near = (tl.abs(x) < 0.5) & (um1 != 0.0)
    r = tl.where(near, um1 * x / tl.where(near, tl.log(u), 1.0), um1)
    return tl.where(u == 1.0, x, r)


@triton.jit
def _log1p(x):
    # Kahan: log(w) * x / (w - 1) with w = 1 + x rounded cancels the rounding error of w.
    w = 1.0 + x
    dw = w - 1.0
    ok = (dw != 0.0) & (w != float("inf"))
    r = tl.where(ok, tl.log(w) * x / tl.where(ok, dw, 1.0), w)
    return tl.where(dw == 0.0, x, r)


@triton.jit
def _isfinite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


# ----------------------------------------------------------------------------- channel chains
@triton.jit
def _chain_delta(vals, x, s, oh, ow, mu, k, b, i, j, m, K, H, W, CI, HI, WI, SH, SW, GATHER: tl.constexpr):
    """Delta of the chain's input at (b, i, j): loaded, or gathered ``mu * x[b, s, i*SH+oh, j*SW+ow]``."""
    if GATHER:
        ii = i * SH + oh
        jj = j * SW + ow
        ok = m & (ii >= 0) & (ii < HI) & (jj >= 0) & (jj < WI)
        return tl.load(x + ((b * CI + s) * HI + ii) * WI + jj, mask=ok, other=0.0) * mu
    else:
        return tl.load(vals + ((b * K + k) * H + i) * W + j, mask=m, other=0.0)


# Length: one kernel is one launch; the chain's stages share registers and would each reread
# memory if split into functions of their own.
@triton.autotune(configs=_configs({"BLOCK": 64}, [{"BLOCK": b} for b in (256, 1024, 2048)]),
                 key=["KB", "B", "H", "W", "HP", "WP", "GATHER", "BN_MODE", "RELU", "POOL"])
@triton.jit
def _chain_kernel(out, vals, x, src, offh, offw, chan, scal, xhat, inv_std, bnw, rbase, pbase,
                  B, K, KB, C, H, W, CI, HI, WI, SH, SW, HP, WP, PK, PS,
                  GATHER: tl.constexpr, BN_MODE: tl.constexpr, RELU: tl.constexpr, POOL: tl.constexpr,
                  BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    c = tl.load(chan + k)
    DT = out.dtype.element_ty
    if GATHER:
        s = tl.load(src + k)
        oh = tl.load(offh + k)
        ow = tl.load(offw + k)
        mu = tl.load(scal)
    else:
        s = 0
        oh = 0
        ow = 0
        mu = 0.0
    HW = H * W
    ar = tl.arange(0, BLOCK).to(_IDX)
    if BN_MODE == _BN_BATCH:
        # formulas.batch_norm_delta: new statistics from moments of the delta (no cancellation).
        sd = tl.zeros([BLOCK], DT)
        sxd = tl.zeros([BLOCK], DT)
        sdd = tl.zeros([BLOCK], DT)
        for t0 in range(0, B * HW, BLOCK):
            t = t0 + ar
            m = t < B * HW
            b = t // HW
            r = t % HW
            d = _chain_delta(vals, x, s, oh, ow, mu, k, b, r // W, r % W, m, K, H, W, CI, HI, WI, SH, SW, GATHER)
            xh = tl.load(xhat + (b * C + c) * HW + r, mask=m, other=0.0)
            sd += d
            sxd += xh * d
            sdd += d * d
        n = B * HW
        d_mean = tl.sum(sd, 0) / n
        d_var = (2 * tl.sum(sxd, 0) + tl.sum(sdd, 0)) / n - d_mean * d_mean
        inv = tl.load(inv_std + c)
        std = 1.0 / inv
        new_inv = 1.0 / tl.sqrt(std * std + d_var)
        d_inv = -d_var * inv * new_inv / (std + 1.0 / new_inv)
        wc = tl.load(bnw + c)
        g_x = d_inv * wc
        g_d = new_inv * wc
        cst = -d_mean * g_d
    elif BN_MODE == _BN_RUNNING:
        wc = tl.load(bnw + c)
    if POOL:
        NP = HP * WP
        for t0 in range(0, B * NP, BLOCK):
            t = t0 + ar
            m = t < B * NP
            b = t // NP
            r = t % NP
            best = tl.full([BLOCK], float("-inf"), DT)
            bx = tl.zeros([BLOCK], DT)
            bd = tl.zeros([BLOCK], DT)
            # max pool commutes with the ReLU: the argmax of x0 + d over the clipped window holds
            # base input bx and change bd; the exact change is taken there (no pooled difference)
            for u in range(PK):
                i = (r // WP) * PS + u
                for v in range(PK):
                    j = (r % WP) * PS + v
                    ok = m & (i < H) & (j < W)
                    d = _chain_delta(vals, x, s, oh, ow, mu, k, b, i, j, ok, K, H, W, CI, HI, WI, SH, SW, GATHER)
                    off = ((b * C + c) * H + i) * W + j
                    if BN_MODE == _BN_BATCH:
                        d = (cst + tl.load(xhat + off, mask=ok, other=0.0) * g_x) + d * g_d
                    elif BN_MODE == _BN_RUNNING:
                        d = d * wc
                    x0 = tl.load(rbase + off, mask=ok, other=0.0)
                    take = ok & ((x0 + d > best) | ((u == 0) & (v == 0)))
                    best = tl.where(take, x0 + d, best)
                    bx = tl.where(take, x0, bx)
                    bd = tl.where(take, d, bd)
            m0 = tl.load(pbase + (b * C + c) * NP + r, mask=m, other=0.0)
            res = tl.where(m0 > 0, tl.maximum((bx - m0) + bd, -m0), tl.maximum(bx + bd, 0.0))
            tl.store(out + (b * K + k) * NP + r, res, mask=m)
    else:
        for t0 in range(0, B * HW, BLOCK):
            t = t0 + ar
            m = t < B * HW
            b = t // HW
            r = t % HW
            d = _chain_delta(vals, x, s, oh, ow, mu, k, b, r // W, r % W, m, K, H, W, CI, HI, WI, SH, SW, GATHER)
            off = (b * C + c) * HW + r
            if BN_MODE == _BN_BATCH:
                d = (cst + tl.load(xhat + off, mask=m, other=0.0) * g_x) + d * g_d
            elif BN_MODE == _BN_RUNNING:
                d = d * wc
            if RELU:
                x0 = tl.load(rbase + off, mask=m, other=0.0)
                d = tl.where(x0 > 0, tl.maximum(d, -x0), tl.maximum(x0 + d, 0.0))
            tl.store(out + (b * K + k) * HW + r, d, mask=m)


@functools.lru_cache(maxsize=64)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float scalar as a 1-element tensor (Triton passes Python floats as fp32); cached, since mu
    and eps rarely change, so that a call stays one launch."""
    return torch.full((1,), value, dtype=dtype, device=device)


def _k_bucket(k: int) -> int:
    """Autotuning key for the number of perturbations: its power of two (capped), so a config
    tuned at K = 1 is not reused at K = 1400 and a new chunk length does not re-tune."""
    return min(triton.next_power_of_2(max(int(k), 1)), 4096)


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, not the current one (tensors on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _pick(t, fallback):
    """An unused optional tensor is never dereferenced: pass a real tensor in its place."""
    return t if t is not None and t.numel() else fallback


def _chain(ref, b, k, h, w, vals, x, src, off_h, off_w, chan, mu, stride_h, stride_w,
           bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base):
    relu, pool = relu_base.numel() > 0, pool_k > 0
    c = relu_base.shape[1] if relu else bn_weight.shape[0]
    hp, wp = (pool_base.shape[2], pool_base.shape[3]) if pool else (h, w)
    out = torch.empty((b, k, hp, wp), dtype=ref.dtype, device=ref.device)
    if out.numel() == 0:
        return out
    gather = x is not None
    scal = _scalar(float(mu) if gather else 0.0, ref.dtype, ref.device)
    ci, hi, wi = x.shape[1:] if gather else (1, 1, 1)
    with _on_device(ref):
        _chain_kernel[(k,)](
            out, _pick(vals, ref), _pick(x, ref), _pick(src, chan), _pick(off_h, chan), _pick(off_w, chan), chan,
            scal, _pick(bn_xhat, ref), _pick(bn_inv_std, ref), _pick(bn_weight, ref), _pick(relu_base, ref),
            _pick(pool_base, ref), b, k, _k_bucket(k), c, h, w, ci, hi, wi, stride_h, stride_w, hp, wp, pool_k, pool_s,
            GATHER=gather, BN_MODE=bn_mode, RELU=relu, POOL=pool)
    return out


def channel_chain(values, channel, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                  pool_k, pool_s, pool_base):
    b, k, h, w = values.shape
    e = values.new_empty(0)
    return _chain(values, b, k, h, w, values, None, e, e, e, channel, 0.0, 1, 1, bn_mode, bn_xhat,
                  bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base)


def conv_delta_chain(x, src_channel, off_h, off_w, out_channel, mu, stride_h, stride_w, h_out, w_out,
                     bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base):
    return _chain(x, x.shape[0], src_channel.numel(), h_out, w_out, x.new_empty(0), x, src_channel, off_h,
                  off_w, out_channel, mu, stride_h, stride_w, bn_mode, bn_xhat, bn_inv_std, bn_weight,
                  relu_base, pool_k, pool_s, pool_base)


# ----------------------------------------------------------------------------- dense chains
@triton.jit
def _dense_val(vals, delta, ch, wgt, base, k, c, b, i, j, mp, mc, K, C, H, W, CI, HI, WI, KH, KW,
               SH, SW, PH, PW, DH, DW, CONV: tl.constexpr):
    """Perturbed values at channels ``c`` x positions (b, i, j) (masks ``mc``, ``mp``; they
    broadcast): loaded, or ``base_out`` + the one-channel conv of the delta."""
    if CONV:
        # the delta tap is loaded once for the channel block; addressing hoisted out of the taps
        dp = delta + (b * K + k) * (HI * WI)
        wp = wgt + (c * CI + ch) * (KH * KW)
        i0 = i * SH - PH
        j0 = j * SW - PW
        acc = tl.zeros_like(mp & mc).to(base.dtype.element_ty)
        for u in range(KH):
            ii = i0 + u * DH
            mrow = mp & (ii >= 0) & (ii < HI)
            rp = dp + ii * WI
            for v in range(KW):
                jj = j0 + v * DW
                dv = tl.load(rp + jj, mask=mrow & (jj >= 0) & (jj < WI), other=0.0)
                acc += dv * tl.load(wp + u * KW + v, mask=mc, other=0.0)
        return tl.load(base + ((b * C + c) * H + i) * W + j, mask=mp & mc, other=0.0) + acc
    else:
        return tl.load(vals + (((b * K + k) * C + c) * H + i) * W + j, mask=mp & mc, other=0.0)


@triton.jit
def _dense_act(v, res, b, c, i, j, m, C, H, W, mean, rs, wc, bc,
               BN_MODE: tl.constexpr, RES: tl.constexpr, RELU: tl.constexpr):
    if BN_MODE == _BN_BATCH:
        v = (v - mean) * rs * wc + bc
    elif BN_MODE == _BN_RUNNING:
        v = v * wc + bc
    if RES:
        v = v + tl.load(res + ((b * C + c) * H + i) * W + j, mask=m, other=0.0)
    if RELU:
        v = tl.maximum(v, 0.0)
    return v


# Length: one kernel is one launch (conv tap loop, statistics and tail in registers).
@triton.autotune(configs=_configs({"BC": 8, "BLOCK": 64},
                                  [{"BC": bc, "BLOCK": bl} for bc, bl in ((1, 1024), (4, 256), (8, 256), (16, 64))]),
                 key=["KB", "B", "C", "H", "W", "HI", "WI", "KH", "KW", "HP", "WP", "CONV", "BN_MODE", "RES", "RELU",
                      "POOL", "GLOBAL"])
@triton.jit
def _dense_kernel(out, vals, delta, chan, wgt, base, bnw, bnb, scal, res,
                  B, K, KB, C, H, W, CI, HI, WI, KH, KW, SH, SW, PH, PW, DH, DW, HP, WP, PK, PS,
                  CONV: tl.constexpr, BN_MODE: tl.constexpr, RES: tl.constexpr, RELU: tl.constexpr,
                  POOL: tl.constexpr, GLOBAL: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
                  BLOCK: tl.constexpr):
    # one program per (k, block of BC channels); BLOCK positions per channel
    nc = tl.cdiv(C, BC)
    pid = tl.program_id(0)
    k = (pid // nc).to(tl.int64)
    cb = (pid % nc) * BC + tl.arange(0, BC).to(_IDX)
    mcb = cb < C
    DT = out.dtype.element_ty
    ch = 0
    if CONV:
        ch = tl.load(chan + k)
    HW = H * W
    mean = tl.zeros([BC], DT)
    rs = tl.full([BC], 1, DT)
    wc = tl.full([BC], 1, DT)
    bc = tl.zeros([BC], DT)
    if BN_MODE != _BN_NONE:
        wc = tl.load(bnw + cb, mask=mcb, other=1.0)
        bc = tl.load(bnb + cb, mask=mcb, other=0.0)
    if BN_MODE == _BN_BATCH:
        # mean and variance over (B, H, W): exact two-pass per block, blocks merged with Chan's formula
        cnt = tl.full([], 0, DT)
        m2 = tl.zeros([BC], DT)
        ar = tl.arange(0, BLOCK).to(_IDX)
        for t0 in range(0, B * HW, BLOCK):
            t = (t0 + ar)[None, :]
            mp = t < B * HW
            b = t // HW
            r = t % HW
            v = _dense_val(vals, delta, ch, wgt, base, k, cb[:, None], b, r // W, r % W, mp, mcb[:, None],
                           K, C, H, W, CI, HI, WI, KH, KW, SH, SW, PH, PW, DH, DW, CONV)
            nb = tl.minimum(B * HW - t0, BLOCK).to(DT)
            bm = tl.sum(v, 1) / nb  # masked lanes load 0
            dv = tl.where(mp, v - bm[:, None], 0.0)
            tot = cnt + nb
            dl = bm - mean
            mean = mean + dl * (nb / tot)
            m2 = m2 + tl.sum(dv * dv, 1) + dl * dl * (cnt * nb / tot)
            cnt = tot
        rs = 1.0 / tl.sqrt(m2 / (B * HW) + tl.load(scal))
    # output tiles (BC, BB, BS): channels x samples x output positions
    BB: tl.constexpr = BLOCK // BS
    NO = HP * WP
    c3 = cb[:, None, None]
    mc3 = mcb[:, None, None]
    mean3 = mean[:, None, None]
    rs3 = rs[:, None, None]
    wc3 = wc[:, None, None]
    bc3 = bc[:, None, None]
    for b0 in range(0, B, BB):
        bv = b0 + tl.arange(0, BB).to(_IDX)
        b = bv[None, :, None]
        acc = tl.zeros([BC, BB], DT)
        for s0 in range(0, NO, BS):
            s = (s0 + tl.arange(0, BS).to(_IDX))[None, None, :]
            mp = (b < B) & (s < NO)
            if POOL:
                y = tl.full([BC, BB, BS], float("-inf"), DT)
                for u in range(PK):
                    i = (s // WP) * PS + u
                    for v in range(PK):
                        j = (s % WP) * PS + v
                        ok = mp & (i < H) & (j < W)
                        val = _dense_val(vals, delta, ch, wgt, base, k, c3, b, i, j, ok, mc3, K, C, H, W, CI, HI,
                                         WI, KH, KW, SH, SW, PH, PW, DH, DW, CONV)
                        val = _dense_act(val, res, b, c3, i, j, ok & mc3, C, H, W, mean3, rs3, wc3, bc3,
                                         BN_MODE, RES, RELU)
                        # torch's max-pool propagates NaN; tl.maximum drops it by default
                        y = tl.maximum(y, tl.where(ok, val, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
            else:
                i = s // WP
                j = s % WP
                y = _dense_val(vals, delta, ch, wgt, base, k, c3, b, i, j, mp, mc3, K, C, H, W, CI, HI, WI, KH, KW,
                               SH, SW, PH, PW, DH, DW, CONV)
                y = _dense_act(y, res, b, c3, i, j, mp & mc3, C, H, W, mean3, rs3, wc3, bc3, BN_MODE, RES, RELU)
            if GLOBAL:
                acc += tl.sum(tl.where(mp, y, 0.0), 2)
            else:
                tl.store(out + ((b * K + k) * C + c3) * NO + s, y, mask=mp & mc3)
        if GLOBAL:
            tl.store(out + (bv[None, :] * K + k) * C + cb[:, None], acc / NO,
                     mask=(bv[None, :] < B) & mcb[:, None])


def _dense(ref, b, k, c, h, w, vals, delta, chan, weight, conv, base, bn_mode, bn_weight, bn_bias, eps,
           residual, relu, pool_k, pool_s, global_avg):
    hp, wp = (pool_out(h, pool_k, pool_s), pool_out(w, pool_k, pool_s)) if pool_k else (h, w)
    out = torch.empty((b, k, c) if global_avg else (b, k, c, hp, wp), dtype=ref.dtype, device=ref.device)
    if out.numel() == 0:
        return out
    scal = _scalar(float(eps), ref.dtype, ref.device)
    ci, kh, kw = weight.shape[1:] if weight is not None else (1, 1, 1)
    hi, wi = delta.shape[2:] if delta is not None else (1, 1)
    sh, sw, ph, pw, dh, dw = conv
    grid = lambda meta: (k * triton.cdiv(c, meta["BC"]),)  # noqa: E731
    with _on_device(ref):
        _dense_kernel[grid](
            out, _pick(vals, ref), ref if delta is None else delta, chan, ref if weight is None else weight,
            _pick(base, ref), _pick(bn_weight, ref), _pick(bn_bias, ref), scal, _pick(residual, ref),
            b, k, _k_bucket(k), c, h, w, ci, hi, wi, kh, kw, sh, sw, ph, pw, dh, dw, hp, wp, pool_k, pool_s,
            CONV=delta is not None, BN_MODE=bn_mode, RES=residual.numel() > 0, RELU=relu, POOL=pool_k > 0,
            GLOBAL=global_avg, BS=min(triton.next_power_of_2(hp * wp), _BS_CAP))
    return out


def bn_act_dense(values, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg):
    b, k, c, h, w = values.shape
    chan = torch.zeros(1, dtype=torch.int64, device=values.device)  # unused without the conv
    return _dense(values, b, k, c, h, w, values, None, chan, None, (1,) * 6, values.new_empty(0), bn_mode,
                  bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg)


def conv1ch_chain(delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, base_out,
                  bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg):
    b, c, h, w = base_out.shape
    return _dense(delta, b, delta.shape[1], c, h, w, delta.new_empty(0), delta, channel, weight,
                  (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w), base_out, bn_mode, bn_weight, bn_bias, eps,
                  residual, relu, pool_k, pool_s, global_avg)


def conv1ch_delta_chain(delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, bn_mode, bn_xhat,
                        bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base, global_avg):
    # Two launches: the vendor grouped convolution of the one-channel deltas (cuDNN, in the
    # precision the engine set), then channel_chain over the K * C_out (k, c) planes.
    b, k = delta.shape[:2]
    c_out = weight.shape[0]
    wk = weight.index_select(1, channel).transpose(0, 1).reshape(k * c_out, 1, *weight.shape[2:]).contiguous()
    dz = F.conv2d(delta, wk, None, (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w), k).contiguous()
    items = torch.arange(c_out, device=delta.device).repeat(k)
    out = channel_chain(dz, items, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base)
    out = out.reshape(b, k, c_out, *out.shape[2:])
    return out.mean((3, 4), keepdim=True) if global_avg else out


# ----------------------------------------------------------------------------- cross-entropy
# One kernel per purpose, each one program per (block of BK perturbations, sample b), in float64:
# _weight_ce_kernel (one logit changes: the closed form per coordinate), _rank1_ce_kernel and
# _dense_ce_kernel (every logit changes: _row_ce over rows of logit changes that _row_delta forms
# block by block). Where log1p overflows (p rounded to 1, a large negative change) they fall back
# to the logsumexp form, as formulas.cross_entropy_delta does.
@triton.jit
def _logit_block(logits, b, n0, N, BN: tl.constexpr):
    """Columns ``jn`` of block n0, their mask and the base logits of sample b (float64, -inf outside)."""
    jn = n0 + tl.arange(0, BN).to(_IDX)
    mn = jn < N
    return jn, mn, tl.load(logits + b * N + jn, mask=mn, other=float("-inf")).to(tl.float64)


@triton.jit
def _row_lse(logits, b, N, BN: tl.constexpr):
    """float64 logsumexp of row b as (max, log of the shifted sum), online over blocks of N; kept
    apart so that log p = (l - max) - log_sum keeps its digits when p is close to 1."""
    mx = tl.full([], float("-inf"), tl.float64)
    s = tl.full([], 0, tl.float64)
    for n0 in range(0, N, BN):
        jn, mn, l = _logit_block(logits, b, n0, N, BN)
        cm = tl.maximum(mx, tl.max(l, 0))
        s = s * tl.exp(mx - cm) + tl.sum(tl.exp(l - cm), 0)
        mx = cm
    return mx, tl.log(s)


@triton.jit
def _lse_step(mx, s, v):
    """One block of an online logsumexp per row of ``v`` ``(BK, BN)``."""
    cm = tl.maximum(mx, tl.max(v, 1))
    s = s * tl.exp(mx - cm) + tl.sum(tl.exp(v - cm[:, None]), 1)
    return cm, s


@triton.jit
def _ce_program(K, BK: tl.constexpr):
    """This program's sample b, perturbations ks and their mask."""
    ks = tl.program_id(1) * BK + tl.arange(0, BK).to(_IDX)
    return tl.program_id(0).to(tl.int64), ks, ks < K


@triton.jit
def _dense_logit_delta(values, base, weight, b, ks, mk, jn, mn, K, NIN, DT: tl.constexpr,
                       BK: tl.constexpr, BN: tl.constexpr, BI: tl.constexpr):
    """``(values[b, ks] - base[b]) @ weight[jn].T`` in the input dtype, as float64 ``(BK, BN)``."""
    acc = tl.zeros([BK, BN], DT)
    for i0 in range(0, NIN, BI):
        ii = i0 + tl.arange(0, BI).to(_IDX)
        mi = ii < NIN
        a = tl.load(values + (b * K + ks[:, None]) * NIN + ii[None, :], mask=mk[:, None] & mi[None, :], other=0.0)
        a = a - tl.load(base + b * NIN + ii, mask=mi, other=0.0)[None, :]
        wt = tl.load(weight + jn[None, :] * NIN + ii[:, None], mask=mi[:, None] & mn[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision="ieee", out_dtype=DT)  # float64 needs out_dtype (Triton 3.6)
    return acc.to(tl.float64)


@triton.jit
def _row_delta(values, base, weight, vk, ch, b, ks, mk, jn, mn, K, NIN, DT: tl.constexpr, DENSE: tl.constexpr,
               BK: tl.constexpr, BN: tl.constexpr, BI: tl.constexpr):
    """Logit changes ``(BK, BN)`` of columns jn: dense features (``_dense_logit_delta``), or feature
    ``ch[k]`` changed by ``vk[k]``: ``vk * weight[jn, ch]``, rounded in the input dtype."""
    if DENSE:
        d = _dense_logit_delta(values, base, weight, b, ks, mk, jn, mn, K, NIN, DT, BK, BN, BI)
    else:
        w = tl.load(weight + jn[None, :] * NIN + ch[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        d = (vk[:, None] * w).to(tl.float64)
    return d


@triton.jit
def _row_ce(logits, target, values, base, weight, vk, ch, b, ks, mk, K, N, NIN, DT: tl.constexpr,
            DENSE: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BI: tl.constexpr):
    """``log1p(sum_j p_j expm1(d_j)) - d_y`` for rows of logit changes (``_row_delta``)."""
    mx0, ls0 = _row_lse(logits, b, N, BN)
    y = tl.load(target + b)
    dy = tl.zeros([BK], tl.float64)
    acc = tl.zeros([BK], tl.float64)
    for n0 in range(0, N, BN):
        jn, mn, l = _logit_block(logits, b, n0, N, BN)
        d = _row_delta(values, base, weight, vk, ch, b, ks, mk, jn, mn, K, NIN, DT, DENSE, BK, BN, BI)
        dy += tl.sum(tl.where(jn[None, :] == y, d, 0.0), 1)
        acc += tl.sum(tl.exp((l - mx0) - ls0)[None, :] * _expm1(d), 1)  # masked columns: p = 0, d = 0
    res = _log1p(acc) - dy
    bad = mk & ~_isfinite(res)
    if tl.sum(bad.to(tl.int32), 0) > 0:
        mx = tl.full([BK], float("-inf"), tl.float64)
        s = tl.zeros([BK], tl.float64)
        for n0 in range(0, N, BN):
            jn, mn, l = _logit_block(logits, b, n0, N, BN)
            d = _row_delta(values, base, weight, vk, ch, b, ks, mk, jn, mn, K, NIN, DT, DENSE, BK, BN, BI)
            mx, s = _lse_step(mx, s, l[None, :] + d)
        res = tl.where(bad, (mx + tl.log(s)) - (mx0 + ls0) - dy, res)
    return res


@triton.autotune(configs=_configs({"BK": 16, "BN": 16}, [{"BK": bk, "BN": bn} for bk in (16, 64) for bn in (16, 64)]),
                 key=["KB", "B", "N", "NIN"])
@triton.jit
def _weight_ce_kernel(out, x, logits, target, idx, scal, K, KB, B, N, NIN, BK: tl.constexpr, BN: tl.constexpr):
    """linear_weight_ce: logit ``idx // NIN`` changes by ``mu * x[b, idx % NIN]``."""
    b, ks, mk = _ce_program(K, BK)
    mx0, ls0 = _row_lse(logits, b, N, BN)
    y = tl.load(target + b)
    ix = tl.load(idx + ks, mask=mk, other=0)
    i = ix // NIN
    d = (tl.load(x + b * NIN + ix % NIN, mask=mk, other=0.0) * tl.load(scal)).to(tl.float64)
    p = tl.exp((tl.load(logits + b * N + i, mask=mk, other=0.0).to(tl.float64) - mx0) - ls0)
    dy = tl.where(i == y, d, 0.0)
    res = _log1p(p * _expm1(d)) - dy
    bad = mk & ~_isfinite(res)
    if tl.sum(bad.to(tl.int32), 0) > 0:
        mx = tl.full([BK], float("-inf"), tl.float64)
        s = tl.zeros([BK], tl.float64)
        for n0 in range(0, N, BN):
            jn, mn, l = _logit_block(logits, b, n0, N, BN)
            mx, s = _lse_step(mx, s, l[None, :] + tl.where(jn[None, :] == i[:, None], d[:, None], 0.0))
        res = tl.where(bad, (mx + tl.log(s)) - (mx0 + ls0) - dy, res)
    tl.store(out + ks * B + b, res, mask=mk)


@triton.autotune(configs=_configs({"BK": 16, "BN": 16}, [{"BK": bk, "BN": bn} for bk in (16, 64) for bn in (16, 64)]),
                 key=["KB", "B", "N", "NIN"])
@triton.jit
def _rank1_ce_kernel(out, values, channel, weight, logits, target, K, KB, B, N, NIN,
                     BK: tl.constexpr, BN: tl.constexpr):
    """linear_rank1_ce: input feature ``channel[k]`` changes by ``values[b, k]``."""
    b, ks, mk = _ce_program(K, BK)
    vk = tl.load(values + b * K + ks, mask=mk, other=0.0)
    ch = tl.load(channel + ks, mask=mk, other=0)
    res = _row_ce(logits, target, values, values, weight, vk, ch, b, ks, mk, K, N, NIN, values.dtype.element_ty,
                  False, BK, BN, 1)
    tl.store(out + ks * B + b, res, mask=mk)


@triton.autotune(configs=_configs({"BK": 16, "BN": 16, "BI": 16},
                                  [{"BK": bk, "BN": bn, "BI": 32} for bk in (16, 64) for bn in (16, 64)]),
                 key=["KB", "B", "N", "NIN"])
@triton.jit
def _dense_ce_kernel(out, values, base, weight, logits, target, K, KB, B, N, NIN,
                     BK: tl.constexpr, BN: tl.constexpr, BI: tl.constexpr):
    """linear_dense_ce: the input features ``base[b]`` become ``values[b, k]`` (``NIN`` of them)."""
    b, ks, mk = _ce_program(K, BK)
    res = _row_ce(logits, target, values, base, weight, ks, ks, b, ks, mk, K, N, NIN, values.dtype.element_ty,
                  True, BK, BN, BI)
    tl.store(out + ks * B + b, res, mask=mk)


def _ce(kernel, k, n_in, logits, *args):
    """Launch a cross-entropy kernel over (blocks of k, samples): ``(K, B)`` float64."""
    b, n = logits.shape
    out = torch.empty((k, b), dtype=torch.float64, device=logits.device)
    if out.numel() == 0:
        return out
    # Samples on grid axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535), chunks of K on axis 1.
    grid = lambda meta: (b, triton.cdiv(k, meta["BK"]))  # noqa: E731
    with _on_device(logits):
        kernel[grid](out, *args, k, _k_bucket(k), b, n, n_in)
    return out


def linear_weight_ce(x, logits, target, idx, mu):
    scal = _scalar(float(mu), x.dtype, x.device)
    return _ce(_weight_ce_kernel, idx.numel(), x.shape[1], logits, x, logits, target, idx, scal)


def linear_rank1_ce(values, channel, weight, logits, target):
    return _ce(_rank1_ce_kernel, values.shape[1], weight.shape[1], logits, values, channel, weight, logits, target)


def linear_dense_ce(values, base, weight, logits, target):
    return _ce(_dense_ce_kernel, values.shape[1], values.shape[2], logits, values, base, weight, logits, target)
