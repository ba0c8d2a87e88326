"""The tracking server goes away mid-run (the loopback test with a real `mlflow server` killed and
restarted on the same port is tests/infra/test_mlflow_s3.py): here the outbox itself, against a
store that "does not answer" until told to: a bounded memory buffer that spills to disk, and,
when the run ends before the server is back, the parked calls (summary and model files
included) sent later by ``fedhq upload``."""
from __future__ import annotations

import json


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
    from tasks.run_tracking import report_parked

    assert report_parked(tracker, {"run_id": run_id})            # what the run's end says and leaves
    assert json.loads((box.folder.parent / "summary.json").read_text())["run_id"] == run_id
    err = capsys.readouterr().err
    assert "does not answer" in err and "outbox_limit" in err and f"fedhq upload {box.folder.parent}" in err
    ops = [json.loads(line) for line in (box.folder / "ops.jsonl").read_text().splitlines()]
    assert [o["kind"] for o in ops].count("metrics") == 8 and ops[-1]["kind"] == "end"

    # the configured server (here MLFLOW_TRACKING_URI) is the target, not the one the folder names
    (box.folder / "target.json").write_text(json.dumps({"tracking_uri": "http://127.0.0.1:9", "run_id": run_id}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["upload", str(box.folder.parent)]) == 0
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "acc_q")) == list(range(8))
    assert {a.path for a in client.list_artifacts(run_id)} >= {"checkpoints", "summary.json"}
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not box.folder.exists()
    assert main(["upload", str(box.folder.parent), "--tracking-uri", uri]) == 2   # nothing left: one-line error


def test_upload_sends_only_what_its_run_created(tmp_path, monkeypatch, capsys):
    """A run folder made elsewhere: its ops.jsonl names a file outside the folder (directly, and
    through a link inside it) and its target.json another server. ``fedhq upload`` refuses it in
    one line, exit 2, and nothing reaches the store."""
    import os

    from mlflow import MlflowClient

    from flows.cli import main
    from tasks.tracking import Tracker, TrackingSettings

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "mlruns"
    uri = store.as_uri()
    run_id = Tracker(TrackingSettings.load(tracking_uri=uri)).start("victim", {})
    secret = tmp_path / "secret.txt"
    secret.write_text("do not send")
    box = tmp_path / "runs" / run_id / "mlflow-outbox"
    box.mkdir(parents=True)
    (box / "target.json").write_text(json.dumps({"tracking_uri": "http://attacker.example:5000", "run_id": run_id}))
    os.symlink(secret, box / "link.txt")
    for path in (str(secret), str(box / "link.txt")):
        (box / "ops.jsonl").write_text(json.dumps({"kind": "metrics", "run_id": run_id, "metrics": [["m", 1.0, 0, 0]]})
                                       + "\n" + json.dumps({"kind": "artifact", "run_id": run_id, "path": path}) + "\n")
        capsys.readouterr()
        assert main(["upload", str(box.parent), "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "inside the run folder" in err[0] and "nothing was sent" in err[0]
        client = MlflowClient(uri)
        assert client.list_artifacts(run_id) == [] and client.get_metric_history(run_id, "m") == []
        assert not any("secret" in f for _, _, files in os.walk(store) for f in files)
    (box / "ops.jsonl").write_text(json.dumps({"kind": "shell", "cmd": "rm -rf /"}) + "\n")
    assert main(["upload", str(box.parent), "--tracking-uri", uri]) == 2
    assert "unknown tracking call" in capsys.readouterr().err
