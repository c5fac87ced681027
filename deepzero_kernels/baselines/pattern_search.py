"""Pattern search, the gradient-free baseline of the DeepZero paper's Fig. 5 (Sec. 5).

The optimizer of Chiang, Ni, Miller, Bansal, Geiping, Goldblum and Goldstein, "Loss landscapes
are all you need: neural network generalization can be explained without the implicit bias of
gradient descent" (ICLR 2023), as their released code runs it: a compass (coordinate) search
over every parameter of the whole model, with a shrinking radius. Written here from that
description; the algorithm, for parameters ``theta`` in R^P, batch loss ``L`` and radius ``r``:

    pattern  D = {+e_i, -e_i : i = 1..P}            (2P moves: every coordinate, both signs)
    one step on a batch (x, y):
        pi <- a uniformly random order of D           (drawn afresh every step)
        for each chunk C of K consecutive moves of pi:
            evaluate L(theta) and L(theta + r d) for every d in C      (one batched call)
            d* <- argmin_{d in C} L(theta + r d)
            if L(theta + r d*) < L(theta):            (strictly better: never a worse loss)
                theta <- theta + r d*;  r <- expand * r;  the step ends
        no chunk improved (all 2P moves tried):  r <- shrink * r, theta unchanged

Published settings: ``r0 = 1``, ``shrink = 1/2``, ``expand = 1`` (the radius never grows), the
loss the mean cross-entropy of the *whole* training set (2 to 1000 samples there). Their
``PatternSearch`` optimizer accepts the first improving move (``K = 1``); ``PatternSearchFast``
evaluates ``M`` models at once, the current one and ``M - 1`` moves (``K = M - 1``, ``M`` sized
from GPU memory: 50000 // n models for n CIFAR-10 samples) and takes the best of the chunk. The
authors' LeNet divides its logits by the product of its layers' weight norms (over 3), a choice
of model, not of the optimizer: here the model is whatever the caller trains (with the same
model and data as DeepZero in ``python/experiments/fig5_pattern_search.py``).

Engineering choices (not in the paper): candidate models are evaluated with
``torch.func.functional_call`` under ``vmap`` on copies of the buffers (a loop where vmap cannot
batch an op), so the model's parameters are written only when a move is accepted, with the
exact value that was evaluated, and its buffers are never touched by the search; the current
model is evaluated in every chunk together with its candidates (as ``PatternSearchFast`` does),
so the comparison is between numbers of one computation. After a failed sweep the released
code halves the radius and keeps searching in the same call; here the step returns and the next
call goes on (on a fixed batch the same process, with a bounded step). A model in training mode with
BatchNorm running statistics gets one plain forward per step (before the search, like
DeepZero's trainer) to keep those statistics current for evaluation.

    opt = PatternSearch(model)              # step_size=1.0, shrink=0.5, expand=1.0, candidates=32
    for x, y in batches:
        stats = opt.step(x, y)              # {'loss_before', 'loss', 'accepted', 'queries', ...}
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..estimators import check_batch
from ..functional import forbid_randomness, model_lock, preserved_buffers, vmap_or_loop
from ..precision import full_fp32

__all__ = ["PatternSearch", "PUBLISHED"]

# Chiang et al. (2023), released code: initial radius, shrink on a failed sweep, growth on success.
PUBLISHED = {"step_size": 1.0, "shrink": 0.5, "expand": 1.0}


def _positive(name: str, value, *, below_one: bool = False, at_least_one: bool = False) -> float:
    """``value`` as a float, or a ValueError naming ``name`` and the allowed range."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v <= 0 or (below_one and v >= 1) or (at_least_one and v < 1):
        rng = "in (0, 1)" if below_one else (">= 1" if at_least_one else "> 0")
        raise ValueError(f"{name} must be finite and {rng}, got {value!r}")
    return v


class PatternSearch:
    """Chiang et al.'s (2023) pattern search over all trainable parameters of ``model``.

    Arguments (published defaults in brackets):

    * ``loss_fn(output, y) -> scalar``: the batch loss [mean cross-entropy];
    * ``step_size``: the initial radius ``r`` [1.0];
    * ``shrink``: factor on ``r`` after a step tried all 2P moves without improving [0.5];
    * ``expand``: factor on ``r`` after an accepted move [1.0, no growth];
    * ``candidates``: moves evaluated per batched call, ``K`` [1 in ``PatternSearch``, M - 1 in
      ``PatternSearchFast``; 32 here, a CPU-friendly size]; the best of a chunk is taken;
    * ``generator``: the ``torch.Generator`` of the move orders (None: a fresh one, seed 0);
    * ``update_buffers``: one plain forward per step in training mode to update BatchNorm
      running statistics [no BatchNorm in the paper's models].

    Counters: ``num_queries`` (loss evaluations of a parameter vector on a batch, the current
    one included), ``num_forwards`` (those plus the running-statistics forwards), ``num_steps``,
    ``num_accepted``, ``num_shrinks``. ``step_size`` is the current radius.
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable] = None, *, step_size: float = 1.0,
                 shrink: float = 0.5, expand: float = 1.0, candidates: int = 32,
                 generator: Optional[torch.Generator] = None, update_buffers: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.model, self.loss_fn = model, loss_fn
        self.step_size = _positive("step_size", step_size)
        self.shrink = _positive("shrink", shrink, below_one=True)
        self.expand = _positive("expand", expand, at_least_one=True)
        self.candidates, self.update_buffers = candidates, bool(update_buffers)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable parameters to search")
        sizes = [dict(model.named_parameters())[n].numel() for n in self.names]
        self.offsets = np.cumsum([0] + sizes)  # move m: coordinate m // 2 of the concatenation, sign by m % 2
        self.dim = int(self.offsets[-1])
        self.num_queries = self.num_forwards = self.num_steps = self.num_accepted = self.num_shrinks = 0

    def __repr__(self):
        return (f"PatternSearch(dim={self.dim}, step_size={self.step_size:g}, shrink={self.shrink:g}, "
                f"expand={self.expand:g}, candidates={self.candidates})")

    # ------------------------------------------------------------------------- one step
    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One step of the search on the batch ``(x, y)``: accept the first chunk's best move that
        lowers the loss, or shrink the radius after all 2P moves failed. Returns the step's
        statistics: ``loss_before``, ``loss`` (after; never above ``loss_before``), ``accepted``,
        ``parameter``/``index``/``direction`` of the move (None/None/0 if none), ``step_size``
        (the radius used), ``next_step_size``, ``shrunk``, ``candidates`` (moves tried),
        ``queries`` and ``forwards`` (this step's counts)."""
        check_batch(self.model, x, y, self.loss_fn)
        with model_lock(self.model):
            forwards = self._update_running_stats(x)
            radius, order = self.step_size, torch.randperm(2 * self.dim, generator=self.generator)
            st = {"loss_before": None, "accepted": False, "parameter": None, "index": None, "direction": 0,
                  "step_size": radius, "candidates": 0, "queries": 0}
            for lo in range(0, 2 * self.dim, self.candidates):
                if self._try_chunk(x, y, order[lo:lo + self.candidates], radius, st):
                    break
        self._finish(st, forwards)
        return st

    def _try_chunk(self, x, y, moves: torch.Tensor, radius: float, st: dict) -> bool:
        """Evaluate the current model and ``moves``; apply the best if it improves. Updates ``st``."""
        pert, values = self._candidates(moves, radius)
        losses = self._losses(x, y, pert)
        base = float(losses[0])
        if not math.isfinite(base):
            raise ValueError(f"the loss of the current model is {base}: pattern search needs a finite loss")
        st["loss_before"] = base if st["loss_before"] is None else st["loss_before"]
        st["candidates"] += moves.numel()
        st["queries"] += moves.numel() + 1
        cand = torch.nan_to_num(losses[1:].double(), nan=math.inf)
        best = int(torch.argmin(cand))
        if not float(cand[best]) < base:
            st["loss"] = st["loss_before"]
            return False
        name, index, direction, value = values[best]
        p = dict(self.model.named_parameters())[name]
        p[np.unravel_index(index, p.shape) if p.dim() else ()] = value
        st.update(loss=float(cand[best]), accepted=True, parameter=name, index=index, direction=direction)
        return True

    def _finish(self, st: dict, forwards: int) -> None:
        if st["accepted"]:
            self.step_size *= self.expand
            self.num_accepted += 1
        else:
            self.step_size *= self.shrink
            self.num_shrinks += 1
        st["shrunk"] = not st["accepted"]
        st["next_step_size"] = self.step_size
        st["forwards"] = st["queries"] + forwards
        self.num_steps += 1
        self.num_queries += st["queries"]
        self.num_forwards += st["forwards"]

    # ------------------------------------------------------------------------- evaluation
    def _update_running_stats(self, x) -> int:
        """DeepZero's trainer convention: one plain training-mode forward at the step's start
        updates BatchNorm running statistics. Returns the forwards spent (0 or 1)."""
        if not (self.update_buffers and self.model.training and any(True for _ in self.model.buffers())):
            return 0
        with forbid_randomness(x.device):
            self.model(x)
        return 1

    def _candidates(self, moves: torch.Tensor, radius: float) -> tuple:
        """Stacked parameters ``{name: (K + 1, *shape)}`` of the parameters the chunk moves (row 0
        the current values, row k + 1 move k), and per move ``(name, flat index, +-1, value)``."""
        params = dict(self.model.named_parameters())
        coord, sign = (moves // 2).numpy(), 1 - 2 * (moves % 2).numpy()
        which = np.searchsorted(self.offsets, coord, side="right") - 1
        k1, pert, values = moves.numel() + 1, {}, [None] * moves.numel()
        for j in np.unique(which):
            name = self.names[j]
            p = params[name].detach()
            rows = np.nonzero(which == j)[0]
            local = torch.from_numpy(coord[rows] - self.offsets[j]).to(p.device)
            flat = p.reshape(1, -1).repeat(k1, 1)
            new = flat[0, local] + torch.from_numpy(sign[rows]).to(p) * radius
            flat[torch.from_numpy(rows + 1).to(p.device), local] = new
            pert[name] = flat.reshape((k1,) + tuple(p.shape))
            for r, i, s, v in zip(rows, local.tolist(), sign[rows], new):
                values[r] = (name, int(i), int(s), v.clone())
        return pert, values

    def _losses(self, x, y, pert: dict) -> torch.Tensor:
        """Loss ``(K + 1,)`` of the model with each row of ``pert`` in place of those parameters,
        each on its own copy of the buffers; the model itself is left as it was."""
        model, loss_fn = self.model, self.loss_fn or F.cross_entropy
        k1 = next(iter(pert.values())).shape[0]
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in pert}
        bufs = {n: b.detach().unsqueeze(0).repeat((k1,) + (1,) * b.dim()) for n, b in model.named_buffers()}

        def run(pp, bb):  # x.clone(): a forward that writes into its input sees the same x each time
            return loss_fn(torch.func.functional_call(model, ({**fixed, **pp}, bb), (x.clone(),)), y)

        with preserved_buffers(model), forbid_randomness(x.device), full_fp32():
            losses = vmap_or_loop(run, (pert, bufs), (0, 0), 0, k1)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (k1,):
            shape = tuple(losses.shape[1:]) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return a scalar (the batch's mean loss), got {shape}")
        return losses
