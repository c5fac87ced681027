"""BatchNorm: channel-local, with batch statistics (exact change of mean and variance from
moments of the delta) or running statistics (a per-channel scale); and the source deltas of its
own affine parameters."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..deltas import ChannelDelta, DenseDelta, DenseValue, densify, flat, gather_channels, to_values, true_layout, unflat
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
        # Dense: statistics of each perturbation's batch. (B, K, C, ...) viewed as
        # (B, K*C, ...) is a batch norm over K*C channels, one native kernel.
        v = to_values(rep, xb)
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
