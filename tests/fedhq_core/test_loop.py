"""The round loop as plain Python: strategies learn, runs are deterministic, the clock too."""
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
    simulated times (and the family refit's charged time) are identical. Host time is a metric only."""
    import subprocess
    import sys

    import numpy as np

    import fedhq_core.pricing as S
    from fedhq_core.allocation.pilot import COVERED_FIELDS, Family
    from fedhq_core.allocation.significance import FEATURES

    rng = np.random.default_rng(0)
    fam = Family("digits", "cnn", [{f: getattr(tiny_cfg, f) for f in ("seed", *COVERED_FIELDS)}], rng.random(
        (40, len(FEATURES))).tolist(), rng.normal(0.05, 0.1, 40).tolist(), list(range(40)), [0] * 40, [0] * 40)
    path = fam.save(tmp_path / "family.json")
    cfg = tiny_cfg.replace(strategy="fedhq", rounds=3, adjust_every=1, jitter_sigma=0.3, family_file=str(path))
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
    assert sa["fit_source"] == sb["fit_source"] and sa["fit_sim_s"] == sb["fit_sim_s"]
    assert sa["charged_total_sim_s"] == pytest.approx(sa["total_sim_s"] + sa["fit_sim_s"])
    assert sa["wall_s"] >= sa["fit_wall_s"] > 0     # deciding where SigAcc comes from is on the run's bill too
    assert all(torch.equal(a.server.global_state[k], b.server.global_state[k]) for k in a.server.global_state)


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


def test_an_upload_rejected_for_its_norm_is_still_waited_for(tiny_cfg):
    """The server receives and decodes an upload before its norm rejects it, so the round's
    clock waits for that client like any other (only the accepted ones are aggregated)."""
    from fedhq_core.loop import run

    cfg = tiny_cfg.replace(strategy="all-ptq", rounds=1, fraction=1.0, norm_bound=1.0001)
    sim = run(cfg)
    rec = sim.records[0]
    assert any(v.startswith("norm") for v in rec.rejected.values())
    waited = sim.dispatch.waited
    assert {r.cid for r in waited} == {c for c, v in rec.rejected.items() if v.startswith("norm")}
    assert not {r.cid for r in waited} & set(rec.strategies)
    slowest = max(t.total_s for t in sim.pricing.client_times(0, waited).values())
    assert rec.sim_round_s >= slowest
    # the same round not waiting for them (as before) is shorter: here a rejected client is the slowest
    import fedhq_core.dispatch as D

    accept = D.Dispatch.accept

    def forget(self, uploads):
        out = accept(self, uploads)
        self.waited = []
        return out

    D.Dispatch.accept = forget
    try:
        unwaited = run(cfg.replace(state_dir=cfg.state_dir + "-b"))
    finally:
        D.Dispatch.accept = accept
    assert unwaited.records[0].rejected == rec.rejected
    assert unwaited.records[0].sim_round_s < rec.sim_round_s


def test_a_replicate_redraws_only_the_minibatch_order(tiny_cfg):
    """``replicate`` > 0 changes the clients' batch-order seeds and nothing else a run is paired
    on: the sample, the shards and the initial weights stay the seed's."""
    import dataclasses

    import numpy as np
    import torch

    base, rep = Simulation(tiny_cfg), Simulation(dataclasses.replace(tiny_cfg, replicate=1))
    assert base.dispatch.sample(0) == rep.dispatch.sample(0)
    assert all(np.array_equal(a.idx, b.idx) for a, b in zip(base.shards, rep.shards))
    assert all(torch.equal(base.server.global_state[k], rep.server.global_state[k]) for k in base.server.global_state)
    seeds = [(base.dispatch.client_spec(0, c, "qat").seed, rep.dispatch.client_spec(0, c, "qat").seed) for c in (0, 1)]
    assert all(a != b for a, b in seeds)
    assert base.dispatch.client_spec(0, 0, "qat").seed == Simulation(tiny_cfg).dispatch.client_spec(0, 0, "qat").seed
