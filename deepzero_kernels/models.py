"""Models used by the paper and by the tests: the App. B simple CNN, CIFAR ResNets (ResNet-20/32/44/56
and ResNet-18), MobileNetV2, an MLP.

All models are plain ``nn.Module`` code with no registration: the delta engine discovers their
structure by tracing them with ``torch.fx``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SimpleCNN", "MLP", "BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44",
           "resnet56", "resnet18", "InvertedResidual", "MobileNetV2", "mobilenet_v2", "build_model"]


class SimpleCNN(nn.Module):
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
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


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


class MobileNetV2(nn.Module):
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

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kw) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, width_mult, **kw)


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


def build_model(name: str, *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                depth: int = 2, width: int = 16) -> nn.Module:
    """Build a model by name: ``cnn`` (App. B, ``depth``/``width``), ``resnet20/32/44/56``,
    ``resnet18`` (64 channels wide), ``mobilenet_v2``, ``mlp``."""
    resnets = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44, "resnet56": resnet56,
               "resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
    if name == "cnn":
        return SimpleCNN(in_channels, num_classes, depth=depth, width=width)
    if name in resnets:
        return resnets[name](num_classes=num_classes, in_channels=in_channels)
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes, hidden=(width * 4, width * 4))
    raise ValueError(f"unknown model {name!r}; choose from cnn, mlp, {', '.join(resnets)}")
