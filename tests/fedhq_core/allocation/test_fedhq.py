"""The FedHQ allocator: the coarse rule, the local search, signed gains, the fine stage end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhq_core.allocation import FedHQAllocator, SignificanceModel, allocate_coarse, local_search, objective
from fedhq_core.allocation.fedhq import normalised_significance
from fedhq_core.allocation.pilot import fit_for_run
from fedhq_core.allocation.significance import client_features, minmax
from fedhq_core.simulation import Simulation


# --- coarse geometry ------------------------------------------------------------------
def _points():
    s = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    a = np.array([0.1, 0.9, 0.05, 0.0, 0.5])
    t_ptq = np.array([10.0, 8.0, 5.0, 2.0, 1.0])
    t_qat = t_ptq * 1.5
    return s, a, t_ptq, t_qat


def test_xi_zero_gives_qat_wherever_it_helps():
    s, a, tp, tq = _points()
    x, _ = allocate_coarse(s, a, tp, tq, 0.0)
    assert x.tolist() == (a > 0).tolist() == [True, True, True, False, True]


def test_xi_one_gives_free_qat_only():
    s, a, tp, tq = _points()
    x, free = allocate_coarse(s, a, tp, tq, 1.0)
    assert np.array_equal(x, free)
    assert np.array_equal(free, (tq <= tp.max()) & (a > 0))  # T* = slowest client's PTQ time; gain > 0


def test_above_line_gets_qat_below_gets_ptq():
    # no free QAT here (QAT far slower), so only the line decides
    s = np.array([0.5, 0.5])
    a = np.array([0.9, 0.05])
    tp = np.array([1.0, 1.0])
    tq = np.array([100.0, 100.0])
    x, free = allocate_coarse(s, a, tp, tq, 0.5)  # line: a >= 1 - s = 0.5
    assert not free.any()
    assert x.tolist() == [True, False]


def test_local_search_ends_in_a_one_flip_optimum_within_the_band():
    rng = np.random.default_rng(0)
    s, a = rng.random(12), rng.random(12)
    tp = rng.uniform(1, 3, 12)
    tq = tp * rng.uniform(1.0, 2.0, 12)
    x0, _ = allocate_coarse(s, a, tp, tq, 0.3)
    x = local_search(x0, s, a, tp, tq, 0.3, band=0.2)
    margin = np.abs(0.7 * normalised_significance(a) - 0.3 * (1 - s))
    assert np.all((x == x0) | (margin <= 0.2))
    # no single flip of a client in the band lowers J (checked here by brute force)
    j = objective(x, tp, tq, a, 0.3)
    for i in np.flatnonzero(margin <= 0.2):
        y = x.copy()
        y[i] = ~y[i]
        assert objective(y, tp, tq, a, 0.3) >= j - 1e-12
    # with the whole fleet in the band, the greedy result is at most the brute-force optimum's J + its
    # one-flip gap; on this instance it finds the optimum itself
    full = local_search(x0, s, a, tp, tq, 0.3, band=10.0)
    best = min(objective(np.array([(m >> k) & 1 for k in range(12)], bool), tp, tq, a, 0.3) for m in range(4096))
    assert objective(full, tp, tq, a, 0.3) == pytest.approx(best)


def test_signed_gains_negative_fleet_gets_ptq_positive_fleet_free_qat():
    """A synthetic fleet: where every predicted gain is <= 0 nobody gets QAT, even free; where
    gains are positive, every client whose QAT fits in the slowest PTQ time gets it free."""
    rng = np.random.default_rng(3)
    tp = rng.uniform(1, 4, 16)
    tq = tp * 1.3
    s = minmax(1.0 / tp)
    for xi in (0.0, 0.2, 1.0):
        x, free = allocate_coarse(s, -rng.uniform(0.01, 0.2, 16), tp, tq, xi)
        assert not x.any() and not free.any()
        assert not local_search(x, s, -np.ones(16), tp, tq, xi, band=10.0).any()
    gains = rng.uniform(0.01, 0.2, 16)
    x, free = allocate_coarse(s, gains, tp, tq, 1.0)
    assert free.tolist() == (tq <= tp.max()).tolist() and free.sum() >= 10 and np.array_equal(x, free)
    mixed = np.where(np.arange(16) % 2 == 0, gains, -gains)
    x, free = allocate_coarse(s, mixed, tp, tq, 0.2)
    assert not x[mixed <= 0].any() and np.array_equal(free, (mixed > 0) & (tq <= tp.max()))
    # J counts signed gains: adding a negative-gain client to the QAT set never lowers it
    assert objective(x | (mixed <= 0), tp, tq, mixed, 0.2) >= objective(x, tp, tq, mixed, 0.2)


def test_allocator_follows_the_sign_of_the_fitted_gain(tiny_cfg):
    """A SigAcc model fitted on synthetic rows (gain = gap - 0.1) sends a fleet to PTQ while the
    server's measured gap is small and to QAT once it is large; the scatter marks the excluded."""
    sim = Simulation(tiny_cfg.replace(strategy="fedhq"))
    sim.profile()
    rng = np.random.default_rng(0)
    shards = sim.shard_features()
    rows, gains = [], []
    for gap in np.linspace(0, 0.4, 9):
        for c in range(sim.n_clients):
            rows.append(client_features(shards[c], rng.random(), gap, None, None))
            gains.append(gap - 0.1)
    sim.set_significance(SignificanceModel.fit(np.array(rows), np.array(gains), seed=0))
    sampled = list(range(sim.n_clients))
    sim.server.gaps = [0.0]
    low = sim.allocator.allocate(0, sampled, sim)
    assert set(low.strategies.values()) == {"ptq"} and low.info["n_sign_ptq"] == len(sampled)
    assert all(g <= 0 for g in low.info["scatter"]["gain"])
    sim.server.gaps = [0.4, 0.4, 0.4]
    high = sim.allocator.allocate(1, sampled, sim)
    assert high.info["n_sign_ptq"] == 0 and high.info["n_free_qat"] >= 1 and "qat" in high.strategies.values()


def test_fedhq_allocator_end_to_end(tiny_cfg):
    cfg = tiny_cfg.replace(strategy="fedhq", rounds=4, adjust_every=2, pilot_rounds=2)
    sim = Simulation(cfg)
    sim.profile()
    before = {k: v.clone() for k, v in sim.server.global_state.items()}
    sig = fit_for_run(sim)
    # the pilot ran two branches of 2 rounds on 3 sampled clients and left the run untouched
    assert sig.tags["n_samples"] == 2 * 2 * 3 and len(sig.tags["round_gains"].split(";")) == 2
    assert all(torch.equal(before[k], sim.server.global_state[k]) for k in before) and sim.server.global_steps is None
    assert np.isfinite(sig.train_r2) and sig.cv_r2 <= 1.0
    # a checkpoint rebuilds the same model and keeps the R² figures it measured
    again = SignificanceModel.from_state(sig.to_state())
    X = np.asarray(sig.fit_data["X"])
    assert np.array_equal(again.predict(X), sig.predict(X))
    assert (again.train_r2, again.tags) == (sig.train_r2, sig.tags)
    assert np.array_equal([again.cv_r2, again.cv_r2_rounds], [sig.cv_r2, sig.cv_r2_rounds], equal_nan=True)
    sim.set_significance(sig)
    from fedhq_core.loop import run

    run(cfg, sim=sim)
    alloc = sim.allocator
    assert isinstance(alloc, FedHQAllocator)
    assert [r["version"] for r in alloc.refits] == [1, 2]
    assert all("cost_model_mape" in r.extra for r in sim.records)
    # refits after rounds 1 and 3: rounds 0-1 allocate with no cost model, rounds 2-3 with version 1
    assert [r.extra["cost_model_version"] for r in sim.records] == [0, 0, 1, 1]
    assert all(r.alloc_s >= 0 for r in sim.records)
    # the gain estimate follows the run: logged per round with the gap it was computed from
    assert [r.round for r in sim.records if "gain_mean" in r.extra and "quant_gap" in r.extra] == [0, 1, 2, 3]
    assert all("quant_gap_measured" in r.extra for r in sim.records)


def test_significance_none_skips_the_fit(tiny_cfg):
    sim = Simulation(tiny_cfg.replace(strategy="fedhq", significance="none"))
    assert not sim.needs_significance()
    sim.profile()
    alloc = sim.allocator.allocate(0, [0, 1, 2], sim)
    assert alloc.info["scatter"]["a_hat"] == [0.5, 0.5, 0.5]  # no information either way


def test_a_failed_pilot_client_stops_the_run_in_one_line(tiny_cfg):
    """The pilot compares whole rounds: a client that fails stops it with TooFewClients (the CLI's
    one line, exit 1), not a RuntimeError traceback."""
    from concurrent.futures import Future

    from fedhq_core.errors import TooFewClients
    from fedhq_core.worker import Upload

    sim = Simulation(tiny_cfg.replace(strategy="fedhq", pilot_rounds=1))
    sim.profile()

    def submit(inputs, jobs):
        f = Future()
        f.set_result([Upload(j.cid, None, "RuntimeError: boom") for j in jobs])
        return f

    with pytest.raises(TooFewClients, match=r"SigAcc pilot round 0: client \d+ failed \(raised: RuntimeError: boom\)"):
        fit_for_run(sim, submit)
