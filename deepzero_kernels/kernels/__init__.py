"""Fused-kernel backends of the perturbation ops, behind one validated interface.

``reference`` (torch) defines what each kernel computes; ``triton`` (GPU, or CPU under
``TRITON_INTERPRET=1``) and ``native`` (the ``deepzero_kernels._native`` extension built from
``csrc/``: OpenMP on CPU, CUDA on GPU) implement the same functions with the same arguments.
:func:`get` returns a :class:`Kernels` object whose methods validate every argument (dtype,
device, contiguity, shape, index range) before a kernel sees it, so bad input is a Python
exception, never a crash.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import reference

__all__ = ["Kernels", "available", "get", "KERNEL_NAMES"]

KERNEL_NAMES = tuple(reference.__all__)


# ----------------------------------------------------------------------------- availability
def _try_native():
    try:
        return importlib.import_module("deepzero_kernels._native"), None
    except ImportError as e:
        return None, f"the native extension is not built ({e}); build it with `pip install --no-build-isolation -e .`"


def _try_triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return None, f"triton is not installed ({e})"
    try:
        return importlib.import_module("deepzero_kernels.kernels.triton_backend"), None
    except ImportError as e:
        return None, f"the triton kernels failed to import ({e})"


def available(device: torch.device | str | None = None) -> dict:
    """``{"triton": (ok, reason), "native": (ok, reason)}`` for ``device`` (default CPU)."""
    device = torch.device(device or "cpu")
    out = {}
    mod, why = _try_native()
    if mod is not None and device.type == "cuda" and not mod.has_cuda():
        mod, why = None, "the native extension was built without CUDA (torch had no CUDA at build time)"
    elif mod is not None and device.type not in ("cpu", "cuda"):
        mod, why = None, f"the native extension has no kernels for {device.type}"
    out["native"] = (mod is not None, why or ("OpenMP CPU kernels" if device.type == "cpu" else "CUDA kernels"))
    mod, why = _try_triton()
    if mod is not None and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        mod, why = None, "triton runs on CPU only under TRITON_INTERPRET=1 (the slow interpreter, for tests)"
    elif mod is not None and device.type == "cuda" and not torch.cuda.is_available():
        mod, why = None, "CUDA is not available"
    elif mod is not None and device.type not in ("cpu", "cuda"):
        mod, why = None, f"triton has no kernels for {device.type}"
    out["triton"] = (mod is not None, why or ("GPU kernels" if device.type == "cuda" else "CPU interpreter"))
    return out


def get(backend: str) -> "Kernels":
    """The validated kernels of ``backend`` ('torch', 'triton' or 'native')."""
    if backend == "torch":
        return Kernels("torch", reference)
    if backend == "native":
        mod, why = _try_native()
    elif backend == "triton":
        mod, why = _try_triton()
    else:
        raise ValueError(f"unknown kernel backend {backend!r}")
    if mod is None:
        raise ValueError(f"backend={backend!r} is not available: {why}")
    return Kernels(backend, mod)


# ----------------------------------------------------------------------------- validation
class _Checker:
    """Checks the tensors of one kernel call against a reference tensor (dtype, device)."""

    def __init__(self, kernel: str, ref_name: str, ref: torch.Tensor):
        self.kernel = kernel
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"{kernel}: {ref_name} must be a torch.Tensor, got {type(ref).__name__}")
        if ref.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{kernel}: {ref_name} must be float32 or float64, got {ref.dtype}")
        self.dtype, self.device = ref.dtype, ref.device
        self.tensor(ref_name, ref)

    def absent_as_empty(self, *ts):
        """Optional tensors given as None become the empty tensors the kernels take for "absent"."""
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        return tuple(empty if t is None else t for t in ts)

    def fail(self, msg, exc=ValueError):
        raise exc(f"{self.kernel}: {msg}")

    def tensor(self, name, t, shape=None, *, optional=False, dtype=None):
        if not isinstance(t, torch.Tensor):
            self.fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        if optional and t.numel() == 0:
            return t
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
        if k and (int(t.min()) < 0 or int(t.max()) >= hi):
            self.fail(f"{name} out of range: values must lie in [0, {hi}), got [{int(t.min())}, {int(t.max())}]")
        return t

    def integer(self, name, v, lo=0):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            self.fail(f"{name} must be an int >= {lo}, got {v!r}")
        return v

    def number(self, name, v, *, positive=False):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            self.fail(f"{name} must be a finite number, got {v!r}")
        if positive and v <= 0:
            self.fail(f"{name} must be > 0, got {v!r}")
        return float(v)

    def bn(self, mode, c, weight, xhat=None, inv_std=None, bias=None, xhat_shape=None):
        if mode not in (0, 1, 2):
            self.fail(f"bn_mode must be 0, 1 or 2, got {mode!r}")
        if mode:
            self.tensor("bn_weight", weight, (c,))
            if bias is not None:
                self.tensor("bn_bias", bias, (c,))
        if mode == 1 and xhat is not None:
            self.tensor("bn_xhat", xhat, xhat_shape)
            self.tensor("bn_inv_std", inv_std, (c,))

    def pool(self, pool_k, pool_s):
        self.integer("pool_k", pool_k)
        self.integer("pool_s", pool_s)
        if bool(pool_k) != bool(pool_s) or pool_s > max(pool_k, 1):
            self.fail(f"pool_k and pool_s must both be 0 or satisfy 1 <= pool_s <= pool_k, got {pool_k}, {pool_s}")


class Kernels:
    """Validated entry points of one backend's kernels (see ``reference`` for the semantics)."""

    def __init__(self, name: str, impl):
        self.name, self.impl = name, impl

    def __repr__(self):
        return f"Kernels({self.name!r})"

    def _chain_checks(self, ck, b, c, h, w, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                      pool_k, pool_s, pool_base):
        ck.bn(bn_mode, c, bn_weight, bn_xhat, bn_inv_std, xhat_shape=(b, c, h, w))
        ck.tensor("relu_base", relu_base, (b, c, h, w), optional=True)
        ck.pool(pool_k, pool_s)
        if pool_k:
            if relu_base.numel() == 0:
                ck.fail("a max pool in the chain needs a ReLU before it (relu_base)")
            ck.tensor("pool_base", pool_base, (b, c, None, None))
            hp, wp = pool_base.shape[2:]
            if hp != reference.pool_out(h, pool_k, pool_s) or wp != reference.pool_out(w, pool_k, pool_s):
                ck.fail(f"pool_base has spatial size {(hp, wp)} but a {pool_k}/{pool_s} pool of {(h, w)} "
                        f"gives {(reference.pool_out(h, pool_k, pool_s), reference.pool_out(w, pool_k, pool_s))}")

    def channel_chain(self, values, channel, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                      pool_k=0, pool_s=0, pool_base=None):
        ck = _Checker("channel_chain", "values", values)
        bn_xhat, bn_inv_std, bn_weight, relu_base, pool_base = ck.absent_as_empty(
            bn_xhat, bn_inv_std, bn_weight, relu_base, pool_base)
        ck.tensor("values", values, (None, None, None, None))
        b, k, h, w = values.shape
        c = relu_base.shape[1] if relu_base.numel() else bn_weight.shape[0] if bn_mode else None
        if c is None:
            ck.fail("nothing to do: give a BatchNorm (bn_mode 1/2) or a ReLU (relu_base)")
        ck.index("channel", channel, k, c)
        self._chain_checks(ck, b, c, h, w, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                           pool_k, pool_s, pool_base)
        return self.impl.channel_chain(values, channel, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                                       pool_k, pool_s, pool_base)

    def conv_delta_chain(self, x, src_channel, off_h, off_w, out_channel, mu, stride_h, stride_w, h_out, w_out,
                         c_out, bn_mode=0, bn_xhat=None, bn_inv_std=None, bn_weight=None, relu_base=None,
                         pool_k=0, pool_s=0, pool_base=None):
        ck = _Checker("conv_delta_chain", "x", x)
        bn_xhat, bn_inv_std, bn_weight, relu_base, pool_base = ck.absent_as_empty(
            bn_xhat, bn_inv_std, bn_weight, relu_base, pool_base)
        ck.tensor("x", x, (None, None, None, None))
        b, c_in = x.shape[:2]
        for name, v in (("stride_h", stride_h), ("stride_w", stride_w), ("h_out", h_out), ("w_out", w_out),
                        ("c_out", c_out)):
            ck.integer(name, v, 1)
        k = src_channel.numel() if isinstance(src_channel, torch.Tensor) else 0
        ck.index("src_channel", src_channel, k, c_in)
        ck.index("out_channel", out_channel, k, c_out)
        ck.tensor("off_h", off_h, (k,), dtype=torch.int64)
        ck.tensor("off_w", off_w, (k,), dtype=torch.int64)
        mu = ck.number("mu", mu, positive=True)
        self._chain_checks(ck, b, c_out, h_out, w_out, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                           pool_k, pool_s, pool_base)
        return self.impl.conv_delta_chain(x, src_channel, off_h, off_w, out_channel, mu, stride_h, stride_w,
                                          h_out, w_out, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                                          pool_k, pool_s, pool_base)

    def _dense_checks(self, ck, b, c, h, w, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s,
                      global_avg):
        ck.bn(bn_mode, c, bn_weight, bias=bn_bias)
        if bn_mode == 1:
            ck.number("eps", eps, positive=True)
        ck.tensor("residual", residual, (b, c, h, w), optional=True)
        ck.pool(pool_k, pool_s)
        if not isinstance(relu, bool) or not isinstance(global_avg, bool):
            ck.fail("relu and global_avg must be bools", TypeError)

    def bn_act_dense(self, values, bn_mode, bn_weight=None, bn_bias=None, eps=1e-5, residual=None, relu=False,
                     pool_k=0, pool_s=0, global_avg=False):
        ck = _Checker("bn_act_dense", "values", values)
        bn_weight, bn_bias, residual = ck.absent_as_empty(bn_weight, bn_bias, residual)
        ck.tensor("values", values, (None, None, None, None, None))
        b, k, c, h, w = values.shape
        self._dense_checks(ck, b, c, h, w, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s,
                           global_avg)
        return self.impl.bn_act_dense(values, bn_mode, bn_weight, bn_bias, float(eps), residual, relu,
                                      pool_k, pool_s, global_avg)

    def conv1ch_chain(self, delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, base_out,
                      bn_mode=0, bn_weight=None, bn_bias=None, eps=1e-5, residual=None, relu=False,
                      pool_k=0, pool_s=0, global_avg=False):
        ck = _Checker("conv1ch_chain", "delta", delta)
        bn_weight, bn_bias, residual = ck.absent_as_empty(bn_weight, bn_bias, residual)
        ck.tensor("delta", delta, (None, None, None, None))
        b, k, h, w = delta.shape
        ck.tensor("weight", weight, (None, None, None, None))
        c_out, c_in, kh, kw = weight.shape
        ck.index("channel", channel, k, c_in)
        for name, v, lo in (("stride_h", stride_h, 1), ("stride_w", stride_w, 1), ("pad_h", pad_h, 0),
                            ("pad_w", pad_w, 0), ("dil_h", dil_h, 1), ("dil_w", dil_w, 1)):
            ck.integer(name, v, lo)
        ho = (h + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
        wo = (w + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
        if ho < 1 or wo < 1:
            ck.fail(f"the convolution has an empty output for input {(h, w)} and kernel {(kh, kw)}")
        ck.tensor("base_out", base_out, (b, c_out, ho, wo))
        self._dense_checks(ck, b, c_out, ho, wo, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s,
                           global_avg)
        return self.impl.conv1ch_chain(delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                       base_out, bn_mode, bn_weight, bn_bias, float(eps), residual, relu,
                                       pool_k, pool_s, global_avg)

    def _ce_checks(self, ck, logits, target):
        ck.tensor("logits", logits, (None, None))
        b, n = logits.shape
        ck.index("target", target, b, n)
        return b, n

    def linear_weight_ce(self, x, logits, target, idx, mu):
        ck = _Checker("linear_weight_ce", "x", x)
        ck.tensor("x", x, (None, None))
        b, n = self._ce_checks(ck, logits, target)
        if x.shape[0] != b:
            ck.fail(f"x has {x.shape[0]} samples but logits has {b}")
        k = idx.numel() if isinstance(idx, torch.Tensor) else 0
        ck.index("idx", idx, k, n * x.shape[1])
        return self.impl.linear_weight_ce(x, logits, target, idx, ck.number("mu", mu, positive=True))

    def linear_rank1_ce(self, values, channel, weight, logits, target):
        ck = _Checker("linear_rank1_ce", "values", values)
        ck.tensor("values", values, (None, None))
        b, n = self._ce_checks(ck, logits, target)
        ck.tensor("weight", weight, (n, None))
        if values.shape[0] != b:
            ck.fail(f"values has {values.shape[0]} samples but logits has {b}")
        ck.index("channel", channel, values.shape[1], weight.shape[1])
        return self.impl.linear_rank1_ce(values, channel, weight, logits, target)

    def linear_dense_ce(self, values, base, weight, logits, target):
        ck = _Checker("linear_dense_ce", "values", values)
        ck.tensor("values", values, (None, None, None))
        b, n = self._ce_checks(ck, logits, target)
        ck.tensor("weight", weight, (n, values.shape[2]))
        ck.tensor("base", base, (b, values.shape[2]))
        if values.shape[0] != b:
            ck.fail(f"values has {values.shape[0]} samples but logits has {b}")
        return self.impl.linear_dense_ce(values, base, weight, logits, target)
