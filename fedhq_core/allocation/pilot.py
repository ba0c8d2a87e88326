"""Offline fitting of SigAcc: a pilot that measures, at every round of a short run, how much more
accurate the deployed (quantized) global model is for having trained with QAT rather than PTQ.

The pilot follows the run it prepares (same clients, sampling, seeds, round count ``R``) in two
branches from the same initial model, one all-PTQ and one all-QAT, for ``pilot_rounds`` rounds
(default: the first half of the run). After each round the server deploys both branches'
masters as a run would (averaged ranges; QAT also its averaged learned steps) and scores them on
its proxy split ``server_calib`` (never the test split). The round's gain G(r) = QAT branch minus
PTQ branch, averaged over neighbouring rounds (one evaluation is noisy), is signed and cumulative:
it includes QAT's slower convergence as well as the quantization loss it avoids. Each sampled
client's row is its features at that point in its branch (:func:`significance.feature_rows`:
shard, progress r/R, the master's quantization gap, its last reported sensitivity), labelled
with its FedAvg share of G(r). The simulation's own state is left untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..server import evaluate_global
from .significance import SignificanceModel, feature_rows

@dataclass
class FitInfo:
    """What obtaining a run's SigAcc model cost, and where it came from.

    ``source``: ``pilot`` (a pilot for this very setting, made for this run: charged to it),
    ``registry`` (a version fitted earlier and reused: a one-off cost, reported with the runs
    that reused it) or ``none`` (no SigAcc model)."""

    source: str = "none"
    sim_s: float = 0.0        # simulated seconds of the pilot's rounds and fits, on the run's clock
    wall_s: float = 0.0       # this host's seconds for obtaining it
    detail: str = ""
    reused_by: int = 0        # registry: runs that have reused this version (this one included)

    @property
    def charged_sim_s(self) -> float:
        return self.sim_s if self.source == "pilot" else 0.0

    @property
    def charged_wall_s(self) -> float:
        return self.wall_s if self.source == "pilot" else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"fit_source": self.source, "fit_sim_s": self.sim_s, "fit_wall_s": self.wall_s,
                "fit_detail": self.detail, "fit_reused_by": self.reused_by,
                "fit_charged_sim_s": self.charged_sim_s, "fit_charged_wall_s": self.charged_wall_s}


PILOT_SPAN = 0.5   # [design] by default the pilot covers the first half of the run's rounds
SMOOTH = 1         # [design] G(r) is averaged over rounds r-1..r+1 of the pilot


def pilot_length(cfg) -> int:
    """Rounds per pilot branch: ``pilot_rounds``, or 0 for the first half of the run (at least 3)."""
    return cfg.pilot_rounds or min(cfg.rounds, max(3, math.ceil(PILOT_SPAN * cfg.rounds)))


def train_here(sim, rnd: int, cid: int, strategy: str) -> Any:
    """Train one client here and now, from the server's current master (the pilot's default)."""
    from ..client import train_client
    from ..worker import borrow_model

    shard, srv = sim.shards[cid], sim.server
    with borrow_model(sim.model_spec, sim.device) as model:
        return train_client(model, cid, shard.x, shard.y, srv.global_state, srv.global_ranges,
                            sim.dispatch.client_spec(rnd, cid, strategy), srv.global_steps)


def train_through(sim, submit_train: Callable, rnd: int, cids: list[int], strategy: str) -> list:
    """Train ``cids`` under ``strategy`` from the current master through the run's task runner
    (``submit_train`` as in ``loop.RoundOps``), decoded and checked like a round's uploads."""
    from ..dispatch import collect
    from ..worker import ClientJob

    d = sim.dispatch
    jobs = [ClientJob(rnd, c, sim.shards[c], d.client_spec(rnd, c, strategy)) for c in cids]
    inputs = d.round_inputs()
    results, bad = d.accept(collect([(ch, submit_train(inputs, ch)) for ch in d.chunks(jobs)], 0.0))
    bad = {c: why for c, why in bad.items() if not why.startswith("norm")}   # bounded out, as in a round
    if bad:   # the pilot compares whole rounds: a lost client would bias its gains, so it stops (one line)
        from ..errors import TooFewClients

        raise TooFewClients(f"SigAcc pilot round {rnd - 10_000}: client {next(iter(bad))} failed "
                            f"({next(iter(bad.values()))}); the pilot needs every sampled client")
    return results


def pilot_gains(sim, rounds: int, train_fn: Callable[[int, list[int], str], list] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, float]], float]:
    """Features X, signed gains, client ids and pilot rounds (the CV groups), one summary per
    pilot round, and the pilot's simulated seconds. ``train_fn(rnd, cids, strategy)`` trains the
    clients from the current master (default: one after the other here; a run passes its task
    runner's). Every pilot round is priced on the run's clock like a round (its clients' work on
    their devices, the server's aggregation, gap measurement and proxy scoring on its device),
    without moving the run's own clock: the branches run one after the other on the same fleet."""
    train_fn = train_fn or (lambda r, cids, strategy: [train_here(sim, r, c, strategy) for c in cids])
    srv, pricing = sim.server, sim.pricing
    saved = (srv.global_state, srv.global_ranges, srv.global_steps, srv.gaps)
    shards = sim.shard_features()
    branch = {s: {"state": srv.global_state, "ranges": srv.global_ranges, "steps": srv.global_steps, "gaps": [],
                  "sens": {}, "acc": []} for s in ("ptq", "qat")}
    rows: list[tuple[int, list[int], np.ndarray, np.ndarray]] = []   # (round, cids, features, shares)
    sim_s = 0.0
    try:
        for rnd in range(rounds):
            cids = sim.dispatch.sample(10_000 + rnd)
            for strategy, b in branch.items():
                srv.global_state, srv.global_ranges, srv.global_steps, srv.gaps = (b["state"], b["ranges"], b["steps"],
                                                                                   b["gaps"])
                X = feature_rows(shards, cids, rnd / sim.cfg.rounds, sim.quant_gap, b["sens"])
                res = train_fn(10_000 + rnd, cids, strategy)
                n = np.array([r.n_samples for r in res], dtype=float)
                rows.append((rnd, cids, X, n / n.mean()))
                # the server measures the PTQ uploads' sensitivity, as in a run (priced like the gap:
                # concurrent with the clients' training)
                sens_s = srv.measure_sensitivities(res) if sim.server_measures_sensitivity else 0.0
                b["sens"].update({r.cid: float(r.quant_loss) for r in res if r.quant_loss is not None})
                srv.measure_gap()      # of the master this round started from, as in a run (appends to b["gaps"])
                times = list(pricing.client_times(10_000 + rnd, res).values())
                sim_s += pricing.clock.round_length(times, {"server": pricing.aggregation_s(res),
                                                            "proxy": pricing.server.proxy_s()},
                                                    pricing.server.gap_s() + sens_s)[0]
                srv.aggregate_results(res)
                b["state"], b["ranges"], b["steps"] = srv.global_state, srv.global_ranges, srv.global_steps
                b["acc"].append(evaluate_global(srv.eval_model, srv.global_state, srv.global_ranges, srv.proxy.x,
                                                srv.proxy.y, srv.global_steps)["acc_q"])
    finally:
        srv.global_state, srv.global_ranges, srv.global_steps, srv.gaps = saved
    raw = np.array(branch["qat"]["acc"]) - np.array(branch["ptq"]["acc"])
    smooth = np.array([raw[max(0, r - SMOOTH):r + SMOOTH + 1].mean() for r in range(rounds)])
    X, gains, groups, point_ids = [], [], [], []
    for rnd, cids, feats, share in rows:
        X.extend(feats)
        gains.extend(smooth[rnd] * share)
        groups.extend(cids)
        point_ids.extend([rnd] * len(cids))
    log = [{"round": r, "progress": r / sim.cfg.rounds, "round_gain": float(smooth[r]), "raw_gain": float(raw[r])}
           for r in range(rounds)]
    return np.asarray(X), np.asarray(gains), np.asarray(groups), np.asarray(point_ids), log, sim_s


# Fields that can change the gains. Only time-only fields (clock, execution, tracking, fault
# handling, xi and the allocator's own knobs) are left out: a SigAcc model fitted under one value
# of any of these is not reused under another. The fleet is kept, conservatively: in this
# simulator it changes only time, but on real devices the hardware changes the numerics too.
GAIN_FIELDS = ("dataset", "data_dir", "max_train_samples", "max_test_samples", "test_fraction", "server_calib_size",
               "partition", "alpha", "classes_per_client", "min_shard_size", "model", "clients", "rounds", "fraction",
               "local_epochs", "batch_size", "lr", "momentum", "weight_decay", "w_bits", "a_bits", "upload_bits",
               "first_last_bits", "ptq_act_percentile", "calib_batches", "ema_momentum", "report_sensitivity",
               "pilot_rounds", "seed", "fleet")


def significance_tags(cfg) -> dict[str, Any]:
    """The setting a significance model is valid for (every tag must match before reuse): the
    gain-relevant config fields and how its features and targets are made, so a model fitted
    by other feature code is never reused."""
    from .significance import FEATURES, GAP_WINDOW

    return {**{k: getattr(cfg, k) for k in GAIN_FIELDS}, "features": ",".join(FEATURES),
            "gap_window": GAP_WINDOW, "pilot_span": PILOT_SPAN, "pilot_smooth": SMOOTH}


def setting_key(tags: dict[str, Any]) -> str:
    """A short hash of a setting's tags: one registry tag to search versions by."""
    import hashlib

    text = ";".join(f"{k}={tags[k]}" for k in sorted(tags))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fit_significance(sim, train_fn=None) -> SignificanceModel:
    """A pilot for ``sim``'s setting and the regressor fitted on it. ``tags["fit_sim_s"]`` is its
    price on the run's clock: the pilot's rounds plus the regressor's fits (the model and its two
    5-fold cross-validations: 11 gradient-boosting fits, counted host work on the server)."""
    from ..hardware.server_work import gbr_fit_ops

    X, gains, groups, point_ids, log, sim_s = pilot_gains(sim, pilot_length(sim.cfg), train_fn)
    model = SignificanceModel.fit(X, gains, sim.cfg.seed, significance_tags(sim.cfg), groups, point_ids)
    sim_s += sim.pricing.server.host_s(gbr_fit_ops(len(gains), X.shape[1], fits=11))
    model.tags.update({"n_samples": len(gains), "mean_gain": round(float(gains.mean()), 4),
                       "fit_sim_s": round(sim_s, 6),
                       "train_r2": round(model.train_r2, 4), "cv_r2": round(model.cv_r2, 4),
                       "cv_r2_rounds": round(model.cv_r2_rounds, 4),
                       "round_gains": ";".join(f"{p['round']}:{p['round_gain']:+.3f}" for p in log)})
    return model


def fit_for_run(sim, submit_train: Callable | None = None) -> SignificanceModel:
    """A pilot for ``sim``'s setting, made for this run and charged to it (``fit_info``); the
    run's state is untouched. ``submit_train`` as in ``loop.RoundOps``: the pilot's clients train
    where the run's do (default: here, one after the other)."""
    import time

    t0 = time.perf_counter()
    if sim.pricing.speed is None:
        sim.profile()
    train_fn = None
    if submit_train is not None:
        train_fn = lambda rnd, cids, strategy: train_through(sim, submit_train, rnd, cids, strategy)  # noqa: E731
    model = fit_significance(sim, train_fn)
    model.fit_info = FitInfo("pilot", float(model.tags["fit_sim_s"]), time.perf_counter() - t0,
                             f"pilot of this setting, {pilot_length(sim.cfg)} rounds per branch (all-PTQ, all-QAT)")
    return model
