"""Typed arguments of the fused kernels: the BatchNorm mode and small specs that the validated
entry points (:class:`deepzero_kernels.kernels.Kernels`) take instead of long positional lists.

The backends themselves (``reference.py``, ``triton_backend.py``, the native operators) take the
flat argument list of the operator schema, with :class:`BnMode` as its int value; the C++ side
mirrors it as ``dz::BnMode`` (``csrc/dz_math.h``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["BnMode", "BnArgs", "PoolArgs", "ConvArgs", "NO_BN", "NO_POOL"]


class BnMode(enum.IntEnum):
    """The BatchNorm in a chain (``dz::BnMode`` in C++, the same values)."""
    NONE = 0     #: no BatchNorm
    BATCH = 1    #: batch statistics (training mode): each perturbation's own mean and variance
    RUNNING = 2  #: running statistics (eval mode): a fixed per-channel affine ``x * weight + bias``


@dataclass(frozen=True)
class BnArgs:
    """The BatchNorm of a chain.

    * ``NONE``: nothing else.
    * ``BATCH``: ``weight`` is the affine weight ``(C,)`` (ones if the module has none). One-channel
      chains (``conv_delta_chain``, ``channel_chain``) take the base batch's centred input ``xhat``
      ``(B, C, H, W)`` (``x - mean``) and ``inv_std`` ``(C,)`` (``1/sqrt(var + eps)``, biased
      variance); dense chains (``conv1ch_chain``, ``bn_act_dense``) take ``bias`` ``(C,)`` and ``eps``
      and compute the statistics of every perturbation themselves.
    * ``RUNNING``: the running statistics folded into a per-channel affine: ``weight`` is the scale
      ``weight / sqrt(running_var + eps)`` (:func:`deepzero_kernels.formulas.bn_running_scale`),
      ``bias`` the shift ``bias - running_mean * scale`` (dense chains only: a one-channel delta
      only scales).
    """
    mode: BnMode = BnMode.NONE
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    xhat: torch.Tensor | None = None
    inv_std: torch.Tensor | None = None
    eps: float = 1e-5

    @classmethod
    def batch(cls, weight, *, xhat=None, inv_std=None, bias=None, eps: float = 1e-5) -> "BnArgs":
        return cls(BnMode.BATCH, weight, bias, xhat, inv_std, eps)

    @classmethod
    def running(cls, scale, shift=None) -> "BnArgs":
        return cls(BnMode.RUNNING, scale, shift)


@dataclass(frozen=True)
class PoolArgs:
    """A max pool after the ReLU: window ``k``, stride ``s``, no padding, ``ceil_mode`` windows
    clipped at the border (output ``formulas.pool_out``). ``k = s = 0``: no pool."""
    k: int = 0
    s: int = 0

    def __bool__(self) -> bool:
        return self.k != 0


@dataclass(frozen=True)
class ConvArgs:
    """Geometry of a convolution: ``(h, w)`` pairs, symmetric zero padding (as ``F.conv2d``)."""
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)


NO_BN = BnArgs()
NO_POOL = PoolArgs()
