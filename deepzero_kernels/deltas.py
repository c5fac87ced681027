"""Typed deltas and their propagation rules: the core abstraction of the delta engine.

For a chunk of K perturbations every graph node's value is represented relative to the
unperturbed ("base") forward pass. All representations are sample-major: the perturbation
index k is dim 1, right after the batch dim (dim 0 for a tensor without dims), so that
``(B, K, C, ...)`` merges into a batch of ``B*K`` samples for convolutions and pooling and
views as ``(B, K*C, ...)`` for per-perturbation BatchNorm statistics, both without copies.

* ``None``: the node is unchanged by every perturbation of the chunk;
* :class:`ChannelDelta`: only one channel per perturbation changes (``index[k]`` along dim 1 of
  the tensor viewed as ``(B, C, *inner)``), by ``values[:, k]`` of shape ``(B, *inner)``;
* :class:`FeatureDelta`: only one feature of the last dim changes per perturbation (a Linear's or
  LayerNorm's own weight on ``(B, ..., D)`` token or NHWC inputs): ``index[k]``, by ``values[:, k]``
  of shape ``(B, *base.shape[1:-1])``;
* :class:`DenseDelta`: any change, the difference ``values`` of shape ``(B, K, *base.shape[1:])``;
* :class:`DenseValue`: any change, given as the perturbed values themselves, same shape.

Deltas, one-channel or dense, are carried all the way to the loss: linear operations act on the
delta alone (``L(x + d) - L(x) = L(d)``), every nonlinear rule evaluates an exact difference
formula from the cached base values (:mod:`deepzero_kernels.formulas`), and the loss change is
taken in closed form at the logits. Rounding errors are therefore relative to the delta, not to
the activations: float32 estimates keep float64's digits, and the linear maps on deltas may run
in TF32 or bf16 (:mod:`deepzero_kernels.precision`). ``DenseValue`` only appears after a node
without a delta rule (the exact per-perturbation fallback); the rules after it work on values.

The rules that map these representations through each op live in :mod:`deepzero_kernels.rules`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formulas import relu_delta

__all__ = ["ChannelDelta", "ChannelPreReLU", "FeatureDelta", "DenseDelta", "DenseValue", "broadcast_values", "densify", "expand_base", "flat",
           "gather_channels", "gather_features", "kdim", "to_values", "true_layout", "unflat"]


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
        return ChannelDelta(self.index, relu_delta(x0, d), self.view)


@dataclass
class FeatureDelta:
    """One feature of the last dim changed per perturbation: feature ``index[k]`` by ``values[:, k]``
    (``(B, K, *lead)``, lead = the base's dims between the batch and the last). Rules that do not
    declare ``accepts_feature_delta`` see it as a :class:`DenseDelta` (``registry.propagate``)."""
    index: torch.Tensor   # (K,)
    values: torch.Tensor  # (B, K, *lead)

    @property
    def k(self) -> int:
        return self.index.shape[0]


def gather_features(t: torch.Tensor, rep: FeatureDelta) -> torch.Tensor:
    """Feature ``rep.index[k]`` (last dim) of base tensor ``t`` for every k: ``(B, K, *lead)``."""
    return t.index_select(-1, rep.index).movedim(-1, 1)


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
    if isinstance(rep, FeatureDelta):
        b, k = rep.values.shape[:2]
        full = rep.values.new_zeros(tuple(base.shape[:1]) + (k,) + tuple(base.shape[1:]))
        full.movedim(-1, 2)[:, torch.arange(k, device=full.device), rep.index] = rep.values
        return full
    if isinstance(rep, ChannelPreReLU):
        rep = rep.materialize()
    b, k = rep.values.shape[:2]
    full = rep.values.new_zeros((b, k) + tuple(rep.view))
    full[:, torch.arange(k, device=full.device), rep.index] = rep.values
    return full.reshape((b, k) + tuple(base.shape[1:]))


def broadcast_values(values: torch.Tensor, base: torch.Tensor, shape) -> torch.Tensor:
    """``(.., K, ..)`` values (or deltas) of a node with base ``base`` broadcast as ``base`` broadcasts
    to ``shape`` (torch's rules: new leading dims, size-1 dims expanded), sample-major for ``shape``."""
    km = values.movedim(kdim(base), 0)  # (K, *base.shape)
    km = km.reshape((km.shape[0],) + (1,) * (len(shape) - base.dim()) + tuple(base.shape))
    km = km.expand((km.shape[0],) + tuple(shape))
    return km.movedim(0, 1 if len(shape) >= 1 else 0).contiguous()


def gather_channels(t: torch.Tensor, rep: ChannelDelta) -> torch.Tensor:
    """Channel ``rep.index[k]`` of base tensor ``t`` for every k: ``(B, K, *inner)``."""
    return t.reshape((t.shape[0],) + tuple(rep.view)).index_select(1, rep.index)


def true_layout(rep: ChannelDelta, base: torch.Tensor) -> bool:
    # The channel view is the tensor's real (B, C, spatial...) layout, not a flattened one.
    return tuple(rep.view) == tuple(base.shape[1:])


def flat(values: torch.Tensor) -> torch.Tensor:
    """Merge the B and K dims: ``(B, K, ...) -> (B*K, ...)``, a batch of B*K samples."""
    return values.reshape((-1,) + tuple(values.shape[2:]))


def unflat(out: torch.Tensor, b: int, k: int) -> torch.Tensor:
    return out.reshape((b, k) + tuple(out.shape[1:]))
