"""The fine stage's cost model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhq_core.allocation import (FedHQAllocator, RandomHybridAllocator, SignificanceModel, allocate_coarse,
                                   local_search, objective)
from fedhq_core.allocation.fedfq import fedfq_bits
from fedhq_core.allocation.cost_model import CostModel
from fedhq_core.allocation.fedhq import normalised_significance
from fedhq_core.allocation.significance import (client_features, feature_rows, js_divergence, label_histogram, minmax,
                                                shard_features)
from fedhq_core.allocation.pilot import fit_for_run, train_here
from fedhq_core.simulation import Simulation


# --- coarse geometry ------------------------------------------------------------------


# --- coarse geometry ------------------------------------------------------------------
def _points():
    s = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    a = np.array([0.1, 0.9, 0.05, 0.0, 0.5])
    t_ptq = np.array([10.0, 8.0, 5.0, 2.0, 1.0])
    t_qat = t_ptq * 1.5
    return s, a, t_ptq, t_qat


# --- fine stage ------------------------------------------------------------------------
def test_cost_model_learns_hidden_throttling():
    cm = CostModel(seed=0)
    rng = np.random.default_rng(0)
    throttled = {0, 3}
    for rnd in range(6):
        for c in range(6):
            pred = rng.uniform(1, 2)
            obs = pred * (2.5 if c in throttled else 1.0) * rng.lognormal(0, 0.05)
            cm.add(c, pred, obs, is_qat=bool(rnd % 2))
    cm.refit()
    corrected = cm.correct([0, 1], np.array([1.0, 1.0]), False)
    assert corrected[0] / corrected[1] == pytest.approx(2.5, rel=0.2)
    assert cm.version == 1
