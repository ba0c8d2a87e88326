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
    rounds showed (progress, the server's measured quantization gap, the PTQ clients' reported
    sensitivities), and the estimate is logged per round;
  * every ``adjust_every`` rounds the cost model is refitted (a new registry version); its error
    on the next round is reported beside the spec sheet's;
  * a local search flips clients with g_m > 0 within ``search_band`` of the line to minimise
    J(x) = xi * T(x) / T_ref + (1 - xi) * (A_ref - A(x)) / A_ref, A(x) = sum of g_m over QAT
    clients, A_ref = sum of the positive g_m.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..hardware.server_work import HostOps, gbr_predict_ops
from .base import Allocation, Allocator, Capabilities, FleetView, RoundFeedback
from .cost_model import CostModel, ridge_from_state, ridge_to_state
from .significance import FEATURES, SignificanceModel, feature_rows, minmax


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


def local_search(x0: np.ndarray, s_hat: np.ndarray, gains: np.ndarray, t_ptq: np.ndarray, t_qat: np.ndarray,
                 xi: float, band: float, max_sweeps: int = 10, ops: HostOps | None = None) -> np.ndarray:
    """Greedy first-improvement flips of positive-gain clients near the line, until no flip lowers J.
    ``ops`` counts its work (each objective evaluation: 6 numpy calls over the clients)."""
    x = x0.copy()
    a_hat = normalised_significance(gains)
    margin = np.abs((1.0 - xi) * a_hat - xi * (1.0 - s_hat))
    near = np.flatnonzero((margin <= band) & (gains > 0))
    best = objective(x, t_ptq, t_qat, gains, xi)
    evals = 1
    for _ in range(max_sweeps):
        improved = False
        for i in near:
            x[i] = ~x[i]
            j = objective(x, t_ptq, t_qat, gains, xi)
            evals += 1
            if j < best - 1e-12:
                best, improved = j, True
            else:
                x[i] = ~x[i]
        if not improved:
            break
    if ops is not None:
        ops.add(6 + 6 * evals, len(x) * (6 + 6 * evals))
    return x


class FedHQAllocator(Allocator):
    """``fine=False`` is the ``fedhq-coarse`` ablation (stage 1 only, spec-sheet times)."""

    def __init__(self, xi: float, significance: SignificanceModel | None, *, fine: bool = True,
                 adjust_every: int = 3, search_band: float = 0.25, seed: int = 0, uses_significance: bool = True):
        import sklearn.linear_model  # noqa: F401  (import once here, not inside a timed adjustment)

        self.name = "fedhq" if fine else "fedhq-coarse"
        self.xi = xi
        self.significance = significance
        self.fine = fine
        self.adjust_every = adjust_every
        self.search_band = search_band
        self.cost = CostModel(seed=seed)
        self.quant_sensitivity: dict[int, float] = {}
        self._refits: list[dict[str, Any]] = []     # new cost-model versions, for the tracking layer
        self._last_pred: dict[int, tuple[float, float]] = {}  # cid -> (cost-model pred, spec pred)
        self.uses_significance = uses_significance   # False with `significance: none`: by speed alone
        self._pending_sensitivity: dict[int, float] = {}
        self._ops = HostOps()

    def take_host_ops(self) -> HostOps:
        ops, self._ops = self._ops, HostOps()
        return ops

    @property
    def capabilities(self) -> Capabilities:
        """It wants a SigAcc model (unless ``significance: none``); the fine stage's estimate reads
        the master's quantization gap (once it has a model) and the PTQ uploads' sensitivity."""
        return Capabilities(uses_significance=self.uses_significance,
                            reads_gap=self.fine and self.significance is not None,
                            reads_sensitivity=self.fine and self.uses_significance)

    @property
    def refits(self) -> list[dict[str, Any]]:
        return self._refits

    # --- analyses ----------------------------------------------------------------------
    def significance_of(self, cids: list[int], view: FleetView, rnd: int = 0) -> np.ndarray:
        """Signed gains g_m from the run's current state (the fine stage's online update; the
        coarse-only ablation keeps the initial state's). Without a SigAcc model (``significance:
        none``) every client counts as gaining equally: the allocation is then by speed alone."""
        if self.significance is None:
            return np.ones(len(cids))
        self._ops += gbr_predict_ops(len(cids), len(FEATURES))
        if not self.fine:   # fedhq-coarse: the estimate of the initial state, never updated
            return self.significance.predict(feature_rows(view.shard_features(), cids, 0.0, 0.0, {}))
        X = feature_rows(view.shard_features(), cids, rnd / view.rounds, view.quant_gap, self.quant_sensitivity)
        return self.significance.predict(X)

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:
        t0 = time.perf_counter()
        n = len(sampled)
        spec = view.predicted_times(sampled)
        self._ops.add(2 * n, 12 * n)          # two priced work lists per client (dict lookups)
        t_ptq, t_qat = spec["ptq"], spec["qat"]
        if self.fine:
            t_ptq = self.cost.correct(sampled, t_ptq, False)
            t_qat = self.cost.correct(sampled, t_qat, True)
            if self.cost.regressor is not None:
                self._ops.add(2 * (n + 3), 2 * 8 * n)   # feature rows, ridge predict, exp
        s_hat = minmax(1.0 / t_ptq)
        gains = self.significance_of(sampled, view, rnd)
        x, free = allocate_coarse(s_hat, gains, t_ptq, t_qat, self.xi)
        self._ops.add(4 + 12 + 10, n * (3 + 12 + 10))   # speed score, coarse rule, the round's info
        coarse = x.copy()
        adjusted = bool(self.fine and self.cost.regressor is not None)
        if adjusted:
            x = local_search(x, s_hat, gains, t_ptq, t_qat, self.xi, self.search_band, ops=self._ops)
        strategies = {c: ("qat" if q else "ptq") for c, q in zip(sampled, x)}
        self._last_pred = {c: (float(np.where(q, tq, tp)), float(np.where(q, sq, sp)))
                           for c, q, tp, tq, sp, sq in zip(sampled, x, t_ptq, t_qat, spec["ptq"], spec["qat"])}
        estimate = {"gain_mean": float(gains.mean()), "gain_positive_share": float((gains > 0).mean())}
        if self.capabilities.reads_gap:
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
            self._ops.add(8, 8)
        if errs_model:
            out["cost_model_mape"] = float(np.mean(errs_model))
            out["spec_sheet_mape"] = float(np.mean(errs_spec))
        if self.fine and (feedback.rnd + 1) % self.adjust_every == 0:
            t0 = time.perf_counter()
            self.cost.refit()
            rows, feats = len(self.cost.targets), len(self.cost.rows[0]) if self.cost.rows else 0
            self._ops.add(10, rows * feats * feats + feats ** 3)   # ridge: normal equations
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
