"""RGE with q directions: the engine's batched evaluation against the naive loop (perturb all
parameters along one direction, forward, restore; q times), on the same ResNet-20, batch and
directions. Group ``rge_resnet20``."""
from __future__ import annotations

import copy

import torch

import baselines as B
import workloads as W

GROUP = "rge_resnet20"
_CACHE = {}


def _setup(mode):
    if mode not in _CACHE:
        from deepzero_kernels.models import resnet20
        c = W.SIZES[mode]["rge"]
        dev = W.bench_device()
        torch.manual_seed(0)
        model = resnet20().to(dev).train()
        x, y = W._data(c["batch"], c["image"], device=dev)
        _CACHE.clear()
        _CACHE[mode] = dict(model=model, x=x, y=y, q=c["q"], state=copy.deepcopy(model.state_dict()))
    return _CACHE[mode]


def _directions(model, q, seed, dtype):
    """q unit-norm Gaussian directions over all trainable parameters (the engine's own sampler
    when it has one, so both sides do the same work), as a (q, d) tensor."""
    from deepzero_kernels import RGE
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    rge = RGE(model, mu=W.MU, q=q)
    return names, rge.directions(names, g).to(dtype)


def _as_dicts(model, names, u):
    params = dict(model.named_parameters())
    out = []
    for row in u:
        d, off = {}, 0
        for n in names:
            k = params[n].numel()
            d[n] = row[off:off + k].view_as(params[n])
            off += k
        out.append(d)
    return out


def test_rge(benchmark, rge_method, mode, conv_rate):
    from deepzero_kernels import RGE

    S = W.SIZES[mode]
    st = _setup(mode)
    model, x, y, q = st["model"], st["x"], st["y"], st["q"]
    model.load_state_dict(st["state"])
    benchmark.group = GROUP
    names, u = _directions(model, q, seed=0, dtype=x.dtype)
    if rge_method == "loop":
        dirs = _as_dicts(model, names, u)
        fn = lambda: B.rge_loop(model, x, y, dirs, W.MU)  # noqa: E731
        rounds, warmup = S["base_rounds"], 0
    else:
        rge = RGE(model, mu=W.MU, q=q, scale="paper")  # eq. (1) as printed, as the loop computes
        fn = lambda: rge.estimate(x, y, directions=u)  # noqa: E731
        rounds, warmup = S["rounds"], S["warmup"]

    def run():
        out = fn()
        W.sync()
        return out

    got = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    t = W.median_time(benchmark)

    # ---- correctness, outside the timed region: float64 loop on the same directions
    model.load_state_dict(st["state"])
    m64 = copy.deepcopy(model).double()
    u64 = u.double()
    ref = B.rge_loop(m64, x.double(), y, _as_dicts(m64, names, u64), W.MU)
    if rge_method != "loop":
        rge64 = RGE(m64, mu=W.MU, q=q, scale="paper")
        g64 = rge64.estimate(x.double(), y, directions=u64)
        for n in names:
            torch.testing.assert_close(g64[n], ref[n], rtol=1e-6, atol=1e-10)
    flat_ref = torch.cat([ref[n].reshape(-1) for n in names])
    flat = torch.cat([got[n].reshape(-1).double() for n in names])
    rel = float((flat - flat_ref).norm() / flat_ref.norm())
    assert rel < 5e-2, rel  # float32 finite differences vs float64: rounding-level agreement
    model.load_state_dict(st["state"])

    fwd = sum(B.block_flops(model, x)[0])
    model.load_state_dict(st["state"])
    benchmark.extra_info.update(q=q, batch=int(x.shape[0]), rel_err_vs_float64=rel)
    W.REGISTRY.set_group_info(GROUP, coords=q, sampled=False, batch=int(x.shape[0]),
                              image=int(x.shape[-1]), model="CifarResNet", forward_flops=fwd,
                              useful_flops=q * fwd)
    W.REGISTRY.record(GROUP, rge_method, time_s=t, rounds=rounds, n_pert=q, useful_flops=q * fwd,
                      rel_err_vs_float64=rel)
