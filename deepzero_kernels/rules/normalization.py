"""BatchNorm and LayerNorm. BatchNorm is channel-local, with batch statistics (exact change of mean and variance from
moments of the delta) or running statistics (a per-channel scale); and the source deltas of its
own affine parameters."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..deltas import (ChannelDelta, DenseDelta, DenseValue, FeatureDelta, broadcast_values, densify, expand_base, flat,
                      gather_channels, true_layout, unflat)
from ..formulas import batch_norm_delta, bn_running_scale
from .registry import first_input, only_first_changed, rule, source_rule


def uses_batch_stats(bn) -> bool:
    return bn.training or bn.running_mean is None


@rule(nn.modules.batchnorm._BatchNorm)
def batch_norm_module(ctx, node):
    if not only_first_changed(ctx, node):
        return NotImplemented
    bn = ctx.module(node)
    x = first_input(node)
    rep, xb = ctx.rep(x), ctx.base(x)
    if xb.dim() < 2:
        return NotImplemented
    if isinstance(rep, ChannelDelta) and not true_layout(rep, xb):
        rep = DenseDelta(densify(rep, xb))
    per_k = (1, -1) + (1,) * (xb.dim() - 2)  # broadcasts over (B, K, *inner)
    if uses_batch_stats(bn):
        if isinstance(rep, ChannelDelta):
            x_hat, inv_std = ctx.bn_stats(node, x)  # (B, C, ...), (C,)
            xc = gather_channels(x_hat, rep)
            w = None if bn.weight is None else bn.weight[rep.index].reshape(per_k)
            dims = (0,) + tuple(range(2, xc.dim()))
            out = batch_norm_delta(xc, inv_std[rep.index].reshape(per_k), w, rep.values, dims)
            return ChannelDelta(rep.index, out, rep.view)
        if isinstance(rep, DenseDelta):
            # Each perturbation's own statistics, from moments of its delta (no cancellation).
            x_hat, inv_std = ctx.bn_stats(node, x)
            chan = (1, 1, -1) + (1,) * (xb.dim() - 2)  # broadcasts over (B, K, C, *inner)
            w = None if bn.weight is None else bn.weight.reshape(chan)
            dims = (0,) + tuple(range(3, xb.dim() + 1))
            return DenseDelta(batch_norm_delta(x_hat.unsqueeze(1), inv_std.reshape(chan), w, rep.values, dims))
        # Perturbed values (after a fallback node): statistics of each perturbation's batch.
        # (B, K, C, ...) viewed as (B, K*C, ...) is a batch norm over K*C channels, one kernel.
        v = rep.values
        b, k = v.shape[:2]
        w = None if bn.weight is None else bn.weight.repeat(k)
        bias = None if bn.bias is None else bn.bias.repeat(k)
        out = F.batch_norm(v.reshape((b, -1) + tuple(v.shape[3:])), None, None, w, bias, True, 0.0, bn.eps)
        return DenseValue(out.reshape(v.shape))
    scale = bn_running_scale(bn.running_var, bn.eps, bn.weight)
    if isinstance(rep, ChannelDelta):
        return ChannelDelta(rep.index, rep.values * scale[rep.index].reshape(per_k), rep.view)
    b, k = rep.values.shape[:2]
    if isinstance(rep, DenseValue):
        return DenseValue(unflat(F.batch_norm(flat(rep.values), bn.running_mean, bn.running_var,
                                              bn.weight, bn.bias, False, 0.0, bn.eps), b, k))
    return DenseDelta(rep.values * scale.reshape((-1,) + (1,) * (xb.dim() - 2)))


@source_rule(nn.modules.batchnorm._BatchNorm)
def batch_norm_source(ctx, node, path, param, idx, mu):
    """``bias[c] += mu`` adds mu to channel c; ``weight[c] += mu`` adds ``mu * x_norm[:, c]``."""
    mod = ctx.module(node)
    x = node.args[0]
    xb, yb = ctx.base(x), ctx.base(node)
    if xb.dim() < 2:
        return None
    if path == "bias":
        return ChannelDelta(idx, yb.new_full((yb.shape[0], idx.numel()) + tuple(yb.shape[2:]), mu), tuple(yb.shape[1:]))
    shape = (1, -1) + (1,) * (xb.dim() - 2)
    if uses_batch_stats(mod):
        x_hat, inv_std = ctx.bn_stats(node, x)
        x_norm = x_hat * inv_std.reshape(shape)
    else:
        x_norm = (xb - mod.running_mean.reshape(shape)) * bn_running_scale(mod.running_var, mod.eps, None).reshape(shape)
    rep = ChannelDelta(idx, None, tuple(yb.shape[1:]))
    return ChannelDelta(idx, gather_channels(x_norm, rep) * mu, tuple(yb.shape[1:]))


@rule(nn.LayerNorm, F.layer_norm)
def layer_norm(ctx, node):
    """``x_norm(x) * w + b`` with per-position statistics over the normalized trailing dims: the
    change of ``x_norm`` by the BatchNorm algebra per position (moments of the delta), plus the
    product rule for a changed weight and the delta of a changed bias (``F.layer_norm`` with
    parameters passed in, e.g. tied or shared)."""
    x = first_input(node)
    rep, xb = ctx.rep(x), ctx.base(x)
    if node.op == "call_module":
        m = ctx.module(node)
        shape, w, b, eps = tuple(m.normalized_shape), m.weight, m.bias, m.eps
        if not only_first_changed(ctx, node):
            return NotImplemented
    else:
        args = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args))
        args.update(node.kwargs)
        shape, eps = tuple(ctx.value(args["normalized_shape"])), ctx.value(args.get("eps", 1e-5))
        w, b = args.get("weight"), args.get("bias")
    nd = len(shape)
    if xb.dim() <= nd:
        return NotImplemented  # no batch dim outside the normalized dims
    rw, rb = ctx.rep(w), ctx.rep(b)
    wb, bb = ctx.value(w), ctx.value(b)
    if isinstance(rep, DenseValue) and rw is None and rb is None:
        return DenseValue(F.layer_norm(rep.values, shape, wb, bb, eps))  # values: normalize them
    if any(isinstance(r, DenseValue) for r in (rep, rw, rb)):
        return NotImplemented
    dims = tuple(range(xb.dim() - nd, xb.dim()))
    mean = xb.mean(dims, keepdim=True)
    x_hat = xb - mean
    inv_std = torch.rsqrt(x_hat.square().mean(dims, keepdim=True) + eps)
    lead = (1,) * (xb.dim() - nd)  # a parameter's delta, sample-major against (B, K, *lead[1:], *shape)
    dw = broadcast_values(densify(rw, wb), wb, lead + shape) if rw is not None else None
    out = 0
    if rep is not None:
        d_norm = batch_norm_delta(x_hat.unsqueeze(1), inv_std.unsqueeze(1), None, densify(rep, xb),
                                  tuple(i + 1 for i in dims))
        out = d_norm * (wb if dw is None else wb + dw) if wb is not None else d_norm
    if dw is not None:
        out = out + expand_base(x_hat * inv_std) * dw
    if rb is not None:
        out = out + broadcast_values(densify(rb, bb), bb, lead + shape)
    return DenseDelta(out.expand((xb.shape[0], ctx.k) + tuple(xb.shape[1:])).contiguous())


@source_rule(nn.LayerNorm)
def layer_norm_source(ctx, node, path, param, idx, mu):
    """``bias[j] += mu`` adds mu to normalized coordinate j of every position; ``weight[j] += mu``
    adds ``mu * x_norm[..., j]``. One channel for a ``(B, D)`` input, else a dense delta."""
    m = ctx.module(node)
    xb, yb = ctx.base(node.args[0]), ctx.base(node)
    nd = len(m.normalized_shape)
    if xb.dim() <= nd or path not in ("weight", "bias"):
        return None
    k = idx.numel()
    if path == "bias":
        vals = yb.new_full(tuple(xb.shape[:xb.dim() - nd]) + (k,), mu)
    else:
        dims = tuple(range(xb.dim() - nd, xb.dim()))
        x_hat = xb - xb.mean(dims, keepdim=True)
        x_norm = x_hat * torch.rsqrt(x_hat.square().mean(dims, keepdim=True) + m.eps)
        vals = x_norm.flatten(xb.dim() - nd).index_select(-1, idx) * mu  # (*lead, K)
    if xb.dim() == 2 and nd == 1:
        return ChannelDelta(idx, vals, tuple(yb.shape[1:]))
    if nd == 1:  # one feature at every position
        return FeatureDelta(idx, vals.movedim(-1, 1))
    lead = tuple(xb.shape[:xb.dim() - nd])
    full = yb.new_zeros((xb.shape[0], k) + lead[1:] + (math.prod(m.normalized_shape),))
    ks = torch.arange(k, device=full.device)
    full.movedim(-1, 2)[:, ks, idx] = vals.movedim(-1, 1)  # set coordinate idx[k] of perturbation k
    return DenseDelta(full.reshape((xb.shape[0], k) + tuple(yb.shape[1:])))
