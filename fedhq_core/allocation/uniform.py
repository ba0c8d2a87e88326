"""The uniform baselines: every client runs the same strategy (fp32, all-ptq, all-qat)."""
from __future__ import annotations

from typing import Any

from ..client import Mode
from .base import Allocation, Allocator, Capabilities, FleetView


class UniformAllocator(Allocator):
    """Every client runs the same client mode (fp32, all-ptq, all-qat). FP32 clients send float32
    updates and no activation ranges: the server calibrates the deployment and prices the
    aggregation at 32 bits."""

    def __init__(self, mode: str, name: str):
        self.strategy = mode
        self.name = name

    @property
    def capabilities(self) -> Capabilities:
        fp32 = self.strategy == Mode.FP32
        return Capabilities(server_calibrates=fp32, aggregate_bits=32 if fp32 else None)

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:
        return Allocation({c: self.strategy for c in sampled})


def build_fp32(cfg: Any, significance: Any = None) -> UniformAllocator:
    return UniformAllocator(Mode.FP32, "fp32")


def build_all_ptq(cfg: Any, significance: Any = None) -> UniformAllocator:
    return UniformAllocator(Mode.PTQ, "all-ptq")


def build_all_qat(cfg: Any, significance: Any = None) -> UniformAllocator:
    return UniformAllocator(Mode.QAT, "all-qat")
