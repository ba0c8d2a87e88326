"""SigAcc families in the registry: a run reuses the newest registered family whose grid covers
its setting (found by its ``family`` tag with search_model_versions), stored as data, never a
pickle; a run outside every family's grid gets none."""
from __future__ import annotations

import numpy as np

from fedhq_core.allocation.pilot import COVERED_FIELDS, Family, find_family
from fedhq_core.allocation.significance import FEATURES
from fedhq_core.config import ExperimentConfig
from flows.significance import registered_family


def _family(cfgs: list[ExperimentConfig], seed: int = 0) -> Family:
    rng = np.random.default_rng(seed)
    n = 12 * len(cfgs)
    return Family("digits", "cnn", [{f: getattr(c, f) for f in ("seed", *COVERED_FIELDS)} for c in cfgs],
                  rng.random((n, len(FEATURES))).tolist(), rng.normal(size=n).tolist(), list(range(n)),
                  [i % 4 for i in range(n)], [i // 12 for i in range(n)], {"cv_settings": 0.1}, {"sim_s": 5.0})


def test_registry_family_covers_by_grid_ranges(tmp_path, monkeypatch):
    from tasks.tracking import Tracker, TrackingSettings

    monkeypatch.chdir(tmp_path)
    tracker = Tracker(TrackingSettings.load(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    name = tracker.settings.significance_model
    base = ExperimentConfig()
    narrow = _family([base.replace(lr=0.02), base.replace(lr=0.05)])
    wide = _family([base.replace(lr=0.02, clients=10), base.replace(lr=0.1, clients=40)], seed=1)
    for fam in (narrow, wide):   # wide is registered last: the newest
        tracker.start("fit", {"grid": "x"}, tags={"kind": "fit-significance"})
        tracker.log_state(fam.to_dict(), "significance", name, fam.tags(), aliases=("current",))
        tracker.end()
    found, why = registered_family(tracker, base.replace(seed=9, clients=25))   # a new seed and client count
    assert found is not None and found.settings == wide.settings and "version 2" in why
    found, why = registered_family(tracker, base.replace(lr=0.05))
    assert found is not None and "version 2" in why and "reused by 2" in why
    found, why = registered_family(tracker, base.replace(clients=25, lr=0.03, w_bits=8))
    assert found is None and "w_bits=8" in why
    # significance: online uses no version, so none is searched for nor counted
    from fedhq_core.simulation import Simulation
    from flows.significance import obtain_significance

    from mlflow import MlflowClient as _Client

    before = _Client(tracker.settings.tracking_uri).get_model_version(name, "2").tags["runs_reused"]
    online = Simulation(base.replace(strategy="fedhq", significance="online", clients=25, tracking=False))
    assert obtain_significance(online, tracker) is None and online.fit.source == "online"
    assert _Client(tracker.settings.tracking_uri).get_model_version(name, "2").tags["runs_reused"] == before
    # the registry's miss falls back to the shipped family, or says why there is none
    fam, why = find_family(base.replace(dataset="digits", w_bits=8, a_bits=8), (None, "registry: none"))
    assert fam is not None and len(fam.settings) == 24 and why.startswith("the shipped digits/cnn family")
    fam, why = find_family(base.replace(dataset="digits", clients=500), (None, "registry: none"))
    assert fam is None and why == ("registry: none; the shipped digits/cnn family: clients=500 lies outside "
                                   "the family's range 10..30")
    # stored as data: the version holds state.json and no pickle; a newer version that is not
    # data (a pickled model with the family tag) is passed over, never loaded
    import os
    import pickle

    from mlflow import MlflowClient

    client = MlflowClient(tracker.settings.tracking_uri)
    mv = client.get_model_version(name, "1")
    assert [a.path for a in client.list_artifacts(mv.run_id, "significance")] == ["significance/state.json"]
    tracker.start("pickled", {})
    bad = tmp_path / "evil"
    bad.mkdir()
    (bad / "model.pkl").write_bytes(pickle.dumps({"x": 1}))
    tracker.client.log_artifacts(tracker.run_id, str(bad), "significance")
    tracker.register(name, f"runs:/{tracker.run_id}/significance", wide.tags())
    tracker.end()
    found, why = registered_family(tracker, base)
    assert found is not None and "version 2" in why   # the newer, pickled version 3 is skipped
    assert os.path.exists(bad / "model.pkl")
