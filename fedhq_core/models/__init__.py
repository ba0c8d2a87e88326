"""Models: a small CNN (default), ResNet-18 adapted to 32x32 inputs, and the user's own
(``package.module:factory``)."""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and two linear layers; works for any input size divisible by 4."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, size: int = 32, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(2 * width * (size // 4) ** 2, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


def resnet18_cifar(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 images."""
    from torchvision.models import resnet18

    m = resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, _ = in_shape
    if name == "cnn":
        return SmallCNN(c, num_classes, h)
    if name == "resnet18":
        return resnet18_cifar(c, num_classes)
    if ":" in name:
        return plugin_model(name, in_shape, num_classes)
    raise ValueError(f"model: unknown model {name!r}")


def plugin_model(spec: str, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """``package.module:factory``: the user's factory, passed ``in_shape`` (C, H, W) and
    ``num_classes`` if its signature names them, must return an ``nn.Module`` with at least one
    Conv2d or Linear layer (every one is quantized, the first/last-layer rule included)."""
    from ..errors import ConfigError
    from ..plugins import call_with, load_object

    model = call_with(load_object(spec, "model"), "model", in_shape=tuple(in_shape), num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules()):
        raise ConfigError(f"model: {spec} has no Conv2d or Linear layer to quantize")
    return model
