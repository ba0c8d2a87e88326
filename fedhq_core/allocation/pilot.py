"""Offline fitting of SigAcc: short pilot rounds that measure, for every client, how much more
accurate its *quantized* local model is after QAT than after PTQ, on a proxy split.

Each pilot round trains every client twice from the same global model (PTQ and QAT), deploys
each local model quantized (its own ranges; QAT also its learned steps) and evaluates it on the
server's small proxy split; the gain and the client's shard features make one training row. The
pilot's global model then advances by FedAvg of the PTQ updates. The simulation's own state is
left untouched.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..quant import unpack_update
from ..server import evaluate_global, fedavg
from .significance import SignificanceModel, client_features, label_histogram


def _local_deployed_acc(sim, result) -> float:
    state = {k: v.clone() for k, v in sim.global_state.items()}
    for k, d in unpack_update(result.payload).items():
        state[k].add_(d.to(state[k].dtype))
    steps = {k: torch.from_numpy(v) for k, v in result.payload.weight_steps.items()} or None
    m = evaluate_global(sim.eval_model, state, result.payload.act_ranges, sim.server_calib.x, sim.server_calib.y, steps)
    return m["acc_q"]


def pilot_gains(sim, rounds: int, map_fn: Callable[[Callable, Iterable], Iterable] = map) -> tuple[np.ndarray, np.ndarray]:
    """Features X (clients x rounds, 5) and measured QAT-vs-PTQ gains."""
    saved = (sim.global_state, sim.global_ranges, sim.global_steps)
    hist = label_histogram(sim.global_labels, sim.num_classes)
    X, gains = [], []
    try:
        for rnd in range(rounds):
            cids = list(range(sim.n_clients))
            jobs = [(c, s) for c in cids for s in ("ptq", "qat")]
            res = list(map_fn(lambda job: sim.train(10_000 + rnd, job[0], job[1]), jobs))
            by = {(r.cid, r.strategy): r for r in res}
            for c in cids:
                ptq, qat = by[(c, "ptq")], by[(c, "qat")]
                gains.append(_local_deployed_acc(sim, qat) - _local_deployed_acc(sim, ptq))
                X.append(client_features(sim.shards[c].y.numpy(), hist, float(ptq.quant_loss or 0.0)))
            sim.global_state = fedavg(sim.global_state, [by[(c, "ptq")] for c in cids])
    finally:
        sim.global_state, sim.global_ranges, sim.global_steps = saved
    return np.asarray(X), np.asarray(gains)


def significance_tags(cfg) -> dict[str, Any]:
    """The setting a significance model is valid for (matched before reuse)."""
    return {"dataset": cfg.dataset, "model": cfg.model, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
            "first_last_bits": cfg.first_last_bits, "clients": cfg.clients, "partition": cfg.partition,
            "alpha": cfg.alpha}


def fit_significance(sim, rounds: int, map_fn=map) -> SignificanceModel:
    X, gains = pilot_gains(sim, rounds, map_fn)
    model = SignificanceModel.fit(X, gains, sim.cfg.seed, significance_tags(sim.cfg))
    model.tags.update({"pilot_rounds": rounds, "n_samples": len(gains), "mean_gain": float(gains.mean())})
    return model
