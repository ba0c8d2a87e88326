"""The fine stage's cost model."""
from __future__ import annotations

import numpy as np
import pytest

from fedhq_core.allocation.cost_model import CostModel


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
