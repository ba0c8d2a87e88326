"""The allocator: analyses, coarse geometry, fine adjustment, and the baselines (fixed seeds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhq_core.allocation import (FedHQAllocator, RandomHybridAllocator, SignificanceModel, allocate_coarse,
                                   local_search, objective)
from fedhq_core.allocation.fedfq import fedfq_bits
from fedhq_core.allocation.fedhq import CostModel
from fedhq_core.allocation.significance import client_features, js_divergence, label_histogram, minmax
from fedhq_core.simulation import Simulation


# --- coarse geometry ------------------------------------------------------------------
def _points():
    s = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    a = np.array([0.1, 0.9, 0.05, 0.0, 0.5])
    t_ptq = np.array([10.0, 8.0, 5.0, 2.0, 1.0])
    t_qat = t_ptq * 1.5
    return s, a, t_ptq, t_qat


def test_xi_zero_gives_all_qat():
    s, a, tp, tq = _points()
    x, _ = allocate_coarse(s, a, tp, tq, 0.0)
    assert x.all()


def test_xi_one_gives_free_qat_only():
    s, a, tp, tq = _points()
    x, free = allocate_coarse(s, a, tp, tq, 1.0)
    assert np.array_equal(x, free)
    assert np.array_equal(free, tq <= tp.max())  # T* = slowest client's PTQ time


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
    margin = np.abs(0.7 * a - 0.3 * (1 - s))
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


# --- analyses -------------------------------------------------------------------------
def test_features_and_divergence():
    g = label_histogram(np.repeat(np.arange(10), 10), 10)
    skewed = client_features(np.zeros(30, dtype=int), g, 0.1)
    iid = client_features(np.repeat(np.arange(10), 3), g, 0.0)
    assert js_divergence(g, g) == pytest.approx(0.0)
    assert skewed[2] > iid[2]                 # JS divergence
    assert skewed[3] == 1 and iid[3] == 10    # classes present
    assert skewed[1] == pytest.approx(0.0)    # entropy of one class
    assert np.allclose(minmax(np.array([2.0, 4.0, 3.0])), [0, 1, 0.5])
    assert np.allclose(minmax(np.array([1.0, 1.0])), [0.5, 0.5])


def test_significance_model_learns_a_relation():
    rng = np.random.default_rng(0)
    X = rng.random((80, 5))
    y = 0.3 * X[:, 4] + 0.1 * X[:, 2]
    m = SignificanceModel.fit(X, y, seed=0)
    assert m.train_r2 > 0.8
    assert m.predict(np.array([[0, 0, 0, 0, 1.0]]))[0] > m.predict(np.array([[0, 0, 0, 0, 0.0]]))[0]


def test_predicted_work_is_what_clients_report(tiny_cfg):
    """The allocator's predicted times price exactly the work a client then reports back."""
    from fedhq_core.hardware import predict_compute

    sim = Simulation(tiny_cfg)
    sim.profile()
    for strategy in ("ptq", "qat"):
        r = sim.train(0, 1, strategy)
        assert r.work == sim.expected_work(1, strategy)
        dev = sim.fleet.devices[1]
        assert predict_compute(sim.speed, dev, r.work) == pytest.approx(
            predict_compute(sim.speed, dev, sim.expected_work(1, strategy)))
    r = sim.train(0, 1, "ptq")
    assert r.work["calib"] == r.work["fwd"] and sum(r.work["calib"]) <= len(sim.shards[1]) and r.quant_loss is not None
    quiet = Simulation(tiny_cfg.replace(report_sensitivity=False))
    r = quiet.train(0, 1, "ptq")
    assert set(r.work) == {"fp32", "calib", "pack"} and r.quant_loss is None


# --- fine stage ------------------------------------------------------------------------
def test_cost_model_learns_hidden_throttling():
    cm = CostModel(seed=0)
    rng = np.random.default_rng(0)
    throttled = {0, 3}
    for rnd in range(6):
        for c in range(6):
            pred = rng.uniform(1, 2)
            obs = pred * (2.5 if c in throttled else 1.0) * rng.lognormal(0, 0.05)
            cm.add(c, pred, obs, is_qat=bool(rnd % 2))
    cm.refit()
    corrected = cm.correct([0, 1], np.array([1.0, 1.0]), False)
    assert corrected[0] / corrected[1] == pytest.approx(2.5, rel=0.2)
    assert cm.version == 1


def test_fedhq_allocator_end_to_end(tiny_cfg):
    cfg = tiny_cfg.replace(strategy="fedhq", rounds=4, adjust_every=2, pilot_rounds=1)
    sim = Simulation(cfg)
    sim.profile()
    sim.set_significance(sim.fit_significance())
    from fedhq_core.simulation import run

    run(cfg, sim=sim)
    alloc = sim.allocator
    assert isinstance(alloc, FedHQAllocator)
    assert [r["version"] for r in alloc.refits] == [1, 2]
    assert all("cost_model_mape" in r.extra for r in sim.records)
    # refits after rounds 1 and 3: rounds 0-1 allocate with no cost model, rounds 2-3 with version 1
    assert [r.extra["cost_model_version"] for r in sim.records] == [0, 0, 1, 1]
    assert all(r.alloc_s >= 0 for r in sim.records)


def test_random_hybrid_share_and_determinism():
    a = RandomHybridAllocator(0.4, seed=1).allocate(3, list(range(10)), None)
    b = RandomHybridAllocator(0.4, seed=1).allocate(3, list(range(10)), None)
    assert a.strategies == b.strategies and a.qat_share == pytest.approx(0.4)


def test_fedfq_annealing_meets_budget_and_prefers_wide_ranges():
    torch.manual_seed(0)
    deltas = {"big": torch.randn(1000) * 10, "small": torch.randn(1000) * 0.01, "mid": torch.randn(500)}
    bits = fedfq_bits(deltas, avg_bits=4.0, iters=300, seed=0)
    n = {k: v.numel() for k, v in deltas.items()}
    assert sum(n[k] * b for k, b in bits.items()) <= 4.0 * sum(n.values())
    assert bits["big"] > bits["small"]
    assert all(2 <= b <= 8 for b in bits.values())


def test_significance_none_skips_the_fit(tiny_cfg):
    sim = Simulation(tiny_cfg.replace(strategy="fedhq", significance="none"))
    assert not sim.needs_significance()
    sim.profile()
    alloc = sim.allocator.allocate(0, [0, 1, 2], sim)
    assert alloc.info["scatter"]["a_hat"] == [0.5, 0.5, 0.5]  # no information either way
