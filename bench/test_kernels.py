"""The fused chain kernels, one launch each, on every available backend against the reference
backend (the torch composition in ``kernels/reference.py``) in the same run. The one benchmark of
the chains (``kernels-<chain>`` groups; the speed-ups land in the summary's ``kernels`` table).

Cases (``kernels-<chain>``), at the suite's standard sizes (batch 64):

* ``cnn_chain1``: App. B CNN first conv, K weight perturbations: gather -> BatchNorm (batch
  statistics) -> ReLU -> max pool (``conv_delta_chain``);
* ``cnn_chain2``: the same delta through the second conv -> BatchNorm -> ReLU -> max pool ->
  global average, on values (``conv1ch_chain``); ``cnn_chain2_delta``: the same on deltas, as the
  engine runs it (``conv1ch_delta_chain``);
* ``resnet_chain1`` / ``resnet_chain2``: ResNet-20's last stage (64 channels, 8x8): the block's
  first conv with BN and ReLU, then its second conv with BN, residual, ReLU, global average;
  ``resnet_chain2_delta``: that second conv with BN (as deltas; the engine's chain stops before the
  residual add);
* ``bn_dense``: per-perturbation BatchNorm + residual + ReLU on a dense (B, K, 64, 8, 8) batch;
* ``fc_ce``: every weight of ResNet-20's classifier to the closed-form cross-entropy change.

Results are checked against the reference backend outside the timed region. ``bytes`` is the
minimum traffic of a launch (each input read once, the output written once) and ``flops`` its
unavoidable arithmetic (:func:`min_flops`); on a GPU, bytes / time against the memory bandwidth is
the roofline fraction (``bench/gpu_check.sh`` reports it), flops / time the compute side.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import workloads as W

SIZES = {"quick": dict(batch=4, image=8, width=4, c3=8, k=4),
         "default": dict(batch=64, image=32, width=16, c3=64, k=64),
         "full": dict(batch=64, image=32, width=16, c3=64, k=128)}
CASES = ["cnn_chain1", "cnn_chain2", "cnn_chain2_delta", "resnet_chain1", "resnet_chain2", "resnet_chain2_delta",
         "bn_dense", "fc_ce"]
_CACHE = {}


def _bn_stats(z):
    mean = z.mean((0, 2, 3), keepdim=True)
    return (z - mean).contiguous(), torch.rsqrt(z.var((0, 2, 3), unbiased=False) + 1e-5)


def _conv_source_args(x, w, k, pool, g, mu=W.MU):
    """conv_delta_chain keyword arguments for K random weights of a 3x3, pad 1 conv followed by BN,
    ReLU and an optional 2x2 ceil-mode max pool."""
    from deepzero_kernels.kernels import BnArgs, PoolArgs
    dev = x.device
    c_out, c_in = w.shape[:2]
    z = F.conv2d(x, w, None, 1, 1)
    bn_w = torch.rand(c_out, generator=g).to(dev) + 0.5
    bn_b = torch.randn(c_out, generator=g).to(dev)
    pre = F.batch_norm(z, None, None, bn_w, bn_b, True, 0.0, 1e-5).contiguous()
    x_hat, inv = _bn_stats(z)
    idx = torch.randperm(w.numel(), generator=g)[:k].to(dev)
    o, rem = idx // (c_in * 9), idx % (c_in * 9)
    c, u, v = rem // 9, (rem % 9) // 3, rem % 3
    pooled = F.max_pool2d(F.relu(pre), 2, 2, ceil_mode=True).contiguous() if pool else None
    args = dict(x=x, src_channel=c, off_h=u - 1, off_w=v - 1, out_channel=o, mu=mu, stride=(1, 1),
                out_size=z.shape[2:], c_out=c_out, bn=BnArgs.batch(bn_w, xhat=x_hat, inv_std=inv), relu_base=pre,
                pool=PoolArgs(2, 2) if pool else PoolArgs(), pool_base=pooled)
    b, hw = x.shape[0], z.shape[2] * z.shape[3]
    out_hw = pooled.shape[2] * pooled.shape[3] if pool else hw
    nbytes = x.element_size() * b * k * (3 * hw + (2 if pool else 1) * out_hw)
    return args, nbytes, dict(pre=pre, o=o, out=F.relu(pre))


def build(case, mode):
    """``(kernel name, keyword arguments, minimum bytes)`` of a case."""
    from deepzero_kernels.kernels import BnArgs, ConvArgs, PoolArgs
    pad1 = ConvArgs(padding=(1, 1))  # the 3x3 convs of both networks
    key = (case, mode)
    if key in _CACHE:
        return _CACHE[key]
    _CACHE.clear()
    S = SIZES[mode]
    dev = W.bench_device()
    g = torch.Generator().manual_seed(0)
    b, k = S["batch"], S["k"]
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    if case in ("cnn_chain1", "cnn_chain2", "cnn_chain2_delta"):
        wd, img = S["width"], S["image"]
        x = r(b, 3, img, img)
        w1 = r(wd, 3, 3, 3)
        args, nbytes, st = _conv_source_args(x, w1, k, True, g)
        if case == "cnn_chain1":
            out = ("conv_delta_chain", args, nbytes)
        elif case == "cnn_chain2_delta":
            delta = chain1_output(args)
            w2 = r(wd, wd, 3, 3)
            z2 = F.conv2d(args["pool_base"], w2, None, 1, 1)
            pre2 = F.batch_norm(z2, None, None, None, None, True, 0.0, 1e-5).contiguous()
            x_hat, inv = _bn_stats(z2)
            bw = torch.rand(wd, generator=g).to(dev) + 0.5
            pooled = F.max_pool2d(F.relu(pre2), 2, 2, ceil_mode=True).contiguous()
            dargs = dict(delta=delta, channel=st["o"], weight=w2, conv=pad1,
                         bn=BnArgs.batch(bw, xhat=x_hat, inv_std=inv), relu_base=pre2, pool=PoolArgs(2, 2),
                         pool_base=pooled, global_avg=True)
            hw = delta.shape[2] * delta.shape[3]
            # per item (k, c_out): the delta plane, x_hat and the ReLU input read, the pool base, one mean out
            nbytes = x.element_size() * b * k * (hw + wd * (2 * hw + hw // 4) + wd)
            out = ("conv1ch_delta_chain", dargs, nbytes)
        else:
            delta = chain1_output(args)
            w2 = r(wd, wd, 3, 3)
            z2 = F.conv2d(args["pool_base"], w2, None, 1, 1).contiguous()
            bw, bb = torch.rand(wd, generator=g).to(dev) + 0.5, r(wd)
            cargs = dict(delta=delta, channel=st["o"], weight=w2, base_out=z2, conv=pad1,
                         bn=BnArgs.batch(bw, bias=bb), relu=True, pool=PoolArgs(2, 2), global_avg=True)
            hw = delta.shape[2] * delta.shape[3]
            nbytes = x.element_size() * b * k * (hw + wd * hw + wd)
            out = ("conv1ch_chain", cargs, nbytes)
    elif case in ("resnet_chain1", "resnet_chain2", "resnet_chain2_delta", "bn_dense"):
        c = S["c3"]
        hw = S["image"] // 4
        x = F.relu(r(b, c, hw, hw))
        w1 = r(c, c, 3, 3) / 24
        args, nbytes, st = _conv_source_args(x, w1, k, False, g)
        residual = x
        w2 = r(c, c, 3, 3) / 24
        z2 = F.conv2d(st["out"], w2, None, 1, 1).contiguous()
        bw, bb = torch.rand(c, generator=g).to(dev) + 0.5, r(c)
        if case == "resnet_chain1":
            out = ("conv_delta_chain", args, nbytes)
        elif case == "resnet_chain2_delta":
            delta = chain1_output(args)
            x_hat, inv = _bn_stats(z2)
            dargs = dict(delta=delta, channel=st["o"], weight=w2, conv=pad1,
                         bn=BnArgs.batch(bw, xhat=x_hat, inv_std=inv))
            nbytes = x.element_size() * b * k * (hw * hw + 2 * c * hw * hw)
            out = ("conv1ch_delta_chain", dargs, nbytes)
        elif case == "resnet_chain2":
            delta = chain1_output(args)
            cargs = dict(delta=delta, channel=st["o"], weight=w2, base_out=z2, conv=pad1,
                         bn=BnArgs.batch(bw, bias=bb), residual=residual, relu=True, global_avg=True)
            nbytes = x.element_size() * b * k * (hw * hw + 2 * c * hw * hw + c)
            out = ("conv1ch_chain", cargs, nbytes)
        else:
            vals = (z2[:, None] + 0.1 * r(b, k, c, hw, hw)).contiguous()
            dargs = dict(values=vals, bn=BnArgs.batch(bw, bias=bb), residual=residual, relu=True)
            nbytes = x.element_size() * b * k * c * hw * hw * 3
            out = ("bn_act_dense", dargs, nbytes)
    elif case == "fc_ce":
        feats, n = r(b, S["c3"]), 10
        wfc = r(n, S["c3"]) / 8
        logits = F.linear(feats, wfc).contiguous()
        y = torch.randint(0, n, (b,), generator=g).to(dev)
        idx = torch.arange(wfc.numel(), device=dev)
        out = ("linear_weight_ce", dict(x=feats, logits=logits, target=y, idx=idx, mu=W.MU), 8 * idx.numel() * b)
    else:
        raise KeyError(case)
    _CACHE[key] = out
    return out


def min_flops(name: str, args: dict) -> int:
    """The arithmetic a launch cannot avoid (multiplies and adds; a transcendental counts 1), for
    the roofline next to ``bytes``: per element of the chain's pre-pool plane, the batch-norm
    moments (6), the delta's normalisation (4) and the ReLU/pool (2); a next conv adds 2*kh*kw per
    output element; the cross-entropy change ~10 per (perturbation, sample)."""
    if name == "conv_delta_chain":
        b, k = args["x"].shape[0], args["src_channel"].numel()
        h, w = args["out_size"]
        return 13 * b * k * h * w  # the gather's multiply by mu, then 12 per element
    if name in ("conv1ch_chain", "conv1ch_delta_chain"):
        (b, k, h, w), (c_out, _, kh, kw) = args["delta"].shape, args["weight"].shape
        ho, wo = args["base_out"].shape[2:] if "base_out" in args else (h, w)  # the suite's convs keep the size
        return b * k * c_out * ho * wo * (2 * kh * kw + 12)
    if name == "bn_act_dense":
        return 12 * args["values"].numel()
    if name == "linear_weight_ce":
        return 10 * args["idx"].numel() * args["x"].shape[0]
    raise KeyError(name)


def chain1_output(args):
    """The chain-1 output (the delta the next conv consumes), by the reference backend."""
    from deepzero_kernels import kernels
    return kernels.get("reference").conv_delta_chain(**args).contiguous()


def kernel_backends():
    from deepzero_kernels import kernels
    dev = W.bench_device()
    got = ["reference"] + [b for b, (ok, _) in kernels.available(dev).items() if ok]
    # Triton on a CPU is the interpreter: a correctness tool, not something to time.
    return [b for b in got if not (b == "triton" and dev.type == "cpu")]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_kernel(benchmark, case, backend, mode):
    if not W.engine_available():
        pytest.skip("deepzero_kernels is not importable")
    if backend not in kernel_backends():
        from deepzero_kernels import kernels
        why = "the interpreter is not timed" if backend == "triton" and W.bench_device().type == "cpu" \
            else kernels.available(W.bench_device())[backend][1]
        pytest.skip(f"{backend}: {why}")
    from deepzero_kernels import kernels
    name, args, nbytes = build(case, mode)
    kern = kernels.get(backend)
    fn = getattr(kern, name)
    S = W.SIZES[mode]
    benchmark.group = f"kernels-{case}"

    def run():
        out = fn(**args)
        W.sync()
        return out

    out = benchmark.pedantic(run, rounds=max(S["rounds"], 3) * 3, warmup_rounds=1, iterations=1)
    t = W.median_time(benchmark)
    want = getattr(kernels.get("reference"), name)(**args)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    flops = min_flops(name, args)
    benchmark.extra_info.update(kernel=name, bytes=nbytes, flops=flops)
    k = {"linear_weight_ce": lambda: args["idx"].numel(), "bn_act_dense": lambda: args["values"].shape[1]}.get(
        name, lambda: args["src_channel" if name == "conv_delta_chain" else "channel"].numel())()
    W.REGISTRY.record_kernel(case, backend, kernel=name, time_s=t, bytes=nbytes, flops=flops, k=int(k))
