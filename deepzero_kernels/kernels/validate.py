"""Argument validation of the fused kernels, in one place.

One function per kernel takes the typed arguments of the validated entry point
(:class:`deepzero_kernels.kernels.Kernels`), checks every one (dtype, device, contiguity, shape,
index range, numbers) and returns the flat argument tuple of the backends' functions (the
operator schema of ``reference.py``: absent optional tensors become empty tensors, a
:class:`~.spec.BnMode` its int). Bad input is a ``TypeError``/``ValueError`` naming the kernel and
the argument, never a crash in a kernel.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from ..formulas import conv_out_size, pool_out
from .spec import NO_BN, NO_POOL, BnArgs, BnMode, ConvArgs, PoolArgs

__all__ = ["Kernels", "Checker", "trusted_indices", "conv_delta_chain", "channel_chain", "conv1ch_delta_chain", "conv1ch_chain",
           "bn_act_dense",
           "linear_weight_ce", "linear_rank1_ce", "linear_dense_ce"]


_TRUSTED = contextvars.ContextVar("deepzero_trusted_indices", default=False)


@contextlib.contextmanager
def trusted_indices():
    """Within this block the caller vouches that every index tensor it passes is in range, because
    it built them from indices it checked once (the engine, from an estimate's coordinates): the
    range checks, one device sync each on a GPU, are skipped. Shapes, dtypes and devices are still
    checked. Public calls outside it keep every check."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


class Checker:
    """Checks the tensors of one kernel call against a reference tensor (dtype, device)."""

    def __init__(self, kernel: str, ref_name: str, ref: torch.Tensor):
        self.kernel = kernel
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"{kernel}: {ref_name} must be a torch.Tensor, got {type(ref).__name__}")
        if ref.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{kernel}: {ref_name} must be float32 or float64, got {ref.dtype}")
        self.dtype, self.device = ref.dtype, ref.device
        self.tensor(ref_name, ref)

    def fail(self, msg, exc=ValueError):
        raise exc(f"{self.kernel}: {msg}")

    def empty(self) -> torch.Tensor:
        """The empty tensor the backends take for an absent optional tensor."""
        return torch.empty(0, dtype=self.dtype, device=self.device)

    def tensor(self, name, t, shape=None, *, optional=False, dtype=None):
        """``t`` in this call's dtype (or ``dtype``) and device, contiguous, of ``shape`` (``None``
        entries: any size). ``optional``: ``None`` or an empty tensor is allowed and returned as the
        empty tensor."""
        if optional and (t is None or (isinstance(t, torch.Tensor) and t.numel() == 0)):
            return self.empty()
        if not isinstance(t, torch.Tensor):
            self.fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        want = dtype or self.dtype
        if t.dtype != want:
            self.fail(f"{name} must have dtype {want}, got {t.dtype}", TypeError)
        if t.device != self.device:
            self.fail(f"{name} is on {t.device}, expected {self.device}")
        if not t.is_contiguous():
            self.fail(f"{name} must be contiguous")
        if shape is not None:
            if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
                shown = tuple("*" if s is None else s for s in shape)
                self.fail(f"{name} must have shape {shown}, got {tuple(t.shape)}")
        return t

    def index(self, name, t, k, hi):
        self.tensor(name, t, (k,), dtype=torch.int64)
        if k and not _TRUSTED.get():
            lo, top = torch.aminmax(t)
            lo, top = int(lo), int(top)
            if lo < 0 or top >= hi:
                self.fail(f"{name} out of range: values must lie in [0, {hi}), got [{lo}, {top}]")
        return t

    def integer(self, name, v, lo=0):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            self.fail(f"{name} must be an int >= {lo}, got {v!r}")
        return v

    def pair(self, name, v, lo=0) -> tuple[int, int]:
        if isinstance(v, torch.Size) or (isinstance(v, (tuple, list)) and len(v) == 2):
            return self.integer(f"{name}[0]", v[0], lo), self.integer(f"{name}[1]", v[1], lo)
        self.fail(f"{name} must be a pair of ints, got {v!r}", TypeError)

    def number(self, name, v, *, positive=False):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            self.fail(f"{name} must be a finite number, got {v!r}")
        if positive and v <= 0:
            self.fail(f"{name} must be > 0, got {v!r}")
        return float(v)

    def flag(self, name, v) -> bool:
        if not isinstance(v, bool):
            self.fail(f"{name} must be a bool, got {v!r}", TypeError)
        return v

    def bn_mode(self, bn) -> BnMode:
        if not isinstance(bn, BnArgs):
            self.fail(f"bn must be a BnArgs, got {type(bn).__name__}", TypeError)
        try:
            return BnMode(bn.mode)
        except ValueError:
            self.fail(f"bn.mode must be a BnMode (NONE, BATCH or RUNNING), got {bn.mode!r}")

    def pool(self, pool) -> tuple[int, int]:
        if not isinstance(pool, PoolArgs):
            self.fail(f"pool must be a PoolArgs, got {type(pool).__name__}", TypeError)
        k, s = self.integer("pool.k", pool.k), self.integer("pool.s", pool.s)
        if bool(k) != bool(s) or s > max(k, 1):
            self.fail(f"pool.k and pool.s must both be 0 or satisfy 1 <= s <= k, got {k}, {s}")
        return k, s


# ----------------------------------------------------------------------------- one-channel chains
def _channel_tail(ck: Checker, b, c, h, w, bn: BnArgs, relu_base, pool: PoolArgs, pool_base):
    """(bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base) of a
    one-channel chain on a ``(B, C, H, W)`` activation."""
    mode = ck.bn_mode(bn)
    e = ck.empty()
    weight = ck.tensor("bn.weight", bn.weight, (c,)) if mode else e
    xhat = ck.tensor("bn.xhat", bn.xhat, (b, c, h, w)) if mode == BnMode.BATCH else e
    inv_std = ck.tensor("bn.inv_std", bn.inv_std, (c,)) if mode == BnMode.BATCH else e
    relu_base = ck.tensor("relu_base", relu_base, (b, c, h, w), optional=True)
    pk, ps = ck.pool(pool)
    if not pk:
        return int(mode), xhat, inv_std, weight, relu_base, pk, ps, e
    if relu_base.numel() == 0:
        ck.fail("a max pool in the chain needs a ReLU before it (relu_base)")
    ck.tensor("pool_base", pool_base, (b, c, None, None))
    want = (pool_out(h, pk, ps), pool_out(w, pk, ps))
    if tuple(pool_base.shape[2:]) != want:
        ck.fail(f"pool_base has spatial size {tuple(pool_base.shape[2:])} but a {pk}/{ps} pool of {(h, w)} "
                f"gives {want}")
    return int(mode), xhat, inv_std, weight, relu_base, pk, ps, pool_base


def _channels(ck: Checker, b, h, w, bn: BnArgs, relu_base):
    """C of a one-channel chain: from the ReLU's base input, else the BatchNorm's weight."""
    if isinstance(relu_base, torch.Tensor) and relu_base.numel():
        return ck.tensor("relu_base", relu_base, (b, None, h, w)).shape[1]
    if isinstance(bn, BnArgs) and bn.mode and isinstance(bn.weight, torch.Tensor) and bn.weight.dim() == 1:
        return bn.weight.shape[0]
    return None


def channel_chain(values, channel, *, bn: BnArgs = NO_BN, relu_base=None, pool: PoolArgs = NO_POOL,
                  pool_base=None):
    """One-channel deltas ``values`` ``(B, K, H, W)`` of channels ``channel`` ``(K,)`` through
    BatchNorm -> ReLU (``relu_base``: the ReLU's base input ``(B, C, H, W)``) -> max pool
    (``pool_base``: the pool's base output). See ``reference.channel_chain``."""
    ck = Checker("channel_chain", "values", values)
    ck.tensor("values", values, (None, None, None, None))
    b, k, h, w = values.shape
    c = _channels(ck, b, h, w, bn, relu_base)
    if c is None:
        ck.fail("nothing to do: give a BatchNorm (bn) or a ReLU (relu_base)")
    ck.index("channel", channel, k, c)
    return (values, channel) + _channel_tail(ck, b, c, h, w, bn, relu_base, pool, pool_base)


def conv_delta_chain(x, src_channel, off_h, off_w, out_channel, mu, *, stride, out_size, c_out: int,
                     bn: BnArgs = NO_BN, relu_base=None, pool: PoolArgs = NO_POOL, pool_base=None):
    """The conv weight perturbations ``W[out_channel[k], src_channel[k], u, v] += mu`` gathered from
    the unpadded input ``x`` (``off = (u, v) * dilation - padding``), with the output geometry
    ``stride``, ``out_size`` ``(h_out, w_out)`` and ``c_out``, then the chain of
    :func:`channel_chain`. See ``reference.conv_delta_chain``."""
    ck = Checker("conv_delta_chain", "x", x)
    ck.tensor("x", x, (None, None, None, None))
    b, c_in = x.shape[:2]
    sh, sw = ck.pair("stride", stride, 1)
    h_out, w_out = ck.pair("out_size", out_size, 1)
    ck.integer("c_out", c_out, 1)
    k = src_channel.numel() if isinstance(src_channel, torch.Tensor) else 0
    ck.index("src_channel", src_channel, k, c_in)
    ck.index("out_channel", out_channel, k, c_out)
    ck.tensor("off_h", off_h, (k,), dtype=torch.int64)
    ck.tensor("off_w", off_w, (k,), dtype=torch.int64)
    mu = ck.number("mu", mu, positive=True)
    tail = _channel_tail(ck, b, c_out, h_out, w_out, bn, relu_base, pool, pool_base)
    return (x, src_channel, off_h, off_w, out_channel, mu, sh, sw, h_out, w_out) + tail


def _conv1ch_geometry(ck: Checker, delta, channel, weight, conv):
    """Checks of the next conv of one-channel deltas ``delta`` ``(B, K, H, W)`` of input channels
    ``channel``: ``(B, C_out, H_out, W_out, (sh, sw, ph, pw, dh, dw))``."""
    ck.tensor("delta", delta, (None, None, None, None))
    b, k, h, w = delta.shape
    ck.tensor("weight", weight, (None, None, None, None))
    c_out, c_in, kh, kw = weight.shape
    ck.index("channel", channel, k, c_in)
    if not isinstance(conv, ConvArgs):
        ck.fail(f"conv must be a ConvArgs, got {type(conv).__name__}", TypeError)
    (sh, sw), (ph, pw), (dh, dw) = (ck.pair("conv.stride", conv.stride, 1), ck.pair("conv.padding", conv.padding),
                                    ck.pair("conv.dilation", conv.dilation, 1))
    ho, wo = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        ck.fail(f"the convolution has an empty output for input {(h, w)} and kernel {(kh, kw)}")
    return b, c_out, ho, wo, (sh, sw, ph, pw, dh, dw)


def conv1ch_delta_chain(delta, channel, weight, *, conv: ConvArgs = ConvArgs(), bn: BnArgs = NO_BN, relu_base=None,
                        pool: PoolArgs = NO_POOL, pool_base=None, global_avg: bool = False):
    """One-channel deltas ``delta`` ``(B, K, H, W)`` of input channels ``channel`` through the next
    conv (``weight``, geometry ``conv``) and the chain of :func:`channel_chain` on its output
    channels, as deltas, optionally averaged over space. See ``reference.conv1ch_delta_chain``."""
    ck = Checker("conv1ch_delta_chain", "delta", delta)
    b, c_out, ho, wo, geometry = _conv1ch_geometry(ck, delta, channel, weight, conv)
    c = _channels(ck, b, ho, wo, bn, relu_base)
    if c is None:
        ck.fail("nothing to do after the conv: give a BatchNorm (bn) or a ReLU (relu_base)")
    if c != c_out:
        ck.fail(f"the chain after the conv has {c} channels, the conv has {c_out} outputs")
    return (delta, channel, weight) + geometry + _channel_tail(ck, b, c, ho, wo, bn, relu_base, pool, pool_base) + (
        ck.flag("global_avg", global_avg),)


# ----------------------------------------------------------------------------- dense chains
def _dense_tail(ck: Checker, b, c, h, w, bn: BnArgs, residual, relu, pool: PoolArgs, global_avg):
    """(bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg) of a dense
    chain on a ``(B, K, C, H, W)`` batch."""
    mode = ck.bn_mode(bn)
    e = ck.empty()
    weight = ck.tensor("bn.weight", bn.weight, (c,)) if mode else e
    bias = ck.tensor("bn.bias", bn.bias, (c,)) if mode else e
    eps = ck.number("bn.eps", bn.eps, positive=True) if mode == BnMode.BATCH else 1e-5
    residual = ck.tensor("residual", residual, (b, c, h, w), optional=True)
    pk, ps = ck.pool(pool)
    return (int(mode), weight, bias, eps, residual, ck.flag("relu", relu), pk, ps, ck.flag("global_avg", global_avg))


def bn_act_dense(values, *, bn: BnArgs = NO_BN, residual=None, relu: bool = False, pool: PoolArgs = NO_POOL,
                 global_avg: bool = False):
    """Dense perturbed values ``(B, K, C, H, W)`` through BatchNorm -> + ``residual`` -> ReLU ->
    max pool -> global average. See ``reference.bn_act_dense``."""
    ck = Checker("bn_act_dense", "values", values)
    ck.tensor("values", values, (None, None, None, None, None))
    b, _, c, h, w = values.shape
    return (values,) + _dense_tail(ck, b, c, h, w, bn, residual, relu, pool, global_avg)


def conv1ch_chain(delta, channel, weight, base_out, *, conv: ConvArgs = ConvArgs(), bn: BnArgs = NO_BN,
                  residual=None, relu: bool = False, pool: PoolArgs = NO_POOL, global_avg: bool = False):
    """One-channel deltas ``delta`` ``(B, K, H, W)`` of input channels ``channel`` through the next
    conv (``weight``, geometry ``conv``), added to its base output ``base_out``, then the chain of
    :func:`bn_act_dense`. See ``reference.conv1ch_chain``."""
    ck = Checker("conv1ch_chain", "delta", delta)
    b, c_out, ho, wo, geometry = _conv1ch_geometry(ck, delta, channel, weight, conv)
    ck.tensor("base_out", base_out, (b, c_out, ho, wo))
    return (delta, channel, weight) + geometry + (base_out,) + _dense_tail(
        ck, b, c_out, ho, wo, bn, residual, relu, pool, global_avg)


# ----------------------------------------------------------------------------- cross-entropy
def _ce(ck: Checker, logits, target, name, rows):
    ck.tensor("logits", logits, (None, None))
    b, n = logits.shape
    ck.index("target", target, b, n)
    if rows != b:
        ck.fail(f"{name} has {rows} samples but logits has {b}")
    return n


def linear_weight_ce(x, logits, target, idx, mu):
    """Cross-entropy change under ``W.view(-1)[idx[k]] += mu`` of the final linear layer with input
    ``x`` ``(B, N_in)``. See ``reference.linear_weight_ce``."""
    ck = Checker("linear_weight_ce", "x", x)
    ck.tensor("x", x, (None, None))
    n = _ce(ck, logits, target, "x", x.shape[0])
    k = idx.numel() if isinstance(idx, torch.Tensor) else 0
    ck.index("idx", idx, k, n * x.shape[1])
    return x, logits, target, idx, ck.number("mu", mu, positive=True)


def linear_rank1_ce(values, channel, weight, logits, target):
    """Cross-entropy change when input feature ``channel[k]`` of the final linear layer changes by
    ``values[:, k]``. See ``reference.linear_rank1_ce``."""
    ck = Checker("linear_rank1_ce", "values", values)
    ck.tensor("values", values, (None, None))
    n = _ce(ck, logits, target, "values", values.shape[0])
    ck.tensor("weight", weight, (n, None))
    ck.index("channel", channel, values.shape[1], weight.shape[1])
    return values, channel, weight, logits, target


def linear_dense_ce(values, base, weight, logits, target):
    """Cross-entropy change when the final linear layer's input ``base`` becomes ``values[:, k]``.
    See ``reference.linear_dense_ce``."""
    ck = Checker("linear_dense_ce", "values", values)
    ck.tensor("values", values, (None, None, None))
    n = _ce(ck, logits, target, "values", values.shape[0])
    ck.tensor("weight", weight, (n, values.shape[2]))
    ck.tensor("base", base, (values.shape[0], values.shape[2]))
    return values, base, weight, logits, target


# ----------------------------------------------------------------------------- validated entry points
def _entry(name: str):
    check = globals()[name]

    @functools.wraps(check)
    def run(self, *args, **kwargs):
        return getattr(self.impl, name)(*check(*args, **kwargs))
    return run


class Kernels:
    """The validated entry points of one backend's kernels: each method checks its arguments (the
    function of the same name in this module, whose signature and documentation it has) and calls
    the backend's implementation with the flat arguments (semantics: ``reference.py``)."""

    def __init__(self, name: str, impl):
        self.name, self.impl = name, impl

    def __repr__(self):
        return f"Kernels({self.name!r})"

    conv_delta_chain = _entry("conv_delta_chain")
    channel_chain = _entry("channel_chain")
    conv1ch_delta_chain = _entry("conv1ch_delta_chain")
    conv1ch_chain = _entry("conv1ch_chain")
    bn_act_dense = _entry("bn_act_dense")
    linear_weight_ce = _entry("linear_weight_ce")
    linear_rank1_ce = _entry("linear_rank1_ce")
    linear_dense_ce = _entry("linear_dense_ce")
