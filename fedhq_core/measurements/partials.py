"""The round's QAT-versus-PTQ comparison of partial aggregates: the online SigAcc signal."""
from __future__ import annotations

from typing import Any

from ..server import partial_gain
from .base import CARRIED, Measurement


class PartialGain(Measurement):
    """The round's QAT and PTQ uploads aggregated apart from the master they started from, each
    deployed and scored on the same proxy images (``server.partial_gain``); None for a round
    without both modes. Measured while the next round trains, so allocators read every value but
    the newest, as the gain ``config.online_statistic`` names (``accuracy``; ``tcp``: the
    paired mean true-class probability). Every statistic is kept (``history``) and recorded with
    its round (``partial_<statistic>``)."""

    name, when, later_only, state_key = "partials", CARRIED, True, "partials"

    @property
    def statistic(self) -> str:
        return getattr(self.cfg, "online_statistic", "accuracy")

    def measure(self, server: Any, results: list[Any]) -> float:
        gains, k = partial_gain(server.eval_model, server.global_state, server.global_ranges, results,
                                server.proxy.x, server.proxy.y)
        self.history.append(gains)
        self.fresh = {f"partial_{n}": v for n, v in (gains or {}).items()}
        return server.pricing.server.partial_s(k, k, self.cfg.upload_bits) if k else 0.0

    def gains(self) -> list[float | None]:
        """Every comparison so far, as the configured statistic."""
        return [None if g is None else g.get(self.statistic) for g in self.history]

    def read(self) -> list[float | None]:
        return self.gains()[:-1]

    def load(self, values: list[Any]) -> None:
        # a checkpoint of a build that kept the accuracy gain alone holds plain numbers
        self.history = [None if g is None else {k: float(v) for k, v in g.items()} if isinstance(g, dict)
                        else {"accuracy": float(g)} for g in values]
