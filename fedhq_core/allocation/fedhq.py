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
  * where a family predicts (its leave-one-setting-out R² reaches ``FAMILY_MIN_R2``), the
    gains are its prediction from the run's state (progress, the server's measured quantization
    gap, the PTQ clients' measured sensitivities), re-estimated and logged every round; the run
    spends no rounds probing;
  * with ``significance: setting`` (opt-in), where only the family's setting-level model
    predicts ("does QAT pay here, and by how much": all-QAT minus all-PTQ,
    ``pilot.setting_level_decision``), its predicted sign is the commit, taken after the warm-up
    below (``prior``); the run explores no round;
  * otherwise (``online``: no family covers the run, or the covering one predicts nothing) the
    run warms up, explores, then commits (:func:`explore_window`):
    - *warms up*: its first 20% of rounds train with PTQ (FP32 training: QAT is compared as it
      would be used, fine-tuning a trained master, not from a random start, where one round's
      comparison measures how fast a near-random model learns);
    - *explores* for the next rounds (:func:`explore_rounds`: 20%, at least 3): up to half of each
      round's clients, drawn among those whose QAT costs no round time, train with QAT, the rest
      PTQ, and the server compares the round's QAT and PTQ partial aggregates on its proxy split
      (``server.partial_gain``, priced, seen one round late). *Paired* (``paired_explore``):
      every client with the slack to train both ways within the deadline (t^PTQ + t^QAT, two
      uploads included) also trains the other way from the same master and minibatches (a
      shadow: charged on the clock, compared, never aggregated), and where two or more do, the
      comparison is between the same clients' QAT and PTQ uploads. The gain compared is the
      two deployments' accuracy on the same proxy images (``online_statistic: accuracy``) or
      their mean true-class probability (``tcp``: paired per image and far less noisy, but
      biased to QAT, whose partial aggregates are more confident without being more often
      right: docs/design.md);
    - or, with ``explore: fork``, *races two lineages*: the server copies its master; each round
      a random half of the clients train the copy with QAT (slow ones on partial work) and the
      rest the master with PTQ, each lineage aggregating its own uploads; the server scores both
      deployments on its proxy split every round (``measurements.lineages``, priced) and, after
      ``FORK_SHARE`` of the rounds, keeps the lineage ahead (:func:`fork_commit`) and drops the
      other;
    - *commits* once (:func:`commit`) to the option the comparisons favour: PTQ for every client
      (nothing is mixed or measured again), or QAT for every client it costs no round time. It
      never switches back, so the share cannot swing from round to round, and the rounds spent
      mixed are bounded;
    - once committed to QAT, *partial work* (``partial_qat``, as FedProx and FedNova allow
      stragglers): a client whose full QAT round would miss the round's deadline trains QAT on
      as many of its shard's samples (whole batches, a seeded draw) as fit the deadline, and
      uploads them as its sample count, so FedAvg weighs it by what it trained on. Without it
      the slow clients, always the same ones and so the same classes at Dirichlet 0.1, trained
      FP32 every round of a QAT-committed run; a client that cannot fit one batch stays PTQ;
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
from .significance import SignificanceModel, feature_rows, minmax

EXPLORE_SHARE = 0.2   # [design] online: the first 20% of rounds explore (at least MIN_EXPLORE)
MIN_EXPLORE = 3       # [design] rounds: at least two comparisons reach the decision (each is seen one round late)
# (not gated on the master's PTQ gap: on CIFAR-10 w3a3 it stayed under 1 point while QAT won 2; docs/design.md)
FAMILY_MIN_R2 = 0.5   # [design] a family is used only where its leave-one-setting-out R² reaches this


WARMUP_SHARE = 0.2    # [design] online: the first 20% of rounds train with PTQ before exploring
FORK_SHARE = 0.4      # [design] ``explore: fork``: the lineages race for at most 40% of the rounds
FORK_WINDOW = 3       # [design] ``explore: fork``: rounds pooled per image in the lineage comparison (it still moves)
FORK_Z = 1.96         # [design] ``explore: fork``: the commit has evidence where |gain| > FORK_Z x its standard error


def explore_rounds(rounds: int) -> int:
    """Rounds an online run explores before it commits."""
    return min(rounds, max(MIN_EXPLORE, int(np.ceil(EXPLORE_SHARE * rounds))))


def explore_window(rounds: int) -> tuple[int, int]:
    """The first exploring round and how many explore: after a PTQ warm-up of WARMUP_SHARE."""
    return int(np.floor(WARMUP_SHARE * rounds)), explore_rounds(rounds)


def fork_rounds(rounds: int) -> int:
    """Rounds an ``explore: fork`` run races its two lineages at most."""
    return min(rounds, max(MIN_EXPLORE, int(np.ceil(FORK_SHARE * rounds))))


def fork_commit(last: dict[str, float] | None) -> dict[str, Any]:
    """The fork's decision at its bound, from the newest lineage comparison
    (``measurements.lineages``): the lineage ahead (PTQ with none to read); ``evidence`` where the
    gain exceeds ``FORK_Z`` standard errors over a full window of rounds. Never earlier: a QAT
    lineage starts behind and overtakes (measured: build ``0598727`` committed CIFAR-10 α 0.1
    seed 4 to PTQ on −4.3 ± 2.0 points after three rounds; all-QAT ends 12.2 above all-PTQ)."""
    evident = bool(last) and last["rounds"] >= FORK_WINDOW and abs(last["accuracy"]) > FORK_Z * last["accuracy_se"]
    gain = float(last["accuracy"]) if last else 0.0
    return {"mode": "qat" if gain > 0 else "ptq", "online_gain": gain,
            "online_se": float(last["accuracy_se"]) if last else float("nan"),
            "online_n": int(last["rounds"]) if last else 0, "evidence": int(evident)}


def explore_split(t_qat: np.ndarray, deadline: float, rng: np.random.Generator) -> np.ndarray:
    """An exploring round's QAT mask: up to half the round's clients, drawn (seeded) among those
    whose QAT fits the deadline, so the round's QAT and PTQ partial aggregates average as many
    uploads as the fleet allows and exploring costs no round time."""
    free = np.flatnonzero(t_qat <= deadline)
    x = np.zeros(len(t_qat), dtype=bool)
    x[rng.choice(free, min(len(free), len(t_qat) // 2), replace=False) if len(free) else []] = True
    return x


def commit(online: list[float]) -> dict[str, Any]:
    """The online decision from the exploring rounds' comparisons (QAT minus PTQ partial
    aggregates, as ``config.online_statistic``):
    ``qat`` where their mean is positive, else ``ptq`` (also with none to read), with the mean,
    its standard error and how many comparisons it rests on."""
    g = np.asarray(online, dtype=float)
    mean = float(g.mean()) if len(g) else 0.0
    se = float(g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else float("nan")
    return {"mode": "qat" if mean > 0 else "ptq", "online_gain": mean, "online_se": se, "online_n": len(g)}


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
                 max_stretch: float = float("inf"), partial_qat: bool = False, paired_explore: bool = False,
                 forced: str | None = None, explore: str = "mixed"):
        import sklearn.linear_model  # noqa: F401  (import once here, not inside a timed adjustment)

        self.name = "fedhq" if fine else "fedhq-coarse"
        self.forced = forced     # the ``ptq-then-qat`` ablation: this commit after the warm-up, no exploring
        self.xi = xi
        self.significance = significance
        self.fine = fine
        self.adjust_every = adjust_every
        self.max_stretch = max_stretch
        self.partial_qat = partial_qat
        self.paired_explore = paired_explore
        self.explore = explore                  # mixed: one master, one round's comparisons; fork: two lineages race
        self._fork_action: str | None = None    # this round's: "start" the fork, or end it keeping "qat" / "ptq"
        self._fork_want: np.ndarray | None = None   # a forked round's QAT lineage (partial work where QAT misses)
        self._shadow: dict[int, str] = {}       # the round's paired measurement: client -> its second mode
        self.seed = seed
        self.cost = CostModel(seed=seed)
        self.quant_sensitivity: dict[int, float] = {}
        self._refits: list[dict[str, Any]] = []     # new cost-model versions, for the tracking layer
        self._last_pred: dict[int, tuple[float, float]] = {}  # cid -> (cost-model pred, spec pred)
        self.uses_significance = uses_significance   # False with `significance: none`: by speed alone
        self._pending_sensitivity: dict[int, float] = {}
        self._estimate: dict[str, float] = {}   # the round's estimate (family level or online decision)
        self.decision: dict[str, Any] = {}      # online: the commit (mode, the comparisons' mean, se, n)
        self.prior: dict[str, Any] = {}         # a family's setting-level decision: committed after the warm-up
        self._round, self._start = 0, 0         # the round being allocated; the first exploring round
        if forced is not None:
            self.name, self.prior = f"ptq-then-{forced}", {"mode": forced, "forced": 1}

    @property
    def online(self) -> bool:
        """Deciding from the rounds: the fine stage, with SigAcc wanted but no (predictive) family
        (or the decision forced: the same schedule, without the comparisons)."""
        return self.fine and (self.forced is not None or (self.uses_significance and self.significance is None))

    @property
    def capabilities(self) -> Capabilities:
        """It wants a SigAcc model (unless ``significance: none``), and uses a family only where
        that family's leave-one-setting-out R² reaches ``FAMILY_MIN_R2`` (the coarse ablation
        takes any covering family). With a family, the fine stage's estimate reads the master's
        quantization gap and the PTQ uploads' sensitivity; online, it reads the rounds' QAT-vs-PTQ
        partial aggregates while it explores (the last exploring round's too: the server cannot
        tell it will be seen only after the decision, so it is priced and logged but not read),
        and nothing once it has committed."""
        family = self.fine and self.significance is not None
        exploring = self.online and not self.decision and not self.prior and self._round >= self._start
        return Capabilities(uses_significance=self.uses_significance,
                            measurements=frozenset((["gap", "sensitivity"] if family else [])
                                                   + ([self._exploring_measure] if exploring else [])),
                            min_family_r2=FAMILY_MIN_R2 if self.fine else float("-inf"))

    @property
    def _exploring_measure(self) -> str:
        return "lineages" if self.explore == "fork" else "partials"

    @property
    def refits(self) -> list[dict[str, Any]]:
        return self._refits

    # --- analyses ----------------------------------------------------------------------
    def significance_of(self, cids: list[int], view: FleetView, rnd: int = 0) -> np.ndarray:
        """Signed gains g_m: the family's prediction from the run's current state (the coarse-only
        ablation keeps the initial state's); online, the exploring rounds' mean comparison once
        committed (0 before). Without SigAcc (``significance: none``) every client counts as
        gaining equally: the allocation is then by speed alone."""
        if not self.uses_significance:
            return np.ones(len(cids))
        if self.significance is None:
            return np.full(len(cids), float(self.decision.get("online_gain", self.decision.get("family_gain", 0.0))))
        if not self.fine:   # fedhq-coarse: the estimate of the initial state, never updated
            rows = feature_rows(view.shard_features(), cids, 0.0, 0.0, {}, view.setting)
        else:
            rows = feature_rows(view.shard_features(), cids, rnd / view.rounds, view.quant_gap,
                                self.quant_sensitivity, view.setting)
        with self.work.op("gbr_predict", 1, gbr_predict_elements(len(cids))):
            pred = self.significance.predict(rows)
        self._estimate = {"family_gain": float(pred.mean())}
        return pred

    def _online_mask(self, rnd: int, sampled: list[int], t_ptq: np.ndarray, t_qat: np.ndarray,
                     view: FleetView) -> np.ndarray:
        """Online: an exploring round's split, or the committed mode's allocation."""
        start, span = explore_window(view.rounds)
        self._round, self._start = rnd, start
        if not self.decision and self.prior and rnd >= start:
            self.decision = {**self.prior, "round": rnd}
        if not self.decision and self.explore == "fork" and rnd >= start + fork_rounds(view.rounds):
            history = view.measured("lineages")
            decided = fork_commit(history[-1] if history else None)
            self.decision, self._fork_action = {**decided, "round": rnd}, decided["mode"]
        if not self.decision and self.explore == "mixed" and rnd >= start + span:
            self.decision = {**commit([g for g in view.online_gains if g is not None]), "round": rnd}
        exploring = not self.decision and rnd >= start
        self._estimate = {"exploring": int(exploring)}
        if exploring:
            rng = np.random.default_rng([self.seed, 83, rnd])
            deadline = float(np.max(t_ptq))
            if self.explore == "fork":    # half the clients, drawn at random, train the QAT lineage: no shadows
                self._fork_action = "start" if rnd == start else None
                self._fork_want = np.zeros(len(sampled), dtype=bool)
                self._fork_want[rng.choice(len(sampled), len(sampled) // 2, replace=False)] = True
                return self._fork_want & (t_qat <= deadline)
            x = explore_split(t_qat, deadline, rng)
            both = t_ptq + t_qat <= deadline
            if self.paired_explore and both.sum() >= 2:
                self._shadow = {c: ("ptq" if q else "qat") for c, q, b in zip(sampled, x, both) if b}
            self._estimate["n_paired"] = len(self._shadow)
            return x
        if not self.decision:     # warming up: FP32 training (PTQ) gives the master a start
            return np.zeros(len(sampled), dtype=bool)
        self._estimate.update({k: v for k, v in self.decision.items() if k != "mode"},
                              committed_qat=int(self.decision["mode"] == "qat"))
        if self.decision["mode"] == "ptq":
            return np.zeros(len(sampled), dtype=bool)
        return best_deadline(np.ones(len(sampled)), t_ptq, t_qat, self.xi, max_stretch=self.max_stretch)

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:
        t0 = time.perf_counter()
        spec = view.predicted_times(sampled)
        t_ptq, t_qat = spec["ptq"], spec["qat"]
        if self.fine:
            t_ptq = self.cost.correct(sampled, t_ptq, False)
            t_qat = self.cost.correct(sampled, t_qat, True)
        s_hat = minmax(1.0 / t_ptq)
        self._estimate, self._shadow, self._fork_action, self._fork_want = {}, {}, None, None
        online = self._online_mask(rnd, sampled, t_ptq, t_qat, view) if self.online else None
        gains = self.significance_of(sampled, view, rnd)
        x, free = allocate_coarse(s_hat, gains, t_ptq, t_qat, self.xi)
        coarse = x.copy()
        adjusted = bool(self.fine and self.cost.regressor is not None)
        if online is not None:
            x = online
        elif self.fine:
            x = best_deadline(gains, t_ptq, t_qat, self.xi, max_stretch=self.max_stretch)
        deadline = float(np.max(np.where(x, t_qat, t_ptq)))     # the round's predicted time
        partial = self._partial(sampled, x, t_qat, spec["qat"], deadline, view)
        strategies = {c: ("qat" if q or c in partial else "ptq") for c, q in zip(sampled, x)}
        self._last_pred = {c: ((deadline, deadline * sq / tq) if c in partial else (tp + tq, sp + sq) if c in self._shadow
                               else (float(np.where(q, tq, tp)), float(np.where(q, sq, sp))))
                           for c, q, tp, tq, sp, sq in zip(sampled, x, t_ptq, t_qat, spec["ptq"], spec["qat"])}
        estimate = {"gain_mean": float(gains.mean()), "gain_positive_share": float((gains > 0).mean()),
                    **self._estimate}
        if self.capabilities.reads("gap"):
            estimate["quant_gap"] = float(view.quant_gap)
        info = {
            "qat_share": float(np.mean([s == "qat" for s in strategies.values()])), "n_free_qat": int(free.sum()),
            "n_partial_qat": len(partial), "n_flipped": int((x != coarse).sum()),
            "n_sign_ptq": int((gains <= 0).sum()), **estimate,
            "pred_round_s": deadline, "cost_model_version": self.cost.version,
            "scatter": {"cids": list(sampled), "s_hat": s_hat.tolist(), "a_hat": normalised_significance(gains).tolist(),
                        "gain": gains.tolist(), "qat": x.tolist(), "free": free.tolist(), "coarse": coarse.tolist(),
                        "xi": self.xi, "round": rnd, "adjusted": adjusted},
            "alloc_compute_s": time.perf_counter() - t0,
        }
        return Allocation(strategies, info=info, max_samples=partial, shadow=dict(self._shadow), fork=self._fork_action)

    def _partial(self, sampled: list[int], x: np.ndarray, t_qat: np.ndarray, spec_qat: np.ndarray,
                 deadline: float, view: FleetView) -> dict[int, int]:
        """Partial work once committed to QAT (or for a forked round's QAT lineage): client -> the
        shard samples whose QAT round fits the round's deadline (the spec sheet's budget, scaled by
        the cost model's correction), for each client whose full QAT round does not."""
        wanted = self._fork_want if self._fork_want is not None else (
            np.ones(len(x), dtype=bool) if self.decision.get("mode") == "qat" else np.zeros(len(x), dtype=bool))
        out = wanted & ~x
        if not (self.partial_qat and out.any() and hasattr(view, "qat_samples_within")):
            return {}
        budgets = deadline * spec_qat[out] / t_qat[out]
        cids = [c for c, o in zip(sampled, out) if o]
        return {c: int(m) for c, m in zip(cids, view.qat_samples_within(cids, budgets)) if m > 0}

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
                "last_pred": {str(k): list(v) for k, v in self._last_pred.items()},
                "decision": dict(self.decision), "prior": dict(self.prior)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.quant_sensitivity = {int(k): float(v) for k, v in state["quant_sensitivity"].items()}
        self._pending_sensitivity = {int(k): float(v) for k, v in state.get("pending_sensitivity", {}).items()}
        self.cost = CostModel.from_state(state["cost"])
        self._refits = [{**r, "model": ridge_from_state(r["model"])} for r in state["refits"]]
        self._last_pred = {int(k): (v[0], v[1]) for k, v in state["last_pred"].items()}
        self.decision = dict(state.get("decision", {}))
        self.prior = dict(state.get("prior", {}))


def build(cfg: Any, significance: SignificanceModel | None = None, fine: bool = True) -> FedHQAllocator:
    return FedHQAllocator(cfg.xi, significance, fine=fine, adjust_every=cfg.adjust_every, seed=cfg.seed,
                          uses_significance=cfg.significance != "none", max_stretch=cfg.max_stretch,
                          partial_qat=cfg.partial_qat, paired_explore=cfg.paired_explore, explore=cfg.explore)


def build_ptq_then_qat(cfg: Any, significance: SignificanceModel | None = None) -> FedHQAllocator:
    """The ``ptq-then-qat`` ablation: fedhq's online schedule with its decision fixed to QAT, so
    it separates the schedule from the deciding. The PTQ warm-up (FP32 training, the first 20% of
    rounds), then QAT for every client it costs no round time and partial-work QAT for the rest,
    as a QAT-committed fedhq run; no exploring round, no comparison, no SigAcc."""
    return FedHQAllocator(cfg.xi, None, adjust_every=cfg.adjust_every, seed=cfg.seed, uses_significance=False,
                          max_stretch=cfg.max_stretch, partial_qat=cfg.partial_qat, forced="qat")


def build_coarse(cfg: Any, significance: SignificanceModel | None = None) -> FedHQAllocator:
    """The ``fedhq-coarse`` ablation: stage 1 only."""
    return build(cfg, significance, fine=False)
