"""The plain-Python simulation: FedAvg arithmetic, determinism, the round verbs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedhq_core.client import ClientResult
from fedhq_core.quant import pack_update
from fedhq_core.server import average_ranges, fedavg
from fedhq_core.simulation import Simulation, run, upload_size


def _result(cid, delta, n, ranges=None):
    g = {"w": torch.zeros(2, 3)}
    p = pack_update({"w": g["w"] + delta}, g, 32, None, ranges or {}, n)
    return ClientResult(cid, "ptq", p, n, [n], [], 0.0)


def test_fedavg_is_weighted_by_shard_size():
    g = {"w": torch.zeros(2, 3)}
    new = fedavg(g, [_result(0, torch.ones(2, 3), 30), _result(1, -torch.ones(2, 3), 10)])
    assert torch.allclose(new["w"], torch.full((2, 3), 0.5))
    assert torch.equal(g["w"], torch.zeros(2, 3))  # master not mutated in place


def test_ranges_are_averaged_by_shard_size():
    r = average_ranges([_result(0, torch.zeros(2, 3), 3, {"l": (0.0, 4.0)}),
                        _result(1, torch.zeros(2, 3), 1, {"l": (-4.0, 8.0)})])
    assert r == {"l": pytest.approx((-1.0, 5.0))}


def test_upload_size_matches_real_payload(tiny_cfg):
    sim = Simulation(tiny_cfg)
    for bits in (4, 8, 32):
        p = pack_update(sim.global_state, {k: torch.zeros_like(v) for k, v in sim.global_state.items()}, bits)
        assert upload_size(sim.global_state, bits) == sum(t.nbytes for t in p.tensors.values())


def test_same_seed_same_run(tiny_cfg):
    a = run(tiny_cfg.replace(strategy="random-hybrid"))
    b = run(tiny_cfg.replace(strategy="random-hybrid"))
    assert [r.acc_q for r in a.records] == [r.acc_q for r in b.records]
    assert [r.strategies for r in a.records] == [r.strategies for r in b.records]
    assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in a.global_state)


@pytest.mark.parametrize("strategy", ["fp32", "all-ptq", "all-qat"])
def test_strategies_run_and_learn(tiny_cfg, strategy):
    sim = run(tiny_cfg.replace(strategy=strategy, rounds=3, local_epochs=2))
    s = sim.summary()
    assert s["final_acc_q"] > 0.3 and s["total_sim_s"] > 0
    assert len(s["rounds"]) == 3
    expected = {"fp32": "fp32", "all-ptq": "ptq", "all-qat": "qat"}[strategy]
    assert all(set(r.strategies.values()) == {expected} for r in sim.records)
    # simulated time is strictly increasing and sums the round lengths
    times = [r.sim_time_s for r in sim.records]
    assert np.all(np.diff(times) > 0) and times[-1] == pytest.approx(sum(r.sim_round_s for r in sim.records))


def test_profile_is_cached_per_host(tiny_cfg):
    a = Simulation(tiny_cfg)
    sa = a.profile()
    files = list((Path(tiny_cfg.state_dir) / "profiles").glob("*.json"))
    assert len(files) == 1
    sb = Simulation(tiny_cfg).profile()
    assert (sb.inv_eta_c, sb.inv_eta_m, sb.overhead_s) == (sa.inv_eta_c, sa.inv_eta_m, sa.overhead_s)
