"""Native vs torch backend on the fused chains at the benchmark suite's standard sizes (batch 64).

    python csrc/bench_chains.py [--threads 2] [--k 64 160] [--reps 3] [--dtype float32]

Prints the median time of each backend and the speedups (of medians, of minima), per workload and K. The chains:
App. B CNN first layer (conv_delta_chain: 3->16 3x3 pad 1 on 32x32, BN batch stats, ReLU, max pool 2
ceil), App. B CNN second layer (conv1ch_chain: 16->16 on 16x16 deltas, BN, ReLU, pool 2, global avg)
and ResNet-20's last stage (conv1ch_chain: 64->64 on 8x8 deltas, BN, residual, ReLU, global avg).
"""
import argparse
import statistics
import time

import torch

from deepzero_kernels import kernels


def cnn_first_layer(k, dtype, g):
    b, c_in, h, c_out = 64, 3, 32, 16
    x = torch.randn(b, c_in, h, h, generator=g, dtype=dtype)
    z = torch.randn(b, c_out, h, h, generator=g, dtype=dtype)
    xhat = (z - z.mean((0, 2, 3), keepdim=True)).contiguous()
    inv = torch.rsqrt(z.var((0, 2, 3), unbiased=False) + 1e-5)
    bn_w = torch.rand(c_out, generator=g, dtype=dtype) + 0.5
    pre = torch.randn(b, c_out, h, h, generator=g, dtype=dtype)
    pool_base = torch.nn.functional.max_pool2d(pre.clamp_min(0), 2, 2, ceil_mode=True).contiguous()
    src, outc = torch.randint(0, c_in, (k,), generator=g), torch.randint(0, c_out, (k,), generator=g)
    off = torch.randint(-1, 2, (2, k), generator=g)
    args = (x, src, off[0].clone(), off[1].clone(), outc, 5e-3, 1, 1, h, h, c_out, 1, xhat, inv, bn_w, pre, 2, 2,
            pool_base)
    return "conv_delta_chain", args


def conv1ch(k, dtype, g, *, c, h, pool, residual):
    b = 64
    delta = torch.randn(b, k, h, h, generator=g, dtype=dtype) * 1e-3
    weight = torch.randn(c, c, 3, 3, generator=g, dtype=dtype)
    base = torch.randn(b, c, h, h, generator=g, dtype=dtype)
    bn_w, bn_b = torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, generator=g, dtype=dtype)
    res = torch.randn(b, c, h, h, generator=g, dtype=dtype) if residual else torch.empty(0, dtype=dtype)
    channel = torch.randint(0, c, (k,), generator=g)
    return "conv1ch_chain", (delta, channel, weight, 1, 1, 1, 1, 1, 1, base, 1, bn_w, bn_b, 1e-5, res, True,
                             2 if pool else 0, 2 if pool else 0, True)


WORKLOADS = {
    "cnn_layer1 (conv_delta_chain)": cnn_first_layer,
    "cnn_layer2 (conv1ch_chain)": lambda k, d, g: conv1ch(k, d, g, c=16, h=16, pool=True, residual=False),
    "resnet20_stage3 (conv1ch_chain)": lambda k, d, g: conv1ch(k, d, g, c=64, h=8, pool=False, residual=True),
}


def times(fns, reps, inner):
    """Per-call wall times of each fn, interleaved rep by rep so that both backends see the same
    load (other processes may share the cores)."""
    for fn in fns:
        fn()  # warm-up
    out = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, out):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            ts.append((time.perf_counter() - t0) / inner)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, nargs="+", default=[64, 160])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    nat, ref = kernels.get("native"), kernels.get("torch")
    print(f"threads={a.threads} dtype={a.dtype}")
    for name, make in WORKLOADS.items():
        for k in a.k:
            kern, args = make(k, dtype, torch.Generator().manual_seed(k))
            out_n, out_t = getattr(nat, kern)(*args), getattr(ref, kern)(*args)
            err = ((out_n - out_t).abs().max() / out_t.abs().max()).item()
            tn, tt = times([lambda: getattr(nat, kern)(*args), lambda: getattr(ref, kern)(*args)], a.reps, a.inner)
            mn, mt = statistics.median(tn), statistics.median(tt)
            print(f"{name:34s} K={k:4d}  torch {mt * 1e3:8.2f} ms  native {mn * 1e3:7.2f} ms  "
                  f"speedup {mt / mn:5.1f}x (of minima {min(tt) / min(tn):5.1f}x)  max rel diff {err:.1e}")

if __name__ == "__main__":
    main()
