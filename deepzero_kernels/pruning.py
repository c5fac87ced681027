"""ZO-GraSP pruning scores, eq. (3), and the layer-wise sparsity of Alg. 1.

``zo_grasp_scores`` scores every conv/linear weight with ``S = -theta * (g(theta + mu g) - g(theta)) / mu``
where ``g`` is the RGE estimate (the same q directions for both estimates, so their difference
is a finite difference of one estimator, not of two independent draws). ``prune_masks`` ranks
globally by ``|S|``; ``layer_densities`` reads off the layer-wise ratios (LPR); ``random_masks``
draws fresh masks obeying them, as DeepZero redraws its sparse coordinate set during training.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from .functional import model_lock
from .estimators import RGE, check_batch
from .ops import check_mu

__all__ = ["prunable_weights", "zo_grasp_scores", "zo_hessian_gradient", "prune_masks",
           "layer_densities", "random_masks"]

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_weights(model: nn.Module) -> list[str]:
    """Names of the trainable conv (1d/2d/3d) and linear weights: the parameters that ZO-GraSP
    scores and masks apply to (the trainer's sparsity, too)."""
    names = []
    for mod_name, m in model.named_modules():
        if isinstance(m, _PRUNABLE) and m.weight.requires_grad:
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


@torch.no_grad()
def zo_hessian_gradient(model, x, y, *, names=None, q=192, mu=5e-3, loss_fn=None, generator=None, on_chunk=None):
    """ZO estimate of the Hessian-gradient product for the parameters ``names``:
    ``Hg ~ (g(theta + mu g) - g(theta)) / mu`` with ``g`` the RGE estimate over q directions.
    Returns ``(hg, g)``, dicts over ``names``. Parameters are restored bitwise."""
    names = prunable_weights(model) if names is None else list(names)
    rge = RGE(model, loss_fn, mu, q, scale="paper")  # eq. (3) with g from eq. (1) as printed
    u = rge.directions(names, generator)
    g0 = rge.estimate(x, y, names=names, directions=u, on_chunk=on_chunk)
    with model_lock(model):  # the parameters are shifted in place: no other estimate may run meanwhile
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in names}
        try:
            for n in names:
                params[n].add_(g0[n], alpha=mu)
            g1 = rge.estimate(x, y, names=names, directions=u, on_chunk=on_chunk)
        finally:
            for n in names:
                params[n].copy_(saved[n])
    hg = {n: (g1[n] - g0[n]) / mu for n in names}
    return hg, {n: g0[n] for n in names}


def zo_grasp_scores(model, x, y, *, q=192, mu=5e-3, loss_fn=None, generator=None, on_chunk=None) -> dict:
    """ZO-GraSP scores, eq. (3), for every conv/linear weight: ``-theta * Hg`` with the
    Hessian-gradient product estimated from q random directions (RGE) at step ``mu``.

    Args:
        model: the network at initialisation. x, y: a batch. q: directions (paper: 192).
        mu: finite-difference step (paper: 5e-3). loss_fn: per-sample loss (default CE).
        generator: ``torch.Generator`` for the directions.
        on_chunk: optional ``on_chunk(k)`` after each chunk of k perturbed queries (2q in all).
    Returns:
        ``{weight name: score tensor}`` shaped like each weight.
    """
    check_mu(mu)
    check_batch(model, x, y, loss_fn)
    names = prunable_weights(model)
    if not names:
        raise ValueError("the model has no trainable conv or linear weights to score")
    hg, _ = zo_hessian_gradient(model, x, y, names=names, q=q, mu=mu, loss_fn=loss_fn, generator=generator,
                                on_chunk=on_chunk)
    params = dict(model.named_parameters())
    return {n: -(params[n].detach() * hg[n]) for n in names}


def _check_fraction(name, v, *, upper_open=False):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if v < 0 or v > 1 or (upper_open and v == 1):
        raise ValueError(f"{name} must be in [0, {'1)' if upper_open else '1]'}, got {v}")
    return float(v)


def prune_masks(scores: dict, sparsity: float) -> dict:
    """Global masks keeping the ``round((1 - sparsity) * total)`` entries of largest ``|score|``
    over all layers together. Returns ``{name: bool tensor}``."""
    sparsity = _check_fraction("sparsity", sparsity, upper_open=True)
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty dict of name -> tensor")
    flat = torch.cat([s.detach().reshape(-1).abs().double().cpu() for s in scores.values()])
    if not torch.isfinite(flat).all():
        raise ValueError("scores contain non-finite values")
    keep = int(round((1.0 - sparsity) * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep:
        chosen[torch.topk(flat, keep, sorted=False).indices] = True
    masks, off = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[off:off + s.numel()].reshape(s.shape).to(s.device)
        off += s.numel()
    return masks


def layer_densities(masks: dict) -> dict:
    """Fraction of entries kept in each mask: the paper's layer-wise pruning ratios (as densities)."""
    return {name: float(m.sum()) / m.numel() for name, m in masks.items()}


def random_masks(model: nn.Module, densities: dict, generator=None) -> dict:
    """Fresh uniformly random masks with exactly ``round(density * numel)`` entries per layer."""
    params = dict(model.named_parameters())
    masks = {}
    for name, dens in densities.items():
        if name not in params:
            raise ValueError(f"densities names an unknown parameter {name!r}")
        dens = _check_fraction(f"densities[{name!r}]", dens)
        p = params[name]
        n = int(round(dens * p.numel()))
        perm = torch.randperm(p.numel(), generator=generator, device=generator.device if generator else "cpu")
        m = torch.zeros(p.numel(), dtype=torch.bool, device=perm.device)
        m[perm[:n]] = True
        masks[name] = m.reshape(p.shape).to(p.device)
    return masks
