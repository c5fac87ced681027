"""Formulas: the arithmetic of single-weight perturbations, shared by the ops, the delta rules,
the fused-kernel references and the cost model. A leaf: imports nothing of the package.

* geometry: :func:`pair`, :func:`conv_padding`, :func:`conv_out_size`, :func:`pool_out`,
  :func:`conv_weight_coords`;
* rank-1 source deltas: :func:`conv2d_weight_delta`, :func:`linear_weight_delta`;
* BatchNorm / LayerNorm: :func:`bn_running_scale` and the exact change under batch (or
  per-position) statistics :func:`batch_norm_delta`;
* activations: exact differences ``f(x0 + d) - f(x0)`` that do not cancel: :func:`relu_delta`,
  :func:`clamp_delta`, :func:`leaky_relu_delta`, :func:`hardsigmoid_delta`, :func:`hardswish_delta`
  (piecewise linear, exact in float32), and :func:`promoted_delta` (the difference taken in float64)
  for smooth functions (sigmoid, tanh, SiLU, GELU, ...);
* :func:`softmax_delta`, :func:`log_softmax_delta`: the change of a softmax from its base output;
* the loss: :func:`cross_entropy_delta`, the closed-form change of cross-entropy at the logits.

Every delta formula takes the base value ``x0`` and the change ``d`` of the input and returns the
change of the output with a rounding error relative to that change, not to the values: a float32
estimate keeps its digits however small the perturbation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["pair", "conv_padding", "conv_out_size", "pool_out", "conv_weight_coords", "conv2d_weight_delta",
           "linear_weight_delta", "bn_running_scale", "batch_norm_delta", "relu_delta", "clamp_delta", "clamp_delta_terms", "clamp_delta_from",
           "leaky_relu_delta", "hardsigmoid_delta", "hardswish_delta", "promoted_terms", "promoted_delta_from",
           "promoted_delta", "softmax_delta", "log_softmax_delta", "cross_entropy_delta"]


def conv_out_size(n: int, k: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution along one dim (``pad`` on each side)."""
    return (n + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def pool_out(n: int, k: int, s: int) -> int:
    """Output length of a ``ceil_mode`` max pool without padding (every window starts inside)."""
    return -(-(n - k) // s) + 1 if n >= k else 1


def bn_running_scale(running_var: torch.Tensor, eps: float, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-channel scale of an eval-mode BatchNorm: ``weight / sqrt(running_var + eps)``."""
    scale = torch.rsqrt(running_var + eps)
    return scale if weight is None else scale * weight


def pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(a, int) for a in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


def conv_padding(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """Explicit ``(left, right, top, bottom)`` zero padding for a conv's ``padding`` argument,
    including the strings ``'valid'`` and ``'same'`` (asymmetric for even kernels, as PyTorch)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for k, d in ((kernel_size[1], dilation[1]), (kernel_size[0], dilation[0])):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return (pw, pw, ph, ph)


# ----------------------------------------------------------------------------- delta primitives
def conv_weight_coords(weight_shape, idx: torch.Tensor, groups: int = 1):
    """Flat weight indices -> ``(o, c, u, v)``: output channel, absolute input channel (inside
    o's group) and kernel tap of each perturbed weight ``W.view(-1)[idx[k]]``."""
    c_out, c_in_g, kh, kw = weight_shape
    o, rem = idx // (c_in_g * kh * kw), idx % (c_in_g * kh * kw)
    c, rem = rem // (kh * kw), rem % (kh * kw)
    return o, (o // (c_out // groups)) * c_in_g + c, rem // kw, rem % kw


def conv2d_weight_delta(x: torch.Tensor, weight_shape, idx: torch.Tensor, mu: float, *,
                        stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1,
                        padding_mode: str = "zeros"):
    """Delta of a conv output under ``W.view(-1)[idx[k]] += mu``, for every k at once.

    ``W[o, c, u, v] += mu`` changes only output channel ``o``, by
    ``mu * x_pad[:, g*C_in_g + c, u*d + s*i, v*d + s*j]``. Returns ``(channels, values)``:
    ``channels`` of shape ``(K,)`` and ``values`` of shape ``(B, K, H_out, W_out)`` (sample-major,
    as the engine stores deltas).
    Inputs are assumed validated. ``pad`` is ``(left, right, top, bottom)``.
    """
    c_out, c_in_g, kh, kw = weight_shape
    o, c_abs, u, v = conv_weight_coords(weight_shape, idx, groups)
    if any(pad):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, pad, mode=mode)
    x = x.contiguous()
    b, c_all, hp, wp = x.shape
    sh, sw = stride
    dh, dw = dilation
    h_out, w_out = conv_out_size(hp, kh, sh, 0, dh), conv_out_size(wp, kw, sw, 0, dw)
    # Flat offsets (within one sample) of the K windows' elements: one index_select on the
    # contiguous (B, C*Hp*Wp) input gathers all of them.
    start = c_abs * (hp * wp) + (u * dh) * wp + v * dw  # (K,)
    rows = sh * wp * torch.arange(h_out, device=x.device)
    cols = sw * torch.arange(w_out, device=x.device)
    flat = (start[:, None, None] + rows[None, :, None] + cols[None, None, :]).reshape(-1)
    vals = x.reshape(b, -1).index_select(1, flat).reshape(b, -1, h_out, w_out)  # (B, K, H_out, W_out)
    return o, vals * mu


def linear_weight_delta(x: torch.Tensor, weight_shape, idx: torch.Tensor, mu: float):
    """Delta of ``F.linear`` output under ``W.view(-1)[idx[k]] += mu``: output coordinate
    ``i = idx // N_in`` changes by ``mu * x[..., j]`` with ``j = idx % N_in``.
    Returns ``(coords (K,), values (*x.shape[:-1], K))``."""
    n_in = weight_shape[1]
    i, j = idx // n_in, idx % n_in
    return i, x.index_select(-1, j) * mu


def batch_norm_delta(x_hat: torch.Tensor, inv_std: torch.Tensor, weight: torch.Tensor | None,
                     delta: torch.Tensor, reduce_dims: tuple[int, ...]):
    """Exact change of a batch-statistics BatchNorm output when its input changes by ``delta``.

    ``x_hat`` is the centred input ``x - mean`` and ``inv_std`` ``1/sqrt(var + eps)`` (biased
    variance) of the unperturbed batch, broadcastable to ``delta``; ``weight`` the affine scale
    (or None). ``reduce_dims`` are the dims of ``delta`` that statistics are taken over (batch and
    spatial). The new statistics are formed from moments of ``delta`` so that no difference of
    two large numbers is taken: ``var' - var = 2 E[x_hat delta] + E[delta^2] - E[delta]^2``, and
    ``out' - out = w (x_hat (inv' - inv) + (delta - E[delta]) inv')``.
    """
    n = math.prod(delta.shape[d] for d in reduce_dims)
    d_mean = delta.sum(reduce_dims, keepdim=True) / n
    d_var = (2 * (x_hat * delta).sum(reduce_dims, keepdim=True) + delta.square().sum(reduce_dims, keepdim=True)) / n \
        - d_mean.square()
    # 1/sqrt(var + dvar + eps) - 1/sqrt(var + eps) without cancellation.
    std = inv_std.reciprocal()
    new_inv = torch.rsqrt(std.square() + d_var)
    d_inv = -d_var * inv_std * new_inv / (std + new_inv.reciprocal())
    if weight is not None:
        d_inv, new_inv = d_inv * weight, new_inv * weight
    return torch.addcmul(torch.addcmul(-d_mean * new_inv, x_hat, d_inv), delta, new_inv)


# ----------------------------------------------------------------------------- activations
def relu_delta(x0: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Exact ``relu(x0 + d) - relu(x0)``: where x0 > 0 it is max(d, -x0), else relu(x0 + d)."""
    return torch.where(x0 > 0, torch.maximum(d, -x0), torch.clamp_min(x0 + d, 0))


def clamp_delta(x0: torch.Tensor, d: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clamp(x0 + d, lo, hi) - clamp(x0, lo, hi)`` (ReLU6, Hardtanh) without cancellation: with
    ``c0 = clamp(x0)`` and the excess ``r = x0 - c0`` (0 inside), it is ``clamp(r + d, lo - c0, hi - c0)``;
    every bound that can be active is within ``|d|`` of the point, so rounding stays relative to d."""
    c0 = x0.clamp(lo, hi)
    return torch.minimum(torch.maximum((x0 - c0) + d, lo - c0), hi - c0)


def clamp_delta_terms(x0: torch.Tensor, lo: float, hi: float):
    """The base-only terms of :func:`clamp_delta`: ``(r, lo - c0, hi - c0)``; with them the delta of
    any change is ``min(max(r + d, lo - c0), hi - c0)`` (two or three passes over d)."""
    c0 = x0.clamp(lo, hi)
    return x0 - c0, lo - c0, (hi - c0) if hi != math.inf else None


def clamp_delta_from(terms, d: torch.Tensor) -> torch.Tensor:
    r, low, high = terms
    out = d + r
    # In place (clamp_ with tensor bounds is max, then min): one new tensor instead of three, 4x
    # faster on this CPU and bitwise the same. Out of place where a bound broadcasts past ``out``.
    if torch.broadcast_shapes(out.shape, low.shape, () if high is None else high.shape) == out.shape:
        return out.clamp_(low, high)
    out = torch.maximum(out, low)
    return out if high is None else torch.minimum(out, high)


def leaky_relu_delta(x0: torch.Tensor, d: torch.Tensor, slope: float) -> torch.Tensor:
    """``f(x) = slope*x + (1 - slope)*relu(x)``: both terms have the sign of d, no cancellation."""
    return d * slope + relu_delta(x0, d) * (1 - slope)


def hardsigmoid_delta(x0: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``relu6(x + 3) / 6``."""
    return clamp_delta(x0 + 3, d, 0.0, 6.0) / 6


def hardswish_delta(x0: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Product rule on ``x g(x)``, ``g = relu6(x + 3) / 6``: ``d g(x0 + d) + x0 (g(x0 + d) - g(x0))``."""
    dg = hardsigmoid_delta(x0, d)
    return d * (torch.clamp(x0 + 3, 0, 6) / 6 + dg) + x0 * dg


def promoted_terms(fn, x0: torch.Tensor) -> tuple:
    """Base-only terms of :func:`promoted_delta_from`: ``(x0, fn(x0))`` in float64 (once per batch)."""
    x64 = x0.double()
    return x64, fn(x64)


def promoted_delta_from(fn, terms: tuple, d: torch.Tensor) -> torch.Tensor:
    """``fn(x0 + d) - fn(x0)`` for a smooth elementwise ``fn`` (sigmoid, tanh, SiLU, GELU, ELU, Mish,
    softplus, ...), taken in float64: the cancellation costs ~1e-16 of the values, far below a float32
    delta's own rounding. (Measured on this CPU, this is 2-4x faster than closed forms such as
    ``s(1-s) expm1(d) / ((1-s) + s e^d)`` evaluated op by op in float32.)"""
    x64, f0 = terms
    if torch.broadcast_shapes(x64.shape, d.shape) != d.shape:
        return (fn(x64 + d.double()) - f0).to(d.dtype)
    # One float64 buffer, updated in place: 3x faster on this CPU than the expression above, bitwise the same.
    return fn(d.to(torch.float64, copy=True).add_(x64)).sub_(f0).to(d.dtype)


def promoted_delta(fn, x0: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return promoted_delta_from(fn, promoted_terms(fn, x0), d)


def softmax_delta(s0: torch.Tensor, d: torch.Tensor, dim: int) -> torch.Tensor:
    """Change of ``softmax(x0 + d)`` along ``dim`` from the base output ``s0 = softmax(x0)``:
    ``s0_i (expm1(d_i) - S) / (1 + S)`` with ``S = sum_j s0_j expm1(d_j)``."""
    t = torch.expm1(d).mul_(s0)  # s0_i expm1(d_i); in place below: no further tensor of d's size
    big_s = t.sum(dim, keepdim=True)
    return t.addcmul_(s0, big_s, value=-1).div_(big_s.add_(1))


def log_softmax_delta(s0: torch.Tensor, d: torch.Tensor, dim: int) -> torch.Tensor:
    """Change of ``log_softmax(x0 + d)`` from ``s0 = softmax(x0)``: ``d_i - log1p(sum_j s0_j expm1(d_j))``."""
    return d - torch.log1p((s0 * torch.expm1(d)).sum(dim, keepdim=True))


def _needs_fallback(bad: torch.Tensor) -> bool:
    """Whether the fallback branch must run: on a CPU only when some element needs it; on a GPU
    always (``torch.where`` then picks the same values), since asking would be a device sync."""
    return True if bad.is_cuda else bool(bad.any())


def cross_entropy_delta(logits: torch.Tensor, target: torch.Tensor, delta: torch.Tensor,
                        coords: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample change of the cross-entropy loss when the logits change by ``delta``.

    ``logits`` ``(B, N)`` and ``target`` ``(B,)`` are the unperturbed batch. With ``coords``
    ``(K,)`` given, ``delta`` is ``(K, B)``: only logit ``coords[k]`` changes and the result is
    ``log1p(p_i * expm1(delta)) - delta * [i == y]``. Without it ``delta`` is ``(K, B, N)`` and the
    result ``log1p(sum_j p_j expm1(delta_j)) - delta_y``. Returns ``(K, B)`` in float64: no
    forward pass and no difference of two losses.
    """
    logits = logits.double()
    delta = delta.double()
    logp = torch.log_softmax(logits, dim=1)
    if coords is not None:
        p_i = logp.exp().t()[coords]  # (K, B)
        hit = (target[None, :] == coords[:, None]).double()
        out = torch.log1p(p_i * torch.expm1(delta)) - delta * hit
        bad = ~torch.isfinite(out)
        if _needs_fallback(bad):  # p_i rounded to 1 and a large negative delta: fall back to logsumexp
            full = torch.zeros(delta.shape + logits.shape[1:], dtype=delta.dtype, device=delta.device)
            full.scatter_(2, coords[:, None, None].expand(-1, delta.shape[1], 1), delta[..., None])
            out = torch.where(bad, cross_entropy_delta(logits, target, full), out)
        return out
    p = logp.exp()
    s = (p * torch.expm1(delta)).sum(-1)
    d_y = delta.gather(2, target[None, :, None].expand(delta.shape[0], -1, 1)).squeeze(2)
    out = torch.log1p(s) - d_y
    bad = ~torch.isfinite(out)
    if _needs_fallback(bad):
        direct = torch.logsumexp(logits + delta, -1) - torch.logsumexp(logits, -1) - d_y
        out = torch.where(bad, direct, out)
    return out
