"""Models used by the paper and by the tests: the App. B simple CNN, CIFAR ResNets, an MLP.

All models are plain ``nn.Module`` code with no registration: the delta engine discovers their
structure by tracing them with ``torch.fx``.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SimpleCNN", "MLP", "BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44",
           "resnet56", "build_model"]


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
    pooling and a linear classifier. ResNet-20 (n=3) has 269,722 parameters with option A."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3, option: str = "A",
                 widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, option))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch_flatten(self.pool(out))
        return self.fc(out)


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
    """Build a model by name: ``cnn`` (App. B, ``depth``/``width``), ``resnet20/32/44/56``, ``mlp``."""
    resnets = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44, "resnet56": resnet56}
    if name == "cnn":
        return SimpleCNN(in_channels, num_classes, depth=depth, width=width)
    if name in resnets:
        return resnets[name](num_classes=num_classes, in_channels=in_channels)
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes, hidden=(width * 4, width * 4))
    raise ValueError(f"unknown model {name!r}; choose from cnn, mlp, {', '.join(resnets)}")
