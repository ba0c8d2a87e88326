"""The baseline allocators: random-hybrid and FedFQ's bit annealing."""
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


def test_random_hybrid_share_and_determinism():
    a = RandomHybridAllocator(0.4, seed=1).allocate(3, list(range(10)), None)
    b = RandomHybridAllocator(0.4, seed=1).allocate(3, list(range(10)), None)
    assert a.strategies == b.strategies and a.qat_share == pytest.approx(0.4)


def test_fedfq_annealing_meets_budget_and_prefers_wide_ranges():
    torch.manual_seed(0)
    deltas = {"big": torch.randn(1000) * 10, "small": torch.randn(1000) * 0.01, "mid": torch.randn(500)}
    bits = fedfq_bits(deltas, avg_bits=4.0, iters=300, seed=0)
    n = {k: v.numel() for k, v in deltas.items()}
    assert sum(n[k] * b for k, b in bits.items()) <= 4.0 * sum(n.values())
    assert bits["big"] > bits["small"]
    assert all(2 <= b <= 8 for b in bits.values())
