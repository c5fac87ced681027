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
import warnings

import torch
import torch.nn.functional as F

__all__ = ["conv2d_perturbed", "linear_perturbed", "conv2d_weight_delta", "linear_weight_delta",
           "batch_norm_delta", "cross_entropy_delta", "backends", "resolve_backend"]

_BACKENDS = ("auto", "torch", "triton", "native")


# ----------------------------------------------------------------------------- backends
def backends(device: torch.device | str | None = None) -> dict:
    """Report which backends are available on ``device`` (default CPU): ``{name: (available, reason)}``."""
    from . import kernels
    return {"torch": (True, "always available; defines the semantics"), **kernels.available(device)}


_warned: set = set()


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """Map a user's ``backend`` choice to an available backend for ``device``.

    ``auto`` picks ``native`` when it is built for the device, else ``triton`` on a GPU, else
    ``torch``; it never fails, and says once (a warning) which optional backend it could not
    use. Naming an unavailable backend is a ``ValueError`` with the reason."""
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    device = torch.device(device or "cpu")
    avail = backends(device)
    if backend == "auto":
        if avail["native"][0]:
            return "native"
        if device.type == "cuda" and avail["triton"][0]:
            return "triton"
        key = (device.type, avail["native"][1])
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"deepzero_kernels: backend='auto' uses the torch backend on {device.type}: "
                          f"native: {avail['native'][1]}", stacklevel=3)
        return "torch"
    ok, why = avail[backend]
    if not ok:
        raise ValueError(f"backend={backend!r} is not available on {device.type}: {why}")
    return backend


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


def _pair(v, name: str) -> tuple[int, int]:
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
    ph, pw = _pair(padding, "padding")
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
    h_out = (hp - dh * (kh - 1) - 1) // sh + 1
    w_out = (wp - dw * (kw - 1) - 1) // sw + 1
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
        if bad.any():  # p_i rounded to 1 and a large negative delta: fall back to logsumexp
            full = torch.zeros(delta.shape + logits.shape[1:], dtype=delta.dtype, device=delta.device)
            full.scatter_(2, coords[:, None, None].expand(-1, delta.shape[1], 1), delta[..., None])
            out = torch.where(bad, cross_entropy_delta(logits, target, full), out)
        return out
    p = logp.exp()
    s = (p * torch.expm1(delta)).sum(-1)
    d_y = delta.gather(2, target[None, :, None].expand(delta.shape[0], -1, 1)).squeeze(2)
    out = torch.log1p(s) - d_y
    bad = ~torch.isfinite(out)
    if bad.any():
        direct = torch.logsumexp(logits + delta, -1) - torch.logsumexp(logits, -1) - d_y
        out = torch.where(bad, direct, out)
    return out


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
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
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
        from . import kernels  # the gather kernel: the chain with nothing after the conv
        ch, src, u, v = conv_weight_coords(weight.shape, idx, groups)
        vals = kernels.get(backend).conv_delta_chain(
            x, src, u * dilation[0] - pad[2], v * dilation[1] - pad[0], ch, mu, stride[0], stride[1],
            base.shape[2], base.shape[3], weight.shape[0])
        out[torch.arange(k, device=x.device), :, ch] += vals.transpose(0, 1)
    elif param == "weight":
        ch, vals = conv2d_weight_delta(x, weight.shape, idx, mu, stride=stride, pad=pad,
                                       dilation=dilation, groups=groups)
        out[torch.arange(k, device=x.device), :, ch] += vals.transpose(0, 1)
    else:
        out[torch.arange(k, device=x.device), :, idx] += mu
    return out


def linear_perturbed(x, weight, bias, idx, mu, *, param="weight", backend="auto"):
    """Outputs of ``F.linear`` under K single-coordinate perturbations, in one batched call.

    Args:
        x: input ``(B, N_in)``. weight: ``(N_out, N_in)``. bias: ``(N_out,)`` or None.
        idx: 1-D integer tensor of K flat indices into ``weight`` (or ``bias``).
        mu: perturbation size, finite and > 0.
    Returns:
        ``(K, B, N_out)`` where ``out[k] == F.linear(x, weight + mu*e_idx[k], bias)``: one matmul plus
        a rank-1 update per k.
    """
    param = _check_param(param)
    x = check_tensor("x", x, ndim=2)
    weight = check_tensor("weight", weight, ndim=2)
    check_same("x", x, "weight", weight)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but weight expects {weight.shape[1]}")
    _check_bias(x, weight, bias, param)
    mu = check_mu(mu)
    resolve_backend(backend, x.device)
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
