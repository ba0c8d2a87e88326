"""The FedHQ allocator: coarse geometric initialization, then fine-grained ML-based adjustment.

Coarse [paper: 2D space of normalised speed and accuracy significance; design: the rules]:
  * g_m = SigAcc_m, the predicted *signed* gain of QAT over PTQ; g_m <= 0 -> PTQ;
  * speed score v_m = 1 / t_m^PTQ, normalised to s_m in [0, 1] (1 = fastest);
  * a_m = g_m min-max normalised over the clients with g_m > 0;
  * free QAT: g_m > 0 and t_m^QAT <= T* = max over sampled clients of t^PTQ costs no round time;
  * otherwise (g_m > 0) QAT iff (1 - xi) * a_m >= xi * (1 - s_m)  (xi = 1: free QAT only).

Fine [paper: ML-based adjustment with a cost model; design: what it learns and the search]:
  * a cost model (scikit-learn) learns log(observed / spec-sheet time) per client and strategy
    from the rounds so far (jitter and hidden throttling that the spec sheet misses);
  * the gain estimates follow the run: every round the features are recomputed from what the
    rounds showed (progress, the server's measured quantization gap, the PTQ clients' measured
    sensitivities), and the estimate is logged per round;
  * online: the server compares each round's QAT and PTQ partial aggregates on its proxy split
    (``server.partial_gain``, priced, measured while the next round trains, so seen one round
    late); the trend of those comparisons sets the level of the gains: alone when no family
    model covers the run (``online`` mode), blended with the family's prediction otherwise
    (weight n / (n + PRIOR_ROUNDS) after n comparisons). A round whose gains are all <= 0 still
    gives its fastest free client QAT (a probe), so the comparison keeps coming (its upload is
    aggregated like any other: measured without it, digits at w2a2 ended 2.6 points lower);
  * every ``adjust_every`` rounds the cost model is refitted (a new registry version); its error
    on the next round is reported beside the spec sheet's;
  * the search minimises J(x) = xi * T(x) / T_ref + (1 - xi) * (A_ref - A(x)) / A_ref exactly
    (A(x) = sum of g_m over QAT clients, A_ref = sum of the positive g_m): for a round deadline
    T, every positive-gain client with t^QAT <= T lowers J at no time cost, so the optimum is
    the best of the candidate deadlines (:func:`best_deadline`). Fast clients take QAT first.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..hardware.server_work import gbr_predict_elements
from .base import Allocation, Allocator, Capabilities, FleetView, RoundFeedback
from .cost_model import CostModel, ridge_from_state, ridge_to_state
from .significance import FEATURES, GAP_WINDOW, SignificanceModel, feature_rows, gap_trend, minmax

PRIOR_ROUNDS = 3   # [design] a family's prediction weighs as much as 3 online comparisons
CONFIDENCE = 2.0   # [design] the online level is the trend less 2 standard errors


def normalised_significance(gains: np.ndarray) -> np.ndarray:
    """a_m: min-max over the positive gains; 0 where the gain is not positive."""
    pos = gains > 0
    a = np.zeros_like(gains, dtype=float)
    if pos.any():
        a[pos] = minmax(gains[pos]) if pos.sum() > 1 else 1.0
    return a


def allocate_coarse(s_hat: np.ndarray, gains: np.ndarray, t_ptq: np.ndarray, t_qat: np.ndarray,
                    xi: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean QAT mask and the free-QAT mask of the coarse stage (QAT only where g_m > 0)."""
    pos = gains > 0
    a_hat = normalised_significance(gains)
    deadline = float(np.max(t_ptq))
    free = pos & (t_qat <= deadline)
    line = pos & ((1.0 - xi) * a_hat >= xi * (1.0 - s_hat)) if xi < 1.0 else np.zeros_like(free)
    return free | line, free


def objective(x: np.ndarray, t_ptq: np.ndarray, t_qat: np.ndarray, gains: np.ndarray, xi: float) -> float:
    t_ref = float(np.max(t_ptq))
    a_ref = float(np.clip(gains, 0, None).sum()) or 1.0
    t = float(np.max(np.where(x, t_qat, t_ptq)))
    return xi * t / t_ref + (1.0 - xi) * (a_ref - float(gains[x].sum())) / a_ref


def best_deadline(gains: np.ndarray, t_ptq: np.ndarray, t_qat: np.ndarray, xi: float,
                  max_stretch: float = float("inf")) -> np.ndarray:
    """The QAT mask minimising :func:`objective` exactly, with the round at most ``max_stretch``
    x T_ref long. For a deadline T >= T_ref = max t^PTQ, QAT for every positive-gain client with
    t^QAT <= T is best (each lowers the accuracy term and none raises the round time past T); so
    J is evaluated at T_ref and at each positive client's t^QAT above it within the stretch
    (sorted, cumulative gains: O(n log n))."""
    pos = gains > 0
    t_ref = float(np.max(t_ptq))
    a_ref = float(gains[pos].sum()) or 1.0
    order = np.argsort(t_qat[pos], kind="stable")
    tq, cum = t_qat[pos][order], np.cumsum(gains[pos][order])
    keep = tq <= max_stretch * t_ref
    tq, cum = tq[keep], cum[keep]
    deadlines = np.maximum(tq, t_ref)
    j = xi * deadlines / t_ref + (1.0 - xi) * (a_ref - cum) / a_ref
    j0 = xi + (1.0 - xi) * (a_ref - float(gains[pos & (t_qat <= t_ref)].sum())) / a_ref if pos.any() else xi
    if not len(j) or j0 <= float(j.min()) + 1e-12:
        return pos & (t_qat <= t_ref)
    return pos & (t_qat <= float(deadlines[int(np.argmin(j))]))


class FedHQAllocator(Allocator):
    """``fine=False`` is the ``fedhq-coarse`` ablation (stage 1 only, spec-sheet times)."""

    def __init__(self, xi: float, significance: SignificanceModel | None, *, fine: bool = True,
                 adjust_every: int = 3, seed: int = 0, uses_significance: bool = True,
                 max_stretch: float = float("inf")):
        import sklearn.linear_model  # noqa: F401  (import once here, not inside a timed adjustment)

        self.name = "fedhq" if fine else "fedhq-coarse"
        self.xi = xi
        self.significance = significance
        self.fine = fine
        self.adjust_every = adjust_every
        self.max_stretch = max_stretch
        self.cost = CostModel(seed=seed)
        self.quant_sensitivity: dict[int, float] = {}
        self._refits: list[dict[str, Any]] = []     # new cost-model versions, for the tracking layer
        self._last_pred: dict[int, tuple[float, float]] = {}  # cid -> (cost-model pred, spec pred)
        self.uses_significance = uses_significance   # False with `significance: none`: by speed alone
        self._pending_sensitivity: dict[int, float] = {}
        self._estimate: dict[str, float] = {}   # the round's estimate: family and online gain levels

    @property
    def capabilities(self) -> Capabilities:
        """It wants a SigAcc model (unless ``significance: none``); the fine stage's estimate reads
        the master's quantization gap and the PTQ uploads' sensitivity (once it has a family
        model) and the round's QAT-vs-PTQ partial aggregates (online, with or without one)."""
        family = self.fine and self.significance is not None
        return Capabilities(uses_significance=self.uses_significance,
                            measurements=frozenset((["gap", "sensitivity"] if family else [])
                                                   + (["partials"] if self.fine and self.uses_significance else [])))

    @property
    def refits(self) -> list[dict[str, Any]]:
        return self._refits

    # --- analyses ----------------------------------------------------------------------
    def significance_of(self, cids: list[int], view: FleetView, rnd: int = 0) -> np.ndarray:
        """Signed gains g_m from the run's current state (the fine stage's online update; the
        coarse-only ablation keeps the initial state's). Without SigAcc (``significance: none``)
        every client counts as gaining equally: the allocation is then by speed alone."""
        self._estimate = {}
        if not self.uses_significance:
            return np.ones(len(cids))
        pred = np.zeros(len(cids))
        if self.significance is not None:
            if not self.fine:   # fedhq-coarse: the estimate of the initial state, never updated
                rows = feature_rows(view.shard_features(), cids, 0.0, 0.0, {}, view.setting)
                with self.work.op("gbr_predict", 1, gbr_predict_elements(len(cids))):
                    return self.significance.predict(rows)
            rows = feature_rows(view.shard_features(), cids, rnd / view.rounds, view.quant_gap,
                                self.quant_sensitivity, view.setting)
            with self.work.op("gbr_predict", 1, gbr_predict_elements(len(cids))):
                pred = self.significance.predict(rows)
        online = [g for g in view.online_gains if g is not None]
        self._estimate = {"online_n": len(online)}
        if self.significance is not None:
            self._estimate["family_gain"] = float(pred.mean())
        if not online:
            return pred
        trend = gap_trend(online)
        recent = min(len(online), GAP_WINDOW)
        # QAT must earn its place: the level is the trend's lower bound, less CONFIDENCE standard
        # errors of a difference of two accuracies on the proxy split (at p = 0.5, the widest)
        level = trend - CONFIDENCE * np.sqrt(0.5 / view.proxy_size) / np.sqrt(recent)
        w = len(online) / (len(online) + PRIOR_ROUNDS) if self.significance is not None else 1.0
        self._estimate.update(online_gain=trend, online_level=float(level))
        return pred + w * (level - float(pred.mean()))

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:
        t0 = time.perf_counter()
        n = len(sampled)
        spec = view.predicted_times(sampled)
        t_ptq, t_qat = spec["ptq"], spec["qat"]
        if self.fine:
            t_ptq = self.cost.correct(sampled, t_ptq, False)
            t_qat = self.cost.correct(sampled, t_qat, True)
        s_hat = minmax(1.0 / t_ptq)
        gains = self.significance_of(sampled, view, rnd)
        x, free = allocate_coarse(s_hat, gains, t_ptq, t_qat, self.xi)
        coarse = x.copy()
        adjusted = bool(self.fine and self.cost.regressor is not None)
        probe = -1
        if self.fine:
            x = best_deadline(gains, t_ptq, t_qat, self.xi, max_stretch=self.max_stretch)
            if not x.any() and self.capabilities.reads("partials"):
                fastest = int(np.argmin(t_qat))     # a probe keeps the online comparison coming
                if t_qat[fastest] <= float(np.max(t_ptq)):
                    x[fastest], probe = True, fastest
        strategies = {c: ("qat" if q else "ptq") for c, q in zip(sampled, x)}
        self._last_pred = {c: (float(np.where(q, tq, tp)), float(np.where(q, sq, sp)))
                           for c, q, tp, tq, sp, sq in zip(sampled, x, t_ptq, t_qat, spec["ptq"], spec["qat"])}
        estimate = {"gain_mean": float(gains.mean()), "gain_positive_share": float((gains > 0).mean()),
                    "n_probe": int(probe >= 0), **self._estimate}
        if self.capabilities.reads("gap"):
            estimate["quant_gap"] = float(view.quant_gap)
        info = {
            "qat_share": float(x.mean()), "n_free_qat": int(free.sum()), "n_flipped": int((x != coarse).sum()),
            "n_sign_ptq": int((gains <= 0).sum()), **estimate,
            "pred_round_s": float(np.max(np.where(x, t_qat, t_ptq))), "cost_model_version": self.cost.version,
            "scatter": {"cids": list(sampled), "s_hat": s_hat.tolist(), "a_hat": normalised_significance(gains).tolist(),
                        "gain": gains.tolist(), "qat": x.tolist(), "free": free.tolist(), "coarse": coarse.tolist(),
                        "xi": self.xi, "round": rnd, "adjusted": adjusted},
            "alloc_compute_s": time.perf_counter() - t0,
        }
        return Allocation(strategies, info=info)

    def observe(self, feedback: RoundFeedback, view: FleetView) -> dict[str, float]:
        out: dict[str, float] = {}
        errs_model, errs_spec = [], []
        new = {r.cid: float(r.quant_loss) for r in feedback.results if r.quant_loss is not None}
        if self.sensitivity_lag:   # measured by the server while the next round trained
            self.quant_sensitivity.update(self._pending_sensitivity)
            self._pending_sensitivity = new
        else:
            self.quant_sensitivity.update(new)
        for r in feedback.results:
            t = feedback.times[r.cid]
            spec_total = t.compute_s + t.upload_s
            if r.cid in self._last_pred:
                pred_model, pred_spec = self._last_pred[r.cid]
                errs_model.append(abs(pred_model - t.total_s) / t.total_s)
                errs_spec.append(abs(pred_spec - t.total_s) / t.total_s)
            self.cost.add(r.cid, spec_total, t.total_s, r.strategy == "qat")
        if errs_model:
            out["cost_model_mape"] = float(np.mean(errs_model))
            out["spec_sheet_mape"] = float(np.mean(errs_spec))
        if self.fine and (feedback.rnd + 1) % self.adjust_every == 0:
            t0 = time.perf_counter()
            rows, feats = len(self.cost.targets), len(self.cost.rows[0]) if self.cost.rows else 0
            with self.work.op("ridge_fit", 1, rows * feats):
                self.cost.refit()
            out["cost_model_refit_s"] = time.perf_counter() - t0
            self._refits.append({"version": self.cost.version, "round": feedback.rnd, "model": self.cost.regressor,
                                "n_samples": len(self.cost.targets)})
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: quantization sensitivities, the cost model and every refit so far."""
        return {"quant_sensitivity": {str(k): v for k, v in self.quant_sensitivity.items()},
                "pending_sensitivity": {str(k): v for k, v in self._pending_sensitivity.items()},
                "cost": self.cost.to_state(),
                "refits": [{**{k: v for k, v in r.items() if k != "model"}, "model": ridge_to_state(r["model"])}
                           for r in self._refits],
                "last_pred": {str(k): list(v) for k, v in self._last_pred.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.quant_sensitivity = {int(k): float(v) for k, v in state["quant_sensitivity"].items()}
        self._pending_sensitivity = {int(k): float(v) for k, v in state.get("pending_sensitivity", {}).items()}
        self.cost = CostModel.from_state(state["cost"])
        self._refits = [{**r, "model": ridge_from_state(r["model"])} for r in state["refits"]]
        self._last_pred = {int(k): (v[0], v[1]) for k, v in state["last_pred"].items()}


def build(cfg: Any, significance: SignificanceModel | None = None, fine: bool = True) -> FedHQAllocator:
    return FedHQAllocator(cfg.xi, significance, fine=fine, adjust_every=cfg.adjust_every, seed=cfg.seed,
                          uses_significance=cfg.significance != "none", max_stretch=cfg.max_stretch)


def build_coarse(cfg: Any, significance: SignificanceModel | None = None) -> FedHQAllocator:
    """The ``fedhq-coarse`` ablation: stage 1 only."""
    return build(cfg, significance, fine=False)
