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
    assert {"xi", "w_bits", "a_bits", "val_acc_q", "sim_s", "test_acc_q"} <= set(res["chosen"])
    # Optuna's objective is each trial run's validation accuracy, never its test accuracy
    from mlflow import MlflowClient

    for t in res["pareto_front"]:
        m = MlflowClient(uri).get_run(t["run_id"]).data.metrics
        assert t["val_acc_q"] == pytest.approx(m["final_acc_q_val"]) and t["test_acc_q"] == pytest.approx(m["final_acc_q"])
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


class _Version:
    def __init__(self, version, **tags):
        self.version, self.tags = str(version), {k: str(v) for k, v in tags.items()}


class _Registry:
    """An MlflowClient's registry calls that promote makes, in memory."""

    def __init__(self, versions):
        self.versions, self.alias = versions, None

    def search_model_versions(self, _):
        return self.versions

    def get_model_version_by_alias(self, name, alias):
        from mlflow.exceptions import MlflowException

        if self.alias is None:
            raise MlflowException("no alias")
        return next(v for v in self.versions if v.version == self.alias)

    def set_registered_model_alias(self, name, alias, version):
        self.alias = str(version)


def test_promotion_reads_the_validation_split_never_the_test_split():
    from tasks.registry import promote

    same = {"dataset": "digits", "w_bits": 4, "a_bits": 8}
    reg = _Registry([_Version(1, final_acc_q=0.70, final_acc_q_val=0.90, **same)])
    assert promote(reg, "m")[0] and reg.alias == "1"
    # version 2 is better on the test split and worse on validation: not promoted
    reg.versions.append(_Version(2, final_acc_q=0.99, final_acc_q_val=0.85, **same))
    moved, text = promote(reg, "m")
    assert not moved and reg.alias == "1" and "validation acc_q 0.8500" in text
    # version 3 is worse on the test split and better on validation: promoted
    reg.versions.append(_Version(3, final_acc_q=0.10, final_acc_q_val=0.95, **same))
    assert promote(reg, "m")[0] and reg.alias == "3"
    # a version trained without a validation split is not comparable
    reg.versions.append(_Version(4, final_acc_q=1.0, final_acc_q_val="", **same))
    moved, text = promote(reg, "m")
    assert not moved and reg.alias == "3" and "no validation accuracy" in text
