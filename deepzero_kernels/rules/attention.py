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
from .registry import first_input, only_first_changed, rule, source_rule


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


def base_attention(qb, kb, scale, mask):
    """``softmax(q k^T * scale + mask)`` (a bool mask marks the positions attended to)."""
    logits = qb @ kb.transpose(-2, -1) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return torch.softmax(logits, -1)


def _base_times_delta(ctx, a, d):
    """``a @ d[:, k]`` for every k: ``a`` a base stack ``(B, *mid, M, N)``, ``d`` deltas
    ``(B, K, *mid, N, P)``. The K deltas sit side by side as columns of one matrix, so ``a`` is not
    copied K times (as broadcasting would): one GEMM of ``(M, N) @ (N, K*P)`` per stack entry."""
    k, p = d.shape[1], d.shape[-1]
    cols = d.movedim(1, -2).reshape(d.shape[:1] + d.shape[2:-1] + (k * p,))  # (B, *mid, N, K*P)
    out = delta_map(ctx.engine.delta_precision, lambda x, w: torch.matmul(w, x), cols, a)
    return out.unflatten(-1, (k, p)).movedim(-2, 1)


def attention_delta(ctx, qb, kb, vb, dq, dk, dv, scale, mask, p0=None):
    """The change of ``softmax(q k^T * scale + mask) v`` for deltas ``dq``, ``dk``, ``dv``
    (``(B, K, ...)`` or None) of base ``qb``, ``kb``, ``vb`` (``(B, ..., T, d)``). Each product
    changes by two terms, a delta times perturbed values plus base times a delta:
    ``(q k^T)' - q k^T = dq k'^T + q dk^T`` (``k' = k + dk``), ``(p v)' - p v = dp v' + p dv``: exact,
    nothing cancels, one GEMM fewer than the three-term product rule. The softmax changes in closed
    form. ``p0``: the base attention weights, when the caller has them. Returns ``(d_out, d_p)``
    (``d_p``: the change of the attention weights, None when neither q nor k changed)."""
    prec = ctx.engine.delta_precision
    # The scale goes on the (T, d) factors, not on the (T, T) change of the logits.
    qb_s, dq = qb * scale, dq * scale if dq is not None else None
    if p0 is None:
        p0 = base_attention(qb, kb, scale, mask)
    d_p = None
    if dq is not None or dk is not None:
        d_logits = None
        if dq is not None:
            k_new = expand_base(kb) + dk if dk is not None else expand_base(kb)
            d_logits = delta_map(prec, torch.matmul, dq, k_new.transpose(-2, -1))
        if dk is not None:
            t = _base_times_delta(ctx, qb_s, dk.transpose(-2, -1))
            d_logits = t if d_logits is None else d_logits.add_(t)
        d_p = softmax_delta(expand_base(p0), d_logits, -1)
        if mask is not None:
            d_p = torch.nan_to_num(d_p, nan=0.0)  # fully masked rows: no attention either way
    d_out = None
    if d_p is not None:
        v_new = expand_base(vb) + dv if dv is not None else expand_base(vb)
        d_out = delta_map(prec, torch.matmul, d_p, v_new)
    if dv is not None:
        t = _base_times_delta(ctx, p0, dv)
        d_out = t if d_out is None else d_out.add_(t)
    return d_out, d_p


@rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx, node):
    """``softmax(q k^T * scale + mask) v`` (:func:`attention_delta`). No dropout, no grouped-query
    broadcasting."""
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
    mask_b = ctx.value(mask)
    if ctx.value(args.get("is_causal", False)):
        ones = torch.ones(qb.shape[-2], kb.shape[-2], dtype=torch.bool, device=qb.device)
        mask_b = ones.tril() if mask_b is None else mask_b & ones.tril()
    dq, dk, dv = (densify(r, t) if r is not None else None for r, t in zip(reps, (qb, kb, vb)))
    return DenseDelta(attention_delta(ctx, qb, kb, vb, dq, dk, dv, scale, mask_b)[0])


# ----------------------------------------------------------------------------- nn.MultiheadAttention
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


class _MHA:
    """One call of an ``nn.MultiheadAttention`` in the form the rules need: batch-first base inputs
    (B, T, E), the projection weights split into q/k/v, the mask, and base intermediates (heads in
    dim 1) made once per batch."""

    def __init__(self, ctx, node):
        m = ctx.module(node)
        a = dict(zip(_MHA_ARGS, node.args))
        a.update(node.kwargs)
        self.ok = (not set(a) - set(_MHA_ARGS) and m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn
                   and not (m.training and m.dropout > 0) and a.get("key_padding_mask") is None
                   and not ctx.value(a.get("is_causal", False)))
        mask = ctx.value(a.get("attn_mask"))
        self.ok = self.ok and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2))
        self.ok = self.ok and not (isinstance(a.get("attn_mask"), Node) and ctx.rep(a["attn_mask"]) is not None)
        if not self.ok:
            return
        self.m, self.node, self.ctx = m, node, ctx
        self.inputs = [a[n] for n in ("query", "key", "value")]
        self.need_weights = bool(ctx.value(a.get("need_weights", True)))
        self.average = bool(ctx.value(a.get("average_attn_weights", True)))
        # In SDPA's convention (a bool mask marks the positions attended to; MHA's marks the others).
        self.mask = (~mask if mask.dtype == torch.bool else mask) if mask is not None else None
        self.heads, e = m.num_heads, m.embed_dim
        self.hd = e // m.num_heads
        self.scale = 1.0 / math.sqrt(self.hd)
        w, b = m.in_proj_weight, m.in_proj_bias
        self.w = [w[i * e:(i + 1) * e] for i in range(3)]
        self.b = [b[i * e:(i + 1) * e] if b is not None else None for i in range(3)]
        self.bases = [self.batch_first(ctx.base(t)) for t in self.inputs]

    def batch_first(self, t):
        return t if self.m.batch_first else t.transpose(0, 1)

    def delta_batch_first(self, d):
        """(B0, K, T0, E) delta of an input in the module's layout -> (B, K, T, E)."""
        return d if self.m.batch_first else d.permute(2, 1, 0, 3)

    def heads_of(self, t):
        """(..., T, E) -> (..., H, T, hd)."""
        return t.unflatten(-1, (self.heads, self.hd)).transpose(-3, -2)

    def merge_heads(self, t):
        return t.transpose(-3, -2).flatten(-2)

    def projected(self):
        """Base q, k, v (B, H, T, hd), the attention output before out_proj (B, T, E) and the
        attention weights (B, H, T, T)."""
        def make():
            q, k, v = (self.heads_of(F.linear(x, w, b)) for x, w, b in zip(self.bases, self.w, self.b))
            p = base_attention(q, k, self.scale, self.mask)
            return q, k, v, self.merge_heads(p @ v), p
        return self.ctx.base_cached((self.node, "mha"), make)

    def outputs(self, d_qkv):
        """The module's output representation(s) from the changes of q, k, v ((B, K, T, E) or None)."""
        ctx, m = self.ctx, self.m
        q, k, v, _, p0 = self.projected()
        dq, dk, dv = (self.heads_of(d) if d is not None else None for d in d_qkv)
        d_o, d_p = attention_delta(ctx, q, k, v, dq, dk, dv, self.scale, self.mask, p0)
        d_y = delta_map(ctx.engine.delta_precision, F.linear, self.merge_heads(d_o), m.out_proj.weight)
        return self.pack(d_y, d_p)

    def head_local_outputs(self, which, feat, values_for):
        """The output representation(s) when perturbation k changes one feature ``feat[k]`` of q, k or
        v (``which[k]`` = 0, 1, 2): the i-th of the perturbations ``sel`` of input ``w`` by
        ``values_for(w, sel)[..., i]`` (``(B, T, n)``). That feature belongs to one head,
        and every other head's output stays as it was: attention runs on the perturbed head only (the
        K perturbed heads side by side where :func:`attention_delta` expects heads, under a
        perturbation dim of one), and the out-projection reads that head's columns only, so both
        cost 1/H of the dense rule's."""
        ctx, hd = self.ctx, self.hd
        q, k, v, _, p0 = self.projected()
        b, kk = q.shape[0], feat.numel()
        head, pos = feat // hd, feat % hd
        d_o = q.new_zeros((b, kk, q.shape[2], hd))
        d_p = q.new_zeros((b, kk, self.heads) + p0.shape[2:]) if self.need_weights else None
        for w_i in range(3):
            sel = (which == w_i).nonzero().flatten()
            if sel.numel() == 0:
                continue
            hs = head[sel]
            bases = [t.index_select(1, hs) for t in (q, k, v, p0)]  # (B, n, T, .): each one's head
            d = q.new_zeros(bases[w_i].shape)
            d[:, torch.arange(sel.numel(), device=d.device), :, pos[sel]] = values_for(w_i, sel).permute(2, 0, 1)
            deltas = [d.unsqueeze(1) if i == w_i else None for i in range(3)]
            o, p = attention_delta(ctx, *bases[:3], *deltas, self.scale, self.mask, bases[3])
            d_o[:, sel] = o[:, 0]
            if d_p is not None and p is not None:
                d_p[:, sel, hs] = p[:, 0]
        # The out-projection's columns of head h_k, per perturbation: (K, hd, E).
        w_out = self.m.out_proj.weight.unflatten(1, (self.heads, hd)).index_select(1, head).permute(1, 2, 0)
        d_y = delta_map(ctx.engine.delta_precision, torch.matmul, d_o, w_out)
        return self.pack(d_y, d_p)

    def pack(self, d_y, d_p):
        out = DenseDelta(self.delta_batch_first(d_y))  # the permutation is its own inverse
        if not self.need_weights:
            return (out, None)
        if d_p is None:
            return (out, None)
        return (out, DenseDelta(d_p.mean(2) if self.average else d_p))


@rule(nn.MultiheadAttention, mixes_channels=True)
def multihead_attention(ctx, node):
    """``nn.MultiheadAttention`` with changed query/key/value: the in-projections act on the deltas,
    then :func:`attention_delta` per head and the out-projection. (Masks fixed; no key padding mask,
    bias_k/v, zero attention or active dropout: those take the exact fallback.)"""
    mha = _MHA(ctx, node)
    if not mha.ok:
        return NotImplemented
    reps = [ctx.rep(t) if isinstance(t, Node) else None for t in mha.inputs]
    if any(isinstance(r, (DenseValue, tuple, list)) for r in reps):
        return NotImplemented
    prec = ctx.engine.delta_precision
    if mha.inputs[0] is mha.inputs[1] is mha.inputs[2]:  # self-attention: one GEMM for q, k and v
        d = delta_map(prec, F.linear, mha.delta_batch_first(densify(reps[0], ctx.base(mha.inputs[0]))),
                      mha.m.in_proj_weight)
        return mha.outputs(list(d.chunk(3, -1)))
    d_qkv = [delta_map(prec, F.linear, mha.delta_batch_first(densify(r, ctx.base(t))), w) if r is not None else None
             for r, t, w in zip(reps, mha.inputs, mha.w)]
    return mha.outputs(d_qkv)


@source_rule(nn.MultiheadAttention)
def multihead_attention_source(ctx, node, path, param, idx, mu):
    """``in_proj_weight[i, j] += mu`` changes feature ``i mod E`` of q, k or v (``i // E``) by
    ``mu * x[..., j]`` (``in_proj_bias``: by mu), which is one head's (:meth:`_MHA.head_local_outputs`);
    ``out_proj.weight[i, j]`` changes output feature i
    by ``mu * o[..., j]`` with ``o`` the base attention output (``out_proj.bias``: by mu)."""
    mha = _MHA(ctx, node)
    if not mha.ok or path not in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
        return None
    e, k = mha.m.embed_dim, idx.numel()
    xb = mha.bases[0]
    b, t = xb.shape[:2]
    ks = torch.arange(k, device=idx.device)
    if path.startswith("out_proj"):
        if path == "out_proj.weight":
            i, j = idx // e, idx % e
            vals = mha.projected()[3].index_select(-1, j) * mu  # (B, T, K)
        else:
            i, vals = idx, xb.new_full((b, t, k), mu)
        d_y = xb.new_zeros((b, k, t, e))
        d_y.movedim(-1, 2)[:, ks, i] = vals.movedim(-1, 1)
        return mha.pack(d_y, None)
    row = idx // e if path == "in_proj_weight" else idx
    which, feat = row // e, row % e
    col = idx % e

    def values_for(w_i, sel):  # (B, T, n): feature feat[sel] changes by mu * x[..., j] (the bias: by mu)
        x = mha.bases[w_i]
        return x.index_select(-1, col[sel]) * mu if path == "in_proj_weight" else x.new_full(x.shape[:2] + (sel.numel(),), mu)
    return mha.head_local_outputs(which, feat, values_for)


multihead_attention_source.any_call = True  # checks its own call (three inputs, keyword flags)
