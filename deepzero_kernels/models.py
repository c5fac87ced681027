"""Models used by the paper, the tests and the architecture benchmark: the App. B simple CNN, the
8-layer CNN of Boopathy & Fiete (2022) (the paper's Tab. 1), CIFAR ResNets (ResNet-20/32/44/56 and
ResNet-18), MobileNetV2, EfficientNet-B0, a DenseNet-BC block stack, ShuffleNetV2, a ConvNeXt block
stack, a small ViT and an MLP, all for 32x32 inputs.

The modern architectures share one layout, ``features`` (an ``nn.Sequential`` of the stem and the
blocks) then :meth:`forward_head`, so that the paper's feature-reuse baseline can cache the input
of every block (``bench/baselines.decompose``).

All models are plain ``nn.Module`` code with no registration: the delta engine discovers their
structure by tracing them with ``torch.fx``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SimpleCNN", "MLP", "BoopathyCNN8", "boopathy_cnn8", "BasicBlock", "CifarResNet", "resnet20", "resnet32",
           "resnet44", "resnet56", "resnet18", "FeaturesHead", "InvertedResidual", "MobileNetV2", "mobilenet_v2",
           "StochasticDepth", "SqueezeExcite", "MBConv", "EfficientNet", "efficientnet_b0", "DenseLayer", "DenseNet",
           "densenet", "ShuffleUnit", "ShuffleNetV2", "shufflenet_v2", "LayerNorm2d", "ConvNeXtBlock", "ConvNeXt",
           "convnext", "ViTBlock", "ViT", "vit", "ARCHITECTURES", "build_model", "user_model"]


class ConvGapLinear(nn.Module):
    """A stack of conv layers (``features``), global average pooling and a linear classifier:
    the layout of the App. B CNN and of Boopathy & Fiete's 8-layer CNN."""

    def _head(self, layers: list, width: int, num_classes: int) -> None:
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


class SimpleCNN(ConvGapLinear):
    """The paper's App. B CNN: ``depth`` blocks of conv3x3-BN-ReLU-MaxPool(2), global average
    pooling and a linear classifier. Input ``(B, in_channels, H, W)``, output ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, depth: int = 2, width: int = 16):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        layers = []
        c = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c = width
        self._head(layers, width, num_classes)


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` Linear-ReLU layers and a linear classifier."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden=(64, 64)):
        super().__init__()
        layers = [nn.Flatten()]
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class BoopathyCNN8(ConvGapLinear):
    """The 8-layer CNN of Boopathy & Fiete (ICML 2022, "How to train your wide neural network without
    backprop"), on which the DeepZero paper's Tab. 1 compares DeepZero with FA, DFA and Align-ada:
    seven conv3x3 layers of ``width`` channels ('same' padding, strides 1, 1, 1, 2, 1, 2, 1), each
    followed by BatchNorm without affine parameters and ReLU, global average pooling and a linear
    classifier (seven conv + one linear = eight weight layers). Input ``(B, in_channels, H, W)``,
    any ``H, W`` (8x8 digits end at 2x2, 32x32 CIFAR-10 at 8x8), output ``(B, num_classes)``.

    As in the authors' code the normalisation has no scale/shift; their convolutions also carry a
    bias, which a batch-statistics BatchNorm cancels exactly, so ``conv_bias=False`` by default
    (``True`` restores it). Weights use PyTorch's standard parameterisation and initialisation
    (the authors' NTK parameterisation, N(0, 1) weights scaled by 1/sqrt(fan-in) in the forward,
    is the same network with per-layer learning rates)."""

    STRIDES = (1, 1, 1, 2, 1, 2, 1)

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 3, conv_bias: bool = False):
        super().__init__()
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(f"width, num_classes and in_channels must be >= 1, got width={width}, "
                             f"num_classes={num_classes}, in_channels={in_channels}")
        layers, c = [], in_channels
        for s in self.STRIDES:
            layers += [nn.Conv2d(c, width, 3, stride=s, padding=1, bias=conv_bias),
                       nn.BatchNorm2d(width, affine=False), nn.ReLU()]
            c = width
        self._head(layers, width, num_classes)


def boopathy_cnn8(width: int = 64, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                  **kw) -> BoopathyCNN8:
    """:class:`BoopathyCNN8` at ``width`` channels (the paper's Tab. 1: 32/64 for DeepZero, 64/512
    for FA, DFA and Align-ada). ``image_size`` is checked only (global pooling fits any size)."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return BoopathyCNN8(width, num_classes, in_channels, **kw)


class ShortcutA(nn.Module):
    """Option-A shortcut of He et al. (2016): subsample by ``stride`` and zero-pad channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x):
        s = self.stride
        front = self.pad // 2
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, front, self.pad - front))


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with a residual shortcut: identity, option A (subsample + zero
    channels, no parameters) or option B (1x1 conv + BN)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif option == "A":
            self.shortcut = ShortcutA(in_planes, planes, stride)
        elif option == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        else:
            raise ValueError(f"option must be 'A' or 'B', got {option!r}")

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs as in He et al. (2016) and the DeepZero paper: a 3x3 stem
    with 16 channels, three stages of ``n`` basic blocks (16, 32, 64 channels), global average
    pooling and a linear classifier. ResNet-20 (n=3) has 269,722 parameters with option A.
    ``blocks`` (one count per stage) and ``widths`` give other depths, e.g. :func:`resnet18`."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3, option: str = "A",
                 widths=(16, 32, 64), blocks=None):
        super().__init__()
        blocks = tuple(blocks) if blocks is not None else (n,) * len(widths)
        if len(blocks) != len(widths):
            raise ValueError(f"blocks {blocks} and widths {tuple(widths)} must have one entry per stage")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        self.num_stages = len(widths)
        for i, (planes, count) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(in_planes, planes, stride, option))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = torch_flatten(self.pool(out))
        return self.fc(out)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """ResNet-18 for 32x32 inputs (the usual CIFAR variant: a 3x3 stem, no max pool): four stages
    of two basic blocks, ``width`` x (1, 2, 4, 8) channels, option-B (1x1 conv + BN) shortcuts.
    ``width=64`` is the standard 11.2M-parameter model; smaller widths keep its structure."""
    return CifarResNet(2, num_classes, in_channels, option="B", widths=tuple(width * m for m in (1, 2, 4, 8)),
                       blocks=(2, 2, 2, 2))


class FeaturesHead(nn.Module):
    """The layout of the modern architectures: ``features`` (an ``nn.Sequential`` of the stem and the
    blocks) then ``forward_head``; the paper's feature-reuse baseline caches every block's input."""

    def forward(self, x):
        return self.forward_head(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (BN, ReLU6), 3x3 depthwise (BN, ReLU6), 1x1 linear
    projection (BN), with the identity added when the shape is kept."""

    def __init__(self, in_planes: int, planes: int, stride: int, expand: int):
        super().__init__()
        hidden = in_planes * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, planes, 1, bias=False), nn.BatchNorm2d(planes)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_planes == planes

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(FeaturesHead):
    """MobileNetV2 (Sandler et al., 2018) for 32x32 inputs: the stem and the first two stages keep
    stride 1 (the common CIFAR variant), ``width_mult`` scales every width (rounded to a multiple
    of 8, at least 8)."""

    # (expansion t, channels c, blocks n, first stride s) of the paper's Table 2, CIFAR strides.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, last_channels: int = 1280):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        scale = lambda c: max(8, int(c * width_mult + 4) // 8 * 8)  # noqa: E731
        c = scale(32)
        layers = [nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(inplace=True)]
        for t, ch, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c, scale(ch), s if i == 0 else 1, t))
                c = scale(ch)
        last = scale(last_channels) if width_mult > 1 else last_channels
        layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward_head(self, h):
        return self.fc(torch.flatten(self.pool(h), 1))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kw) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, width_mult, **kw)


def _round8(c: float) -> int:
    return max(8, int(c + 4) // 8 * 8)


class StochasticDepth(nn.Module):
    """Drops the residual branch of a whole sample with probability ``p`` in training mode (Huang et
    al., 2016), rescaling the kept ones; the identity in eval mode or with ``p = 0``. Zeroth-order
    estimates need a deterministic forward: train with ``p = 0`` (the default here)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018): a per-(sample, channel) sigmoid gate computed from the
    spatial mean, as in EfficientNet (SiLU inside)."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        s = x.mean([2, 3], keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expansion (BN, SiLU), kxk depthwise (BN, SiLU), squeeze-excitation
    (a quarter of the input width), 1x1 projection (BN); stochastic depth and the identity when the
    shape is kept."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, drop: float = 0.0):
        super().__init__()
        hidden = c_in * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()]
        layers += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.SiLU(), SqueezeExcite(hidden, max(1, c_in // 4)),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out
        self.drop = StochasticDepth(drop)

    def forward(self, x):
        out = self.block(x)
        return x + self.drop(out) if self.residual else out


class EfficientNet(FeaturesHead):
    """EfficientNet-B0 (Tan & Le, 2019) for 32x32 inputs: the B0 stages (expansion, channels, blocks,
    stride, kernel) with the stem and the first downsampling stage at stride 1, ``width_mult`` on every
    width, ``depth_mult`` on block counts, stochastic depth rising linearly to ``drop_path``; ``stages``
    replaces the B0 table; ``last_channels=0`` drops the head conv."""

    STAGES = ((1, 16, 1, 1, 3), (6, 24, 2, 1, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
              (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, depth_mult: float = 1.0,
                 last_channels: int = 1280, drop_path: float = 0.0, stages=None):
        super().__init__()
        stages = tuple(stages) if stages is not None else self.STAGES
        if width_mult <= 0 or depth_mult <= 0:
            raise ValueError(f"width_mult and depth_mult must be > 0, got {width_mult}, {depth_mult}")
        c = _round8(32 * width_mult)
        layers = [nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())]
        counts = [max(1, math.ceil(n * depth_mult)) for _, _, n, _, _ in stages]
        total, done = sum(counts), 0
        for (t, ch, _, stride, kernel), n in zip(stages, counts):
            for i in range(n):
                out = _round8(ch * width_mult)
                layers.append(MBConv(c, out, kernel, stride if i == 0 else 1, t, drop_path * done / total))
                c, done = out, done + 1
        last = _round8(last_channels * width_mult) if width_mult > 1 else last_channels
        if last:  # 0: no head conv
            layers.append(nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.SiLU()))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last or c, num_classes)

    def forward_head(self, h):
        return self.fc(h.mean([2, 3]))


def efficientnet_b0(num_classes: int = 10, in_channels: int = 3, **kw) -> EfficientNet:
    return EfficientNet(num_classes, in_channels, **kw)


class DenseLayer(nn.Module):
    """DenseNet-BC's bottleneck layer (Huang et al., 2017): BN-ReLU-conv1x1 (4k), BN-ReLU-conv3x3 (k),
    its k new channels concatenated to its input."""

    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(x)))
        return torch.cat([x, self.conv2(F.relu(self.bn2(h)))], 1)


class DenseNet(FeaturesHead):
    """A DenseNet-BC block stack for 32x32 inputs: a 3x3 stem of ``2 growth`` channels, dense blocks of
    ``blocks[i]`` layers joined by transitions (BN-ReLU-conv1x1 halving the channels, 2x2 average pool),
    BN-ReLU, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, growth: int = 12, blocks=(6, 6, 6)):
        super().__init__()
        c = 2 * growth
        layers = [nn.Conv2d(in_channels, c, 3, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                            nn.AvgPool2d(2)))
                c //= 2
        self.features = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward_head(self, h):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(h)), 1).flatten(1))


def densenet(num_classes: int = 10, in_channels: int = 3, **kw) -> DenseNet:
    return DenseNet(num_classes, in_channels, **kw)


def channel_shuffle(x, groups: int):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit (Ma et al., 2018): at stride 1 the channels are split in half and one half
    goes through 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; at stride 2 both branches downsample. The
    halves are concatenated and the channels shuffled."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        half = c_out // 2
        b_in = c_in if stride > 1 else half
        if stride > 1:
            self.left = nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                                      nn.BatchNorm2d(c_in), nn.Conv2d(c_in, half, 1, bias=False), nn.BatchNorm2d(half),
                                      nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(b_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                                   nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
                                   nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(FeaturesHead):
    """ShuffleNetV2 for 32x32 inputs: a 3x3 stem (no max pool), three stages of (4, 8, 4) units at
    ``widths`` (0.5x by default), a 1x1 conv, mean pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths=(24, 48, 96, 192, 1024), repeats=(4, 8, 4)):
        super().__init__()
        c = widths[0]
        layers = [nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())]
        for out, n in zip(widths[1:-1], repeats):
            for i in range(n):
                layers.append(ShuffleUnit(c, out, 2 if i == 0 else 1))
                c = out
        layers.append(nn.Sequential(nn.Conv2d(c, widths[-1], 1, bias=False), nn.BatchNorm2d(widths[-1]), nn.ReLU()))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward_head(self, h):
        return self.fc(h.mean([2, 3]))


def shufflenet_v2(num_classes: int = 10, in_channels: int = 3, **kw) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, in_channels, **kw)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's), via NHWC."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (Liu et al., 2022): depthwise 7x7, LayerNorm over channels (NHWC), Linear 4x,
    GELU, Linear, per-channel layer scale, stochastic depth, residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6, drop: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop = StochasticDepth(drop)

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(h))))
        return x + self.drop(h.permute(0, 3, 1, 2))


class ConvNeXt(FeaturesHead):
    """A ConvNeXt block stack for 32x32 inputs: a 2x2 stride-2 patchify stem with LayerNorm, stages of
    ``depths`` blocks at ``dims`` joined by LayerNorm + 2x2 stride-2 convs, mean pooling, LayerNorm and
    a linear classifier. ``layer_scale`` initialises gamma (1e-6 in the paper; 0.1 by default here so
    that a randomly initialised block is not an identity to the tests)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dims=(32, 64, 128), depths=(2, 2, 2),
                 layer_scale: float = 0.1, drop_path: float = 0.0):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(in_channels, dims[0], 2, 2), LayerNorm2d(dims[0], eps=1e-6))]
        total, done = sum(depths), 0
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i > 0:
                layers.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)))
            for _ in range(n):
                layers.append(ConvNeXtBlock(d, layer_scale, drop_path * done / total))
                done += 1
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward_head(self, h):
        return self.fc(self.norm(h.mean([-2, -1])))


def convnext(num_classes: int = 10, in_channels: int = 3, **kw) -> ConvNeXt:
    return ConvNeXt(num_classes, in_channels, **kw)


class PatchEmbed(nn.Module):
    """ViT's input: ``patch`` x ``patch`` patches linearly embedded (a strided conv), a class token
    prepended and learned position embeddings added. ``(B, C, H, W) -> (B, 1 + HW/patch^2, dim)``."""

    def __init__(self, in_channels: int, dim: int, patch: int, image_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (image_size // patch) ** 2, dim))

    def forward(self, x):
        h = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos


class ViTBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, ``nn.MultiheadAttention``, residual; LayerNorm, MLP
    (GELU), residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        n = self.norm1(x)
        x = x + self.attn(n, n, n, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(FeaturesHead):
    """A small Vision Transformer (Dosovitskiy et al., 2021) for 32x32 inputs: 4x4 patches (64 tokens
    and a class token), ``depth`` pre-norm blocks of width ``dim``, a LayerNorm and a linear head on
    the class token."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dim: int = 64, depth: int = 4, heads: int = 4,
                 patch: int = 4, image_size: int = 32, mlp_ratio: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.features = nn.Sequential(PatchEmbed(in_channels, dim, patch, image_size),
                                      *[ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward_head(self, h):
        return self.fc(self.norm(h[:, 0]))


def vit(num_classes: int = 10, in_channels: int = 3, **kw) -> ViT:
    return ViT(num_classes, in_channels, **kw)


def torch_flatten(x):
    # A free function call (not a module): the engine must handle functional flatten too.
    return x.flatten(1)


def resnet20(**kw):
    return CifarResNet(3, **kw)


def resnet32(**kw):
    return CifarResNet(5, **kw)


def resnet44(**kw):
    return CifarResNet(7, **kw)


def resnet56(**kw):
    return CifarResNet(9, **kw)


def user_model(spec: str, **sizes) -> nn.Module:
    """``factory(**sizes)`` for ``spec = "package.module:factory"``: the factory gets those of
    ``num_classes``, ``in_channels`` and ``image_size`` that its signature names (all of them with
    ``**kwargs``) and must return an ``nn.Module``."""
    import inspect
    from .runtime import import_object
    factory = import_object(spec)
    try:
        params = inspect.signature(factory).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kw = {k: v for k, v in sizes.items() if takes_all or k in params}
    except (TypeError, ValueError):
        kw = {}
    model = factory(**kw)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


# name -> factory(num_classes=, in_channels=, **kw): the architectures of the benchmark and the trainer.
ARCHITECTURES = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44, "resnet56": resnet56,
                 "resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "efficientnet_b0": efficientnet_b0,
                 "densenet": densenet, "shufflenet_v2": shufflenet_v2, "convnext": convnext, "vit": vit}


def build_model(name: str, *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                depth: int = 2, width: int = 16) -> nn.Module:
    """Build a model by name: ``cnn`` (App. B, ``depth``/``width``), ``cnn8`` (the 8-layer CNN of
    Boopathy & Fiete, 2022, ``width``), ``mlp``, or one of
    :data:`ARCHITECTURES` at its standard size (``resnet20/32/44/56``, ``resnet18``, ``mobilenet_v2``,
    ``efficientnet_b0``, ``densenet``, ``shufflenet_v2``, ``convnext``, ``vit``), or a user's
    ``"package.module:factory"`` (:func:`user_model`)."""
    if ":" in name:  # a user's factory, "package.module:factory"
        return user_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if name == "cnn":
        return SimpleCNN(in_channels, num_classes, depth=depth, width=width)
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes, hidden=(width * 4, width * 4))
    if name == "cnn8":
        return boopathy_cnn8(width=width, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if name == "vit":
        return vit(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if name in ARCHITECTURES:
        return ARCHITECTURES[name](num_classes=num_classes, in_channels=in_channels)
    raise ValueError(f"unknown model {name!r}; choose from cnn, cnn8, mlp, {', '.join(ARCHITECTURES)}")
