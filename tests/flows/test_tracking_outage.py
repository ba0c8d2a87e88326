"""The tracking server goes away mid-run.

* On loopback: a real `mlflow server` is killed after round 1 and restarted on the same port after
  round 3. The run goes on, says so in one line, and the held calls are sent when the server is
  back: every round's metrics and the registered model end up in the run.
* The outbox itself, against a store that "does not answer" until told to: a bounded memory
  buffer that spills to disk, and, when the run ends before the server is back, the parked calls
  (summary and model files included) sent later by ``fedhq upload``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_run_survives_its_tracking_server_going_away(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from fedhq_core.simulation import Simulation
    from flows.cli import main
    from infra.local_stack import start_mlflow

    store = str(tmp_path / "mlflow")
    servers = [start_mlflow(store)]
    uri, port = servers[0].tracking_uri, servers[0].port
    monkeypatch.chdir(tmp_path)
    close_round = Simulation.close_round

    def outage(self, rnd, *args, **kwargs):
        rec = close_round(self, rnd, *args, **kwargs)
        if rnd == 1:
            servers[-1].stop(kill=True)                       # gone, as in a crash: rounds 2-3 without it
        elif rnd == 3:
            servers.append(start_mlflow(store, port))         # back on the same port
        return rec

    monkeypatch.setattr(Simulation, "close_round", outage)
    out = tmp_path / "run.json"
    try:
        assert main(["run", "--rounds", "5", "--clients", "6", "--local-epochs", "1", "--no-progress",
                     "--tracking-uri", uri, "--state-dir", str(tmp_path / "state"), "--set", "profile_reps=1",
                     "--json", str(out)]) == 0
        err = capsys.readouterr().err
        assert "does not answer" in err and "answers again" in err and "fedhq upload" not in err
        res = json.loads(out.read_text())
        client = MlflowClient(uri)
        assert sorted({m.step for m in client.get_metric_history(res["run_id"], "acc_q")}) == list(range(5))
        run = client.get_run(res["run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["final_acc_q"] == pytest.approx(res["final_acc_q"])
        assert client.get_model_version("fedhq-global-model", res["model_version"]).run_id == res["run_id"]
        assert not (Path(res["run_dir"]) / "mlflow-outbox").exists()
    finally:
        for s in servers:
            s.stop(kill=True)


class _Away:
    """An MlflowClient that does not answer while ``away`` is set."""

    def __init__(self, client):
        self.client, self.away = client, True

    def __getattr__(self, name):
        attr = getattr(self.client, name)

        def call(*args, **kwargs):
            if self.away:
                raise ConnectionError("Connection refused")
            return attr(*args, **kwargs)
        return call


def test_outbox_spills_parks_and_uploads(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from flows.cli import main
    from tasks.outbox import Outbox
    from tasks.tracking import Tracker, TrackingSettings

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()   # a file store: no database to create (seconds here)
    tracker = Tracker(TrackingSettings.load(tracking_uri=uri))
    tracker.settings.outage_wait_s = 0.5                      # the run's end waits this long, then parks
    run_id = tracker.start("outage", {"a": 1})
    away = _Away(tracker.client)
    box = Outbox(away, lambda *a: tracker.register(*a), tmp_path / "runs" / run_id / "mlflow-outbox", limit=3,
                 retry_s=0.05, target={"tracking_uri": uri, "run_id": run_id})
    tracker.outbox = box
    ckpt = tmp_path / "round-000.ckpt"
    ckpt.write_bytes(b"weights")
    for step in range(8):
        tracker.log_metrics({"acc_q": step / 10}, step=step)
        if step == 2:
            tracker.log_artifact(ckpt, "checkpoints")
    ckpt.unlink()                                             # rotated away before the server is back
    assert box.drain(0.3) is False and box.offline and box.held_max == 9
    assert (box.folder / "spill.jsonl").is_file()             # beyond the 3 held in memory: on disk
    tracker.log_dict({"final": 1}, "summary.json")
    tracker.end("FINISHED")
    assert tracker.parked == box.folder and not (box.folder / "spill.jsonl").exists()
    from flows.train import report_parked

    assert report_parked(tracker, {"run_id": run_id})            # what the run's end says and leaves
    assert json.loads((box.folder.parent / "summary.json").read_text())["run_id"] == run_id
    err = capsys.readouterr().err
    assert "does not answer" in err and "outbox_limit" in err and f"fedhq upload {box.folder.parent}" in err
    ops = [json.loads(line) for line in (box.folder / "ops.jsonl").read_text().splitlines()]
    assert [o["kind"] for o in ops].count("metrics") == 8 and ops[-1]["kind"] == "end"

    assert main(["upload", str(box.folder.parent)]) == 0
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "acc_q")) == list(range(8))
    assert {a.path for a in client.list_artifacts(run_id)} >= {"checkpoints", "summary.json"}
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not box.folder.exists()
    assert main(["upload", str(box.folder.parent)]) == 2      # nothing left: one-line error
