"""Architecture benchmark (issue 15): per architecture of ``deepzero_kernels.models``, the engine
against the paper's strategy (``reference``: per coordinate, perturb in place, forward from the
cached input of the enclosing block, restore) and a naive loop (``no_reuse``: a whole forward per
coordinate), on the same coordinates: a random sample of a 1 % random mask over every parameter
(so layers are represented in proportion to their size, as in training at 99 % sparsity).

Groups are ``archs-<name>``: ``pytest bench/ --benchmark-only -k archs``. Each engine case also
records the fallback evaluations of its :attr:`CGE.last_report` (zero for every architecture here)
and is checked against a float64 run of the paper's strategy on a few coordinates, outside the timed
region. Every method also records ``matmul_flops``, the convolution and matrix-product FLOPs of one
call (counted in an untimed extra call, :func:`workloads.matmul_flops`), so the summary shows how much
of each time ratio is arithmetic the engine saves and how much is speed per FLOP, and ``fixed_s``,
the time of a call with no coordinate (the base passes): a training step estimates the whole 1 % mask
in one call, so the summary also projects each method's time to ``mask_1pct`` coordinates (the fixed
part once, the rest in proportion) and gives those ratios as ``mask_speedup_vs``. Timings are never
asserted.
"""
from __future__ import annotations

import copy

import pytest
import torch

import baselines as B
import workloads as W

# Models at benchmark size (standard structure; widths chosen so a default run fits this CPU).
ARCH_SIZES = {
    "quick": dict(batch=4, image=16, coords=16, check=4, widths="tiny"),
    "default": dict(batch=16, image=32, coords=256, check=6, widths="bench"),
    "full": dict(batch=64, image=32, coords=1024, check=8, widths="standard"),
}


def _build(name: str, widths: str, image: int):
    from deepzero_kernels import models as M
    tiny = {
        "resnet18": lambda: M.resnet18(width=4), "mobilenet_v2": lambda: M.mobilenet_v2(width_mult=0.1, last_channels=32),
        "efficientnet_b0": lambda: M.efficientnet_b0(width_mult=0.1, depth_mult=0.25, last_channels=32),
        "densenet": lambda: M.densenet(growth=4, blocks=(2, 2, 2)),
        "shufflenet_v2": lambda: M.shufflenet_v2(widths=(8, 16, 32, 64, 64), repeats=(1, 2, 1)),
        "convnext": lambda: M.convnext(dims=(8, 16, 32), depths=(1, 1, 1)),
        "vit": lambda: M.vit(dim=16, depth=2, heads=2, image_size=image)}
    bench = {
        "resnet18": lambda: M.resnet18(width=16), "mobilenet_v2": lambda: M.mobilenet_v2(width_mult=0.5),
        "efficientnet_b0": lambda: M.efficientnet_b0(width_mult=0.5), "densenet": lambda: M.densenet(),
        "shufflenet_v2": lambda: M.shufflenet_v2(), "convnext": lambda: M.convnext(),
        "vit": lambda: M.vit(image_size=image)}
    standard = {n: (lambda n=n: M.build_model(n, image_size=image)) for n in bench}
    return {"tiny": tiny, "bench": bench, "standard": standard}[widths][name]()


ARCHS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "densenet", "shufflenet_v2", "convnext", "vit")
_CACHE: dict = {}


def _workload(name: str, mode: str):
    """(model, x, y, coords, state, ref64 on the check coordinates, check positions), built once."""
    key = (name, mode)
    if key not in _CACHE:
        _CACHE.clear()
        S = ARCH_SIZES[mode]
        dev = W.bench_device()
        torch.manual_seed(0)
        model = _build(name, S["widths"], S["image"]).to(dev).train()
        x, y = W._data(S["batch"], S["image"], device=dev)
        g = torch.Generator().manual_seed(0)
        mask = [(n, i) for n, p in model.named_parameters()
                for i in (torch.rand(p.numel(), generator=g) < 0.01).nonzero().flatten().tolist()]
        pick = torch.randperm(len(mask), generator=g)[:S["coords"]].sort().values.tolist()
        coords = [mask[i] for i in pick]
        state = copy.deepcopy(model.state_dict())
        n = len(coords)
        check_pos = sorted({round(i * (n - 1) / max(S["check"] - 1, 1)) for i in range(S["check"])})
        m64 = copy.deepcopy(model).double()
        check = [coords[i] for i in check_pos]
        ref64 = B.reference(m64, x.double(), y, check, W.MU)
        with torch.no_grad():
            base_loss = float(B.per_sample_ce(m64(x.double()), y).mean())
        _CACHE[key] = dict(model=model, x=x, y=y, coords=coords, state=state, ref64=ref64.cpu(),
                           pos=torch.tensor(check_pos), base_loss=base_loss, mask_size=len(mask),
                           params=sum(p.numel() for p in model.parameters()))
    w = _CACHE[key]
    w["model"].load_state_dict(w["state"])
    w["model"].train()
    return w


def _cases():
    engines = [f"engine-{b}" for b in W.engine_backends()]
    return [(a, m) for a in ARCHS for m in ("reference", "no_reuse", *engines)]


@pytest.mark.parametrize("arch,method", _cases(), ids=[f"archs-{a}-{m}" for a, m in _cases()])
def test_archs(benchmark, arch, method, mode):
    w = _workload(arch, mode)
    model, x, y, coords = w["model"], w["x"], w["y"], w["coords"]
    group = f"archs-{arch}"
    benchmark.group = group
    cge = None
    if method == "reference":
        run = lambda cs: B.reference(model, x, y, cs, W.MU)  # noqa: E731
    elif method == "no_reuse":
        run = lambda cs: B.no_reuse(model, x, y, cs, W.MU)  # noqa: E731
    else:
        cge = W.make_cge(model, method.split("-", 1)[1])
        run = lambda cs: B.gather(cge.estimate(x, y, masks=B.masks_from_coords(model, cs)), cs)  # noqa: E731
    fn = lambda: run(coords)  # noqa: E731
    # Every case takes seconds per call: one timed round (the engine after one untimed call that
    # traces the model and warms its caches); compare the ratios of one run.
    rounds, warmup = (1, 0) if cge is None else (1, 1)
    vec = benchmark.pedantic(lambda: (fn(), W.sync())[0], rounds=rounds, warmup_rounds=warmup, iterations=1)
    t = W.median_time(benchmark)
    # What was timed is right: the float32 result at the check coordinates against float64.
    assert vec.shape == (len(coords),) and torch.isfinite(vec).all()
    torch.testing.assert_close(vec[w["pos"]].double().cpu(), w["ref64"], **W.fp32_tolerance(w["ref64"], w["base_loss"]))
    info = {"batch": int(x.shape[0]), "image": int(x.shape[-1]), "coords": len(coords), "mask_1pct": w["mask_size"],
            "parameters": w["params"], "model": type(model).__name__}
    if cge is not None:
        rep = cge.last_report
        info.update(fallback_evaluations=sum(rep.fallback.values()) + rep.whole_model, engine_path=rep.path)
    # What a call costs with no coordinate at all (base passes, the engine's trace and checks), timed
    # outside the benchmark, best of two: training estimates the whole mask in one call, so this part
    # is paid once per mask_1pct coordinates there, and once per len(coords) here.
    fixed_s = W.wall_times(lambda: run([]), 2)[0]
    # The arithmetic each method does, counted outside the timed region: a naive loop runs the whole
    # forward once per coordinate (and once for the base), so its count is that product.
    if method == "no_reuse":
        flops = (len(coords) + 1) * W.matmul_flops(lambda: model(x))
    else:
        flops = W.matmul_flops(fn)
        if cge is not None:  # the counted call took the timed call's path
            assert cge.last_report.path == info["engine_path"], cge.last_report
    model.load_state_dict(w["state"])
    benchmark.extra_info.update(info, matmul_flops=flops)
    W.REGISTRY.set_group_info(group, **{k: v for k, v in info.items() if k not in ("fallback_evaluations", "engine_path")})
    W.REGISTRY.record(group, method, time_s=t, rounds=rounds, n_pert=len(coords), matmul_flops=flops, fixed_s=fixed_s,
                      **({k: info[k] for k in ("fallback_evaluations",)} if cge is not None else {}))
