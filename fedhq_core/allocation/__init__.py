"""Allocators: which strategy (fp32 / ptq / qat) each sampled client runs each round."""
from __future__ import annotations

from ..config import ExperimentConfig
from .base import Allocation, Allocator, FleetView, RandomHybridAllocator, RoundFeedback, UniformAllocator


def build_allocator(cfg: ExperimentConfig) -> Allocator:
    s = cfg.strategy
    if s == "fp32":
        return UniformAllocator("fp32", s)
    if s == "all-ptq":
        return UniformAllocator("ptq", s)
    if s == "all-qat":
        return UniformAllocator("qat", s)
    if s == "random-hybrid":
        return RandomHybridAllocator(cfg.qat_share if cfg.qat_share >= 0 else 0.5, cfg.seed)
    raise ValueError(f"strategy: {s!r} is not available yet")


__all__ = ["Allocation", "Allocator", "FleetView", "RandomHybridAllocator", "RoundFeedback", "UniformAllocator",
           "build_allocator"]
