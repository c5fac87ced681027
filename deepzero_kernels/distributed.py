"""Forward parallelism across processes (paper eq. (5)) on ``torch.distributed``.

Every rank holds a replica of the model and the same batch. The active coordinates (after the
masks) are partitioned across ranks by a cost model, each rank runs the local :class:`CGE` on its
share only, and the partial gradients (disjoint supports) are summed with one ``all_reduce``.

Cost model: a coordinate of parameter ``k`` costs the work after its layer. Before any
measurement this is :func:`flop_costs`, the FLOPs that the delta engine spends on one
perturbation of ``k`` (from the traced graph and the activation shapes of the first batch; the
number of parameters from ``k`` to the output if the model cannot be traced). After each step
the measured seconds per coordinate of every parameter (timed between the engine's chunk
callbacks) are all-reduced, so every rank holds the same numbers and computes the same partition.
"""
from __future__ import annotations

import datetime
import math
import os
import time

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
import torch.nn as nn

from . import rules
from .functional import preserved_buffers
from .graph import param_sources
from .estimators import CGE, assign_grads, check_masks

__all__ = ["DistributedCGE", "partition", "init_from_env", "flop_costs", "broadcast_masks"]


def init_from_env(timeout_s: float = 300.0, backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's env (``WORLD_SIZE``/``RANK``);
    returns False (and does nothing) when not launched by torchrun. gloo on CPU, NCCL with CUDA."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def broadcast_masks(masks: dict, src: int = 0, process_group=None) -> dict:
    """Overwrite every rank's masks, in place, with rank ``src``'s (the trainer draws them from
    the same seeds everywhere; this makes sure). Every rank must pass the same names and shapes
    in the same order. Bool tensors travel as uint8 (gloo has no bool). Returns ``masks``."""
    for m in masks.values():
        u8 = m.to(torch.uint8)
        dist.broadcast(u8, src, group=process_group)
        m.copy_(u8.bool())
    return masks


def partition(counts: list, costs: list, world: int) -> list:
    """Split the coordinates of several parameters across ``world`` ranks.

    ``counts[k]`` active coordinates of parameter ``k``, each costing ``costs[k]``. Coordinates are
    laid out parameter after parameter; rank ``r`` gets those whose cost midpoint falls in
    ``[r T / W, (r + 1) T / W)`` with ``T`` the total cost. Returns, per rank, a list of
    ``(k, start, stop)`` slices into parameter ``k``'s active coordinates: every coordinate is in
    exactly one slice, and each rank's cost is within one coordinate's cost of ``T / W``.
    Pure float64 arithmetic: identical inputs give identical partitions on every rank."""
    out = [[] for _ in range(world)]
    total = float(sum(float(c) * float(n) for n, c in zip(counts, costs)))
    if world == 1 or total <= 0:
        out[0] = [(k, 0, n) for k, n in enumerate(counts) if n]
        return out
    acc = 0.0
    for k, (n, c) in enumerate(zip(counts, costs)):
        if n == 0:
            continue
        c = float(c)
        # midpoint of coordinate i: acc + (i + 0.5) c ; owner = floor(mid * W / T)
        mids = acc + (torch.arange(n, dtype=torch.float64) + 0.5) * c
        owner = torch.clamp((mids * world / total).floor().long(), 0, world - 1)
        # owners are non-decreasing: cut into runs
        bounds = torch.searchsorted(owner, torch.arange(world + 1), right=False).tolist()
        for r in range(world):
            if bounds[r + 1] > bounds[r]:
                out[r].append((k, int(bounds[r]), int(bounds[r + 1])))
        acc += n * c
    return out




def flop_costs(model: nn.Module, x: torch.Tensor):
    """FLOPs that one perturbed coordinate of each trainable parameter costs, on batch ``x``.

    Follows the delta engine with feature reuse: nothing before the parameter's layer is
    recomputed; the layer adds a one-channel delta (its output elements / channels); ops that do
    not mix channels keep that fraction (1 FLOP per element touched); the first conv/linear after
    it costs 2 x its multiply-adds x the fraction and makes the delta dense; every later op runs
    densely. Shapes come from one forward of the ``torch.fx`` trace on ``x`` (buffers restored).
    Returns ``{name: flops}`` (>= 1), or None if the model cannot be traced. Shapes only, so
    every rank computes the same numbers."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # the estimator warns about untraceable models itself
        return None
    with preserved_buffers(model), torch.no_grad():  # a train-mode BatchNorm updates its running stats
        ShapeProp(gm).propagate(x)
    shapes = {n: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if isinstance(n.meta.get("tensor_meta"), TensorMetadata)}
    mods = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    numel = lambda n: float(torch.Size(shapes[n]).numel()) if n in shapes else 0.0  # noqa: E731

    def dense(n):
        m = mods.get(n.target) if n.op == "call_module" else None
        if m is not None and rules.mixes_channels(n, m) and n in shapes:
            k = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * math.prod(m.kernel_size)
            return 2.0 * numel(n) * k, True
        return numel(n), False

    costs = {}
    sources = param_sources(gm.graph, gm, mods)  # by tensor identity, as the engine finds them
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        frac = {}  # affected node -> fraction of its output that the delta touches
        for n, _ in sources.get(id(p), []):
            shp = shapes.get(n, ())
            frac[n] = 1.0 / shp[1] if n.op == "call_module" and len(shp) >= 2 else 1.0
        cost = sum(numel(n) * f for n, f in frac.items() if n.op == "call_module")
        for n in nodes:
            if n in frac:
                continue
            f = max((frac[a] for a in n.all_input_nodes if a in frac), default=None)
            if f is None:
                continue  # feature reuse: unaffected nodes come from the cached base pass
            flops, mixes = dense(n)
            cost += flops * f
            frac[n] = 1.0 if mixes else f
        costs[name] = max(cost, 1.0)
    return costs


class DistributedCGE:
    """:class:`CGE` with the coordinates split across the ranks of ``process_group``.

    Same ``estimate``/``backward`` API and attributes (``last_loss``, ``last_output``,
    ``num_perturbations`` counts the whole group's perturbations). Extra attributes after a step:
    ``last_rank_seconds`` (list, every rank's estimation time), ``last_imbalance`` (max / mean),
    ``last_share`` (this rank's coordinate count). ``check_every`` > 0: every that many calls, a
    float64 checksum of all parameters and buffers is all-gathered and a ``RuntimeError`` raised
    if the replicas differ. ``initial_costs``: ``"flops"`` (:func:`flop_costs` on the first batch)
    or ``"params"`` (parameters from the layer to the output). ``ema`` weighs the newest
    measurement of per-coordinate costs (0 keeps the initial costs: the partition then depends
    only on shapes and masks, the same in every run). ``costs`` holds the current
    per-coordinate cost of each parameter (``names`` order) and ``costs_from`` their origin:
    ``"params"``, ``"flops"`` or ``"measured"`` (seconds)."""

    def __init__(self, model, loss_fn=None, mu=5e-3, *, process_group=None, check_every: int = 10,
                 ema: float = 0.5, initial_costs: str = "flops", **cge_kwargs):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedCGE needs an initialised torch.distributed process group "
                               "(launch with torchrun and call init_from_env() or dist.init_process_group)")
        self.cge = CGE(model, loss_fn, mu, **cge_kwargs)
        self.model = model
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)
        if initial_costs not in ("flops", "params"):
            raise ValueError(f"initial_costs must be 'flops' or 'params', got {initial_costs!r}")
        self.check_every = int(check_every)
        self.ema = float(ema)
        self.initial_costs = initial_costs
        self.calls = 0
        self.num_perturbations = 0
        self.last_loss, self.last_output = float("nan"), None
        self.last_rank_seconds, self.last_imbalance, self.last_share = [], 1.0, 0
        params = self.cge.trainable()
        self.names = list(params)
        numels = [p.numel() for p in params.values()]
        # Fallback proxy: parameters from this one to the output (named_parameters follows the
        # forward); replaced by FLOPs at the first batch, whose shapes flop_costs needs.
        self.costs = [float(sum(numels[k:])) for k in range(len(numels))]
        self.costs_from = "params"
        self.measured = False

    @property
    def mu(self):
        return self.cge.mu

    def _device(self):
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _allreduce(self, t):
        # gloo needs CPU tensors; NCCL needs CUDA ones: use the model's device
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def _collective(self, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError too: a peer exited or exceeded the timeout
            raise RuntimeError(f"DistributedCGE: {fn.__name__} failed on rank {self.rank} of {self.world}: "
                               f"another rank died or hung past the process-group timeout ({e})") from e

    def check_consistency(self) -> None:
        """All-gather a float64 checksum of the parameters and buffers; raise on divergence."""
        dev = self._device()
        with torch.no_grad():
            s = torch.zeros(2, dtype=torch.float64, device=dev)
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                if t.is_floating_point():
                    t64 = t.detach().to(torch.float64)
                    s[0] += t64.sum()
                    s[1] += (t64 * t64).sum()
        out = [torch.zeros_like(s) for _ in range(self.world)]
        self._collective(dist.all_gather, out, s, group=self.group)
        if any(not torch.equal(o, out[0]) for o in out):
            raise RuntimeError("DistributedCGE: model replicas diverged across ranks (checksums "
                               + ", ".join(f"rank {r}: {o[0].item():.17g}" for r, o in enumerate(out))
                               + "); all ranks must start from the same weights and apply the same updates")

    @property
    def last_report(self):
        """This rank's :attr:`CGE.last_report <deepzero_kernels.CGE.last_report>`."""
        return self.cge.last_report

    def estimate(self, x, y, masks=None, *, on_chunk=None) -> dict:
        params = self.cge.trainable()
        masks = check_masks(params, masks)
        dev = self._device()
        if self.check_every > 0 and self.calls % self.check_every == 0:
            self.check_consistency()
        self.calls += 1
        active = []
        for name, p in params.items():
            m = masks.get(name)
            active.append(torch.arange(p.numel(), device=p.device) if m is None
                          else m.reshape(-1).nonzero().squeeze(1))
        counts = [a.numel() for a in active]
        if self.initial_costs == "flops" and self.calls == 1:  # needs a batch for the shapes
            fl = flop_costs(self.model, x)
            if fl is not None:
                self.costs, self.costs_from = [fl[n] for n in self.names], "flops"
        shares = partition(counts, self.costs, self.world)
        mine = {}
        for k, a, b in shares[self.rank]:
            mine.setdefault(k, []).append(active[k][a:b])
        local = {}
        for k, (name, p) in enumerate(params.items()):
            m = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            if k in mine:
                m[torch.cat(mine[k])] = True
            local[name] = m.reshape(p.shape)
        self.last_share = sum(int(m.sum()) for m in local.values())

        # time each parameter: the engine calls on_chunk(name, k) after each chunk. The first
        # interval also holds the base forward pass, which every rank pays whatever its share:
        # leave it out so it is not charged to the coordinates of the first parameter.
        times, timed = {}, {}
        last = [None]

        def cb(name, kk):
            now = time.perf_counter()
            if last[0] is not None:
                times[name] = times.get(name, 0.0) + now - last[0]
                timed[name] = timed.get(name, 0) + kk
            last[0] = now
            if on_chunk is not None:
                on_chunk(name, kk)

        t0 = time.perf_counter()
        grads = self.cge.estimate(x, y, local, on_chunk=cb)
        elapsed = time.perf_counter() - t0

        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads.values()]) if grads else \
            torch.zeros(0, dtype=torch.float64, device=dev)
        n = len(self.names)
        stats = torch.zeros(2 * n + self.world, dtype=torch.float64, device=dev)
        for k, name in enumerate(self.names):
            stats[k] = times.get(name, 0.0)
            stats[n + k] = timed.get(name, 0)
        stats[2 * n + self.rank] = elapsed
        # one collective for the gradient and the timings together
        buf = self._allreduce(torch.cat([flat, stats]))
        flat, stats = buf[:flat.numel()], buf[flat.numel():]
        self.last_rank_seconds = stats[2 * n:].tolist()
        mean = sum(self.last_rank_seconds) / self.world
        self.last_imbalance = max(self.last_rank_seconds) / mean if mean > 0 else 1.0
        secs, cnt = stats[:n].tolist(), stats[n:2 * n].tolist()
        per = [t / c if c > 0 else None for t, c in zip(secs, cnt)]
        if self.ema > 0 and any(v is not None for v in per):
            if not self.measured:  # switch units to seconds, fitted to the total measured time, so
                # parameters not measured yet keep their initial cost relative to measured ones
                ratio = sum(secs) / max(sum(c * k for c, k in zip(self.costs, cnt)), 1e-300)
                self.costs = [c * ratio for c in self.costs]
                self.measured, self.costs_from = True, "measured"
            self.costs = [c if v is None else (1 - self.ema) * c + self.ema * v
                          for c, v in zip(self.costs, per)]
        self.last_output, self.last_loss = self.cge.last_output, self.cge.last_loss
        self.num_perturbations += sum(counts)
        out, i = {}, 0
        for name, p in params.items():
            out[name] = flat[i:i + p.numel()].to(p.dtype).reshape(p.shape)
            i += p.numel()
        return out

    def backward(self, *args, **kwargs) -> dict:
        grads = self.estimate(*args, **kwargs)
        assign_grads(self.model, grads)
        return grads
