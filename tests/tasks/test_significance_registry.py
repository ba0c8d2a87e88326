"""SigAcc registry reuse: a version is reused only for exactly the setting it was fitted for,
found by its tags (search_model_versions), not only through alias ``current``."""
from __future__ import annotations

import numpy as np

from fedhq_core.allocation import SignificanceModel
from fedhq_core.allocation.pilot import GAIN_FIELDS, setting_key, significance_tags
from fedhq_core.config import ExperimentConfig


def test_registry_reuse_matches_every_gain_field(tmp_path, monkeypatch):
    from tasks.tracking import Tracker, TrackingSettings

    monkeypatch.chdir(tmp_path)
    tracker = Tracker(TrackingSettings.load(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    name = tracker.settings.significance_model
    rng = np.random.default_rng(0)
    a, b = ExperimentConfig(), ExperimentConfig(lr=0.02)
    assert setting_key(significance_tags(a)) != setting_key(significance_tags(b))
    # time-only fields do not change the setting; seed, lr, the fleet and the data fields do
    assert significance_tags(a) == significance_tags(a.replace(xi=0.7, jitter_sigma=0.3, throttle_prob=0.0))
    assert {"seed", "lr", "local_epochs", "batch_size", "partition", "w_bits", "fleet"} <= set(GAIN_FIELDS)
    for cfg in (a, b):   # b is fitted last: alias current points at it
        tags = significance_tags(cfg)
        model = SignificanceModel.fit(rng.random((20, 8)), rng.random(20), seed=0, tags=tags)
        tracker.start("fit", tags, tags={"kind": "fit-significance"})
        tracker.log_state(model.to_state(), "significance", name, {**tags, "setting": setting_key(tags),
                                                                   "cv_r2": 0.5}, aliases=("current",))
        tracker.end()
    found, why = tracker.load_significance(significance_tags(a))
    assert found is not None and why == "version 1" and found.cv_r2 == 0.5   # not current (2), yet found
    found, _ = tracker.load_significance(significance_tags(b))
    assert found is not None and found.tags["lr"] == "0.02"
    found, why = tracker.load_significance(significance_tags(a.replace(seed=5)))
    assert found is None and "no version" in why
    # stored as data: the version holds state.json and no pickle; a version that is not data
    # (a pickled model with matching tags) is passed over, never loaded
    import os

    from mlflow import MlflowClient

    client = MlflowClient(tracker.settings.tracking_uri)
    mv = client.get_model_version(name, "1")
    files = [a.path for a in client.list_artifacts(mv.run_id, "significance")]
    assert files == ["significance/state.json"]
    import pickle

    tags = significance_tags(a)
    tracker.start("pickled", tags)
    bad = tmp_path / "evil"
    bad.mkdir()
    (bad / "model.pkl").write_bytes(pickle.dumps({"x": 1}))
    tracker.client.log_artifacts(tracker.run_id, str(bad), "significance")
    tracker.register(name, f"runs:/{tracker.run_id}/significance", {**tags, "setting": setting_key(tags)})
    tracker.end()
    found, why = tracker.load_significance(tags)
    assert found is not None and why == "version 1"   # the newer, pickled version 3 is skipped
    assert os.path.exists(bad / "model.pkl")
