"""The overhead breakdown's arithmetic, and the run's own Prefect API server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows.overhead import breakdown


def _span(name, start, end, rnd=None, thread="MainThread"):
    return {"name": name, "round": rnd, "start": start, "end": end, "thread": thread}


def test_breakdown_rows_add_up_to_the_wall_time():
    t0 = 100.0
    spans = [_span("interpreter and CLI", t0, t0 + 0.2), _span("import torch", t0 + 0.2, t0 + 1.0),
             _span("round", t0 + 1.0, t0 + 3.0, 0),
             _span("train (tasks)", t0 + 1.0, t0 + 2.0, 0),
             _span("train-clients body", t0 + 1.1, t0 + 1.8, 0, "w1"), _span("pack (wire)", t0 + 1.7, t0 + 1.8, 0, "w1"),
             _span("train-clients body", t0 + 1.1, t0 + 1.5, 0, "w2"),
             _span("aggregate (task)", t0 + 2.0, t0 + 2.2, 0), _span("aggregate", t0 + 2.05, t0 + 2.15),
             _span("evaluate (task)", t0 + 2.2, t0 + 2.6, 0), _span("evaluate fp32", t0 + 2.2, t0 + 2.3),
             _span("evaluate quantized", t0 + 2.3, t0 + 2.5),
             _span("import mlflow", t0 + 0.1, t0 + 2.0, None, "fedhq-mlflow-open_0"),
             {"name": "prefect api cpu", "round": None, "start": 0.0, "end": 7.5, "thread": "value"}]
    rows = breakdown({"spans": spans}, 3.5, t0 + 3.5)
    want = {"interpreter start and CLI": 0.2, "import torch": 0.8, "training (clients, critical path)": 0.6,
            "packing (critical client task)": 0.1, "Prefect task bookkeeping": 0.3 + 0.1 + 0.1, "aggregation": 0.1,
            "evaluation fp32": 0.1, "evaluation quantized": 0.2, "round, other": 0.4,
            "exit (server stop, interpreter teardown)": 0.5, "rounds": 2.0, "n_rounds": 1,
            "import mlflow (background, overlapped)": 1.9, "Prefect API server CPU (its own process)": 7.5}
    for k, v in want.items():
        assert rows[k] == pytest.approx(v), k
    assert rows["other"] == pytest.approx(0.0, abs=1e-9)
    top = sum(v for k, v in rows.items() if k not in ("rounds", "n_rounds") and not k.startswith("  ")
              and "(background" not in k and "CPU" not in k)
    assert top == pytest.approx(3.5)


def test_api_server_does_not_outlive_a_killed_run(tmp_path):
    """The run's own API server gets the parent-death signal: SIGKILL of the run leaves no server."""
    code = ("import sys, time; from flows import start_api_server; s = start_api_server(); "
            "print(s.process.pid, flush=True); time.sleep(60)")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    server = int(run.stdout.readline())
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            return
        try:  # a zombie child of init counts as gone once reaped; check its state
            with open(f"/proc/{server}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.2)
    os.kill(server, signal.SIGKILL)
    pytest.fail("the API server outlived its killed run")
