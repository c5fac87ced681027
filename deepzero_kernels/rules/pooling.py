"""Pooling rules: max pooling keeps a one-channel delta one channel (on values), average pooling
is linear (on the delta)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..deltas import (ChannelDelta, ChannelPreReLU, DenseDelta, DenseValue, flat, gather_channels, to_values,
                      true_layout, unflat)
from .registry import as_function, first_input, only_first_changed, rule


def _pool(ctx, node, linear: bool):
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
    if isinstance(yb, (tuple, list)) or xb.dim() != _spatial_rank(ctx, node) + 2:
        return NotImplemented  # return_indices=True, or an unbatched input (channel dim not dim 1)
    fn = as_function(ctx, node)
    if isinstance(rep, ChannelPreReLU) and (not true_layout(rep, xb) or linear):
        rep = ctx.reps[x] = rep.materialize()
    if isinstance(rep, ChannelDelta):
        if not true_layout(rep, xb):
            return NotImplemented
        b, k = rep.values.shape[:2]
        if isinstance(rep, ChannelPreReLU):  # pool the ReLU's input, then apply the ReLU
            v = rep.values + rep.pre
        else:
            v = rep.values if linear else rep.values + gather_channels(xb, rep)
        out = fn(v.reshape((b * k, 1) + tuple(v.shape[2:])))
        out = out.reshape((b, k) + tuple(out.shape[2:]))
        if isinstance(rep, ChannelPreReLU):
            out = out.clamp_min_(0)
        out_view = tuple(yb.shape[1:])
        if not linear:
            out = out - gather_channels(yb, ChannelDelta(rep.index, None, out_view))
        return ChannelDelta(rep.index, out, out_view)
    b, k = rep.values.shape[:2]
    if linear and isinstance(rep, DenseDelta):
        return DenseDelta(unflat(fn(flat(rep.values)), b, k))
    return DenseValue(unflat(fn(flat(to_values(rep, xb))), b, k))


def _spatial_rank(ctx, node) -> int:
    """1, 2 or 3: the spatial dims the pooling op takes (from its name: MaxPool2d, avg_pool3d)."""
    op = type(ctx.module(node)) if node.op == "call_module" else node.target
    name = getattr(op, "__name__", "")
    return next((r for r in (1, 2, 3) if name.endswith(f"{r}d")), -1)


@rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
      F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
      F.adaptive_max_pool3d)
def max_pool(ctx, node):
    return _pool(ctx, node, linear=False)


max_pool.accepts_pre_relu = True  # max pooling commutes with ReLU: apply it after pooling


@rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
      F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
      F.adaptive_avg_pool3d)
def avg_pool(ctx, node):
    return _pool(ctx, node, linear=True)
