"""Conformance matrix of the fused kernels: target (backend x device) x kernel x case x dtype.

Targets: ``reference`` (the torch composition in ``kernels/reference.py``), ``native`` with each CPU
instruction set (AVX2 where the CPU has it, and the baseline), ``triton`` in its CPU interpreter
(``TRITON_INTERPRET=1``, set by conftest.py), and on a machine with a GPU the CUDA targets. Every
kernel runs one list of cases (odd sizes, 1x1, ceil-mode borders, stride/dilation 2, padding 0/1/2,
K=1, B=1, several channel blocks, dominant logits) in float32 and float64, and is checked by one
rule, :func:`assert_matches`:

* against the reference backend on the same arguments (float32 within 1e-5, float64 within 1e-11
  of the output's scale);
* in float64, against the naive definition: perturb, run the layers with plain torch ops and
  subtract (it shares no code with ``reference.py``).

The Triton interpreter is slow: the cases marked for it run by default, the others under
``-m slow``. Then: the fused chains through the engine (launches counted through the engine's
``kernels`` injection point) against the naive CGE loop, input validation, the native operators
(dispatcher, fake implementations and ``torch.compile``, direct calls, threads) and the registry.
"""
from __future__ import annotations

import collections
import importlib
import warnings
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deepzero_kernels as dz
from deepzero_kernels import formulas, kernels, models, ops
from deepzero_kernels.kernels import BnArgs, BnMode, ConvArgs, PoolArgs, reference, validate

from conftest import naive_cge, rel_err

# The interpreter evaluates both sides of tl.where: the overflow/log(0) lanes of the CE fallback warn.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}
TOL_NAIVE = 1e-9  # float64 against the naive loop, which subtracts two forward passes
MU = 3e-3


def assert_matches(out, want, tol, floor=0.0):
    """``out`` equals ``want`` in shape and dtype and within ``tol`` of its scale: the largest
    ``|want|``, at least ``floor`` (the inputs' scale: an output that is zero in exact arithmetic
    is rounding noise of that size)."""
    assert out.shape == want.shape and out.dtype == want.dtype, (out.shape, want.shape, out.dtype, want.dtype)
    scale = max(want.abs().max().item() if want.numel() else 0.0, floor, 1e-30)
    torch.testing.assert_close(out, want.to(out.device), rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    backend: str        # kernel backend: reference, native or triton
    device: str = "cpu"
    isa: str = "auto"   # native CPU kernels: auto (AVX2 where the CPU has it) or baseline

    def __str__(self):
        return self.backend + ("-baseline" if self.isa != "auto" else "") + ("-cuda" if self.device == "cuda" else "")

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device == "cpu"


TARGETS = [Target("reference"), Target("native"), Target("native", isa="baseline"), Target("triton")]
if torch.cuda.is_available():
    TARGETS += [Target("native", "cuda"), Target("triton", "cuda")]


@pytest.fixture
def use(request):
    """``use(target)``: the target's validated kernels (skip when it is not available here); the
    native CPU kernels run with the target's instruction set for the rest of the test."""
    isa = []

    def get(t: Target):
        if t.backend != "reference":
            ok, why = kernels.available(t.device)[t.backend]
            if not ok:
                pytest.skip(f"{t}: {why}")
        if t.backend == "native" and t.device == "cpu":
            mod = importlib.import_module("deepzero_kernels._native")
            mod.set_cpu_isa(t.isa)
            isa.append(mod)
        return kernels.get(t.backend)
    yield get
    for mod in isa:
        mod.set_cpu_isa("auto")


def matrix(cases, kernel=""):
    """Parameters (target, case, dtype); the interpreter runs the cases marked for ``kernel`` by
    default and the others under the slow marker."""
    out = []
    for t in TARGETS:
        for c in cases:
            for dt in DTYPES if t.backend != "reference" else [torch.float64]:  # the reference defines float32
                slow = t.interpreted and kernel not in c.tri
                out.append(pytest.param(t, c, dt, id=f"{t}-{case_id(c)}-{str(dt)[-7:]}",
                                        marks=[pytest.mark.slow] if slow else []))
    return out


def case_id(c) -> str:
    def short(v):
        if isinstance(v, bool):
            return "T" if v else "F"
        if isinstance(v, BnMode):
            return v.name.lower()
        if isinstance(v, tuple):
            return "x".join(map(str, v))
        return str(v)
    return "-".join(short(v) for k, v in c._asdict().items() if k != "tri")


def gen(case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def to(t, target: Target, dtype):
    return t.to(device=target.device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()


def dev_args(args: dict, target, dtype):
    """The kernel's keyword arguments on the target's device, floating tensors in ``dtype``."""
    def conv(v):
        if isinstance(v, torch.Tensor):
            return to(v, target, dtype)
        if isinstance(v, BnArgs):
            return BnArgs(v.mode, *(None if t is None else to(t, target, dtype)
                                    for t in (v.weight, v.bias, v.xhat, v.inv_std)), v.eps)
        return v
    return {k: conv(v) for k, v in args.items()}


def poison_free_cuda_memory(device) -> None:
    """Fill the CUDA caching allocator's free memory with all-ones bytes (NaN in float32 and
    float64), so that a kernel output taken from it (``at::empty``) shows every element the kernel
    leaves unwritten instead of a stale, possibly correct, value. The allocator serves a request
    from its best-fitting free block: releasing the cache, then filling blocks of every size class
    from 512 B to 64 MiB, three of each (they take the free gaps of live segments first), leaves
    almost only poisoned blocks to serve from."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    held = [torch.full((1 << shift,), 255, dtype=torch.uint8, device=device)
            for shift in range(9, 27) for _ in range(3)]
    del held


def conforms(kern, target, name, args, naive, dtype, floor=0.0, tol=None):
    """The matrix's rule: kernel ``name`` of the target on ``args`` (moved to the target's device and
    ``dtype``) matches the reference backend on the same arguments and, in float64, the naive
    definition ``naive``. On a GPU the output's memory is poisoned beforehand. Returns the output."""
    a = dev_args(args, target, dtype)
    if target.device == "cuda":
        poison_free_cuda_memory(target.device)
    out = getattr(kern, name)(**a)
    if target.backend != "reference":
        assert_matches(out, getattr(kernels.get("reference"), name)(**a), tol or TOL[dtype], floor)
    if dtype == torch.float64:
        assert_matches(out, naive, max(TOL_NAIVE, tol or 0.0), floor)
    return out


# ----------------------------------------------------------------------------- naive definitions
B = BnMode.BATCH
R = BnMode.RUNNING
N0 = BnMode.NONE


def tail_forward(z, bn, bn_w, bn_b, residual, relu, pool, gap=False):
    """BatchNorm (batch statistics of ``z`` itself, or the running affine) -> + residual -> ReLU ->
    ceil-mode max pool -> global average, with plain torch ops."""
    if bn == B:  # (F.batch_norm refuses a batch of one 1x1 plane)
        mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
        z = (z - mean) / torch.sqrt(var + 1e-5) * bn_w.view(1, -1, 1, 1) + bn_b.view(1, -1, 1, 1)
    elif bn == R:
        z = z * bn_w.view(1, -1, 1, 1) + bn_b.view(1, -1, 1, 1)
    if residual is not None:
        z = z + residual
    if relu:
        z = F.relu(z)
    if pool[0]:
        z = F.max_pool2d(z, pool[0], pool[1], ceil_mode=True)
    return z.mean((2, 3)) if gap else z


def channel_tail_args(z, bn, bn_w, bn_b, residual, relu, pool):
    """The one-channel chain's arguments for the base pre-BatchNorm activation ``z``."""
    if bn == B:
        bn_args = BnArgs.batch(bn_w, xhat=z - z.mean((0, 2, 3), keepdim=True),
                               inv_std=torch.rsqrt(z.var((0, 2, 3), unbiased=False) + 1e-5))
    else:
        bn_args = BnArgs.running(bn_w) if bn == R else BnArgs()
    pre = tail_forward(z, bn, bn_w, bn_b, residual, False, (0, 0))
    return dict(bn=bn_args, relu_base=pre if relu else None, pool=PoolArgs(*pool),
                pool_base=tail_forward(z, bn, bn_w, bn_b, residual, relu, pool) if pool[0] else None)


def bn_gain(case_bn, inv_std, bn_w):
    """The BatchNorm's largest gain (the scale of its output's rounding noise per unit of input)."""
    return (inv_std * bn_w).abs().max().item() if case_bn == B else bn_w.abs().max().item() if case_bn == R else 1.0


# ----------------------------------------------------------------------------- conv_delta_chain
# A case of each list: its shapes and chain; ``tri`` names the kernels whose Triton-interpreter run of the
# case is in the default suite (one letter each; "" = only under the slow marker).
ConvCase = collections.namedtuple("ConvCase", "b c_in h w c_out kh kw stride pad dil bn relu pool k tri",
                                  defaults=("t",))


CONV_CASES = [
    ConvCase(4, 3, 8, 8, 5, 3, 3, 1, 1, 1, B, True, (2, 2), 7),
    ConvCase(3, 2, 7, 5, 4, 3, 3, 2, 1, 1, B, True, (2, 2), 5),      # odd sizes, stride 2, ceil borders
    ConvCase(2, 3, 9, 9, 3, 3, 3, 1, 2, 2, R, True, (3, 2), 6),      # dilation 2, pad 2, overlapping pool
    ConvCase(5, 4, 6, 6, 6, 1, 1, 1, 0, 1, B, False, (0, 0), 4),     # 1x1 conv, no ReLU
    ConvCase(1, 2, 5, 5, 3, 3, 3, 1, 0, 1, N0, True, (0, 0), 3),     # B=1, pad 0, no BN
    ConvCase(3, 3, 1, 1, 2, 1, 1, 1, 0, 1, B, True, (0, 0), 2),      # 1x1 spatial
    ConvCase(2, 3, 5, 7, 3, 2, 3, 2, 2, 2, B, True, (3, 3), 1, ""),  # K=1, non-square kernel, clipped 3x3 pool
    ConvCase(3, 1, 6, 9, 7, 3, 3, 1, 1, 1, R, False, (0, 0), 9, ""),  # running-stat BN only
    ConvCase(2, 2, 11, 11, 3, 3, 3, 2, 2, 1, B, True, (2, 1), 13, ""),  # pool stride 1; K >= 2*threads path
    ConvCase(2, 2, 4, 4, 3, 3, 3, 1, 1, 1, N0, False, (0, 0), 3, ""),  # delta only (no chain)
    ConvCase(2, 3, 7, 6, 5, 3, 3, 1, 1, 1, B, True, (3, 2), 4),
    ConvCase(1, 2, 5, 5, 3, 3, 3, 2, 0, 1, R, True, (0, 0), 1),
    ConvCase(2, 3, 9, 7, 4, 3, 3, 2, 2, 2, B, False, (0, 0), 3),
    ConvCase(3, 4, 4, 4, 6, 1, 1, 1, 0, 1, N0, True, (2, 2), 5),
    ConvCase(8, 3, 10, 10, 6, 3, 3, 1, 1, 1, B, True, (2, 2), 5),    # App. B-like, float32 at scale
]


def conv_case(case: ConvCase):
    """Keyword arguments of conv_delta_chain for K random weights of a real conv -> chain, and the
    naive change: the chain's output with the perturbed weight minus the base one, channel o."""
    g = gen(case)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, wt = r(case.b, case.c_in, case.h, case.w), r(case.c_out, case.c_in, case.kh, case.kw)
    bn_w, bn_b = torch.rand(case.c_out, generator=g, dtype=torch.float64) + 0.5, r(case.c_out)
    geo = (case.stride, case.pad, case.dil)
    z = F.conv2d(x, wt, None, *geo)
    idx = torch.randint(0, wt.numel(), (case.k,), generator=g)
    o, c, u, v = formulas.conv_weight_coords(wt.shape, idx)
    tail = (case.bn, bn_w, bn_b, None, case.relu, case.pool)
    args = dict(x=x, src_channel=c, off_h=u * case.dil - case.pad, off_w=v * case.dil - case.pad, out_channel=o,
                mu=MU, stride=(case.stride,) * 2, out_size=z.shape[2:], c_out=case.c_out,
                **channel_tail_args(z, *tail))
    base = tail_forward(z, *tail)
    naive = []
    for k in range(case.k):
        w2 = wt.clone()
        w2.view(-1)[idx[k]] += MU
        diff = tail_forward(F.conv2d(x, w2, None, *geo), *tail) - base
        others = torch.ones(case.c_out, dtype=torch.bool)
        others[o[k]] = False
        assert diff[:, others].abs().max() < 1e-12  # only one channel changes
        naive.append(diff[:, o[k]])
    floor = MU * x.abs().max().item() * bn_gain(case.bn, args["bn"].inv_std, bn_w)
    return args, torch.stack(naive, 1), floor


@pytest.mark.parametrize("target,case,dtype", matrix(CONV_CASES, "t"))
def test_conv_delta_chain(use, target, case, dtype):
    args, naive, floor = conv_case(case)
    conforms(use(target), target, "conv_delta_chain", args, naive, dtype, floor)


# ----------------------------------------------------------------------------- channel_chain
ChannelCase = collections.namedtuple("ChannelCase", "b k c h w bn residual relu pool tri", defaults=("t",))


CHANNEL_CASES = [
    ChannelCase(3, 4, 5, 7, 6, B, True, True, (2, 2)),        # BN -> + residual -> ReLU -> pool
    ChannelCase(2, 3, 5, 8, 7, B, False, True, (3, 2)),       # ceil-mode borders, B*H*W > block
    ChannelCase(1, 1, 3, 1, 1, R, False, True, (0, 0)),       # 1x1, K=1, B=1
    ChannelCase(3, 4, 6, 6, 5, N0, False, True, (2, 2)),
    ChannelCase(2, 5, 7, 5, 5, B, False, False, (0, 0)),
    ChannelCase(2, 3, 4, 3, 3, R, False, False, (0, 0)),
    ChannelCase(1, 2, 3, 5, 5, B, False, True, (3, 3)),
    ChannelCase(3, 5, 4, 7, 6, B, False, True, (2, 2), ""),
    ChannelCase(1, 1, 3, 1, 1, B, False, True, (0, 0), ""),  # a batch of one 1x1 plane: gain 1/sqrt(eps)
    ChannelCase(2, 6, 5, 9, 8, R, False, True, (3, 2), ""),
    ChannelCase(4, 3, 2, 5, 5, N0, True, True, (2, 2), ""),
    ChannelCase(2, 11, 6, 3, 5, B, False, True, (2, 2), ""),
]


def channel_case(case: ChannelCase):
    g = gen(case)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    z = r(case.b, case.c, case.h, case.w)
    bn_w, bn_b = torch.rand(case.c, generator=g, dtype=torch.float64) + 0.5, r(case.c)
    residual = r(case.b, case.c, case.h, case.w) if case.residual else None
    values, channel = r(case.b, case.k, case.h, case.w) * 0.1, torch.randint(0, case.c, (case.k,), generator=g)
    tail = (case.bn, bn_w, bn_b, residual, case.relu, case.pool)
    args = dict(values=values, channel=channel, **channel_tail_args(z, *tail))
    base = tail_forward(z, *tail)
    naive = []
    for k in range(case.k):
        zk = z.clone()
        zk[:, channel[k]] += values[:, k]
        naive.append((tail_forward(zk, *tail) - base)[:, channel[k]])
    return args, torch.stack(naive, 1), 0.1 * bn_gain(case.bn, args["bn"].inv_std, bn_w)


@pytest.mark.parametrize("target,case,dtype", matrix(CHANNEL_CASES, "t"))
def test_channel_chain(use, target, case, dtype):
    args, naive, floor = channel_case(case)
    conforms(use(target), target, "channel_chain", args, naive, dtype, floor)


# ----------------------------------------------------------------------------- conv1ch_chain, bn_act_dense
# tri: c = conv1ch_chain, d = bn_act_dense
DenseCase = collections.namedtuple("DenseCase", "b k c_in h w c_out kh kw stride pad dil bn residual relu pool gap tri",
                                   defaults=("cd",))


def _dc(b, k, c_in, h, w, c_out, kh, kw, st, pad, dil, bn, res, relu, pool, gap, tri="cd"):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    return DenseCase(b, k, c_in, h, w, c_out, kh, kw, pair(st), pair(pad), pair(dil), bn, res, relu, pool, gap, tri)


def _bn_only(b, k, c, h, w, bn, res, relu, pool, gap):
    """A bn_act_dense case (values of shape (B, K, C, H, W)): made by a 1x1 convolution."""
    return _dc(b, k, 2, h, w, c, 1, 1, 1, 0, 1, bn, res, relu, pool, gap, "d")


DENSE_CASES = [
    _dc(4, 3, 3, 8, 8, 5, 3, 3, 1, 1, 1, B, True, True, (0, 0), True),     # ResNet block tail
    _dc(3, 4, 4, 8, 8, 3, 3, 3, 1, 1, 1, B, False, True, (2, 2), True),    # App. B CNN tail
    _dc(2, 5, 3, 7, 5, 4, 3, 3, 2, 1, 1, R, False, True, (2, 2), False),   # stride 2, odd sizes
    _dc(3, 2, 2, 6, 6, 3, 3, 3, 1, 2, 2, B, True, False, (0, 0), False),   # dilation 2, pad 2
    _dc(1, 1, 2, 4, 4, 2, 1, 1, 1, 0, 1, B, False, True, (3, 2), False),   # B=1, K=1, 1x1 conv
    _dc(2, 3, 3, 5, 9, 7, 2, 3, 1, 0, 1, N0, True, True, (3, 3), True, ""),   # no BN, clipped pool
    _dc(2, 6, 5, 1, 1, 3, 1, 1, 1, 0, 1, B, False, True, (0, 0), False, ""),  # 1x1 spatial
    _dc(3, 2, 2, 9, 7, 4, 3, 3, 2, 2, 2, B, True, True, (2, 1), False, ""),   # stride 2 + dilation 2
    _dc(2, 3, 3, 9, 6, 4, 3, 2, (2, 1), (1, 2), (1, 2), B, False, True, (2, 2), False, ""),  # asymmetric
    _dc(8, 5, 6, 5, 5, 4, 3, 3, 1, 1, 1, B, False, True, (2, 2), True, "c"),  # App. B-like, float32 at scale
    _dc(2, 2, 4, 6, 7, 3, 3, 3, 1, 1, 1, B, True, True, (3, 2), False, "c"),
    _dc(1, 1, 2, 5, 5, 3, 3, 3, 2, 0, 1, R, False, True, (0, 0), True, "c"),
    _dc(2, 2, 3, 7, 6, 3, 3, 3, 1, 2, 2, B, False, True, (2, 2), False, "c"),
    _dc(3, 2, 3, 4, 4, 4, 1, 1, 2, 0, 1, N0, True, False, (0, 0), False, "c"),
    _dc(2, 3, 2, 1, 1, 3, 3, 3, 1, 1, 1, B, True, True, (0, 0), True, "c"),   # 1x1 spatial, 3x3 kernel
    _dc(2, 2, 3, 5, 6, 3, 3, 1, 1, 1, 1, B, False, True, (0, 0), False, "c"),
    _dc(2, 2, 3, 4, 3, 11, 3, 3, 1, 1, 1, B, False, True, (2, 2), False, "c"),  # several channel blocks
    _dc(2, 3, 2, 6, 6, 2, 5, 5, 1, 2, 1, B, False, True, (0, 0), True, ""),   # 5x5 taps
    _bn_only(2, 3, 5, 7, 6, B, True, True, (3, 2), False),
    _bn_only(2, 2, 3, 5, 5, B, False, True, (2, 2), True),
    _bn_only(1, 1, 1, 1, 1, R, True, True, (0, 0), True),
    _bn_only(3, 2, 4, 4, 4, N0, False, False, (0, 0), False),
    _bn_only(2, 3, 6, 8, 8, B, True, True, (0, 0), True),
    _bn_only(1, 2, 3, 3, 3, B, False, False, (0, 0), False),
    _bn_only(2, 2, 11, 3, 4, B, True, True, (2, 1), True),   # several channel blocks
]


def dense_case(case: DenseCase):
    """conv1ch_chain's keyword arguments, the perturbed values bn_act_dense takes for the same
    chain, and the naive output: the block run on the input with channel ch[k] changed by delta."""
    g = gen(case)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, wt = r(case.b, case.c_in, case.h, case.w), r(case.c_out, case.c_in, case.kh, case.kw)
    geo = (case.stride, case.pad, case.dil)
    z = F.conv2d(x, wt, None, *geo)
    bn_w, bn_b = torch.rand(case.c_out, generator=g, dtype=torch.float64) + 0.5, r(case.c_out)
    residual = r(*z.shape) if case.residual else None
    delta, channel = r(case.b, case.k, case.h, case.w), torch.randint(0, case.c_in, (case.k,), generator=g)
    bn_args = BnArgs.batch(bn_w, bias=bn_b) if case.bn == B else BnArgs.running(bn_w, bn_b) if case.bn == R \
        else BnArgs()
    tail = dict(bn=bn_args, residual=residual, relu=case.relu, pool=PoolArgs(*case.pool), global_avg=case.gap)
    conv = dict(delta=delta, channel=channel, weight=wt, base_out=z, conv=ConvArgs(*geo), **tail)
    values = torch.stack([z + F.conv2d(torch.zeros_like(x).index_copy(1, channel[k:k + 1], delta[:, k:k + 1]),
                                       wt, None, *geo) for k in range(case.k)], 1)
    naive = []
    for k in range(case.k):
        xk = x.clone()
        xk[:, channel[k]] += delta[:, k]
        naive.append(tail_forward(F.conv2d(xk, wt, None, *geo), case.bn, bn_w, bn_b, residual, case.relu,
                                  case.pool, case.gap))
    return conv, dict(values=values, **tail), torch.stack(naive, 1)


@pytest.mark.parametrize("target,case,dtype", matrix(DENSE_CASES, "c"))
def test_conv1ch_chain(use, target, case, dtype):
    conv, _, naive = dense_case(case)
    conforms(use(target), target, "conv1ch_chain", conv, naive, dtype)


def conv1ch_delta_case(case: DenseCase):
    """conv1ch_delta_chain's keyword arguments and the naive change of the block's output (spatially
    averaged in the cases with ``gap``) when input channel ch[k] changes by delta."""
    g = gen(case)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, wt = r(case.b, case.c_in, case.h, case.w), r(case.c_out, case.c_in, case.kh, case.kw)
    geo = (case.stride, case.pad, case.dil)
    z = F.conv2d(x, wt, None, *geo)
    bn_w, bn_b = torch.rand(case.c_out, generator=g, dtype=torch.float64) + 0.5, r(case.c_out)
    residual = r(*z.shape) if case.residual else None
    delta, channel = r(case.b, case.k, case.h, case.w) * 0.1, torch.randint(0, case.c_in, (case.k,), generator=g)
    tail = (case.bn, bn_w, bn_b, residual, case.relu, case.pool)
    args = dict(delta=delta, channel=channel, weight=wt, conv=ConvArgs(*geo), global_avg=case.gap,
                **channel_tail_args(z, *tail))
    base = tail_forward(z, *tail, gap=case.gap)
    naive = []
    for k in range(case.k):
        xk = x.clone()
        xk[:, channel[k]] += delta[:, k]
        naive.append(tail_forward(F.conv2d(xk, wt, None, *geo), *tail, gap=case.gap) - base)
    naive = torch.stack(naive, 1)
    return args, naive[..., None, None] if case.gap else naive, bn_gain(case.bn, args["bn"].inv_std, bn_w)


@pytest.mark.parametrize("target,case,dtype", matrix([c for c in DENSE_CASES if c.bn != N0 or c.relu], "c"))
def test_conv1ch_delta_chain(use, target, case, dtype):
    args, naive, floor = conv1ch_delta_case(case)
    conforms(use(target), target, "conv1ch_delta_chain", args, naive, dtype, floor)


@pytest.mark.parametrize("target,case,dtype", matrix(DENSE_CASES, "d"))
def test_bn_act_dense(use, target, case, dtype):
    _, dense, naive = dense_case(case)
    conforms(use(target), target, "bn_act_dense", dense, naive, dtype)


# ----------------------------------------------------------------------------- cross-entropy
# dominant: p rounds to 1 and the change is large and negative (the logsumexp fallback); tri: t = the three
CeCase = collections.namedtuple("CeCase", "b n_in n k dominant tri", defaults=("t",))


CE_CASES = [
    CeCase(6, 5, 4, 9, False),
    CeCase(1, 3, 2, 1, False),
    CeCase(3, 5, 37, 20, False),
    CeCase(4, 20, 10, 7, True),
    CeCase(17, 33, 10, 40, False, ""),
]
CE_KERNELS = ["linear_weight_ce", "linear_rank1_ce", "linear_dense_ce"]


def ce_case(case: CeCase, kernel: str):
    """The kernel's keyword arguments and the naive change: cross-entropy of the perturbed layer
    minus the base one, per sample (float64)."""
    g = gen(case)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, wt, bias = r(case.b, case.n_in), r(case.n, case.n_in), r(case.n) * 2
    y = torch.randint(0, case.n, (case.b,), generator=g)
    if case.dominant:  # logit 0 dominates: p rounds to 1
        bias[0] = 60.0
    logits = F.linear(x, wt, bias)

    def loss(feats, weight):
        return F.cross_entropy(F.linear(feats, weight, bias), y, reduction="none")
    base = loss(x, wt)
    if kernel == "linear_weight_ce":
        # dominant: features ~1e3 make logits of +-1e3 (p is 0 or 1) and changes of +-500
        xs, mu = (x * 1e3, 0.5) if case.dominant else (x, MU)
        idx = torch.randint(0, wt.numel(), (case.k,), generator=g)
        if case.dominant:
            idx[:2] = torch.tensor([0, case.n_in])  # coordinates on logits 0 and 1
        base = loss(xs, wt)
        naive = [loss(xs, wt + mu * F.one_hot(idx[k], wt.numel()).double().view_as(wt)) - base for k in range(case.k)]
        return dict(x=xs, logits=F.linear(xs, wt, bias), target=y, idx=idx, mu=mu), torch.stack(naive)
    if kernel == "linear_rank1_ce":
        values = r(case.b, case.k) * (300 if case.dominant else 0.1)
        channel = torch.randint(0, case.n_in, (case.k,), generator=g)
        naive = [loss(x.index_add(1, channel[k:k + 1], values[:, k:k + 1]), wt) - base for k in range(case.k)]
        return dict(values=values, channel=channel, weight=wt, logits=logits, target=y), torch.stack(naive)
    values = x[:, None] + r(case.b, case.k, case.n_in) * (100 if case.dominant else 0.05)
    naive = [loss(values[:, k], wt) - base for k in range(case.k)]
    return dict(values=values, base=x, weight=wt, logits=logits, target=y), torch.stack(naive)


def ce_tol(dtype, case):
    # p within 1e-9 of 1 and delta << 0: log1p(p * expm1(d)) amplifies one ulp of expm1 by 1/(1-p);
    # torch's own expm1 is not correctly rounded there, so the backends agree only to ~1e-8.
    return 1e-7 if case.dominant and dtype == torch.float64 else None


@pytest.mark.parametrize("kernel", CE_KERNELS)
@pytest.mark.parametrize("target,case,dtype", matrix(CE_CASES, "t"))
def test_cross_entropy(use, kernel, target, case, dtype):
    args, naive = ce_case(case, kernel)
    out = conforms(use(target), target, kernel, args, naive, dtype, 1e-3, ce_tol(dtype, case))
    assert out.dtype == torch.float64 and out.shape == (naive.shape[0], case.b)


@pytest.mark.parametrize("target", [pytest.param(t, id=str(t), marks=[pytest.mark.slow] if t.interpreted else [])
                                    for t in TARGETS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_logsumexp_fallback(use, target, dtype):
    """p_i rounds to 1 and the change is hugely negative: log1p(-1) = -inf, the logsumexp form is finite."""
    kern, ref = use(target), kernels.get("reference")
    t = lambda v: torch.tensor(v, dtype=dtype, device=target.device)  # noqa: E731
    logits, target_ = t([[60.0, 0.0, -3.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 2], device=target.device)
    weight = t([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    cases = {"linear_weight_ce": (t([[-1000.0, 1.0], [2.0, 0.5]]), logits, target_,
                                  torch.tensor([0, 1, 5], device=target.device), 1.0),
             "linear_rank1_ce": (t([[-900.0], [0.1]]), torch.tensor([0], device=target.device), weight, logits,
                                 target_),
             "linear_dense_ce": (t([[[-900.0, 0.0]], [[0.1, 0.2]]]), t([[0.0, 0.0], [0.0, 0.0]]), weight, logits,
                                 target_)}
    for name, args in cases.items():
        out = getattr(kern, name)(*args)
        assert torch.isfinite(out).all(), name
        assert_matches(out, getattr(ref, name)(*args), TOL[dtype], 1e-3)


# ----------------------------------------------------------------------------- through the engine
ENGINE_BACKENDS = ["reference", "native", "triton"]


def _with_kernels(est, name):
    """Run ``est``'s fused chains on kernel backend ``name`` through the engine's ``kernels``
    injection point; returns the launch counts."""
    if name != "reference" and not kernels.available("cpu")[name][0]:
        pytest.skip(f"{name}: {kernels.available('cpu')[name][1]}")
    kern = kernels.get(name)
    calls = collections.Counter()

    class Counting:  # counts launches, so a test sees that the chains really matched
        def __getattr__(self, attr):
            fn = getattr(kern, attr)

            def call(*a, **kw):
                calls[attr] += 1
                return fn(*a, **kw)
            return call

    est.engine.kernels = Counting()
    return calls


MODELS = {
    "cnn": lambda: (models.SimpleCNN(3, 10, depth=2, width=5), (4, 3, 9, 9)),
    "resnet": lambda: (models.CifarResNet(1, widths=(4, 6, 8)), (3, 3, 8, 8)),
    "resnet_B": lambda: (models.CifarResNet(1, widths=(3, 5, 6), option="B"), (2, 3, 8, 8)),
}

# Triton's interpreter takes minutes for a ResNet: one CNN case covers its chains on CPU.
ENGINE_CASES = [(b, m, mode) for b in ENGINE_BACKENDS for m in MODELS for mode in ("train", "eval")
                if b != "triton" or (m == "cnn" and mode == "train")]


@pytest.mark.parametrize("backend,model_name,mode", ENGINE_CASES)
def test_cge_with_fused_chains_matches_naive_loop(backend, model_name, mode):
    model, shape = MODELS[model_name]()
    model = model.double()
    getattr(model, mode)()
    if mode == "eval":
        for name, buf in model.named_buffers():
            if buf.dtype.is_floating_point:
                buf.uniform_(0.5, 1.5) if "var" in name else buf.normal_()
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, 10, (shape[0],))
    cge = dz.CGE(model, mu=1e-4, chunk_size=3)
    calls = _with_kernels(cge, backend)
    est = cge.estimate(x, y)
    assert not cge.engine.fallback_counts
    assert rel_err(est, naive_cge(model, x, y, 1e-4)) < 1e-8
    # The engine carries deltas (issue 14): conv1ch_delta_chain after a one-channel delta, channel_chain
    # over K*C channels for dense deltas; bn_act_dense (perturbed values) is a public op the engine
    # does not use.
    used = {"conv_delta_chain", "conv1ch_delta_chain", "linear_weight_ce", "linear_dense_ce", "channel_chain"}
    if model_name == "cnn":
        used |= {"linear_rank1_ce"}
    assert used <= set(calls), f"kernels never launched: {used - set(calls)}"


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_cge_float32_with_backend_close_to_float64_naive(backend):
    # Deltas all the way to the loss (max pools included): float32 keeps float64's digits.
    model = models.SimpleCNN(3, 10, depth=2, width=5)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    cge = dz.CGE(model, mu=5e-3, backend="torch")
    if backend != "torch":
        _with_kernels(cge, backend)
    est = cge.estimate(x, y)
    ref_est = naive_cge(model.double(), x.double(), y, 5e-3)
    assert rel_err(est, ref_est) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("kw", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2),
                                dict(stride=1, padding="same", groups=2), dict(stride=(2, 1), padding=(0, 1))])
def test_public_conv_op_with_each_backend(backend, kw):
    ok, why = ops.backends()[backend]
    if not ok:
        pytest.skip(f"{backend}: {why}")
    g = torch.Generator().manual_seed(6)
    groups = kw.get("groups", 1)
    x = torch.randn(3, 4, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    idx = torch.randperm(w.numel(), generator=g)[:5]
    out = ops.conv2d_perturbed(x, w, bias, idx, 0.01, backend=backend, **kw)
    for k in range(5):
        w2 = w.clone()
        w2.view(-1)[idx[k]] += 0.01
        torch.testing.assert_close(out[k], F.conv2d(x, w2, bias, **kw), atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("target", [pytest.param(t, id=str(t)) for t in TARGETS if t.device == "cpu"
                                    and t.isa == "auto"])
def test_bad_inputs_raise_clear_errors(use, target):
    """Every backend's entry points reject bad input with the kernel and argument named, before a
    kernel runs."""
    kern = use(target)
    x = torch.randn(2, 3, 5, 5)
    i = torch.tensor([0, 1])
    z = torch.zeros(2, dtype=torch.long)
    geo = dict(stride=(1, 1), out_size=(5, 5), c_out=4)
    kern.conv_delta_chain(x, i, z, z, i, 0.1, **geo)  # the plain gather is valid
    bad = [
        (TypeError, "x must be float32 or float64", lambda: kern.conv_delta_chain(x.half(), i, z, z, i, 0.1, **geo)),
        (ValueError, "x must be contiguous", lambda: kern.conv_delta_chain(x.transpose(2, 3), i, z, z, i, 0.1, **geo)),
        (ValueError, "src_channel out of range",
         lambda: kern.conv_delta_chain(x, torch.tensor([0, 3]), z, z, i, 0.1, **geo)),
        (TypeError, "src_channel must have dtype torch.int64",
         lambda: kern.conv_delta_chain(x, i.int(), z, z, i, 0.1, **geo)),
        (ValueError, "mu must be > 0", lambda: kern.conv_delta_chain(x, i, z, z, i, 0.0, **geo)),
        (ValueError, "mu must be a finite", lambda: kern.conv_delta_chain(x, i, z, z, i, float("nan"), **geo)),
        (ValueError, "stride", lambda: kern.conv_delta_chain(x, i, z, z, i, 0.1, stride=(0, 1), out_size=(5, 5),
                                                             c_out=4)),
        (TypeError, "bn.weight must have dtype", lambda: kern.conv_delta_chain(
            x, i, z, z, i, 0.1, **geo, bn=BnArgs.running(torch.ones(4, dtype=torch.float64)))),
        (TypeError, "bn.xhat must be a torch.Tensor, got NoneType", lambda: kern.conv_delta_chain(
            x, i, z, z, i, 0.1, **geo, bn=BnArgs.batch(torch.ones(4), inv_std=torch.ones(4)))),
        (ValueError, "bn.mode must be a BnMode", lambda: kern.conv_delta_chain(x, i, z, z, i, 0.1, **geo,
                                                                                bn=BnArgs(3, torch.ones(4)))),
        (TypeError, "bn must be a BnArgs", lambda: kern.conv_delta_chain(x, i, z, z, i, 0.1, **geo, bn=2)),
        (ValueError, "relu_base must have shape", lambda: kern.conv_delta_chain(
            x, i, z, z, i, 0.1, **geo, relu_base=torch.zeros(2, 4, 5, 4))),
        (ValueError, "needs a ReLU", lambda: kern.conv_delta_chain(
            x, i, z, z, i, 0.1, **geo, pool=PoolArgs(2, 2), pool_base=torch.zeros(2, 4, 3, 3))),
        (ValueError, "pool.k and pool.s", lambda: kern.conv_delta_chain(
            x, i, z, z, i, 0.1, **geo, relu_base=torch.zeros(2, 4, 5, 5), pool=PoolArgs(2, 3))),
        (ValueError, "pool_base has spatial size", lambda: kern.conv_delta_chain(
            x, i, z, z, i, 0.1, **geo, relu_base=torch.zeros(2, 4, 5, 5), pool=PoolArgs(2, 2),
            pool_base=torch.zeros(2, 4, 2, 2))),
    ]
    vals, relu_base, ch = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), torch.zeros(3, dtype=torch.int64)
    logits, y = torch.randn(2, 4), torch.tensor([0, 4])
    bad += [
        (ValueError, "contiguous", lambda: kern.channel_chain(vals.transpose(2, 3), ch, relu_base=relu_base)),
        (TypeError, "dtype", lambda: kern.channel_chain(vals, ch, relu_base=relu_base.double())),
        (ValueError, "channel out of range", lambda: kern.channel_chain(vals, ch + 5, relu_base=relu_base)),
        (ValueError, "nothing to do", lambda: kern.channel_chain(vals, ch)),
        (ValueError, "target out of range", lambda: kern.linear_weight_ce(torch.randn(2, 3), logits, y, i, 0.1)),
        (ValueError, "base must have shape", lambda: kern.linear_dense_ce(
            torch.randn(2, 2, 3), torch.randn(3, 3), torch.randn(4, 3), logits, torch.tensor([0, 1]))),
        (ValueError, "has 3 samples but logits has 2", lambda: kern.linear_rank1_ce(
            torch.randn(3, 2), i, torch.randn(4, 3), logits, torch.tensor([0, 1]))),
        (ValueError, "bn.eps must be > 0", lambda: kern.bn_act_dense(
            torch.randn(2, 1, 3, 2, 2), bn=BnArgs.batch(torch.ones(3), bias=torch.zeros(3), eps=0.0))),
        (TypeError, "relu must be a bool", lambda: kern.bn_act_dense(torch.randn(2, 1, 3, 2, 2), relu=1)),
        (ValueError, "empty output", lambda: kern.conv1ch_chain(
            torch.randn(2, 1, 2, 2), torch.tensor([0]), torch.randn(3, 2, 3, 3), torch.randn(2, 3, 1, 1))),
        (ValueError, "base_out must have shape", lambda: kern.conv1ch_chain(
            torch.randn(2, 1, 4, 4), torch.tensor([0]), torch.randn(3, 2, 3, 3), torch.randn(2, 3, 4, 4))),
        (TypeError, "conv must be a ConvArgs", lambda: kern.conv1ch_chain(
            torch.randn(2, 1, 4, 4), torch.tensor([0]), torch.randn(3, 2, 3, 3), torch.randn(2, 3, 2, 2), conv=1)),
    ]
    for exc, msg, call in bad:
        with pytest.raises(exc, match=msg):
            call()


# ----------------------------------------------------------------------------- the native operators
def _native():
    ok, why = kernels.available("cpu")["native"]
    if not ok:
        pytest.skip(f"native: {why}")
    kernels.get("native")  # registers the fake implementations
    return importlib.import_module("deepzero_kernels._native"), torch.ops.deepzero


def _op_cases():
    """``(name, flat args, reference output)`` of each operator on a small case."""
    out = []
    for name, (args, _) in {"conv_delta_chain": conv_case(CONV_CASES[0])[:2],
                            "channel_chain": channel_case(CHANNEL_CASES[0])[:2],
                            "conv1ch_chain": dense_case(DENSE_CASES[0])[::2],
                            "conv1ch_delta_chain": conv1ch_delta_case(DENSE_CASES[1])[:2],
                            "bn_act_dense": dense_case(DENSE_CASES[1])[1:]}.items():
        a = dev_args(args, Target("native"), torch.float32)
        out.append((name, getattr(validate, name)(**a)))
    for name in CE_KERNELS:
        a = dev_args(ce_case(CE_CASES[0], name)[0], Target("native"), torch.float32)
        out.append((name, getattr(validate, name)(**a)))
    return [(name, flat, getattr(reference, name)(*flat)) for name, flat in out]


def test_native_operators_compile_and_match_reference():
    """torch.compile (aot_eager: fake tensors, functionalization) traces a function calling each
    operator in one graph; its result equals the reference. torch.library.opcheck checks the
    schema, the fake implementation and the dispatch of each one."""
    _, ops_ = _native()
    for name, flat, want in _op_cases():
        op = getattr(ops_, name)
        fn = torch.compile(lambda *a, _op=op: _op(*a) * 2.0, backend="aot_eager", fullgraph=True)
        assert_matches(fn(*flat), 2.0 * want, 1e-5, 1e-3)
        torch.library.opcheck(op.default, flat, test_utils=("test_schema", "test_faketensor"))


def test_native_operators_on_meta_tensors_give_shapes():
    """The dispatcher sends meta tensors to the fake implementations: the output shape, no kernel."""
    _, ops_ = _native()
    for name, flat, want in _op_cases():
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in flat]
        out = getattr(ops_, name)(*meta)
        assert out.device.type == "meta" and out.shape == want.shape and out.dtype == want.dtype, name


def test_native_direct_calls_are_checked():
    """The operators check their own arguments: a bad direct call is a RuntimeError, never a crash."""
    mod, op = _native()
    x = torch.randn(2, 3, 4, 4)
    e = x.new_empty(0)
    ch = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="out of range"):
        op.channel_chain(x[:, :2].contiguous(), torch.tensor([0, 7]), 2, e, e, torch.ones(3), e, 0, 0, e)
    with pytest.raises(RuntimeError, match="contiguous"):
        op.channel_chain(x.transpose(2, 3), ch, 2, e, e, torch.ones(3), e, 0, 0, e)
    with pytest.raises(RuntimeError, match="dtype"):
        op.channel_chain(x, ch, 2, e, e, torch.ones(3, dtype=torch.float64), e, 0, 0, e)
    with pytest.raises(RuntimeError, match="needs a ReLU"):
        op.channel_chain(x, ch, 2, e, e, torch.ones(3), e, 2, 2, e)
    with pytest.raises(RuntimeError, match="pool_base"):
        op.channel_chain(x, ch, 0, e, e, e, torch.randn(2, 3, 4, 4), 2, 2, torch.randn(2, 3, 3, 3))
    with pytest.raises(RuntimeError, match=r"bn_mode must be 0 \(none\), 1 \(batch statistics\) or 2"):
        op.channel_chain(x, ch, 3, e, e, torch.ones(3), e, 0, 0, e)
    with pytest.raises(RuntimeError, match="base_out"):
        op.conv1ch_chain(x[:, :2].contiguous(), ch, torch.randn(5, 3, 3, 3), 1, 1, 1, 1, 1, 1,
                         torch.randn(2, 5, 3, 3), 0, e, e, 1e-5, e, True, 0, 0, False)
    with pytest.raises(RuntimeError, match="empty output"):
        op.conv1ch_chain(torch.randn(2, 1, 2, 2), torch.tensor([0]), torch.randn(3, 2, 3, 3), 1, 1, 0, 0, 1, 1,
                         torch.randn(2, 3, 1, 1), 0, e, e, 1e-5, e, True, 0, 0, False)
    with pytest.raises(RuntimeError, match="target"):
        op.linear_weight_ce(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 4]), torch.tensor([1]), 0.1)
    with pytest.raises(RuntimeError, match="eps"):
        op.bn_act_dense(torch.randn(2, 1, 3, 2, 2), 1, torch.ones(3), torch.zeros(3), 0.0, e, True, 0, 0, False)
    if not mod.has_cuda() and torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="CUDA"):
            op.linear_weight_ce(torch.randn(2, 3, device="cuda"), torch.randn(2, 4, device="cuda"),
                                torch.tensor([0, 1], device="cuda"), torch.tensor([1], device="cuda"), 0.1)


def test_native_has_cuda_matches_build():
    mod, op = _native()
    assert mod.has_cuda() in (True, False)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("deepzero::channel_chain", "CUDA") == mod.has_cuda()
    if mod.has_cuda():
        assert torch.version.cuda is not None


@pytest.mark.parametrize("isa", ["auto", "baseline"])
@pytest.mark.parametrize("k", [3, 9])  # both work splits: (k, b) items for few perturbations, k items else
def test_native_results_do_not_depend_on_thread_count(use, isa, k):
    kern = use(Target("native", isa=isa))
    case = ConvCase(4, 2, 8, 8, 3, 3, 3, 1, 1, 1, B, True, (2, 2), k)
    args = dev_args(conv_case(case)[0], Target("native"), torch.float32)
    cargs = dev_args(channel_case(ChannelCase(4, k, 3, 8, 8, B, False, True, (2, 2)))[0], Target("native"),
                     torch.float32)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs += [kern.conv_delta_chain(**args), kern.channel_chain(**cargs)]
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(outs[i % 2], o) for i, o in enumerate(outs))


# ----------------------------------------------------------------------------- the registry
def test_backends_report_and_auto_never_fails():
    rep = ops.backends()
    assert set(rep) == {"torch", "native", "triton"}
    for ok, why in rep.values():
        assert isinstance(ok, bool) and why
    assert ops.resolve_backend("auto") in ("torch", "native")
    assert kernels.resolve("torch", "cpu") == "torch"
    for name, (ok, _) in rep.items():
        if not ok:
            with pytest.raises(ValueError, match="not available"):
                dz.CGE(nn.Linear(2, 2), backend=name)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("cuda")


def test_registry_get_and_priority():
    assert kernels.get("reference").impl is reference
    assert set(kernels.BACKENDS) == {"native", "triton", "reference"}
    assert kernels.PRIORITY == ("native", "triton")
    assert kernels.BACKENDS["triton"].auto_devices == ("cuda",)  # the interpreter is never picked by auto
    with pytest.raises(ValueError, match="'torch' runs the per-node rules"):
        kernels.get("torch")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.get("cuda")
    ok, why = kernels.BACKENDS["native"].available("meta")
    assert not ok and "meta" in why


def test_auto_warns_once_per_device_when_falling_back(monkeypatch):
    """backend='auto' without a usable native backend falls back to torch, saying so once."""
    native = kernels.BACKENDS["native"]
    monkeypatch.setattr(native, "available", lambda device=None, jit=True: (False, "not built (test)"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
        assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    msgs = [str(m.message) for m in w if "falls back" in str(m.message)]
    assert len(msgs) == 1 and "native: not built (test)." in msgs[0]


def test_triton_interpreter_available_on_cpu():
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("not running under the interpreter")
    ok, why = kernels.available("cpu")["triton"]
    if "not installed" in why:
        pytest.skip(why)
    assert ok, why


def test_cuda_targets():
    if not torch.cuda.is_available():
        pytest.skip("no GPU: the matrix has no CUDA targets here")
    assert any(t.device == "cuda" for t in TARGETS)


def test_kernels_package_is_a_leaf():
    """kernels/ imports nothing of deepzero_kernels but formulas (the rest imports it, not the
    reverse): a new backend or kernel never pulls in the engine."""
    import ast
    import pathlib
    outside = set()
    for path in pathlib.Path(kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:  # from .. import x, from ..x import y
                outside.add(node.module or ",".join(a.name for a in node.names))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("deepzero_kernels"):
                outside.add(node.module)
            elif isinstance(node, ast.Import):
                outside |= {a.name for a in node.names if a.name.startswith("deepzero_kernels")}
    assert outside <= {"formulas"}, outside


def test_triton_max_pool_propagates_nan_like_torch():
    """Issue 16 item 10: tl.maximum drops NaN by default; torch's max-pool keeps it."""
    if "triton" not in ops.backends():
        pytest.skip("triton backend not available")
    kern = kernels.get("triton")
    v = torch.randn(2, 1, 3, 4, 4, dtype=torch.float64)
    v[1, 0, 2, 1, 3] = float("nan")
    got = kern.bn_act_dense(v, pool=PoolArgs(2, 2))
    want = kernels.get("reference").bn_act_dense(v, pool=PoolArgs(2, 2))
    assert torch.isnan(got[1, 0, 2, 0, 1]) and torch.isnan(want[1, 0, 2, 0, 1])
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_triton_autotune_key_buckets_k():
    """Issue 16 item 6: configs are keyed on K's power of two, not K itself and not without K."""
    if "triton" not in ops.backends():
        pytest.skip("triton backend not available")
    from deepzero_kernels.kernels import triton_backend as T
    assert [T._k_bucket(k) for k in (0, 1, 2, 3, 64, 65, 1400, 10 ** 6)] == [1, 1, 2, 4, 64, 128, 2048, 4096]
    for kernel in (T._chain_kernel, T._dense_kernel, T._weight_ce_kernel, T._rank1_ce_kernel, T._dense_ce_kernel):
        assert "KB" in kernel.keys and "K" not in kernel.keys, kernel


def test_selftest_passes_and_catches_a_wrong_kernel(monkeypatch):
    """Issue 16: selftest(backend, device) against the reference; a backend with a wrong kernel is
    skipped by backend='auto' (once per process and device, one warning naming the kernel)."""
    from deepzero_kernels.kernels import registry
    if "native" not in ops.backends():
        pytest.skip("native backend not built")
    for dtype in (torch.float32, torch.float64):
        assert set(dz.selftest("native", "cpu", dtype).values()) == {None}
    impl = kernels.get("native").impl

    class Broken:
        def __getattr__(self, name):
            return getattr(impl, name)

        def linear_rank1_ce(self, *args):
            return impl.linear_rank1_ce(*args) * 1.01
    monkeypatch.setattr(registry.BACKENDS["native"], "load", lambda jit=True: (Broken(), None))
    report = registry.selftest("native", "cpu")
    assert report["linear_rank1_ce"] and "differs" in report["linear_rank1_ce"]
    assert sum(v is not None for v in report.values()) == 1
    monkeypatch.setattr(registry, "SELFTEST_DEVICES", ("cpu",))
    monkeypatch.setattr(registry, "_selftests", {})
    with pytest.warns(UserWarning, match="native backend failed its selftest.*linear_rank1_ce"):
        assert registry.resolve("auto", "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: no second selftest, no second warning about it
        assert not registry._passes_selftest("native", torch.device("cpu"))[0]
