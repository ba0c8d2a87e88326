"""Integration: a real `prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME; the
deployments are served with `fedhq serve`, one is triggered, its flow run ends COMPLETED; every
process is stopped by PID afterwards (the ephemeral server does not schedule, hence a real one)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra.local_stack import free_port, wait_http

BIN = Path(sys.executable).parent


def _stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.mark.integration
def test_served_deployment_run_completes(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               FEDHQ_STATE_DIR=str(tmp_path / "state"),
               PREFECT_RUNNER_POLL_FREQUENCY="1")    # the runner looks for scheduled runs every second
    log = open(tmp_path / "servers.log", "wb")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=log, start_new_session=True, cwd=tmp_path)
    served = None
    try:
        wait_http(f"{api}/health", timeout=180)
        env["PREFECT_API_URL"] = api
        served = subprocess.Popen([str(BIN / "fedhq"), "serve", "--rounds", "2", "--clients", "6",
                                   "--local-epochs", "1", "--strategy", "all-ptq",
                                   "--state-dir", str(tmp_path / "state")],
                                  env=env, stdout=log, stderr=log, start_new_session=True, cwd=tmp_path)
        code = ("import json;from prefect.deployments import run_deployment;"
                "r=run_deployment('fedhq-train/nightly-train', timeout=300, poll_interval=1);"
                "print(json.dumps({'state': r.state.type.value, 'name': r.name}))")
        deadline = time.time() + 120
        while True:  # wait until `fedhq serve` has registered the deployment (one HTTP call a probe)
            try:
                with urllib.request.urlopen(f"{api}/deployments/name/fedhq-train/nightly-train", timeout=5) as resp:
                    registered = resp.status == 200
            except (urllib.error.URLError, OSError):
                registered = False
            if registered or time.time() > deadline:
                break
            time.sleep(1)
        assert registered, "fedhq serve did not register fedhq-train/nightly-train within 120 s"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                           timeout=400)
        assert r.returncode == 0, r.stderr[-800:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["state"] == "COMPLETED"
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
    for p in (server, served):
        with pytest.raises(ProcessLookupError):
            os.killpg(p.pid, 0)
