"""During a fork (fedhq's ``explore: fork``): the QAT lineage's master against the PTQ lineage's."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..allocation.fedhq import FORK_WINDOW as WINDOW
from ..server import deployment, image_scores, paired_points
from .base import DURING, Measurement


class LineageGain(Measurement):
    """Each lineage's master, as the clients of the round received it, deployed as a run deploys
    it (its own ranges and weight steps) and scored on the same proxy images, while the round's
    clients train. The gain is QAT minus PTQ accuracy with each image's answer averaged over the
    last ``WINDOW`` rounds of the fork, with its paired standard error over the images; the server
    deploys the lineage it favours. Nothing outside a fork (and nothing on the fork's first round,
    whose two masters are one)."""

    name, when, later_only, state_key = "lineages", DURING, True, "lineages"

    def __init__(self, cfg: Any = None):
        super().__init__(cfg)
        self.window: list[tuple[np.ndarray, np.ndarray]] = []   # (PTQ, QAT) lineages' answers per image

    def measure(self, server: Any, results: list[Any]) -> float:
        if server.fork is None:
            self.window = []
            return 0.0
        if not self._diverged(server):
            return 0.0
        right = []
        for qat in (False, True):
            with server.lineage(qat):
                with deployment(server.eval_model, server.global_state, server.deploy_ranges(), server.global_steps,
                                "lineage (server)") as m:
                    right.append(image_scores(m, server.proxy.x, server.proxy.y)[0].astype(float))
        self.window = (self.window + [(right[0], right[1])])[-WINDOW:]
        ptq, qat = (np.mean([w[i] for w in self.window], axis=0) for i in (0, 1))
        gain, se = paired_points(qat, ptq)
        entry = {"accuracy": gain / 100.0, "accuracy_se": se / 100.0, "rounds": len(self.window)}
        self.history.append(entry)
        self.fresh = {f"lineage_{k}": float(v) for k, v in entry.items()}
        server.deploy_qat_lineage = gain > 0
        return 2 * server.pricing.server.proxy_s()

    @staticmethod
    def _diverged(server: Any) -> bool:
        """False on the fork's first round: both lineages still hold the same master."""
        a, b = server.global_state, server.fork["global_state"]
        return any(not bool((a[k] == b[k]).all()) for k in a if a[k].is_floating_point())

    def read(self) -> list[dict[str, float]]:
        return list(self.history)

    def state(self) -> list[Any]:
        return [list(self.history), [[p.tolist(), q.tolist()] for p, q in self.window]]

    def load(self, values: list[Any]) -> None:
        if values and isinstance(values[0], list):
            self.history = [dict(h) for h in values[0]]
            self.window = [(np.asarray(p, dtype=float), np.asarray(q, dtype=float)) for p, q in values[1]]
        else:
            self.history, self.window = [], []
