"""The baseline allocators: random-hybrid and FedFQ's bit annealing."""
from __future__ import annotations

import pytest
import torch

from fedhq_core.allocation import RandomHybridAllocator
from fedhq_core.quant.bit_allocation import fedfq_bits


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
