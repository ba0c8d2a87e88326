"""Data-distribution-related accuracy analysis: SigAcc_m, how much the deployed model gains when
client m trains with QAT instead of PTQ.

Features of a client's shard: size, label entropy, Jensen-Shannon divergence from the global
label distribution, number of classes present, and the model's quantization sensitivity there
(the local accuracy its PTQ lost, as the client reports it). An offline fitting step runs short
pilot rounds, measures per-client QAT-vs-PTQ gains, and fits a scikit-learn regressor that
maps features to gains (:class:`SignificanceModel`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = ("log_size", "label_entropy", "js_divergence", "classes_present", "quant_sensitivity")


def label_histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    h = np.bincount(labels, minlength=num_classes).astype(float)
    return h / max(h.sum(), 1.0)


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log(a[mask] / b[mask])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def client_features(labels: np.ndarray, global_hist: np.ndarray, quant_sensitivity: float) -> np.ndarray:
    h = label_histogram(labels, len(global_hist))
    return np.array([np.log(max(len(labels), 1)), entropy(h), js_divergence(h, global_hist),
                     float((h > 0).sum()), quant_sensitivity])


@dataclass
class SignificanceModel:
    """Regressor features -> QAT-vs-PTQ gain; ``tags`` record the setting it was fitted for."""

    regressor: Any
    tags: dict[str, Any] = field(default_factory=dict)
    train_r2: float = float("nan")
    fit_data: dict[str, Any] | None = None  # X, gains, seed: refitting on them rebuilds this model exactly

    @classmethod
    def fit(cls, X: np.ndarray, gains: np.ndarray, seed: int, tags: dict[str, Any] | None = None) -> "SignificanceModel":
        from sklearn.ensemble import GradientBoostingRegressor

        # boosted shallow trees: fit in ~20 ms and predict in well under 1 ms (no joblib dispatch)
        reg = GradientBoostingRegressor(n_estimators=80, max_depth=2, learning_rate=0.1, subsample=0.8,
                                        random_state=seed)
        reg.fit(X, gains)
        data = {"X": np.asarray(X).tolist(), "gains": np.asarray(gains).tolist(), "seed": seed}
        return cls(reg, dict(tags or {}), float(reg.score(X, gains)), data)

    def to_state(self) -> dict[str, Any] | None:
        """Its fit data (no pickles in checkpoints); None for a model loaded without them."""
        return None if self.fit_data is None else {"fit_data": self.fit_data, "tags": self.tags}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "SignificanceModel":
        f = d["fit_data"]
        model = cls.fit(np.asarray(f["X"]), np.asarray(f["gains"]), f["seed"], d["tags"])
        model.tags = dict(d["tags"])
        return model

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.regressor.predict(np.atleast_2d(X)), dtype=float)


def minmax(v: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant vector maps to 0.5 (no information either way)."""
    v = np.asarray(v, dtype=float)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return np.full_like(v, 0.5)
    return (v - lo) / (hi - lo)
