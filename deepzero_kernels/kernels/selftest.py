"""A quick check of a backend's fused kernels on the device they will run on: each kernel on tiny
random inputs (batch-norm with batch statistics, residual, ReLU, max pool, global average, a
strided padded conv) against the ``reference`` backend (plain torch ops, itself tested against the
perturb-and-forward definition). ``backend="auto"`` runs it once per process, device and backend
on a GPU before it picks a backend, so a miscompiled kernel (a new GPU, a new Triton) is never
used: it warns once, naming the kernel, and falls back to the next backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formulas import conv_weight_coords
from .spec import BnArgs, ConvArgs, PoolArgs

__all__ = ["check_kernels", "kernel_cases"]

_MU = 1e-2
_TOL = {torch.float64: 1e-9, torch.float32: 1e-3}


def _tail(z, residual=None, relu=True, pool=(2, 2)):
    """The base chain after a conv output ``z``: batch-norm statistics, the ReLU's and the pool's
    base values, as the one-channel kernels take them."""
    mean = z.mean((0, 2, 3), keepdim=True)
    inv_std = torch.rsqrt(z.var((0, 2, 3), unbiased=False) + 1e-5)
    w = torch.linspace(0.5, 1.5, z.shape[1], dtype=z.dtype, device=z.device)
    pre = (z - mean) * (inv_std * w).view(1, -1, 1, 1)
    if residual is not None:
        pre = pre + residual
    post = F.max_pool2d(F.relu(pre), *pool, ceil_mode=True) if relu else pre
    return dict(bn=BnArgs.batch(w, xhat=z - mean, inv_std=inv_std), relu_base=pre if relu else None,
                pool=PoolArgs(*pool), pool_base=post)


def kernel_cases(device, dtype=torch.float32, seed: int = 0) -> dict:
    """``{kernel name: keyword arguments}``: one small random call of every fused kernel."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    def ints(hi, n):
        return torch.randint(0, hi, (n,), generator=g).to(device)
    b, c_in, c_out, h, w, k, n_cls, n_in = 3, 3, 4, 7, 6, 5, 6, 9
    x, wt = r(b, c_in, h, w), r(c_out, c_in, 3, 3)
    conv = ConvArgs((2, 2), (1, 1), (1, 1))
    z = F.conv2d(x, wt, None, 2, 1)
    o, c, u, v = conv_weight_coords(wt.shape, ints(wt.numel(), k))
    bn_dense = BnArgs.batch(torch.linspace(0.5, 1.5, c_out, dtype=dtype, device=device), bias=r(c_out))
    delta, channel = r(b, k, h, w) * 0.1, ints(c_in, k)
    feats, wl = r(b, n_in), r(n_cls, n_in)
    logits, target = feats @ wl.t(), ints(n_cls, b)
    residual = r(*z.shape)
    return {
        "conv_delta_chain": dict(x=x, src_channel=c, off_h=u - 1, off_w=v - 1, out_channel=o, mu=_MU, stride=(2, 2),
                                 out_size=tuple(z.shape[2:]), c_out=c_out, **_tail(z)),
        "channel_chain": dict(values=r(b, k, *z.shape[2:]) * 0.1, channel=ints(c_out, k), **_tail(z, residual)),
        "conv1ch_delta_chain": dict(delta=delta, channel=channel, weight=wt, conv=conv, **_tail(z)),
        "conv1ch_chain": dict(delta=delta, channel=channel, weight=wt, base_out=z, conv=conv, bn=bn_dense,
                              residual=residual, relu=True, pool=PoolArgs(2, 2)),
        "bn_act_dense": dict(values=z[:, None] + r(b, k, *z.shape[1:]) * 0.1, bn=bn_dense, residual=residual,
                             relu=True, global_avg=True),
        "linear_weight_ce": dict(x=feats, logits=logits, target=target, idx=ints(wl.numel(), k), mu=_MU),
        "linear_rank1_ce": dict(values=r(b, k) * 0.1, channel=ints(n_in, k), weight=wl, logits=logits, target=target),
        "linear_dense_ce": dict(values=feats[:, None] + r(b, k, n_in) * 0.1, base=feats, weight=wl, logits=logits,
                                target=target),
    }


def check_kernels(kern, ref, device="cpu", dtype=torch.float32) -> dict:
    """Every kernel of ``kern`` (validated :class:`~.validate.Kernels`) against ``ref`` on
    ``device``: ``{kernel: None if it agrees, else what went wrong}`` (see
    :func:`deepzero_kernels.selftest`)."""
    out = {}
    for name, kw in kernel_cases(torch.device(device), dtype).items():
        try:
            got = getattr(kern, name)(**kw)
            want = getattr(ref, name)(**kw)
            scale = max(float(want.abs().max()), 1.0) if want.numel() else 1.0
            err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
            ok = got.shape == want.shape and torch.equal(torch.isnan(got), torch.isnan(want)) \
                and err <= _TOL[dtype] * scale
            out[name] = None if ok else f"differs from the reference by {err:.3g} (shape {tuple(got.shape)})"
        except Exception as e:  # a kernel that cannot even run is what this test is for
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out
