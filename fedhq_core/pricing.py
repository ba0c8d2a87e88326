"""The fleet's prices: what each client will run under each strategy, what that costs on its
device, and what the server's work costs on its own. This is the allocator's view of the fleet
(spec-sheet predictions only) and the clock's price list (what clients really did, priced the
same way, plus the hidden jitter and slowdowns: ``hardware.clock``).

Everything is priced from op traces of the steps clients and the server run and the catalog's
constants, never from this host's timings (``hardware``).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .client import ClientResult, Mode, calib_size
from .config import ExperimentConfig
from .hardware import DEVICES, Fleet, RooflineModel, SimulatedClock, TraceBook, predict_compute
from .hardware.clock import ClientTime
from .server import momentum_on
from .hardware.server_work import ServerPricing
from .hardware.speed_model import load_profile
from .quant.payload import packed_layout, tensor_bits
from .plugins import source_digest
from .models.spec import ModelSpec

_BOOKS: dict[ModelSpec, TraceBook] = {}
_BOOKS_LOCK = threading.Lock()


def _batches(n: int, b: int) -> list[int]:
    """Sizes of the batches that split ``n`` samples into batches of ``b`` (last one partial)."""
    return [b] * (n // b) + ([n % b] if n % b else [])


HISTOGRAM_HEADER_BYTES = 64   # a label histogram's wire header (magic, client id, class count)


def upload_size(state: dict[str, torch.Tensor], bits: int) -> int:
    """Exact byte size of a payload of ``state``'s shape at ``bits`` (see quant.payload)."""
    total = 0
    for k, v in state.items():
        if v.is_floating_point():
            data, scales = packed_layout(tuple(v.shape), tensor_bits(k, bits))
            total += data + 4 * scales
    return total


def trace_book(spec: ModelSpec, state_dir: str) -> TraceBook:
    """Op traces of a model shape (shared within the process, cached on disk under ``state_dir``)."""
    with _BOOKS_LOCK:
        if spec not in _BOOKS:
            _BOOKS[spec] = TraceBook(lambda: spec.build(torch.device("cpu")), tuple(spec.in_shape), spec.num_classes,
                                     Path(state_dir) / "cache", repr(spec) + source_digest(spec.model))
        return _BOOKS[spec]


class FleetPricing:
    """Prices of one run's fleet. ``has_steps()`` tells whether the master has learned QAT steps
    (else a QAT client searches them first); ``on_device_sensitivity`` whether PTQ clients
    measure their quantization loss on the device."""

    def __init__(self, cfg: ExperimentConfig, fleet: Fleet, shard_sizes: list[int], spec: ModelSpec,
                 has_steps: Callable[[], bool], on_device_sensitivity: bool, aggregate_bits: int | None = None):
        self.cfg, self.fleet, self.sizes, self.spec = cfg, fleet, shard_sizes, spec
        # the uplink width the aggregation's decode is priced at: the allocator's declaration
        # (Capabilities.aggregate_bits: fp32's float32 updates, fedfq's average), else upload_bits
        self.aggregate_bits = aggregate_bits or cfg.upload_bits
        self.has_steps = has_steps
        self.on_device_sensitivity = on_device_sensitivity
        self.speed: RooflineModel | None = None
        self.clock: SimulatedClock | None = None
        self.server: ServerPricing | None = None
        self.upload_bytes = 0           # one update's payload at upload_bits (shapes never change)

    def trace_book(self) -> TraceBook:
        return trace_book(self.spec, self.cfg.state_dir)

    def start(self, speed: RooflineModel | None, state: dict[str, torch.Tensor], n_proxy: int) -> RooflineModel:
        """Start the simulated clock (see ``Simulation.profile``)."""
        if speed is None:
            overrides = load_profile(self.cfg.profile_file) if self.cfg.profile_file else {}
            speed = RooflineModel(self.trace_book(), overrides)
        self.speed = speed
        self.clock = SimulatedClock(self.fleet, speed)
        self.server = ServerPricing(speed, DEVICES[self.cfg.server_device], n_proxy)
        self.upload_bytes = upload_size(state, self.cfg.upload_bits)
        return speed

    def steps_of(self, cid: int) -> list[int]:
        """Batch sizes of a client's local optimizer steps."""
        return _batches(self.sizes[cid], self.cfg.batch_size) * self.cfg.local_epochs

    def expected_work(self, cid: int, strategy: str) -> dict[str, list[int]]:
        """What a client will run under ``strategy`` this round (the same kinds and batch sizes
        that ``client.train_client`` reports back)."""
        cfg = self.cfg
        bits = 32 if strategy == Mode.FP32 else cfg.upload_bits
        work: dict[str, list[int]] = {"pack": [bits]}
        if strategy == Mode.QAT:
            work["qat"] = self.steps_of(cid)
            if not self.has_steps():
                work["wsearch"] = [0]
            return work
        work["fp32"] = self.steps_of(cid)
        if strategy == Mode.PTQ:
            calib = [calib_size(self.sizes[cid], cfg.calib_batches, cfg.batch_size)]
            work["calib"] = calib
            if self.on_device_sensitivity:
                work["wsearch"], work["fwd"] = [0], list(calib)
        return work

    def predicted_times(self, cids: list[int]) -> dict[str, np.ndarray]:
        """Spec-sheet predicted local round time per client under PTQ and QAT (compute + upload)."""
        assert self.speed is not None, "profile() first"
        out: dict[str, list[float]] = {"ptq": [], "qat": []}
        for c in cids:
            dev = self.fleet.devices[c]
            upload = self.upload_bytes * 8.0 / dev.uplink_bps
            # the same pricing the clock applies to what clients really did (hardware.clock)
            for s in out:
                out[s].append(predict_compute(self.speed, dev, self.expected_work(c, s)) + upload)
        return {k: np.asarray(v) for k, v in out.items()}

    def qat_samples_within(self, cids: list[int], budgets: np.ndarray) -> np.ndarray:
        """Partial work: per client, the most samples of its shard, in whole batches, whose QAT
        round (every epoch over them, the fixed work and the upload) fits ``budgets`` spec-sheet
        seconds; 0 where not one batch does. Priced as ``predicted_times`` prices."""
        assert self.speed is not None, "profile() first"
        cfg, out = self.cfg, []
        for c, budget in zip(cids, budgets):
            dev = self.fleet.devices[c]
            fixed = {k: v for k, v in self.expected_work(c, Mode.QAT).items() if k != "qat"}
            left = float(budget) - self.upload_bytes * 8.0 / dev.uplink_bps - predict_compute(self.speed, dev, fixed)
            step = predict_compute(self.speed, dev, {"qat": [cfg.batch_size]}) * cfg.local_epochs
            out.append(min(self.sizes[c], max(0, int(left // step)) * cfg.batch_size) if step > 0 else 0)
        return np.asarray(out, dtype=int)

    def label_histograms_s(self, num_classes: int) -> tuple[float, int]:
        """Every client sends its label histogram once (``num_classes`` int32 counts and a wire
        header), all at once: the slowest uplink's time (the server's host work turning them into
        shard features is charged with the round that reads them). Returns (simulated seconds,
        bytes sent in all)."""
        assert self.server is not None, "profile() first"
        nbytes = 4 * num_classes + HISTOGRAM_HEADER_BYTES
        send = max(nbytes * 8.0 / d.uplink_bps for d in self.fleet.devices)
        return send, nbytes * len(self.fleet.devices)

    def client_times(self, rnd: int, results: list[ClientResult]) -> dict[int, ClientTime]:
        """What each client's reported work took on its simulated device this round."""
        assert self.clock is not None, "profile() first"
        return {r.cid: self.clock.client_time(rnd, r.cid, r.device_work, r.upload_bytes) for r in results}

    def aggregation_s(self, results: list[ClientResult], norm_checks: int = 0, step_search: bool = False,
                      averaged: bool = False) -> float:
        """Priced seconds of aggregating ``results`` on the server's device, after
        ``norm_checks`` update norms; ``step_search``: QAT steps were bounded against the new
        master's MSE steps (no steps deployed yet), searched for it: the blend's own search in a
        hybrid round, one more in an all-QAT round (``ServerState.aggregate_results``); ``averaged``:
        the master joined the deployed running average (``server_average``)."""
        assert self.server is not None, "profile() first"
        cfg = self.cfg
        n_qat = sum(bool(r.payload.weight_steps) for r in results)
        bits = self.aggregate_bits
        blend = self.server.mse_s() if 0 < n_qat < len(results) else 0.0   # server.blend_steps
        if step_search and n_qat == len(results) > 0:
            blend += self.server.mse_s()
        extra = self.server.momentum_s() if results and momentum_on(cfg.server_momentum, cfg.server_lr) else 0.0
        extra += self.server.average_s() if averaged else 0.0
        return blend + extra + self.server.aggregate_s(len(results) - n_qat, n_qat, bits, cfg.aggregation, norm_checks)
