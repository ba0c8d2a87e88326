"""random-hybrid: random PTQ/QAT with a given QAT share (the ablation of FedHQ's choice of *which*
clients; the benchmark passes fedhq's measured share)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Allocation, Allocator, FleetView


class RandomHybridAllocator(Allocator):
    """Random PTQ/QAT with a given QAT share (the ablation of FedHQ's choice of *which* clients)."""

    name = "random-hybrid"

    def __init__(self, qat_share: float, seed: int):
        self.qat_share = qat_share
        self.seed = seed

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:
        rng = np.random.default_rng([self.seed, 4099, rnd])
        n_qat = int(round(self.qat_share * len(sampled)))
        qat = set(rng.choice(sampled, size=n_qat, replace=False).tolist()) if n_qat else set()
        return Allocation({c: ("qat" if c in qat else "ptq") for c in sampled})


def build(cfg: Any, significance: Any = None) -> RandomHybridAllocator:
    """The QAT share of the config, or 0.5 where it says automatic and no run supplied one."""
    return RandomHybridAllocator(cfg.qat_share if cfg.qat_share >= 0 else 0.5, cfg.seed)
