"""FedFQ baseline (arXiv 2408.08977): FP32 local training, uplink update compressed with a
fine-grained bit allocation found by constraint-guided simulated annealing
(``quant.bit_allocation.fedfq_bits``, run by each client on its update).
"""
from __future__ import annotations

from typing import Any

from ..client import Mode
from .base import Allocation, Allocator, Capabilities, FleetView, UplinkSearch


class FedFQAllocator(Allocator):
    """FP32 local training; every client's uplink is bit-allocated by simulated annealing. Its
    clients send no activation ranges (the server calibrates), and the aggregation is priced at
    the average of the per-tensor bits."""

    name = "fedfq"

    def __init__(self, avg_bits: float = 4.0, iters: int = 300):
        self.search = UplinkSearch(avg_bits, iters)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(server_calibrates=True,
                            aggregate_bits=int(min(8, max(2, round(self.search.avg_bits)))))

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:
        return Allocation({c: Mode.FP32 for c in sampled}, upload_bits={c: self.search for c in sampled})


def build(cfg: Any, significance: Any = None) -> FedFQAllocator:
    return FedFQAllocator(cfg.fedfq_avg_bits, cfg.fedfq_iters)
