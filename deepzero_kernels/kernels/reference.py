"""Torch reference of the fused kernels: the semantics every backend keeps.

Each function here is one launch in the triton and native backends, with the same flat
arguments (the schema of the native operators ``torch.ops.deepzero.*``: absent optional tensors
are empty tensors). All tensors are contiguous, on one device, in one floating dtype (float32 or
float64) except the int64 index tensors; ``validate.py`` checks that before any kernel runs, and
the validated entry points (``Kernels``) take typed specs (``spec.py``). Layouts are
sample-major, as the engine stores deltas: ``(B, K, ...)``.

BatchNorm modes (``bn_mode``, a :class:`~.spec.BnMode`):

* ``NONE``: no BatchNorm in the chain;
* ``BATCH``: batch statistics (training mode). Per perturbation k, the changed channel's mean and
  variance are those of its own batch of B samples;
* ``RUNNING``: fixed affine (running statistics): ``y = x * bn_weight + bn_bias`` per channel, with
  ``bn_weight = weight * rsqrt(running_var + eps)``, ``bn_bias = bias - running_mean * bn_weight``.

Chains after the BatchNorm: an optional ReLU and an optional max pool (window ``pool_k``,
stride ``pool_s``, no padding; windows of a ``ceil_mode`` pool are clipped at the border, and
the pooled size is taken from ``pool_base``). A residual add of an unchanged tensor between the
BatchNorm and the ReLU needs no argument for one-channel deltas: it is in ``relu_base``, the
base value of the ReLU's input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formulas import batch_norm_delta, cross_entropy_delta, pool_out
from .spec import BnMode

__all__ = ["conv_delta_chain", "channel_chain", "conv1ch_delta_chain", "conv1ch_chain", "bn_act_dense",
           "linear_weight_ce", "linear_rank1_ce", "linear_dense_ce"]


def _gather(t: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """``t[:, channel[k]]`` for every k: ``(B, K, ...)``."""
    return t.index_select(1, channel)


def max_pool_clipped(v: torch.Tensor, k: int, s: int, hp: int, wp: int) -> torch.Tensor:
    """Max pool of ``(N, C, H, W)`` with windows clipped at the border, ``(hp, wp)`` outputs."""
    h, w = v.shape[-2:]
    pad_h, pad_w = max(0, (hp - 1) * s + k - h), max(0, (wp - 1) * s + k - w)
    if pad_h or pad_w:
        v = F.pad(v, (0, pad_w, 0, pad_h), value=float("-inf"))
    return F.max_pool2d(v, k, s)[..., :hp, :wp]


def channel_chain(values, channel, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                  pool_k, pool_s, pool_base):
    """Carry one-channel deltas through BatchNorm -> ReLU -> max pool.

    Args:
        values: ``(B, K, H, W)`` change of channel ``channel[k]`` of the chain's input.
        channel: ``(K,)`` int64 channels in ``[0, C)``.
        bn_mode: a ``BnMode`` (module docstring).
        bn_xhat: ``BATCH``: ``(B, C, H, W)`` centred base input of the BatchNorm (``x - mean``).
        bn_inv_std: ``BATCH``: ``(C,)`` ``1/sqrt(var + eps)`` of the base batch (biased variance).
        bn_weight: ``BATCH`` and ``RUNNING``: ``(C,)`` scale (``BATCH``: the affine weight, ones if none).
        relu_base: ``(B, C, H, W)`` base input of the ReLU, or an empty tensor for no ReLU.
        pool_k, pool_s: max-pool window and stride; 0 for no pool (a pool needs a ReLU).
        pool_base: ``(B, C, Hp, Wp)`` base output of the pool (empty without a pool).
    Returns:
        ``(B, K, H, W)`` (or ``(B, K, Hp, Wp)`` with a pool): the change of the chain's output,
        channel ``channel[k]``.
    """
    d = values
    if bn_mode == BnMode.BATCH:
        d = batch_norm_delta(_gather(bn_xhat, channel), bn_inv_std[channel].view(1, -1, 1, 1),
                             bn_weight[channel].view(1, -1, 1, 1), d, (0, 2, 3))
    elif bn_mode == BnMode.RUNNING:
        d = d * bn_weight[channel].view(1, -1, 1, 1)
    if relu_base.numel() == 0:
        return d
    x0 = _gather(relu_base, channel)
    if pool_k == 0:
        return torch.where(x0 > 0, torch.maximum(d, -x0), torch.clamp_min(x0 + d, 0))
    b, k = d.shape[:2]
    hp, wp = pool_base.shape[-2:]
    # max pool commutes with ReLU: the argmax of the ReLU's perturbed input in each window, then the
    # exact change there from the base input bx and change bd at it, and the base output m0:
    # max((bx - m0) + bd, -m0) where m0 > 0, else relu(bx + bd). No pooled values are subtracted.
    h, w = d.shape[2:]
    pad = (0, max(0, (wp - 1) * pool_s + pool_k - w), 0, max(0, (hp - 1) * pool_s + pool_k - h))
    xp = F.pad(x0, pad, value=float("-inf")).reshape(b * k, 1, h + pad[3], w + pad[1])
    dp = F.pad(d, pad).reshape(b * k, 1, h + pad[3], w + pad[1])
    _, j = F.max_pool2d(xp + dp, pool_k, pool_s, return_indices=True)
    j = j[..., :hp, :wp].reshape(b, k, hp * wp)
    bx = xp.reshape(b, k, -1).gather(2, j).reshape(b, k, hp, wp)
    bd = dp.reshape(b, k, -1).gather(2, j).reshape(b, k, hp, wp)
    m0 = _gather(pool_base, channel)
    return torch.where(m0 > 0, torch.maximum((bx - m0) + bd, -m0), torch.clamp_min(bx + bd, 0))


def conv_delta_chain(x, src_channel, off_h, off_w, out_channel, mu, stride_h, stride_w, h_out, w_out,
                     bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base):
    """The conv weight perturbation ``W[o, c, u, v] += mu`` and the chain after it.

    Perturbation k changes output channel ``out_channel[k]`` by
    ``mu * x[:, src_channel[k], i*stride_h + off_h[k], j*stride_w + off_w[k]]`` for
    ``i < h_out, j < w_out``, zero where that index falls outside ``x`` (zero padding:
    ``off = u * dilation - pad``). ``x`` is the conv's unpadded input ``(B, C_in, H, W)``; the
    chain arguments are those of :func:`channel_chain` with ``channel = out_channel``.
    Returns the chain's output change ``(B, K, ...)``.
    """
    b, _, h, w = x.shape
    k = src_channel.numel()
    i = torch.arange(h_out, device=x.device)[None, :] * stride_h + off_h[:, None]  # (K, h_out)
    j = torch.arange(w_out, device=x.device)[None, :] * stride_w + off_w[:, None]  # (K, w_out)
    ok = ((i >= 0) & (i < h))[:, :, None] & ((j >= 0) & (j < w))[:, None, :]
    flat = src_channel[:, None, None] * (h * w) + i.clamp(0, h - 1)[:, :, None] * w + j.clamp(0, w - 1)[:, None, :]
    vals = x.reshape(b, -1).index_select(1, flat.reshape(-1)).reshape(b, k, h_out, w_out)
    vals = torch.where(ok[None], vals * mu, torch.zeros((), dtype=x.dtype, device=x.device))
    return channel_chain(vals, out_channel, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                         pool_k, pool_s, pool_base)


def conv1ch_delta_chain(delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, bn_mode, bn_xhat,
                        bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base, global_avg):
    """The next conv of one-channel deltas and the chain after it, on deltas throughout.

    Args:
        delta: ``(B, K, H, W)`` change of input channel ``channel[k]`` of the conv.
        weight: ``(C_out, C_in, kh, kw)``; stride/pad/dilation as ``F.conv2d`` (symmetric zero
            padding ``pad_h``, ``pad_w``).
        the rest: the chain of :func:`channel_chain` on the conv's ``C_out`` output channels
            (``bn_xhat``, ``relu_base``, ``pool_base`` have ``C_out`` channels).
        global_avg: return the mean over the spatial dims (``H' = W' = 1``).
    Returns:
        ``(B, K, C_out, H', W')``: the change of the chain's output. Item ``(k, c)`` is the delta
        ``conv(delta[:, k], weight[c, channel[k]])`` of channel c, carried through
        :func:`channel_chain` as a one-channel delta of channel c.
    """
    b, k = delta.shape[:2]
    c_out = weight.shape[0]
    wk = weight.index_select(1, channel).transpose(0, 1).reshape(k * c_out, 1, *weight.shape[2:])
    dz = F.conv2d(delta, wk, None, (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w), k)  # (B, K*C_out, ...)
    items = torch.arange(c_out, device=delta.device).repeat(k)
    out = channel_chain(dz, items, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base)
    out = out.reshape(b, k, c_out, *out.shape[2:])
    return out.mean((3, 4), keepdim=True) if global_avg else out


def bn_act_dense(values, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg):
    """BatchNorm -> (+ residual) -> ReLU -> max pool -> global average on dense perturbed values.

    Args:
        values: ``(B, K, C, H, W)`` perturbed values (each k its own batch of B samples).
        bn_mode: ``NONE``; ``BATCH``: statistics per (k, channel) over (B, H, W) with the affine
            ``bn_weight``, ``bn_bias`` (``(C,)``, ones/zeros if none) and ``eps``; ``RUNNING``: the
            fixed affine ``bn_weight``, ``bn_bias``.
        residual: ``(B, C, H, W)`` unchanged tensor added after the BatchNorm, or empty.
        relu: apply a ReLU. pool_k, pool_s: max pool (0 = none; clipped ``ceil_mode`` windows,
            output ``ceil((H - pool_k) / pool_s) + 1``). global_avg: mean over the spatial dims.
    Returns:
        ``(B, K, C, H', W')`` perturbed values, or ``(B, K, C)`` with ``global_avg``.
    """
    b, k, c, h, w = values.shape
    v = values
    if bn_mode == BnMode.BATCH:
        mean = v.mean((0, 3, 4), keepdim=True)
        var = (v - mean).square().mean((0, 3, 4), keepdim=True)
        v = (v - mean) * torch.rsqrt(var + eps) * bn_weight.view(1, 1, c, 1, 1) + bn_bias.view(1, 1, c, 1, 1)
    elif bn_mode == BnMode.RUNNING:
        v = v * bn_weight.view(1, 1, c, 1, 1) + bn_bias.view(1, 1, c, 1, 1)
    if residual.numel():
        v = v + residual[:, None]
    if relu:
        v = v.clamp_min(0)
    if pool_k:
        hp, wp = pool_out(h, pool_k, pool_s), pool_out(w, pool_k, pool_s)
        v = max_pool_clipped(v.reshape(b * k, c, h, w), pool_k, pool_s, hp, wp).reshape(b, k, c, hp, wp)
    if global_avg:
        v = v.mean((3, 4))
    return v


def conv1ch_chain(delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, base_out,
                  bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg):
    """The next conv of a one-channel delta (groups=1), added to its cached output, and the
    dense chain after it.

    Args:
        delta: ``(B, K, H, W)`` change of input channel ``channel[k]`` of the conv.
        weight: ``(C_out, C_in, kh, kw)``; stride/pad/dilation as ``F.conv2d`` (symmetric
            zero padding ``pad_h``, ``pad_w``).
        base_out: ``(B, C_out, Ho, Wo)`` the conv's base output (bias included).
        the rest: as :func:`bn_act_dense`.
    Returns:
        perturbed values ``(B, K, C_out, Ho', Wo')`` (``(B, K, C_out)`` with ``global_avg``).
    """
    b, k, h, w = delta.shape
    c_out = weight.shape[0]
    wk = weight.index_select(1, channel).transpose(0, 1).reshape(k * c_out, 1, *weight.shape[2:])
    dz = F.conv2d(delta, wk, None, (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w), k)
    v = base_out[:, None] + dz.reshape(b, k, c_out, *dz.shape[2:])
    return bn_act_dense(v, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg)


def linear_weight_ce(x, logits, target, idx, mu):
    """Cross-entropy change ``(K, B)`` (float64) under ``W.view(-1)[idx[k]] += mu`` of the final
    linear layer: logit ``idx // N_in`` changes by ``mu * x[:, idx % N_in]``."""
    n_in = x.shape[1]
    return cross_entropy_delta(logits, target, (x.index_select(1, idx % n_in) * mu).t(), idx // n_in)


def linear_rank1_ce(values, channel, weight, logits, target):
    """Cross-entropy change ``(K, B)`` (float64) when input feature ``channel[k]`` of the final
    linear layer changes by ``values[:, k]``: the logits change by ``values[b, k] * weight[:, channel[k]]``."""
    delta = values.t()[:, :, None] * weight.t().index_select(0, channel)[:, None, :]  # (K, B, N)
    return cross_entropy_delta(logits, target, delta)


def linear_dense_ce(values, base, weight, logits, target):
    """Cross-entropy change ``(K, B)`` (float64) when the final linear layer's input ``base``
    ``(B, N_in)`` becomes ``values[:, k]`` (``(B, K, N_in)``): logits change by
    ``(values - base) @ weight.T``."""
    delta = (values - base[:, None]) @ weight.t()  # (B, K, N)
    return cross_entropy_delta(logits, target, delta.transpose(0, 1))
