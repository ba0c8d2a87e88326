"""Device catalog, step counting, the roofline fit and the simulated clock."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhq_core.hardware import (DEVICES, ClientTime, Fleet, Measurement, RooflineModel, SimulatedClock, StepCounts,
                                 count_step)
from fedhq_core.models import SmallCNN
from fedhq_core.quant import prepare_model


def test_catalog_has_real_devices_with_sources():
    assert len(DEVICES) >= 8
    kinds = {d.kind for d in DEVICES.values()}
    assert {"edge-board", "phone", "laptop", "datacenter-gpu"} <= kinds
    for d in DEVICES.values():
        assert d.peak_flops > 1e9 and d.mem_bw > 1e9 and d.uplink_bps > 1e6 and len(d.source) > 20


def test_counts_are_linear_and_qat_moves_more_bytes():
    m = prepare_model(SmallCNN(1, 10, 8), 4, 8)
    dev = torch.device("cpu")
    fp = count_step(m, (1, 8, 8), 10, "fp32", dev)
    qat = count_step(m, (1, 8, 8), 10, "qat", dev)
    fwd = count_step(m, (1, 8, 8), 10, "fwd", dev)
    assert fp.flops_per_sample > 0 and fp.flops_per_sample == pytest.approx(3 * fwd.flops_per_sample, rel=0.35)
    assert qat.bytes(32) > fp.bytes(32) > fwd.bytes(32)


def test_roofline_fit_recovers_known_coefficients():
    counts = {"fp32": StepCounts("fp32", 2e6, 1e6, 3e4), "qat": StepCounts("qat", 2e6, 3e6, 6e4),
              "fwd": StepCounts("fwd", 7e5, 2e5, 1e4)}
    truth = RooflineModel(counts, 5e10, 1e10, inv_eta_c=2.0, inv_eta_m=4.0, overhead_s=1e-4)
    ms = [Measurement(mode, b, truth.step_time(mode, b)) for mode in counts for b in (8, 16, 32, 64)]
    fit = RooflineModel.fit(counts, ms, 5e10, 1e10, holdout_batch=32)
    assert fit.inv_eta_c == pytest.approx(2.0, rel=1e-3)
    assert fit.inv_eta_m == pytest.approx(4.0, rel=1e-3)
    assert fit.holdout_mape < 1e-3
    # steps_time is the sum of step_time over the batches
    dev = DEVICES["raspberry-pi-4"]
    assert fit.steps_time("qat", [16, 16, 5], dev) == pytest.approx(
        sum(fit.step_time("qat", b, dev) for b in (16, 16, 5)))
    # slower device -> longer step
    assert fit.step_time("fp32", 32, DEVICES["raspberry-pi-4"]) > fit.step_time("fp32", 32, DEVICES["nvidia-a100"])


def test_fleet_mix_and_hidden_slowdown_are_seeded():
    a = Fleet.build(20, {"raspberry-pi-4": 0.5, "nvidia-t4": 0.5}, 0.25, 3.0, 0.1, seed=1)
    b = Fleet.build(20, {"raspberry-pi-4": 0.5, "nvidia-t4": 0.5}, 0.25, 3.0, 0.1, seed=1)
    assert [d.name for d in a.devices] == [d.name for d in b.devices]
    assert sum(d.name == "nvidia-t4" for d in a.devices) == 10
    assert set(np.unique(a.slowdown)) <= {1.0, 3.0}
    assert a.jitter(2, 3) == b.jitter(2, 3) != a.jitter(3, 3)


def test_round_time_is_slowest_client_plus_server():
    counts = {m: StepCounts(m, 1e6, 1e5, 1e4) for m in ("fp32", "qat", "fwd")}
    speed = RooflineModel(counts, 1e10, 1e10, 1.0, 1.0, 0.0)
    fleet = Fleet.build(2, {"raspberry-pi-4": 1.0}, 0.0, 1.0, 0.0, seed=0)
    clock = SimulatedClock(fleet, speed)
    t1 = ClientTime(1.0, 1.0, 0.5)
    t2 = ClientTime(2.0, 2.0, 0.1)
    assert clock.advance([t1, t2], 0.25) == pytest.approx(2.35)
    assert clock.now_s == pytest.approx(2.35)
    ct = clock.client_time(0, 0, "qat", [16] * 4, [], 1000)
    assert ct.upload_s == pytest.approx(8000 / DEVICES["raspberry-pi-4"].uplink_bps)
