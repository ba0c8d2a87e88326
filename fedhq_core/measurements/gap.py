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
    (``significance.gap_trend``)."""

    name, when, state_key = "gap", DURING, "gaps"

    def measure(self, server: Any, results: list[Any]) -> float:
        self.history.append(proxy_gap(server.eval_model, server.global_state, server.proxy.x, server.proxy.y))
        return server.pricing.server.gap_s()

    def read(self) -> float:
        return gap_trend(self.history)

    def load(self, values: list[Any]) -> None:
        self.history = [float(g) for g in values]
