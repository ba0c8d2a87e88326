"""Allocators: which strategy (fp32 / ptq / qat) each sampled client runs each round, one per
module (``uniform``, ``random_hybrid``, ``fedfq``, ``fedhq``), behind the seam of ``base``."""
from __future__ import annotations

from ..config import ExperimentConfig
from .base import Allocation, Allocator, Capabilities, FleetView, RoundFeedback
from .fedfq import FedFQAllocator
from .fedhq import FedHQAllocator, allocate_coarse, best_deadline, objective
from .random_hybrid import RandomHybridAllocator
from .significance import SignificanceModel
from .uniform import UniformAllocator


def build_allocator(cfg: ExperimentConfig, significance: SignificanceModel | None = None) -> Allocator:
    s = cfg.strategy
    if s == "fp32":
        return UniformAllocator("fp32", s)
    if s == "all-ptq":
        return UniformAllocator("ptq", s)
    if s == "all-qat":
        return UniformAllocator("qat", s)
    if s == "random-hybrid":
        return RandomHybridAllocator(cfg.qat_share if cfg.qat_share >= 0 else 0.5, cfg.seed)
    if s in ("fedhq", "fedhq-coarse"):
        return FedHQAllocator(cfg.xi, significance, fine=(s == "fedhq"), adjust_every=cfg.adjust_every,
                              seed=cfg.seed, uses_significance=cfg.significance != "none",
                              max_stretch=cfg.max_stretch)
    if s == "fedfq":
        return FedFQAllocator()
    raise ValueError(f"strategy: unknown strategy {s!r}")


__all__ = ["FedFQAllocator", "FedHQAllocator", "SignificanceModel", "allocate_coarse", "best_deadline", "objective",
           "Allocation", "Allocator", "Capabilities", "FleetView", "RandomHybridAllocator", "RoundFeedback",
           "UniformAllocator", "build_allocator"]
