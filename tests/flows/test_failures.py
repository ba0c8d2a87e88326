"""Failure handling through the real CLI, Prefect flow and MLflow: a 20-client digits run with
fault_rate=0.2 reports what it rejected and why; a transient task failure is retried by Prefect;
no credential reaches MLflow's params or tags."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_faulty_fleet_run_reports_rejections_and_retries_transient_failures(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    import tasks.training as T
    from flows.cli import main

    secrets = {"AWS_ACCESS_KEY_ID": "AKIAFEDHQTESTKEY0001", "AWS_SECRET_ACCESS_KEY": "fedhq-test-secret-value",
               "MLFLOW_TRACKING_TOKEN": "fedhq-test-token-value", "MLFLOW_TRACKING_PASSWORD": "fedhq-test-password"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    calls = {"n": 0}
    real = T.run_jobs

    def flaky(inputs, jobs, slot=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("worker lost (transient)")
        return real(inputs, jobs, slot)

    monkeypatch.setattr(T, "run_jobs", flaky)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run.json"
    assert main(["run", "--clients", "20", "--rounds", "3", "--local-epochs", "1", "--fault-rate", "0.2",
                 "--no-progress", "--tracking-uri", uri, "--state-dir", str(tmp_path / "state"), "--max-concurrency", "2", "--set",
                 "task_retries=1", "--set", "profile_reps=1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rej = res["rejected"]
    assert rej["total"] > 0 and sum(rej["by_reason"].values()) == rej["total"]
    assert "task failed" not in json.dumps(res["rounds"])           # the transient failure was retried
    assert calls["n"] == 1 + sum(1 for _ in range(3)) * 2           # 2 tasks a round on 2 cores, one retry
    assert f"rejected client updates: {rej['total']} (" in printed
    for reason, n in rej["by_reason"].items():
        assert f"{n} {reason}" in printed
    assert "fedhq run --resume" in printed

    client = MlflowClient(uri)
    run = client.get_run(res["run_id"])
    assert run.data.tags["fedhq.rejected"].startswith(f"{rej['total']} rejected")
    per_round = {m.step: m.value for m in client.get_metric_history(res["run_id"], "n_rejected")}
    assert sum(per_round.values()) == rej["total"] and run.data.metrics["total_rejected"] == rej["total"]
    assert [p.path for p in client.list_artifacts(res["run_id"], "checkpoints")]  # logged after the last round
    logged = json.dumps({**run.data.params, **run.data.tags})
    assert not any(v in logged for v in secrets.values())


def test_redaction_masks_credentials():
    from tasks.tracking import redact

    assert redact("tracking_uri", "https://alice:s3cret@mlflow.example.com/") == "https://***@mlflow.example.com/"
    assert redact("aws_secret_access_key", "abc") == "***" and redact("api_token", "abc") == "***"
    assert redact("dataset", "digits") == "digits"
