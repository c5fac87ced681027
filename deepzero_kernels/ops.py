"""Fused perturbation ops: many single-weight perturbations of one layer in one batched call.

A perturbation ``W[i] += mu`` of a conv or linear layer changes a single output channel
(coordinate) by a rank-1 delta read off the layer's input, so no convolution or matmul is
recomputed. This module holds

* the public ops other zeroth-order code imports: :func:`conv2d_perturbed` and
  :func:`linear_perturbed` (full perturbed outputs, shape ``(K, B, ...)``);
* the delta primitives the engine builds on: :func:`conv2d_weight_delta`,
  :func:`linear_weight_delta` (only the changed channel), :func:`batch_norm_delta` and
  :func:`cross_entropy_delta` (closed-form loss change at the logits);
* backend selection (:func:`backends`, :func:`resolve_backend`). The ``torch`` backend defines
  the semantics and runs everywhere.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import kernels
from .formulas import (batch_norm_delta, conv2d_weight_delta, conv_padding, conv_weight_coords, cross_entropy_delta,
                       linear_weight_delta, pair)

__all__ = ["conv2d_perturbed", "linear_perturbed", "conv2d_weight_delta", "linear_weight_delta",
           "batch_norm_delta", "cross_entropy_delta", "backends", "resolve_backend"]


# ----------------------------------------------------------------------------- backends
def backends(device: torch.device | str | None = None) -> dict:
    """Report which backends are available on ``device`` (default CPU): ``{name: (available, reason)}``."""
    return {"torch": (True, "always available; defines the semantics"), **kernels.available(device)}


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """Map a user's ``backend`` choice to an available backend for ``device`` (the kernel registry's
    :func:`~deepzero_kernels.kernels.resolve`).

    ``auto`` picks ``native`` when it is built for the device, else ``triton`` on a GPU, else
    ``torch``; it never fails, and says once (a warning) which optional backend it could not
    use. Naming an unavailable backend is a ``ValueError`` with the reason."""
    return kernels.resolve(backend, device)


# ----------------------------------------------------------------------------- validation
def check_mu(mu, values: dict | None = None) -> float:
    """``mu`` must be a finite positive real number.

    With ``values`` (``{name: tensor}`` of the parameter values that ``mu`` will be added to),
    ``mu`` must also survive the addition: ``fl(theta + mu) - theta`` is off from ``mu`` by up to
    ``eps * |theta| / 2`` in the tensor's dtype, so ``mu >= 100 * eps * max|theta|`` keeps the
    step within 0.5 % of ``mu`` for every value (and ``mu`` at least the dtype's smallest normal
    number). A smaller ``mu`` would silently estimate with a different step than it divides by
    (``1e-30`` on float32 weights near 1 is no step at all).
    """
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real):
        raise TypeError(f"mu must be a real number, got {type(mu).__name__}")
    mu = float(mu)
    if not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"mu must be finite and > 0, got {mu}")
    named = [(n, v.detach()) for n, v in (values or {}).items()
             if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    if named:
        dev = named[0][1].device
        peaks = torch.stack([v.abs().amax().to(device=dev, dtype=torch.float64) for _, v in named]).tolist()
        for (name, v), peak in zip(named, peaks):
            fi = torch.finfo(v.dtype)
            need = max(100 * fi.eps * peak, fi.tiny)
            if math.isfinite(peak) and mu < need:
                raise ValueError(f"mu={mu:g} is too small for {name} ({v.dtype}, largest |value| {peak:.3g}): "
                                 f"value + mu rounds to a step more than 0.5% away from mu. Use mu >= {need:.3g} "
                                 f"(100 x the dtype's epsilon {fi.eps:.3g} x the largest |value|)")
    return mu


def check_count(name: str, v) -> int:
    """``v`` must be a positive int (a count such as ``q`` or ``chunk_size``)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def check_tensor(name: str, t, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_same(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_index(idx, numel: int, device: torch.device, *, name: str = "idx") -> torch.Tensor:
    """``idx`` must be a non-empty 1-D integer tensor of flat indices in ``[0, numel)``."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() == 0:
        raise ValueError(f"{name} is empty: pass at least one index")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= numel:
        raise ValueError(f"{name} out of range: values must lie in [0, {numel}), got min {lo}, max {hi}")
    return idx.to(device=device, dtype=torch.long)


# ----------------------------------------------------------------------------- public ops
def _check_param(param: str) -> str:
    if param not in ("weight", "bias"):
        raise ValueError(f"param must be 'weight' or 'bias', got {param!r}")
    return param


def _check_bias(x, weight, bias, param):
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("x", x, "bias", bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} outputs")
    elif param == "bias":
        raise ValueError("param='bias' needs a bias tensor, got bias=None")


def conv2d_perturbed(x, weight, bias, idx, mu, *, stride=1, padding=0, dilation=1, groups=1,
                     param="weight", backend="auto"):
    """Outputs of ``F.conv2d`` under K single-coordinate perturbations, in one batched call.

    Args:
        x: input ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in/groups, kh, kw)``. bias: ``(C_out,)`` or None.
        idx: 1-D integer tensor of K flat indices into ``weight`` (or ``bias`` if
            ``param="bias"``).
        mu: perturbation size, finite and > 0.
        stride, padding, dilation, groups: as ``F.conv2d`` (``padding`` may be ``'same'``/``'valid'``).
    Returns:
        ``(K, B, C_out, H_out, W_out)`` where ``out[k] == F.conv2d(x, weight + mu*e_idx[k], bias, ...)``
        (with the bias perturbed instead when ``param="bias"``). Computed from one convolution of
        the unperturbed layer plus a rank-1 delta per k, not K convolutions.
    """
    param = _check_param(param)
    x = check_tensor("x", x, ndim=4)
    weight = check_tensor("weight", weight, ndim=4)
    check_same("x", x, "weight", weight)
    _check_bias(x, weight, bias, param)
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"groups={groups!r} must divide C_in={x.shape[1]} and C_out={weight.shape[0]}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[1] * groups} "
                         f"(weight.shape[1]={weight.shape[1]} x groups={groups})")
    mu = check_mu(mu)
    backend = resolve_backend(backend, x.device)
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got {stride}, {dilation}")
    pad = conv_padding(padding, weight.shape[2:], dilation)
    span = [d * (k - 1) + 1 for d, k in zip(dilation, weight.shape[2:])]
    padded = [x.shape[2] + pad[2] + pad[3], x.shape[3] + pad[0] + pad[1]]
    if span[0] > padded[0] or span[1] > padded[1]:
        raise ValueError(f"weight's {weight.shape[2]}x{weight.shape[3]} kernel (dilation {dilation}) spans "
                         f"{span[0]}x{span[1]} pixels, more than x's {padded[0]}x{padded[1]} padded input "
                         f"(x is {x.shape[2]}x{x.shape[3]}, padding={padding!r})")
    target = weight if param == "weight" else bias
    idx = check_index(idx, target.numel(), x.device)
    check_mu(mu, {param: target.detach().reshape(-1)[idx]})
    x = x.contiguous()
    base = F.conv2d(F.pad(x, pad) if any(pad) else x, weight, bias, stride, 0, dilation, groups)
    k = idx.numel()
    out = base.unsqueeze(0).repeat(k, 1, 1, 1, 1)
    if param == "weight" and backend != "torch" and x.dtype in (torch.float32, torch.float64):
        ch, src, u, v = conv_weight_coords(weight.shape, idx, groups)  # the gather kernel, no chain after it
        vals = kernels.get(backend).conv_delta_chain(x, src, u * dilation[0] - pad[2], v * dilation[1] - pad[0], ch,
                                                     mu, stride=stride, out_size=base.shape[2:], c_out=weight.shape[0])
        out[torch.arange(k, device=x.device), :, ch] += vals.transpose(0, 1)
    elif param == "weight":
        ch, vals = conv2d_weight_delta(x, weight.shape, idx, mu, stride=stride, pad=pad,
                                       dilation=dilation, groups=groups)
        out[torch.arange(k, device=x.device), :, ch] += vals.transpose(0, 1)
    else:
        out[torch.arange(k, device=x.device), :, idx] += mu
    return out


def linear_perturbed(x, weight, bias, idx, mu, *, param="weight"):
    """Outputs of ``F.linear`` under K single-coordinate perturbations, in one batched call.

    Args:
        x: input ``(B, N_in)``. weight: ``(N_out, N_in)``. bias: ``(N_out,)`` or None.
        idx: 1-D integer tensor of K flat indices into ``weight`` (or ``bias``).
        mu: perturbation size, finite and > 0.
    Returns:
        ``(K, B, N_out)`` where ``out[k] == F.linear(x, weight + mu*e_idx[k], bias)``: one matmul plus
        a rank-1 update per k (plain torch on every device: no backend has a kernel for it).
    """
    param = _check_param(param)
    x = check_tensor("x", x, ndim=2)
    weight = check_tensor("weight", weight, ndim=2)
    check_same("x", x, "weight", weight)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but weight expects {weight.shape[1]}")
    _check_bias(x, weight, bias, param)
    mu = check_mu(mu)
    target = weight if param == "weight" else bias
    idx = check_index(idx, target.numel(), x.device)
    check_mu(mu, {param: target.detach().reshape(-1)[idx]})
    base = F.linear(x, weight, bias)
    k = idx.numel()
    out = base.unsqueeze(0).repeat(k, 1, 1)
    ar = torch.arange(k, device=x.device)
    if param == "weight":
        coords, vals = linear_weight_delta(x, weight.shape, idx, mu)
        out[ar, :, coords] += vals.t()
    else:
        out[ar, :, idx] += mu
    return out
