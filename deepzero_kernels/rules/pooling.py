"""Pooling rules: max pooling keeps a one-channel delta one channel and carries a dense delta as a
delta (exact change at the perturbed argmax), average pooling is linear (on the delta)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..deltas import (ChannelDelta, ChannelPreReLU, DenseDelta, DenseValue, expand_base, flat, gather_channels,
                      true_layout, unflat)
from ..formulas import relu_delta
from .registry import as_function, first_input, only_first_changed, rule


def _pool(ctx, node, linear: bool):
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
    if isinstance(yb, (tuple, list)) or xb.dim() != _spatial_rank(ctx, node) + 2:
        return NotImplemented  # return_indices=True, or an unbatched input (channel dim not dim 1)
    if isinstance(rep, ChannelPreReLU) and (not true_layout(rep, xb) or linear):
        rep = ctx.reps[x] = rep.materialize()
    if isinstance(rep, ChannelDelta) and not true_layout(rep, xb):
        return NotImplemented
    b, k = rep.values.shape[:2]
    if linear:  # average pooling is linear: pool the delta
        fn = as_function(ctx, node)
        if isinstance(rep, DenseValue):
            return DenseValue(unflat(fn(flat(rep.values)), b, k))
        if isinstance(rep, ChannelDelta):
            out = fn(rep.values.reshape((b * k, 1) + tuple(rep.values.shape[2:])))
            return ChannelDelta(rep.index, out.reshape((b, k) + tuple(out.shape[2:])), tuple(yb.shape[1:]))
        return DenseDelta(unflat(fn(flat(rep.values)), b, k))
    if isinstance(rep, DenseValue):
        return DenseValue(unflat(as_function(ctx, node)(flat(rep.values)), b, k))
    window = _plain_window(ctx, node, xb)
    if window is not None:  # non-overlapping windows: no argmax needed
        if isinstance(rep, ChannelDelta):
            c_rep = ChannelDelta(rep.index, None, tuple(yb.shape[1:]))
            x0 = rep.pre if isinstance(rep, ChannelPreReLU) else gather_channels(xb, rep)
            out = _window_delta(x0.unsqueeze(2), rep.values.unsqueeze(2), gather_channels(yb, c_rep).unsqueeze(2),
                                window, isinstance(rep, ChannelPreReLU))
            return ChannelDelta(rep.index, out.squeeze(2), tuple(yb.shape[1:]))
        return DenseDelta(_window_delta(expand_base(xb), rep.values, expand_base(yb), window, False))
    pool = _with_indices(ctx, node)
    if isinstance(rep, ChannelDelta):  # each k its own one-channel batch: (B, K, 1, *spatial)
        d = rep.values.unsqueeze(2)
        if isinstance(rep, ChannelPreReLU):
            # relu(max(pre + d)) - relu(max(pre)): the change of the max, then of the ReLU.
            pre = rep.pre.unsqueeze(2)
            m0 = unflat(pool(flat(pre))[0], b, k)
            out = relu_delta(m0, max_pool_delta(pool, pre, d, m0))
        else:
            c_rep = ChannelDelta(rep.index, None, tuple(yb.shape[1:]))
            out = max_pool_delta(pool, gather_channels(xb, rep).unsqueeze(2), d,
                                 gather_channels(yb, c_rep).unsqueeze(2))
        return ChannelDelta(rep.index, out.squeeze(2), tuple(yb.shape[1:]))
    return DenseDelta(max_pool_delta(pool, expand_base(xb), rep.values, expand_base(yb)))


def max_pool_delta(pool, x0: torch.Tensor, d: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
    """``max_pool(x0 + d) - max_pool(x0)`` for ``d`` ``(B, K, C, *spatial)``, ``x0`` and the base
    output ``m0`` broadcastable to it. Taken as ``(x0[j'] - m0) + d[j']`` at the perturbed argmax
    ``j'``: a difference of two base values (exact where they are close) plus the delta, never a
    difference of two pooled values. Where the perturbed window's top two entries tie within an
    ulp, j' may be the other one: an error of at most one ulp of the activation there."""
    b, k = d.shape[:2]
    _, j = pool(flat(x0 + d))
    j = unflat(j, b, k)
    out_shape, j = j.shape, j.flatten(3)
    gather = lambda t: t.expand(d.shape).flatten(3).gather(3, j)  # noqa: E731
    return ((gather(x0) - m0.flatten(3)) + gather(d)).reshape(out_shape)


def _plain_window(ctx, node, xb):
    """``(k, ceil_mode)`` of an ``nn.MaxPool2d`` with square windows equal to its stride, no padding
    or dilation (App. B's pools), else None."""
    if node.op != "call_module" or type(ctx.module(node)) is not nn.MaxPool2d or xb.dim() != 4:
        return None
    m = ctx.module(node)
    k, s = m.kernel_size, m.stride if m.stride is not None else m.kernel_size
    if not (isinstance(k, int) and k == s and m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1))):
        return None
    return k, m.ceil_mode


def _window_delta(x0, d, m0, window, relu: bool):
    """Change of a non-overlapping max pool (after a ReLU of ``x0 + d`` if ``relu``): every element
    relative to its window's base output, ``g = (x0 - m0) + d`` (a difference of base values, exact
    where it matters, plus the delta), then ``G = max g``: the change is ``G`` (``max(G, -m0)`` after a
    ReLU, ``m0`` being the ReLU'd base output). ``d`` is ``(B, K, C, H, W)``, ``x0`` and ``m0``
    broadcast to it and to the pooled shape."""
    k, ceil = window
    h, w = d.shape[-2:]
    up = m0.repeat_interleave(k, -2).repeat_interleave(k, -1)[..., :h, :w]
    g = (x0 - up) + d
    b, kk = g.shape[:2]
    out = F.max_pool2d(g.reshape((b * kk,) + tuple(g.shape[2:])), k, k, ceil_mode=ceil)
    out = out.reshape((b, kk) + tuple(out.shape[1:]))
    return torch.maximum(out, -m0) if relu else out


def _with_indices(ctx, node):
    """The node's max pool as ``t -> (values, flat spatial indices)``."""
    if node.op == "call_module":
        m = copy.copy(ctx.module(node))
        m.return_indices = True
        return m
    rest = [ctx.value(a) for a in node.args[1:]]
    kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
    kwargs["return_indices"] = True
    return lambda t: node.target(t, *rest, **kwargs)


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
