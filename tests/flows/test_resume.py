"""Kill and resume: a `fedhq run` killed with SIGKILL in the middle of a round, then resumed with
`fedhq run --resume latest`, ends with the same weights and metrics as an uninterrupted run, in
the same MLflow run."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ..conftest import ROOT

ARGS = ["--clients", "8", "--rounds", "4", "--fraction", "0.5", "--local-epochs", "1", "--batch-size", "32",
        "--strategy", "fedhq", "--set", "significance=none", "--set", "adjust_every=2",
        "--set", "profile_batch_sizes=[8,16,32]", "--set", "profile_reps=1", "--set", "max_concurrency=2"]

# Runs the real CLI, but SIGKILLs its own process when a client of round 2 starts training.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import fedhq_core.worker as w
    real_job = w.run_job
    def run_job(inputs, job, device):
        if job.rnd == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_job(inputs, job, device)
    w.run_job = run_job
    from flows.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _env(tmp_path):
    env = dict(os.environ)
    env.update(FEDHQ_STATE_DIR=str(tmp_path / "state"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               PYTHONPATH=str(ROOT))
    env.pop("PREFECT_API_URL", None)
    return env


def _servers_of(state, wait_s: float) -> list[int]:
    """PIDs of live Prefect API servers launched by runs on ``state`` (from their environment)."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for d in Path("/proc").iterdir():
            try:
                if not d.name.isdigit() or b"prefect.server.api.server:create_app" not in (d / "cmdline").read_bytes():
                    continue
                if f"FEDHQ_STATE_DIR={state}".encode() in (d / "environ").read_bytes().split(b"\0") and \
                        (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(d.name))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from flows.cli import main

    from fedhq_core.checkpoint import Checkpoints, read_state
    from fedhq_core.config import load_config
    from fedhq_core.loop import run
    from fedhq_core.simulation import Simulation

    state = tmp_path / "state"
    log = tmp_path / "killed.log"
    with open(log, "w") as f:  # own session: the killed run's orphans (Prefect's server) are reaped below
        proc = subprocess.Popen([sys.executable, "-c", KILLER, "run", "--no-progress", "--state-dir", str(state),
                                 *ARGS], cwd=tmp_path, env=_env(tmp_path), stdout=f, stderr=f, start_new_session=True)
        try:
            assert proc.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-2000:]
            # the killed run's own Prefect API server dies with it (parent-death signal), before
            # the process group is cleaned up below
            assert _servers_of(state, wait_s=10) == [], "the killed run left its Prefect API server running"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    (run_dir,) = list((state / "runs").iterdir())
    assert [p.name for p in Checkpoints(run_dir).files()] == ["round-0000.ckpt", "round-0001.ckpt"]

    # resume in this process (same CLI entry point, no second interpreter start-up)
    out = tmp_path / "resumed.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert main(["run", "--resume", "latest", "--no-progress", "--state-dir", str(state), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "resuming run" in err and "after round 1" in err
    # the printed hint carries the non-default state folder, so it works as printed
    assert f"--resume {run_dir.name} --state-dir {state}" in captured.out
    res = json.loads(out.read_text())
    assert res["run_id"] == run_dir.name and [r["round"] for r in res["rounds"]] == [0, 1, 2, 3]

    # the same seeded run, uninterrupted, in plain Python (same thread count); its clock is built
    # afresh: prices come from op traces and the catalog, not from anything the killed run measured
    tensors, meta = read_state(Checkpoints(run_dir).files()[-1])
    cfg = load_config(None, {**meta["config"], "tracking": False})
    ref = Simulation(cfg)
    ref.profile()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(cfg, sim=ref)
    finally:
        torch.set_num_threads(threads)
    for k, v in ref.server.global_state.items():
        assert torch.allclose(tensors[f"global/{k}"].to(v.dtype), v, atol=1e-6), k
    for got, want in zip(res["rounds"], ref.records):
        assert got["strategies"] == {str(c): s for c, s in want.strategies.items()}
        assert got["acc_q"] == pytest.approx(want.acc_q, abs=1e-9)
        assert got["loss_q"] == pytest.approx(want.loss_q, rel=1e-5)
        # the server's work is priced from its traces, like the clients': the resumed run's
        # server share and its whole clock equal the uninterrupted run's, round by round
        assert got["server_s"] == pytest.approx(want.server_s, rel=1e-9)
        assert got["extra"].get("sim_server_wait_s", 0.0) == pytest.approx(
            want.extra.get("sim_server_wait_s", 0.0), rel=1e-9, abs=1e-12)
        assert got["sim_time_s"] == pytest.approx(want.sim_time_s, rel=1e-9)
    assert res["final_acc_q"] == pytest.approx(ref.records[-1].acc_q, abs=1e-9)

    # one MLflow run, finished, with every round's metrics
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_info = client.get_run(res["run_id"])
    assert run_info.info.status == "FINISHED" and run_info.data.tags["fedhq.resumed_after_round"] == "1"
    steps = sorted({m.step for m in client.get_metric_history(res["run_id"], "acc_q")})
    assert steps == [0, 1, 2, 3]
    # a finished run cannot be resumed again
    assert main(["run", "--resume", res["run_id"], "--state-dir", str(state)]) == 2
    assert "already completed" in capsys.readouterr().err
    assert main(["run", "--resume", "latest", "--rounds", "9", "--state-dir", str(state)]) == 2
    assert "keeps its saved config; drop --rounds" in capsys.readouterr().err


def test_a_checkpoint_config_is_not_trusted_outside_the_run(tmp_path, monkeypatch):
    """On resume, a checkpoint's tracking server must be the configured one (or be named with
    --tracking-uri), its Dask scheduler is used only when --dask-address confirms one, and it never
    turns downloading on."""
    from fedhq_core.config import ExperimentConfig
    from fedhq_core.errors import ConfigError
    from flows.train import resumed_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = ExperimentConfig(state_dir=str(tmp_path))
    saved = {"tracking_uri": "http://***@10.0.0.9:5000/", "dask_address": None}
    with pytest.raises(ConfigError, match="tracking_uri: the run tracked to http://\\*\\*\\*@10.0.0.9"):
        resumed_config(cfg, saved, None, None)
    assert resumed_config(cfg, saved, local, None).tracking_uri == local        # named: confirmed
    saved = {"tracking_uri": None, "dask_address": "tcp://10.0.0.9:8786", "download": True}
    with pytest.raises(ConfigError, match="dask_address: the run trained on tcp://10.0.0.9:8786"):
        resumed_config(cfg.replace(tracking=False), saved, None, None)
    out = resumed_config(cfg.replace(tracking=False, download=True), saved, None, "tcp://127.0.0.1:8786")
    assert out.dask_address == "tcp://127.0.0.1:8786" and out.download is False
