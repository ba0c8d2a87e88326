"""The master's quantization gap under server-side PTQ, each round."""
from __future__ import annotations

from typing import Any

from ..allocation.significance import gap_trend
from ..server import proxy_gap
from .base import DURING, Measurement


class QuantGap(Measurement):
    """FP32 minus quantized accuracy of the master the clients started from (ranges calibrated on
    the proxy split, MSE weight scales), never on the test split. Measured while the clients
    train, so the next allocation sees it one round late; allocators read its trend
    (``significance.gap_trend``), and fedhq's online commit each gap with its paired standard
    error over the proxy images (:meth:`paired`)."""

    name, when, state_key = "gap", DURING, "gaps"

    def __init__(self, cfg: Any = None):
        super().__init__(cfg)
        self.ses: list[float] = []

    def measure(self, server: Any, results: list[Any]) -> float:
        gap, se = proxy_gap(server.eval_model, server.global_state, server.proxy.x, server.proxy.y)
        self.history.append(gap)
        self.ses.append(se)
        self.fresh = {"quant_gap_measured_se": se}   # beside quant_gap_measured
        return server.pricing.server.gap_s()

    def read(self) -> float:
        return gap_trend(self.history)

    def paired(self) -> list[tuple[float, float]]:
        """Every gap so far with its paired standard error."""
        return list(zip(self.history, self.ses))

    def state(self) -> list[Any]:
        return [[g, se] for g, se in self.paired()]

    def load(self, values: list[Any]) -> None:
        # a checkpoint of a build that kept the gaps alone holds plain numbers (standard error unknown)
        pairs = [(float(v[0]), float(v[1])) if isinstance(v, (list, tuple)) else (float(v), float("nan")) for v in values]
        self.history, self.ses = [g for g, _ in pairs], [se for _, se in pairs]
