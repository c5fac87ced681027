"""Baselines for the CGE benchmark suite (issue 5, DESIGN.md section 5).

Every CGE baseline takes a list of coordinates ``[(param_name, flat_index), ...]`` and returns a
1-D tensor of coordinate-wise finite differences, one per coordinate, with the engine's semantics::

    g_i = mean_b( l_b(theta + mu e_i) - l_b(theta) ) / mu

where ``l_b`` is the per-sample loss, the forward pass runs in the model's current mode (train
mode: BatchNorm uses the batch statistics of each perturbed forward), and parameters and buffers
are restored afterwards (BN running statistics are snapshotted and put back, so they do not drift).

* :func:`reference`  -- the paper's strategy: perturb in place, forward from the cached input of
  the block holding the coordinate (feature reuse at block granularity), loss, restore;
* :func:`no_reuse`   -- the same loop, forward from the network input;
* :func:`vmap_cge`   -- ``torch.func.functional_call`` + ``torch.func.vmap`` over K perturbed
  copies of the parameter (buffers passed as K clones so BN train mode works), chunked;
* :func:`first_order` -- one forward + backward (time only);
* :func:`rge_loop`   -- RGE's naive loop over q random directions.

:func:`decompose` splits the project's models (App. B ``SimpleCNN``, ``CifarResNet``, the ``MLP`` and
the ``features`` + ``forward_head`` architectures) into blocks whose inputs can be cached; any other
model is one block.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Coord = Tuple[str, int]

__all__ = ["Block", "decompose", "per_sample_ce", "snapshot_buffers", "restore_buffers",
           "reference", "no_reuse", "vmap_cge", "first_order", "rge_loop", "block_flops",
           "all_coords", "sample_coords", "masks_from_coords", "coords_block_index", "gather"]


def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss: per-sample cross entropy, shape ``(B,)``."""
    return F.cross_entropy(logits, y, reduction="none")


# ----------------------------------------------------------------------------- decomposition
@dataclass
class Block:
    """A piece of the forward pass: ``fn(h) -> h'``; ``param_names`` are full parameter names."""
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    param_names: List[str] = field(default_factory=list)


def _names(prefix_modules: Sequence[Tuple[str, nn.Module]]) -> List[str]:
    out = []
    for prefix, m in prefix_modules:
        out += [n for n, _ in m.named_parameters(prefix=prefix)]
    return out


def decompose(model: nn.Module) -> List[Block]:
    """Split ``model`` into blocks (cached-input granularity of the paper's feature reuse).

    * App. B CNN: one block per ``[Conv2d, BN, ReLU, MaxPool]`` group of ``model.features``,
      then the head ``pool -> flatten -> fc``;
    * CIFAR ResNet: the stem ``relu(bn1(conv1(x)))``, each ``BasicBlock``, the head
      ``pool -> flatten(1) -> fc``;
    * MLP: one block per Linear (+ its ReLU), the flatten folded into the first;
    * a model with a ``features`` ``nn.Sequential`` and ``forward_head`` (MobileNetV2, EfficientNet,
      DenseNet, ShuffleNetV2, ConvNeXt, ViT): each child of ``features``, then the head;
    * anything else: the whole model as one block.
    """
    from deepzero_kernels import models as M

    if isinstance(model, M.SimpleCNN):
        feats = list(model.features.named_children())
        starts = [i for i, (_, m) in enumerate(feats) if isinstance(m, nn.Conv2d)] + [len(feats)]
        blocks = []
        for a, b in zip(starts[:-1], starts[1:]):
            group = feats[a:b]
            mods = [m for _, m in group]
            seq = nn.Sequential(*mods)
            blocks.append(Block(f"features.{group[0][0]}-{group[-1][0]}", seq,
                                _names([(f"features.{n}", m) for n, m in group])))
        head = lambda h: model.fc(model.flatten(model.pool(h)))  # noqa: E731
        blocks.append(Block("head", head, _names([("fc", model.fc)])))
        return blocks
    if isinstance(model, M.CifarResNet):
        stem = lambda x: F.relu(model.bn1(model.conv1(x)))  # noqa: E731
        blocks = [Block("stem", stem, _names([("conv1", model.conv1), ("bn1", model.bn1)]))]
        for lname in (f"layer{i + 1}" for i in range(model.num_stages)):
            for j, blk in enumerate(getattr(model, lname)):
                blocks.append(Block(f"{lname}.{j}", blk, _names([(f"{lname}.{j}", blk)])))
        head = lambda h: model.fc(model.pool(h).flatten(1))  # noqa: E731
        blocks.append(Block("head", head, _names([("fc", model.fc)])))
        return blocks
    if isinstance(model, M.MLP):
        mods = list(model.net.named_children())
        lin = [i for i, (_, m) in enumerate(mods) if isinstance(m, nn.Linear)] + [len(mods)]
        lin[0] = 0  # fold the leading Flatten into the first block
        blocks = []
        for a, b in zip(lin[:-1], lin[1:]):
            group = mods[a:b]
            blocks.append(Block(f"net.{group[0][0]}-{group[-1][0]}",
                                nn.Sequential(*[m for _, m in group]),
                                _names([(f"net.{n}", m) for n, m in group])))
        return blocks
    if isinstance(getattr(model, "features", None), nn.Sequential) and hasattr(model, "forward_head"):
        # The architectures of deepzero_kernels.models: every child of ``features`` (stem, blocks),
        # then the head with the parameters outside ``features``.
        blocks = [Block(f"features.{n}", m, _names([(f"features.{n}", m)])) for n, m in model.features.named_children()]
        inside = {n for b in blocks for n in b.param_names}
        blocks.append(Block("head", model.forward_head, [n for n, _ in model.named_parameters() if n not in inside]))
        return blocks
    return [Block("model", model, [n for n, _ in model.named_parameters()])]


def coords_block_index(model: nn.Module, blocks: Optional[List[Block]] = None) -> Dict[str, int]:
    """Parameter name -> index of the block that holds it."""
    blocks = blocks if blocks is not None else decompose(model)
    owner = {}
    for bi, b in enumerate(blocks):
        for n in b.param_names:
            owner[n] = bi
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in owner]
    if missing:
        raise ValueError(f"decompose() does not cover parameters {missing}")
    return owner


# ----------------------------------------------------------------------------- buffers
def snapshot_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def restore_buffers(model: nn.Module, snap: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(snap[n])


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- coordinates
def all_coords(model: nn.Module, names: Optional[Sequence[str]] = None) -> List[Coord]:
    out = []
    for n, p in model.named_parameters():
        if p.requires_grad and (names is None or n in names):
            out += [(n, i) for i in range(p.numel())]
    return out


def sample_coords(model: nn.Module, per_tensor: int, seed: int = 0,
                  names: Optional[Sequence[str]] = None) -> List[Coord]:
    """A fixed (seeded) sample of ``per_tensor`` coordinates from every parameter tensor
    (all coordinates of tensors smaller than that), sorted."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, p in model.named_parameters():
        if not p.requires_grad or (names is not None and n not in names):
            continue
        k = min(per_tensor, p.numel())
        idx = torch.randperm(p.numel(), generator=g)[:k].sort().values
        out += [(n, int(i)) for i in idx]
    return out


def masks_from_coords(model: nn.Module, coords: Sequence[Coord]) -> Dict[str, torch.Tensor]:
    """Boolean masks (one per trainable parameter, all-False where nothing is selected)."""
    masks = {n: torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
             for n, p in model.named_parameters() if p.requires_grad}
    for n, i in coords:
        masks[n][i] = True
    params = dict(model.named_parameters())
    return {n: m.view_as(params[n]) for n, m in masks.items()}


def gather(grads: Dict[str, torch.Tensor], coords: Sequence[Coord]) -> torch.Tensor:
    """Pick the coordinates out of a dict of full gradient tensors."""
    by_name: Dict[str, List[int]] = OrderedDict()
    for n, i in coords:
        by_name.setdefault(n, []).append(i)
    first = next(iter(grads.values()))
    out = torch.empty(len(coords), dtype=first.dtype, device=first.device)
    pos: Dict[str, List[int]] = {}
    for k, (n, _) in enumerate(coords):
        pos.setdefault(n, []).append(k)
    for n, idx in by_name.items():
        out[torch.tensor(pos[n], device=out.device)] = grads[n].reshape(-1)[
            torch.tensor(idx, device=out.device)].to(out.dtype)
    return out


def _order_by_block(coords: Sequence[Coord], owner: Dict[str, int]) -> List[int]:
    return sorted(range(len(coords)), key=lambda k: (owner[coords[k][0]], coords[k][0], coords[k][1]))


# ----------------------------------------------------------------------------- CGE loops
def _cge_loop(model, x, y, coords, mu, loss_fn, reuse: bool, timings: Optional[dict]):
    loss_fn = loss_fn or per_sample_ce
    blocks = decompose(model)
    owner = coords_block_index(model, blocks)
    params = dict(model.named_parameters())
    snap = snapshot_buffers(model)
    dev = x.device
    try:
        with torch.no_grad():
            t_start = time.perf_counter()
            cache = []
            h = x
            for b in blocks:
                cache.append(h if reuse else None)
                h = b.fn(h)
            base = loss_fn(h, y)
            out = torch.empty(len(coords), dtype=base.dtype, device=dev)
            if timings is not None:
                _sync(dev)
                timings["t0"] = time.perf_counter() - t_start
                timings["groups"] = {}
            order = _order_by_block(coords, owner)
            cur_group, t_group = None, time.perf_counter()
            for k in order:
                name, idx = coords[k]
                bi = owner[name]
                if timings is not None and bi != cur_group:
                    _sync(dev)
                    now = time.perf_counter()
                    if cur_group is not None:
                        timings["groups"][cur_group] = timings["groups"].get(cur_group, 0.0) + now - t_group
                    cur_group, t_group = bi, now
                flat = params[name].view(-1)
                old = flat[idx].clone()
                flat[idx] += mu
                if reuse:
                    h = cache[bi]
                    for b in blocks[bi:]:
                        h = b.fn(h)
                else:
                    h = model(x)
                out[k] = (loss_fn(h, y) - base).mean() / mu
                flat[idx] = old
            if timings is not None and cur_group is not None:
                _sync(dev)
                timings["groups"][cur_group] = (timings["groups"].get(cur_group, 0.0)
                                                + time.perf_counter() - t_group)
    finally:
        restore_buffers(model, snap)
    return out


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, coords: Sequence[Coord],
              mu: float = 5e-3, loss_fn=None, *, timings: Optional[dict] = None) -> torch.Tensor:
    """The paper's CGE: per coordinate, perturb in place, forward from the cached input of the
    block holding it, per-sample loss difference averaged, restore."""
    return _cge_loop(model, x, y, coords, mu, loss_fn, True, timings)


def no_reuse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, coords: Sequence[Coord],
             mu: float = 5e-3, loss_fn=None, *, timings: Optional[dict] = None) -> torch.Tensor:
    """The paper's CGE without feature reuse: every perturbed forward starts at the input."""
    return _cge_loop(model, x, y, coords, mu, loss_fn, False, timings)


def vmap_cge(model: nn.Module, x: torch.Tensor, y: torch.Tensor, coords: Sequence[Coord],
             mu: float = 5e-3, loss_fn=None, *, chunk: int = 16,
             timings: Optional[dict] = None) -> torch.Tensor:
    """``torch.func.vmap`` of ``functional_call`` over ``chunk`` perturbed copies of a parameter,
    one chunk at a time (coordinates grouped by parameter); buffers go in as ``chunk`` clones so
    BN in train mode can update its (batched) running statistics under vmap."""
    from torch.func import functional_call, vmap

    loss_fn = loss_fn or per_sample_ce
    owner = coords_block_index(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    snap = snapshot_buffers(model)
    dev = x.device
    try:
        with torch.no_grad():
            t_start = time.perf_counter()
            base = loss_fn(functional_call(model, (params, {n: b.clone() for n, b in buffers.items()}),
                                           (x,)), y)
            out = torch.empty(len(coords), dtype=base.dtype, device=dev)
            if timings is not None:
                _sync(dev)
                timings["t0"] = time.perf_counter() - t_start
                timings["groups"] = {}
            order = _order_by_block(coords, owner)
            # runs of the same parameter, in block order
            runs: List[Tuple[str, List[int]]] = []
            for k in order:
                if runs and runs[-1][0] == coords[k][0]:
                    runs[-1][1].append(k)
                else:
                    runs.append((coords[k][0], [k]))
            for name, ks in runs:
                t_group = time.perf_counter()
                p0 = params[name]

                def f(p, bufs, name=name):
                    d = dict(params)
                    d[name] = p
                    return loss_fn(functional_call(model, (d, bufs), (x,)), y)

                batched = vmap(f, in_dims=(0, 0))
                for c0 in range(0, len(ks), chunk):
                    kk = ks[c0:c0 + chunk]
                    K = len(kk)
                    idx = torch.tensor([coords[k][1] for k in kk], device=dev)
                    P = p0.reshape(1, -1).repeat(K, 1)
                    P[torch.arange(K, device=dev), idx] += mu
                    bufs = {n: b.unsqueeze(0).repeat(K, *([1] * b.dim())) for n, b in buffers.items()}
                    L = batched(P.view(K, *p0.shape), bufs)  # (K, B)
                    out[torch.tensor(kk, device=dev)] = (L - base).mean(1) / mu
                if timings is not None:
                    _sync(dev)
                    bi = owner[name]
                    timings["groups"][bi] = timings["groups"].get(bi, 0.0) + time.perf_counter() - t_group
    finally:
        restore_buffers(model, snap)
    return out


def first_order(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None
                ) -> Dict[str, torch.Tensor]:
    """One first-order step's gradient work: forward, mean per-sample loss, backward."""
    loss_fn = loss_fn or per_sample_ce
    snap = snapshot_buffers(model)
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss_fn(model(x), y).mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.requires_grad and p.grad is not None}
        model.zero_grad(set_to_none=True)
    finally:
        restore_buffers(model, snap)
    return grads


def rge_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, directions, mu: float = 5e-3,
             loss_fn=None) -> Dict[str, torch.Tensor]:
    """RGE's naive loop: for each direction ``u`` (a dict name -> tensor, or a list of dicts)
    perturb all parameters by ``mu * u``, forward, and accumulate
    ``mean_b(l_b(theta + mu u) - l_b(theta)) / mu * u``, averaged over the directions."""
    loss_fn = loss_fn or per_sample_ce
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    orig = {n: p.detach().clone() for n, p in named}
    snap = snapshot_buffers(model)
    grads = {n: torch.zeros_like(p) for n, p in named}
    q = 0
    try:
        with torch.no_grad():
            base = loss_fn(model(x), y)
            for u in directions:
                for n, p in named:
                    p.add_(u[n], alpha=mu)
                d = (loss_fn(model(x), y) - base).mean() / mu
                for n, p in named:
                    p.copy_(orig[n])
                    grads[n].add_(u[n], alpha=float(d))
                q += 1
            for n in grads:
                grads[n].div_(max(q, 1))
    finally:
        with torch.no_grad():
            for n, p in named:
                p.copy_(orig[n])
        restore_buffers(model, snap)
    return grads


# ----------------------------------------------------------------------------- FLOPs
def block_flops(model: nn.Module, x: torch.Tensor) -> Tuple[List[float], List[Block]]:
    """Dense forward FLOPs (2 x multiply-adds of Conv2d and Linear layers) of each block at the
    batch ``x``. The FLOPs of one reference perturbation in block ``b`` are ``sum(flops[b:])``."""
    blocks = decompose(model)
    counts = {"f": 0.0}

    def conv_hook(m, inp, out):
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        counts["f"] += 2.0 * out.numel() * k

    def lin_hook(m, inp, out):
        counts["f"] += 2.0 * out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    snap = snapshot_buffers(model)
    flops = []
    try:
        with torch.no_grad():
            h = x
            for b in blocks:
                counts["f"] = 0.0
                h = b.fn(h)
                flops.append(counts["f"])
    finally:
        for hk in hooks:
            hk.remove()
        restore_buffers(model, snap)
    return flops, blocks
