"""Evaluating a model (or one node) for K perturbations at once, and the guards around every
estimate. One home for: the batched evaluation that tries ``torch.func.vmap`` and falls back to
a loop, the buffer snapshot/restore, the refusal of random draws and the per-model lock."""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

__all__ = ["forbid_randomness", "has_hooks", "model_lock", "preserved_buffers", "vmap_or_loop"]


def vmap_or_loop(fn, args: tuple, in_dims: tuple, out_dims, k: int):
    """``torch.func.vmap(fn, in_dims, out_dims)(*args)`` over K perturbations; where vmap cannot
    batch an op (data-dependent control flow, in-place writes into unbatched tensors, ...), the
    same result from K calls, stacked. ``in_dims`` holds one entry per argument: an int or None
    for every tensor in it, or a tuple matching a tuple argument. ``fn`` returns a tensor or a
    tuple of tensors (``out_dims`` alike). Random draws are an error either way."""
    try:
        return torch.func.vmap(fn, in_dims=in_dims, out_dims=out_dims, randomness="error")(*args)
    except Exception:
        pass
    per_k = [fn(*(_select(a, d, i) for a, d in zip(args, in_dims))) for i in range(k)]
    if isinstance(per_k[0], tuple):
        dims = out_dims if isinstance(out_dims, tuple) else (out_dims,) * len(per_k[0])
        return tuple(torch.stack([o[j] for o in per_k], d) for j, d in enumerate(dims))
    return torch.stack(per_k, out_dims)


def _select(value, dims, i):
    if dims is None:
        return value
    if isinstance(dims, (tuple, list)):
        return type(value)(_select(v, d, i) for v, d in zip(value, dims))
    return pytree.tree_map(lambda t: t.select(dims, i) if isinstance(t, torch.Tensor) else t, value)


# ----------------------------------------------------------------------------- guards
_locks: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """One re-entrant lock per model: estimates of one model (by any estimator, from any thread)
    run one at a time, because each snapshots and restores the model's buffers."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Restore the model as it was on exit: every buffer's values (a train-mode forward updates
    BatchNorm running statistics) and every module's attributes, parameters, buffers and
    submodules by identity (a forward that assigns ``self.avg = ...`` or caches ``self.feat = h``,
    a reparametrisation hook that sets ``module.weight``, tracing, which runs the forward on
    proxies). An estimate must leave no trace in the model."""
    mods = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for m, attrs, params, bufs, subs in mods:
            for store, old in ((m._parameters, params), (m._buffers, bufs), (m._modules, subs)):
                if store.keys() != old.keys() or any(store[k] is not v for k, v in old.items()):
                    store.clear()
                    store.update(old)
            for k in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[k]
            for k, v in attrs.items():
                if m.__dict__.get(k, _MISSING) is not v:
                    m.__dict__[k] = v
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


_MISSING = object()


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its own forward hooks, which a delta rule computing from
    the module's weights would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _rng_states(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def forbid_randomness(device: torch.device, what: str = "the model's forward"):
    """Raise ``ValueError`` when the body draws from torch's default random generators (dropout,
    stochastic depth, ``torch.rand``, ...): base and perturbed evaluations would see different
    random numbers and the finite differences would be noise. The generator state is put back."""
    before = _rng_states(device)
    yield
    after = _rng_states(device)
    if not torch.equal(before[0], after[0]) or (before[1] is not None and not torch.equal(before[1], after[1])):
        torch.set_rng_state(before[0])
        if before[1] is not None:
            torch.cuda.set_rng_state(before[1], device)
        raise ValueError(f"{what} draws random numbers (dropout, stochastic depth, torch.rand, ...): "
                         "zeroth-order estimates need a deterministic forward. Put the random layers "
                         "in eval mode (model.eval() or module.eval()) or remove the randomness.")
