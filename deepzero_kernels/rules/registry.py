"""The rule registry, the context every rule reads, dispatch and the exact dense fallback.

A *rule* maps the delta representations of a node's inputs to that of its output:
``rule(ctx, node) -> representation | None | NotImplemented`` (NotImplemented: this case is not
handled, evaluate the node densely). Register it for the ops it covers::

    @rule(nn.ReLU, F.relu, torch.relu, "relu")
    def activation(ctx, node): ...

Module classes match by ``isinstance`` (the most recently registered match wins), functions by
identity, strings name ``Tensor`` methods, ``("package.module", "name")`` names a function of a
package the project does not import (torchvision's ``stochastic_depth``). ``mixes_channels=True`` marks ops that spread a
one-channel delta over every channel (the FLOP cost model reads it).

A *source rule* gives the representation at a node where the perturbed parameter enters, for a
module whose input is unchanged: ``source(ctx, node, path, param, idx, mu) -> rep | None``
(None: not handled, the engine evaluates the module with perturbed copies).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
from torch.fx import Node

from ..deltas import ChannelPreReLU, DenseDelta, DenseValue, FeatureDelta, densify, kdim
from ..functional import has_hooks, vmap_or_loop

__all__ = ["RuleContext", "rule", "source_rule", "find_rule", "find_source_rule", "mixes_channels", "propagate",
           "fallback", "first_input", "as_function", "only_first_changed"]


class RuleContext(Protocol):
    """What a rule may read (the engine's per-batch state, see ``engine._Pass``)."""
    k: int                 # perturbations in the chunk
    reps: dict             # node -> representation of the chunk in flight
    engine: Any            # the DeltaEngine (loss_fn, delta_precision, fallback_counts, last_report)

    def base(self, n) -> Any: ...                        # unperturbed value of a node (or n itself)
    def rep(self, n) -> Any: ...                         # representation of a node, None if unchanged
    def value(self, v) -> Any: ...                       # an argument structure with base values
    def module(self, node: Node) -> nn.Module: ...       # the module of a call_module node
    def bn_stats(self, node: Node, x: Node) -> tuple: ...  # (centred input, 1/std) of a batch-stats BN
    def base_cached(self, key, make: Callable) -> Any: ...  # make() once per batch (base-derived tensors)
    def perturbed_value(self, n) -> Any: ...             # (B, K, ...) perturbed values of a node
    def fused(self, node: Node) -> Any: ...              # a fused kernel chain's result, or NotImplemented
    def call(self, node: Node, getter: Callable, override=None) -> Any: ...  # evaluate a node


_MODULE_RULES: list = []      # (module class, rule), searched newest first
_FUNCTION_RULES: dict = {}    # function -> rule
_NAMED_RULES: dict = {}       # (module, name) of a function in a package we do not import -> rule
_METHOD_RULES: dict = {}      # Tensor method name -> rule
_SOURCE_RULES: list = []      # (module class, source rule)
_MIXING_MODULES: list = []
_MIXING_FUNCTIONS: set = set()


def rule(*targets, mixes_channels: bool = False, feature_delta: bool = False):
    """Register the decorated ``rule(ctx, node)`` for module classes, functions and method names.
    ``feature_delta=True``: the rule handles :class:`~deepzero_kernels.deltas.FeatureDelta` inputs
    (others receive them densified)."""
    def register(fn):
        if feature_delta:
            fn.accepts_feature_delta = True
        for t in targets:
            if isinstance(t, str):
                _METHOD_RULES[t] = fn
            elif isinstance(t, tuple) and len(t) == 2 and all(isinstance(e, str) for e in t):
                _NAMED_RULES[t] = fn
            elif isinstance(t, type) and issubclass(t, nn.Module):
                _MODULE_RULES.insert(0, (t, fn))
                if mixes_channels:
                    _MIXING_MODULES.append(t)
            elif callable(t):
                _FUNCTION_RULES[t] = fn
                if mixes_channels:
                    _MIXING_FUNCTIONS.add(t)
            else:
                raise TypeError(f"cannot register a rule for {t!r}")
        return fn
    return register


def source_rule(*module_types):
    """Register the decorated ``source(ctx, node, path, param, idx, mu)`` for module classes."""
    def register(fn):
        for t in module_types:
            _SOURCE_RULES.insert(0, (t, fn))
        return fn
    return register


def _by_class(table, mod):
    return next((fn for cls, fn in table if isinstance(mod, cls)), None)


def find_rule(node: Node, module=None):
    if node.op == "call_module":
        return _by_class(_MODULE_RULES, module)
    if node.op == "call_function":
        try:
            fn = _FUNCTION_RULES.get(node.target)
        except TypeError:  # an unhashable callable
            return None
        if fn is None and _NAMED_RULES:
            fn = _NAMED_RULES.get((getattr(node.target, "__module__", None), getattr(node.target, "__name__", None)))
        return fn
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None


def find_source_rule(module):
    return _by_class(_SOURCE_RULES, module)


def mixes_channels(node: Node, module=None) -> bool:
    """Whether the op spreads a one-channel delta over every channel (conv, linear)."""
    if node.op == "call_module":
        return isinstance(module, tuple(_MIXING_MODULES))
    return node.op == "call_function" and node.target in _MIXING_FUNCTIONS


# ----------------------------------------------------------------------------- dispatch
def propagate(ctx: RuleContext, node: Node):
    """The representation of ``node``: unchanged, a fused chain, its rule, or the dense fallback."""
    reps = [ctx.rep(a) for a in node.all_input_nodes]
    if all(r is None for r in reps):
        return None
    if not _has_tensor(ctx.base(node)):
        return None  # sizes, dims and other metadata do not depend on the weights
    module = ctx.module(node) if node.op == "call_module" else None
    if module is not None and has_hooks(module):
        return fallback(ctx, node)  # the module's hooks must run: evaluate it as the model would
    fn = find_rule(node, module)
    # Lazy representations only reach the rules that declare they handle them; the others (and the
    # fused chains) see their dense or one-channel equivalent.
    for a in node.all_input_nodes:
        r = ctx.reps.get(a)
        if isinstance(r, ChannelPreReLU) and not getattr(fn, "accepts_pre_relu", False):
            ctx.reps[a] = r.materialize()
        elif isinstance(r, FeatureDelta) and not getattr(fn, "accepts_feature_delta", False):
            ctx.reps[a] = DenseDelta(densify(r, ctx.base(a)))
    out = ctx.fused(node)
    if out is not NotImplemented:
        return out
    if fn is not None:
        out = fn(ctx, node)
        if out is not NotImplemented:
            return out
    return fallback(ctx, node)


def fallback(ctx: RuleContext, node: Node, override=None):
    """Evaluate the node on each perturbation's inputs: vmap over K, else a plain loop; exact.
    ``override = (path, values (K, *shape))`` also replaces a parameter of the node's module
    per perturbation (see the engine's ``call``). ``None`` outputs stay ``None``."""
    engine = ctx.engine
    label = fallback_label(node, ctx.module(node) if node.op == "call_module" else None)
    engine.fallback_counts[label] += ctx.k
    engine.last_report.fallback[label] = engine.last_report.fallback.get(label, 0) + ctx.k
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

    outs = vmap_or_loop(run, tuple(perturbed), tuple(in_dims), out_dims, ctx.k)
    reps = [None] * len(outs_base)
    for i, o in zip(keep, outs):
        reps[i] = DenseValue(o)
    return type(yb)(reps) if multi else reps[0]


def fallback_label(node: Node, module=None) -> str:
    """How a report names a node: its graph name and the op it runs."""
    op = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({op})"


# ----------------------------------------------------------------------------- helpers for rules
def first_input(node: Node):
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


def as_function(ctx: RuleContext, node: Node):
    """The node's operation as a function of its first (tensor) argument, never in place."""
    if node.op == "call_module":
        mod = ctx.module(node)
        # An in-place module would overwrite values other nodes may still read.
        return (lambda t: mod(t.clone())) if getattr(mod, "inplace", False) else mod
    rest = [ctx.value(a) for a in node.args[1:]]
    kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
    kwargs.pop("inplace", None)
    if node.op == "call_function":
        return lambda t: node.target(t, *rest, **kwargs)
    name = node.target[:-1] if node.target.endswith("_") else node.target
    return lambda t: getattr(t, name)(*rest, **kwargs)


def only_first_changed(ctx: RuleContext, node: Node) -> bool:
    x = first_input(node)
    return isinstance(x, Node) and all(ctx.rep(a) is None for a in node.all_input_nodes if a is not x)


def _has_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (tuple, list)) and any(_has_tensor(e) for e in v)


def _kdims(base):
    if isinstance(base, (tuple, list)):
        return type(base)(_kdims(b) for b in base)
    return kdim(base) if isinstance(base, torch.Tensor) else None
