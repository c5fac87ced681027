"""Arithmetic rules: sums and differences add deltas; products follow the product rule."""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ..deltas import (ChannelDelta, DenseDelta, DenseValue, FeatureDelta, broadcast_values, densify, expand_base,
                      gather_channels, gather_features, to_values, true_layout)
from .registry import rule


def _binary(ctx, node, sign: float):
    """``a + b`` / ``a - b`` of same-shaped tensors (or a tensor and a number)."""
    if node.op == "call_method" or node.target in (torch.add, torch.sub):
        if "alpha" in node.kwargs or len(node.args) > 2:
            return NotImplemented
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    ra, rb = ctx.rep(a), ctx.rep(b)
    yb = ctx.base(node)
    base_a, base_b = ctx.base(a), ctx.base(b)
    if not isinstance(yb, torch.Tensor) or yb.dim() == 0:
        return NotImplemented
    # A changed operand that broadcasts (a bias, a position embedding) carries its delta broadcast.
    if ra is not None and tuple(base_a.shape) != tuple(yb.shape):
        ra, base_a = _broadcast(ra, base_a, yb), base_a.expand(yb.shape)
    if rb is not None and tuple(base_b.shape) != tuple(yb.shape):
        rb, base_b = _broadcast(rb, base_b, yb), base_b.expand(yb.shape)
    if isinstance(ra, DenseValue) or isinstance(rb, DenseValue):
        va = to_values(ra, base_a) if ra is not None else _operand(base_a)
        vb = to_values(rb, base_b) if rb is not None else _operand(base_b)
        return DenseValue(va + vb if sign > 0 else va - vb)
    if rb is not None and sign < 0:
        rb = _negate(rb)
    if ra is None or rb is None:  # the delta of a sum with an unchanged operand
        return ra if rb is None else rb
    if (type(ra) is ChannelDelta and type(rb) is ChannelDelta and ra.view == rb.view
            and (ra.index is rb.index or torch.equal(ra.index, rb.index))):
        return ChannelDelta(ra.index, ra.values + rb.values, ra.view)
    return DenseDelta(densify(ra, base_a) + densify(rb, base_b))


def _broadcast(rep, base, yb):
    """The delta (or values) of an operand broadcast to the output's shape."""
    if isinstance(rep, DenseValue):
        return DenseValue(broadcast_values(rep.values, base, yb.shape))
    return DenseDelta(broadcast_values(densify(rep, base), base, yb.shape))


@rule(operator.add, operator.iadd, torch.add, "add", "add_", feature_delta=True)
def add(ctx, node):
    return _binary(ctx, node, 1.0)


@rule(operator.sub, operator.isub, torch.sub, "sub", "sub_", feature_delta=True)
def sub(ctx, node):
    return _binary(ctx, node, -1.0)


@rule(operator.mul, operator.imul, torch.mul, "mul", "mul_", feature_delta=True)
def mul(ctx, node):
    """``a * b``: scaling by a number scales the delta; the product of tensors follows the product
    rule ``d(ab) = da b + a db + da db`` (exact), with a one-channel delta kept one channel when
    the other factor is unchanged (squeeze-excitation gates, layer scale)."""
    if len(node.args) + len(node.kwargs) != 2:
        return NotImplemented
    a = node.args[0] if node.args else node.kwargs.get("input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if isinstance(a, Node) and isinstance(b, (int, float)):
        return _scaled(ctx.rep(a), b)
    if isinstance(b, Node) and isinstance(a, (int, float)):
        return _scaled(ctx.rep(b), a)
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return NotImplemented
    yb = ctx.base(node)
    ra, rb = ctx.rep(a), ctx.rep(b)
    fa, fb = _factor(ctx.base(a), yb), _factor(ctx.base(b), yb)
    if fa is None or fb is None:
        return NotImplemented  # a factor whose layout the K dim cannot be added to
    ba, bb = ctx.base(a), ctx.base(b)
    if not (isinstance(ba, torch.Tensor) and isinstance(bb, torch.Tensor)):
        return NotImplemented
    # A changed factor without the batch dim (a parameter: layer scale) carries its delta broadcast
    # to the output's shape, as _binary does for sums.
    if ra is not None and (ba.dim() != yb.dim() or ba.shape[0] != yb.shape[0]):
        ra, ba = _broadcast(ra, ba, yb), ba.expand(yb.shape)
        fa = expand_base(ba)
    if rb is not None and (bb.dim() != yb.dim() or bb.shape[0] != yb.shape[0]):
        rb, bb = _broadcast(rb, bb, yb), bb.expand(yb.shape)
        fb = expand_base(bb)
    if rb is None or ra is None:  # one factor unchanged: the delta times that factor
        (r, r_base), (other, other_base) = ((ra, ba), (fb, bb)) if rb is None else ((rb, bb), (fa, ba))
        if isinstance(r, DenseValue):
            return DenseValue(r.values * other)
        if isinstance(r, ChannelDelta) and true_layout(r, yb) and r_base.shape == yb.shape:
            return ChannelDelta(r.index, r.values * gather_channels(other_base.expand(yb.shape), r), r.view)
        if isinstance(r, FeatureDelta) and r_base.shape == yb.shape:  # layer scale on tokens / NHWC
            return FeatureDelta(r.index, r.values * gather_features(other_base.expand(yb.shape), r))
        return DenseDelta(densify(r, r_base) * other)
    if isinstance(ra, DenseValue) or isinstance(rb, DenseValue):
        return DenseValue(to_values(ra, ba) * to_values(rb, bb))
    da, db = densify(ra, ba), densify(rb, bb)
    return DenseDelta(da * fb + fa * db + da * db)


def _factor(base, yb):
    """A base factor shaped to broadcast against ``(B, K, ...)`` deltas of ``yb``, or None."""
    if not isinstance(base, torch.Tensor):
        return None
    if base.dim() == yb.dim():
        return expand_base(base)  # has the batch dim (possibly of size 1): insert K after it
    return base if base.dim() < yb.dim() else None  # aligns with trailing dims, below the K dim


def _scaled(r, s):
    if isinstance(r, ChannelDelta):
        return ChannelDelta(r.index, r.values * s, r.view)
    if isinstance(r, FeatureDelta):
        return FeatureDelta(r.index, r.values * s)
    return type(r)(r.values * s)


def _operand(v):
    return expand_base(v) if isinstance(v, torch.Tensor) else v


def _negate(rep):
    if isinstance(rep, ChannelDelta):
        return ChannelDelta(rep.index, -rep.values, rep.view)
    if isinstance(rep, FeatureDelta):
        return FeatureDelta(rep.index, -rep.values)
    return DenseDelta(-rep.values)
