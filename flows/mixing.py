"""``fedhq mixing``: two candidate costs of a hybrid round, measured in isolation (issue 28, item 1).

On fedhq's own trajectory (a PTQ warm-up of ``warmup`` rounds, then rounds whose clients split
half QAT, half PTQ, as its exploring rounds do), every sampled client of a measured round trains
under **both** strategies from the same master. From those paired uploads the server forms, on
the same master and the same clients:

- ``ptq``: the all-PTQ aggregate, deployed as a run deploys it (MSE weight steps);
- ``qat``: the all-QAT aggregate (the clients' learned steps);
- ``mixed``: a seeded half-and-half mix, deployed as a run deploys a hybrid round: its QAT
  clients' learned steps blended with the new master's MSE steps (``server.blend_steps``);
- ``mixed_mse_steps``, ``mixed_learned_steps``: the same mixed master deployed with the MSE steps
  alone, or with the QAT clients' learned steps alone (no blend).

Each is scored on the experimenter's validation split (the test split is not read). The two
questions, per round and then per seed:

- **FedAvg of mixed updates:** ``mixed`` against the share-weighted interpolation of ``ptq`` and
  ``qat`` (what averaging would give if mixing cost nothing) and against the better of the two;
- **the blended deployment steps:** ``mixed`` against the same master deployed with either
  set of steps alone.

What each costs on the simulated clock comes from the same prices a run pays
(``pricing.server``): the aggregation of a mixed round against a pure one, and the MSE search the
blend adds. The master then advances by the mixed aggregate (the exploring rounds' master).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from fedhq_core.allocation.fedhq import explore_window
from fedhq_core.allocation.pilot import train_here
from fedhq_core.client import Mode
from fedhq_core.config import ExperimentConfig
from fedhq_core.errors import ConfigError
from fedhq_core.metrics import t_interval, verdict
from fedhq_core.server import evaluate_deployed, master_mse_steps
from fedhq_core.simulation import Simulation

DEPLOYMENTS = ("ptq", "qat", "mixed", "mixed_mse_steps", "mixed_learned_steps")
# the differences reported, each a function of one round's deployed accuracies
DIFFERENCES: dict[str, Callable[[dict[str, float]], float]] = {
    "qat_minus_ptq": lambda r: r["qat"] - r["ptq"],
    "mixed_minus_interpolation": lambda r: r["mixed"] - (r["qat_share"] * r["qat"] + (1 - r["qat_share"]) * r["ptq"]),
    "mixed_minus_better_pure": lambda r: r["mixed"] - max(r["qat"], r["ptq"]),
    "blend_minus_mse_steps": lambda r: r["mixed"] - r["mixed_mse_steps"],
    "blend_minus_learned_steps": lambda r: r["mixed"] - r["mixed_learned_steps"],
}


def _deploy_val(srv, results) -> tuple[float, dict[str, Any]]:
    """Validation accuracy of ``results`` aggregated into the server's master exactly as a run
    aggregates and deploys them; the server is left as it was. Also the new master and steps."""
    before = (srv.global_state, srv.global_ranges, srv.global_steps)
    try:
        srv.aggregate_results(results)
        new = {"state": srv.global_state, "ranges": srv.deploy_ranges(), "steps": srv.global_steps}
        return evaluate_deployed(srv.eval_model, new["state"], new["ranges"], srv.val, new["steps"])["val_acc_q"], new
    finally:
        srv.global_state, srv.global_ranges, srv.global_steps = before


def mixed_variants(srv, mixed) -> dict[str, float]:
    """The mixed aggregate deployed three ways (blend as a run does, MSE steps alone, learned steps
    alone). The learned steps are recovered from the blend (``server.blend_steps`` is their
    data-weighted mean with the master's MSE steps), so all three read one aggregation."""
    acc, new = _deploy_val(srv, mixed)
    n_all = sum(r.n_samples for r in mixed)
    n_q = sum(r.n_samples for r in mixed if r.payload.weight_steps)
    mse = master_mse_steps(srv.eval_model, new["state"])
    learned = {k: (v * n_all - (n_all - n_q) * mse[k].to(v.dtype)) / n_q for k, v in new["steps"].items()}
    out = {"mixed": acc}
    for name, steps in (("mixed_mse_steps", mse), ("mixed_learned_steps", learned)):
        out[name] = evaluate_deployed(srv.eval_model, new["state"], new["ranges"], srv.val, steps)["val_acc_q"]
    return out


def measure_seed(cfg: ExperimentConfig, warmup: int, measure: int, dataset: Any = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One seed: ``warmup`` PTQ rounds, then ``measure`` rounds trained both ways and deployed
    five ways (module docstring). Rounds' records and their priced server seconds."""
    sim = Simulation(cfg.replace(strategy="all-ptq", significance="none"), dataset=dataset)
    sim.profile()
    srv, server = sim.server, sim.pricing.server
    if srv.val is None:
        raise ConfigError("val_fraction: fedhq mixing scores on the validation split; it must be > 0")
    rng = np.random.default_rng([cfg.seed, 89])
    rows = []
    for rnd in range(warmup + measure):
        cids = sim.dispatch.sample(rnd)
        ptq = [train_here(sim, rnd, c, Mode.PTQ) for c in cids]
        if rnd < warmup:
            srv.aggregate_results(ptq)
            continue
        qat = [train_here(sim, rnd, c, Mode.QAT) for c in cids]
        half = set(rng.permutation(len(cids))[: len(cids) // 2].tolist())
        mixed = [qat[i] if i in half else ptq[i] for i in range(len(cids))]
        n_all = sum(r.n_samples for r in mixed)
        row: dict[str, Any] = {"round": rnd, "clients": len(cids),
                               "qat_share": sum(r.n_samples for r in mixed if r.strategy == Mode.QAT) / n_all}
        row["ptq"], _ = _deploy_val(srv, ptq)
        row["qat"], _ = _deploy_val(srv, qat)
        row.update(mixed_variants(srv, mixed))
        row.update({k: f(row) for k, f in DIFFERENCES.items()})
        n, n_q = len(cids), len(half)
        row["priced_s"] = {"aggregate_pure_ptq": server.aggregate_s(n, 0, cfg.upload_bits),
                           "aggregate_pure_qat": server.aggregate_s(0, n, cfg.upload_bits),
                           "aggregate_mixed": server.aggregate_s(n - n_q, n_q, cfg.upload_bits),
                           "blend_mse_search": server.mse_s()}
        srv.aggregate_results(mixed)      # the master advances as an exploring round's does
        rows.append(row)
        if on_round:
            on_round(row)
    return {"seed": cfg.seed, "rounds": rows, "validation_size": len(srv.val.y),
            "mean": {k: float(np.mean([r[k] for r in rows])) for k in (*DEPLOYMENTS, *DIFFERENCES)}}


def summarize(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each difference: its per-seed means, their mean and 95% t-interval over seeds (the unit a
    claim rests on), and every round pooled (mean and standard error: descriptive, rounds of a
    seed are not independent)."""
    out = {}
    for k in DIFFERENCES:
        per_seed = [s["mean"][k] for s in seeds]
        pooled = np.array([r[k] for s in seeds for r in s["rounds"]])
        m, ci = t_interval(per_seed)
        out[k] = {"per_seed": per_seed, "mean": m, "ci95": ci, "verdict": verdict(ci),
                  "rounds_pooled_mean": float(pooled.mean()),
                  "rounds_pooled_se": float(pooled.std(ddof=1) / np.sqrt(len(pooled))) if len(pooled) > 1 else None,
                  "rounds_below_zero": f"{int((pooled < 0).sum())}/{len(pooled)}"}
    return out


def run_mixing(cfg: ExperimentConfig, seeds: list[int], warmup: int | None = None, measure: int | None = None,
               on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every seed (module docstring). Defaults: fedhq's own warm-up and exploring window."""
    start, n_explore = explore_window(cfg.rounds)
    warmup = start if warmup is None else warmup
    measure = n_explore if measure is None else measure
    if warmup < 0 or measure < 1:
        raise ConfigError(f"measure: need --warmup >= 0 and --measure >= 1 (got {warmup}, {measure})")
    from fedhq_core.simulation import load_data

    t0 = time.perf_counter()
    dataset = load_data(cfg)
    per = [measure_seed(cfg.replace(seed=s), warmup, measure, dataset, on_round) for s in seeds]
    first = per[0]["rounds"][0]["priced_s"]
    from flows.study import code_digest

    return {"config": cfg.public_dict(), "code_digest": code_digest(), "seeds": seeds, "warmup": warmup, "measure": measure,
            "validation": {"split": "validation", "size": per[0]["validation_size"]},
            "per_seed": per, "summary": summarize(per), "priced_s": first, "wall_s": time.perf_counter() - t0}
