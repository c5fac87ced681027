"""Conv and linear: the rules after a changed input, and the rank-1 source deltas of their own
weights. These ops mix channels: a one-channel delta entering one becomes dense."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..deltas import ChannelDelta, DenseDelta, DenseValue, FeatureDelta, densify, flat, true_layout, unflat
from ..formulas import conv2d_weight_delta, conv_padding, linear_weight_delta, pair
from ..precision import delta_map
from .registry import first_input, only_first_changed, rule, source_rule


def _conv(ctx, node, weight, bias, stride, padding, dilation, groups, padding_mode="zeros"):
    x = first_input(node)
    rep, xb = ctx.rep(x), ctx.base(x)
    if xb.dim() != 4:
        return NotImplemented
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    pad = conv_padding(padding, weight.shape[2:], dilation)
    # Symmetric zero padding goes to the convolution itself (no padded copy of the delta).
    conv_pad = (pad[2], pad[0]) if padding_mode == "zeros" and pad[0] == pad[1] and pad[2] == pad[3] else 0
    if conv_pad:
        pad = (0, 0, 0, 0)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    b, k = rep.values.shape[:2]
    prec = ctx.engine.delta_precision
    if isinstance(rep, ChannelDelta):
        if not true_layout(rep, xb):
            return NotImplemented
        c_out, c_in_g = weight.shape[:2]
        d = F.pad(rep.values, pad, mode=mode) if any(pad) else rep.values
        if c_in_g == 1 and c_out == groups:
            # Depthwise: input channel c feeds output channel c alone; the delta stays one channel.
            out = delta_map(prec, F.conv2d, d, weight[rep.index], None, stride, conv_pad, dilation, k)
            return ChannelDelta(rep.index, out, (c_out,) + tuple(out.shape[2:]))
        # One input channel per perturbation: a conv with K groups of one input channel
        # over the (B, K, H, W) delta, 1/C_in of the layer's cost.
        c_local = rep.index % c_in_g
        w = weight.transpose(0, 1)[c_local]  # (K, C_out, kh, kw)
        if groups > 1:
            g_of_out = torch.arange(c_out, device=w.device) // (c_out // groups)
            keep = (g_of_out[None, :] == (rep.index // c_in_g)[:, None]).to(w.dtype)
            w = w * keep[:, :, None, None]
        w = w.reshape(k * c_out, 1, *weight.shape[2:])
        out = delta_map(prec, F.conv2d, d, w, None, stride, conv_pad, dilation, k)
        return DenseDelta(out.reshape((b, k, c_out) + tuple(out.shape[2:])))
    # Dense input: one convolution over the B*K samples, on values or on the delta.
    d = flat(rep.values)
    if any(pad):
        d = F.pad(d, pad, mode=mode)
    if isinstance(rep, DenseValue):
        return DenseValue(unflat(F.conv2d(d, weight, bias, stride, conv_pad, dilation, groups), b, k))
    return DenseDelta(unflat(delta_map(prec, F.conv2d, d, weight, None, stride, conv_pad, dilation, groups), b, k))


@rule(nn.Conv2d, mixes_channels=True)
def conv_module(ctx, node):
    if not only_first_changed(ctx, node):
        return NotImplemented
    m = ctx.module(node)
    return _conv(ctx, node, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)


@rule(F.conv2d, mixes_channels=True)
def conv_function(ctx, node):
    if not only_first_changed(ctx, node):
        return NotImplemented  # a perturbed weight tensor: dense fallback
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = dict(bias=None, stride=1, padding=0, dilation=1, groups=1)
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    a = {**defaults, **{k: ctx.value(v) for k, v in a.items()}}
    return _conv(ctx, node, a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["groups"])


def _linear(ctx, node, weight, bias):
    x = first_input(node)
    rep, xb = ctx.rep(x), ctx.base(x)
    prec = ctx.engine.delta_precision
    if isinstance(rep, FeatureDelta):  # one input feature per token: a rank-1 update, no matmul
        w = weight.t()[rep.index]  # (K, N_out)
        w = w.reshape((1, rep.k) + (1,) * (rep.values.dim() - 2) + (weight.shape[0],))
        return DenseDelta(rep.values.unsqueeze(-1) * w)
    if isinstance(rep, ChannelDelta) and xb.dim() == 2:
        c = rep.index
        if len(rep.view) == 1:  # one input coordinate: a rank-1 update
            return DenseDelta(rep.values[:, :, None] * weight.t()[c][None])
        wk = weight.reshape(weight.shape[0], rep.view[0], -1)[:, c, :]  # (N_out, K, L)
        return DenseDelta(delta_map(prec, functools.partial(torch.einsum, "bkl,nkl->bkn"), rep.values, wk))
    if isinstance(rep, DenseValue):
        return DenseValue(F.linear(rep.values, weight, bias))
    return DenseDelta(delta_map(prec, F.linear, densify(rep, xb), weight))


@rule(nn.Linear, mixes_channels=True, feature_delta=True)
def linear_module(ctx, node):
    if not only_first_changed(ctx, node):
        return NotImplemented
    m = ctx.module(node)
    return _linear(ctx, node, m.weight, m.bias)


@rule(F.linear, mixes_channels=True, feature_delta=True)
def linear_function(ctx, node):
    if not only_first_changed(ctx, node):
        return NotImplemented
    w = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
    b = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
    return _linear(ctx, node, ctx.value(w), ctx.value(b))


# ----------------------------------------------------------------------------- sources
@source_rule(nn.Conv2d)
def conv_source(ctx, node, path, param, idx, mu):
    """``W[o,c,u,v] += mu`` changes channel o by ``mu * x_pad[:, c, u*d + s*i, v*d + s*j]``;
    ``b[o] += mu`` adds mu to channel o."""
    mod = ctx.module(node)
    xb, yb = ctx.base(node.args[0]), ctx.base(node)
    if xb.dim() != 4:
        return None
    if path == "weight":
        pad = conv_padding(mod.padding, mod.kernel_size, mod.dilation)
        ch, vals = conv2d_weight_delta(xb, param.shape, idx, mu, stride=mod.stride, pad=pad, dilation=mod.dilation,
                                       groups=mod.groups, padding_mode=mod.padding_mode)
        return ChannelDelta(ch, vals, tuple(yb.shape[1:]))
    return ChannelDelta(idx, yb.new_full((yb.shape[0], idx.numel()) + tuple(yb.shape[2:]), mu), tuple(yb.shape[1:]))


@source_rule(nn.Linear)
def linear_source(ctx, node, path, param, idx, mu):
    """``W[i,j] += mu`` changes output coordinate i by ``mu * x[..., j]``; ``b[i] += mu`` by mu.
    On ``(B, T, D)`` inputs the changed coordinate is a feature of the last dim at every token
    (:class:`FeatureDelta`)."""
    xb, yb = ctx.base(node.args[0]), ctx.base(node)
    if xb.dim() < 2:
        return None
    if xb.dim() > 2:
        k = idx.numel()
        i, vals = (linear_weight_delta(xb, param.shape, idx, mu) if path == "weight"
                   else (idx, yb.new_full(tuple(yb.shape[:-1]) + (k,), mu)))  # vals (B, ..., K)
        return FeatureDelta(i, vals.movedim(-1, 1))
    if path == "weight":
        i, vals = linear_weight_delta(xb, param.shape, idx, mu)
        return ChannelDelta(i, vals, tuple(yb.shape[1:]))
    return ChannelDelta(idx, yb.new_full((yb.shape[0], idx.numel()), mu), tuple(yb.shape[1:]))
