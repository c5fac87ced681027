"""CGE throughput: the engine against the paper's reference, the loop without feature reuse,
a torch.func vmap batch and first-order backprop, on identical models, batches and coordinates.

Each case is ``<workload>-<method>``; the workload is the pytest-benchmark group. The timed result
is checked against a float64 reference once, outside the timed region; timings are never asserted.
"""
from __future__ import annotations

import copy

import torch

import baselines as B
import workloads as W

_WORKLOADS = {}


def get_workload(name, mode):
    key = (name, mode)
    if key not in _WORKLOADS:
        # drop other workloads' models (memory), keep the float64 reference of this one
        _WORKLOADS.clear()
        _WORKLOADS[key] = W.build_workload(name, mode)
    return _WORKLOADS[key]


def _parse(method):
    """``engine-<backend>[-budget=<bytes|None>|-K=<k>]`` -> (backend, budget, chunk_size)."""
    parts = method.split("-")
    backend = parts[1]
    budget = chunk = None
    for p in parts[2:]:
        if p.startswith("budget="):
            v = p.split("=", 1)[1]
            budget = None if v == "None" else int(v)
        elif p.startswith("K="):
            chunk = int(p.split("=", 1)[1])
    return backend, budget, chunk


def _timed(fn):
    def run():
        out = fn()
        W.sync()
        return out
    return run


def test_cge(benchmark, cge_case, mode, conv_rate):
    group, method = cge_case
    S = W.SIZES[mode]
    w = get_workload(group, mode)
    w.reset()
    benchmark.group = group
    x, y, coords = w.x, w.y, w.coords
    timings = {}
    cge = None
    if method == "reference":
        fn = lambda: B.reference(w.model, x, y, coords, W.MU, timings=timings)  # noqa: E731
    elif method == "no_reuse":
        fn = lambda: B.no_reuse(w.model, x, y, coords, W.MU, timings=timings)  # noqa: E731
    elif method == "vmap":
        fn = lambda: B.vmap_cge(w.model, x, y, coords, W.MU, chunk=S["vmap_chunk"],  # noqa: E731
                                timings=timings)
    elif method == "fo":
        fn = lambda: B.first_order(w.model, x, y)  # noqa: E731
    elif method.startswith("engine"):
        backend, budget, chunk = _parse(method)
        cge = W.make_cge(w.model, backend, budget, chunk)
        # masks=None means every trainable parameter, densely: only for whole-model workloads
        whole = w.dense and len(w.scope) == sum(p.requires_grad for p in w.model.parameters())
        masks = None if whole else B.masks_from_coords(w.model, coords)
        fn = lambda: cge.estimate(x, y, masks=masks)  # noqa: E731
    else:
        raise KeyError(method)

    slow = method in ("reference", "no_reuse", "vmap")
    rounds, warmup = (S["base_rounds"], 0) if slow else (S["rounds"], S["warmup"])
    result = benchmark.pedantic(_timed(fn), rounds=rounds, warmup_rounds=warmup, iterations=1)
    t = W.median_time(benchmark)

    # ---- correctness of what was timed (outside the timed region)
    ref64 = w.ref64()
    pos = w.check_positions()
    info = {"coords": len(coords), "batch": int(x.shape[0]), "sampled": w.sampled}
    if method == "fo":
        for n in w.scope:
            assert n in result and torch.isfinite(result[n]).all(), n
        got = B.gather(result, w.check_coords).double().cpu()
        info["fo_cosine_vs_cge"] = float(torch.nn.functional.cosine_similarity(
            got, ref64.cpu(), dim=0))
    else:
        vec = B.gather(result, coords) if isinstance(result, dict) else result
        assert vec.shape == (len(coords),) and torch.isfinite(vec).all()
        torch.testing.assert_close(vec[pos].double().cpu(), ref64.cpu(),
                                   **W.fp32_tolerance(ref64, w.base_loss))
        if cge is not None:
            # the same engine in float64 on the check coordinates: tight agreement
            w.reset()
            m64 = copy.deepcopy(w.model).double()
            cge64 = W.make_cge(m64, backend, budget, chunk)
            g64 = B.gather(cge64.estimate(x.double(), y, masks=B.masks_from_coords(m64, w.check_coords)),
                           w.check_coords)
            torch.testing.assert_close(g64.cpu(), ref64.cpu(), rtol=1e-6, atol=1e-9)
            w.reset()
            info.update(W.engine_chunks(cge, x, y, masks))
    w.reset()

    # ---- extrapolation of a sampled set to the dense step
    dense_t = None
    if method == "fo":
        dense_t = t
    elif w.sampled and t is not None:
        if cge is None:
            dense_t = w.extrapolate(timings["t0"], timings["groups"])
        else:
            dense_t = _engine_extrapolate(w, cge)
    info.update(w.info)
    benchmark.extra_info.update(info)
    if dense_t is not None:
        benchmark.extra_info["dense_time_s_extrapolated"] = dense_t
    W.REGISTRY.set_group_info(group, coords=len(coords), sampled=w.sampled,
                              dense_coords=sum(w.dense_counts().values()),
                              useful_flops=w.useful_flops(),
                              dense_useful_flops=w.dense_useful_flops(),
                              forward_flops=w.forward_flops, **w.info)
    W.REGISTRY.record(group, method, time_s=t, rounds=rounds,
                      n_pert=None if method == "fo" else len(coords),
                      useful_flops=None if method == "fo" else w.useful_flops(),
                      dense_time_s=dense_t, **{k: v for k, v in info.items()
                                              if k.startswith("chunk") or k == "fo_cosine_vs_cge"})


def _engine_extrapolate(w, cge):
    """Per-block engine times on the sampled coordinates (each block's coordinates in one call,
    minus the cost of a call with no coordinates), scaled to the block's dense coordinate count."""
    def once(coords):
        masks = B.masks_from_coords(w.model, coords)
        best = None
        for _ in range(2):
            t = W.now()
            cge.estimate(w.x, w.y, masks=masks)
            W.sync()
            dt = W.now() - t
            best = dt if best is None else min(best, dt)
        return best

    t0 = once([])
    by_block = {}
    for c in w.coords:
        by_block.setdefault(w.owner[c[0]], []).append(c)
    groups = {b: once(cs) - t0 for b, cs in by_block.items()}
    w.reset()
    return w.extrapolate(t0, groups)
