"""The plain-Python simulation: FedAvg arithmetic, determinism, the round verbs."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from fedhq_core.client import ClientResult
from fedhq_core.errors import ConfigError
from fedhq_core.quant import pack_update
from fedhq_core.server import average_ranges, fedavg
from fedhq_core.loop import run
from fedhq_core.pricing import upload_size
from fedhq_core.allocation.pilot import train_here
from fedhq_core.simulation import Simulation


def _result(cid, delta, n, ranges=None):
    g = {"w": torch.zeros(2, 3)}
    p = pack_update({"w": g["w"] + delta}, g, 32, None, ranges or {}, n)
    return ClientResult(cid, "ptq", p, n, {"fp32": [n]}, 0.0)


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
        p = pack_update(sim.server.global_state, {k: torch.zeros_like(v) for k, v in sim.server.global_state.items()}, bits)
        assert upload_size(sim.server.global_state, bits) == sum(t.nbytes for t in p.tensors.values())


def test_same_seed_same_run(tiny_cfg):
    a = run(tiny_cfg.replace(strategy="random-hybrid"))
    b = run(tiny_cfg.replace(strategy="random-hybrid"))
    assert [r.acc_q for r in a.records] == [r.acc_q for r in b.records]
    assert [r.strategies for r in a.records] == [r.strategies for r in b.records]
    assert all(torch.equal(a.server.global_state[k], b.server.global_state[k]) for k in a.server.global_state)


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


def test_same_seed_same_clock_in_fresh_folders_on_a_loaded_host(tiny_cfg, tmp_path):
    """The clock prices from traces and catalog constants only, the server's work included: the
    same seeded fedhq run twice in fresh state folders (traces rebuilt), the second beside a
    CPU-bound process, allocates identically, ends with identical weights, and every round's
    simulated times (and the pilot's charged time) are identical. Host time is a metric only."""
    import subprocess
    import sys

    import fedhq_core.pricing as S

    cfg = tiny_cfg.replace(strategy="fedhq", rounds=3, adjust_every=1, pilot_rounds=1, jitter_sigma=0.3)
    sims = []
    for i in range(2):
        S._BOOKS.clear()
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if i else None
        try:
            sims.append(run(cfg.replace(state_dir=str(tmp_path / f"fresh{i}"))))
        finally:
            if busy:
                busy.kill()
                busy.wait()
    a, b = sims
    assert [r.strategies for r in a.records] == [r.strategies for r in b.records]
    sim_times = lambda sim: [(r.sim_round_s, r.sim_time_s, r.server_s,  # noqa: E731
                              {k: v for k, v in r.extra.items() if k.startswith("sim_")}) for r in sim.records]
    assert sim_times(a) == sim_times(b)
    assert all(r.server_s > 0 and r.extra["sim_alloc_s"] > 0 and "server_host_s" in r.extra for r in a.records)
    sa, sb = a.summary(), b.summary()
    assert sa["fit_source"] == "pilot" and sa["fit_sim_s"] == sb["fit_sim_s"] > 0
    assert sa["charged_total_sim_s"] == pytest.approx(sa["total_sim_s"] + sa["fit_sim_s"])
    assert sa["wall_s"] >= sa["fit_wall_s"] > 0     # the pilot's wall time is on the run's bill too
    assert all(torch.equal(a.server.global_state[k], b.server.global_state[k]) for k in a.server.global_state)


def test_server_work_is_priced_from_its_trace(tiny_cfg):
    """Aggregation is priced from traces of the server's own function, linear in the uploads."""
    from fedhq_core.hardware import price_trace
    from fedhq_core.hardware.server_work import HostOps

    sim = Simulation(tiny_cfg)
    sim.profile()
    srv, book = sim.pricing.server, sim.pricing.trace_book()
    d = srv.device
    header = lambda n, b: srv.host_s(HostOps(n * (2 + 5 * srv.n_tensors + srv.n_layers), b))  # noqa: E731
    assert srv.aggregate_s(2, 0, 8, 100) == pytest.approx(price_trace(book.get("s_agg2", 8), d) + header(2, 100))
    assert srv.aggregate_s(1, 1, 8, 100) == pytest.approx(price_trace(book.get("s_aggq", 8), d) + header(2, 100))
    per_upload = srv.aggregate_s(3, 0, 8, 0) - srv.aggregate_s(2, 0, 8, 0)
    assert per_upload > 0 and srv.aggregate_s(6, 0, 8, 0) == pytest.approx(srv.aggregate_s(2, 0, 8, 0) + 4 * per_upload)
    assert "dequantize" not in " ".join(book.get("s_agg1", 8).names)   # aten ops, the decoding's included
    assert srv.gap_s() > srv.proxy_s() > 0 and srv.calib_s() > 0


def test_profile_file_opts_in_to_host_coefficients(tiny_cfg, tmp_path):
    import json

    prof = tmp_path / "host.json"
    prof.write_text(json.dumps({"overrides": {"*": {"eta_c": 0.01, "eta_m": 0.01}}}))
    base, calibrated = Simulation(tiny_cfg), Simulation(tiny_cfg.replace(profile_file=str(prof)))
    base.profile(), calibrated.profile()
    t0, t1 = base.predicted_times([0, 1]), calibrated.predicted_times([0, 1])
    assert np.all(t1["qat"] > t0["qat"])                      # 1% efficiency: slower everywhere
    calibrated.close_round(0, calibrated.allocate(0, [0])[0], 0.0, [train_here(calibrated, 0, 0, "qat")], 0.0, None)
    _, meta = calibrated.state_dict()
    assert meta["speed"]["overrides"]["*"]["eta_c"] == 0.01  # stored with the run (checkpoint)
    prof.write_text("{not json")
    with pytest.raises(ConfigError, match="profile_file"):
        Simulation(tiny_cfg.replace(profile_file=str(prof))).profile()


def test_pooled_model_reuse_trains_like_a_fresh_model(tiny_cfg):
    """A model (and its SGD optimizer) reused across clients, with the round's shared QAT warm
    start, gives bit-identical uploads to a fresh model per client: fresh momentum each time."""
    import pickle

    import numpy as np

    from fedhq_core.client import train_client
    from fedhq_core.worker import RoundInputs, ShardRef, warm_steps

    sim = Simulation(tiny_cfg)
    inputs = RoundInputs(sim.model_spec, "cpu", sim.server.global_state, None, None)
    reused = sim.new_model()
    for cid in (0, 1, 2):
        x, y = sim.shards[cid].read()
        spec = sim.dispatch.client_spec(0, cid, "qat")
        a = train_client(reused, cid, x, y, sim.server.global_state, None, spec, None, warm_steps(inputs, reused))
        b = train_client(sim.new_model(), cid, x, y, sim.server.global_state, None, sim.dispatch.client_spec(0, cid, "qat"))
        assert a.work == b.work and "wsearch" in a.work          # billed for the search it did not repeat
        for k, t in a.payload.tensors.items():
            assert np.array_equal(np.frombuffer(t.data, np.uint8), np.frombuffer(b.payload.tensors[k].data, np.uint8))
    # a shard travels to a worker as its indices only
    ref = sim.shards[1]
    copy = pickle.loads(pickle.dumps(ref))
    assert copy.split is None and len(pickle.dumps(ref)) < 4096 and np.array_equal(copy.idx, ref.idx)
