"""Zeroth-order gradient estimators: coordinate-wise (CGE) and randomized (RGE), eq. (1).

Both return a dict ``{name: tensor}`` over the model's trainable parameters that can be used
directly as ``.grad`` (see :meth:`CGE.backward`), so any ``torch.optim`` optimizer can step on it.
Estimation never changes parameters or buffers (BatchNorm running statistics included).
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.nn as nn

from .engine import DeltaEngine, check_losses, check_no_dropout, per_sample_cross_entropy, query_loss, repeat_targets
from .functional import forbid_randomness, model_lock, preserved_buffers, vmap_or_loop
from .precision import full_fp32
from .ops import check_count, check_mu, resolve_backend

__all__ = ["CGE", "RGE", "assign_grads", "check_batch", "check_masks"]


def check_batch(model: nn.Module, x, y, loss_fn=None) -> None:
    """``x``/``y`` must be tensors with one batch size, on the model's device and dtype. With the
    default loss (``loss_fn=None``, cross-entropy), ``y`` must be int64 class indices ``(B,)``;
    a user's loss decides what its targets are."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError("x and y need a batch dimension")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has batch size {x.shape[0]} but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("the batch is empty")
    p = next(model.parameters(), None)
    if p is not None:
        if x.device != p.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {p.device}")
        if y.device != p.device:
            raise ValueError(f"y is on {y.device} but the model's parameters are on {p.device}")
        if x.is_floating_point() and x.dtype != p.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters have dtype {p.dtype}")
        if (not x.is_floating_point() and not x.is_complex() and p.is_floating_point()
                and not any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())):
            raise TypeError(f"x has integer dtype {x.dtype} but the model's parameters are {p.dtype}: "
                            f"convert the inputs, e.g. x.to({p.dtype})")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values (nan or inf)")
    if loss_fn is None:
        if y.dtype != torch.int64:
            raise TypeError(f"y must hold int64 class indices for the default cross-entropy loss, got dtype "
                            f"{y.dtype}" + (" (convert with y.long())" if not y.is_floating_point() else
                                            "; pass a loss_fn for soft or real-valued targets"))
        if y.dim() != 1:
            raise ValueError(f"y must be 1-D class indices (B,) for the default cross-entropy loss, got shape "
                             f"{tuple(y.shape)}" + (" (use y.squeeze(1))" if y.dim() == 2 and y.shape[1] == 1 else ""))
        if int(y.min()) < 0:
            raise ValueError(f"y holds a negative class index ({int(y.min())}); class indices start at 0")


# The input rank a model's first layer takes, when that layer fixes it.
_INPUT_RANKS = ((nn.Conv1d, (3,)), (nn.Conv2d, (4,)), (nn.Conv3d, (5,)), (nn.ConvTranspose1d, (3,)),
                (nn.ConvTranspose2d, (4,)), (nn.ConvTranspose3d, (5,)), (nn.BatchNorm1d, (2, 3)),
                (nn.BatchNorm2d, (4,)), (nn.BatchNorm3d, (5,)))


def _explain(model: nn.Module, x, y, loss_fn, err: Exception) -> Exception | None:
    """A ``ValueError`` naming the argument behind an error the model's forward or the default
    loss raised, or None: ``x`` whose rank does not fit the model's first layer (a 3-D batch
    for a Conv2d model), or ``y`` with a class index past the model's outputs."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if loss_fn is None and isinstance(err, IndexError) and "out of bounds" in first:
        return ValueError(f"y holds class index {int(y.max())}, past the model's outputs ({first})")
    if not isinstance(err, (RuntimeError, ValueError)):
        return None
    for name, m in model.named_modules():
        if next(m.children(), None) is not None or next(m.parameters(recurse=False), None) is None:
            continue
        ranks = next((r for t, r in _INPUT_RANKS if isinstance(m, t)), None)
        if ranks is None or x.dim() in ranks:
            return None
        return ValueError(f"x has shape {tuple(x.shape)} ({x.dim()}-D) but the model's first layer {name!r} "
                          f"({type(m).__name__}) takes {' or '.join(map(str, ranks))}-D input with the batch "
                          f"first; the forward failed with: {first}")
    return None


@contextlib.contextmanager
def explained_errors(model: nn.Module, x, y, loss_fn):
    """Re-raise a forward's or the default loss's error as a ``ValueError`` naming ``x`` or ``y``
    where one of them is the cause (see :func:`_explain`); other errors pass unchanged."""
    try:
        yield
    except (RuntimeError, IndexError, ValueError) as e:
        why = _explain(model, x, y, loss_fn, e)
        if why is None:
            raise
        raise why from e


def check_masks(params: dict, masks) -> dict:
    """Validate ``masks`` (name -> bool tensor shaped like the parameter)."""
    if masks is None:
        return {}
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict of parameter name -> bool tensor, got {type(masks).__name__}")
    for name, m in masks.items():
        if name not in params:
            raise ValueError(f"masks names an unknown or frozen parameter {name!r}; trainable parameters "
                             f"are: {', '.join(params) or 'none'}")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor, got "
                            f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        if m.shape != params[name].shape:
            raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)} but the parameter has shape "
                             f"{tuple(params[name].shape)}")
        if m.device != params[name].device:
            raise ValueError(f"masks[{name!r}] is on {m.device} but the parameter is on {params[name].device}")
    return masks


def assign_grads(model: nn.Module, grads: dict) -> None:
    """Write ``grads`` into ``p.grad`` so that a ``torch.optim`` optimizer can step on them."""
    params = dict(model.named_parameters())
    for name, g in grads.items():
        p = params[name]
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.copy_(g)


def _holding_model_lock(method):
    """Run an estimator method under its model's lock: while an estimate runs, the model's
    parameters are swapped by functional calls and its buffers are snapshotted, so another
    estimate of the same model (any estimator, any thread) must wait."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with model_lock(self.model):
            return method(self, *args, **kwargs)
    return locked


class _Estimator:
    def __init__(self, model, loss_fn, mu):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.mu = check_mu(mu)
        self.last_loss = float("nan")
        self.last_output = None
        self.num_perturbations = 0
        self.last_seconds = 0.0
        # Loss queries (batched calls of loss_fn) and the samples they carried: running totals
        # and the last estimate's share (one failed midway still counts what it asked).
        self.num_queries = 0
        self.num_queried_samples = 0
        self.last_num_queries = 0
        self.last_num_queried_samples = 0

    def _count_queries(self, calls: int, samples: int) -> None:
        self.last_num_queries, self.last_num_queried_samples = calls, samples
        self.num_queries += calls
        self.num_queried_samples += samples

    def trainable(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @_holding_model_lock
    def backward(self, *args, **kwargs) -> dict:
        """Like :meth:`estimate`, and also write the estimate into each parameter's ``.grad``."""
        grads = self.estimate(*args, **kwargs)
        assign_grads(self.model, grads)
        return grads


class CGE(_Estimator):
    """Coordinate-wise gradient estimate: ``g_i = mean_b(l_b(theta + mu e_i) - l_b(theta)) / mu``.

    Args:
        model: the network; estimates follow its mode (train: BatchNorm with the statistics of
            each perturbed batch; eval: running statistics).
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-sample losses for a batch of any size N
            (the engine passes the targets repeated to match a chunk of perturbations). It may be
            a black box: it gets detached outputs under ``no_grad``, may return a NumPy array
            (converted), must return finite values, and is called once for the unperturbed batch
            and once per chunk. Default: per-sample cross-entropy, in closed form at the logits.
        mu: finite-difference step, > 0.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` for the fused ops.
        memory_budget: bytes one chunk of perturbations may use (default: 1 GiB on CPU, an eighth
            of the GPU's total memory). ``chunk_size`` fixes the chunk length instead.
        output_fn, strategy: see :class:`~deepzero_kernels.engine.DeltaEngine`.
        delta_precision: ``"fp32"`` (default), ``"tf32"`` or ``"bf16"``: precision of the conv and
            linear maps applied to the perturbations' deltas of a float32 model; the values (base
            pass, nonlinear layers) always run in full float32, TF32 flags or not. See the README's
            error model.
        base_precision: ``"fp64"`` (default) or ``"model"``: the base pass the deltas are taken
            around, in float64 rounded once to the model's dtype, or in the model's dtype (see
            :class:`~deepzero_kernels.engine.DeltaEngine`).

    After :meth:`estimate`, ``last_loss`` (mean unperturbed loss), ``last_output`` (unperturbed
    outputs) and ``num_perturbations`` (running total) describe the work done. Loss queries:
    ``last_num_queries`` calls of ``loss_fn`` (1 + number of chunks) carrying
    ``last_num_queried_samples`` samples (B * (1 + active coordinates)) in the last estimate;
    ``num_queries`` / ``num_queried_samples`` are running totals. (With the default loss the
    perturbed losses are closed-form, so only the base call is a query.) ``last_report`` says which
    graph nodes, if any, ran on the slow per-node fallback.
    """

    def __init__(self, model, loss_fn=None, mu=5e-3, *, backend="auto", memory_budget=None, chunk_size=None,
                 output_fn=None, strategy="delta", delta_precision="fp32", base_precision="fp64"):
        super().__init__(model, loss_fn, mu)
        p = next(model.parameters(), None)
        resolve_backend(backend, p.device if p is not None else None)  # fail early on an unknown name
        self.backend = backend
        self.engine = DeltaEngine(model, loss_fn, memory_budget=memory_budget, chunk_size=chunk_size,
                                  backend=backend, output_fn=output_fn, strategy=strategy,
                                  delta_precision=delta_precision, base_precision=base_precision)

    @property
    def last_report(self):
        """How the last :meth:`estimate` ran (:class:`~deepzero_kernels.engine.EngineReport`): the
        delta path or whole-model forwards, and which graph nodes fell back to the exact per-node
        evaluation and how many perturbations each cost. ``print(cge.last_report)`` explains a slow
        model."""
        return self.engine.last_report

    @_holding_model_lock
    def estimate(self, x, y, masks=None, *, on_chunk=None, partial=None) -> dict:
        """Estimate the gradient of the mean loss on batch ``(x, y)``.

        Args:
            x: input batch ``(B, ...)``; y: targets ``(B, ...)``.
            masks: optional ``{name: bool tensor}``; coordinates outside a mask get 0. A
                parameter without a mask is estimated densely; an all-False mask estimates nothing.
            on_chunk: optional callback ``on_chunk(param_name, k)`` after each chunk (progress).
            partial: optional :class:`~deepzero_kernels.engine.PartialRun` that records the
                chunks as they finish; an estimate interrupted (an exception from ``on_chunk``,
                Ctrl-C) continues from it when called again with the same batch, masks and
                model, bitwise equal to an uninterrupted estimate. Save it with ``state_dict()``.
        Returns:
            ``{name: tensor}`` for every parameter with ``requires_grad``, shaped like it.
        """
        params = self.trainable()
        check_batch(self.model, x, y, self.loss_fn)
        masks = check_masks(params, masks)
        check_mu(self.mu, params)  # every trainable parameter: the same verdict on every rank
        coords = {}
        for name, p in params.items():
            m = masks.get(name)
            coords[name] = (torch.arange(p.numel(), device=p.device) if m is None
                            else m.reshape(-1).nonzero().squeeze(1).to(p.device))
        t0 = time.perf_counter()
        calls0, samples0 = self.engine.num_loss_calls, self.engine.num_loss_samples
        try:
            with explained_errors(self.model, x, y, self.loss_fn):
                out, base_loss, diffs = self.engine.run(x, y, coords, self.mu, on_chunk=on_chunk,
                                                        partial=partial)
        finally:
            self._count_queries(self.engine.num_loss_calls - calls0, self.engine.num_loss_samples - samples0)
        self.last_seconds = time.perf_counter() - t0
        self.last_output = out.detach()
        self.last_loss = float(base_loss.mean())
        grads = {}
        for name, p in params.items():
            g = torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
            if coords[name].numel():
                g[coords[name]] = diffs[name].mean(1) / self.mu
            grads[name] = g.to(p.dtype).reshape(p.shape)
            self.num_perturbations += coords[name].numel()
        return grads


class RGE(_Estimator):
    """Randomized gradient estimate, eq. (1):
    ``g = (1/q) sum_i (l(theta + mu u_i) - l(theta)) / mu * u_i`` with unit-norm Gaussian
    directions ``u_i`` over all trainable parameters. The q perturbed models are evaluated in
    batches (``torch.func.vmap``), not one by one. ``loss_fn`` follows the same black-box
    contract as :class:`CGE`'s, and queries are counted the same way (1 + number of chunks of
    directions calls, B * (1 + q) samples per estimate).

    ``scale``: unit-norm directions give ``E[u u^T] = I / d``, so eq. (1) as printed has
    expectation ``~ grad / d`` (d: the number of perturbed coordinates, all trainable
    parameters or those of ``names``). ``"unbiased"`` (default) multiplies eq. (1) by d, so
    ``E[g] ~ grad`` and one learning rate serves RGE, CGE and backprop alike; ``"paper"`` is
    eq. (1) as printed (exactly the unbiased estimate divided by d).
    """

    SCALES = ("unbiased", "paper")

    def __init__(self, model, loss_fn=None, mu=5e-3, q=1, *, chunk_size=None, output_fn=None,
                 scale="unbiased"):
        super().__init__(model, loss_fn, mu)
        self.q = check_count("q", q)
        if scale not in self.SCALES:
            raise ValueError(f"scale must be one of {', '.join(map(repr, self.SCALES))}, got {scale!r}")
        self.scale = scale
        self.chunk_size = None if chunk_size is None else check_count("chunk_size", chunk_size)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        self.output_fn = output_fn

    def directions(self, names, generator=None) -> torch.Tensor:
        """``(q, d)`` unit-norm Gaussian directions over the parameters ``names`` (concatenated)."""
        params = dict(self.model.named_parameters())
        d = sum(params[n].numel() for n in names)
        p0 = params[names[0]]
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.randn(self.q, d, generator=generator, dtype=torch.float64, device=gen_device)
        u = u / u.norm(dim=1, keepdim=True)
        return u.to(device=p0.device, dtype=p0.dtype)

    @_holding_model_lock
    def estimate(self, x, y, generator=None, *, names=None, directions=None, on_chunk=None) -> dict:
        """Estimate the gradient on ``(x, y)``; returns ``{name: tensor}`` for every trainable
        parameter. ``generator`` seeds the directions; ``names`` restricts the perturbed
        parameters (others get 0); ``directions`` supplies the ``(q, d)`` directions directly;
        ``on_chunk(k)`` is called after each chunk of k directions (progress)."""
        params = self.trainable()
        check_batch(self.model, x, y, self.loss_fn)
        names = list(params) if names is None else list(names)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"unknown or frozen parameters: {unknown}")
        check_mu(self.mu, {n: params[n] for n in names})
        if not names:
            return {n: torch.zeros_like(p) for n, p in params.items()}
        u = self.directions(names, generator) if directions is None else directions
        t0 = time.perf_counter()
        calls = [0, 0]

        def tail(outputs, targets):  # counts every query batched_losses makes
            calls[0] += 1
            calls[1] += outputs.shape[0]
            return query_loss(self.loss_fn, outputs, targets)

        try:
            with explained_errors(self.model, x, y, self.loss_fn):
                diffs, out, base_loss = batched_losses(self.model, tail, x, y, names, self.mu * u,
                                                       chunk_size=self.chunk_size, output_fn=self.output_fn,
                                                       on_chunk=on_chunk)
        finally:
            self._count_queries(*calls)
        self.last_seconds = time.perf_counter() - t0
        self.last_output, self.last_loss = out.detach(), float(base_loss.mean())
        self.num_perturbations += u.shape[0]
        coef = diffs.mean(1) / self.mu  # (q,)
        flat = (coef.to(u.dtype)[:, None] * u).sum(0) / u.shape[0]
        if self.scale == "unbiased":
            flat = flat * u.shape[1]  # E[u u^T] = I / d for unit directions over d coordinates
        grads, off = {}, 0
        for n, p in params.items():
            if n in names:
                grads[n] = flat[off:off + p.numel()].reshape(p.shape).clone()
                off += p.numel()
            else:
                grads[n] = torch.zeros_like(p)
        return grads


@torch.no_grad()
def batched_losses(model, loss_fn, x, y, names, steps, *, chunk_size=None, output_fn=None, on_chunk=None):
    """Per-sample loss changes ``(Q, B)`` (float64) of the model with the parameters ``names``
    shifted by each row of ``steps`` ``(Q, d)`` (concatenated in ``names`` order), evaluated as
    vmapped batches of functional calls. Returns ``(diffs, base_output, base_losses)``. Buffers
    are restored; in train mode each shifted model uses the statistics of its own batch; the
    model's own parameters are never written; a forward that draws random numbers is refused."""
    loss_fn = loss_fn or per_sample_cross_entropy
    select = output_fn or (lambda out: out)
    check_no_dropout(model)
    # Values differenced in float32: never in TF32 (precision.py), whatever torch's flags say.
    with model_lock(model), preserved_buffers(model), forbid_randomness(x.device), full_fp32():
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        base_out = select(model(x.clone()))  # clones: a forward that writes into its input sees the same x
        if not isinstance(base_out, torch.Tensor):
            raise TypeError(f"the model's output is a {type(base_out).__name__}, not a tensor: pass output_fn= "
                            "to select the tensor the loss takes, e.g. output_fn=lambda out: out[0]")
        base = check_losses(loss_fn(base_out, y), x.shape[0]).double()
        q = steps.shape[0]
        kmax = chunk_size or max(1, min(q, 32))
        sizes = [params[n].numel() for n in names]
        diffs = []
        for lo in range(0, q, kmax):
            st = steps[lo:lo + kmax]
            k = st.shape[0]
            pert, off = {}, 0
            for n, s in zip(names, sizes):
                pert[n] = params[n].unsqueeze(0) + st[:, off:off + s].reshape((k,) + tuple(params[n].shape))
                off += s
            fixed = {n: p for n, p in params.items() if n not in pert}
            bufs = {n: b.unsqueeze(0).repeat((k,) + (1,) * b.dim()) for n, b in buffers.items()}

            def run(pp, bb):
                return select(torch.func.functional_call(model, ({**fixed, **pp}, bb), (x.clone(),)))

            out = vmap_or_loop(run, (pert, bufs), (0, 0), 0, k)
            b = x.shape[0]
            losses = check_losses(loss_fn(out.reshape((k * b,) + tuple(out.shape[2:])), repeat_targets(y, k)), k * b)
            diffs.append(losses.reshape(k, b).double() - base[None, :])
            if on_chunk is not None:
                on_chunk(k)
        return torch.cat(diffs), base_out, base
