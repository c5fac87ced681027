"""Backprop-free training rules the DeepZero paper compares with in Tab. 1 (Sec. 5, "Comparison with
input-weight alignment"): feedback alignment (FA), direct feedback alignment (DFA) and Align-ada, on
the 8-layer CNN of Boopathy & Fiete (2022) (:func:`deepzero_kernels.models.boopathy_cnn8`) or a
plain MLP.

Notation: the network is a chain of weight layers ``a_l = W_l h_{l-1} + b_l`` (``nn.Linear`` or
``nn.Conv2d``; for a convolution read ``W_l h`` as the convolution), each followed by local,
parameter-free or per-layer operations (BatchNorm, ReLU, pooling, flatten) that give the next
layer's input ``h_l = phi_l(a_l)``; ``h_0 = x`` and ``y_hat = a_L``. With the output error
``e = dL/dy_hat`` and the layer signal ``delta_l = dL/da_l`` every rule updates

    dW_l = delta_l h_{l-1}^T,   db_l = sum delta_l,

and differs from backprop, ``delta_l = phi_l'(a_l) * (W_{l+1}^T delta_{l+1})``, only in how the error
reaches layer ``l``:

* FA (Lillicrap et al., 2016, Nat. Commun. 7:13276): ``W_{l+1}^T`` is replaced by a fixed random
  matrix ``B_{l+1}`` of the same shape, ``delta_l = phi_l'(a_l) * (B_{l+1}^T delta_{l+1})``.
* DFA (Nokland, 2016, NeurIPS): the output error goes straight to every hidden layer through a
  fixed random ``B_l`` of shape ``(classes, dim h_l)``: ``dL/dh_l := B_l^T e``, then
  ``delta_l = phi_l'(a_l) * B_l^T e``; no signal passes between hidden layers.
* Align-ada (Boopathy & Fiete, ICML 2022, "How to train your wide neural network without backprop:
  an input-weight alignment perspective"): the error is carried back through the network *frozen at
  its initialisation* ``theta_0`` (its own activities ``h_l^0`` on the same input), and each layer
  combines that error with its *current* input activity:
  ``dL/dh_l := (d y_hat^0 / d h_l^0)^T e`` evaluated at ``theta_0``, then ``delta_l`` and ``dW_l`` as
  above with the current ``a_l``, ``h_{l-1}``. In the infinite-width (NTK) limit the weights stay at
  ``theta_0`` and the rule is backprop; at ``theta = theta_0`` it is exactly backprop. (Written from
  the paper and the authors' public code: their network is run twice, the frozen copy receiving the
  current layer outputs as ``h^0 + h - stopgrad(h)``, which is what :class:`AlignAda` does.)

Every local operation (BatchNorm statistics, ReLU masks, pooling) is differentiated exactly; only the
transport of the error between weight layers follows the rule. Each class's ``backward(x, y)``
assigns ``.grad`` of every trainable parameter (like :meth:`deepzero_kernels.CGE.backward`), so any
``torch.optim`` optimizer can step. The models must be chains: their forward must equal applying
their leaf modules in registration order (``nn.Sequential`` MLPs, :class:`~deepzero_kernels.models.
BoopathyCNN8`, the App. B CNN); this is checked on the first batch.
"""
from __future__ import annotations

import abc
import copy
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FeedbackAlignment", "DirectFeedbackAlignment", "AlignAda", "METHODS", "make", "chain_of"]

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
# Leaf modules with parameters that act within one layer (trained by the local gradient).
LOCAL_PARAMETRIC = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def chain_of(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(name, module)]``: the leaf modules of ``model`` in registration order, the order in which a
    chain model applies them. Raises ``ValueError`` for a leaf module with parameters that is
    neither a weight layer (``nn.Linear``, ``nn.Conv2d``) nor a normalisation layer, or for a model
    without weight layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    for n, m in leaves:
        if any(True for _ in m.parameters(recurse=False)) and not isinstance(m, WEIGHT_LAYERS + LOCAL_PARAMETRIC):
            raise ValueError(f"layer {n!r} ({type(m).__name__}) has parameters but is neither a weight layer "
                             f"(Linear, Conv2d) nor a normalisation layer; FA/DFA/Align-ada cannot place it")
    if not any(isinstance(m, WEIGHT_LAYERS) for _, m in leaves):
        raise ValueError("the model has no Linear or Conv2d layer to train")
    return leaves


def _conv_padding(m: nn.Conv2d) -> Tuple[int, int]:
    """The explicit zero padding of ``m`` (FA's backward needs numbers, not 'same'/'valid')."""
    if m.padding_mode != "zeros":
        raise ValueError(f"FA supports zero-padded convolutions only, got padding_mode={m.padding_mode!r}")
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("FA: padding='same' with an even effective kernel pads asymmetrically; "
                             "give explicit padding")
        return tuple(t // 2 for t in total)
    return tuple(m.padding)


class _FALinear(torch.autograd.Function):
    """``F.linear`` whose backward sends ``g B`` to the input (FA) and the true gradients to W, b."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = g @ feedback if ctx.needs_input_grad[0] else None
        gw = g2.t() @ x2 if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class _FAConv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward sends the transposed convolution with ``B`` (not W) to the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):
        ctx.save_for_backward(x, feedback)
        ctx.conf = (weight.shape, bias is not None, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        w_shape, has_bias, stride, padding, dilation, groups = ctx.conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, feedback, g, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(x, w_shape, g, stride, padding, dilation, groups)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None


class _Rule(abc.ABC):
    """What FA, DFA and Align-ada share: the chain, the chain check, the loss and ``backward``."""

    name = "rule"

    def __init__(self, model: nn.Module, seed: int = 0, loss_fn: Optional[Callable] = None):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        self.model = model
        self.chain = chain_of(model)
        self.seed = seed
        self.loss_fn = loss_fn or F.cross_entropy
        self.generator = torch.Generator().manual_seed(seed)
        self._checked = False

    def _random(self, shape, std: float, like: torch.Tensor) -> torch.Tensor:
        """i.i.d. N(0, std^2) from this rule's seeded generator, on ``like``'s device and dtype."""
        return (torch.randn(shape, generator=self.generator, dtype=torch.float64) * std).to(like)

    @torch.no_grad()
    def _check_chain(self, x: torch.Tensor) -> None:
        """The model's forward must be its leaf modules applied in order (buffers restored)."""
        saved = {n: b.clone() for n, b in self.model.named_buffers()}
        try:
            ref, h = self.model(x), x
            for _, m in self.chain:
                h = m(h)
        finally:
            for n, b in self.model.named_buffers():
                b.copy_(saved[n])
        if h.shape != ref.shape or not torch.allclose(h, ref, rtol=1e-5, atol=1e-6):
            raise ValueError(f"{self.name}: the model's forward is not the chain of its leaf modules in "
                             "registration order (residual or functional code); these rules need a chain "
                             "model such as an nn.Sequential MLP or deepzero_kernels.models.boopathy_cnn8")
        self._checked = True

    @abc.abstractmethod
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` through this rule's autograd graph (each rule's own)."""

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Assign ``.grad`` of every trainable parameter by this rule on batch ``(x, y)`` (one forward,
        in the model's current mode); returns the batch loss (detached)."""
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be tensors")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"x and y must hold the same number (>= 1) of samples, got {x.shape[0]} and {y.shape[0]}")
        if not self._checked:
            self._check_chain(x)
        loss = self.loss_fn(self._forward(x), y)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar (the batch loss), got shape {tuple(loss.shape)}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        return loss.detach()


class FeedbackAlignment(_Rule):
    """Feedback alignment (Lillicrap et al., 2016): backprop with each weight layer's ``W^T`` replaced,
    in the backward pass only, by a fixed random ``B^T`` of the same shape,

        delta_l = phi_l'(a_l) * (B_{l+1}^T delta_{l+1}),   dW_l = delta_l h_{l-1}^T.

    ``feedback[name]`` holds ``B`` for every weight layer (i.i.d. Gaussian with the RMS of that
    layer's weights at construction, i.e. the scale of its initialisation; drawn from ``seed``). It
    may be overwritten with a tensor of the weight's shape; with ``B = W`` the rule is backprop."""

    name = "FA"

    def __init__(self, model: nn.Module, seed: int = 0, loss_fn: Optional[Callable] = None):
        super().__init__(model, seed, loss_fn)
        self.feedback: Dict[str, torch.Tensor] = {}
        for n, m in self.chain:
            if isinstance(m, WEIGHT_LAYERS):
                w = m.weight.detach()
                rms = float(w.double().pow(2).mean().sqrt()) or 1.0 / math.sqrt(max(1, w[0].numel()))
                self.feedback[n] = self._random(w.shape, rms, w)
                if isinstance(m, nn.Conv2d):
                    _conv_padding(m)  # unsupported padding fails here, not mid-training

    def _forward(self, x):
        h = x
        for n, m in self.chain:
            if isinstance(m, nn.Linear):
                h = _FALinear.apply(h, m.weight, m.bias, self.feedback[n])
            elif isinstance(m, nn.Conv2d):
                h = _FAConv2d.apply(h, m.weight, m.bias, self.feedback[n], m.stride, _conv_padding(m),
                                    m.dilation, m.groups)
            else:
                h = m(h)
        return h


class DirectFeedbackAlignment(_Rule):
    """Direct feedback alignment (Nokland, 2016): the output error ``e = dL/dy_hat`` is sent to every
    hidden layer's output ``h_l`` (the input of the next weight layer) by a fixed random matrix,

        dL/dh_l := B_l^T e,   delta_l = phi_l'(a_l) * (dL/dh_l),   dW_l = delta_l h_{l-1}^T,

    and the last layer gets its true gradient ``e h_{L-1}^T``. No error passes from layer to layer.
    ``feedback[name]`` (``name`` the weight layer whose output receives it) has shape ``(classes,
    numel(h_l) per sample)``, i.i.d. N(0, 1/numel(h_l)) as in Boopathy & Fiete's code, drawn from
    ``seed`` when the first batch fixes the shapes (or at construction from ``example_input``)."""

    name = "DFA"

    def __init__(self, model: nn.Module, seed: int = 0, loss_fn: Optional[Callable] = None,
                 example_input: Optional[torch.Tensor] = None):
        super().__init__(model, seed, loss_fn)
        self.feedback: Dict[str, torch.Tensor] = {}
        if example_input is not None:
            self._build_feedback(example_input)

    @torch.no_grad()
    def _build_feedback(self, x: torch.Tensor) -> None:
        saved = {n: b.clone() for n, b in self.model.named_buffers()}
        try:
            out, taps = self._run(x)
        finally:
            for n, b in self.model.named_buffers():
                b.copy_(saved[n])
        classes = out[0].numel()
        for n, h in taps:
            d = h[0].numel()
            self.feedback[n] = self._random((classes, d), 1.0 / math.sqrt(d), h)

    def _run(self, x):
        """The forward with every weight layer's input detached; returns the output and the taps
        ``[(name of the layer that produced h_l, h_l)]``."""
        h, last, taps = x, None, []
        for n, m in self.chain:
            if isinstance(m, WEIGHT_LAYERS):
                if last is not None:
                    taps.append((last, h))
                    h = h.detach()
                last = n
            h = m(h)
        return h, taps

    def _forward(self, x):
        if not self.feedback:
            self._build_feedback(x)
        out, taps = self._run(x)
        for n, h in taps:
            proj = h.flatten(1) @ self.feedback[n].t()  # (N, classes); its gradient is B^T e
            out = out + (proj - proj.detach())          # same value, error injected at h_l
        return out


class AlignAda(_Rule):
    """Align-ada (Boopathy & Fiete, 2022): the output error travels back through the network frozen
    at its initialisation ``theta_0`` (``initial``, a copy taken at construction, run on the same
    batch with its own activities ``h^0``), and each layer pairs it with its current activity:

        dL/dh_l := (d y_hat^0 / d h_l^0)^T e  at theta_0,   delta_l = phi_l'(a_l) * (dL/dh_l),
        dW_l = delta_l h_{l-1}^T,

    the last layer getting its true gradient ``e h_{L-1}^T``. At ``theta = theta_0`` this is backprop;
    it departs from backprop as the weights move away from ``theta_0`` (in the infinite-width NTK
    regime they do not). ``seed`` is unused (no random matrices) and kept for a uniform API."""

    name = "Align-ada"

    def __init__(self, model: nn.Module, seed: int = 0, loss_fn: Optional[Callable] = None):
        super().__init__(model, seed, loss_fn)
        self.initial = copy.deepcopy(model)
        self.initial.requires_grad_(False)
        self.initial_chain = chain_of(self.initial)

    def _forward(self, x):
        self.initial.train(self.model.training)
        h, h0, first = x, x, True
        for (_, m), (_, m0) in zip(self.chain, self.initial_chain):
            if isinstance(m, WEIGHT_LAYERS):
                if not first:
                    h0 = h0 + (h - h.detach())  # the frozen net's value; its input gradient reaches h_l
                    h = h.detach()
                first = False
            h, h0 = m(h), m0(h0)
        return h + (h0 - h0.detach())  # the current output; e also flows back through theta_0


METHODS = {"fa": FeedbackAlignment, "dfa": DirectFeedbackAlignment, "align_ada": AlignAda}


def make(method: str, model: nn.Module, seed: int = 0, loss_fn: Optional[Callable] = None) -> _Rule:
    """The rule named ``method`` (``fa``, ``dfa`` or ``align_ada``) for ``model``."""
    if method not in METHODS:
        raise ValueError(f"unknown BP-free method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method](model, seed, loss_fn)
