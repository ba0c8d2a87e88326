"""The fine stage's cost model: log(observed / spec-sheet) round time per client and strategy,
learned from the rounds so far (jitter and the hidden throttling the spec sheet misses). Stored
as plain numbers (checkpoints and the registry hold no pickles of it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def ridge_to_state(reg: Any) -> dict[str, Any] | None:
    """A fitted Ridge as plain numbers (checkpoints hold no pickles)."""
    if reg is None:
        return None
    return {"alpha": reg.alpha, "coef": np.asarray(reg.coef_).tolist(), "intercept": float(reg.intercept_)}


def ridge_from_state(d: dict[str, Any] | None) -> Any:
    if d is None:
        return None
    from sklearn.linear_model import Ridge

    reg = Ridge(alpha=d["alpha"])
    reg.coef_ = np.asarray(d["coef"], dtype=float)
    reg.intercept_ = float(d["intercept"])
    reg.n_features_in_ = len(reg.coef_)
    return reg


@dataclass
class CostModel:
    """log(observed / spec-sheet) time per (client, strategy), learned from past rounds."""

    seed: int = 0
    regressor: Any = None
    version: int = 0
    rows: list[list[float]] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    client_log_ratio: dict[int, list[float]] = field(default_factory=dict)

    def _features(self, cid: int, pred_s: float, is_qat: bool) -> list[float]:
        hist = self.client_log_ratio.get(cid, [])
        return [np.log(max(pred_s, 1e-9)), float(is_qat), float(np.mean(hist)) if hist else 0.0, float(len(hist))]

    def add(self, cid: int, pred_s: float, observed_s: float, is_qat: bool) -> None:
        self.rows.append(self._features(cid, pred_s, is_qat))
        target = float(np.log(max(observed_s, 1e-9) / max(pred_s, 1e-9)))
        self.targets.append(target)
        self.client_log_ratio.setdefault(cid, []).append(target)

    def refit(self) -> None:
        from sklearn.linear_model import Ridge

        # The signal is mostly per-client and persistent (hidden throttling) plus strategy: a
        # ridge regression on these features learns it and refits in about a millisecond, which
        # keeps the adjustment far under 1% of a run's wall time.
        reg = Ridge(alpha=1e-2)
        reg.fit(np.asarray(self.rows), np.asarray(self.targets))
        self.regressor = reg
        self.version += 1

    def to_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "version": self.version, "rows": self.rows, "targets": self.targets,
                "client_log_ratio": {str(k): v for k, v in self.client_log_ratio.items()},
                "regressor": ridge_to_state(self.regressor)}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "CostModel":
        return cls(d["seed"], ridge_from_state(d["regressor"]), d["version"], [list(r) for r in d["rows"]],
                   list(d["targets"]), {int(k): list(v) for k, v in d["client_log_ratio"].items()})

    def correct(self, cids: list[int], pred: np.ndarray, is_qat: bool) -> np.ndarray:
        if self.regressor is None:
            return pred
        X = np.asarray([self._features(c, p, is_qat) for c, p in zip(cids, pred)])
        return pred * np.exp(self.regressor.predict(X))
