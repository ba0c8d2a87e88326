"""Allocators: which strategy (fp32 / ptq / qat) each sampled client runs each round, one per
module (``uniform``, ``random_hybrid``, ``fedfq``, ``fedhq``), behind the seam of ``base``."""
from __future__ import annotations

from ..config import ExperimentConfig
from .base import Allocation, Allocator, Capabilities, FleetView, RoundFeedback, UplinkSearch
from .fedfq import FedFQAllocator
from .fedhq import FedHQAllocator, allocate_coarse, best_deadline, objective
from .random_hybrid import RandomHybridAllocator
from .significance import SignificanceModel
from .uniform import UniformAllocator


def build_allocator(cfg: ExperimentConfig, significance: SignificanceModel | None = None) -> Allocator:
    """The allocator of ``cfg.strategy``: its registry line (``fedhq_core.strategies``) names the
    factory, called with the config and the SigAcc model."""
    from importlib import import_module

    from ..strategies import REGISTRY

    if cfg.strategy not in REGISTRY:
        raise ValueError(f"strategy: unknown strategy {cfg.strategy!r}")
    module, function = REGISTRY[cfg.strategy].factory.split(":")
    return getattr(import_module(f".{module}", __name__), function)(cfg, significance)


__all__ = ["FedFQAllocator", "FedHQAllocator", "SignificanceModel", "allocate_coarse", "best_deadline", "objective",
           "Allocation", "Allocator", "Capabilities", "FleetView", "RandomHybridAllocator", "RoundFeedback",
           "UniformAllocator", "UplinkSearch", "build_allocator"]
