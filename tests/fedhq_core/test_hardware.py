"""Device catalog, op traces, the per-op roofline, the host fit and the simulated clock."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedhq_core.hardware import DEVICES, ClientTime, Fleet, RooflineModel, SimulatedClock, TraceBook
from fedhq_core.hardware.catalog import DeviceClass
from fedhq_core.hardware.profile import step_runner
from fedhq_core.hardware.speed_model import fit_host, host_device, price_terms, price_trace
from fedhq_core.hardware.trace import StepTrace, trace
from fedhq_core.models import SmallCNN
from fedhq_core.quant import prepare_model, quant_layers

SHAPE = (1, 8, 8)


def _cnn(extra_op: bool = False) -> nn.Module:
    m = SmallCNN(1, 10, 8)
    if extra_op:  # one more pointwise op inside a layer's forward
        conv2 = m.conv2
        inner = conv2.forward
        conv2.forward = lambda x: inner(x) * 1.0  # type: ignore[method-assign]
    return prepare_model(m, 4, 8)


def _trace(kind: str, batch: int, extra_op: bool = False) -> StepTrace:
    return trace(kind, batch, step_runner(_cnn(extra_op), kind, batch, SHAPE, 10))


def test_catalog_has_real_devices_with_sources_and_coefficients():
    assert {"nvidia-h100", "nvidia-h200"} <= set(DEVICES)
    kinds = {d.kind for d in DEVICES.values()}
    assert {"edge-board", "phone", "laptop", "datacenter-gpu"} <= kinds
    for d in DEVICES.values():
        assert d.peak_flops > 1e9 and d.mem_bw > 1e9 and d.uplink_bps > 1e6
        assert any(w in d.source for w in ("datasheet", "brief", "release", "benchmarks")), d.name
        assert d.executor in ("cpu", "gpu") and 0 < d.eta_c <= 1 and 0 < d.eta_m <= 1
        assert 1e-6 < d.lam_eng < d.lam_py < 1e-4 and "single-thread" in d.coef_source


def test_trace_counts_match_independent_formulas():
    """A one-layer linear model: conv/matmul FLOPs are 2*B*in*out forward and the same again for
    the weight gradient (the input needs none), counted by hand here."""
    torch.manual_seed(0)
    model = prepare_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 8, 8)
    t = trace("fp32", 16, step_runner(model, "fp32", 16, SHAPE, 10))
    assert t.flops[t.mm].sum() == pytest.approx(2 * (2 * 16 * 64 * 10))
    assert t.sync.sum() == 0
    assert set(t.phase) == {"forward", "backward", "optimizer"}
    # momentum and weight update survive as in-place (foreach) ops in the optimizer phase
    opt = [n for n, p in zip(t.names, t.phase) if p == "optimizer"]
    assert any(n.startswith("_foreach_") and n.endswith("_") for n in opt)
    # bytes of the forward addmm: bias + input + weight + output, float32
    i = t.names.index("addmm")
    assert t.bytes[i] == 4 * (10 + 16 * 64 + 64 * 10 + 16 * 10)


def test_qat_trace_sees_activation_fake_quant_of_every_layer():
    """Quantized layers have child quantizers; the activation fake-quant on each layer's input
    must be in the trace: one `round` over exactly that input's elements per layer."""
    batch = 4
    t = _trace("qat", batch)
    rounds = {int(f) for f, n, p in zip(t.flops, t.names, t.phase) if n == "round" and p == "forward"}
    x = torch.randn(batch, *SHAPE)
    m = _cnn()
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda mod, inp: inputs.append(inp[0].numel()))
             for _, layer in quant_layers(m)]
    m(x)
    for h in hooks:
        h.remove()
    assert len(inputs) == 4 and set(inputs) <= rounds
    # the EMA observer's in-place updates are traced too
    assert {"mul_", "add_"} <= {n for n, p in zip(t.names, t.phase) if p == "forward"}
    # custom autograd Functions' backward is issued from Python, the rest by the engine
    bwd = [(n, e) for n, e, p in zip(t.names, t.engine, t.phase) if p == "backward"]
    assert any(e for _, e in bwd) and any(not e for _, e in bwd)


def test_one_extra_pointwise_op_changes_the_counts():
    base, more = _trace("fp32", 4), _trace("fp32", 4, extra_op=True)
    fwd = lambda t: [n for n, p in zip(t.names, t.phase) if p == "forward"]  # noqa: E731
    assert fwd(more).count("mul") == fwd(base).count("mul") + 1
    assert more.n_ops > base.n_ops and more.bytes.sum() > base.bytes.sum()


def test_no_device_sync_in_training_steps_and_syncs_are_seen():
    for kind in ("fp32", "qat", "calib", "fwd"):
        assert _trace(kind, 4).sync.sum() == 0, kind
    x = torch.ones(3)
    assert trace("probe", 0, lambda: float(x.sum())).sync.sum() == 1   # the tracer does see a sync


def test_linear_extrapolation_equals_a_direct_trace():
    book = TraceBook(_cnn, SHAPE, 10)
    for kind in ("fp32", "qat", "fwd"):
        direct, fitted = _trace(kind, 7), book.get(kind, 7)
        assert fitted.names == direct.names
        np.testing.assert_allclose(fitted.flops, direct.flops)
        np.testing.assert_allclose(fitted.bytes, direct.bytes)


def test_disk_cached_traces_equal_fresh_ones_and_are_reused(tmp_path, monkeypatch):
    import fedhq_core.hardware.profile as prof

    fresh = TraceBook(_cnn, SHAPE, 10, tmp_path, "cnn-test").get("qat", 5)
    assert len(list(tmp_path.glob("trace-qat-*.npz"))) == 2          # traced at both linear points
    monkeypatch.setattr(prof, "trace", lambda *a, **k: pytest.fail("traced again despite the cache"))
    cached = TraceBook(_cnn, SHAPE, 10, tmp_path, "cnn-test").get("qat", 5)
    assert cached.names == fresh.names and cached.phase == fresh.phase
    for field in ("flops", "bytes", "mm", "engine", "sync"):
        np.testing.assert_array_equal(getattr(cached, field), getattr(fresh, field))
    with pytest.raises(BaseException, match="traced again"):           # another model key is not served
        TraceBook(_cnn, SHAPE, 10, tmp_path, "other-model").get("qat", 5)


def _synthetic(sync_at: int | None = None) -> StepTrace:
    n = 4
    sync = np.zeros(n, bool)
    if sync_at is not None:
        sync[sync_at] = True
    return StepTrace("x", 1, ["a"] * n, np.array([4e9, 0.0, 1e6, 0.0]), np.array([1e6, 8e9, 1e6, 0.0]),
                     np.array([True, False, False, False]), np.array([False, True, False, False]), sync,
                     ["forward"] * n)


def test_per_op_roofline_by_hand():
    cpu = DeviceClass("c", "host", 1e12, 1e10, 1e9, "test", "cpu", 0.5, 0.8, 1e-3, 2e-4)
    t = _synthetic()
    op = [4e9 / 5e11, 8e9 / 8e9, max(1e6 / 5e11, 1e6 / 8e9), 0.0]
    assert price_trace(t, cpu) == pytest.approx(sum(op) + 3 * 1e-3 + 2e-4)
    # a GPU overlaps issue with execution between syncs: max(issue, execution) per stretch
    gpu = DeviceClass("g", "host", 1e12, 1e10, 1e9, "test", "gpu", 0.5, 0.8, 1e-3, 2e-4)
    assert price_trace(t, gpu) == pytest.approx(max(sum(op), 3e-3 + 2e-4))
    ts = _synthetic(sync_at=0)  # stretch 1: op 0 alone; stretch 2: ops 1-3
    assert price_trace(ts, gpu) == pytest.approx(max(op[0], 1e-3) + max(sum(op[1:]), 2e-3 + 2e-4))
    terms = price_terms(t, cpu)
    assert terms["compute"] == pytest.approx(op[0]) and terms["memory"] == pytest.approx(op[1] + op[2])


def test_host_fit_recovers_known_coefficients():
    book = TraceBook(_cnn, SHAPE, 10)
    truth = np.array([0.3, 0.6, 4e-6, 9e-6])
    host = host_device(5e10, 2e10, truth)
    points = [(book.get(k, b), price_trace(book.get(k, b), host)) for k in ("fp32", "qat", "fwd") for b in (8, 32)]
    points += [(book.get("wsearch", 0), price_trace(book.get("wsearch", 0), host))]
    fit = fit_host(points, 5e10, 2e10)
    np.testing.assert_allclose(fit, truth, rtol=1e-3)


def test_work_is_priced_kind_by_kind():
    speed = RooflineModel(TraceBook(_cnn, SHAPE, 10))
    d = DEVICES["raspberry-pi-4"]
    work = {"qat": [16, 16, 5], "wsearch": [0], "pack": [8]}
    parts = speed.work_breakdown(work, d)
    assert parts["qat"] == pytest.approx(2 * speed.step_time("qat", 16, d) + speed.step_time("qat", 5, d))
    assert speed.work_time(work, d) == pytest.approx(sum(parts.values()))
    # a slower device takes longer for the same work; QAT costs more than FP32 everywhere
    assert speed.work_time(work, d) > speed.work_time(work, DEVICES["nvidia-a100"])
    for dev in DEVICES.values():
        assert speed.step_time("qat", 16, dev) > speed.step_time("fp32", 16, dev)


def test_fleet_mix_and_hidden_slowdown_are_seeded():
    a = Fleet.build(20, {"raspberry-pi-4": 0.5, "nvidia-t4": 0.5}, 0.25, 3.0, 0.1, seed=1)
    b = Fleet.build(20, {"raspberry-pi-4": 0.5, "nvidia-t4": 0.5}, 0.25, 3.0, 0.1, seed=1)
    assert [d.name for d in a.devices] == [d.name for d in b.devices]
    assert sum(d.name == "nvidia-t4" for d in a.devices) == 10
    assert set(np.unique(a.slowdown)) <= {1.0, 3.0}
    assert a.jitter(2, 3) == b.jitter(2, 3) != a.jitter(3, 3)


def test_round_time_is_slowest_client_plus_server():
    speed = RooflineModel(TraceBook(_cnn, SHAPE, 10))
    fleet = Fleet.build(2, {"raspberry-pi-4": 1.0}, 0.0, 1.0, 0.0, seed=0)
    clock = SimulatedClock(fleet, speed)
    t1 = ClientTime(1.0, 1.0, 0.5, {"qat": 1.0})
    t2 = ClientTime(2.0, 2.0, 0.1, {"fp32": 1.5, "calib": 0.5})
    length, split = clock.advance([t1, t2], {"alloc": 0.05, "server": 0.25})
    assert length == pytest.approx(2.4) and clock.now_s == pytest.approx(2.4)
    assert split == pytest.approx({"fp32": 1.5, "calib": 0.5, "upload": 0.1, "alloc": 0.05, "server": 0.25})
    # server work done while the clients train costs the round only what outlasts the slowest client
    length, split = clock.advance([t1, t2], {"server": 0.25}, concurrent_s=3.0)
    assert length == pytest.approx(3.25) and split["server_wait"] == pytest.approx(0.9)
    assert clock.round_length([t1], {}, 0.0)[0] == pytest.approx(1.5) and clock.now_s == pytest.approx(5.65)
    ct = clock.client_time(0, 0, {"qat": [16] * 4}, 1000)
    assert ct.upload_s == pytest.approx(8000 / DEVICES["raspberry-pi-4"].uplink_bps)
    assert ct.compute_s == pytest.approx(4 * speed.step_time("qat", 16, DEVICES["raspberry-pi-4"]))
