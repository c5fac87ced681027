"""Shape rules: flatten/view/reshape, basic indexing, padding, concatenation and mean/sum over
non-batch dims move a delta without nonlinear arithmetic."""
from __future__ import annotations

import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from ..deltas import (ChannelDelta, DenseDelta, DenseValue, FeatureDelta, broadcast_values, densify, expand_base, flat,
                      kdim, to_values, true_layout, unflat)
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
    advanced = any(isinstance(i, torch.Tensor) for i in idx)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice, torch.Tensor)) for i in idx):
        return NotImplemented
    full = slice(None)
    if advanced:
        # A gather: linear, applied to each perturbation's tensor. Where the advanced indices
        # would move the K dim (not adjacent), the shapes disagree: the exact fallback runs.
        if isinstance(rep, ChannelDelta):
            rep = DenseDelta(densify(rep, xb))
        out = rep.values.movedim(kdim(xb), 0)[(full,) + idx]
        if yb.dim() == 0 or tuple(out.shape[1:]) != tuple(yb.shape):
            return NotImplemented
        return type(rep)(out.movedim(0, kdim(yb)))
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


@rule(torch.cat, torch.concat)
def cat(ctx, node):
    """Concatenation along channels: a one-channel delta stays one channel, at its offset; other
    deltas are concatenated with zeros (DenseDelta) or base values (DenseValue)."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    yb = ctx.base(node)
    if not isinstance(parts, (list, tuple)) or not isinstance(dim, int) or yb.dim() < 2:
        return NotImplemented
    dim = dim % yb.dim()
    if dim == 0:
        return NotImplemented  # joins batches
    reps = [ctx.rep(t) if isinstance(t, Node) else None for t in parts]
    bases = [ctx.base(t) for t in parts]
    changed = [i for i, r in enumerate(reps) if r is not None]
    offsets = [0]
    for b in bases:
        offsets.append(offsets[-1] + b.shape[dim])
    if dim == 1 and len(changed) == 1 and isinstance(reps[changed[0]], ChannelDelta) \
            and true_layout(reps[changed[0]], bases[changed[0]]):
        r = reps[changed[0]]
        return ChannelDelta(r.index + offsets[changed[0]], r.values, tuple(yb.shape[1:]))
    if any(isinstance(r, DenseValue) for r in reps):
        vals = [to_values(r, b) if r is not None else None for r, b in zip(reps, bases)]
        k = ctx.k
        vals = [v if v is not None else expand_base(b).expand((b.shape[0], k) + tuple(b.shape[1:]))
                for v, b in zip(vals, bases)]
        return DenseValue(torch.cat(vals, dim + 1))
    b0, k = yb.shape[0], ctx.k
    deltas = [densify(r, b) if r is not None else b.new_zeros((b0, k) + tuple(b.shape[1:]))
              for r, b in zip(reps, bases)]
    return DenseDelta(torch.cat(deltas, dim + 1))


def _reduce_dims(ctx, node):
    """(dims, keepdim) of ``x.mean(dims)`` / ``torch.sum(x, dims, keepdim)`` over non-batch dims."""
    x = node.args[0]
    rank = ctx.base(x).dim()
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or "dtype" in node.kwargs or not isinstance(keepdim, bool):
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    dims = tuple(sorted(d % rank for d in dims))
    return (dims, keepdim) if 0 not in dims else None


@rule(torch.mean, torch.sum, "mean", "sum")
def reduce_mean_sum(ctx, node):
    """Mean or sum over non-batch dims is linear: reduce the delta (a one-channel delta stays one
    channel when the channel dim is kept)."""
    if not only_first_changed(ctx, node):
        return NotImplemented
    spec = _reduce_dims(ctx, node)
    if spec is None:
        return NotImplemented
    dims, keepdim = spec
    x = first_input(node)
    rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    op = torch.mean if name == "mean" else torch.sum
    if isinstance(rep, ChannelDelta) and true_layout(rep, xb) and 1 not in dims:
        out = op(rep.values, [d for d in dims], keepdim=keepdim)  # (B, K, *inner): same dim numbers
        return ChannelDelta(rep.index, out, tuple(yb.shape[1:]))
    if isinstance(rep, ChannelDelta):
        rep = DenseDelta(densify(rep, xb))
    out = op(rep.values, [d + 1 for d in dims], keepdim=keepdim)  # the K dim sits at 1
    return type(rep)(out)


@rule(torch.transpose, torch.permute, "transpose", "permute", "unsqueeze", torch.unsqueeze, torch.roll, "roll",
      "swapaxes", torch.swapaxes, "movedim", torch.movedim, feature_delta=True)
def move_dims(ctx, node):
    """Ops that only move elements (transpose, permute, unsqueeze, roll, ...) are linear: the same op
    on each perturbation's delta, i.e. on the K-major view with every dim shifted by one."""
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
    if xb.dim() < 1 or yb.dim() < 1:
        return NotImplemented
    name = node.target if isinstance(node.target, str) else node.target.__name__
    args = [ctx.value(a) for a in node.args[1:]]
    kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
    if name == "permute" and isinstance(rep, (ChannelDelta, FeatureDelta)) and xb.dim() >= 3:
        # NCHW <-> NHWC (ConvNeXt, Swin): a one-channel delta becomes a one-feature delta and back.
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args or kwargs.get("dims")
        dims = [d % xb.dim() for d in dims] if isinstance(dims, (list, tuple)) else None
        n = xb.dim()
        if type(rep) is ChannelDelta and true_layout(rep, xb) and dims == [0, *range(2, n), 1]:
            return FeatureDelta(rep.index, rep.values)
        if isinstance(rep, FeatureDelta) and dims == [0, n - 1, *range(1, n - 1)]:
            return ChannelDelta(rep.index, rep.values, tuple(yb.shape[1:]))
    if isinstance(rep, (ChannelDelta, FeatureDelta)):
        rep = DenseDelta(densify(rep, xb))
    shift = lambda d: d % xb.dim() + 1  # noqa: E731  a dim of the base -> of the K-major view
    try:
        if name == "roll":
            shifts = args[0] if args else kwargs["shifts"]
            dims = args[1] if len(args) > 1 else kwargs.get("dims")
            if dims is None:
                return NotImplemented  # a roll of the flattened tensor mixes the batch
            dims = [shift(d) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            fn = lambda t: torch.roll(t, shifts, dims)  # noqa: E731
        elif name == "unsqueeze":
            d = (args[0] if args else kwargs["dim"]) % (xb.dim() + 1)
            fn = lambda t: t.unsqueeze(d + 1)  # noqa: E731
        elif name in ("transpose", "swapaxes"):
            a, b = (shift(d) for d in (args if args else (kwargs["dim0"], kwargs["dim1"])))
            fn = lambda t: t.transpose(a, b)  # noqa: E731
        elif name == "movedim":
            src, dst = args if args else (kwargs["source"], kwargs["destination"])
            src = [shift(d) for d in (src if isinstance(src, (list, tuple)) else [src])]
            dst = [shift(d) for d in (dst if isinstance(dst, (list, tuple)) else [dst])]
            fn = lambda t: t.movedim(src, dst)  # noqa: E731
        else:  # permute
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args or kwargs["dims"]
            fn = lambda t: t.permute([0] + [shift(d) for d in dims])  # noqa: E731
    except (KeyError, TypeError, ValueError):
        return NotImplemented
    out = fn(rep.values.movedim(1, 0))
    if tuple(out.shape[1:]) != tuple(yb.shape):
        return NotImplemented
    return type(rep)(out.movedim(0, 1))


@rule("expand", "expand_as", torch.broadcast_to, "broadcast_to")
def expand(ctx, node):
    """expand / broadcast_to: the delta broadcast as the base is (linear)."""
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
    if yb.dim() == 0:
        return NotImplemented
    if isinstance(rep, DenseValue):
        return DenseValue(broadcast_values(rep.values, xb, yb.shape))
    return DenseDelta(broadcast_values(densify(rep, xb), xb, yb.shape))


@rule(torch.chunk, torch.split, torch.unbind, "chunk", "split", "unbind", "tensor_split", torch.tensor_split)
def split(ctx, node):
    """chunk / split / unbind along a non-batch dim: each piece's delta is that piece of the delta.
    A one-channel delta split along channels stays one channel in every piece (zero in the pieces
    that do not hold its channel)."""
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb, pieces = ctx.rep(x), ctx.base(x), ctx.base(node)
    if not isinstance(pieces, (tuple, list)) or not pieces or isinstance(rep, (tuple, list)):
        return NotImplemented
    name = node.target if isinstance(node.target, str) else node.target.__name__
    default_dim = 0
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else default_dim) if name != "unbind" \
        else node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else default_dim)
    dim = ctx.value(dim)
    if not isinstance(dim, int) or xb.dim() < 1 or dim % xb.dim() == 0:
        return NotImplemented  # a split of the batch
    dim = dim % xb.dim()
    sizes = [1 if name == "unbind" else p.shape[dim] for p in pieces]
    if sum(sizes) != xb.shape[dim]:
        return NotImplemented
    if isinstance(rep, ChannelDelta) and dim == 1 and true_layout(rep, xb) and name != "unbind":
        out, lo = [], 0
        for p, s in zip(pieces, sizes):
            inside = (rep.index >= lo) & (rep.index < lo + s)
            shape = (1, -1) + (1,) * (rep.values.dim() - 2)
            out.append(ChannelDelta((rep.index - lo).clamp(0, s - 1), rep.values * inside.reshape(shape).to(rep.values),
                                    tuple(p.shape[1:])))
            lo += s
        return type(pieces)(out)
    if isinstance(rep, ChannelDelta):
        rep = DenseDelta(densify(rep, xb))
    parts = torch.split(rep.values, sizes, dim + 1)  # the K dim sits at 1
    if name == "unbind":
        parts = [t.squeeze(dim + 1) for t in parts]
    return type(pieces)(type(rep)(t) for t in parts)
