"""A network of one's own for FedHQ: ``model: examples.tiny_resnet:build``.

Any ``nn.Module`` works. FedHQ turns every ``nn.Conv2d`` and ``nn.Linear`` into its quantizable
twin (the first and last of them, in registration order, keep ``first_last_bits``), prices the
network's steps from an op-level trace of what it runs, and exports it to ONNX when its
operations are among the exporter's (``fedhq_core.quant.export.SUPPORTED``).

The factory is called with the keyword arguments its signature names among ``in_shape``
(C, H, W) and ``num_classes``.
"""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.block = Block(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.block(x)
        return self.head(torch.flatten(self.pool(x), 1))


def build(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return TinyResNet(in_shape[0], num_classes)


def no_layers(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """What FedHQ refuses in one line: a network with nothing to quantize."""
    return nn.Sequential(nn.Flatten(), nn.Softmax(dim=1))
