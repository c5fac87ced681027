"""Arithmetic rules: sums and differences add deltas; scaling by a number scales them."""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ..deltas import ChannelDelta, DenseDelta, DenseValue, densify, expand_base, to_values
from .registry import rule


def _binary(ctx, node, sign: float):
    """``a + b`` / ``a - b`` of same-shaped tensors (or a tensor and a number)."""
    if node.op == "call_method" or node.target in (torch.add, torch.sub):
        if "alpha" in node.kwargs or len(node.args) > 2:
            return NotImplemented
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    ra, rb = ctx.rep(a), ctx.rep(b)
    yb = ctx.base(node)
    for n, r in ((a, ra), (b, rb)):
        if r is not None and tuple(ctx.base(n).shape) != tuple(yb.shape):
            return NotImplemented  # broadcasting expands the delta: let the fallback do it
    if isinstance(ra, DenseValue) or isinstance(rb, DenseValue):
        va = to_values(ra, ctx.base(a)) if ra is not None else _operand(ctx.base(a))
        vb = to_values(rb, ctx.base(b)) if rb is not None else _operand(ctx.base(b))
        return DenseValue(va + vb if sign > 0 else va - vb)
    if rb is not None and sign < 0:
        rb = _negate(rb)
    if ra is None or rb is None:  # the delta of a sum with an unchanged operand
        return ra if rb is None else rb
    if (isinstance(ra, ChannelDelta) and isinstance(rb, ChannelDelta) and ra.view == rb.view
            and (ra.index is rb.index or torch.equal(ra.index, rb.index))):
        return ChannelDelta(ra.index, ra.values + rb.values, ra.view)
    return DenseDelta(densify(ra, ctx.base(a)) + densify(rb, ctx.base(b)))


@rule(operator.add, operator.iadd, torch.add, "add", "add_")
def add(ctx, node):
    return _binary(ctx, node, 1.0)


@rule(operator.sub, operator.isub, torch.sub, "sub", "sub_")
def sub(ctx, node):
    return _binary(ctx, node, -1.0)


@rule(operator.mul, operator.imul, torch.mul, "mul", "mul_")
def scale(ctx, node):
    """Multiplication by a constant number is linear: scale the delta."""
    if len(node.args) + len(node.kwargs) != 2:
        return NotImplemented
    a = node.args[0] if node.args else node.kwargs.get("input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if isinstance(a, Node) and isinstance(b, (int, float)):
        r, s = ctx.rep(a), b
    elif isinstance(b, Node) and isinstance(a, (int, float)):
        r, s = ctx.rep(b), a
    else:
        return NotImplemented
    if isinstance(r, ChannelDelta):
        return ChannelDelta(r.index, r.values * s, r.view)
    return type(r)(r.values * s)


def _operand(v):
    return expand_base(v) if isinstance(v, torch.Tensor) else v


def _negate(rep):
    if isinstance(rep, ChannelDelta):
        return ChannelDelta(rep.index, -rep.values, rep.view)
    return DenseDelta(-rep.values)
