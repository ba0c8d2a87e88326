"""The fleet's prices: upload sizes, the server's traced work, the opt-in host profile."""
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


def test_upload_size_matches_real_payload(tiny_cfg):
    sim = Simulation(tiny_cfg)
    for bits in (4, 8, 32):
        p = pack_update(sim.server.global_state, {k: torch.zeros_like(v) for k, v in sim.server.global_state.items()}, bits)
        assert upload_size(sim.server.global_state, bits) == sum(t.nbytes for t in p.tensors.values())


def test_server_work_is_priced_from_its_trace(tiny_cfg):
    """Aggregation is priced from traces of the server's own function, linear in the uploads."""
    from fedhq_core.hardware import price_trace

    sim = Simulation(tiny_cfg)
    sim.profile()
    srv, book = sim.pricing.server, sim.pricing.trace_book()
    d = srv.device
    two = price_trace(book.get("s_agg2", 8), d)       # the traced aggregation of two uploads
    assert srv.aggregate_s(2, 0, 8) == pytest.approx(two)   # the decoding is host work, priced apart
    # the same two uploads with steps to average (a QAT upload) cost its traced function instead
    assert srv.aggregate_s(1, 1, 8) - srv.aggregate_s(2, 0, 8) == pytest.approx(
        price_trace(book.get("s_aggq", 8), d) - two)
    per_upload = srv.aggregate_s(3, 0, 8) - srv.aggregate_s(2, 0, 8)
    assert per_upload > 0 and srv.aggregate_s(6, 0, 8) == pytest.approx(srv.aggregate_s(2, 0, 8) + 4 * per_upload)
    assert "dequantize" not in " ".join(book.get("s_agg1", 8).names)   # aten ops, the decoding's included
    assert srv.gap_s() > srv.proxy_s() > 0 and srv.calib_s() > 0


def test_profile_file_opts_in_to_host_coefficients(tiny_cfg, tmp_path):
    import json

    prof = tmp_path / "host.json"
    prof.write_text(json.dumps({"overrides": {"*": {"eta_c": 0.01, "eta_m": 0.01}}}))
    base, calibrated = Simulation(tiny_cfg), Simulation(tiny_cfg.replace(profile_file=str(prof)))
    base.profile(), calibrated.profile()
    t0, t1 = base.predicted_times([0, 1]), calibrated.predicted_times([0, 1])
    assert np.all(t1["qat"] > t0["qat"])                      # 1% efficiency: slower everywhere
    calibrated.close_round(0, calibrated.allocate(0, [0])[0], 0.0, [train_here(calibrated, 0, 0, "qat")], 0.0, None)
    _, meta = calibrated.state_dict()
    assert meta["speed"]["overrides"]["*"]["eta_c"] == 0.01  # stored with the run (checkpoint)
    prof.write_text("{not json")
    with pytest.raises(ConfigError, match="profile_file"):
        Simulation(tiny_cfg.replace(profile_file=str(prof))).profile()


def test_predicted_work_is_what_clients_report(tiny_cfg):
    """The allocator's predicted times price exactly the work a client then reports back."""
    from fedhq_core.hardware import predict_compute

    sim = Simulation(tiny_cfg)
    sim.profile()
    for strategy in ("ptq", "qat"):
        r = train_here(sim, 0, 1, strategy)
        assert r.work == sim.pricing.expected_work(1, strategy)
        dev = sim.fleet.devices[1]
        assert predict_compute(sim.pricing.speed, dev, r.work) == pytest.approx(
            predict_compute(sim.pricing.speed, dev, sim.pricing.expected_work(1, strategy)))
    # a baseline never pays for FedHQ's feature: by default no PTQ client measures its sensitivity on
    # the device; the server measures it from fedhq's uploads (priced as server work) once fedhq
    # has a family model to read it with, and for no baseline
    import numpy as np

    from fedhq_core.allocation import SignificanceModel
    from fedhq_core.allocation.significance import FEATURES

    rng = np.random.default_rng(0)
    family = SignificanceModel.fit(rng.random((20, len(FEATURES))), rng.random(20), seed=0, cv=False)
    for strategy, on_server in (("all-ptq", False), ("random-hybrid", False), ("fedhq", False), ("fedhq", True),
                                ("fedhq-coarse", False)):
        s = Simulation(tiny_cfg.replace(strategy=strategy))
        if on_server:
            s.set_significance(family)
        s.profile()
        r = train_here(s, 0, 1, "ptq")
        assert r.work == s.pricing.expected_work(1, "ptq") and set(r.work) == {"fp32", "calib", "pack"} and r.quant_loss is None
        assert s.server_measures_sensitivity == on_server, strategy
        assert s.server.measure("sensitivity", [r]) == pytest.approx(s.pricing.server.sens_s()) and 0 <= r.quant_loss <= 1
    # opt-in: on the device (billed to the client), one calibration forward pass, never beyond the shard
    loud = Simulation(tiny_cfg.replace(strategy="fedhq", report_sensitivity=True))
    r = train_here(loud, 0, 1, "ptq")
    assert not loud.server_measures_sensitivity and r.quant_loss is not None and r.work == loud.pricing.expected_work(1, "ptq")
    assert r.work["calib"] == r.work["fwd"] and len(r.work["calib"]) == 1 and r.work["calib"][0] <= len(sim.shards[1])


@pytest.mark.parametrize("strategy, bits", [("fp32", 32), ("all-ptq", 8), ("fedfq", 4)])
def test_aggregation_is_priced_at_the_bits_the_strategy_uploads(tiny_cfg, strategy, bits):
    """fp32 clients upload 32-bit updates (client.py), fedfq its average bits, the others
    ``upload_bits``: the server's decoding is priced at those. (A review read the nested
    conditional as ``(32 if fp32 else f) if fedfq else u``; Python reads it as ``32 if fp32 else
    (f if fedfq else u)``, which this pins; it is now an if/elif.)"""
    from types import SimpleNamespace

    sim = Simulation(tiny_cfg.replace(strategy=strategy, fedfq_avg_bits=4.0))
    sim.profile()
    seen: list[int] = []
    real = sim.pricing.server.aggregate_s
    sim.pricing.server.aggregate_s = lambda n_plain, n_qat, b, *a: seen.append(b) or real(n_plain, n_qat, b, *a)
    results = [SimpleNamespace(payload=SimpleNamespace(weight_steps={}), upload_bytes=100)] * 2
    priced = sim.pricing.aggregation_s(results)
    assert seen == [bits] and priced == pytest.approx(real(2, 0, bits, tiny_cfg.aggregation, 0))
