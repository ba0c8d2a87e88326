"""A plug-in model the exporter cannot map (``torch.sort``): it trains, registers, and ``fedhq
export`` refuses it with one line."""
from __future__ import annotations

import torch
from torch import nn


class Sorts(nn.Module):
    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(self.fc(torch.flatten(x, 1)), dim=1).values


def build(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = in_shape
    return Sorts(c * h * w, num_classes)
