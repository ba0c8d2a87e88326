"""The uniform baselines: every client runs the same strategy (fp32, all-ptq, all-qat)."""
from __future__ import annotations

from .base import Allocation, Allocator, FleetView


class UniformAllocator(Allocator):
    """Every client runs the same strategy (fp32, all-ptq, all-qat)."""

    def __init__(self, strategy: str, name: str):
        self.strategy = strategy
        self.name = name

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:
        return Allocation({c: self.strategy for c in sampled})
