"""Elementwise rules: identity-like ops and activations. A one-channel delta stays one channel."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..deltas import ChannelDelta, ChannelPreReLU, DenseValue, gather_channels, relu_delta, to_values
from ..graph import DROPOUT_FUNCS, dropout_active
from .registry import as_function, find_rule, first_input, only_first_changed, rule

_ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.ReLU6,
                       nn.Hardtanh, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.CELU, nn.SELU)
_ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.gelu, F.silu, F.elu, F.relu6, F.hardtanh,
                         F.softplus, F.mish, F.hardswish, F.hardsigmoid, F.celu, F.selu, torch.tanh,
                         torch.sigmoid, F.tanh, F.sigmoid)


@rule(nn.Identity, "contiguous")
def identity(ctx, node):
    if not only_first_changed(ctx, node):
        return NotImplemented
    return ctx.rep(first_input(node))


@rule(nn.modules.dropout._DropoutNd)
def dropout_module(ctx, node):
    """Dropout in eval mode (or p=0) is the identity; an active one is refused by the engine."""
    m = ctx.module(node)
    return identity(ctx, node) if not m.training or m.p == 0 else NotImplemented


@rule(*DROPOUT_FUNCS)
def dropout_function(ctx, node):
    return NotImplemented if dropout_active(node) else identity(ctx, node)


def _is_plain_relu(ctx, node) -> bool:
    if node.op == "call_module":
        return type(ctx.module(node)) is nn.ReLU
    return node.target in (F.relu, torch.relu, "relu", "relu_")


@rule(*_ACTIVATION_MODULES, *_ACTIVATION_FUNCTIONS, "relu", "relu_", "tanh", "sigmoid")
def activation(ctx, node):
    if not only_first_changed(ctx, node):
        return NotImplemented
    x = first_input(node)
    rep, xb, yb = ctx.rep(x), ctx.base(x), ctx.base(node)
    fn = as_function(ctx, node)
    if not isinstance(rep, ChannelDelta):
        return DenseValue(fn(to_values(rep, xb)))
    x0, d = gather_channels(xb, rep), rep.values
    if _is_plain_relu(ctx, node):
        users = list(node.users)
        if len(users) == 1 and getattr(_rule_of(ctx, users[0]), "accepts_pre_relu", False):
            return ChannelPreReLU(rep.index, d, rep.view, pre=x0)  # the max pool applies it
        out = relu_delta(x0, d)
    else:
        out = fn(x0 + d) - gather_channels(yb, rep)
    return ChannelDelta(rep.index, out, rep.view)


def _rule_of(ctx, node):
    return find_rule(node, ctx.module(node) if node.op == "call_module" else None)
