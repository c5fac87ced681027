"""Typed deltas and their propagation rules: the core abstraction of the delta engine.

For a chunk of K perturbations every graph node's value is represented relative to the
unperturbed ("base") forward pass. All representations are sample-major: the perturbation
index k is dim 1, right after the batch dim (dim 0 for a tensor without dims), so that
``(B, K, C, ...)`` merges into a batch of ``B*K`` samples for convolutions and pooling and
views as ``(B, K*C, ...)`` for per-perturbation BatchNorm statistics, both without copies.

* ``None``: the node is unchanged by every perturbation of the chunk;
* :class:`ChannelDelta`: only one channel per perturbation changes (``index[k]`` along dim 1 of
  the tensor viewed as ``(B, C, *inner)``), by ``values[:, k]`` of shape ``(B, *inner)``;
* :class:`DenseDelta`: any change, the difference ``values`` of shape ``(B, K, *base.shape[1:])``;
* :class:`DenseValue`: any change, given as the perturbed values themselves, same shape.

Channel deltas are exact differences: linear operations act on the delta alone and the loss
change is taken in closed form, so float32 estimates keep their digits. Once a delta is dense,
nonlinear operations (batch-statistics BatchNorm, activations, max pooling) run on perturbed
values, which costs one memory pass where an exact delta formula costs several; the difference
to the base is taken once, at the logits, per sample.

A rule maps the representations of a node's inputs to that of its output. Channel-local
operations (BatchNorm, activations, pooling, padding, shortcuts) keep a channel delta a channel
delta; the next conv or linear turns it dense at ``1/C_in`` of the cost of the layer. Every node
without a rule is evaluated densely per perturbation (``torch.func.vmap``, or a loop when an op
cannot be vmapped), which is exact, only slower.
"""
from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from .ops import batch_norm_delta, conv_padding, _pair

__all__ = ["ChannelDelta", "DenseDelta", "DenseValue", "Rules", "densify", "to_values", "kdim"]


@dataclass
class ChannelDelta:
    index: torch.Tensor   # (K,) channel changed by each perturbation
    values: torch.Tensor  # (B, K, *inner) change of that channel
    view: tuple           # (C, *inner): the tensor's shape[1:] as seen by ``index``

    @property
    def k(self) -> int:
        return self.index.shape[0]


@dataclass
class ChannelPreReLU(ChannelDelta):
    """A ReLU of a channel delta whose only consumer is a max pool, not yet applied: ``values``
    is the delta of the ReLU's *input* (base ``pre``). Max pooling commutes with ReLU, so the
    pool applies the ReLU after pooling, on a quarter of the elements."""
    pre: torch.Tensor = None  # base input of the ReLU, gathered: (B, K, *inner)

    def materialize(self) -> ChannelDelta:
        x0, d = self.pre, self.values
        return ChannelDelta(self.index, _relu_delta(x0, d), self.view)


def _relu_delta(x0: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Exact ``relu(x0 + d) - relu(x0)``: where x0 > 0 it is max(d, -x0), else relu(x0 + d)."""
    return torch.where(x0 > 0, torch.maximum(d, -x0), torch.clamp_min(x0 + d, 0))


@dataclass
class DenseDelta:
    values: torch.Tensor  # (B, K, *base.shape[1:]): perturbed minus base


@dataclass
class DenseValue:
    values: torch.Tensor  # (B, K, *base.shape[1:]): the perturbed values


def kdim(base) -> int:
    """Where the perturbation dim sits for a node whose base value is ``base``."""
    return 1 if base.dim() >= 1 else 0


def expand_base(base: torch.Tensor) -> torch.Tensor:
    """``base`` shaped to broadcast against sample-major ``(B, K, ...)`` values."""
    return base.unsqueeze(kdim(base))


def to_values(rep, base: torch.Tensor) -> torch.Tensor:
    """The ``(B, K, ...)`` perturbed values of any representation."""
    if isinstance(rep, DenseValue):
        return rep.values
    return expand_base(base) + densify(rep, base)


def densify(rep, base: torch.Tensor) -> torch.Tensor:
    """The ``(B, K, ...)`` delta of any representation."""
    if isinstance(rep, DenseDelta):
        return rep.values
    if isinstance(rep, DenseValue):
        return rep.values - expand_base(base)
    if isinstance(rep, ChannelPreReLU):
        rep = rep.materialize()
    b, k = rep.values.shape[:2]
    full = rep.values.new_zeros((b, k) + tuple(rep.view))
    full[:, torch.arange(k, device=full.device), rep.index] = rep.values
    return full.reshape((b, k) + tuple(base.shape[1:]))


def gather_channels(t: torch.Tensor, rep: ChannelDelta) -> torch.Tensor:
    """Channel ``rep.index[k]`` of base tensor ``t`` for every k: ``(B, K, *inner)``."""
    return t.reshape((t.shape[0],) + tuple(rep.view)).index_select(1, rep.index)


def _true_layout(rep: ChannelDelta, base: torch.Tensor) -> bool:
    # The channel view is the tensor's real (B, C, spatial...) layout, not a flattened one.
    return tuple(rep.view) == tuple(base.shape[1:])


def _flat(values: torch.Tensor) -> torch.Tensor:
    """Merge the B and K dims: ``(B, K, ...) -> (B*K, ...)``, a batch of B*K samples."""
    return values.reshape((-1,) + tuple(values.shape[2:]))


def _unflat(out: torch.Tensor, b: int, k: int) -> torch.Tensor:
    return out.reshape((b, k) + tuple(out.shape[1:]))


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


def dropout_active(node: Node) -> bool:
    """Whether a functional dropout call drops anything (F.dropout defaults to training=True)."""
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return bool(training) and p != 0


def is_inplace(node: Node, module=None) -> bool:
    """Whether evaluating ``node`` would write into its first input."""
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in _INPLACE_FUNCS or (name.endswith("_") and not name.endswith("__")):
            return True
        if "inplace" in node.kwargs:
            return bool(node.kwargs["inplace"])
        pos = _inplace_position(node.target)
        return pos is not None and len(node.args) > pos and node.args[pos] is True
    return False


def _inplace_position(fn):
    """Position of an ``inplace`` parameter of ``fn`` (``F.relu(x, True)``), or None."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def uses_batch_stats(bn) -> bool:
    return bn.training or bn.running_mean is None


# ----------------------------------------------------------------------------- rules
class Rules:
    """Propagation rules. ``ctx`` gives the base value of a node (``ctx.base(n)``), its delta
    representation (``ctx.rep(n)``), the module of a call_module node (``ctx.module(node)``) and
    BatchNorm statistics of the base pass (``ctx.bn_stats``)."""

    def __init__(self, ctx):
        self.ctx = ctx

    # -- dispatch
    def propagate(self, node: Node):
        ctx = self.ctx
        reps = [ctx.rep(a) for a in node.all_input_nodes]
        if all(r is None for r in reps):
            return None
        if not _has_tensor(ctx.base(node)):
            return None  # sizes, dims and other metadata do not depend on the weights
        out = ctx.fused(node)
        if out is not NotImplemented:
            return out
        if node.op == "call_module":
            mod = ctx.module(node)
            rule = self._module_rule(mod)
        elif node.op == "call_function":
            rule = self._function_rule(node.target)
        elif node.op == "call_method":
            rule = self._method_rule(node.target)
        else:
            rule = None
        if rule != self.max_pool:
            for a in node.all_input_nodes:
                r = ctx.reps.get(a)
                if isinstance(r, ChannelPreReLU):
                    ctx.reps[a] = r.materialize()
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
            # An in-place module would overwrite values other nodes may still read.
            return (lambda t: mod(t.clone())) if getattr(mod, "inplace", False) else mod
        rest = [ctx.value(a) for a in node.args[1:]]
        kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
        kwargs.pop("inplace", None)
        if node.op == "call_function":
            return lambda t: node.target(t, *rest, **kwargs)
        return lambda t: getattr(t, node.target.rstrip("_") if node.target.endswith("_") else node.target)(*rest, **kwargs)

    def _is_max_pool(self, node) -> bool:
        if node.op == "call_module":
            return isinstance(self.ctx.module(node), _MAX_POOL_MODULES)
        return node.op == "call_function" and node.target in _MAX_POOL_FUNCS

    def _only_first_changed(self, node) -> bool:
        x = self._x(node)
        return isinstance(x, Node) and all(self.ctx.rep(a) is None for a in node.all_input_nodes if a is not x)

    # -- rules
    def identity(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        return self.ctx.rep(self._x(node))

    def identity_if_not_training(self, node):
        return NotImplemented if dropout_active(node) else self.identity(node)

    def activation(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        ctx = self.ctx
        x = self._x(node)
        rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
        fn = self._fn(node)
        if not isinstance(rep, ChannelDelta):
            return DenseValue(fn(to_values(rep, xb)))
        x0, d = gather_channels(xb, rep), rep.values
        relu = (node.op == "call_module" and type(ctx.module(node)) is nn.ReLU) or \
            (node.op != "call_module" and node.target in (F.relu, torch.relu, "relu", "relu_"))
        if relu:
            users = list(node.users)
            if len(users) == 1 and self._is_max_pool(users[0]):
                return ChannelPreReLU(rep.index, d, rep.view, pre=x0)
            out = _relu_delta(x0, d)
        else:
            out = fn(x0 + d) - gather_channels(yb, rep)
        return ChannelDelta(rep.index, out, rep.view)

    def _pool(self, node, linear: bool):
        if not self._only_first_changed(node):
            return NotImplemented
        ctx = self.ctx
        x = self._x(node)
        rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
        if isinstance(yb, (tuple, list)) or xb.dim() < 3:
            return NotImplemented  # return_indices=True, or an unbatched input
        fn = self._fn(node)
        if isinstance(rep, ChannelPreReLU) and (not _true_layout(rep, xb) or linear):
            rep = ctx.reps[x] = rep.materialize()
        if isinstance(rep, ChannelDelta):
            if not _true_layout(rep, xb):
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
            return DenseDelta(_unflat(fn(_flat(rep.values)), b, k))
        return DenseValue(_unflat(fn(_flat(to_values(rep, xb))), b, k))

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

    def _binary(self, node, sign: float):
        """``a + b`` / ``a - b`` of same-shaped tensors (or a tensor and a number)."""
        ctx = self.ctx
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
        return type(r)(r.values * s)

    def getitem(self, node):
        ctx = self.ctx
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
            if (_true_layout(rep, xb) and len(idx) >= 2 and idx[0] == full and idx[1] == full
                    and all(isinstance(i, (int, slice)) for i in idx[2:])):
                # (B, K, *inner): the index of the channel dim (all of it) now selects all k.
                return ChannelDelta(rep.index, rep.values[(full, full) + idx[2:]], tuple(yb.shape[1:]))
            rep = DenseDelta(densify(rep, xb))
        # Basic indexing applies to each perturbation's tensor: index the K-major view.
        out = rep.values.movedim(kdim(xb), 0)[(full,) + idx]
        return type(rep)(out.movedim(0, kdim(yb)))

    def pad(self, node):
        ctx = self.ctx
        if not self._only_first_changed(node):
            return NotImplemented
        x = self._x(node)
        rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
        args = list(node.args[1:])
        pad = list(ctx.value(node.kwargs.get("pad", args[0] if args else None)))
        mode = ctx.value(node.kwargs.get("mode", args[1] if len(args) > 1 else "constant"))
        value = ctx.value(node.kwargs.get("value", args[2] if len(args) > 2 else None))
        m = len(pad) // 2
        if m >= xb.dim():
            return NotImplemented  # pads the batch dim
        if isinstance(rep, ChannelDelta):
            if mode != "constant" or not _true_layout(rep, xb):
                return NotImplemented
            spatial = xb.dim() - 2
            if m <= spatial:
                return ChannelDelta(rep.index, F.pad(rep.values, pad), tuple(yb.shape[1:]))
            front, back = pad[2 * spatial], pad[2 * spatial + 1]
            if front < 0 or back < 0:
                return NotImplemented
            vals = F.pad(rep.values, pad[:2 * spatial]) if any(pad[:2 * spatial]) else rep.values
            return ChannelDelta(rep.index + front, vals, tuple(yb.shape[1:]))
        b, k = rep.values.shape[:2]
        if isinstance(rep, DenseValue):
            kw = {} if mode != "constant" or value is None else {"value": value}
            return DenseValue(_unflat(F.pad(_flat(rep.values), pad, mode=mode, **kw), b, k))
        # Padding is linear in the input (a constant pad value cancels in the delta).
        return DenseDelta(_unflat(F.pad(_flat(rep.values), pad, mode=mode), b, k))

    # -- conv / linear / batch norm
    def _conv(self, node, weight, bias, stride, padding, dilation, groups, padding_mode="zeros"):
        ctx = self.ctx
        x = self._x(node)
        rep, xb = ctx.rep(x), ctx.base(x)
        stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        pad = conv_padding(padding, weight.shape[2:], dilation)
        mode = "constant" if padding_mode == "zeros" else padding_mode
        b, k = rep.values.shape[:2]
        if isinstance(rep, ChannelDelta):
            if not _true_layout(rep, xb):
                return NotImplemented
            c_out, c_in_g = weight.shape[:2]
            # One input channel per perturbation: a conv with K groups of one input channel
            # over the (B, K, H, W) delta, 1/C_in of the layer's cost.
            c_local = rep.index % c_in_g
            w = weight.transpose(0, 1)[c_local]  # (K, C_out, kh, kw)
            if groups > 1:
                g_of_out = torch.arange(c_out, device=w.device) // (c_out // groups)
                keep = (g_of_out[None, :] == (rep.index // c_in_g)[:, None]).to(w.dtype)
                w = w * keep[:, :, None, None]
            d = F.pad(rep.values, pad, mode=mode) if any(pad) else rep.values
            out = F.conv2d(d, w.reshape(k * c_out, 1, *weight.shape[2:]), None, stride, 0, dilation, k)
            return DenseDelta(out.reshape((b, k, c_out) + tuple(out.shape[2:])))
        # Dense input: one convolution over the B*K samples, on values or on the delta.
        v = isinstance(rep, DenseValue)
        d = _flat(rep.values)
        if any(pad):
            d = F.pad(d, pad, mode=mode)
        out = F.conv2d(d, weight, bias if v else None, stride, 0, dilation, groups)
        return (DenseValue if v else DenseDelta)(_unflat(out, b, k))

    def conv_module(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        m = self.ctx.module(node)
        return self._conv(node, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)

    def conv_function(self, node):
        if not self._only_first_changed(node):
            return NotImplemented  # a perturbed weight tensor: dense fallback
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = dict(bias=None, stride=1, padding=0, dilation=1, groups=1)
        a = dict(zip(names, node.args))
        a.update(node.kwargs)
        a = {**defaults, **{k: self.ctx.value(v) for k, v in a.items()}}
        return self._conv(node, a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["groups"])

    def _linear(self, node, weight, bias):
        ctx = self.ctx
        x = self._x(node)
        rep, xb = ctx.rep(x), ctx.base(x)
        if isinstance(rep, ChannelDelta) and xb.dim() == 2:
            c = rep.index
            if len(rep.view) == 1:  # one input coordinate: a rank-1 update
                return DenseDelta(rep.values[:, :, None] * weight.t()[c][None])
            wk = weight.reshape(weight.shape[0], rep.view[0], -1)[:, c, :]  # (N_out, K, L)
            return DenseDelta(torch.einsum("bkl,nkl->bkn", rep.values, wk))
        if isinstance(rep, DenseValue):
            return DenseValue(F.linear(rep.values, weight, bias))
        return DenseDelta(F.linear(densify(rep, xb), weight))

    def linear_module(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        m = self.ctx.module(node)
        return self._linear(node, m.weight, m.bias)

    def linear_function(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        w = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
        b = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
        return self._linear(node, self.ctx.value(w), self.ctx.value(b))

    def batch_norm_module(self, node):
        if not self._only_first_changed(node):
            return NotImplemented
        ctx = self.ctx
        bn = ctx.module(node)
        x = self._x(node)
        rep, xb = ctx.rep(x), ctx.base(x)
        if xb.dim() < 2:
            return NotImplemented
        if isinstance(rep, ChannelDelta) and not _true_layout(rep, xb):
            rep = DenseDelta(densify(rep, xb))
        per_k = (1, -1) + (1,) * (xb.dim() - 2)  # broadcasts over (B, K, *inner)
        if uses_batch_stats(bn):
            if isinstance(rep, ChannelDelta):
                x_hat, inv_std = ctx.bn_stats(node, x)  # (B, C, ...), (C,)
                xc = gather_channels(x_hat, rep)
                w = None if bn.weight is None else bn.weight[rep.index].reshape(per_k)
                dims = (0,) + tuple(range(2, xc.dim()))
                out = batch_norm_delta(xc, inv_std[rep.index].reshape(per_k), w, rep.values, dims)
                return ChannelDelta(rep.index, out, rep.view)
            # Dense: statistics of each perturbation's batch. (B, K, C, ...) viewed as
            # (B, K*C, ...) is a batch norm over K*C channels, one native kernel.
            v = to_values(rep, xb)
            b, k = v.shape[:2]
            w = None if bn.weight is None else bn.weight.repeat(k)
            bias = None if bn.bias is None else bn.bias.repeat(k)
            out = F.batch_norm(v.reshape((b, -1) + tuple(v.shape[3:])), None, None, w, bias, True, 0.0, bn.eps)
            return DenseValue(out.reshape(v.shape))
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        if isinstance(rep, ChannelDelta):
            return ChannelDelta(rep.index, rep.values * scale[rep.index].reshape(per_k), rep.view)
        b, k = rep.values.shape[:2]
        if isinstance(rep, DenseValue):
            return DenseValue(_unflat(F.batch_norm(_flat(rep.values), bn.running_mean, bn.running_var,
                                                   bn.weight, bn.bias, False, 0.0, bn.eps), b, k))
        return DenseDelta(rep.values * scale.reshape((-1,) + (1,) * (xb.dim() - 2)))

    # -- fallback
    def fallback(self, node, override=None):
        """Evaluate the node on each perturbation's inputs: vmap over K, else a plain loop.
        ``override = (path, values (K, *shape))`` also replaces a parameter of the node's module
        per perturbation (see the engine's ``call``). ``None`` outputs stay ``None``."""
        ctx = self.ctx
        ctx.engine.fallback_counts[f"{node.op}:{getattr(node.target, '__name__', node.target)}"] += 1
        changed = [a for a in node.all_input_nodes if ctx.rep(a) is not None]
        perturbed = [ctx.perturbed_value(a) for a in changed]
        in_dims = [_kdims(ctx.base(a)) for a in changed]
        if override is not None:
            perturbed.append(override[1])
            in_dims.append(0)
        yb = ctx.base(node)
        multi = isinstance(yb, (tuple, list))
        outs_base = list(yb) if multi else [yb]
        keep = [i for i, o in enumerate(outs_base) if isinstance(o, torch.Tensor)]
        out_dims = tuple(kdim(outs_base[i]) for i in keep)

        def run(*vals):
            env = dict(zip(changed, vals))
            w = (override[0], vals[-1]) if override is not None else None
            out = ctx.call(node, lambda a: env[a] if a in env else ctx.base(a), w)
            out = list(out) if multi else [out]
            return tuple(out[i] for i in keep)

        try:
            outs = torch.func.vmap(run, in_dims=tuple(in_dims), out_dims=out_dims, randomness="error")(*perturbed)
        except Exception:  # an op vmap cannot batch: evaluate perturbation by perturbation
            per_k = [run(*(_select(p, d, i) for p, d in zip(perturbed, in_dims))) for i in range(ctx.k)]
            outs = tuple(torch.stack([o[j] for o in per_k], d) for j, d in enumerate(out_dims))
        reps = [None] * len(outs_base)
        for i, o in zip(keep, outs):
            reps[i] = DenseValue(o)
        return type(yb)(reps) if multi else reps[0]


def _has_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (tuple, list)) and any(_has_tensor(e) for e in v)


def _kdims(base):
    if isinstance(base, (tuple, list)):
        return type(base)(_kdims(b) for b in base)
    return kdim(base) if isinstance(base, torch.Tensor) else None


def _select(value, dims, i):
    if isinstance(value, (tuple, list)):
        return type(value)(_select(v, d, i) for v, d in zip(value, dims))
    return value if dims is None else value.select(dims, i)


def _operand(v):
    return expand_base(v) if isinstance(v, torch.Tensor) else v


def _negate(rep):
    if isinstance(rep, ChannelDelta):
        return ChannelDelta(rep.index, -rep.values, rep.view)
    return DenseDelta(-rep.values)
