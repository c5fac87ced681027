"""The delta engine: per-sample loss changes for chunks of single-coordinate perturbations.

``DeltaEngine(model)`` traces the model with ``torch.fx`` (structure is discovered, nothing is
registered), runs the unperturbed forward once per batch caching every node's value, and then,
for each parameter from the last layer to the first, evaluates chunks of K perturbations
``theta + mu e_i`` by propagating typed deltas (:mod:`deepzero_kernels.deltas`) from the
parameter's layer to the loss. A model that cannot be traced falls back to a batched
functional evaluation (``torch.func.functional_call`` + ``vmap``), and to a plain
perturb-forward-restore loop where even that cannot run.
"""
from __future__ import annotations

import collections
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from . import ops
from .kernels import chains, get as get_kernels
from .deltas import (ChannelDelta, DenseDelta, DenseValue, Rules, densify, gather_channels, is_inplace, kdim,
                     to_values, uses_batch_stats, dropout_active, _DROPOUT_FUNCS)

__all__ = ["DeltaEngine", "per_sample_cross_entropy", "default_memory_budget", "query_loss"]

_GiB = 1 << 30
_CPU_CACHE_TARGET = 8 << 20  # bytes of one delta tensor that keep a chunk in a CPU's caches


def per_sample_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy per sample, shape ``(N,)``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def repeat_targets(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Targets for K stacked copies of a batch (perturbation-major, as the outputs are)."""
    return targets.repeat(k, *[1] * (targets.dim() - 1)) if targets.dim() else targets


def check_losses(losses, n: int) -> torch.Tensor:
    """``loss_fn`` must return per-sample losses of shape ``(n,)``: a tensor, a NumPy array or
    anything ``torch.as_tensor`` accepts."""
    if not isinstance(losses, torch.Tensor):
        try:  # Python floats are doubles: a list must not drop to float32
            losses = torch.as_tensor(losses) if hasattr(losses, "dtype") else torch.as_tensor(losses, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"loss_fn must return per-sample losses as a tensor or array, got "
                            f"{type(losses).__name__} ({e})") from None
    if losses.shape != (n,):
        raise ValueError(f"loss_fn must return per-sample losses of shape ({n},), got shape {tuple(losses.shape)}")
    return losses


def query_loss(loss_fn, outputs: torch.Tensor, targets) -> torch.Tensor:
    """One query of a (possibly black-box) loss: it sees detached outputs under ``no_grad`` and
    is never asked for gradients; its result is converted and checked. A user loss must be
    finite: one nan/inf would silently turn the whole estimate into nan."""
    outputs = outputs.detach()
    with torch.no_grad():
        losses = check_losses((loss_fn or per_sample_cross_entropy)(outputs, targets), outputs.shape[0])
    if loss_fn is not None and losses.is_floating_point() and not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).sum())
        raise ValueError(f"loss_fn returned {bad} non-finite per-sample losses (nan or inf) out of {losses.numel()}")
    return losses.to(outputs.device)


def default_memory_budget(device: torch.device) -> int:
    """Bytes the engine may spend on one chunk of perturbations: 1 GiB on CPU (ResNet-20 at batch
    256 stays far from a 24 GiB machine's limit), a quarter of the free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free // 4, 64 << 20)
    return _GiB


def check_no_dropout(model: nn.Module, graph: fx.Graph | None = None) -> None:
    """Refuse models whose forward is random: the base and perturbed evaluations would see
    different dropout masks and the finite differences would be noise."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"module {name!r} ({type(m).__name__}, p={m.p}) is active in training mode: "
                             "zeroth-order estimates need a deterministic forward. Put dropout in eval "
                             "mode (module.eval()) or set p=0.")
    if graph is not None:
        for n in graph.nodes:
            if n.op == "call_function" and n.target in _DROPOUT_FUNCS:
                if dropout_active(n):
                    raise ValueError(f"the model calls {n.target.__name__} with training=True: zeroth-order "
                                     "estimates need a deterministic forward; pass training=self.training "
                                     "and estimate in eval mode, or remove the dropout.")


def _map(v, fn):
    """Apply ``fn`` to every fx Node inside an argument structure."""
    return fx.node.map_arg(v, fn)


class _Pass:
    """State of one batch: base values of every node and the delta of the chunk in flight."""

    def __init__(self, engine: "DeltaEngine", base: dict):
        self.engine = engine
        self._base = base
        self.reps: dict = {}
        self.k = 0
        self._bn = {}
        self.rules = Rules(self)
        self.kernels = None   # a kernels.Kernels of the triton/native backend, or None (torch rules)
        self.targets = None
        self.affected = set()  # nodes downstream of the parameter being estimated

    def fused(self, node):
        """A fused kernel chain starting at ``node``, or NotImplemented (then the per-node rules run)."""
        if self.kernels is None:
            return NotImplemented
        return chains.fused_node(self, node)

    def base(self, n):
        return self._base[n] if isinstance(n, Node) else n

    def rep(self, n):
        return self.reps.get(n) if isinstance(n, Node) else None

    def value(self, v):
        return _map(v, lambda n: self._base[n])

    def module(self, node):
        return self.engine.modules[node.target]

    def bn_stats(self, node, x):
        """Centred input and 1/std of a batch-statistics BatchNorm, from the base pass."""
        if node not in self._bn:
            xb = self._base[x]
            dims = (0,) + tuple(range(2, xb.dim()))
            shape = (1, -1) + (1,) * (xb.dim() - 2)
            mean = xb.mean(dims)
            var = xb.var(dims, unbiased=False)
            self._bn[node] = (xb - mean.reshape(shape), torch.rsqrt(var + self.module(node).eps))
        return self._bn[node]

    def perturbed_value(self, n):
        rep, base = self.rep(n), self._base[n]
        if isinstance(rep, (tuple, list)):
            return type(rep)(b if r is None else to_values(r, b) for r, b in zip(rep, base))
        return to_values(rep, base)

    def call(self, node, getter):
        return self.engine.call(node, getter)


class DeltaEngine:
    """Evaluates ``loss_b(theta + mu e_i) - loss_b(theta)`` for chunks of coordinates ``i``.

    Args:
        model: any ``nn.Module`` whose forward maps a batch to one output tensor.
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-sample losses; ``None`` means
            per-sample cross-entropy, whose change at the logits is taken in closed form.
        memory_budget: bytes for one chunk (default :func:`default_memory_budget`).
        chunk_size: fixed number of perturbations per chunk (overrides the budget).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``: who runs the fused chains
            (:mod:`deepzero_kernels.kernels.chains`); the torch backend runs the per-node rules.
            Resolved for the input's device at every call.
    """

    def __init__(self, model: nn.Module, loss_fn=None, *, memory_budget: int | None = None,
                 chunk_size: int | None = None, backend: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                          or memory_budget <= 0):
            raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.backend = backend
        self.memory_budget = memory_budget
        self.chunk_size = chunk_size
        self._traces: dict = {}
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.num_loss_calls = 0
        self.num_loss_samples = 0  # samples passed to the loss over all calls
        # Nodes evaluated by the dense per-perturbation fallback (no delta rule): for profiling.
        self.fallback_counts = collections.Counter()

    # ------------------------------------------------------------------ tracing
    def _trace(self):
        """The fx graph for the model's current train/eval modes (traces bake in ``training``)."""
        key = tuple(m.training for m in self.model.modules())
        if key not in self._traces:
            try:
                gm = fx.symbolic_trace(self.model)
                self._traces[key] = gm.graph
            except Exception as e:  # data-dependent control flow and the like
                warnings.warn(f"deepzero_kernels: could not trace {type(self.model).__name__} with torch.fx "
                              f"({type(e).__name__}: {e}); using the slower batched functional evaluation.",
                              stacklevel=3)
                self._traces[key] = None
        return self._traces[key]

    # ------------------------------------------------------------------ evaluation of one node
    def call(self, node: Node, getter):
        """Evaluate ``node`` with its inputs from ``getter``; in-place ops get a private copy of
        their input so cached base values are never overwritten."""
        args = _map(node.args, getter)
        kwargs = _map(node.kwargs, getter)
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        if is_inplace(node, mod) and args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(),) + tuple(args[1:])
        if node.op == "call_module":
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and uses_batch_stats(mod):
                # Batch statistics without touching the running buffers.
                return F.batch_norm(args[0], None, None, mod.weight, mod.bias, True, 0.0, mod.eps)
            return mod(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj = self.model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise RuntimeError(f"cannot evaluate node {node.op} {node.target}")

    def base_pass(self, graph: fx.Graph, x: torch.Tensor) -> dict:
        base = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                if node.target in ("x", "input") or not base:
                    base[node] = x
                else:
                    base[node] = node.args[0] if node.args else None  # default argument
            elif node.op == "output":
                base[node] = base[node.args[0]] if isinstance(node.args[0], Node) else None
            else:
                base[node] = self.call(node, lambda n: base[n])
        return base

    # ------------------------------------------------------------------ perturbation sources
    def _sources(self, graph: fx.Graph, name: str):
        """Graph nodes where parameter ``name`` enters: the call of the module that owns it, or
        a ``get_attr`` of the parameter itself."""
        mod_name, _, pname = name.rpartition(".")
        out = []
        for n in graph.nodes:
            if n.op == "call_module" and n.target == mod_name:
                out.append((n, pname))
            elif n.op == "get_attr" and n.target == name:
                out.append((n, None))
        return out

    def _source_delta(self, p: _Pass, node: Node, pname: str | None, name: str, idx: torch.Tensor, mu: float):
        param = self.params[name]
        k = idx.numel()
        if node.op == "get_attr":
            vals = param.new_zeros((k, param.numel()))
            vals[torch.arange(k, device=vals.device), idx] = mu
            return DenseDelta(vals.reshape((k,) + tuple(param.shape)).movedim(0, kdim(param)))
        mod = self.modules[node.target]
        x = node.args[0] if node.args else None
        xb = p.base(x) if isinstance(x, Node) else None
        yb = p.base(node)
        only_input = isinstance(x, Node) and len(node.all_input_nodes) == 1 and not node.kwargs
        if only_input and p.kernels is not None:
            fused = chains.fused_source(p, node, mod, pname, param, idx, mu)
            if fused is not None:
                return fused
        if only_input and isinstance(mod, nn.Conv2d) and xb.dim() == 4:
            if pname == "weight":
                pad = ops.conv_padding(mod.padding, mod.kernel_size, mod.dilation)
                ch, vals = ops.conv2d_weight_delta(xb, param.shape, idx, mu, stride=mod.stride, pad=pad,
                                                   dilation=mod.dilation, groups=mod.groups,
                                                   padding_mode=mod.padding_mode)
                return ChannelDelta(ch, vals, tuple(yb.shape[1:]))
            return ChannelDelta(idx, yb.new_full((yb.shape[0], k) + tuple(yb.shape[2:]), mu), tuple(yb.shape[1:]))
        if only_input and isinstance(mod, nn.Linear) and xb.dim() == 2:
            if pname == "weight":
                i, vals = ops.linear_weight_delta(xb, param.shape, idx, mu)
                return ChannelDelta(i, vals, tuple(yb.shape[1:]))
            return ChannelDelta(idx, yb.new_full((yb.shape[0], k), mu), tuple(yb.shape[1:]))
        if only_input and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if pname == "bias":
                vals = yb.new_full((yb.shape[0], k) + tuple(yb.shape[2:]), mu)
                return ChannelDelta(idx, vals, tuple(yb.shape[1:]))
            if uses_batch_stats(mod):
                x_hat, inv_std = p.bn_stats(node, x)
                x_norm = x_hat * inv_std.reshape((1, -1) + (1,) * (xb.dim() - 2))
            else:
                shape = (1, -1) + (1,) * (xb.dim() - 2)
                x_norm = (xb - mod.running_mean.reshape(shape)) * torch.rsqrt(mod.running_var + mod.eps).reshape(shape)
            rep = ChannelDelta(idx, None, tuple(yb.shape[1:]))
            return ChannelDelta(idx, gather_channels(x_norm, rep) * mu, tuple(yb.shape[1:]))
        # Any other module: evaluate it with K perturbed copies of the parameter.
        pert = param.detach().reshape(1, -1).repeat(k, 1)
        pert[torch.arange(k, device=pert.device), idx] += mu
        pert = pert.reshape((k,) + tuple(param.shape))
        args = _map(node.args, lambda n: p.base(n))
        kwargs = _map(node.kwargs, lambda n: p.base(n))
        params = {n_: t for n_, t in mod.named_parameters(recurse=False) if n_ != pname}

        def run(w):
            return torch.func.functional_call(mod, {**params, pname: w}, args, kwargs)

        try:
            out = torch.func.vmap(run, out_dims=kdim(yb), randomness="error")(pert)
        except Exception:
            out = torch.stack([run(w) for w in pert], kdim(yb))
        return DenseValue(out)

    # ------------------------------------------------------------------ chunk sizing
    def chunk_size_for(self, working_set: int, n: int, device) -> int:
        """Perturbations per chunk for a parameter whose perturbations each need ``working_set``
        bytes for their largest delta (measured on a first chunk of one). On a CPU, chunks stay
        cache-sized: the dense suffix is compute-bound and larger batches only evict the cache;
        everywhere a few live deltas per perturbation must fit the memory budget."""
        if self.chunk_size is not None:
            return max(1, min(self.chunk_size, n))
        ws = max(working_set, 1)
        budget = self.memory_budget or default_memory_budget(device)
        k = budget // (6 * ws)
        if device.type == "cpu":
            k = min(k, _CPU_CACHE_TARGET // ws)
        return int(max(1, min(n, k)))

    # ------------------------------------------------------------------ loss changes
    def loss_change(self, p: _Pass, out_node: Node, rep, targets) -> torch.Tensor:
        """Per-sample loss change ``(K, B)`` (float64) from the output's delta."""
        yb = p.base(out_node)
        k, b = p.k, yb.shape[0]
        if rep is None:
            return torch.zeros((k, b), dtype=torch.float64, device=yb.device)
        if isinstance(rep, chains.LossDelta):
            return rep.values
        if self.loss_fn is None and yb.dim() == 2:
            if isinstance(rep, ChannelDelta) and len(rep.view) == 1:
                return ops.cross_entropy_delta(yb, targets, rep.values.t(), rep.index)
            return ops.cross_entropy_delta(yb, targets, densify(rep, yb).transpose(0, 1))
        # Perturbation-major (K*B, ...) so that targets.repeat(K) lines up.
        outputs = to_values(rep, yb).transpose(0, 1).reshape((k * b,) + tuple(yb.shape[1:]))
        losses = self.call_loss(outputs, repeat_targets(targets, k))
        return losses.reshape(k, b).double() - p.base_loss[None, :]

    def call_loss(self, outputs, targets) -> torch.Tensor:
        """One batched query of the loss (see :func:`query_loss`), counted: calls and samples."""
        self.num_loss_calls += 1
        self.num_loss_samples += outputs.shape[0]
        return query_loss(self.loss_fn, outputs, targets)

    # ------------------------------------------------------------------ main entry
    @torch.no_grad()
    def run(self, x: torch.Tensor, targets, coords: dict, mu: float, *, on_chunk=None):
        """Loss changes for every coordinate set in ``coords`` (name -> 1-D LongTensor of flat
        indices). Returns ``(base_output, base_losses (B,), {name: (K_name, B) float64})``.
        Parameters are processed from the last layer to the first; buffers are restored."""
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        try:
            graph = self._trace()
            if graph is not None:
                check_no_dropout(self.model, graph)
                return self._run_traced(graph, x, targets, coords, mu, on_chunk)
            check_no_dropout(self.model)
            return self._run_functional(x, targets, coords, mu, on_chunk)
        finally:
            for n, b in self.model.named_buffers():
                b.copy_(buffers[n])

    def _run_traced(self, graph, x, targets, coords, mu, on_chunk):
        base = self.base_pass(graph, x)
        out_node = next(n for n in graph.nodes if n.op == "output")
        yb = base[out_node]
        if not isinstance(yb, torch.Tensor):
            raise TypeError(f"the model must return one tensor, got {type(yb).__name__}")
        p = _Pass(self, base)
        name = ops.resolve_backend(self.backend, x.device)
        p.kernels = None if name == "torch" else get_kernels(name)
        p.targets = targets
        p.base_loss = self.call_loss(yb, targets).double()
        order = {n: i for i, n in enumerate(graph.nodes)}
        srcs = {name: self._sources(graph, name) for name in coords}
        # Back to front: the layers nearest the loss are the cheapest and go first.
        names = sorted(coords, key=lambda nm: -max((order[s] for s, _ in srcs[nm]), default=-1))
        nodes = list(graph.nodes)
        result = {}
        for name in names:
            idx = coords[name]
            if not srcs[name] or idx.numel() == 0:
                result[name] = torch.zeros((idx.numel(), yb.shape[0]), dtype=torch.float64, device=yb.device)
                continue
            start = min((s for s, _ in srcs[name]), key=order.get)
            n = idx.numel()
            # Nodes the parameter can change: a fused chain may only add a tensor outside this set.
            p.affected = set()
            todo = [s for s, _ in srcs[name]]
            while todo:
                nd = todo.pop()
                if nd not in p.affected:
                    p.affected.add(nd)
                    todo.extend(nd.users)
            # Last use of each node, so deltas are freed as soon as nothing needs them.
            last_use = {}
            for nd in nodes[order[start]:]:
                for a in nd.all_input_nodes:
                    last_use[a] = nd
            # Every call chunks the same way (a first chunk of one, which measures the working
            # set, then chunks sized from it), so results never depend on call history.
            kmax = self.chunk_size or 1
            chunks, lo = [], 0
            while lo < n:
                ci = idx[lo:lo + kmax]
                lo += ci.numel()
                p.k = ci.numel()
                p.reps = {}
                working_set = 0
                for s, pname in srcs[name]:
                    p.reps[s] = self._source_delta(p, s, pname, name, ci, mu)
                for nd in nodes[order[start]:]:
                    if nd.op == "output":
                        break
                    if nd not in p.reps:
                        r = p.rules.propagate(nd)
                        if r is not None:
                            p.reps[nd] = r
                    r = p.reps.get(nd)
                    if r is not None and not isinstance(r, (tuple, list)) and r.values is not None:
                        working_set = max(working_set, r.values.numel() * r.values.element_size() // p.k)
                    for a in nd.all_input_nodes:
                        if last_use.get(a) is nd and a in p.reps and a is not out_node.args[0]:
                            del p.reps[a]
                chunks.append(self.loss_change(p, out_node, p.reps.get(out_node.args[0]), targets))
                if on_chunk is not None:
                    on_chunk(name, p.k)
                if lo == p.k and self.chunk_size is None:
                    kmax = self.chunk_size_for(working_set, n, x.device)
            result[name] = torch.cat(chunks)
        return yb, p.base_loss, result

    # ------------------------------------------------------------------ untraceable models
    def _run_functional(self, x, targets, coords, mu, on_chunk):
        model = self.model
        yb = model(x)
        if not isinstance(yb, torch.Tensor):
            raise TypeError(f"the model must return one tensor, got {type(yb).__name__}")
        base_loss = self.call_loss(yb, targets).double()
        params = {n: t.detach() for n, t in model.named_parameters()}
        buffers = {n: t.detach() for n, t in model.named_buffers()}
        result = {}
        for name, idx in coords.items():
            param = params[name]
            n = idx.numel()
            kmax = self.chunk_size or max(1, min(n, 64))
            chunks = []
            for lo in range(0, n, kmax):
                ci = idx[lo:lo + kmax]
                k = ci.numel()
                pert = param.reshape(1, -1).repeat(k, 1)
                pert[torch.arange(k, device=pert.device), ci] += mu
                pert = pert.reshape((k,) + tuple(param.shape))
                out = self._functional_outputs(name, pert, params, buffers, x)
                b = yb.shape[0]
                losses = self.call_loss(out.reshape((k * b,) + tuple(yb.shape[1:])), repeat_targets(targets, k))
                chunks.append(losses.reshape(k, b).double() - base_loss[None, :])
                if on_chunk is not None:
                    on_chunk(name, k)
            result[name] = torch.cat(chunks) if chunks else torch.zeros((0, yb.shape[0]), dtype=torch.float64)
        return yb, base_loss, result

    def _functional_outputs(self, name, pert, params, buffers, x):
        """Model outputs ``(K, B, ...)`` with parameter ``name`` replaced by ``pert[k]``."""
        model = self.model
        k = pert.shape[0]
        batched_buffers = {n: b.unsqueeze(0).repeat((k,) + (1,) * b.dim()) for n, b in buffers.items()}

        def run(w, bufs):
            return torch.func.functional_call(model, ({**params, name: w}, bufs), (x,))

        try:
            return torch.func.vmap(run, randomness="error")(pert, batched_buffers)
        except Exception:  # data-dependent Python control flow: one perturbation at a time
            param = dict(model.named_parameters())[name]
            saved = param.detach().clone()
            outs = []
            try:
                for w in pert:
                    param.copy_(w)
                    outs.append(model(x))
            finally:
                param.copy_(saved)
            return torch.stack(outs)
