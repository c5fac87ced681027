"""Conformance zoo (issue 12): user-written architecture patterns, each checked against an
independent float64 perturb-forward-restore loop, in train and eval mode, on every backend.

The patterns are the ones that have produced silently wrong gradients: a module applied twice,
a block reused at two depths, tied weights (module and functional), in-place ops whose input is
read again, products of two perturbed tensors (squeeze-excitation), tensor x parameter (layer
scale), concatenation, channel shuffle / chunk, spatial means, LayerNorm (module and
functional), a small ViT with ``nn.MultiheadAttention``, Swin-style window attention, a model
changed between two calls, tuple/dict outputs, randomness in the forward, an untraceable model
used from two threads. Plain CNN / ResNet controls check the oracle itself.

Every check is exact: relative error (norm of difference / norm of the oracle) <= 1e-8 per
parameter, no silent zeros, parameters and buffers bitwise unchanged, and the engine's base
output bitwise equal to ``model(x)``.
"""
import threading
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deepzero_kernels as dz
from deepzero_kernels import CGE
from deepzero_kernels import models as M

from conftest import assert_bitwise_unchanged, ce, snapshot

MU = 1e-2          # float64 oracle rounding noise ~1e-16 * loss / MU per coordinate
TOL = 1e-8         # relative error per parameter
CHUNK = 3          # small, so that every parameter runs in several chunks
DT = torch.float64


# ----------------------------------------------------------------------------- oracle
@torch.no_grad()
def naive_cge(model, x, y, mu, loss_fn=None, output_fn=None):
    """The definition, written independently of the engine: for every trainable parameter
    (``named_parameters`` lists a tied tensor once, so it is perturbed once) and every
    coordinate, add ``mu`` in place, run ``model(x)`` in the model's current mode, take
    per-sample losses, average ``l_pert - l_base`` in float64, divide by ``mu``, write the old
    value back. Buffers (BatchNorm running statistics, counters) are restored after every
    forward, so each forward sees the same state."""
    loss_fn = loss_fn or ce
    select = output_fn or (lambda o: o)
    saved = {n: b.clone() for n, b in model.named_buffers()}

    def losses():
        try:
            return loss_fn(select(model(x)), y).to(DT)
        finally:
            for n, b in model.named_buffers():
                b.copy_(saved[n])

    base = losses()
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.view(-1)
        g = torch.empty(p.numel(), dtype=DT)
        for i in range(p.numel()):
            old = flat[i].clone()
            flat[i] += mu
            try:
                g[i] = (losses() - base).mean() / mu
            finally:
                flat[i] = old
        out[name] = g.view(p.shape)
    return out


def compare(est: dict, ref: dict, what: str = ""):
    """Every parameter within TOL (relative norm) of the oracle, and no silent zeros: every
    coordinate whose oracle estimate is clearly non-zero is non-zero in the estimate.

    A parameter whose true gradient is structurally zero (a bias before a train-mode BatchNorm,
    say) has an oracle estimate made only of rounding noise; its error is measured against
    1e-5 of the whole gradient's norm instead of its own (the oracle's noise is ~eps * loss / MU =
    1e-14 per coordinate; a BN bias followed by conv + train-mode BN, as in ShuffleNet and
    EfficientNet, is such a parameter)."""
    assert set(est) == set(ref), f"{what}: estimated {sorted(est)} but the model trains {sorted(ref)}"
    total = torch.sqrt(sum(r.square().sum() for r in ref.values())).item()
    assert total > 0, f"{what}: the oracle gradient is zero: a useless test model"
    errs, zeros = {}, {}
    for n, r in ref.items():
        e = est[n]
        assert e.shape == r.shape, f"{what}: {n} has shape {tuple(e.shape)}, expected {tuple(r.shape)}"
        e = e.detach().to(DT).cpu()
        if not torch.isfinite(e).all():
            errs[n] = float("inf")
            continue
        errs[n] = (e - r).norm().item() / max(r.norm().item(), 1e-5 * total)
        silent = (r.abs() > 1e-9 * total) & (e == 0)
        if silent.any():
            zeros[n] = f"{int(silent.sum())}/{int((r.abs() > 1e-9 * total).sum())}"
    bad = {n: f"{v:.3g}" for n, v in errs.items() if not v <= TOL}
    assert not zeros, f"{what}: silent zeros (zero where the oracle is non-zero) in {zeros}; rel errors {bad}"
    assert not bad, f"{what}: relative error > {TOL} in {bad} (worst {max(errs.values()):.3g})"


# ----------------------------------------------------------------------------- helpers
def _randomize_bn(model):
    """Non-trivial running statistics, so that eval mode differs from train mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)


def _randomize_norm_affine(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


def _images(b, c, h, w=None):
    return torch.randn(b, c, h, w or h, dtype=DT)


def _targets(b, classes):
    return torch.randint(0, classes, (b,))


def _backend_or_skip(backend):
    if backend != "torch":
        ok, why = dz.backends()[backend]
        if not ok:
            pytest.skip(f"backend {backend!r} is not available here: {why}")
    return backend


def make_cge(model, backend, output_fn=None, **kw):
    if output_fn is not None:
        kw["output_fn"] = output_fn
    return CGE(model, mu=MU, backend=backend, chunk_size=CHUNK, **kw)


# ----------------------------------------------------------------------------- the zoo
class TwiceLinear(nn.Module):
    """(1) One Linear applied twice: h = l(l(x))."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.l(self.l(x))))


class TwiceConv(nn.Module):
    """(1) One Conv2d applied twice."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.c(self.c(x)))
        return self.head(h.mean([2, 3]))


class ReusedBlock(nn.Module):
    """(2) A conv-bn-relu block reused at two depths (its BatchNorm too)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = self.stem(x)
        h = self.block(h)
        h = self.block(h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class TiedModules(nn.Module):
    """(3) b.weight = a.weight: named_parameters lists the tensor once, as a.weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TiedConvModules(nn.Module):
    """(3) Tied conv weights across two Conv2d modules."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.c2.weight = self.c1.weight
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.head(h.mean([2, 3]))


class TiedFunctional(nn.Module):
    """(3) A module's weight reused through F.linear (a get_attr of the parameter)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(F.linear(h, self.a.weight))
        return self.head(h)


class TiedFunctionalConv(nn.Module):
    """(3) A Conv2d's weight reused through F.conv2d."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.c(x))
        h = F.relu(F.conv2d(h, self.c.weight, padding=1))
        return self.head(h.mean([2, 3]))


class InplaceAlias(nn.Module):
    """(4) z = y.relu_(); y + z: y is read again after the in-place op (it is relu(y) then)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        y = self.c(x)
        z = y.relu_()
        return self.head((y + z).mean([2, 3]))


class InplaceReLUShortcut(nn.Module):
    """(4) nn.ReLU(inplace=True) whose input is used afterwards by a shortcut."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = self.bn(self.c1(x))
        o = self.act(h)          # h now holds relu(h) too
        o = self.c2(o)
        return self.head((o + h).mean([2, 3]))


class SqueezeExcite(nn.Module):
    """(5) x * sigmoid(fc(mean(x))): a product of two perturbed tensors."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 2)
        self.fc2 = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.c(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean([2, 3])))))
        h = h * s[:, :, None, None]
        return self.head(h.mean([2, 3]))


class LayerScale(nn.Module):
    """(6) A residual branch scaled by a per-channel nn.Parameter gamma."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((3, 1, 1), 0.5) + 0.1 * torch.randn(3, 1, 1))
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = h + self.gamma * self.c2(h)
        return self.head(h.mean([2, 3]))


class Concat(nn.Module):
    """(7) torch.cat of two branches along channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 1)
        self.c = nn.Conv2d(5, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        h = F.relu(self.c(h))
        return self.head(h.mean([2, 3]))


class ChannelShuffle(nn.Module):
    """(8) ShuffleNet channel shuffle: view / transpose / reshape."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        b, _, hh, ww = h.shape
        h = h.view(b, 2, 2, hh, ww).transpose(1, 2).reshape(b, 4, hh, ww)
        h = F.relu(self.c2(h))
        return self.head(h.mean([2, 3]))


class ChunkSplit(nn.Module):
    """(8) torch.chunk into two halves, one transformed, concatenated back (ShuffleNetV2 unit)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        a, b = torch.chunk(h, 2, dim=1)
        h = torch.cat([a, F.relu(self.c2(b))], dim=1)
        return self.head(h.mean([2, 3]))


class MeanPool(nn.Module):
    """(9) x.mean([2, 3]) global pooling after conv-bn-relu."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.c(x))).mean([2, 3]))


class LayerNormModule(nn.Module):
    """(10) nn.LayerNorm."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.l2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(F.gelu(self.ln(self.l1(x))))


class LayerNormFunctional(nn.Module):
    """(10) F.layer_norm with the model's own weight and bias parameters."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 5)
        self.w = nn.Parameter(1 + 0.2 * torch.randn(5))
        self.b = nn.Parameter(0.1 * torch.randn(5))
        self.l2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(F.gelu(F.layer_norm(self.l1(x), (5,), self.w, self.b)))


class TinyViT(nn.Module):
    """(11) Patch-embedding conv, cls token and position embedding parameters, one pre-norm
    transformer block with nn.MultiheadAttention (returns a tuple), final LayerNorm, head."""

    def __init__(self, dim=4, heads=2, classes=3):
        super().__init__()
        self.embed = nn.Conv2d(2, dim, 4, stride=4)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 5, dim))
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)               # (B, 4, dim)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], 1) + self.pos
        n = self.ln1(h)
        h = h + self.attn(n, n, n)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln(h)[:, 0])


class WindowAttention(nn.Module):
    """(12) Swin-style: shifted windows (roll), window partition by reshape, q/k/v linear,
    softmax attention with a relative-position-bias table parameter, reverse windows."""

    def __init__(self, dim=4, heads=2, ws=2, res=4, classes=3):
        super().__init__()
        self.dim, self.heads, self.ws, self.res = dim, heads, ws, res
        self.embed = nn.Conv2d(2, dim, 2, stride=2)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rpb = nn.Parameter(0.5 * torch.randn((2 * ws - 1) ** 2, heads))
        c = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        C, R, ws, nh = self.dim, self.res, self.ws, self.heads
        N, nw = ws * ws, R // ws
        h = self.embed(x).permute(0, 2, 3, 1)                      # (B, R, R, C)
        B = h.shape[0]
        shortcut = h
        h = torch.roll(self.norm1(h), shifts=(-1, -1), dims=(1, 2))
        w = h.view(B, nw, ws, nw, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, C)
        qkv = self.qkv(w).reshape(-1, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (C // nh) ** -0.5) @ k.transpose(-2, -1)
        bias = self.rpb[self.rel_index.view(-1)].view(N, N, nh).permute(2, 0, 1)
        attn = torch.softmax(attn + bias.unsqueeze(0), dim=-1)
        o = self.proj((attn @ v).transpose(1, 2).reshape(-1, N, C))
        o = o.view(B, nw, nw, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, R, R, C)
        h = shortcut + torch.roll(o, shifts=(1, 1), dims=(1, 2))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean([1, 2]))


class SdpaBlock(nn.Module):
    """(12b) Pre-norm block with F.scaled_dot_product_attention (causal) over conv patches."""

    def __init__(self, dim=4, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(2, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)               # (B, T, dim)
        b, t, c = h.shape
        qkv = self.qkv(self.norm(h)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        h = h + self.proj(o.transpose(1, 2).reshape(b, t, c))
        return self.head(torch.log_softmax(h, -1).mean(1))


class TupleOut(nn.Module):
    """(14) forward returns (logits, aux)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        f = F.relu(self.c(x)).mean([2, 3])
        return self.head(f), f


class DictOut(TupleOut):
    """(14) forward returns {"logits": ..., "features": ...}."""

    def forward(self, x):
        f = F.relu(self.c(x)).mean([2, 3])
        return {"logits": self.head(f), "features": f}


class PlainCNN(nn.Module):
    """(15) Control: conv-bn-relu-maxpool, conv-bn-relu, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x))


class ResBlockNet(nn.Module):
    """(15) Control: stem, one ResNet basic block with identity shortcut, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.stem(x)
        o = F.relu(self.bn1(self.conv1(h)))
        o = self.bn2(self.conv2(o))
        h = F.relu(o + h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class DataDependent(nn.Module):
    """Untraceable by torch.fx: Python control flow on a value of the input."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        if x.sum() > 0:
            h = F.relu(self.c2(h))
        else:
            h = -h
        return self.head(h.mean([2, 3]))


class MHAVariants(nn.Module):
    """(12c) nn.MultiheadAttention as users also call it: sequence-first (batch_first=False), a bool
    causal mask, cross-attention (key/value from another tensor, and of another length than the
    query), the averaged attention weights used downstream, a float mask and per-head weights (two
    heads weighted differently, so a delta in the wrong head shows)."""

    def __init__(self, dim=4, heads=2, classes=3):
        super().__init__()
        self.embed = nn.Conv2d(2, dim, 2, stride=2)
        self.ctx = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads)                 # (T, B, E)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.per_head = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.short = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim + 4, classes)
        self.register_buffer("causal", torch.ones(4, 4, dtype=torch.bool).triu(1))
        self.register_buffer("bias", torch.linspace(-1.0, 1.0, 16).view(4, 4))

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)                # (B, 4, dim)
        s = h.transpose(0, 1)
        s = s + self.attn(s, s, s, attn_mask=self.causal, need_weights=False)[0]
        h = s.transpose(0, 1)
        o, w = self.cross(h, h, self.ctx(h), attn_mask=self.bias)  # weights averaged over heads
        o2, w2 = self.per_head(o, o, o, average_attn_weights=False)   # per-head weights
        o3 = self.short(o2, h[:, 1:3], h[:, :2], need_weights=False)[0]  # 4 queries, 2 keys
        o3 = o3 + self.cross(o3, o3, o3, need_weights=False)[0]      # a module applied twice
        return self.head(torch.cat([o3.mean(1), w.mean(1) + w2[:, 0].mean(1) - 0.5 * w2[:, 1].mean(1)], 1))


def _arch_case(make_model, b=4, s=8, classes=3):
    def make():
        return make_model(), _images(b, 2, s), _targets(b, classes), None
    return make


def _img_case(model_cls, b=5, c=2, s=6, classes=3):
    def make():
        return model_cls(), _images(b, c, s), _targets(b, classes), None
    return make


def _vec_case(model_cls, b=5, d=4, classes=3):
    def make():
        return model_cls(), torch.randn(b, d, dtype=DT), _targets(b, classes), None
    return make


def _data_dependent():
    x = _images(4, 2, 5)
    x = x - x.mean() + 0.1            # x.sum() > 0: the branch with c2 runs
    return DataDependent(), x, _targets(4, 3), None


ZOO = {
    "twice_linear": _vec_case(TwiceLinear),
    "twice_conv": _img_case(TwiceConv, c=3),
    "reused_block": _img_case(ReusedBlock),
    "tied_modules": _vec_case(TiedModules),
    "tied_conv_modules": _img_case(TiedConvModules, c=3),
    "tied_functional": _vec_case(TiedFunctional),
    "tied_functional_conv": _img_case(TiedFunctionalConv, c=3),
    "inplace_alias": _img_case(InplaceAlias),
    "inplace_relu_shortcut": _img_case(InplaceReLUShortcut),
    "squeeze_excite": _img_case(SqueezeExcite),
    "layer_scale": _img_case(LayerScale),
    "concat": _img_case(Concat),
    "channel_shuffle": _img_case(ChannelShuffle),
    "chunk": _img_case(ChunkSplit),
    "mean_pool": _img_case(MeanPool),
    "layernorm_module": _vec_case(LayerNormModule, d=6),
    "layernorm_functional": _vec_case(LayerNormFunctional, d=6),
    "vit": _img_case(TinyViT, b=4, s=8),
    "window_attention": _img_case(WindowAttention, b=4, s=8),
    "sdpa_attention": _img_case(SdpaBlock, b=4, s=8),
    "mha_variants": _img_case(MHAVariants, b=4, s=4),
    # The architecture benchmark's families (deepzero_kernels.models), at toy sizes.
    "efficientnet": _arch_case(lambda: M.efficientnet_b0(3, 2, width_mult=0.25, last_channels=0,
                                                         stages=((1, 8, 1, 1, 3), (1, 8, 1, 2, 5), (2, 8, 1, 1, 3)))),
    "densenet": _arch_case(lambda: M.densenet(3, 2, growth=2, blocks=(1, 1))),
    "shufflenet": _arch_case(lambda: M.shufflenet_v2(3, 2, widths=(4, 8, 8), repeats=(2,))),
    "convnext": _arch_case(lambda: M.convnext(3, 2, dims=(4, 8), depths=(1, 1))),
    "vit_model": _arch_case(lambda: M.vit(3, 2, dim=8, depth=1, heads=2, patch=4, image_size=8)),
    "tuple_output": lambda: (TupleOut(), _images(5, 2, 6), _targets(5, 3), lambda out: out[0]),
    "dict_output": lambda: (DictOut(), _images(5, 2, 6), _targets(5, 3), lambda out: out["logits"]),
    "data_dependent": _data_dependent,
    "control_cnn": _img_case(PlainCNN),
    "control_resnet": _img_case(ResBlockNet),
}
CONTROLS = ("control_cnn", "control_resnet")


def build(name, train):
    """The zoo model ``name`` in float64, deterministic (its own seed), in the given mode."""
    torch.manual_seed(zlib.crc32(name.encode()))
    model, x, y, output_fn = ZOO[name]()
    model = model.to(DT)
    _randomize_bn(model)
    _randomize_norm_affine(model)
    model.train(train)
    return model, x, y, output_fn


_ORACLE: dict = {}


def oracle(name, train, model, x, y, output_fn):
    """naive_cge, cached per (model, mode) across backends; the cache is keyed on the exact
    state and inputs, checked on every use."""
    key = (name, train)
    state = snapshot(model)
    hit = _ORACLE.get(key)
    if hit is not None:
        st, xx, yy, ref = hit
        if (st.keys() == state.keys() and all(torch.equal(st[k], state[k]) for k in st)
                and torch.equal(xx, x) and torch.equal(yy, y)):
            return ref
    ref = naive_cge(model, x, y, MU, output_fn=output_fn)
    assert_bitwise_unchanged(model, state)
    _ORACLE[key] = (state, x.clone(), y.clone(), ref)
    return ref


# Triton runs its CPU interpreter here: ~7 minutes for the zoo, so it is behind the slow marker
# (`pytest -m slow tests/test_zoo.py`), and runs in full on a GPU.
BACKENDS = ("torch", "native", pytest.param("triton", marks=pytest.mark.slow))
MODES = pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
ON_BACKENDS = pytest.mark.parametrize("backend", BACKENDS)


# ----------------------------------------------------------------------------- tests
def test_oracle_is_the_definition_on_a_linear_model():
    """The oracle against an analytic gradient: for a linear classifier with a tiny mu the
    finite difference approaches the true cross-entropy gradient (autograd)."""
    torch.manual_seed(1)
    m = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(6, 4, dtype=DT), _targets(6, 3)
    ref = naive_cge(m, x, y, 1e-7)
    ce(m(x), y).mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(ref[n], p.grad, rtol=1e-5, atol=1e-7)


def test_oracle_perturbs_a_tied_tensor_once():
    """Tied weights: the oracle's estimate of a.weight is the total derivative through both
    modules (checked against autograd), and b.weight is not listed separately."""
    torch.manual_seed(2)
    m = TiedModules().to(DT)
    x, y = torch.randn(5, 4, dtype=DT), _targets(5, 3)
    ref = naive_cge(m, x, y, 1e-7)
    assert "b.weight" not in ref and "a.weight" in ref
    ce(m(x), y).mean().backward()
    torch.testing.assert_close(ref["a.weight"], m.a.weight.grad, rtol=1e-5, atol=1e-7)


@ON_BACKENDS
@MODES
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_matches_naive_loop(name, train, backend):
    """Every zoo model: each parameter within 1e-8 (relative) of the float64 loop, no silent
    zeros, parameters and buffers bitwise unchanged."""
    _backend_or_skip(backend)
    model, x, y, output_fn = build(name, train)
    ref = oracle(name, train, model, x, y, output_fn)
    snap = snapshot(model)
    est = make_cge(model, backend, output_fn).estimate(x, y)
    assert_bitwise_unchanged(model, snap)
    assert model.training == train, "estimate changed the model's mode"
    compare(est, ref, f"{name}/{'train' if train else 'eval'}/{backend}")


@ON_BACKENDS
@MODES
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_base_output_is_model_output(name, train, backend):
    """The engine's base pass reproduces the model's own forward bitwise (in-place ops,
    aliasing, attention, ...): last_output == output_fn(model(x)) in the same mode."""
    _backend_or_skip(backend)
    model, x, y, output_fn = build(name, train)
    est = make_cge(model, backend, output_fn)
    # One coordinate per parameter is enough to run the base pass (and keeps this cheap).
    masks = {n: torch.zeros(p.shape, dtype=torch.bool).view(-1).index_fill_(0, torch.tensor([0]), True)
             .view(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    est.estimate(x, y, masks)
    with torch.no_grad():
        saved = snapshot(model)
        out = model(x)
        out = output_fn(out) if output_fn else out
        model.load_state_dict(saved)
    assert est.last_output is not None
    assert est.last_output.shape == out.shape, (tuple(est.last_output.shape), tuple(out.shape))
    diff = (est.last_output.to(DT) - out).abs().max().item()
    assert torch.equal(est.last_output, out), f"base output differs from model(x) by up to {diff:.3g}"


@ON_BACKENDS
@pytest.mark.parametrize("name,output_fn", [("tuple_output", lambda out: out[0]),
                                            ("dict_output", lambda out: out["logits"])],
                         ids=["tuple", "dict"])
def test_structured_output_without_output_fn_is_refused(name, output_fn, backend):
    """A forward returning a tuple or dict needs output_fn: a TypeError that says so."""
    _backend_or_skip(backend)
    model, x, y, _ = build(name, True)
    snap = snapshot(model)
    with pytest.raises(TypeError, match="output_fn"):
        make_cge(model, backend).estimate(x, y)
    assert_bitwise_unchanged(model, snap)


# ----------------------------------------------------------------------------- model changes
class Mutable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.conv2(h))
        return self.fc(h.mean([2, 3]))


def _replace_layer(m):
    m.conv2 = nn.Conv2d(3, 5, 3, padding=1).to(DT)
    m.fc = nn.Linear(5, 3).to(DT)


def _replace_param(m):
    m.conv1.weight = nn.Parameter(torch.randn_like(m.conv1.weight))


def _toggle_mode(m):
    m.train(not m.training)


def _inplace_update(m):  # what an optimizer step does
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _freeze(m):
    m.fc.bias.requires_grad_(False)
    m.conv1.weight.requires_grad_(False)


MUTATIONS = {"replace_layer": _replace_layer, "replace_param": _replace_param, "toggle_mode": _toggle_mode,
             "inplace_update": _inplace_update, "freeze": _freeze}


@ON_BACKENDS
@MODES
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_model_changed_between_calls(mutation, train, backend):
    """(13) The same estimator after the model changed: the second estimate is the mutated
    model's (re-traced), never the old model's."""
    _backend_or_skip(backend)
    torch.manual_seed(13)
    model = Mutable().to(DT)
    _randomize_bn(model)
    model.train(train)
    x, y = _images(5, 2, 6), _targets(5, 3)
    est = make_cge(model, backend)
    compare(est.estimate(x, y), naive_cge(model, x, y, MU), "before the change")
    MUTATIONS[mutation](model)
    ref = naive_cge(model, x, y, MU)
    snap = snapshot(model)
    g = est.estimate(x, y)
    assert_bitwise_unchanged(model, snap)
    compare(g, ref, f"after {mutation}")


# ----------------------------------------------------------------------------- randomness
class StochasticDepth(nn.Module):
    """torchvision-style stochastic depth written by hand: a Bernoulli row mask in training."""

    def __init__(self, p=0.8):
        super().__init__()
        self.p = p
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.branch = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        b = self.branch(h)
        if self.training:
            keep = torch.empty([h.shape[0], 1, 1, 1], dtype=h.dtype, device=h.device).bernoulli_(self.p)
            b = b * keep / self.p
        h = F.relu(h + b)
        return self.head(h.mean([2, 3]))


class RandNoise(nn.Module):
    """Calls torch.rand in its forward (in both modes)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.c(x))
        h = h + 0.1 * torch.rand(h.shape, dtype=h.dtype, device=h.device)
        return self.head(h.mean([2, 3]))


@ON_BACKENDS
@pytest.mark.parametrize("case", ["stochastic_depth/train", "rand/train", "rand/eval"])
def test_random_forward_is_refused(case, backend):
    """Any random number drawn in the forward is refused (ValueError naming the randomness),
    and the model is left as it was."""
    _backend_or_skip(backend)
    kind, mode = case.split("/")
    torch.manual_seed(6)
    model = (StochasticDepth() if kind == "stochastic_depth" else RandNoise()).to(DT).train(mode == "train")
    x, y = _images(5, 2, 6), _targets(5, 3)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="(?i)random"):
        make_cge(model, backend).estimate(x, y)
    assert_bitwise_unchanged(model, snap)


@ON_BACKENDS
def test_stochastic_depth_in_eval_mode_is_exact(backend):
    """In eval mode stochastic depth draws nothing: the estimate is exact."""
    _backend_or_skip(backend)
    torch.manual_seed(7)
    model = StochasticDepth().to(DT).eval()
    x, y = _images(5, 2, 6), _targets(5, 3)
    ref = naive_cge(model, x, y, MU)
    snap = snapshot(model)
    g = make_cge(model, backend).estimate(x, y)
    assert_bitwise_unchanged(model, snap)
    compare(g, ref, "stochastic depth, eval")


# ----------------------------------------------------------------------------- threads
@pytest.mark.filterwarnings("ignore::UserWarning")
@ON_BACKENDS
def test_two_threads_on_one_estimator_untraceable_model(backend):
    """Two threads, 20 estimates each, on one estimator of an untraceable model (its fallback
    path): every call succeeds and equals the float64 loop; parameters are never left changed."""
    _backend_or_skip(backend)
    model, x, y, _ = build("data_dependent", True)
    ref = naive_cge(model, x, y, MU)
    snap = snapshot(model)
    est = make_cge(model, backend)
    errors, results = [], []
    start = threading.Barrier(2)

    def work():
        try:
            start.wait()
            for _ in range(20):
                results.append(est.estimate(x, y))
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "estimate hung"
    assert not errors, f"{len(errors)} thread(s) raised: {errors[:2]}"
    assert len(results) == 40
    wrong = []
    for i, g in enumerate(results):
        try:
            compare(g, ref, f"call {i}")
        except AssertionError as e:
            wrong.append(str(e).splitlines()[0])
    assert not wrong, f"{len(wrong)} of 40 concurrent estimates are wrong, e.g. {wrong[0]}"
    assert_bitwise_unchanged(model, snap)


# The architectures of deepzero_kernels.models at small widths, standard structure.
ARCHS = {
    "resnet18": lambda: M.resnet18(3, 2, width=4),
    "mobilenet_v2": lambda: M.mobilenet_v2(3, 2, width_mult=0.05, last_channels=8),
    "efficientnet_b0": lambda: M.efficientnet_b0(3, 2, width_mult=0.1, depth_mult=0.25, last_channels=16),
    "densenet": lambda: M.densenet(3, 2, growth=2, blocks=(2, 2, 2)),
    "shufflenet_v2": lambda: M.shufflenet_v2(3, 2, widths=(4, 8, 16, 32, 32), repeats=(2, 2, 2)),
    "convnext": lambda: M.convnext(3, 2, dims=(4, 8, 16), depths=(1, 1, 1)),
    "vit": lambda: M.vit(3, 2, dim=8, depth=2, heads=2, image_size=16),
}


@pytest.mark.parametrize("backend", ["torch", "native"])
@MODES
@pytest.mark.parametrize("arch", list(ARCHS))
def test_architectures_have_no_fallback(arch, train, backend):
    """Every architecture runs on delta rules and fused kernels alone (no per-node fallback, no
    whole-model forwards), and the report says so."""
    _backend_or_skip(backend)
    torch.manual_seed(0)
    model = ARCHS[arch]().train(train)
    x, y = torch.randn(3, 2, 16, 16), _targets(3, 3)
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) < 0.05 for n, p in model.named_parameters()}
    for n in masks:
        masks[n].view(-1)[0] = True  # every parameter tensor at least once
    cge = CGE(model, mu=1e-3, backend=backend)
    cge.estimate(x, y, masks)
    rep = cge.last_report
    assert rep.path == "delta" and rep.fast, str(rep)
    assert rep.perturbations == sum(int(m.sum()) for m in masks.values())
    assert "no fallback" in str(rep)


def test_report_names_the_fallback_nodes_and_their_cost():
    """A node without a rule for its case (a Linear applied to its own output: its weight enters
    where the input already changed) is named with the perturbations it evaluated one by one;
    an untraceable model reports whole-model forwards and why."""
    model, x, y, _ = build("twice_linear", False)
    cge = make_cge(model, "torch")
    cge.estimate(x, y)
    rep = cge.last_report
    n = sum(p.numel() for p in model.parameters())
    assert rep.path == "delta" and not rep.fast and rep.perturbations == n
    n_l = sum(p.numel() for p in model.l.parameters())  # only the second use of l's own parameters
    assert list(rep.fallback) == ["l_1 (Linear)"] and rep.fallback["l_1 (Linear)"] == n_l
    assert f"l_1 (Linear): {n_l}" in str(rep)
    model, x, y, _ = build("data_dependent", False)
    cge = make_cge(model, "torch")
    with pytest.warns(UserWarning, match="could not trace"):
        cge.estimate(x, y)
    assert cge.last_report.path == "functional" and "could not trace" in str(cge.last_report)
    assert cge.last_report.whole_model == sum(p.numel() for p in model.parameters())


def stochastic_depth(input, p, mode, training=True):
    """A stand-in for torchvision.ops.stochastic_depth (torchvision cannot be installed here): same
    module, name, signature and fx leaf status; the identity unless training with p > 0."""
    if not training or p == 0.0:
        return input
    keep = torch.empty((input.shape[0],) + (1,) * (input.dim() - 1), dtype=input.dtype).bernoulli_(1 - p)
    return input * keep / (1 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


class TorchvisionStochasticDepth(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = h + stochastic_depth(self.c2(h), self.p, "row", self.training)
        return self.head(h.mean([2, 3]))


@pytest.mark.parametrize("p,train", [(0.0, True), (0.5, False)], ids=["p0-train", "p0.5-eval"])
def test_torchvision_stochastic_depth_is_identity_without_fallback(p, train):
    torch.manual_seed(3)
    model = TorchvisionStochasticDepth(p).to(DT).train(train)
    x, y = _images(4, 2, 5), _targets(4, 3)
    ref = naive_cge(model, x, y, MU)
    cge = make_cge(model, "torch")
    est = cge.estimate(x, y)
    assert cge.last_report.fast, str(cge.last_report)
    assert any(n.op == "call_function" and n.target is stochastic_depth
               for n in torch.fx.symbolic_trace(model).graph.nodes), "not a leaf: the test would not test the rule"
    compare(est, ref, f"stochastic_depth p={p}")


def test_torchvision_stochastic_depth_active_is_refused():
    model = TorchvisionStochasticDepth(0.5).to(DT).train()
    with pytest.raises(ValueError, match="random"):
        make_cge(model, "torch").estimate(_images(4, 2, 5), _targets(4, 3))
