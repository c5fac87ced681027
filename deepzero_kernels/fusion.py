"""The fusion pass: find the channel-local layers after a conv or linear in the traced graph and
evaluate them with one kernel launch of the selected backend (:mod:`deepzero_kernels.kernels`).

The torch backend propagates a delta node by node (:mod:`deepzero_kernels.rules`). With a
kernel backend the engine asks this module first; a pattern that matches is computed by one
kernel, which produces the representation of the chain's *last* node. The result is a
``{node: representation}`` dict for the engine to store: the nodes inside the chain get
:class:`Fused` placeholders (each has one user, the next node of the chain, so nothing else
reads them). A node where the perturbed parameter enters again ends a chain. Anything that does
not match exactly falls back to the per-node rules.

Patterns (``[]`` optional; every inner node has a single user):

* conv weight source: ``conv -> [BatchNorm2d] -> [+ unchanged]* -> [ReLU -> [MaxPool2d]]``
  (:func:`~deepzero_kernels.kernels.reference.conv_delta_chain`);
* a one-channel delta entering ``BatchNorm2d`` or ``ReLU`` with the same tail (``channel_chain``);
* a one-channel delta entering a ``groups=1`` conv and the same chain after it (``conv1ch_delta_chain``:
  the conv's dense delta is computed plane by plane and never stored);
* a dense delta ``(B, K, C, H, W)`` entering ``BatchNorm2d`` or ``ReLU``: ``BatchNorm2d -> [+ unchanged]
  -> [ReLU]`` as ``channel_chain`` over K*C one-channel deltas (each (k, c) keeps its own statistics);
  the engine carries deltas, never perturbed values, so ``conv1ch_chain`` and ``bn_act_dense`` (which
  produce values) are public ops it does not use;
* the logits under the default cross-entropy loss: the final linear layer's own weights
  (``linear_weight_ce``), a one-feature delta (``linear_rank1_ce``) or dense features
  (``linear_dense_ce``) entering it give the per-sample loss change directly (:class:`LossDelta`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from .deltas import ChannelDelta, DenseDelta
from .formulas import bn_running_scale, conv_padding, conv_weight_coords, pool_out
from .functional import has_hooks
from .kernels import NO_BN, NO_POOL, BnArgs, ConvArgs, PoolArgs
from .rules import uses_batch_stats

__all__ = ["Fused", "LossDelta", "fused_source", "fused_node"]


@dataclass
class Fused:
    """Placeholder for a node computed inside a fused chain; only the chain's next node uses it."""
    values: None = None


@dataclass
class LossDelta:
    """The per-sample loss change ``(K, B)`` (float64) of a chunk, computed at the logits."""
    values: torch.Tensor


@dataclass
class _Chain:
    bn: Node | None = None
    adds: list = field(default_factory=list)  # (add node, the unchanged operand)
    relu: Node | None = None
    pool: Node | None = None
    nodes: list = field(default_factory=list)  # every node after the head, in order


# ----------------------------------------------------------------------------- matching
def _sole_user(node: Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu(ctx, n: Node) -> bool:
    if n.op == "call_module":
        return type(ctx.module(n)) is nn.ReLU
    if n.op == "call_function":
        return n.target in (F.relu, torch.relu) and len(n.args) == 1
    return n.op == "call_method" and n.target in ("relu", "relu_") and len(n.args) == 1


def _bn2d(ctx, n: Node):
    if n.op != "call_module":
        return None
    m = ctx.module(n)
    return m if isinstance(m, nn.BatchNorm2d) and len(n.args) == 1 and not n.kwargs else None


def _max_pool(ctx, n: Node, h: int, w: int):
    """(k, s) of a plain square max pool whose output size the kernels reproduce, else None."""
    if n.op != "call_module" or type(ctx.module(n)) is not nn.MaxPool2d or len(n.args) != 1:
        return None
    m = ctx.module(n)
    k, s = m.kernel_size, m.stride if m.stride is not None else m.kernel_size
    if isinstance(k, tuple) or isinstance(s, tuple) or m.padding not in (0, (0, 0)) \
            or m.dilation not in (1, (1, 1)) or m.return_indices or not 1 <= s <= k:
        return None
    hp, wp = ctx.base(n).shape[-2:]
    if (hp, wp) != (pool_out(h, k, s), pool_out(w, k, s)):
        return None
    return k, s


def _unchanged_operand(ctx, add: Node, prev: Node):
    """The other operand of ``prev + other`` if it is an unchanged tensor of the same shape."""
    if add.op == "call_function" and add.target in (operator.add, torch.add) and len(add.args) == 2 and not add.kwargs:
        pass
    elif add.op == "call_method" and add.target == "add" and len(add.args) == 2 and not add.kwargs:
        pass
    else:
        return None
    a, b = add.args
    other = b if a is prev else a if b is prev else None
    if other is None or other is prev or not isinstance(other, Node) or other in ctx.affected:
        return None
    ob = ctx.base(other)
    if not isinstance(ob, torch.Tensor) or ob.shape != ctx.base(prev).shape:
        return None
    return other


def _ends_chain(ctx, n) -> bool:
    """A node where the parameter enters again (a module applied twice), or a module with hooks
    (which must run as the model runs them), is never inside a chain."""
    return n is not None and (n in ctx.sources or (n.op == "call_module" and has_hooks(ctx.module(n))))


def _match(ctx, head: Node, *, at_head: bool) -> _Chain:
    """The longest chain that starts at ``head`` (``at_head``) or right after it."""
    ch = _Chain()
    cur, nxt = (head.args[0], head) if at_head else (head, _sole_user(head))
    if _ends_chain(ctx, nxt):
        nxt = None
    h, w = ctx.base(cur).shape[-2:]

    def step(n):
        ch.nodes.append(n)
        user = _sole_user(n)
        return n, None if _ends_chain(ctx, user) else user

    if nxt is not None and _bn2d(ctx, nxt) is not None and nxt.args[0] is cur:
        ch.bn = nxt
        cur, nxt = step(nxt)
    other = _unchanged_operand(ctx, nxt, cur) if nxt is not None else None
    if other is not None:
        ch.adds.append((nxt, other))
        cur, nxt = step(nxt)
    if nxt is not None and _is_relu(ctx, nxt) and nxt.args[0] is cur:
        ch.relu = nxt
        cur, nxt = step(nxt)
        if nxt is not None and nxt.args[0] is cur and _max_pool(ctx, nxt, h, w):
            ch.pool = nxt
            cur, nxt = step(nxt)
    return ch


def _place(head: Node, ch: _Chain, rep) -> dict:
    """``{node: representation}`` of a fused chain: ``rep`` at its last node, placeholders inside
    (and at ``head``, the node the engine asked about, unless it is the last)."""
    if not ch.nodes or ch.nodes == [head]:
        return {head: rep}
    out = {n: Fused() for n in [head] + ch.nodes[:-1]}
    out[ch.nodes[-1]] = rep
    return out


# ----------------------------------------------------------------------------- BatchNorm arguments
def _bn_channel(ctx, bn_node: Node | None, like: torch.Tensor) -> BnArgs:
    """The BatchNorm of a one-channel chain: its base batch's statistics, or its running scale."""
    if bn_node is None:
        return NO_BN
    bn = ctx.module(bn_node)
    if uses_batch_stats(bn):
        x_hat, inv_std = ctx.bn_stats(bn_node, bn_node.args[0])
        w = bn.weight.detach() if bn.weight is not None else inv_std.new_ones(bn.num_features)
        return BnArgs.batch(w.contiguous(), xhat=x_hat.contiguous(), inv_std=inv_std.contiguous())
    scale = bn_running_scale(bn.running_var, bn.eps, None if bn.weight is None else bn.weight.detach())
    return BnArgs.running(scale.to(like.dtype).contiguous())


def _pool(ctx, ch: _Chain) -> PoolArgs:
    return PoolArgs(*_max_pool(ctx, ch.pool, *ctx.base(ch.relu).shape[-2:])) if ch.pool is not None else NO_POOL


def _channel_tail(ctx, ch: _Chain) -> dict:
    """The ReLU and pool of a one-channel chain: the kernels' ``relu_base``, ``pool``, ``pool_base``."""
    return dict(relu_base=ctx.base(ch.relu.args[0]).contiguous() if ch.relu is not None else None,
                pool=_pool(ctx, ch), pool_base=ctx.base(ch.pool).contiguous() if ch.pool is not None else None)


def _channel_rep(ctx, ch: _Chain, head: Node, index, values):
    last = ch.nodes[-1] if ch.nodes else head
    return ChannelDelta(index, values, tuple(ctx.base(last).shape[1:]))


def _logits_ce(ctx, node: Node) -> bool:
    """Whether ``node`` is the model's output and the loss is the default cross-entropy."""
    user = _sole_user(node)
    yb = ctx.base(node)
    return (user is not None and user.op == "output" and ctx.engine.loss_fn is None and yb.dim() == 2
            and isinstance(ctx.targets, torch.Tensor) and ctx.targets.dtype == torch.int64
            and ctx.targets.shape == yb.shape[:1])


# ----------------------------------------------------------------------------- entry points
def fused_source(ctx, node: Node, mod, pname: str, param, idx: torch.Tensor, mu: float):
    """``{node: representation}`` of a weight perturbation at its own layer and the chain after
    it, computed by a fused kernel, or None when no kernel applies."""
    kern = ctx.kernels
    xb, yb = ctx.base(node.args[0]), ctx.base(node)
    if isinstance(mod, nn.Conv2d) and pname == "weight" and mod.padding_mode == "zeros" and xb.dim() == 4:
        c_out = param.shape[0]
        pad_l, _, pad_t, _ = conv_padding(mod.padding, mod.kernel_size, mod.dilation)
        o, src, u, v = conv_weight_coords(param.shape, idx, mod.groups)
        ch = _match(ctx, node, at_head=False)
        vals = kern.conv_delta_chain(xb.contiguous(), src, u * mod.dilation[0] - pad_t, v * mod.dilation[1] - pad_l,
                                     o, mu, stride=mod.stride, out_size=yb.shape[2:], c_out=c_out,
                                     bn=_bn_channel(ctx, ch.bn, yb), **_channel_tail(ctx, ch))
        return _place(node, ch, _channel_rep(ctx, ch, node, o, vals))
    if isinstance(mod, nn.Linear) and pname == "weight" and xb.dim() == 2 and _logits_ce(ctx, node):
        return {node: LossDelta(kern.linear_weight_ce(xb.contiguous(), yb.contiguous(), ctx.targets, idx, mu))}
    return None


def fused_node(ctx, node: Node):
    """``{node: representation}`` of ``node`` and the chain after it, computed by a fused kernel,
    or NotImplemented when no kernel applies."""
    changed = [a for a in node.all_input_nodes if ctx.rep(a) is not None]
    if len(changed) != 1 or not node.args or node.args[0] is not changed[0] \
            or not isinstance(ctx.base(node), torch.Tensor):
        return NotImplemented
    x = changed[0]
    rep, xb = ctx.rep(x), ctx.base(x)
    if isinstance(rep, (Fused, LossDelta)):
        return NotImplemented
    kern = ctx.kernels
    mod = ctx.module(node) if node.op == "call_module" else None
    if type(rep) is ChannelDelta and xb.dim() == 4 and tuple(rep.view) == tuple(xb.shape[1:]):
        if _bn2d(ctx, node) is not None or _is_relu(ctx, node):
            ch = _match(ctx, node, at_head=True)
            vals = kern.channel_chain(rep.values.contiguous(), rep.index, bn=_bn_channel(ctx, ch.bn, xb),
                                      **_channel_tail(ctx, ch))
            return _place(node, ch, _channel_rep(ctx, ch, node, rep.index, vals))
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros" \
                and not isinstance(mod.padding, str) and len(node.args) == 1 and not node.kwargs \
                and ctx.engine.delta_precision == "fp32":
            return _conv1ch(ctx, node, mod, rep)
    if type(rep) is DenseDelta and xb.dim() == 4 and (_bn2d(ctx, node) is not None or _is_relu(ctx, node)):
        return _dense_chain(ctx, node, rep, xb)
    if isinstance(mod, nn.Linear) and xb.dim() == 2 and len(node.args) == 1 and _logits_ce(ctx, node):
        yb, wt = ctx.base(node).contiguous(), mod.weight.detach().contiguous()
        if type(rep) is ChannelDelta and len(rep.view) == 1:
            return {node: LossDelta(kern.linear_rank1_ce(rep.values.contiguous(), rep.index, wt, yb, ctx.targets))}
        if type(rep) is DenseDelta:
            # The kernel takes (values, base) and forms values - base: give it the delta and a
            # zero base, so that no digits are lost to that subtraction.
            return {node: LossDelta(kern.linear_dense_ce(rep.values.contiguous(), torch.zeros_like(xb), wt, yb,
                                                         ctx.targets))}
    return NotImplemented


def _dense_chain(ctx, node: Node, rep: DenseDelta, xb: torch.Tensor):
    """A dense delta ``(B, K, C, H, W)`` through BatchNorm -> [+ unchanged] -> ReLU -> [max pool]: the
    one-channel chain kernel over K*C "perturbations", ``(k, c)`` changing channel c. Each keeps its own
    statistics and the exact delta arithmetic of ``channel_chain`` (max pool included)."""
    ch = _match(ctx, node, at_head=True)
    b, k, c = rep.values.shape[:3]
    index = torch.arange(c, device=xb.device).repeat(k)
    flat = ChannelDelta(index, rep.values.reshape((b, k * c) + tuple(xb.shape[2:])), tuple(xb.shape[1:]))
    vals = ctx.kernels.channel_chain(flat.values.contiguous(), index, bn=_bn_channel(ctx, ch.bn, xb),
                                     **_channel_tail(ctx, ch))
    return _with_global_avg(ctx, node, ch, vals.reshape((b, k, c) + tuple(vals.shape[2:])))


def _global_avg_after(ctx, head: Node, ch: _Chain):
    """The global average pool that alone reads the chain's last node, or None."""
    last = ch.nodes[-1] if ch.nodes else head
    user = _sole_user(last)
    if user is not None and not _ends_chain(ctx, user) and user.args and user.args[0] is last \
            and tuple(ctx.base(user).shape[-2:]) == (1, 1) and (
                (user.op == "call_module" and type(ctx.module(user)) is nn.AdaptiveAvgPool2d)
                or (user.op == "call_function" and user.target is F.adaptive_avg_pool2d)):
        return user
    return None


def _with_global_avg(ctx, head: Node, ch: _Chain, vals: torch.Tensor, averaged: bool = False) -> dict:
    """Place a dense chain's delta ``vals`` ``(B, K, C, H, W)``; when the chain's last node feeds a
    global average pool alone, take that (linear) mean here too (``averaged``: the kernel did), so
    the spatial delta is never stored (the chunk sizing sees only the pooled one)."""
    gap = _global_avg_after(ctx, head, ch)
    if gap is not None:
        ch.nodes.append(gap)
        if not averaged:
            vals = vals.mean((-2, -1), keepdim=True)
    return _place(head, ch, DenseDelta(vals))


def _conv1ch(ctx, node: Node, conv: nn.Conv2d, rep: ChannelDelta) -> dict:
    """The next conv of a one-channel delta (1/C_in of the layer) and the BatchNorm -> [+ unchanged]
    -> ReLU -> [max pool] chain after it, as deltas, in one launch (``conv1ch_delta_chain``: the
    dense delta after the conv never reaches memory). Without a chain, ``conv1ch_chain`` with a
    zero base output and nothing after it is exactly the conv of the delta."""
    base_out = ctx.base(node)
    w = conv.weight.detach().contiguous()
    geometry = ConvArgs(conv.stride, conv.padding if isinstance(conv.padding, tuple) else (conv.padding,) * 2,
                        conv.dilation)
    ch = _match(ctx, node, at_head=False)
    if ch.bn is None and ch.relu is None:
        out = ctx.kernels.conv1ch_chain(rep.values.contiguous(), rep.index, w, torch.zeros_like(base_out),
                                        conv=geometry)
        return {node: DenseDelta(out)}
    gap = _global_avg_after(ctx, node, ch) is not None
    vals = ctx.kernels.conv1ch_delta_chain(rep.values.contiguous(), rep.index, w, conv=geometry,
                                           bn=_bn_channel(ctx, ch.bn, base_out), global_avg=gap,
                                           **_channel_tail(ctx, ch))
    return _with_global_avg(ctx, node, ch, vals, averaged=gap)
