"""The server's aggregation: FedAvg and ranges weighted by shard size."""
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


def test_a_hybrid_round_blends_the_steps_and_measures_its_partial_aggregates(tiny_cfg):
    """A hybrid round deploys the data-weighted mean of the QAT clients' learned steps and the new
    master's MSE scales (all-QAT: its learned steps); the round's partial comparison is measured
    and priced while the next round trains (``carried_s``)."""
    from fedhq_core.server import blend_steps, master_mse_steps

    sim = Simulation(tiny_cfg.replace(strategy="fedhq", significance="online"))
    sim.profile()
    start = {k: v.clone() for k, v in sim.server.global_state.items()}
    ptq, qat = train_here(sim, 0, 0, "ptq"), train_here(sim, 0, 1, "qat")
    learned = {k: torch.from_numpy(v) for k, v in qat.payload.weight_steps.items()}
    master = fedavg(start, [ptq, qat])
    blended = blend_steps(sim.server.eval_model, master, learned, [ptq, qat])
    mse = master_mse_steps(sim.server.eval_model, master)
    w = qat.n_samples / (qat.n_samples + ptq.n_samples)
    assert all(torch.allclose(blended[k], w * learned[k] + (1 - w) * mse[k]) for k in learned)
    assert blend_steps(sim.server.eval_model, master, learned, [qat]) is learned
    priced = sim.server.aggregate([ptq, qat], ["partials"])
    assert sim.server.partials and -1 <= sim.server.partials[-1] <= 1
    assert sim.server.carried_s == pytest.approx(sim.pricing.server.partial_s(1, 1, 8)) and sim.server.carried_s > 0
    assert all(torch.equal(sim.server.global_state[k], master[k]) for k in start)
    assert all(torch.allclose(sim.server.global_steps[k], blended[k]) for k in learned)
    assert priced > sim.pricing.aggregation_s([ptq])
    # the first QAT round has no deployed steps: its steps are bounded against the new master's
    # MSE steps, the very search its blend needs (priced once); an all-QAT round pays one more
    assert priced == pytest.approx(sim.pricing.aggregation_s([ptq, qat], 0, True))
    assert priced == pytest.approx(sim.pricing.aggregation_s([ptq, qat]))
    assert sim.pricing.aggregation_s([qat], 0, True) - sim.pricing.aggregation_s([qat]) == pytest.approx(
        sim.pricing.server.mse_s())


def test_aggregation_keeps_batchnorm_variances_nonnegative():
    """An update can take a small running variance below zero (a robust rule or a float rounding
    can, even at full precision); the master floors it at eps, not at 0 (1/sqrt(eps) at 0)."""
    from types import SimpleNamespace

    import torch

    from fedhq_core.quant import pack_update
    from fedhq_core.server import VAR_FLOOR, aggregate

    state = {"bn.running_var": torch.tensor([1e-4, 2.0]), "bn.running_mean": torch.tensor([0.0, 0.0])}
    local = {"bn.running_var": torch.tensor([1e-4 - 0.5, 1.5]), "bn.running_mean": torch.tensor([-0.5, 0.5])}
    payload = pack_update(local, state, 32, torch.Generator().manual_seed(0))
    master, _, _ = aggregate(state, None, [SimpleNamespace(cid=0, n_samples=10, payload=payload)])
    assert torch.equal(master["bn.running_var"], torch.tensor([VAR_FLOOR, 1.5])) and VAR_FLOOR == 1e-5
    assert torch.equal(master["bn.running_mean"], torch.tensor([-0.5, 0.5]))   # means may be negative


def test_aggregation_reports_the_step_search_it_ran(tiny_cfg):
    """The steps bound searches the new master's MSE steps only where no steps were deployed yet
    and a QAT upload came: ``aggregate_results`` says so, and the callers bill it (a run through
    ``aggregation_s``; the family pilot for an all-QAT pick, which no blend pays for)."""
    sim = Simulation(tiny_cfg.replace(strategy="fedhq", significance="online"))
    sim.profile()
    ptq, qat = train_here(sim, 0, 0, "ptq"), train_here(sim, 0, 1, "qat")
    assert not sim.server.aggregate_results([ptq])          # no QAT upload: nothing to bound
    assert sim.server.aggregate_results([qat])              # QAT, nothing deployed yet: searched
    assert sim.server.global_steps
    assert not sim.server.aggregate_results([qat])          # bounded against the deployed steps
    unbounded = Simulation(tiny_cfg.replace(strategy="fedhq", significance="online", norm_bound=0))
    unbounded.profile()
    assert not unbounded.server.aggregate_results([qat])


def test_server_momentum_is_fedavgm():
    """FedAvgM (Flower's rule): velocity = m * velocity + (old - new), master = old - lr * velocity,
    on the trained tensors; BatchNorm statistics and integer buffers are the new aggregate's.
    m = 0, lr = 1 is FedAvg."""
    from fedhq_core.server import server_momentum_step

    old = {"w": torch.zeros(3), "bn.running_mean": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(4)}
    new = {"w": torch.ones(3), "bn.running_mean": torch.full((2,), 0.5), "bn.num_batches_tracked": torch.tensor(5)}
    same, _ = server_momentum_step(old, new, None, 0.0, 1.0)
    assert all(torch.equal(same[k], new[k]) for k in new)
    m1, v1 = server_momentum_step(old, new, None, 0.9, 0.1)
    assert set(v1) == {"w"} and torch.allclose(v1["w"], -torch.ones(3)) and torch.allclose(m1["w"], torch.full((3,), 0.1))
    assert torch.equal(m1["bn.running_mean"], new["bn.running_mean"]) and int(m1["bn.num_batches_tracked"]) == 5
    new2 = {**new, "w": m1["w"] + 1.0}                     # the next round's aggregate moves it by 1 again
    m2, v2 = server_momentum_step(m1, new2, v1, 0.9, 0.1)
    assert torch.allclose(v2["w"], torch.full((3,), -1.9)) and torch.allclose(m2["w"], torch.full((3,), 0.29))
    assert torch.allclose(v1["w"], -torch.ones(3))         # the previous velocity is not changed in place


def test_server_momentum_runs_priced_and_resumes(tiny_cfg):
    """A run with FedAvgM pays the traced momentum step once a round, on top of FedAvg's price."""
    cfg = tiny_cfg.replace(rounds=2, strategy="all-ptq", server_momentum=0.9, server_lr=0.1)
    sim = Simulation(cfg)
    sim.profile()
    res = [_result(0, torch.zeros(2, 3), 3)]
    plain = Simulation(tiny_cfg)
    plain.profile()
    mom = sim.pricing.server.momentum_s()
    assert mom > 0 and sim.pricing.aggregation_s(res) == pytest.approx(plain.pricing.aggregation_s(res) + mom)
    done = run(cfg, sim=sim)
    assert done.server.velocity is not None and set(done.server.velocity) <= set(done.server.global_state)
    assert any(k.startswith("velocity/") for k in done.server.state_tensors())
    from fedhq_core.config import validate

    with pytest.raises(ConfigError, match="server_momentum"):
        validate(tiny_cfg.replace(server_momentum=1.0))


def test_server_average_deploys_the_running_average_of_the_last_masters(tiny_cfg):
    """``server_average``: the last share of the rounds' masters are averaged uniformly (SWA) and
    that average is what is evaluated and registered; the clients train from the latest master;
    each averaging is priced (``s_avg``)."""
    from fedhq_core.server import evaluate_global, running_average

    a, b, c = ({"w": torch.full((2,), x), "n": torch.tensor(int(x))} for x in (1.0, 2.0, 6.0))
    avg, n = running_average(None, a, 0)
    avg, n = running_average(avg, b, n)
    avg, n = running_average(avg, c, n)
    assert n == 3 and torch.allclose(avg["w"], torch.full((2,), 3.0)) and avg["n"] is c["n"]

    kept: list = []
    cfg = tiny_cfg.replace(rounds=4, strategy="all-ptq", server_average=0.5)
    sim = Simulation(cfg)
    orig = sim.server.aggregate

    def spy(*args, **kw):
        out = orig(*args, **kw)
        kept.append({k: v.clone() for k, v in sim.server.global_state.items()})
        return out
    sim.server.aggregate = spy
    done = run(cfg, sim=sim)
    srv = done.server
    assert [done.averages(r) for r in range(4)] == [False, False, True, True] and srv.n_averaged == 2
    w = next(k for k, v in srv.global_state.items() if v.is_floating_point())
    assert torch.allclose(srv.averaged[w], (kept[2][w] + kept[3][w]) / 2, atol=1e-6)
    assert srv.deployed_state is srv.averaged and not torch.equal(srv.averaged[w], srv.global_state[w])
    want = evaluate_global(srv.eval_model, srv.averaged, srv.deploy_ranges(), srv.test.x, srv.test.y, srv.global_steps)
    assert done.records[-1].acc_q == pytest.approx(want["acc_q"])
    assert torch.equal(srv.deployed_bundle({})["state"][w], srv.averaged[w])
    plain = Simulation(tiny_cfg)
    plain.profile()
    res = [_result(0, torch.zeros(2, 3), 3)]
    assert plain.pricing.aggregation_s(res, averaged=True) == pytest.approx(
        plain.pricing.aggregation_s(res) + plain.pricing.server.average_s()) and plain.pricing.server.average_s() > 0
