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
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from . import fusion, rules
from .deltas import ChannelDelta, DenseDelta, densify, kdim, to_values
from .formulas import cross_entropy_delta
from .functional import forbid_randomness, has_hooks, model_lock, preserved_buffers, vmap_or_loop
from .graph import (DROPOUT_FUNCS, affected_nodes, dropout_active, functionalize, is_inplace, last_uses,
                    param_sources, structure_signature)
from .kernels import get as get_kernels
from .kernels.validate import trusted_indices
from .ops import check_count, resolve_backend
from .precision import check_base_precision, check_delta_precision, full_fp32

__all__ = ["DeltaEngine", "EngineReport", "PartialMismatch", "PartialRun", "per_sample_cross_entropy", "default_memory_budget",
           "query_loss"]

_GiB = 1 << 30
_CPU_CACHE_TARGET = 8 << 20  # bytes of one delta tensor that keep a chunk in a CPU's caches
_K_ROUND = 32  # GPU chunk lengths are rounded down to a multiple of this


def per_sample_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy per sample, shape ``(N,)``. A class index past the
    outputs is a ``ValueError`` naming ``y`` (on a GPU it would be a device-side assert)."""
    if outputs.dim() >= 2 and targets.numel() and not targets.is_floating_point():
        top = int(targets.max())
        if top >= outputs.shape[1]:
            raise ValueError(f"y holds class index {top}, but the model has {outputs.shape[1]} outputs")
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
    256 stays far from a 24 GiB machine's limit), an eighth of the device's total memory on a GPU.
    Never from the free memory: that depends on the caching allocator's history, and chunk sizes
    (hence float rounding) must not differ between a fresh and a resumed run."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(total // 8, 64 << 20)
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
            if n.op == "call_function" and n.target in DROPOUT_FUNCS:
                if dropout_active(n):
                    raise ValueError(f"the model calls {n.target.__name__} with training=True: zeroth-order "
                                     "estimates need a deterministic forward; pass training=self.training "
                                     "and estimate in eval mode, or remove the dropout.")


def _live_bytes(reps: dict) -> int:
    """Bytes of the delta values alive in ``reps``."""
    total = 0
    for r in reps.values():
        for d in (r if isinstance(r, (tuple, list)) else (r,)):
            v = getattr(d, "values", None)
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def _map(v, fn):
    """Apply ``fn`` to every fx Node inside an argument structure."""
    return fx.node.map_arg(v, fn)


@dataclass
class EngineReport:
    """How one call of the engine evaluated its perturbations, so a user can see why a model is slow.

    ``path`` is ``"delta"`` (traced, deltas propagated by rules) or ``"functional"`` (whole-model
    forwards, ``reason`` says why). ``fallback`` maps each graph node that had no delta rule for
    its case (``"name (op)"``) to the perturbations it evaluated one by one on the exact per-node
    fallback; ``whole_model`` counts perturbations evaluated with whole-model forwards."""
    path: str = "delta"
    reason: str = ""
    perturbations: int = 0
    fallback: dict = field(default_factory=dict)
    whole_model: int = 0
    base_note: str = ""  # why a requested float64 base pass was not used ('' when it was, or not asked)

    @property
    def fast(self) -> bool:
        """Every perturbation ran on delta rules and fused kernels only."""
        return self.path == "delta" and not self.fallback and not self.whole_model

    def __str__(self) -> str:
        if self.path != "delta":
            return (f"{self.perturbations} perturbations on whole-model forwards (exact, slow): {self.reason}")
        text = f"{self.perturbations} perturbations by delta rules"
        if self.fast:
            text += ", no fallback"
        else:
            parts = [f"{n}: {k}" for n, k in sorted(self.fallback.items(), key=lambda kv: -kv[1])]
            text += f"; per-node fallback (evaluations) at {', '.join(parts)}" if parts else ""
            if self.whole_model:
                text += f"; {self.whole_model} perturbations of parameters outside the trace by whole-model forwards"
        if self.base_note:
            text += f"; base pass in the model's dtype ({self.base_note})"
        return text


class PartialMismatch(ValueError):
    """A :class:`PartialRun` that this call cannot continue bitwise (another batch, model,
    coordinates, backend or chunk sizing): start the estimate afresh instead."""


class PartialRun:
    """The loss changes one :meth:`DeltaEngine.run` has finished, chunk by chunk, so that an
    interrupted estimate continues where it stopped. A resumed run recomputes the unperturbed pass
    (checked bitwise against the one recorded here) and then evaluates only the chunks not done,
    with the chunk lengths recorded here: every coordinate's loss change comes from the same chunk
    as in an uninterrupted run, so the result is bitwise the same. A record this call cannot
    continue exactly (another batch, model, coordinates, backend, budget or precision) raises
    :class:`PartialMismatch` before any work. A parameter's progress is one ``(done, chunk)`` entry,
    written in one step after its rows, so the record is consistent whenever an interrupt arrives."""

    def __init__(self):
        self.base_loss = None  # (B,) float64 of the unperturbed batch
        self.setup = None  # what decides chunking and rounding: backend, budget, chunk size, precision
        self.rows = {}  # name -> (n, B) float64; rows [0, done) are final
        self.progress = {}  # name -> (rows done, chunk length after the first, measuring, chunk)

    @property
    def done(self) -> dict:
        return {n: d for n, (d, _) in self.progress.items()}

    @property
    def perturbations(self) -> int:
        return sum(d for d, _ in self.progress.values())

    def state_dict(self) -> dict:
        """CPU tensors of the finished rows only (what a checkpoint stores)."""
        prog = dict(self.progress)
        return {"base_loss": None if self.base_loss is None else self.base_loss.cpu(), "setup": self.setup,
                "rows": {n: self.rows[n][:d].cpu() for n, (d, _) in prog.items()},
                "done": {n: d for n, (d, _) in prog.items()}, "chunk": {n: c for n, (_, c) in prog.items()}}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "PartialRun":
        """Raises ValueError when ``sd`` is not a partial run's record."""
        pr = cls()
        try:
            base, rows, done, chunk = sd["base_loss"], sd["rows"], dict(sd["done"]), dict(sd["chunk"])
            pr.setup = sd.get("setup")

            def count(v, lo):
                return type(v) is int and v >= lo
            ok = (set(rows) == set(done) and set(done) <= set(chunk) and isinstance(base, torch.Tensor)
                  and base.dim() == 1 and base.dtype == torch.float64
                  and all(count(done[n], 1) and count(chunk[n], 1) for n in done)
                  and (pr.setup is None or isinstance(pr.setup, dict))
                  and all(isinstance(r, torch.Tensor) and r.dtype == torch.float64
                          and tuple(r.shape) == (done[n], base.shape[0]) for n, r in rows.items()))
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise ValueError("not the record of a partial estimate (fields base_loss, setup, rows, done, chunk)")
        pr.base_loss, pr.rows = base, dict(rows)
        pr.progress = {n: (done[n], chunk[n]) for n in done}
        return pr

    def start(self, base_loss: torch.Tensor, setup: dict, sizes: dict) -> None:
        """Record the unperturbed losses and the setup, or check a record against them and against
        ``sizes`` (name -> coordinates estimated now). Raises :class:`PartialMismatch`."""
        if self.base_loss is None:
            self.base_loss, self.setup = base_loss.detach().clone(), dict(setup)
            return
        why = None
        if self.setup is not None and self.setup != setup:
            why = f"it was made with {self.setup}, this estimate runs with {setup}"
        elif self.base_loss.shape != base_loss.shape or not torch.equal(self.base_loss.to(base_loss.device), base_loss):
            why = "its unperturbed losses differ (another batch, model, device or thread count)"
        else:
            bad = [n for n, (d, c) in self.progress.items() if n not in sizes or d > sizes[n] or c > sizes[n]]
            partly = [n for n, (d, _) in self.progress.items() if n in sizes and d < sizes[n]]
            if bad or len(partly) > 1:
                why = f"its records of {bad or partly} do not fit the coordinates estimated now"
        if why:
            raise PartialMismatch(f"the interrupted estimate cannot be continued exactly: {why}")

    def rows_for(self, name: str, n: int, b: int, device) -> tuple:
        """``(out, done, chunk)``: the (n, b) result of ``name`` with its finished rows filled in,
        and the chunk length to go on with (None: not measured yet)."""
        done, chunk = self.progress.get(name, (0, None))
        out = self.rows.get(name)
        if out is None or out.shape != (n, b) or out.device != torch.device(device):
            full = torch.empty((n, b), dtype=torch.float64, device=device)
            if done:
                full[:done] = self.rows[name][:done].to(device)
            out = self.rows[name] = full
        return out, done, chunk

    def finished(self, name: str, done: int, chunk: int) -> None:
        """Rows [0, done) of ``name`` are final; the chunks go on with length ``chunk``. One store:
        an interrupt sees the old entry or the new one."""
        self.progress[name] = (done, chunk)


_MISMATCH = object()


def _below_fp64(v) -> bool:
    """``v`` is, or holds, a floating tensor narrower than float64."""
    if isinstance(v, (tuple, list)):
        return any(_below_fp64(e) for e in v)
    return isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64


def _widen(v):
    """``v`` with its floating tensors in float64 (others as they are)."""
    return v.double() if isinstance(v, torch.Tensor) and _below_fp64(v) else v


def _round_like(wide, v):
    """The float64 pass's value ``wide`` rounded to the dtype of the model's value ``v``;
    ``_MISMATCH`` when the two differ in structure (type, shape, non-floating dtype)."""
    if isinstance(v, torch.Tensor):
        if not isinstance(wide, torch.Tensor) or wide.shape != v.shape or wide.device != v.device:
            return _MISMATCH
        if v.is_floating_point():
            return wide.to(v.dtype) if wide.is_floating_point() else _MISMATCH
        return wide if wide.dtype == v.dtype else _MISMATCH
    if isinstance(v, (tuple, list)):
        if type(wide) is not type(v) or len(wide) != len(v):
            return _MISMATCH
        out = [_round_like(w, e) for w, e in zip(wide, v)]
        if any(o is _MISMATCH for o in out):
            return _MISMATCH
        if all(o is e for o, e in zip(out, v)):
            return v
        return type(v)(*out) if hasattr(v, "_fields") else type(v)(out)
    return v


class _Selected(nn.Module):
    """``output_fn(model(x))`` as one module, so that the trace ends at the loss's input."""

    def __init__(self, model: nn.Module, output_fn):
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, x):
        return self.output_fn(self.model(x))


class _Pass:
    """State of one batch: base values of every node and the delta of the chunk in flight."""

    def __init__(self, engine: "DeltaEngine", base: dict):
        self.engine = engine
        self._base = base
        self.reps: dict = {}
        self.k = 0
        self._bn = {}
        self.kernels = None   # a kernels.Kernels of the triton/native backend, or None (torch rules)
        self.targets = None
        self.affected = set()  # nodes downstream of the parameter being estimated
        self.sources = set()   # nodes where that parameter enters: no fused chain may swallow one

    def fused(self, node):
        """A fused kernel chain starting at ``node``, or NotImplemented (then the per-node rules run).
        The fusion pass returns the representations of every node it covered; they are stored here."""
        if self.kernels is None:
            return NotImplemented
        return self._store(fusion.fused_node(self, node), node)

    def _store(self, placed, node):
        if placed is NotImplemented or placed is None:
            return placed
        self.reps.update(placed)
        return placed[node]

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

    def base_cached(self, key, make):
        """A tensor derived from base values only (the same for every chunk of the batch), made once."""
        if key not in self._bn:
            self._bn[key] = make()
        return self._bn[key]

    def perturbed_value(self, n):
        rep, base = self.rep(n), self._base[n]
        if isinstance(rep, (tuple, list)):
            return type(rep)(b if r is None or b is None else to_values(r, b) for r, b in zip(rep, base))
        return to_values(rep, base)

    def call(self, node, getter, override=None):
        return self.engine.call(node, getter, override)


def _traced_over_hooks(graph: fx.Graph, root: nn.Module) -> str:
    """Why the trace cannot be used when a module it traced *through* has forward hooks (the
    graph holds its body, not the call that runs them); '' when there is none. Hooks of leaf
    modules run: rules send hooked leaves to the exact per-node evaluation."""
    leaves = {n.target for n in graph.nodes if n.op == "call_module"}
    for name, m in root.named_modules():
        if name not in leaves and not any(name.startswith(f"{leaf}.") for leaf in leaves) and has_hooks(m):
            return f"module {name or type(root).__name__!r} has forward hooks that its traced body does not run"
    return ""


def _resolve(root: nn.Module, target: str):
    """The attribute ``a.b.c`` of ``root``, or None."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _global_hooks_registered() -> bool:
    m = nn.modules.module
    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None))


class _BasePass(fx.Interpreter):
    """The unperturbed forward, keeping every node's value (the engine's cache). Nodes are
    evaluated by ``DeltaEngine.call``, which gives in-place ops a private copy of their input and
    runs train-mode BatchNorm without touching its running statistics."""

    def __init__(self, engine: "DeltaEngine", graph: fx.Graph):
        super().__init__(engine.root, garbage_collect_values=False, graph=graph)
        self.engine = engine

    def run_node(self, n: Node):
        if n.op in ("call_module", "call_function", "call_method", "get_attr"):
            return self.engine.call(n, lambda a: self.env[a])
        return super().run_node(n)


class _Trace:
    """One traced structure of the model: the graph (with in-place ops rewritten) and whether
    it may be used; ``None`` graph means the model could not be traced."""

    def __init__(self, graph: fx.Graph | None, why: str = "", constants: dict | None = None):
        self.graph = graph
        self.why = why
        self.constants = constants or {}  # get_attr targets that tracing created (tensor constants)


class DeltaEngine:
    """Evaluates ``loss_b(theta + mu e_i) - loss_b(theta)`` for chunks of coordinates ``i``.

    Args:
        model: any ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-sample losses; ``None`` means
            per-sample cross-entropy, whose change at the logits is taken in closed form.
        memory_budget: bytes for one chunk (default :func:`default_memory_budget`).
        chunk_size: fixed number of perturbations per chunk (overrides the budget).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``: who runs the fused chains
            (:mod:`deepzero_kernels.fusion`); the torch backend runs the per-node rules.
            Resolved for the input's device at every call.
        output_fn: for a model whose forward returns a tuple, dict or other structure, selects
            the tensor the loss takes (``lambda out: out[0]``, ``lambda out: out["logits"]``).
        strategy: ``"delta"`` (trace the model and propagate deltas; falls back to the
            functional evaluation when that cannot be exact) or ``"functional"`` (always batched
            functional calls of the whole model: the slow, simple reference).
        delta_precision: ``"fp32"`` (default), ``"tf32"`` or ``"bf16"``: the precision of the
            linear maps (conv, linear) applied to deltas of a float32 model. Everything else runs
            in full float32 whatever torch's TF32 flags say (:mod:`deepzero_kernels.precision`).
        base_precision: ``"fp64"`` (default): the base values the deltas are taken around are
            computed in float64 and rounded once to the model's dtype (one extra forward per call;
            a float32 base pass limits float32 estimates to ~1e-4 relative on deep BatchNorm
            networks); ``"model"``: the model's own pass. Float64 models have one pass either way.

    Exactness guards, on every call: the model's structure is compared with the traced one
    (re-trace on any change); the engine's base output must equal an eager ``model(x)``
    bitwise, else the functional path runs; any draw from torch's random generators in the
    forward is a ``ValueError``; parameters are found by tensor identity.
    """

    def __init__(self, model: nn.Module, loss_fn=None, *, memory_budget: int | None = None,
                 chunk_size: int | None = None, backend: str = "auto", output_fn=None, strategy: str = "delta",
                 delta_precision: str = "fp32", base_precision: str = "fp64"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                          or memory_budget <= 0):
            raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
        if chunk_size is not None:
            check_count("chunk_size", chunk_size)
        if strategy not in ("delta", "functional"):
            raise ValueError(f"strategy must be 'delta' or 'functional', got {strategy!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.output_fn = output_fn
        self.backend = backend
        self.memory_budget = memory_budget
        self.chunk_size = chunk_size
        self.strategy = strategy
        self.delta_precision = check_delta_precision(delta_precision)
        self.base_precision = check_base_precision(base_precision)
        self._wide = None  # during the float64 base pass: module name -> its float64 state
        # Injection point: a kernels object (the interface of ``kernels.get(name)``) that runs the
        # fused chains whatever ``backend`` resolves to; tests use it to count launches.
        self.kernels = None
        self.root = _Selected(model, output_fn) if output_fn is not None else model
        self._traces: dict = {}  # structure signature -> _Trace (a few: train and eval)
        self._warned: set = set()
        self.modules: dict = {}
        self._constants: dict = {}
        self.num_loss_calls = 0
        self.num_loss_samples = 0  # samples passed to the loss over all calls
        # Perturbations evaluated by the dense per-node fallback (no delta rule), per node: over
        # the engine's life, and for the last call in ``last_report``.
        self.fallback_counts = collections.Counter()
        self.last_report = EngineReport()

    @property
    def last_fallback_reason(self) -> str:
        """Why the last call did not use the delta path ('' when it did): ``last_report.reason``."""
        return self.last_report.reason

    def _warn_once(self, key, msg):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"deepzero_kernels: {msg}", stacklevel=4)

    # ------------------------------------------------------------------ tracing
    def _trace(self) -> _Trace:
        """The trace of the model's current structure (re-traced whenever it changed)."""
        sig = structure_signature(self.root)
        tr = self._traces.get(sig)
        if tr is None:
            if len(self._traces) >= 4:
                self._traces.clear()
            try:
                if "forward" in self.model.__dict__:  # fx traces the class's forward, not this one
                    raise TypeError("its forward is replaced on the instance")
                with preserved_buffers(self.root):  # tracing runs the forward on proxies
                    gm = fx.symbolic_trace(self.root)
                graph = gm.graph
            except Exception as e:  # data-dependent control flow and the like
                tr = _Trace(None, f"torch.fx could not trace {type(self.model).__name__} ({type(e).__name__}: {e})")
            else:
                if functionalize(graph, dict(self.root.named_modules())):
                    # Tensor constants live on the GraphModule, not on the (restored) model.
                    constants = {n.target: _resolve(gm, n.target) for n in graph.nodes
                                 if n.op == "get_attr" and _resolve(self.root, n.target) is None}
                    tr = _Trace(graph, constants=constants)
                else:
                    tr = _Trace(None, "the forward writes in place into a view, its input or by index")
            self._traces[sig] = tr
        return tr

    # ------------------------------------------------------------------ evaluation of one node
    def call(self, node: Node, getter, override=None):
        """Evaluate ``node`` with its inputs from ``getter``; in-place ops get a private copy of
        their input so cached base values are never overwritten. ``override = (path, tensor)``
        replaces the parameter ``path`` of the node's module (or the ``get_attr`` value)."""
        args = _map(node.args, getter)
        kwargs = _map(node.kwargs, getter)
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        if is_inplace(node, mod) and args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(),) + tuple(args[1:])
        if node.op == "call_module":
            wide = self._wide_state(node.target, mod) if self._wide is not None else None
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and rules.uses_batch_stats(mod):
                # Batch statistics without touching the running buffers.
                w, b = (mod.weight, mod.bias) if wide is None else (wide.get("weight"), wide.get("bias"))
                if override is not None:
                    w = override[1] if override[0] == "weight" else w
                    b = override[1] if override[0] == "bias" else b
                return F.batch_norm(args[0], None, None, w, b, True, 0.0, mod.eps)
            if override is not None:
                return torch.func.functional_call(mod, {override[0]: override[1]}, args, kwargs)
            if wide is not None:
                return torch.func.functional_call(mod, wide, args, kwargs)
            return mod(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            if override is not None:
                return override[1]
            v = self._constants[node.target] if node.target in self._constants else _resolve(self.root, node.target)
            return v if self._wide is None else _widen(v)
        raise RuntimeError(f"cannot evaluate node {node.op} {node.target}")

    def base_pass(self, graph: fx.Graph, x: torch.Tensor) -> dict:
        """Every node's unperturbed value (placeholders after the first take their defaults)."""
        interp = _BasePass(self, graph)
        interp.run(x)
        return interp.env

    def _wide_state(self, target: str, mod: nn.Module) -> dict:
        """Float64 copies of a module's floating parameters and buffers, made once per pass."""
        if target not in self._wide:
            self._wide[target] = {n: _widen(t) for n, t in (*mod.named_parameters(), *mod.named_buffers())}
        return self._wide[target]

    def _widened_base(self, graph: fx.Graph, x: torch.Tensor, base: dict) -> dict:
        """``base`` recomputed in float64 and rounded once to each value's dtype (see
        ``base_precision``). Kept as it is when nothing in it is below float64, or, with the reason in
        ``last_report.base_note``, when the float64 pass fails (an op that refuses mixed dtypes)
        or gives values of another structure: the model's own pass is exact, only less precise."""
        if not any(_below_fp64(v) for v in base.values()):
            return base
        self._wide = {}
        try:
            wide = self.base_pass(graph, _widen(x))
        except Exception as e:  # noqa: BLE001 - any failure of the optional pass keeps the exact one
            self.last_report.base_note = f"the float64 pass failed: {type(e).__name__}: {e}"[:300]
            return base
        finally:
            self._wide = None
        out = {}
        for n, v in base.items():
            r = _round_like(wide.get(n), v)
            if r is _MISMATCH:
                self.last_report.base_note = f"the float64 pass gave another structure at node {n.name}"
                return base
            out[n] = r
        return out

    # ------------------------------------------------------------------ perturbation sources
    def _source_delta(self, p: _Pass, node: Node, path: str | None, param: torch.Tensor, idx: torch.Tensor,
                      mu: float):
        """The representation of ``node``'s output when ``param[idx[k]] += mu``."""
        k = idx.numel()
        if node.op == "get_attr":
            vals = param.new_zeros((k, param.numel()))
            vals[torch.arange(k, device=vals.device), idx] = mu
            return DenseDelta(vals.reshape((k,) + tuple(param.shape)).movedim(0, kdim(param)))
        mod = self.modules[node.target]
        x = node.args[0] if node.args else None
        changed_input = any(p.rep(a) is not None for a in node.all_input_nodes)
        source = rules.find_source_rule(mod)
        plain = (isinstance(x, Node) and len(node.all_input_nodes) == 1 and not node.kwargs
                 and path in ("weight", "bias"))
        if not changed_input and not has_hooks(mod) and (plain or getattr(source, "any_call", False)):
            if p.kernels is not None and plain:
                fused = p._store(fusion.fused_source(p, node, mod, path, param, idx, mu), node)
                if fused is not None:
                    return fused
            rep = source(p, node, path, param, idx, mu) if source is not None else None
            if rep is not None:
                return rep
        # Anything else (another module, a parameter inside a leaf module, a use whose input
        # the same perturbation already changed): evaluate the node once per perturbation with
        # its perturbed inputs and a perturbed copy of the parameter.
        pert = param.detach().reshape(1, -1).repeat(k, 1)
        pert[torch.arange(k, device=pert.device), idx] += mu
        return rules.fallback(p, node, override=(path, pert.reshape((k,) + tuple(param.shape))))

    # ------------------------------------------------------------------ chunk sizing
    def chunk_size_for(self, working_set: int, n: int, device, live_set: int | None = None) -> int:
        """Perturbations per chunk for a parameter whose perturbations each need ``working_set``
        bytes for their largest delta and ``live_set`` bytes for all the deltas alive at once
        (both measured on a first chunk of one). Six times the live set per perturbation must fit
        the budget: the rules' temporaries come on top of the deltas they read and write. On a
        CPU, chunks also stay cache-sized: the dense suffix is compute-bound and larger batches
        only evict the cache."""
        if self.chunk_size is not None:
            return max(1, min(self.chunk_size, n))
        ws = max(working_set, 1)
        live = max(live_set or ws, ws)
        budget = self.memory_budget or default_memory_budget(device)
        k = budget // (6 * live)
        if device.type == "cpu":
            k = min(k, _CPU_CACHE_TARGET // ws)
        elif k > _K_ROUND:  # whole warps of perturbations; sizes that repeat across runs
            k -= k % _K_ROUND
        return int(max(1, min(n, k)))

    # ------------------------------------------------------------------ loss changes
    def loss_change(self, p: _Pass, out_node: Node, rep, targets) -> torch.Tensor:
        """Per-sample loss change ``(K, B)`` (float64) from the output's delta."""
        yb = p.base(out_node)
        k, b = p.k, yb.shape[0]
        if rep is None:
            return torch.zeros((k, b), dtype=torch.float64, device=yb.device)
        if isinstance(rep, fusion.LossDelta):
            return rep.values
        if self.loss_fn is None and yb.dim() == 2:
            if isinstance(rep, ChannelDelta) and len(rep.view) == 1:
                return cross_entropy_delta(yb, targets, rep.values.t(), rep.index)
            return cross_entropy_delta(yb, targets, densify(rep, yb).transpose(0, 1))
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
    def _eager_output(self, x: torch.Tensor):
        """``output_fn(model(x))`` as the user's code computes it: the reference the engine's base
        pass must reproduce bitwise. Random draws are refused; the model is restored. Also returns
        the buffers the forward changed, BatchNorm statistics aside (the rules compute batch
        statistics without them): with such state every evaluation must start from the same
        buffers, which only the functional path guarantees."""
        bn_stats = {id(t) for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None}
        before = [(n, b, b.clone()) for n, b in self.model.named_buffers() if id(b) not in bn_stats]
        with preserved_buffers(self.model), forbid_randomness(x.device):
            out = self.root(x.clone())  # a forward that writes into its input must not change x
            now = dict(self.model.named_buffers())
            changed = [n for n, b, v in before if now.get(n) is not b or not torch.equal(b, v)]
        if not isinstance(out, torch.Tensor):
            hint = ("pass output_fn= to select the tensor the loss takes, e.g. output_fn=lambda out: out[0] "
                    "or output_fn=lambda out: out['logits']") if self.output_fn is None else \
                "output_fn must return a tensor"
            raise TypeError(f"the model's output is a {type(out).__name__}, not a tensor: {hint}")
        return out, changed

    @torch.no_grad()
    def run(self, x: torch.Tensor, targets, coords: dict, mu: float, *, on_chunk=None, partial=None):
        """Loss changes for every coordinate set in ``coords`` (name -> 1-D LongTensor of flat
        indices). Returns ``(base_output, base_losses (B,), {name: (K_name, B) float64})``.
        Parameters are processed from the last layer to the first; buffers are restored.
        ``partial``: a :class:`PartialRun` that records the finished chunks as they complete (and
        from which an interrupted call on the same batch and coordinates continues)."""
        partial = PartialRun() if partial is None else partial
        self._check_coords(coords)
        # Precision is the engine's: values in full float32 (no TF32), see precision.py.
        self.last_report = report = EngineReport(perturbations=sum(int(c.numel()) for c in coords.values()))
        # Every kernel index derives from coords, checked above once: no range check (a sync) per chunk.
        with model_lock(self.model), preserved_buffers(self.model), full_fp32(), trusted_indices():
            check_no_dropout(self.model)
            self.modules = dict(self.root.named_modules())
            reference, changed = self._eager_output(x)
            why = "strategy='functional'"
            if changed:
                why = f"the forward updates buffers {changed[:3]}"
            elif _global_hooks_registered():
                why = "global module hooks are registered (the rules would skip them)"
            elif self.strategy == "delta":
                tr = self._trace()
                why = tr.why or _traced_over_hooks(tr.graph, self.root)
                self._constants = tr.constants
                if not why:
                    check_no_dropout(self.model, tr.graph)
                    base = self.base_pass(tr.graph, x)
                    yb = base[next(n for n in tr.graph.nodes if n.op == "output")]
                    if isinstance(yb, torch.Tensor) and yb.shape == reference.shape and torch.equal(yb, reference):
                        if self.base_precision == "fp64":
                            base = self._widened_base(tr.graph, x, base)
                        return self._run_traced(tr.graph, base, x, targets, coords, mu, on_chunk, partial)
                    why = "the traced forward does not reproduce model(x) bitwise"
                self._warn_once(why, f"{why}; using the exact but slower batched functional evaluation.")
            report.path, report.reason, report.whole_model = "functional", why, report.perturbations
            return self._run_functional(reference, x, targets, coords, mu, on_chunk, partial)

    def _setup(self, path: str) -> dict:  # path: the backend of the delta rules, or "functional"
        """What decides how an estimate is chunked and rounded (a partial estimate must match it)."""
        return {"backend": path, "memory_budget": self.memory_budget, "chunk_size": self.chunk_size,
                "delta_precision": self.delta_precision, "base_precision": self.base_precision}

    def _check_coords(self, coords: dict) -> None:
        """Names of trainable parameters, 1-D int64 flat indices in range (one sync per parameter)."""
        params = dict(self.model.named_parameters())
        for name, idx in coords.items():
            if name not in params:
                raise ValueError(f"coords names {name!r}, which is not a parameter of the model")
            if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
                raise TypeError(f"coords[{name!r}] must be a 1-D int64 tensor of flat indices")
            if idx.numel():
                lo, hi = (int(v) for v in torch.aminmax(idx))
                if lo < 0 or hi >= params[name].numel():
                    raise ValueError(f"coords[{name!r}] holds indices in [{lo}, {hi}], outside [0, "
                                     f"{params[name].numel()}) of the parameter")

    def _run_traced(self, graph, base, x, targets, coords, mu, on_chunk, partial):
        """Length: the chunk loop over a parameter's nodes is one piece (working set, live set,
        freeing deltas at their last use, the partial record); split, its state would travel
        through a half-dozen arguments."""
        out_node = next(n for n in graph.nodes if n.op == "output")
        yb = base[out_node]
        p = _Pass(self, base)
        name = resolve_backend(self.backend, x.device)
        p.kernels = self.kernels if self.kernels is not None else None if name == "torch" else get_kernels(name)
        p.targets = targets
        p.base_loss = self.call_loss(yb, targets).double()
        partial.start(p.base_loss, self._setup(name), {nm: int(c.numel()) for nm, c in coords.items()})
        order = {n: i for i, n in enumerate(graph.nodes)}
        params = dict(self.model.named_parameters())
        by_id = param_sources(graph, self.root, self.modules)
        srcs = {nm: by_id.get(id(params[nm]), []) for nm in coords}
        unplaced = [nm for nm in coords if not srcs[nm] and coords[nm].numel()]
        # Back to front: the layers nearest the loss are the cheapest and go first.
        names = sorted((nm for nm in coords if nm not in unplaced),
                       key=lambda nm: -max((order[s] for s, _ in srcs[nm]), default=-1))
        nodes = list(graph.nodes)
        result = {}
        for name in names:
            idx = coords[name]
            if idx.numel() == 0:
                result[name] = torch.zeros((0, yb.shape[0]), dtype=torch.float64, device=yb.device)
                continue
            src_path = dict(srcs[name])
            start = min(src_path, key=order.get)
            n = idx.numel()
            p.sources = set(src_path)
            # Nodes the parameter can change: a fused chain may only add a tensor outside this set.
            p.affected = affected_nodes(src_path)
            # Last use of each node, so deltas are freed as soon as nothing needs them.
            last_use = last_uses(nodes[order[start]:])
            # One (n, B) result per parameter, filled chunk by chunk: small tensors kept per chunk
            # between the chunks' large temporaries fragment the heap (RSS grew ~1 MB per
            # perturbation on ResNet-20 at batch 128).
            out, lo, kmax = partial.rows_for(name, n, yb.shape[0], yb.device)
            # Every call chunks the same way (a first chunk of one, which measures the working
            # set, then chunks sized from it), so results never depend on call history.
            kmax = kmax or self.chunk_size or 1
            while lo < n:
                ci = idx[lo:lo + kmax]
                lo += ci.numel()
                p.k = ci.numel()
                p.reps = {}
                working_set = live_set = 0
                for nd in nodes[order[start]:]:
                    if nd.op == "output":
                        break
                    if nd not in p.reps:
                        # A source is evaluated in graph order, so that a second use of the
                        # parameter sees the change the first use made to its input.
                        r = (self._source_delta(p, nd, src_path[nd], params[name], ci, mu) if nd in src_path
                             else rules.propagate(p, nd))
                        if r is not None:
                            p.reps[nd] = r
                    r = p.reps.get(nd)
                    if r is not None and not isinstance(r, (tuple, list)) and r.values is not None:
                        working_set = max(working_set, r.values.numel() * r.values.element_size() // p.k)
                    if lo == p.k:  # first chunk: the peak of everything the chunk holds at once
                        live_set = max(live_set, _live_bytes(p.reps) // p.k)
                    for a in nd.all_input_nodes:
                        if last_use.get(a) is nd and a in p.reps and a is not out_node.args[0]:
                            del p.reps[a]
                out[lo - p.k:lo] = self.loss_change(p, out_node, p.reps.get(out_node.args[0]), targets)
                if lo == p.k and self.chunk_size is None:
                    kmax = self.chunk_size_for(working_set, n, x.device, live_set)
                partial.finished(name, lo, kmax)
                if on_chunk is not None:
                    on_chunk(name, p.k)
            result[name] = out
        if unplaced:
            # A parameter no graph node holds (used outside what fx recorded): never zero-fill it,
            # evaluate it through the whole model.
            self._warn_once(("unplaced",) + tuple(unplaced),
                            f"parameters {unplaced} were not found in the traced graph; they are "
                            "estimated with whole-model forwards (exact, slower).")
            self.last_report.whole_model += sum(int(coords[nm].numel()) for nm in unplaced)
            _, _, more = self._run_functional(yb, x, targets, {nm: coords[nm] for nm in unplaced}, mu, on_chunk,
                                              partial, base_loss=p.base_loss)
            result.update(more)
        return yb, p.base_loss, result

    # ------------------------------------------------------------------ untraceable models
    def _run_functional(self, yb, x, targets, coords, mu, on_chunk, partial, base_loss=None):
        """Whole-model forwards of perturbed copies of each parameter (vmap over a chunk, else
        one at a time); the user's parameters are never written."""
        if base_loss is None:
            base_loss = self.call_loss(yb, targets).double()
            partial.start(base_loss, self._setup("functional"), {nm: int(c.numel()) for nm, c in coords.items()})
        params = {n: t.detach() for n, t in self.model.named_parameters()}
        result = {}
        for name, idx in coords.items():
            param = params[name]
            n = idx.numel()
            res, done, kmax = partial.rows_for(name, n, yb.shape[0], yb.device)  # see _run_traced
            kmax = kmax or self.chunk_size or max(1, min(n, 64))
            for lo in range(done, n, kmax):
                ci = idx[lo:lo + kmax]
                k = ci.numel()
                pert = param.reshape(1, -1).repeat(k, 1)
                pert[torch.arange(k, device=pert.device), ci] += mu
                pert = pert.reshape((k,) + tuple(param.shape))
                out = self._functional_outputs(name, pert, params, x)
                b = yb.shape[0]
                losses = self.call_loss(out.reshape((k * b,) + tuple(yb.shape[1:])), repeat_targets(targets, k))
                res[lo:lo + k] = losses.reshape(k, b).double() - base_loss[None, :]
                partial.finished(name, lo + k, kmax)
                if on_chunk is not None:
                    on_chunk(name, k)
            result[name] = res
        return yb, base_loss, result

    def _functional_outputs(self, name, pert, params, x):
        """Outputs ``(K, B, ...)`` of ``output_fn(model(x))`` with parameter ``name`` replaced by
        ``pert[k]`` (tied aliases follow), each on its own copy of the buffers."""
        model, select = self.model, self.output_fn or (lambda out: out)
        k = pert.shape[0]
        buffers = {n: b.detach().unsqueeze(0).repeat((k,) + (1,) * b.dim()) for n, b in model.named_buffers()}

        def run(w, bufs):  # x.clone(): a forward that writes into its input must see the same x each time
            return select(torch.func.functional_call(model, ({**params, name: w}, bufs), (x.clone(),)))

        with forbid_randomness(x.device):
            return vmap_or_loop(run, (pert, buffers), (0, 0), 0, k)
