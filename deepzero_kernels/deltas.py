"""Typed deltas and their propagation rules: the core abstraction of the delta engine.

For a chunk of K perturbations every graph node's value is represented relative to the
unperturbed ("base") forward pass:

* ``None``: the node is unchanged by every perturbation of the chunk;
* :class:`ChannelDelta`: only one channel per perturbation changes (``index[k]`` along dim 1 of
  the tensor viewed as ``(B, C, *inner)``), by ``values[k]`` of shape ``(B, *inner)``;
* :class:`DenseDelta`: any change, ``values`` of shape ``(K, *base.shape)``.

Deltas are differences (perturbed minus base), not perturbed values: linear operations act on
the delta alone and the loss change is taken in closed form, so float32 estimates do not lose
their digits to a difference of two nearly equal losses.

A rule maps the representations of a node's inputs to that of its output. Channel-local
operations (BatchNorm, activations, pooling, padding, shortcuts) keep a channel delta a channel
delta; the next conv or linear turns it dense at ``1/C_in`` of the cost of the layer. Every node
without a rule is evaluated densely per perturbation (``torch.func.vmap``, or a loop when an op
cannot be vmapped), which is exact, only slower.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from .ops import batch_norm_delta, conv_padding, _pair

__all__ = ["ChannelDelta", "DenseDelta", "propagate", "densify"]


@dataclass
class ChannelDelta:
    index: torch.Tensor   # (K,) channel changed by each perturbation
    values: torch.Tensor  # (K, B, *inner) change of that channel
    view: tuple           # (C, *inner): the tensor's shape[1:] as seen by ``index``

    @property
    def k(self) -> int:
        return self.index.shape[0]


@dataclass
class DenseDelta:
    values: torch.Tensor  # (K, *base.shape)

    @property
    def k(self) -> int:
        return self.values.shape[0]


def densify(rep, base: torch.Tensor) -> torch.Tensor:
    """The ``(K, *base.shape)`` delta of a ChannelDelta or DenseDelta."""
    if isinstance(rep, DenseDelta):
        return rep.values
    k, b = rep.k, base.shape[0]
    full = rep.values.new_zeros((k, b) + tuple(rep.view))
    full[torch.arange(k, device=full.device), :, rep.index] = rep.values
    return full.reshape((k,) + tuple(base.shape))


def gather_channels(t: torch.Tensor, rep: ChannelDelta) -> torch.Tensor:
    """Channel ``rep.index[k]`` of base tensor ``t`` for every k: ``(K, B, *inner)``."""
    b = t.shape[0]
    return t.reshape((b,) + tuple(rep.view)).index_select(1, rep.index).transpose(0, 1)


def _true_layout(rep: ChannelDelta, base: torch.Tensor) -> bool:
    # The channel view is the tensor's real (B, C, spatial...) layout, not a flattened one.
    return tuple(rep.view) == tuple(base.shape[1:])


def _flat(values: torch.Tensor, base_shape) -> torch.Tensor:
    """Merge the K and B dims: ``(K, B, ...) -> (K*B, ...)``."""
    return values.reshape((-1,) + tuple(base_shape[1:]))


# ----------------------------------------------------------------------------- op descriptions
_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.ReLU6,
                nn.Hardtanh, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.CELU, nn.SELU)
_ACT_FUNCS = {F.relu, torch.relu, F.leaky_relu, F.gelu, F.silu, F.elu, F.relu6, F.hardtanh,
              F.softplus, F.mish, F.hardswish, F.hardsigmoid, F.celu, F.selu, torch.tanh,
              torch.sigmoid, F.tanh, F.sigmoid}
_ACT_METHODS = {"relu", "tanh", "sigmoid"}
_MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                     nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                     nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MAX_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_AVG_POOL_FUNCS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_DROPOUT_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                  F.feature_alpha_dropout, torch.dropout}
_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def is_inplace(node: Node, module=None) -> bool:
    """Whether evaluating ``node`` would write into its first input."""
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCS or bool(node.kwargs.get("inplace", False))
    return False


def uses_batch_stats(bn) -> bool:
    return bn.training or bn.running_mean is None


def channel_shape(ndim: int, lead: int = 0) -> tuple:
    """Shape that broadcasts a per-channel vector against a ``(*lead, B, C, ...)`` tensor."""
    return (-1,) + (1,) * (ndim - 2)


# ----------------------------------------------------------------------------- rules
class Rules:
    """Propagation rules. ``ctx`` gives the base value of a node (``ctx.base(n)``), its delta
    representation (``ctx.rep(n)``), the module of a call_module node (``ctx.module(node)``) and
    per-node precomputations (``ctx.aux``)."""

    def __init__(self, ctx):
        self.ctx = ctx

    # -- dispatch
    def propagate(self, node: Node):
        ctx = self.ctx
        reps = [ctx.rep(a) for a in node.all_input_nodes]
        if all(r is None for r in reps):
            return None
        if not isinstance(ctx.base(node), torch.Tensor) and not isinstance(ctx.base(node), (tuple, list)):
            return None  # sizes, dims and other metadata do not depend on the weights
        if node.op == "call_module":
            mod = ctx.module(node)
            rule = self._module_rule(mod)
        elif node.op == "call_function":
            rule = self._function_rule(node.target)
        elif node.op == "call_method":
            rule = self._method_rule(node.target)
        else:
            rule = None
        if rule is not None:
            out = rule(node)
            if out is not NotImplemented:
                return out
        return self.fallback(node)

    def _module_rule(self, mod):
        if isinstance(mod, nn.Conv2d):
            return self.conv_module
        if isinstance(mod, nn.Linear):
            return self.linear_module
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return self.batch_norm_module
        if isinstance(mod, _ACT_MODULES):
            return self.activation
        if isinstance(mod, _MAX_POOL_MODULES):
            return self.max_pool
        if isinstance(mod, _AVG_POOL_MODULES):
            return self.avg_pool
        if isinstance(mod, nn.Flatten):
            return self.flatten
        if isinstance(mod, nn.Identity) or (isinstance(mod, nn.modules.dropout._DropoutNd)
                                            and (not mod.training or mod.p == 0)):
            return self.identity
        return None

    def _function_rule(self, fn):
        if fn in _ACT_FUNCS:
            return self.activation
        if fn in _MAX_POOL_FUNCS:
            return self.max_pool
        if fn in _AVG_POOL_FUNCS:
            return self.avg_pool
        if fn is torch.flatten:
            return self.flatten
        if fn in (operator.add, operator.iadd, torch.add):
            return self.add
        if fn in (operator.sub, operator.isub, torch.sub):
            return self.sub
        if fn in (operator.mul, operator.imul, torch.mul):
            return self.scale
        if fn is operator.getitem:
            return self.getitem
        if fn is F.pad:
            return self.pad
        if fn is F.conv2d:
            return self.conv_function
        if fn is F.linear:
            return self.linear_function
        if fn in _DROPOUT_FUNCS:
            return self.identity_if_not_training
        return None

    def _method_rule(self, name):
        if name in _ACT_METHODS:
            return self.activation
        if name in ("view", "reshape", "flatten"):
            return self.flatten
        if name == "contiguous":
            return self.identity
        if name in ("add", "add_"):
            return self.add
        if name in ("sub", "sub_"):
            return self.sub
        if name in ("mul", "mul_"):
            return self.scale
        return None

    # -- helpers
    def _x(self, node):
        return node.args[0] if node.args else next(iter(node.kwargs.values()))

    def _fn(self, node):
        """The node's operation as a function of its first (tensor) argument."""
        ctx = self.ctx
        if node.op == "call_module":
            mod = ctx.module(node)
            return mod
        rest = [ctx.value(a) for a in node.args[1:]]
        kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
        kwargs.pop("inplace", None)
        if node.op == "call_function":
            return lambda t: node.target(t, *rest, **kwargs)
        return lambda t: getattr(t, node.target.rstrip("_") if node.target.endswith("_") else node.target)(*rest, **kwargs)

    def _only_first_changed(self, node) -> bool:
        x = self._x(node)
        return isinstance(x, Node) and all(self.ctx.rep(a) is None for a in node.all_input_nodes if a is not x)

    # -- rules
    def identity(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        return self.ctx.rep(self._x(node))

    def identity_if_not_training(self, node):
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return self.identity(node) if (not training or p == 0) else NotImplemented

    def activation(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        ctx = self.ctx
        x = self._x(node)
        rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
        fn = self._fn(node)
        relu = (node.op == "call_module" and type(ctx.module(node)) is nn.ReLU) or \
            (node.op != "call_module" and node.target in (F.relu, torch.relu, "relu"))
        if isinstance(rep, ChannelDelta):
            x0, y0 = gather_channels(xb, rep), None
        else:
            x0 = xb
        d = rep.values
        if relu:  # exact: where x > 0 the change is max(d, -x), else relu(x + d)
            out = torch.where(x0 > 0, torch.maximum(d, -x0), torch.clamp_min(x0 + d, 0))
        else:
            y0 = gather_channels(yb, rep) if isinstance(rep, ChannelDelta) else yb
            out = fn(x0 + d) - y0
        if isinstance(rep, ChannelDelta):
            return ChannelDelta(rep.index, out, rep.view)
        return DenseDelta(out)

    def _pool(self, node, linear: bool):
        if not self._only_first_changed(node):
            return NotImplemented
        ctx = self.ctx
        x = self._x(node)
        rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
        if isinstance(yb, (tuple, list)):
            return NotImplemented  # return_indices=True
        fn = self._fn(node)
        if isinstance(rep, ChannelDelta):
            if not _true_layout(rep, xb):
                return NotImplemented
            k, b = rep.k, xb.shape[0]
            inner = rep.values.shape[2:]
            v = rep.values.reshape((k * b, 1) + tuple(inner))
            if linear:
                out = fn(v)
            else:
                out = fn(v + gather_channels(xb, rep).reshape(v.shape))
                out = out - gather_channels(yb, ChannelDelta(rep.index, None, tuple(yb.shape[1:]))).reshape(out.shape)
            out = out.reshape((k, b) + tuple(out.shape[2:]))
            return ChannelDelta(rep.index, out, tuple(yb.shape[1:]))
        k = rep.k
        d = _flat(rep.values, xb.shape)
        if linear:
            out = fn(d)
        else:
            out = fn(d + xb.repeat((k,) + (1,) * (xb.dim() - 1))) - yb.repeat((k,) + (1,) * (yb.dim() - 1))
        return DenseDelta(out.reshape((k,) + tuple(yb.shape)))

    def max_pool(self, node):
        return self._pool(node, linear=False)

    def avg_pool(self, node):
        return self._pool(node, linear=True)

    def flatten(self, node):
        """flatten / view / reshape: a channel delta survives a flatten of all non-batch dims."""
        if not self._only_first_changed(node):
            return NotImplemented
        ctx = self.ctx
        x = self._x(node)
        rep, yb = ctx.rep(x), ctx.base(node)
        if isinstance(rep, ChannelDelta):
            c = rep.view[0]
            if yb.dim() == 2 and yb.shape[1] == math.prod(rep.view) and yb.shape[0] == rep.values.shape[1]:
                k, b = rep.values.shape[:2]
                view = (c,) if yb.shape[1] == c else (c, yb.shape[1] // c)
                return ChannelDelta(rep.index, rep.values.reshape((k, b) + view[1:]), view)
            if tuple(yb.shape[1:]) == tuple(rep.view):
                return rep
            return DenseDelta(densify(rep, ctx.base(x)).reshape((rep.k,) + tuple(yb.shape)))
        # A reshape acts on each perturbation's tensor alone: reshape the stacked deltas.
        return DenseDelta(rep.values.reshape((rep.k,) + tuple(yb.shape)))

    def _binary(self, node, sign: float):
        ctx = self.ctx
        if node.op == "call_method" or node.target in (torch.add, torch.sub):
            if "alpha" in node.kwargs or len(node.args) > 2:
                return NotImplemented
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        ra = ctx.rep(a) if isinstance(a, Node) else None
        rb = ctx.rep(b) if isinstance(b, Node) else None
        yb = ctx.base(node)
        if rb is not None and sign < 0:
            rb = _negate(rb)
        changed = [(r, ctx.base(n)) for r, n in ((ra, a), (rb, b)) if r is not None]
        if len(changed) == 1:
            r, base = changed[0]
            if not isinstance(base, torch.Tensor) or tuple(base.shape) != tuple(yb.shape):
                return NotImplemented  # broadcasting expands the delta: let the fallback do it
            return r
        (r1, b1), (r2, b2) = changed
        if tuple(b1.shape) != tuple(yb.shape) or tuple(b2.shape) != tuple(yb.shape):
            return NotImplemented
        if (isinstance(r1, ChannelDelta) and isinstance(r2, ChannelDelta) and r1.view == r2.view
                and (r1.index is r2.index or torch.equal(r1.index, r2.index))):
            return ChannelDelta(r1.index, r1.values + r2.values, r1.view)
        return DenseDelta(densify(r1, b1) + densify(r2, b2))

    def add(self, node):
        return self._binary(node, 1.0)

    def sub(self, node):
        return self._binary(node, -1.0)

    def scale(self, node):
        """Multiplication by a constant number is linear: scale the delta."""
        a, b = node.args[0], node.args[1]
        if isinstance(a, Node) and isinstance(b, (int, float)):
            r, s = self.ctx.rep(a), b
        elif isinstance(b, Node) and isinstance(a, (int, float)):
            r, s = self.ctx.rep(b), a
        else:
            return NotImplemented
        if isinstance(r, ChannelDelta):
            return ChannelDelta(r.index, r.values * s, r.view)
        return DenseDelta(r.values * s)

    def getitem(self, node):
        ctx = self.ctx
        x, idx = node.args
        rep = ctx.rep(x)
        if isinstance(rep, (tuple, list)):
            return rep[idx]
        xb, yb = ctx.base(x), ctx.base(node)
        if not isinstance(xb, torch.Tensor) or isinstance(idx, Node):
            return NotImplemented
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
            return NotImplemented
        if any(isinstance(i, slice) and any(isinstance(v, Node) for v in (i.start, i.stop, i.step)) for i in idx):
            return NotImplemented
        full = slice(None)
        if isinstance(rep, ChannelDelta):
            if (_true_layout(rep, xb) and len(idx) >= 2 and idx[0] == full and idx[1] == full
                    and all(isinstance(i, (int, slice)) for i in idx[2:])):
                return ChannelDelta(rep.index, rep.values[(full, full) + idx[2:]], tuple(yb.shape[1:]))
            rep = DenseDelta(densify(rep, xb))
        return DenseDelta(rep.values[(full,) + idx])

    def pad(self, node):
        ctx = self.ctx
        if not self._only_first_changed(node):
            return NotImplemented
        x = self._x(node)
        rep, xb = ctx.rep(x), ctx.base(x)
        args = list(node.args[1:])
        pad = ctx.value(node.kwargs.get("pad", args[0] if args else None))
        mode = ctx.value(node.kwargs.get("mode", args[1] if len(args) > 1 else "constant"))
        pad = list(pad)
        m = len(pad) // 2
        if m >= xb.dim():
            return NotImplemented  # pads the batch dim
        if isinstance(rep, ChannelDelta):
            if mode != "constant" or not _true_layout(rep, xb):
                return NotImplemented
            spatial = xb.dim() - 2
            if m <= spatial:
                return ChannelDelta(rep.index, F.pad(rep.values, pad), tuple(ctx.base(node).shape[1:]))
            front, back = pad[2 * spatial], pad[2 * spatial + 1]
            if front < 0 or back < 0:
                return NotImplemented
            vals = F.pad(rep.values, pad[:2 * spatial]) if any(pad[:2 * spatial]) else rep.values
            return ChannelDelta(rep.index + front, vals, tuple(ctx.base(node).shape[1:]))
        # Padding is linear in the input (the pad value cancels in the delta).
        k = rep.k
        d = _flat(rep.values, xb.shape)
        out = F.pad(d, pad, mode=mode) if mode != "constant" else F.pad(d, pad)
        return DenseDelta(out.reshape((k,) + tuple(ctx.base(node).shape)))

    # -- conv / linear / batch norm
    def _conv(self, node, weight, stride, padding, dilation, groups, padding_mode="zeros"):
        ctx = self.ctx
        x = self._x(node)
        rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
        stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        pad = conv_padding(padding, weight.shape[2:], dilation)
        mode = "constant" if padding_mode == "zeros" else padding_mode
        if isinstance(rep, ChannelDelta):
            if not _true_layout(rep, xb):
                return NotImplemented
            k, b = rep.k, xb.shape[0]
            c_out, c_in_g = weight.shape[:2]
            # One input channel per perturbation: a conv with K groups of one input channel.
            c_local = rep.index % c_in_g
            w = weight.transpose(0, 1)[c_local]  # (K, C_out, kh, kw)
            if groups > 1:
                g_of_out = torch.arange(c_out, device=w.device) // (c_out // groups)
                keep = (g_of_out[None, :] == (rep.index // c_in_g)[:, None]).to(w.dtype)
                w = w * keep[:, :, None, None]
            d = rep.values.transpose(0, 1)  # (B, K, H, W)
            if any(pad):
                d = F.pad(d, pad, mode=mode)
            out = F.conv2d(d, w.reshape(k * c_out, 1, *weight.shape[2:]), None, stride, 0, dilation, k)
            out = out.reshape(b, k, c_out, *out.shape[2:]).transpose(0, 1)
            return DenseDelta(out)
        d = _flat(rep.values, xb.shape)
        if any(pad):
            d = F.pad(d, pad, mode=mode)
        out = F.conv2d(d, weight, None, stride, 0, dilation, groups)
        return DenseDelta(out.reshape((rep.k,) + tuple(yb.shape)))

    def conv_module(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        m = self.ctx.module(node)
        return self._conv(node, m.weight, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)

    def conv_function(self, node):
        if not self._only_first_changed(node):
            return NotImplemented  # a perturbed weight tensor: dense fallback
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = dict(bias=None, stride=1, padding=0, dilation=1, groups=1)
        a = dict(zip(names, node.args))
        a.update(node.kwargs)
        a = {**defaults, **{k: self.ctx.value(v) for k, v in a.items()}}
        return self._conv(node, a["weight"], a["stride"], a["padding"], a["dilation"], a["groups"])

    def _linear(self, node, weight):
        ctx = self.ctx
        x = self._x(node)
        rep, xb = ctx.rep(x), ctx.base(x)
        if isinstance(rep, ChannelDelta) and xb.dim() == 2:
            c = rep.index
            if len(rep.view) == 1:  # one input coordinate: a rank-1 update
                return DenseDelta(rep.values[:, :, None] * weight.t()[c][:, None, :])
            wk = weight.reshape(weight.shape[0], rep.view[0], -1)[:, c, :]  # (N_out, K, L)
            return DenseDelta(torch.einsum("kbl,nkl->kbn", rep.values, wk))
        d = densify(rep, xb)
        return DenseDelta(F.linear(d, weight))

    def linear_module(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        return self._linear(node, self.ctx.module(node).weight)

    def linear_function(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        w = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
        return self._linear(node, self.ctx.value(w))

    def batch_norm_module(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        ctx = self.ctx
        bn = ctx.module(node)
        x = self._x(node)
        rep, xb = ctx.rep(x), ctx.base(x)
        if isinstance(rep, ChannelDelta) and not _true_layout(rep, xb):
            rep = DenseDelta(densify(rep, xb))
        if uses_batch_stats(bn):
            x_hat, inv_std = ctx.bn_stats(node, x)  # (B, C, ...), (C,)
            if isinstance(rep, ChannelDelta):
                xc = gather_channels(x_hat, rep)  # (K, B, *inner)
                shape = (rep.k,) + (1,) * (xc.dim() - 1)
                w = None if bn.weight is None else bn.weight[rep.index].reshape(shape)
                out = batch_norm_delta(xc, inv_std[rep.index].reshape(shape), w, rep.values,
                                       tuple(range(1, xc.dim())))
                return ChannelDelta(rep.index, out, rep.view)
            shape = (-1,) + (1,) * (xb.dim() - 2)
            w = None if bn.weight is None else bn.weight.reshape(shape)
            dims = (1,) + tuple(range(3, xb.dim() + 1))
            return DenseDelta(batch_norm_delta(x_hat, inv_std.reshape(shape), w, rep.values, dims))
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        if isinstance(rep, ChannelDelta):
            s = scale[rep.index].reshape((rep.k,) + (1,) * (rep.values.dim() - 1))
            return ChannelDelta(rep.index, rep.values * s, rep.view)
        return DenseDelta(rep.values * scale.reshape((-1,) + (1,) * (xb.dim() - 2)))

    # -- fallback
    def fallback(self, node):
        """Evaluate the node on each perturbation's inputs: vmap over K, else a plain loop."""
        ctx = self.ctx
        k = ctx.k
        ctx.engine.fallback_counts[f"{node.op}:{getattr(node.target, '__name__', node.target)}"] += 1
        changed = [a for a in node.all_input_nodes if ctx.rep(a) is not None]
        perturbed = [ctx.perturbed_value(a) for a in changed]  # (K, ...) each
        yb = ctx.base(node)

        def run(*vals):
            env = dict(zip(changed, vals))
            return ctx.call(node, lambda a: env[a] if a in env else ctx.base(a))

        try:
            out = torch.func.vmap(run, randomness="error")(*perturbed)
        except Exception:  # an op vmap cannot batch: evaluate perturbation by perturbation
            outs = [run(*(p[i] for p in perturbed)) for i in range(k)]
            out = torch.stack(outs) if isinstance(yb, torch.Tensor) else \
                type(yb)(torch.stack([o[j] for o in outs]) for j in range(len(yb)))
        if isinstance(yb, torch.Tensor):
            return DenseDelta(out - yb)
        return type(yb)(DenseDelta(o - b) for o, b in zip(out, yb))


def _negate(rep):
    if isinstance(rep, ChannelDelta):
        return ChannelDelta(rep.index, -rep.values, rep.view)
    return DenseDelta(-rep.values)


def propagate(ctx, node):
    return Rules(ctx).propagate(node)
