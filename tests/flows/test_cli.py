"""The `fedhq` CLI: bad input exits 2 with one line; a real run through Prefect + MLflow."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ..conftest import ROOT


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=120)


@pytest.mark.parametrize("args,field", [
    (["--dataset", "mnist"], "dataset"),
    (["--w-bits", "9"], "w_bits"),
    (["--rounds", "0"], "rounds"),
    (["--fraction", "1.5"], "fraction"),
    (["--dataset", "cifar10-folder", "--data-dir", "/no/such/dir"], "data_dir"),
    (["--set", "colour=red"], "colour"),
    (["--rounds", "many"], "rounds"),
    (["--fault-rate", "2"], "fault_rate"),
    (["--set", "fault_kinds=[raise,melt]"], "fault_kinds"),
    (["--dask-address", "localhost"], "dask_address"),
    (["--min-clients", "50"], "min_clients"),
    (["--resume", "no-such-run"], "no-such-run"),
    (["--profile", "/no/such/profile.json"], "profile_file"),
    (["--resume", "latest", "--no-tracking"], "--no-tracking"),      # refused with --resume, never ignored
    (["--resume", "latest", "--download"], "--download"),
    (["--tracking-uri", "http://user:hunter2@127.0.0.1:9/"], "tracking_uri"),   # nothing listens: one line
    (["--set", "family_file=/no/such/family.json"], "family_file"),
    (["--set", "significance=refit"], "significance"),
    (["fit-significance", "--grid", "seed=0,1;colour=red", "--no-tracking"], "grid"),
    (["fit-significance", "--grid", "lr=fast", "--no-tracking"], "grid"),
    (["fit-significance", "--settings", "0", "--no-tracking"], "settings"),
])
def test_bad_input_is_one_line_exit_2(args, field):
    cmd, args = (args[0], args[1:]) if args[0] == "fit-significance" else ("run", args)
    p = _cli(cmd, *args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in p.stderr
    assert "hunter2" not in p.stderr + p.stdout                     # credentials stay in the URI


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this host has CUDA")
def test_cuda_without_a_gpu_is_one_line_exit_2():
    p = _cli("run", "--device", "cuda", "--no-tracking")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "device" in lines[0] and "Traceback" not in p.stderr


def test_state_dir_moves_prefect_home(tmp_path):
    """``--state-dir`` moves Prefect's home with FedHQ's state, unless the user set PREFECT_HOME."""
    import os

    code = ("import os, sys; from flows.cli import _main; _main(['run', '--state-dir', sys.argv[1], "
            "'--resume', 'no-such-run']); print(os.environ['PREFECT_HOME'])")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "st")], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=60)
    assert p.stdout.strip() == str((tmp_path / "st" / "prefect").resolve()), p.stderr
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "st")], capture_output=True, text=True, cwd=ROOT,
                       env={**env, "PREFECT_HOME": str(tmp_path / "mine")}, timeout=60)
    assert p.stdout.strip() == str(tmp_path / "mine")


@pytest.mark.parametrize("args,field", [
    (["--input", "mnist"], "input"),
    (["--batch-size", "0"], "batch_size"),
    (["--write-profile", "p.json"], "write_profile"),
    (["--validate", "--batch-size", "8", "--reps", "0"], "reps"),
])
def test_devices_bad_input_is_one_line_exit_2(args, field):
    p = _cli("devices", *args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and field in lines[0], p.stderr


def test_devices_table_and_host_validation(tmp_path, monkeypatch):
    import flows.bench_host
    from flows.cli import main
    from flows.devices import HOST_WORK_TOLERANCE

    monkeypatch.setattr(flows.bench_host, "HELD_OUT", {"rounds": 3, "local_epochs": 1})   # short, same kinds
    out, prof = tmp_path / "dev.json", tmp_path / "host.json"
    rc = main(["devices", "--input", "digits", "--batch-size", "16", "--validate", "--reps", "3",
               "--json", str(out), "--write-profile", str(prof)])
    r = json.loads(out.read_text())
    names = [d["name"] for d in r["devices"]]
    assert {"nvidia-h200", "raspberry-pi-4", "this host (fitted)"} <= set(names)
    for d in r["devices"]:
        assert d["qat_over_fp32"] == pytest.approx(d["qat_ms"] / d["fp32_ms"])
    v = r["validation"]
    # host timings vary, so no bound on the errors here (that is `fedhq devices --validate`'s
    # job); what must hold whatever the host: each prediction is its roofline terms' sum, each
    # error is prediction against measurement, and the ratio is the predictions' ratio
    for kind in ("fp32", "qat", "fwd", "calib", "wsearch", "pack"):
        k = v[kind]
        assert k["measured_ms"] > 0 and k["predicted_ms"] == pytest.approx(sum(k["terms_ms"].values()))
        assert k["error"] == pytest.approx(k["predicted_ms"] / k["measured_ms"] - 1)
    assert v["holdout_batch"] == 16 and 16 not in v["fit_batches"] and not v["qat"]["in_fit"]
    q = v["qat_over_fp32"]
    assert q["predicted"] == pytest.approx(v["qat"]["predicted_ms"] / v["fp32"]["predicted_ms"])
    assert q["measured"] == pytest.approx(float(np.median(q["measured_pairs"])))   # paired reps
    # a QAT step traces ~7x an FP32 step's ops (fake quantization): priced well above it
    assert v["qat"]["ops"] > 5 * v["fp32"]["ops"] and q["predicted"] > 1.5
    # the server's host work of a digits run: the same operations priced (shipped table) and timed
    h = r["host_work"]
    # (fedhq decides online on digits: its family predicts nothing, so no GBR fit or prediction runs)
    assert {"allocate/fedhq", "observe/fedhq", "decode"} <= set(h["by_kind"])
    assert h["priced_s"] == pytest.approx(sum(k["priced_s"] for k in h["by_kind"].values()))
    assert h["measured_s"] > 0 and h["error"] == pytest.approx(h["priced_s"] / h["measured_s"] - 1)
    assert rc == (0 if abs(q["error"]) <= 0.2 and abs(h["error"]) <= HOST_WORK_TOLERANCE else 1)
    assert json.loads(prof.read_text())["overrides"]["*"]["eta_c"] == pytest.approx(v["host"]["eta_c"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    p = _cli("run", "--config", str(bad))
    assert p.returncode == 2 and "bad.yaml" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("roundz: 3\n")
    p = _cli("run", "--config", str(unknown))
    assert p.returncode == 2 and "roundz" in p.stderr


@pytest.mark.slow
def test_run_through_prefect_and_mlflow(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run.json"
    rc = main(["run", "--rounds", "2", "--clients", "6", "--local-epochs", "1", "--tracking-uri", uri,
               "--set", "profile_reps=1", "--json", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("config", "rounds", "final_acc_q", "final_acc_fp32", "total_sim_s", "wall_s", "upload_bytes", "run_id"):
        assert key in res
    assert len(res["rounds"]) == 2 and 0 <= res["final_acc_q"] <= 1

    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(res["run_id"])
    assert run.data.params["strategy"] == "fedhq"            # the default job is the project's method
    hist = client.get_metric_history(res["run_id"], "acc_q")
    assert [m.step for m in hist] == [0, 1]
    for metric in ("acc_fp32", "sim_time_s", "wall_s", "upload_bytes", "n_qat", "loss_q"):
        assert client.get_metric_history(res["run_id"], metric)
    mv = client.get_model_version_by_alias("fedhq-global-model", "latest")
    assert mv.run_id == res["run_id"] and mv.tags["strategy"] == "fedhq"

    # the Prefect UI shows the run's summary table and links to the MLflow run and model version
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows import api_settings

    keys = ["fedhq-fedhq-digits-summary", "fedhq-fedhq-digits-mlflow-run", "fedhq-fedhq-digits-model"]
    with api_settings(), get_client(sync_client=True) as prefect:
        arts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)), sort="CREATED_DESC")
    newest = {}
    for a in arts:
        newest.setdefault(a.key, a)
    assert set(newest) == set(keys)
    table = json.loads(newest[keys[0]].data)
    assert {"measure": "deployed (quantized) test accuracy", "value": f"{res['final_acc_q']:.4f}"} in table
    assert res["run_id"] in newest[keys[1]].data and "#/experiments/" in newest[keys[1]].data
    assert f"versions/{mv.version})" in newest[keys[2]].data
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/fedhq-global-model@latest")
    from fedhq_core.data import load_dataset

    ds = load_dataset("digits", seed=0)
    pred = model.predict(ds.test.x[:200].numpy())
    acc = float(np.mean(pred == ds.test.y[:200].numpy()))
    assert abs(acc - res["final_acc_q"]) < 0.1

    # fedhq export: the registered pyfunc version as ONNX, checked in onnxruntime, registered beside it
    import mlflow.onnx
    import onnx

    onnx_path, report = tmp_path / "model.onnx", tmp_path / "export.json"
    assert main(["export", str(mv.version), "--out", str(onnx_path), "--tracking-uri", uri, "--json", str(report)]) == 0
    rep = json.loads(report.read_text())
    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    check = rep["check"]
    assert check["n"] == len(ds.test) and abs(check["onnxruntime_acc"] - res["final_acc_q"]) <= 0.001
    assert check["agreement"] >= 0.995 and check["ok"]
    assert rep["onnx_bytes"] < 0.4 * rep["fp32_onnx_bytes"]
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert props["mlflow_run_id"] == res["run_id"] and props["w_bits"] == str(res["config"]["w_bits"])
    omv = client.get_model_version("fedhq-global-model-onnx", rep["onnx_version"])
    assert omv.run_id == res["run_id"] and omv.tags["pyfunc_version"] == str(mv.version)
    assert omv.tags["check"] == "met"
    onnx_model = mlflow.onnx.load_model(f"models:/fedhq-global-model-onnx/{rep['onnx_version']}")
    # 4-bit codes as int4 (opset 21), the 8-bit edge layers as uint8 + 128; every layer on an integer kernel
    assert rep["weight_storage"] == "int4" and rep["opset"] == 21 and rep["storage_note"] is None
    assert {i.data_type for i in onnx_model.graph.initializer if i.name.endswith(".w_int")} == {onnx.TensorProto.INT4}
    assert rep["integer_ops"] >= rep["quantized_layers"] == 4 and rep["float_compute_ops"] == 0
    assert rep["op_histogram"]["QLinearConv"] == 2 and rep["op_histogram"]["QGemm"] == 2
    assert check["acc_rule"].startswith("two images of 360")
    lat = rep["latency_ms"]
    assert set(lat) == {"fp32", "int"} and all(set(v) == {"b1", "b64"} for v in lat.values())
    assert rep["throughput_ips"]["int"]["b64"] > 0 and rep["threads"] >= 1
    assert omv.tags["weight_storage"] == "int4" and omv.tags["integer_ops"] == str(rep["integer_ops"])
    # a source that does not exist is one line, exit 2
    capsys.readouterr()
    assert main(["export", "999", "--out", str(tmp_path / "x.onnx"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "999" in err[0] and "Traceback" not in err[0]
    assert main(["export", "not-a-source", "--out", str(tmp_path / "x.onnx"), "--tracking-uri", uri]) == 2
    assert main(["export", "1", "--weights", "int2", "--out", str(tmp_path / "x.onnx"), "--tracking-uri", uri]) == 2
    # a registered model with an operation ONNX has no mapping for: one line naming it, exit 2, no file
    rc = main(["run", "--model", "tests.tasks.onnx_models:build", "--rounds", "1", "--clients", "2",
               "--fraction", "1", "--local-epochs", "1", "--tracking-uri", uri, "--set", "profile_reps=1",
               "--json", str(tmp_path / "sorts.json"), "--no-progress"])
    assert rc == 0
    sorts = client.get_latest_versions("fedhq-global-model")[0].version
    capsys.readouterr()
    assert main(["export", str(sorts), "--out", str(tmp_path / "sorts.onnx"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sort" in err[0] and "no ONNX mapping" in err[0]
    assert not (tmp_path / "sorts.onnx").exists()
