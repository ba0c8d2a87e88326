"""The round's QAT-versus-PTQ comparison of partial aggregates: the online SigAcc signal."""
from __future__ import annotations

from typing import Any

from ..server import partial_gain
from .base import CARRIED, Measurement


class PartialGain(Measurement):
    """The round's QAT and PTQ uploads aggregated apart from the master they started from, each
    deployed and scored on the proxy split (``server.partial_gain``); None for a round without
    both modes. Measured while the next round trains, so allocators read every value but the
    newest."""

    name, when, later_only, state_key = "partials", CARRIED, True, "partials"

    def measure(self, server: Any, results: list[Any]) -> float:
        gain, k = partial_gain(server.eval_model, server.global_state, server.global_ranges, results,
                               server.proxy.x, server.proxy.y)
        self.history.append(gain)
        return server.pricing.server.partial_s(k, k, self.cfg.upload_bits) if k else 0.0

    def read(self) -> list[float | None]:
        return self.history[:-1]

    def load(self, values: list[Any]) -> None:
        self.history = [None if g is None else float(g) for g in values]
