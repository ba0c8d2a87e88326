"""Tuning, registry listing and promotion against a real sqlite MLflow store."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_tune_models_and_promote(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "tune.json"
    rc = main(["tune", "--trials", "2", "--rounds", "2", "--clients", "6", "--local-epochs", "1", "--seed", "1",
               "--tracking-uri", uri, "--set", "profile_reps=1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_trials"] == 2 and res["pareto_front"]
    assert {"xi", "w_bits", "a_bits", "acc_q", "sim_s"} <= set(res["chosen"])
    assert res["plot"].endswith("pareto.png")
    # the study resumes by name
    rc = main(["tune", "--trials", "1", "--rounds", "2", "--clients", "6", "--local-epochs", "1", "--seed", "1",
               "--tracking-uri", uri, "--set", "profile_reps=1", "--json", str(out)])
    assert json.loads(out.read_text())["n_trials"] == 3

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    mv = client.get_model_version("fedhq-global-model", "1")
    assert mv.tags["strategy"] == "fedhq" and "param_xi" in mv.tags
    capsys.readouterr()
    assert main(["models", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert "fedhq-global-model" in table

    # no trial runs a pilot: SigAcc comes from a covering family or the rounds themselves (6
    # clients lie outside the shipped digits family: online), so the study fits nothing
    assert client.search_model_versions("name='fedhq-significance'") == []
    newest = max(int(v.version) for v in client.search_model_versions("name='fedhq-global-model'"))
    assert main(["promote", "--tracking-uri", uri]) == 0           # first champion: the newest version
    assert str(client.get_model_version_by_alias("fedhq-global-model", "champion").version) == str(newest)
    assert main(["promote", "--tracking-uri", uri]) == 1           # does not beat itself
    assert "does not beat" in capsys.readouterr().out
    import mlflow

    from fedhq_core.data import load_dataset

    mlflow.set_tracking_uri(uri)
    champion = mlflow.pyfunc.load_model("models:/fedhq-global-model@champion")
    pred = champion.predict(load_dataset("digits", seed=0).test.x[:16].numpy())
    assert pred.shape == (16,) and pred.min() >= 0 and pred.max() <= 9


def test_deployments_declare_three_schedules():
    import yaml

    from flows.deployments import deployments

    ds = {d.name: d for d in deployments({"strategy": "fedhq", "rounds": 3})}
    assert set(ds) == {"nightly-train", "weekly-tune", "refit-models"}
    assert ds["nightly-train"].schedules[0].schedule.cron == "0 2 * * *"
    assert ds["weekly-tune"].parameters["trials"] == 8
    from ..conftest import ROOT

    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in declared} == set(ds)


def test_serve_without_server_is_a_clear_error(monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["serve"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err
