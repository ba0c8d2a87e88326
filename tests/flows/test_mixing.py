"""fedhq mixing: the isolated measurement deploys exactly what a run deploys, leaves the server as
it was, recovers the QAT clients' own steps, and refuses bad input before any training."""
from __future__ import annotations

import pytest
import torch

from fedhq_core.allocation.pilot import train_here
from fedhq_core.client import Mode
from fedhq_core.server import aggregate, evaluate_deployed, master_mse_steps
from fedhq_core.simulation import Simulation
from flows.mixing import DIFFERENCES, _deploy_val, mixed_variants, run_mixing


@pytest.fixture
def cfg(tiny_cfg):
    return tiny_cfg.replace(val_fraction=0.2, clients=4, fraction=1.0, rounds=3)


def test_deployments_match_a_run_and_leave_the_server_untouched(cfg, digits):
    sim = Simulation(cfg.replace(strategy="all-ptq", significance="none"), dataset=digits)
    sim.profile()
    srv = sim.server
    cids = sim.dispatch.sample(0)
    ptq = [train_here(sim, 0, c, Mode.PTQ) for c in cids]
    qat = [train_here(sim, 0, c, Mode.QAT) for c in cids]
    mixed = [qat[0], qat[1], ptq[2], ptq[3]]
    before = {k: v.clone() for k, v in srv.global_state.items()}
    acc, _ = _deploy_val(srv, mixed)
    assert all(torch.equal(before[k], srv.global_state[k]) for k in before) and srv.global_steps is None
    variants = mixed_variants(srv, mixed)
    assert variants["mixed"] == acc
    # the learned steps recovered from the blend are the QAT clients' own averaged steps
    master, ranges, learned = aggregate(srv.global_state, srv.global_ranges, mixed, srv.aggregation, srv.trim, srv.bound,
                                        lambda m: master_mse_steps(srv.eval_model, m))
    assert evaluate_deployed(srv.eval_model, master, ranges, srv.val, learned)["val_acc_q"] == pytest.approx(
        variants["mixed_learned_steps"], abs=1.5 / len(srv.val.y))
    # and the run's own aggregation, deployed, scores what _deploy_val said
    srv.aggregate_results(mixed)
    assert evaluate_deployed(srv.eval_model, srv.global_state, srv.deploy_ranges(), srv.val,
                             srv.global_steps)["val_acc_q"] == acc


def test_run_mixing_reports_paired_differences(cfg, digits, monkeypatch):
    monkeypatch.setattr("fedhq_core.simulation.load_data", lambda c: digits)
    out = run_mixing(cfg, [0], warmup=1, measure=1)
    (seed,) = out["per_seed"]
    (row,) = seed["rounds"]
    assert row["round"] == 1 and 0 < row["qat_share"] < 1
    for k, f in DIFFERENCES.items():
        assert row[k] == pytest.approx(f(row)) and out["summary"][k]["per_seed"] == [row[k]]
    assert out["summary"]["qat_minus_ptq"]["ci95"] is None          # one seed: no interval, no claim
    assert out["priced_s"]["blend_mse_search"] > 0 and out["validation"]["size"] == round(0.2 * 1437)


@pytest.mark.parametrize("args, field", [(["--setting", "a0.5-w2a8"], "setting"), (["--measure", "0"], "measure")])
def test_bad_input_is_one_line_exit_2(args, field, capsys):
    from flows.cli import main

    assert main(["mixing", "--no-tracking", "--dataset", "digits"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
