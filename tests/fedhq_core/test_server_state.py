"""The server's aggregation: FedAvg and ranges weighted by shard size."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from fedhq_core.client import ClientResult
from fedhq_core.errors import ConfigError
from fedhq_core.quant import pack_update
from fedhq_core.server import average_ranges, fedavg
from fedhq_core.loop import run
from fedhq_core.pricing import upload_size
from fedhq_core.allocation.pilot import train_here
from fedhq_core.simulation import Simulation


def _result(cid, delta, n, ranges=None):
    g = {"w": torch.zeros(2, 3)}
    p = pack_update({"w": g["w"] + delta}, g, 32, None, ranges or {}, n)
    return ClientResult(cid, "ptq", p, n, {"fp32": [n]}, 0.0)


def test_fedavg_is_weighted_by_shard_size():
    g = {"w": torch.zeros(2, 3)}
    new = fedavg(g, [_result(0, torch.ones(2, 3), 30), _result(1, -torch.ones(2, 3), 10)])
    assert torch.allclose(new["w"], torch.full((2, 3), 0.5))
    assert torch.equal(g["w"], torch.zeros(2, 3))  # master not mutated in place


def test_ranges_are_averaged_by_shard_size():
    r = average_ranges([_result(0, torch.zeros(2, 3), 3, {"l": (0.0, 4.0)}),
                        _result(1, torch.zeros(2, 3), 1, {"l": (-4.0, 8.0)})])
    assert r == {"l": pytest.approx((-1.0, 5.0))}
