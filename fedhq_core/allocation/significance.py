"""Data-distribution-related accuracy analysis: SigAcc_m, the *signed* gain in deployed accuracy
when client m trains with QAT instead of PTQ. It can be negative: QAT slows convergence, and
where PTQ is nearly lossless that costs more than QAT wins back (docs/design.md, the allocator).

Features (:data:`FEATURES`), computed by :func:`client_features` the same way at fitting time
(pilot runs, ``allocation.pilot``) and at run time (the allocator):

* the shard: log size, label entropy, Jensen-Shannon divergence from the global label
  distribution, number of classes present;
* the run's state: progress r/R and the global model's current quantization gap (FP32 minus
  quantized accuracy of the master under server-side PTQ, measured on the server's proxy split
  ``server_calib``, never on the test split; the mean of the last ``GAP_WINDOW`` measurements);
* the client's own reported sensitivity (the local accuracy its last PTQ round lost), where it
  has reported one; otherwise the fleet's mean report, flagged as imputed;
* what distinguishes settings of one family (dataset + model): the weight, activation and
  edge-layer bits, and the client's local steps x lr (epochs x batches of its shard x lr).

:class:`SignificanceModel` is a scikit-learn regressor features -> gain, with its in-sample and
cross-validated R²: GroupKFold by client, by pilot round, and leave-one-setting-out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = ("log_size", "label_entropy", "js_divergence", "classes_present", "progress", "quant_gap",
            "sensitivity", "has_sensitivity", "w_bits", "a_bits", "edge_bits", "steps_lr")

# the config fields a setting's features are made of (``setting_of``)
SETTING_FIELDS = ("w_bits", "a_bits", "first_last_bits", "local_epochs", "batch_size", "lr")


def setting_of(cfg) -> dict[str, float]:
    """The fields of ``cfg`` that SigAcc's setting features are made of."""
    return {k: float(getattr(cfg, k)) for k in SETTING_FIELDS}


GAP_WINDOW = 3   # [design] the gap feature is the mean of the last 3 measured gaps (its trend, less noise)


def gap_trend(history: list[float]) -> float:
    """The quantization-gap feature from the gaps measured so far (0 before the first)."""
    recent = history[-GAP_WINDOW:]
    return float(sum(recent) / len(recent)) if recent else 0.0


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


def shard_features(labels: np.ndarray, global_hist: np.ndarray) -> np.ndarray:
    """The four features of a shard (fixed for a run)."""
    h = label_histogram(labels, len(global_hist))
    return np.array([np.log(max(len(labels), 1)), entropy(h), js_divergence(h, global_hist), float((h > 0).sum())])


def fleet_shard_features(global_labels: np.ndarray, shard_labels: list[np.ndarray],
                         num_classes: int) -> dict[int, np.ndarray]:
    """:func:`shard_features` of every client (by id) against the pool's label distribution: what
    the server computes from the label histograms the clients send (``share_label_histograms``)."""
    hist = label_histogram(global_labels, num_classes)
    return {c: shard_features(labels, hist) for c, labels in enumerate(shard_labels)}


def measured_shard_features(seen_samples: dict[int, int], n_clients: int, num_classes: int) -> dict[int, np.ndarray]:
    """The shard features without label histograms: the sample count each upload carries (it
    weights FedAvg, so the server has it anyway; the median of those seen for a client not yet
    sampled), and the label composition taken as the pool's (entropy log C, divergence 0, every
    class present): the SigAcc model then tells clients apart by size alone."""
    sizes = list(seen_samples.values())
    typical = float(np.median(sizes)) if sizes else 1.0
    return {c: np.array([np.log(max(seen_samples.get(c, typical), 1)), np.log(num_classes), 0.0, float(num_classes)])
            for c in range(n_clients)}


def client_features(shard: np.ndarray, progress: float, quant_gap: float, sensitivity: float | None,
                    fleet_sensitivity: float | None, setting: dict[str, float]) -> np.ndarray:
    """One row of :data:`FEATURES`: ``shard`` from :func:`shard_features`, the run's state, then
    the setting's (``setting_of``)."""
    if sensitivity is None:
        sens, has = (fleet_sensitivity if fleet_sensitivity is not None else quant_gap), 0.0
    else:
        sens, has = sensitivity, 1.0
    batches = np.ceil(np.exp(shard[0]) / setting["batch_size"] - 1e-9)
    steps_lr = setting["local_epochs"] * batches * setting["lr"]
    edge = setting["first_last_bits"] or setting["w_bits"]
    return np.concatenate([shard, [progress, quant_gap, sens, has, setting["w_bits"], setting["a_bits"], edge,
                                   steps_lr]])


def feature_rows(shards: dict[int, np.ndarray], cids: list[int], progress: float, quant_gap: float,
                 sensitivity: dict[int, float], setting: dict[str, float]) -> np.ndarray:
    """Rows for ``cids`` at one point of a run (pilot and allocator call this same function)."""
    fleet = float(np.mean(list(sensitivity.values()))) if sensitivity else None
    return np.stack([client_features(shards[c], progress, quant_gap, sensitivity.get(c), fleet, setting)
                     for c in cids])


def cross_validated_r2(X: np.ndarray, gains: np.ndarray, groups: np.ndarray, seed: int, folds: int = 5) -> float:
    """Out-of-fold R² with GroupKFold: every group's rows (a client's, or a pilot round's)
    are predicted by a model that never saw that group. NaN when there are fewer than two groups."""
    from sklearn.model_selection import GroupKFold

    k = min(folds, len(np.unique(groups)))
    if k < 2:
        return float("nan")
    pred = np.empty_like(gains, dtype=float)
    for tr, te in GroupKFold(n_splits=k).split(X, gains, groups):
        pred[te] = _regressor(seed).fit(X[tr], gains[tr]).predict(X[te])
    ss = float(((gains - gains.mean()) ** 2).sum())
    return 1.0 - float(((gains - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


def _regressor(seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingRegressor

    # boosted shallow trees: fit in ~20 ms and predict in well under 1 ms (no joblib dispatch)
    return GradientBoostingRegressor(n_estimators=80, max_depth=2, learning_rate=0.1, subsample=0.8,
                                     random_state=seed)


@dataclass
class SignificanceModel:
    """Regressor features -> signed QAT-vs-PTQ gain; ``tags`` record the setting it was fitted for."""

    regressor: Any
    tags: dict[str, Any] = field(default_factory=dict)
    train_r2: float = float("nan")
    cv_r2: float = float("nan")          # GroupKFold by client
    cv_r2_rounds: float = float("nan")   # GroupKFold by pilot round (run states never seen)
    cv_r2_settings: float = float("nan")  # leave-one-setting-out (settings never seen)
    fit_data: dict[str, Any] | None = None  # X, gains, groups, seed: refitting on them rebuilds this model exactly
    fit_info: Any = None                 # pilot.FitInfo: what obtaining this model cost a run

    @classmethod
    def fit(cls, X: np.ndarray, gains: np.ndarray, seed: int, tags: dict[str, Any] | None = None,
            groups: np.ndarray | None = None, points: np.ndarray | None = None,
            settings: np.ndarray | None = None, cv: bool = True) -> "SignificanceModel":
        """``groups``: each row's client; ``points``: each row's pilot round; ``settings``: each
        row's setting (leave-one-setting-out CV). ``cv=False``: the regressor only (a run's
        refit of shipped rows; the CV figures come with the rows)."""
        X, gains = np.asarray(X, dtype=float), np.asarray(gains, dtype=float)
        groups = np.arange(len(gains)) if groups is None else np.asarray(groups)
        points = np.zeros(len(gains), dtype=int) if points is None else np.asarray(points)
        settings = np.zeros(len(gains), dtype=int) if settings is None else np.asarray(settings)
        reg = _regressor(seed).fit(X, gains)
        data = {"X": X.tolist(), "gains": gains.tolist(), "groups": groups.tolist(), "points": points.tolist(),
                "settings": settings.tolist(), "seed": seed}
        nan = float("nan")
        if not cv:
            return cls(reg, dict(tags or {}), float(reg.score(X, gains)), fit_data=data)
        return cls(reg, dict(tags or {}), float(reg.score(X, gains)), cross_validated_r2(X, gains, groups, seed),
                   cross_validated_r2(X, gains, points, seed),
                   cross_validated_r2(X, gains, settings, seed, folds=len(np.unique(settings))) if len(
                       np.unique(settings)) > 1 else nan, data)

    @property
    def r2(self) -> dict[str, float]:
        return {"train": self.train_r2, "cv": self.cv_r2, "cv_rounds": self.cv_r2_rounds,
                "cv_settings": self.cv_r2_settings}

    def to_state(self) -> dict[str, Any] | None:
        """Its fit data and fit quality (no pickles in checkpoints); None for a model loaded without them."""
        if self.fit_data is None:
            return None
        return {"fit_data": self.fit_data, "tags": self.tags, "r2": self.r2}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "SignificanceModel":
        """The same model again: the regressor refitted on its data and seed (deterministic); the
        R² figures as they were measured, not cross-validated a second time."""
        f = d["fit_data"]
        reg = _regressor(f["seed"]).fit(np.asarray(f["X"], dtype=float), np.asarray(f["gains"], dtype=float))
        r2 = d["r2"]
        return cls(reg, dict(d["tags"]), r2["train"], r2["cv"], r2["cv_rounds"], r2.get("cv_settings", float("nan")), f)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.regressor.predict(np.atleast_2d(X)), dtype=float)


def minmax(v: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant vector maps to 0.5 (no information either way)."""
    v = np.asarray(v, dtype=float)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return np.full_like(v, 0.5)
    return (v - lo) / (hi - lo)


# ---- the setting level: "does QAT pay here, and by how much" ----------------------------------
SETTING_FEATURES = ("w_step", "a_step", "edge_step", "log_lr", "local_epochs", "log_batch", "log_alpha", "fraction",
                    "log_clients")


def setting_row(s: dict[str, Any]) -> np.ndarray:
    """One setting's row of :data:`SETTING_FEATURES` from its covered fields (a family's
    ``settings`` entry, or a config's): the quantizers' step scale 2^-bits (their noise scales
    with it), the local schedule, and the partition's heterogeneity (Dirichlet: log alpha; iid:
    log 100, near-iid; k classes per client: log k)."""
    edge = s["first_last_bits"] or s["w_bits"]
    part = s.get("partition", "dirichlet")
    het = np.log(s["alpha"]) if part == "dirichlet" else np.log(100.0) if part == "iid" else np.log(
        s["classes_per_client"])
    return np.array([2.0 ** -s["w_bits"], 2.0 ** -s["a_bits"], 2.0 ** -edge, np.log(s["lr"]), s["local_epochs"],
                     np.log(s["batch_size"]), het, s["fraction"], np.log(s["clients"])], dtype=float)


def _setting_regressor() -> Any:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # a handful of settings: a linear model, its penalty chosen by the training settings' own LOO
    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 3, 11)))


def setting_level_fit(rows: np.ndarray, gains: np.ndarray) -> Any:
    return _setting_regressor().fit(np.asarray(rows, dtype=float), np.asarray(gains, dtype=float))


def setting_level_scores(rows: np.ndarray, gains: np.ndarray, ses: np.ndarray) -> dict[str, float]:
    """Leave-one-setting-out scores of the setting-level model, each setting's label predicted by
    a model fitted on the others: ``setting_level`` (R²; NaN with fewer than 3 settings),
    ``setting_level_sign`` (the share of the settings whose label lies 2 standard errors from 0
    where the predicted sign is the label's: the sign is the decision fedhq takes from it) and
    ``setting_level_regret`` (the largest label among the settings whose sign is mispredicted:
    what a wrong commit would have given up, in the labels' points)."""
    rows, gains, ses = (np.asarray(a, dtype=float) for a in (rows, gains, ses))
    nan = float("nan")
    if len(gains) < 3:
        return {"setting_level": nan, "setting_level_sign": nan, "setting_level_regret": nan}
    pred = np.array([setting_level_fit(np.delete(rows, i, 0), np.delete(gains, i)).predict(rows[i:i + 1])[0]
                     for i in range(len(gains))])
    ss = float(((gains - gains.mean()) ** 2).sum())
    clear = np.abs(gains) > 2 * ses
    wrong = (pred > 0) != (gains > 0)
    return {"setting_level": 1.0 - float(((gains - pred) ** 2).sum()) / ss if ss > 0 else nan,
            "setting_level_sign": float((~wrong[clear]).mean()) if clear.any() else nan,
            "setting_level_regret": float(np.abs(gains[wrong]).max()) if wrong.any() else 0.0}


def label_quality(gains: np.ndarray, ses: np.ndarray) -> dict[str, float]:
    """Whether labels carry signal: their median standard error against their spread (standard
    deviation); the target is a ratio below 0.5."""
    g, se = np.asarray(gains, dtype=float), np.asarray(ses, dtype=float)
    spread = float(g.std(ddof=1)) if len(g) > 1 else float("nan")
    med = float(np.nanmedian(se)) if len(se) else float("nan")
    return {"se_median": med, "spread": spread, "ratio": med / spread if spread > 0 else float("nan"), "n": len(g)}
