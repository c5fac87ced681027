"""Attention: softmax / log-softmax (the change from the base output in closed form), products of
matrices (the bilinear product rule) and ``F.scaled_dot_product_attention`` composed of both.
A dense delta stays a delta; perturbed values (after a fallback node) go to the exact fallback."""
from __future__ import annotations

import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from ..deltas import DenseDelta, DenseValue, densify, expand_base
from ..formulas import log_softmax_delta, softmax_delta
from ..precision import delta_map
from .registry import first_input, only_first_changed, rule


def _softmax_dim(ctx, node):
    if node.op == "call_module":
        return ctx.module(node).dim
    if "dtype" in node.kwargs or len(node.args) > 2:
        return None
    return ctx.value(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))


@rule(nn.Softmax, F.softmax, torch.softmax, "softmax", nn.LogSoftmax, F.log_softmax, torch.log_softmax,
      "log_softmax")
def softmax(ctx, node):
    """``s0 (expm1(d) - S) / (1 + S)``, ``S = sum s0 expm1(d)`` (log: ``d - log1p(S)``), from the base
    output: no difference of two softmaxes."""
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
    dim = _softmax_dim(ctx, node)
    if isinstance(rep, DenseValue) or not isinstance(dim, int) or xb.dim() < 2 or dim % xb.dim() == 0:
        return NotImplemented  # values, an implicit dim, or a softmax across the batch
    dim = dim % xb.dim() + 1  # the K dim sits at 1
    log = (isinstance(ctx.module(node), nn.LogSoftmax) if node.op == "call_module"
           else node.target in (F.log_softmax, torch.log_softmax, "log_softmax"))
    s0 = expand_base(yb.exp() if log else yb)
    d = densify(rep, xb)
    return DenseDelta((log_softmax_delta if log else softmax_delta)(s0, d, dim))


def _batched(t: torch.Tensor, yb: torch.Tensor) -> bool:
    return t.dim() == yb.dim() and t.shape[0] == yb.shape[0]


def product_delta(ctx, a, b, da, db, mm):
    """``mm(a + da, b + db) - mm(a, b) = mm(da, b) + mm(a, db) + mm(da, db)`` with base operands
    ``a``, ``b`` (shaped to broadcast against the ``(B, K, ...)`` deltas) and deltas or None. The
    first-order terms are linear maps of a delta (``delta_precision``)."""
    prec = ctx.engine.delta_precision
    out = None
    if da is not None:
        out = delta_map(prec, mm, da, b)
    if db is not None:
        t = delta_map(prec, lambda d, w: mm(w, d), db, a)
        out = t if out is None else out + t
    if da is not None and db is not None:
        out = out + mm(da, db)
    return out


@rule(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm")
def matmul(ctx, node):
    """``a @ b`` where every changed operand carries the batch dim first."""
    if node.kwargs or len(node.args) != 2:
        return NotImplemented
    yb = ctx.base(node)
    a, b = node.args
    ab, bb = ctx.base(a), ctx.base(b)
    if not (isinstance(ab, torch.Tensor) and isinstance(bb, torch.Tensor)) or yb.dim() < 3:
        return NotImplemented
    ra, rb = ctx.rep(a), ctx.rep(b)
    if isinstance(ra, DenseValue) or isinstance(rb, DenseValue):
        return NotImplemented
    for t, r in ((ab, ra), (bb, rb)):
        if r is not None and not _batched(t, yb):
            return NotImplemented
        if r is None and not _batched(t, yb) and t.dim() > 2:
            return NotImplemented  # an unbatched stack of matrices would not line up with the K dim
    da = densify(ra, ab) if ra is not None else None
    db = densify(rb, bb) if rb is not None else None
    fa = expand_base(ab) if _batched(ab, yb) else ab
    fb = expand_base(bb) if _batched(bb, yb) else bb
    return DenseDelta(product_delta(ctx, fa, fb, da, db, torch.matmul))


@rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx, node):
    """``softmax(q k^T * scale + mask) v``: the product rule for the logits and the output, the
    softmax change in closed form. No dropout, no grouped-query broadcasting."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if set(args) - set(names) or ctx.value(args.get("dropout_p", 0.0)) != 0.0:
        return NotImplemented
    q, k, v = args["query"], args["key"], args["value"]
    qb, kb, vb, yb = ctx.base(q), ctx.base(k), ctx.base(v), ctx.base(node)
    reps = [ctx.rep(n) if isinstance(n, Node) else None for n in (q, k, v)]
    mask = args.get("attn_mask")
    if (isinstance(mask, Node) and ctx.rep(mask) is not None) or any(isinstance(r, DenseValue) for r in reps) \
            or not all(_batched(t, yb) for t in (qb, kb, vb)) or qb.dim() < 3:
        return NotImplemented
    scale = ctx.value(args.get("scale"))
    scale = 1.0 / math.sqrt(qb.shape[-1]) if scale is None else scale
    logits = qb @ kb.transpose(-2, -1) * scale
    mask_b = ctx.value(mask)
    if ctx.value(args.get("is_causal", False)):
        ones = torch.ones(qb.shape[-2], kb.shape[-2], dtype=torch.bool, device=qb.device)
        mask_b = ones.tril() if mask_b is None else mask_b & ones.tril()
    if mask_b is not None:
        logits = logits.masked_fill(~mask_b, float("-inf")) if mask_b.dtype == torch.bool else logits + mask_b
    p0 = torch.softmax(logits, -1)
    dq, dk, dv = (densify(r, t) if r is not None else None for r, t in zip(reps, (qb, kb, vb)))
    kt = lambda t: t.transpose(-2, -1) if t is not None else None  # noqa: E731
    d_logits = None
    if dq is not None or dk is not None:
        d_logits = product_delta(ctx, expand_base(qb), kt(expand_base(kb)), dq, kt(dk), torch.matmul) * scale
    d_p = softmax_delta(expand_base(p0), d_logits, -1) if d_logits is not None else None
    if d_p is not None:
        d_p = torch.nan_to_num(d_p, nan=0.0)  # fully masked rows: no attention either way
    return DenseDelta(product_delta(ctx, expand_base(p0), expand_base(vb), d_p, dv, torch.matmul))
