"""The native backend: the operators ``torch.ops.deepzero.<kernel>`` that ``csrc/`` registers with
``TORCH_LIBRARY`` (CPU, and CUDA when built with it), with the arguments of ``reference.py``.

Importing the extension ``deepzero_kernels._native`` loads the library and registers the
operators; :func:`register_fakes` adds their fake (meta) implementations, the output shapes, so
that ``torch.compile`` can trace a function that calls them. The dispatcher picks the device from
the tensors. This module imports nothing of the extension itself: :func:`ops` returns the
operator namespace once :mod:`deepzero_kernels.kernels.registry` has loaded it.
"""
from __future__ import annotations

import torch

from ..formulas import conv_out_size, pool_out

__all__ = ["KERNELS", "ops", "missing", "register_fakes"]

KERNELS = ("conv_delta_chain", "channel_chain", "conv1ch_delta_chain", "conv1ch_chain", "bn_act_dense",
           "linear_weight_ce", "linear_rank1_ce", "linear_dense_ce")


def ops():
    """``torch.ops.deepzero``: the operators (valid once the extension is imported)."""
    return torch.ops.deepzero


def missing() -> list[str]:
    """The kernels the loaded extension registered no operator for (all of them for a module built
    from older sources, which bound its kernels with pybind11 instead)."""
    return [name for name in KERNELS if not hasattr(torch.ops.deepzero, name)]


# ----------------------------------------------------------------------------- fake implementations
def _onech_shape(b, k, h, w, pool_k, pool_base):
    return (b, k, pool_base.shape[2], pool_base.shape[3]) if pool_k else (b, k, h, w)


def _dense_shape(b, k, c, h, w, pool_k, pool_s, global_avg):
    if global_avg:
        return (b, k, c)
    return (b, k, c, pool_out(h, pool_k, pool_s), pool_out(w, pool_k, pool_s)) if pool_k else (b, k, c, h, w)


def _fake_channel_chain(values, channel, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s,
                        pool_base):
    b, k, h, w = values.shape
    return values.new_empty(_onech_shape(b, k, h, w, pool_k, pool_base))


def _fake_conv_delta_chain(x, src_channel, off_h, off_w, out_channel, mu, stride_h, stride_w, h_out, w_out, bn_mode,
                           bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base):
    return x.new_empty(_onech_shape(x.shape[0], src_channel.shape[0], h_out, w_out, pool_k, pool_base))


def _fake_bn_act_dense(values, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg):
    b, k, c, h, w = values.shape
    return values.new_empty(_dense_shape(b, k, c, h, w, pool_k, pool_s, global_avg))


def _fake_conv1ch_chain(delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, base_out, bn_mode,
                        bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg):
    b, k, h, w = delta.shape
    c, _, kh, kw = weight.shape
    ho, wo = conv_out_size(h, kh, stride_h, pad_h, dil_h), conv_out_size(w, kw, stride_w, pad_w, dil_w)
    return delta.new_empty(_dense_shape(b, k, c, ho, wo, pool_k, pool_s, global_avg))


def _fake_conv1ch_delta_chain(delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, bn_mode, bn_xhat,
                              bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base, global_avg):
    b, k, h, w = delta.shape
    c, _, kh, kw = weight.shape
    if global_avg:
        return delta.new_empty((b, k, c, 1, 1))
    ho, wo = conv_out_size(h, kh, stride_h, pad_h, dil_h), conv_out_size(w, kw, stride_w, pad_w, dil_w)
    return delta.new_empty((b, k) + _onech_shape(b, c, ho, wo, pool_k, pool_base)[1:])


def _fake_ce(k, logits):
    return logits.new_empty((k, logits.shape[0]), dtype=torch.float64)


def _fake_linear_weight_ce(x, logits, target, idx, mu):
    return _fake_ce(idx.shape[0], logits)


def _fake_linear_rank1_ce(values, channel, weight, logits, target):
    return _fake_ce(values.shape[1], logits)


def _fake_linear_dense_ce(values, base, weight, logits, target):
    return _fake_ce(values.shape[1], logits)


_registered: list = []


def register_fakes() -> None:
    """Register the fake implementations of the operators (once per process; the extension must be
    imported, since the operators have to exist)."""
    if _registered:
        return
    for name in KERNELS:
        torch.library.register_fake(f"deepzero::{name}")(globals()[f"_fake_{name}"])
    _registered.append(True)
