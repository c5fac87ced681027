"""Shape rules: flatten/view/reshape, basic indexing and padding move a delta without arithmetic."""
from __future__ import annotations

import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..deltas import ChannelDelta, DenseDelta, DenseValue, densify, flat, kdim, true_layout, unflat
from .registry import first_input, only_first_changed, rule


@rule(nn.Flatten, torch.flatten, "view", "reshape", "flatten")
def flatten(ctx, node):
    """flatten / view / reshape: a channel delta survives a flatten of all non-batch dims."""
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
    if isinstance(rep, ChannelDelta):
        c = rep.view[0]
        b, k = rep.values.shape[:2]
        if yb.dim() == 2 and yb.shape[0] == b and yb.shape[1] == math.prod(rep.view):
            view = (c,) if yb.shape[1] == c else (c, yb.shape[1] // c)
            return ChannelDelta(rep.index, rep.values.reshape((b, k) + view[1:]), view)
        if tuple(yb.shape) == tuple(xb.shape):
            return rep
        rep = DenseDelta(densify(rep, xb))
    if xb.dim() >= 1 and yb.dim() >= 1 and xb.shape[0] == yb.shape[0]:
        b, k = rep.values.shape[:2]
        return type(rep)(rep.values.reshape((b, k) + tuple(yb.shape[1:])))
    # The reshape mixes the batch dim: apply it to each perturbation's tensor.
    kmajor = rep.values.movedim(kdim(xb), 0)
    out = kmajor.reshape((kmajor.shape[0],) + tuple(yb.shape))
    return type(rep)(out.movedim(0, kdim(yb)))


@rule(operator.getitem)
def getitem(ctx, node):
    x, idx = node.args
    rep = ctx.rep(x)
    if isinstance(rep, (tuple, list)):
        return rep[idx]
    xb, yb = ctx.base(x), ctx.base(node)
    if not isinstance(xb, torch.Tensor):
        return NotImplemented
    idx = ctx.value(idx)  # bounds computed from shapes are plain ints in the base pass
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
        return NotImplemented  # advanced (tensor) indexing: dense fallback
    full = slice(None)
    if isinstance(rep, ChannelDelta):
        if (true_layout(rep, xb) and len(idx) >= 2 and idx[0] == full and idx[1] == full
                and all(isinstance(i, (int, slice)) for i in idx[2:])):
            # (B, K, *inner): the index of the channel dim (all of it) now selects all k.
            return ChannelDelta(rep.index, rep.values[(full, full) + idx[2:]], tuple(yb.shape[1:]))
        rep = DenseDelta(densify(rep, xb))
    # Basic indexing applies to each perturbation's tensor: index the K-major view.
    out = rep.values.movedim(kdim(xb), 0)[(full,) + idx]
    return type(rep)(out.movedim(0, kdim(yb)))


@rule(F.pad)
def pad(ctx, node):
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
    args = list(node.args[1:])
    widths = list(ctx.value(node.kwargs.get("pad", args[0] if args else None)))
    mode = ctx.value(node.kwargs.get("mode", args[1] if len(args) > 1 else "constant"))
    value = ctx.value(node.kwargs.get("value", args[2] if len(args) > 2 else None))
    m = len(widths) // 2
    if m >= xb.dim():
        return NotImplemented  # pads the batch dim
    if isinstance(rep, ChannelDelta):
        if mode != "constant" or not true_layout(rep, xb):
            return NotImplemented
        spatial = xb.dim() - 2
        if m <= spatial:
            return ChannelDelta(rep.index, F.pad(rep.values, widths), tuple(yb.shape[1:]))
        front, back = widths[2 * spatial], widths[2 * spatial + 1]
        if front < 0 or back < 0:
            return NotImplemented
        vals = F.pad(rep.values, widths[:2 * spatial]) if any(widths[:2 * spatial]) else rep.values
        return ChannelDelta(rep.index + front, vals, tuple(yb.shape[1:]))
    b, k = rep.values.shape[:2]
    if isinstance(rep, DenseValue):
        kw = {} if mode != "constant" or value is None else {"value": value}
        return DenseValue(unflat(F.pad(flat(rep.values), widths, mode=mode, **kw), b, k))
    # Padding is linear in the input (a constant pad value cancels in the delta).
    return DenseDelta(unflat(F.pad(flat(rep.values), widths, mode=mode), b, k))
