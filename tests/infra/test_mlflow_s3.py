"""Integration: a real `mlflow server` with S3 artifacts (moto's server mode) on loopback, a short
training run against it, the artifacts checked in the bucket with boto3, the model loaded back by
alias through the server. Both servers are stopped by PID afterwards."""
from __future__ import annotations

import json
import os

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


@pytest.mark.slow
def test_training_run_against_mlflow_server_with_s3(stack, tmp_path, monkeypatch):
    import boto3
    import mlflow

    from flows.cli import main

    assert stack.tracking_uri.startswith("http://127.0.0.1:") and stack.s3_endpoint.startswith("http://127.0.0.1:")
    for k, v in stack.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run.json"
    assert main(["run", "--rounds", "2", "--clients", "6", "--local-epochs", "1", "--no-progress",
                 "--set", "profile_reps=1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.bucket).get("Contents", [])]
    assert any(k.endswith("model/MLmodel") for k in keys)
    assert any(k.endswith("int_weights.safetensors") for k in keys)
    assert all(k.startswith(stack.prefix + "/") for k in keys)
    mlflow.set_tracking_uri(stack.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/fedhq-global-model@latest")
    from fedhq_core.data import load_dataset

    ds = load_dataset("digits", seed=0)
    pred = model.predict(ds.test.x[:100].numpy())
    assert pred.shape == (100,) and abs(float(np.mean(pred == ds.test.y[:100].numpy())) - res["final_acc_q"]) < 0.15
    # credentials never reach params or tags
    run = mlflow.MlflowClient(stack.tracking_uri).get_run(res["run_id"])
    logged = json.dumps({**run.data.params, **run.data.tags})
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in logged and "AWS_SECRET" not in logged
