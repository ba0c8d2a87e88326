"""SigAcc: shard features and the regressor's cross-validated skill."""
from __future__ import annotations

import numpy as np
import pytest

from fedhq_core.allocation import SignificanceModel
from fedhq_core.allocation.significance import (FEATURES, client_features, feature_rows, js_divergence, label_histogram,
                                                minmax, setting_of, shard_features)
from fedhq_core.config import ExperimentConfig


def test_features_and_divergence():
    g = label_histogram(np.repeat(np.arange(10), 10), 10)
    skewed = shard_features(np.zeros(30, dtype=int), g)
    iid = shard_features(np.repeat(np.arange(10), 3), g)
    assert js_divergence(g, g) == pytest.approx(0.0)
    assert skewed[2] > iid[2]                 # JS divergence
    assert skewed[3] == 1 and iid[3] == 10    # classes present
    assert skewed[1] == pytest.approx(0.0)    # entropy of one class
    assert np.allclose(minmax(np.array([2.0, 4.0, 3.0])), [0, 1, 0.5])
    assert np.allclose(minmax(np.array([1.0, 1.0])), [0.5, 0.5])
    # run state: progress, gap, own sensitivity where reported, else the fleet's mean (flagged)
    setting = setting_of(ExperimentConfig(w_bits=2, a_bits=4, first_last_bits=0, local_epochs=2, batch_size=16, lr=0.1))
    rows = feature_rows({0: skewed, 1: iid}, [0, 1], 0.25, 0.08, {1: 0.3}, setting)
    assert rows[:, 4].tolist() == [0.25, 0.25] and rows[:, 5].tolist() == [0.08, 0.08]
    assert rows[:, 6].tolist() == [0.3, 0.3] and rows[:, 7].tolist() == [0.0, 1.0]
    assert client_features(iid, 0.0, 0.05, None, None, setting)[6] == 0.05   # nobody reported yet: the gap stands in
    # what distinguishes settings: bits, edge bits (0: the same as the weights) and local steps x lr
    assert rows[1, 8:].tolist() == pytest.approx([2, 4, 2, 2 * 2 * 0.1])      # 30 samples: 2 batches of 16
    assert len(FEATURES) == rows.shape[1]


def test_significance_model_learns_a_relation():
    rng = np.random.default_rng(0)
    X = rng.random((80, 5))
    y = 0.3 * X[:, 4] + 0.1 * X[:, 2] - 0.1
    m = SignificanceModel.fit(X, y, seed=0, groups=np.arange(80) % 8, points=np.arange(80) // 20,
                              settings=np.arange(80) % 4)
    assert m.train_r2 > 0.8 and m.cv_r2 > 0.6 and m.cv_r2_rounds > 0.6 and m.cv_r2_settings > 0.6
    assert m.cv_r2 < m.train_r2
    assert m.predict(np.array([[0, 0, 0, 0, 1.0]]))[0] > 0 > m.predict(np.array([[0, 0, 0, 0, 0.0]]))[0]
    # noise has no cross-validated skill, whatever the in-sample fit says
    noise = SignificanceModel.fit(X, rng.normal(size=80), seed=0, groups=np.arange(80) % 8, settings=np.arange(80) % 4)
    assert noise.cv_r2 < 0.1 and noise.cv_r2_settings < 0.1
