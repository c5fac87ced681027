"""Precision, owned by the engine rather than by torch's global flags.

On NVIDIA GPUs PyTorch runs float32 convolutions in TF32 by default (a 10-bit mantissa). A
difference of two nearly equal float32 losses computed that way keeps no digits. The engine
therefore runs every *value* computation (the base pass, the eager reference, every nonlinear
delta rule, the functional fallback) in full float32 (:func:`full_fp32`), and only the linear
maps applied to *deltas* (conv, linear, matmul of a delta: ``L(x + d) - L(x) = L(d)``) in the
precision the user chose with ``delta_precision``:

* ``"fp32"`` (default): full float32;
* ``"tf32"``: TF32 tensor cores where the device has them (a relative rounding of ~5e-4 *of the
  delta*, never of the activations);
* ``"bf16"``: the delta and the weight cast to bfloat16 (~4e-3 of the delta).

Float64 models ignore the option.

The base values the deltas are taken around matter as much: a float32 base pass rounds every
activation, the rounding compounds through the layers, and a finite difference of a
BatchNorm network is sensitive to its base point (a ResNet-18's CGE estimate moves by ~5e-4
relative). ``base_precision="fp64"`` (default) therefore recomputes the base pass in float64 and
rounds each cached value once to the model's dtype (one extra forward per batch, ~2e-6 on the
same ResNet-18); ``"model"`` keeps the model's own pass. :func:`emulated_tf32` is a test utility: on a CPU it rounds
the inputs and weights of every float32 convolution (and matmul, when its flag asks for TF32) to
TF32's 10-bit mantissa whenever torch's flags say TF32, as cuDNN does on a GPU.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["DELTA_PRECISIONS", "BASE_PRECISIONS", "check_delta_precision", "check_base_precision", "full_fp32", "delta_map", "round_to_tf32", "emulated_tf32"]

DELTA_PRECISIONS = ("fp32", "tf32", "bf16")
BASE_PRECISIONS = ("fp64", "model")


def _check_choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_delta_precision(value) -> str:
    return _check_choice("delta_precision", value, DELTA_PRECISIONS)


def check_base_precision(value) -> str:
    return _check_choice("base_precision", value, BASE_PRECISIONS)


def _flags():
    """torch's float32 precision switches for cuDNN convolutions and CUDA matmuls (the new API:
    mixing it with ``allow_tf32`` raises in torch >= 2.9)."""
    return [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]


@contextlib.contextmanager
def _fp32_precision(mode: str):
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in _flags()]
    try:
        for obj, attr, _ in saved:
            setattr(obj, attr, mode)
        yield
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)


def full_fp32():
    """Full float32 convolutions and matmuls inside (``"ieee"``), whatever the user's flags."""
    return _fp32_precision("ieee")


def delta_map(precision: str, fn, delta: torch.Tensor, weight: torch.Tensor, *rest, **kwargs) -> torch.Tensor:
    """``fn(delta, weight, *rest, **kwargs)`` for a linear map ``fn`` applied to a delta, in the
    chosen ``delta_precision``. The result has ``delta``'s dtype."""
    if precision == "fp32" or delta.dtype != torch.float32:
        return fn(delta, weight, *rest, **kwargs)
    if precision == "tf32":
        with _fp32_precision("tf32"):
            return fn(delta, weight, *rest, **kwargs)
    rest = tuple(r.to(torch.bfloat16) if isinstance(r, torch.Tensor) and r.is_floating_point() else r for r in rest)
    return fn(delta.to(torch.bfloat16), weight.to(torch.bfloat16), *rest, **kwargs).to(delta.dtype)


# ----------------------------------------------------------------------------- TF32 emulation (tests)
def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded to the nearest value with a 10-bit mantissa, as the tensor cores
    read their float32 inputs in TF32 mode. Other dtypes are returned unchanged."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    # Round half away from zero on the magnitude bits: add half of the dropped 13 bits, clear them.
    return ((bits + 0x1000) & -0x2000).view(torch.float32).reshape(t.shape)


@contextlib.contextmanager
def emulated_tf32():
    """Inside, ``F.conv2d`` rounds its input and weight to TF32 when
    ``torch.backends.cudnn.conv.fp32_precision == "tf32"`` (PyTorch's default, as on a GPU), and
    ``F.linear`` / ``torch.matmul`` do when ``torch.backends.cuda.matmul.fp32_precision == "tf32"``.
    A CPU test utility: it shows what a GPU's TF32 does to an estimate, without a GPU."""
    conv, linear, matmul = F.conv2d, F.linear, torch.matmul

    def conv_tf32(x, w, *args, **kwargs):
        if torch.backends.cudnn.conv.fp32_precision == "tf32":
            x, w = round_to_tf32(x), round_to_tf32(w)
        return conv(x, w, *args, **kwargs)

    def linear_tf32(x, w, *args, **kwargs):
        if torch.backends.cuda.matmul.fp32_precision == "tf32":
            x, w = round_to_tf32(x), round_to_tf32(w)
        return linear(x, w, *args, **kwargs)

    def matmul_tf32(a, b, *args, **kwargs):
        if torch.backends.cuda.matmul.fp32_precision == "tf32":
            a, b = round_to_tf32(a), round_to_tf32(b)
        return matmul(a, b, *args, **kwargs)

    F.conv2d, F.linear, torch.matmul = conv_tf32, linear_tf32, matmul_tf32
    try:
        yield
    finally:
        F.conv2d, F.linear, torch.matmul = conv, linear, matmul
