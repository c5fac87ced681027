"""Elementwise rules: identity-like ops and activations. A one-channel delta stays one channel; a
dense delta stays a delta (exact difference formulas evaluated from the base input)."""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..deltas import (ChannelDelta, ChannelPreReLU, DenseDelta, DenseValue, FeatureDelta, expand_base, gather_channels,
                      gather_features)
from ..formulas import (clamp_delta, clamp_delta_from, clamp_delta_terms, hardsigmoid_delta, hardswish_delta,
                        leaky_relu_delta, promoted_delta_from, promoted_terms, relu_delta)
from ..graph import DROPOUT_FUNCS, dropout_active
from .registry import as_function, find_rule, first_input, only_first_changed, rule

_ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.ReLU6,
                       nn.Hardtanh, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.CELU, nn.SELU)
_ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.gelu, F.silu, F.elu, F.relu6, F.hardtanh,
                         F.softplus, F.mish, F.hardswish, F.hardsigmoid, F.celu, F.selu, torch.tanh,
                         torch.sigmoid, F.tanh, F.sigmoid)


@rule(nn.Identity, "contiguous", feature_delta=True)
def identity(ctx, node):
    if not only_first_changed(ctx, node):
        return NotImplemented
    return ctx.rep(first_input(node))


@rule(nn.modules.dropout._DropoutNd, feature_delta=True)
def dropout_module(ctx, node):
    """Dropout in eval mode (or p=0) is the identity; an active one is refused by the engine."""
    m = ctx.module(node)
    return identity(ctx, node) if not m.training or m.p == 0 else NotImplemented


@rule(*DROPOUT_FUNCS, feature_delta=True)
def dropout_function(ctx, node):
    return NotImplemented if dropout_active(node) else identity(ctx, node)


@rule(("torchvision.ops.stochastic_depth", "stochastic_depth"), feature_delta=True)
def stochastic_depth(ctx, node):
    """torchvision's ``stochastic_depth(input, p, mode, training=True)`` (an fx leaf there): the
    identity in eval mode or with ``p = 0``; an active one draws random numbers and is refused."""
    a = dict(zip(("input", "p", "mode", "training"), node.args))
    a.update(node.kwargs)
    p, training = ctx.value(a.get("p")), ctx.value(a.get("training", True))
    return identity(ctx, node) if not training or p == 0 else NotImplemented


def _is_plain_relu(ctx, node) -> bool:
    if node.op == "call_module":
        return type(ctx.module(node)) is nn.ReLU
    return node.target in (F.relu, torch.relu, "relu", "relu_")


def _bound_args(node, ctx) -> dict:
    """The keyword arguments of a functional activation call after its input (defaults filled)."""
    try:
        sig = inspect.signature(node.target)
        bound = sig.bind(*[ctx.value(a) for a in node.args], **{k: ctx.value(v) for k, v in node.kwargs.items()})
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])


class SplitFormula:
    """A difference formula in two parts: ``terms(x0)`` from the base input alone (computed once per
    batch for a dense delta) and ``from_terms(terms, d)`` per chunk."""

    def __init__(self, terms, from_terms):
        self.terms, self.from_terms = terms, from_terms

    def __call__(self, x0, d):
        return self.from_terms(self.terms(x0), d)


def delta_formula(ctx, node):
    """``formula(x0, d)``: the exact change of the activation at ``node`` (see ``formulas``); a
    function without a closed form gets its difference taken in float64."""
    if node.op == "call_module":
        m = ctx.module(node)
        kind, args = type(m), {}
        if kind in (nn.Hardtanh, nn.ReLU6):
            kind, args = nn.Hardtanh, dict(min_val=m.min_val, max_val=m.max_val)
        elif kind is nn.LeakyReLU:
            args = dict(negative_slope=m.negative_slope)
    else:
        kind = _KINDS.get(node.target)
        args = _bound_args(node, ctx) if node.op == "call_function" and kind is not None else {}
        if kind is F.relu6:
            kind, args = nn.Hardtanh, dict(min_val=0.0, max_val=6.0)
        elif kind is F.hardtanh:
            kind = nn.Hardtanh
        elif node.op == "call_method" and len(node.args) > 1:
            kind = None
    if kind in (nn.ReLU, F.relu):
        return relu_delta
    if kind is nn.Hardtanh:
        return functools.partial(clamp_delta, lo=float(args.get("min_val", -1.0)), hi=float(args.get("max_val", 1.0)))
    if kind in (nn.LeakyReLU, F.leaky_relu):
        return functools.partial(leaky_relu_delta, slope=float(args.get("negative_slope", 0.01)))
    closed = _CLOSED.get(kind)
    if closed is not None:
        return closed
    fn = as_function(ctx, node)  # smooth: the difference in float64
    return SplitFormula(functools.partial(promoted_terms, fn), functools.partial(promoted_delta_from, fn))


_KINDS = {F.relu: F.relu, torch.relu: F.relu, "relu": F.relu, "relu_": F.relu, F.relu6: F.relu6,
          F.hardtanh: F.hardtanh, F.leaky_relu: F.leaky_relu, torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid,
          "sigmoid": nn.Sigmoid, torch.tanh: nn.Tanh, F.tanh: nn.Tanh, "tanh": nn.Tanh, F.silu: nn.SiLU,
          F.hardsigmoid: nn.Hardsigmoid, F.hardswish: nn.Hardswish}
# Piecewise-linear activations have exact float32 formulas; smooth ones take the float64 difference.
_CLOSED = {nn.Hardsigmoid: hardsigmoid_delta, nn.Hardswish: hardswish_delta}


@rule(*_ACTIVATION_MODULES, *_ACTIVATION_FUNCTIONS, "relu", "relu_", "tanh", "sigmoid", feature_delta=True)
def activation(ctx, node):
    """A one-channel delta stays one channel; a dense delta stays a delta (exact formulas from the
    base input, :func:`delta_formula`); perturbed values (after a fallback) stay values."""
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb = ctx.rep(x), ctx.base(x)
    if isinstance(rep, DenseValue):
        return DenseValue(as_function(ctx, node)(rep.values))
    formula = delta_formula(ctx, node)
    if isinstance(rep, DenseDelta):
        bounds = _clamp_bounds(formula)
        if bounds is not None:  # ReLU, ReLU6, Hardtanh: base-only terms once per batch
            terms = ctx.base_cached((node, "clamp"), lambda: clamp_delta_terms(expand_base(xb), *bounds))
            return DenseDelta(clamp_delta_from(terms, rep.values))
        if isinstance(formula, SplitFormula):  # smooth activations: base terms once per batch
            terms = ctx.base_cached((node, "terms"), lambda: formula.terms(expand_base(xb)))
            return DenseDelta(formula.from_terms(terms, rep.values))
    if isinstance(rep, FeatureDelta):
        return FeatureDelta(rep.index, formula(gather_features(xb, rep), rep.values))
    if isinstance(rep, ChannelDelta):
        x0, d = gather_channels(xb, rep), rep.values
        if _is_plain_relu(ctx, node):
            users = list(node.users)
            if len(users) == 1 and getattr(_rule_of(ctx, users[0]), "accepts_pre_relu", False):
                return ChannelPreReLU(rep.index, d, rep.view, pre=x0)  # the max pool applies it
        return ChannelDelta(rep.index, formula(x0, d), rep.view)
    return DenseDelta(formula(expand_base(xb), rep.values))


def _clamp_bounds(formula):
    """``(lo, hi)`` when ``formula`` is a clamp (ReLU included), else None."""
    if formula is relu_delta:
        return 0.0, math.inf
    if isinstance(formula, functools.partial) and formula.func is clamp_delta:
        return formula.keywords["lo"], formula.keywords["hi"]
    return None


def _rule_of(ctx, node):
    return find_rule(node, ctx.module(node) if node.op == "call_module" else None)
