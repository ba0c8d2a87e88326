"""Integration: a real `mlflow server` with S3 artifacts (moto's server mode) on loopback, a short
training run against it, the artifacts checked in the bucket with boto3, the model loaded back by
alias through the server. The tracking server goes away mid-run (SIGKILLed after round 0 and
started again on the same port while the next rounds run): the run goes on, says so, and every
round's metrics, the model and its registration reach the run once the server is back. Both servers are stopped by PID afterwards."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from infra.local_stack import start


@pytest.fixture
def stack(tmp_path):
    s = start(str(tmp_path / "stack"))
    yield s
    s.stop()
    for pid in (s.mlflow_pid, s.s3_pid):
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


@pytest.mark.integration
def test_training_run_against_mlflow_server_with_s3(stack, tmp_path, monkeypatch, capsys):
    import boto3
    import mlflow

    from fedhq_core.simulation import Simulation
    from flows.cli import main

    import threading

    close_round = Simulation.close_round
    restart = threading.Thread(target=stack.restart_mlflow)

    def outage(self, rnd, *args, **kwargs):
        rec = close_round(self, rnd, *args, **kwargs)
        if rnd == 0:
            stack.stop_mlflow()           # gone, as in a crash: the next rounds run without it
            restart.start()               # back on the same port once it has started again
        return rec

    monkeypatch.setattr(Simulation, "close_round", outage)
    (tmp_path / "mlflow.yaml").write_text("outage_wait_s: 120\n")   # the run's end waits for the restart

    assert stack.tracking_uri.startswith("http://127.0.0.1:") and stack.s3_endpoint.startswith("http://127.0.0.1:")
    for k, v in stack.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run.json"
    # credentials in the URI (the server ignores them): they must stay in it, nowhere else
    secret_uri = stack.tracking_uri.replace("http://", "http://fedhq:hunter2@")
    assert main(["run", "--rounds", "4", "--clients", "6", "--local-epochs", "1", "--no-progress",
                 "--tracking-uri", secret_uri, "--set", "profile_reps=1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    restart.join()
    captured = capsys.readouterr()
    err = captured.err
    assert "hunter2" not in captured.out + err and "hunter2" not in json.dumps(res)
    assert res["tracking_uri"].startswith("http://***@") and "***@" in res["mlflow_run_url"]
    assert "does not answer" in err and "answers again" in err and "fedhq upload" not in err
    client = mlflow.MlflowClient(stack.tracking_uri)
    assert sorted({m.step for m in client.get_metric_history(res["run_id"], "acc_q")}) == list(range(4))
    run = client.get_run(res["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["final_acc_q"] == pytest.approx(res["final_acc_q"])
    assert client.get_model_version("fedhq-global-model", res["model_version"]).run_id == res["run_id"]
    assert not (Path(res["run_dir"]) / "mlflow-outbox").exists()
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.bucket).get("Contents", [])]
    assert any(k.endswith("model/MLmodel") for k in keys)
    assert any(k.endswith("int_weights.safetensors") for k in keys)
    assert all(k.startswith(stack.prefix + "/") for k in keys)
    mlflow.set_tracking_uri(stack.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/fedhq-global-model@latest")
    from fedhq_core.data import load_dataset

    # the registered pyfunc, read back through S3, is the run's deployed model: on the run's whole
    # test split it gives the run's own accuracy, to the image
    ds = load_dataset("digits", seed=res["config"]["seed"])
    pred = model.predict(ds.test.x.numpy())
    assert pred.shape == (len(ds.test),)
    assert float(np.mean(pred == ds.test.y.numpy())) == pytest.approx(res["final_acc_q"], abs=1e-9)
    # credentials never reach params or tags
    run = mlflow.MlflowClient(stack.tracking_uri).get_run(res["run_id"])
    logged = json.dumps({**run.data.params, **run.data.tags})
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in logged and "AWS_SECRET" not in logged and "hunter2" not in logged
    # ... nor any file the run, Prefect (its database) or MLflow (its store, the bucket) wrote
    leaks = [str(p) for root in (tmp_path, Path(os.environ["PREFECT_HOME"])) for p in root.rglob("*")
             if p.is_file() and b"hunter2" in p.read_bytes()]
    assert leaks == [], leaks
    for k in keys:
        assert b"hunter2" not in s3.get_object(Bucket=stack.bucket, Key=k)["Body"].read(), k
