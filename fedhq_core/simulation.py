"""One federated run, as plain Python: data, fleet, models, clock and the per-round verbs.

A round is ``sample -> allocate -> train (each sampled client) -> aggregate -> evaluate ->
close_round``. The Prefect flow (``flows/train.py``) calls these same verbs as tasks; :func:`run`
below calls them in a plain loop, so the library works from a notebook with no Prefect server
and no MLflow.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .allocation import Allocation, RoundFeedback, build_allocator
from .allocation.pilot import FitInfo
from .client import ClientResult, TrainSpec, train_client
from .config import ExperimentConfig
from .errors import ConfigError, TooFewClients
from .phases import span
from .data import Dataset, Split, partition
from .hardware import DEVICES, Fleet, RooflineModel, SimulatedClock, TraceBook, predict_compute
from .hardware.server_work import ServerPricing
from .hardware.speed_model import load_profile
from .quant import integer_weights, load_model_state, model_state, prepare_deploy, quant_layers, set_mode
from .quant.payload import packed_layout
from .server import aggregate, calibrate_on_server, evaluate_global, proxy_gap, upload_quant_loss
from .wire import RejectedUpdate, decode_upload
from .worker import (ClientJob, DataKey, ModelSpec, RoundInputs, ShardRef, Upload, borrow_model, draw_fault,
                     expected_upload_limit, run_jobs)


DASK_TASKS = 16
PTQ_EXTRAS = ("calib", "wsearch", "fwd")   # a PTQ client's on-device work beyond FP32 training
_BOOKS: dict[ModelSpec, TraceBook] = {}
_BOOKS_LOCK = threading.Lock()


def _batches(n: int, b: int) -> list[int]:
    """Sizes of the batches that split ``n`` samples into batches of ``b`` (last one partial)."""
    return [b] * (n // b) + ([n % b] if n % b else [])


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    """Temporarily use every core for intra-op parallelism (between rounds, when nothing else runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def data_key(cfg: ExperimentConfig) -> DataKey:
    return DataKey(cfg.dataset, cfg.data_dir, cfg.download, cfg.seed, cfg.test_fraction, cfg.max_train_samples,
                   cfg.max_test_samples, os.path.join(cfg.state_dir, "cache"))


def load_data(cfg: ExperimentConfig) -> Dataset:
    """The dataset a config names (cached decodes under ``<state_dir>/cache``)."""
    return data_key(cfg).load()


def split_clients(cfg: ExperimentConfig, ds: Dataset) -> tuple[Split, np.ndarray, list[ShardRef]]:
    """Seeded split of the train set: (server calibration split, labels of the client pool,
    client shards as indices into ``ds.train``)."""
    rng = np.random.default_rng([cfg.seed, 31])
    perm = rng.permutation(len(ds.train))
    n_cal = min(cfg.server_calib_size, max(1, len(ds.train) // 10))
    server_calib = ds.train.subset(np.sort(perm[:n_cal]))
    pool = np.sort(perm[n_cal:])
    labels = ds.train.y.numpy()[pool]
    try:
        idx = partition(labels, cfg.clients, cfg.partition, rng, alpha=cfg.alpha,
                        classes_per_client=cfg.classes_per_client, min_size=cfg.min_shard_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    key = data_key(cfg)
    return server_calib, labels, [ShardRef(key, pool[np.asarray(i, dtype=np.int64)], ds.train) for i in idx]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


def upload_size(state: dict[str, torch.Tensor], bits: int) -> int:
    """Exact byte size of a payload of ``state``'s shape at ``bits`` (see quant.payload)."""
    total = 0
    for v in state.values():
        if v.is_floating_point():
            data, scales = packed_layout(tuple(v.shape), bits)
            total += data + 4 * scales
    return total


@dataclass
class RoundRecord:
    round: int
    acc_q: float
    acc_fp32: float
    loss_q: float
    loss_fp32: float
    train_loss: float
    sim_round_s: float
    sim_time_s: float
    wall_s: float
    upload_bytes: int
    n_qat: int
    n_ptq: int
    n_fp32: int
    alloc_s: float
    strategies: dict[int, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)   # client -> "reason: detail", all attempts
    attempts: int = 1
    server_s: float = 0.0        # the server's priced share of sim_round_s (allocation, aggregation, refits)

    def metrics(self) -> dict[str, float]:
        keys = ("acc_q", "acc_fp32", "loss_q", "loss_fp32", "train_loss", "sim_round_s", "sim_time_s", "wall_s",
                "upload_bytes", "n_qat", "n_ptq", "n_fp32", "alloc_s", "attempts")
        out = {k: float(getattr(self, k)) for k in keys}
        out.update({k: float(v) for k, v in self.extra.items() if isinstance(v, (int, float))})
        out["n_rejected"] = float(len(self.rejected))
        for reason, n in reject_counts([self.rejected]).items():
            out[f"rejected_{reason}"] = float(n)
        return out


def sim_breakdown(records: Iterable[RoundRecord]) -> dict[str, float]:
    """The run's simulated time split by what the critical client of each round spent it on:
    step kinds (``client.STEP_KINDS``), upload, server and failed attempts."""
    out: dict[str, float] = {}
    for r in records:
        for k, v in r.extra.items():
            if k.startswith("sim_") and k.endswith("_s") and k not in ("sim_round_s", "sim_time_s"):
                name = k[4:-2]
                out[name] = out.get(name, 0.0) + float(v)
    return out


def _mean_of(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def reject_counts(rejected_maps: Iterable[dict[int, str]]) -> dict[str, int]:
    """How many client updates were rejected, by reason, over several client -> "reason: detail" maps."""
    out: dict[str, int] = {}
    for rejected in rejected_maps:
        for why in rejected.values():
            reason = why.split(":", 1)[0]
            out[reason] = out.get(reason, 0) + 1
    return dict(sorted(out.items()))


def record_dict(r: RoundRecord) -> dict[str, Any]:
    """A round record as JSON-ready data (client ids become string keys)."""
    return dict(r.__dict__, strategies={str(k): v for k, v in r.strategies.items()},
                rejected={str(k): v for k, v in r.rejected.items()},
                extra={k: v for k, v in r.extra.items() if isinstance(v, (int, float, str, bool))})


def record_from_dict(d: dict[str, Any]) -> RoundRecord:
    return RoundRecord(**{**d, "strategies": {int(k): v for k, v in d["strategies"].items()},
                          "rejected": {int(k): v for k, v in d.get("rejected", {}).items()}})


class Simulation:
    """State of one run. Construct, then :meth:`profile`, then rounds (see :func:`run`)."""

    def __init__(self, cfg: ExperimentConfig, dataset: Dataset | None = None, significance: Any = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        ds = dataset or load_data(cfg)
        self.dataset_name = ds.name
        self.num_classes = ds.num_classes
        self.in_shape = ds.in_shape
        self.server_calib, self.global_labels, self.shards = split_clients(cfg, ds)
        self.test: Split = ds.test
        self.n_clients = cfg.clients

        torch.manual_seed(cfg.seed)
        self.eval_model = self.new_model()
        self.global_state = {k: v.detach().clone() for k, v in model_state(self.eval_model).items()}
        self.global_ranges: dict[str, tuple[float, float]] | None = None
        self.global_steps: dict[str, torch.Tensor] | None = None
        self.gaps: list[float] = []  # the master's quantization gap on server_calib, per round (measure_gap)
        self.gap_s = 0.0             # the server's priced seconds for that measurement, this round
        self.server_host_s = 0.0     # this host's seconds for the server's work of the round (a metric only)
        self.server: ServerPricing | None = None
        self._carried_s = 0.0        # server work of this round done while the next one trains (priced)
        self.fit = FitInfo()         # what fitting SigAcc cost this run (see allocation.pilot)
        self._shard_features: dict[int, np.ndarray] | None = None
        self.fleet = Fleet.build(cfg.clients, cfg.fleet, cfg.throttle_prob, cfg.throttle_factor,
                                 cfg.jitter_sigma, cfg.seed)
        self.speed: RooflineModel | None = None
        self.clock: SimulatedClock | None = None
        self.allocator = build_allocator(cfg, significance)
        if self.server_sensitivity():
            self.allocator.sensitivity_lag = 1   # type: ignore[attr-defined]
        self.records: list[RoundRecord] = []
        self.last_allocation_info: dict[str, Any] = {}
        self.rnd = 0
        self.run_id: str | None = None
        self.wall_start = time.perf_counter()
        self.upload_bytes_total = 0

    @property
    def uses_gap(self) -> bool:
        """The allocator reads the master's quantization gap (only FedHQ's fine stage with a SigAcc
        model does; baselines, fedhq-coarse and ``significance: none`` skip the measurement)."""
        return bool(getattr(self.allocator, "reads_gap", False))

    def reports_sensitivity(self) -> bool:
        """PTQ clients measure their quantization loss on the device (and are billed for it) only
        when the config asks for it (``report_sensitivity: true``)."""
        return bool(self.cfg.report_sensitivity)

    def server_sensitivity(self) -> bool:
        """By default (``report_sensitivity`` unset) the server measures each PTQ upload's
        sensitivity on its proxy split, priced as its own work, and only when the allocator reads
        it: a baseline never pays for FedHQ's features."""
        return self.cfg.report_sensitivity is None and bool(getattr(self.allocator, "reads_sensitivity", False))

    def measure_sensitivities(self, results: list[ClientResult]) -> float:
        """The server's measurement of every PTQ upload's quantization sensitivity (sets its
        ``quant_loss``) from the master the clients started from; returns its priced seconds."""
        assert self.server is not None, "profile() first"
        ptq = [r for r in results if r.strategy == "ptq"]
        for r in ptq:
            r.quant_loss = upload_quant_loss(self.eval_model, self.global_state, r, self.server_calib.x,
                                             self.server_calib.y)
        return len(ptq) * self.server.sens_s()

    def needs_significance(self) -> bool:
        """The allocator uses SigAcc, has none yet, and the config does not opt out (significance: none)."""
        return (self.cfg.significance != "none" and hasattr(self.allocator, "significance_of")
                and getattr(self.allocator, "significance", 0) is None)

    def set_significance(self, model: Any) -> None:
        """Give the allocator its SigAcc model; what obtaining it cost (``model.fit_info``) goes on
        this run's bill (``fit_*`` in the summary)."""
        self.allocator.significance = model  # type: ignore[attr-defined]
        self.fit = getattr(model, "fit_info", None) or FitInfo()

    def shard_features(self) -> dict[int, np.ndarray]:
        """SigAcc's shard features of every client (computed once)."""
        from .allocation.significance import label_histogram, shard_features

        if self._shard_features is None:
            hist = label_histogram(self.global_labels, self.num_classes)
            self._shard_features = {c: shard_features(s.y.numpy(), hist) for c, s in enumerate(self.shards)}
        return self._shard_features

    def measure_gap(self) -> float:
        """The master's quantization gap under server-side PTQ (ranges calibrated on the proxy
        split, MSE weight scales): FP32 minus quantized accuracy on ``server_calib``, never the
        test split. In a run the server measures the master it has just sent out while the
        clients train (:meth:`aggregate`), so the next allocation sees the gap one round late and
        the clock charges it only when it outlasts the round's slowest client."""
        self.gaps.append(proxy_gap(self.eval_model, self.global_state, self.server_calib.x, self.server_calib.y))
        return self.gaps[-1]

    @property
    def quant_gap(self) -> float:
        """SigAcc's gap feature: the trend of the gaps measured so far (significance.gap_trend)."""
        from .allocation.significance import gap_trend

        return gap_trend(self.gaps)

    def fit_significance(self, submit_train: Callable | None = None) -> Any:
        """Offline SigAcc fitting by pilot rounds (see allocation.pilot); does not touch the run's
        state. ``submit_train`` as in :class:`RoundOps`: the pilot's clients train where the
        run's do (default: here, one after the other)."""
        from .allocation.pilot import fit_significance, pilot_length

        t0 = time.perf_counter()
        if self.speed is None:
            self.profile()
        train_fn = None
        if submit_train is not None:
            train_fn = lambda rnd, cids, strategy: self.train_clients(submit_train, rnd, cids, strategy)  # noqa: E731
        model = fit_significance(self, train_fn)
        model.fit_info = FitInfo("pilot", float(model.tags["fit_sim_s"]), time.perf_counter() - t0,
                                 f"pilot of this setting, {pilot_length(self.cfg)} rounds per branch (all-PTQ, all-QAT)")
        return model

    def train_clients(self, submit_train: Callable, rnd: int, cids: list[int], strategy: str) -> list[ClientResult]:
        """Train ``cids`` under ``strategy`` from the current master through ``submit_train``,
        decoded and checked like a round's uploads (pilot rounds)."""
        jobs = [ClientJob(rnd, c, self.shards[c], self.client_spec(rnd, c, strategy)) for c in cids]
        inputs = self.round_inputs()
        results, bad = self.accept(collect([(ch, submit_train(inputs, ch)) for ch in self.chunks(jobs)], 0.0))
        if bad:
            raise RuntimeError(f"pilot round {rnd}: client {next(iter(bad))} failed: {next(iter(bad.values()))}")
        return results

    # --- models -------------------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec:
        c = self.cfg
        return ModelSpec(c.model, tuple(self.in_shape), self.num_classes, c.w_bits, c.a_bits, c.first_last_bits,
                         c.ema_momentum, c.ptq_act_percentile)

    def new_model(self) -> nn.Module:
        return self.model_spec.build(self.device)

    # --- hardware -----------------------------------------------------------------------
    def trace_book(self) -> TraceBook:
        """Op traces of this run's model (shared per model shape within the process)."""
        spec = self.model_spec
        with _BOOKS_LOCK:
            if spec not in _BOOKS:
                _BOOKS[spec] = TraceBook(lambda: spec.build(torch.device("cpu")), tuple(self.in_shape), self.num_classes,
                                         Path(self.cfg.state_dir) / "cache", repr(spec))
            return _BOOKS[spec]

    def profile(self, speed: RooflineModel | None = None) -> RooflineModel:
        """Start the simulated clock: every client's work is priced from op traces of the steps
        it runs and the catalog's constants (never from this host's timings), so the same config
        and seed give the same simulated times on any machine. A profile file (opt-in) replaces
        catalog coefficients with host-calibrated ones; they are stored with the run."""
        if speed is None:
            overrides = {}
            if self.cfg.profile_file:
                overrides = load_profile(self.cfg.profile_file)
            speed = RooflineModel(self.trace_book(), overrides)
        self.speed = speed
        self.clock = SimulatedClock(self.fleet, speed)
        floats = [v for v in self.global_state.values() if v.is_floating_point()]
        self.server = ServerPricing(speed, DEVICES[self.cfg.server_device], len(self.server_calib), len(floats),
                                    len(quant_layers(self.eval_model)))
        return speed

    def steps_of(self, cid: int) -> list[int]:
        """Batch sizes of a client's local optimizer steps."""
        return _batches(len(self.shards[cid]), self.cfg.batch_size) * self.cfg.local_epochs

    def expected_work(self, cid: int, strategy: str) -> dict[str, list[int]]:
        """What a client will run under ``strategy`` this round (the same kinds and batch sizes
        that ``client.train_client`` reports back)."""
        cfg = self.cfg
        n, b = len(self.shards[cid]), cfg.batch_size
        bits = 32 if strategy == "fp32" else cfg.upload_bits
        work: dict[str, list[int]] = {"pack": [bits]}
        if strategy == "qat":
            work["qat"] = self.steps_of(cid)
            if not self.global_steps:
                work["wsearch"] = [0]
            return work
        work["fp32"] = self.steps_of(cid)
        if strategy == "ptq":
            calib = [min(n, cfg.calib_batches * b)]   # one forward pass, never beyond the shard
            work["calib"] = calib
            if self.reports_sensitivity():
                work["wsearch"], work["fwd"] = [0], list(calib)
        return work

    def predicted_times(self, cids: list[int]) -> dict[str, np.ndarray]:
        """Spec-sheet predicted local round time per client under PTQ and QAT (compute + upload)."""
        assert self.speed is not None, "profile() first"
        up = upload_size(self.global_state, self.cfg.upload_bits)
        out = {"ptq": [], "qat": []}
        for c in cids:
            dev = self.fleet.devices[c]
            upload = up * 8.0 / dev.uplink_bps
            # the same pricing the clock applies to what clients really did (hardware.clock)
            for s in out:
                out[s].append(predict_compute(self.speed, dev, self.expected_work(c, s)) + upload)
        return {k: np.asarray(v) for k, v in out.items()}

    # --- round verbs --------------------------------------------------------------------
    def sample(self, rnd: int, attempt: int = 0) -> list[int]:
        """Seeded client sample of a round; a retried round (``attempt`` > 0) draws afresh."""
        rng = np.random.default_rng([self.cfg.seed, 17, rnd] + ([attempt] if attempt else []))
        k = max(1, int(round(self.cfg.fraction * self.n_clients)))
        return sorted(rng.choice(self.n_clients, size=k, replace=False).tolist())

    def allocate(self, rnd: int, sampled: list[int]) -> tuple[Allocation, float]:
        t0 = time.perf_counter()
        with span("allocate", rnd):
            alloc = self.allocator.allocate(rnd, sampled, self)
        self.last_allocation_info = alloc.info
        return alloc, time.perf_counter() - t0

    def allocator_refit_before(self, rnd: int) -> bool:
        """True when the cost model was refitted right before round ``rnd`` (an adjustment round)."""
        return any(r["round"] == rnd - 1 for r in getattr(self.allocator, "refits", []))

    def client_spec(self, rnd: int, cid: int, strategy: str, upload_bits: Any = None) -> TrainSpec:
        cfg = self.cfg
        fedfq = (cfg.fedfq_avg_bits, cfg.fedfq_iters) if upload_bits == "fedfq" else None
        if upload_bits is None or fedfq:
            upload_bits = 32 if strategy == "fp32" and not fedfq else cfg.upload_bits
        return TrainSpec(strategy, cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay,
                         upload_bits, cfg.calib_batches, self.reports_sensitivity(),
                         seed=int(np.random.default_rng([cfg.seed, 53, rnd, cid]).integers(2**62)), fedfq=fedfq)

    def train(self, rnd: int, cid: int, strategy: str, upload_bits: Any = None) -> ClientResult:
        """Train one client here and now (pilot rounds; round training goes through :meth:`jobs`)."""
        shard = self.shards[cid]
        with borrow_model(self.model_spec, self.device) as model:
            return train_client(model, cid, shard.x, shard.y, self.global_state, self.global_ranges,
                                self.client_spec(rnd, cid, strategy, upload_bits), self.global_steps)

    def round_inputs(self) -> RoundInputs:
        return RoundInputs(self.model_spec, self.cfg.device, self.global_state, self.global_ranges, self.global_steps)

    def jobs(self, rnd: int, alloc: Allocation, sampled: list[int], attempt: int = 0) -> list[ClientJob]:
        """One job per sampled client: its shard, its spec and (if configured) its injected fault."""
        cfg = self.cfg
        return [ClientJob(rnd, c, self.shards[c],
                          self.client_spec(rnd, c, alloc.strategies[c], alloc.upload_bits.get(c)),
                          draw_fault(cfg.seed, rnd, c, attempt, cfg.fault_rate, cfg.fault_kinds), cfg.client_timeout_s)
                for c in sampled]

    def chunks(self, jobs: list[Any]) -> list[list[Any]]:
        """Split a round's client jobs into tasks: ``clients_per_task`` each, or one task per worker."""
        cfg = self.cfg
        # on Dask, two tasks per worker (DASK_TASKS for a remote cluster): the scheduler balances them
        # (and moves a dead worker's to the others) while a round of 500 clients is not 500 task runs
        slots = 2 * cfg.dask_local if cfg.dask_local else DASK_TASKS if cfg.dask_address else default_concurrency(cfg)
        auto = math.ceil(len(jobs) / slots)
        size = cfg.clients_per_task or auto
        return [jobs[i:i + size] for i in range(0, len(jobs), max(1, size))]

    def accept(self, uploads: list[Upload]) -> tuple[list[ClientResult], dict[int, str]]:
        """Decode and check every upload; returns the accepted results (by client id) and, for
        each rejected client, ``reason: detail`` (see ``fedhq_core.wire``)."""
        expected = {k: tuple(v.shape) for k, v in self.global_state.items() if v.is_floating_point()}
        limit = expected_upload_limit(self.global_state, self.cfg.max_upload_factor)
        timeout = self.cfg.client_timeout_s
        results, rejected = [], {}
        for up in uploads:
            try:
                if up.data is None:
                    reason = next((r for r in ("timeout", "worker-lost") if (up.error or "").startswith(r)), "raised")
                    raise RejectedUpdate(reason, up.error or "no upload")
                if timeout and up.wall_s > timeout:
                    raise RejectedUpdate("timeout", f"{up.wall_s:.2f} s > client_timeout_s {timeout:g}")
                blob, up.data = up.data, None   # decoded once; the upload's bytes go as soon as they are read
                r = decode_upload(blob, expected, max_bytes=limit, max_samples=len(self.shards[up.cid]))
                if r.cid != up.cid:
                    raise RejectedUpdate("keys", f"claims to be client {r.cid}")
                results.append(r)
            except RejectedUpdate as err:
                rejected[up.cid] = str(err)
        return sorted(results, key=lambda r: r.cid), rejected

    def aggregate(self, results: list[ClientResult]) -> float:
        """FedAvg into the master; returns the server's priced seconds after the uploads. The gap
        of the master the clients started from is measured first (``gap_s``, priced, concurrent
        with their training on the clock). This host's time for both is kept in ``server_host_s``
        (a metric, never on the clock)."""
        assert self.server is not None, "profile() first"
        t0 = time.perf_counter()
        self.gap_s, self._carried_s = self._carried_s, 0.0
        if self.uses_gap:
            self.measure_gap()
            self.gap_s += self.server.gap_s()
        if self.server_sensitivity() and self.rnd + 1 < self.cfg.rounds:
            # measured while the next round trains (so on the clock only where it outlasts that
            # round's slowest client); the allocator sees the reports one round late
            self._carried_s = self.measure_sensitivities(results)
        with span("aggregate"):
            self.aggregate_results(results)
        self.server_host_s = time.perf_counter() - t0
        return self.aggregation_s(results)

    def aggregation_s(self, results: list[ClientResult]) -> float:
        """Priced seconds of decoding and aggregating ``results`` on the server's device."""
        assert self.server is not None, "profile() first"
        n_qat = sum(bool(r.payload.weight_steps) for r in results)
        cfg = self.cfg
        bits = (32 if cfg.strategy == "fp32" else int(min(8, max(2, round(cfg.fedfq_avg_bits))))
                if cfg.strategy == "fedfq" else cfg.upload_bits)
        return self.server.aggregate_s(len(results) - n_qat, n_qat, bits, sum(r.upload_bytes for r in results))

    def aggregate_results(self, results: list[ClientResult]) -> None:
        """FedAvg of the master, the clients' averaged ranges and QAT steps (pilot and rounds)."""
        # QAT clients' learned weight steps (None in a round without QAT: MSE scales then)
        self.global_state, self.global_ranges, self.global_steps = aggregate(self.global_state, self.global_ranges,
                                                                             results)

    def evaluate(self) -> dict[str, float]:
        # deploy_ranges: clients' averaged ranges; only when no client sent any (fp32, fedfq)
        # is the server's own small split used to calibrate.
        with all_cores():  # no client trains during evaluation: give it every core
            return evaluate_global(self.eval_model, self.global_state, self.deploy_ranges(), self.test.x,
                                   self.test.y, self.global_steps)

    def client_times(self, rnd: int, results: list[ClientResult]) -> dict[int, Any]:
        assert self.clock is not None
        return {r.cid: self.clock.client_time(rnd, r.cid, r.work, r.upload_bytes) for r in results}

    def fail_attempt(self, rnd: int, results: list[ClientResult]) -> float:
        """A round attempt with too few accepted updates: the global model stays as it is, but the
        clock still pays for the wait on the clients that did report."""
        assert self.clock is not None
        return self.clock.advance(list(self.client_times(rnd, results).values()), {})[0]

    def close_round(self, rnd: int, alloc: Allocation, alloc_s: float, results: list[ClientResult],
                    server_s: float, metrics: dict[str, float] | None, rejected: dict[int, str] | None = None,
                    attempts: int = 1, failed_s: float = 0.0) -> RoundRecord:
        assert self.clock is not None and self.server is not None
        times = self.client_times(rnd, results)
        metrics = metrics if metrics is not None else (
            {k: self.records[-1].__dict__[k] for k in ("acc_q", "acc_fp32", "loss_q", "loss_fp32")}
            if self.records else {"acc_q": 0.0, "acc_fp32": 0.0, "loss_q": float("nan"), "loss_fp32": float("nan")})
        t0 = time.perf_counter()
        observed = self.allocator.observe(RoundFeedback(rnd, results, times, metrics), self) or {}
        alloc_s += time.perf_counter() - t0
        # the server's priced work: allocation before the round, aggregation after the uploads,
        # the allocator's bookkeeping and refits after that, and the deployment's calibration
        # (clients that send no ranges) once the last round is in
        server = {"alloc": self.server.host_s(self.allocator.take_host_ops()), "server": server_s}
        if rnd + 1 == self.cfg.rounds and self.cfg.strategy in ("fp32", "fedfq"):
            server["deploy"] = self.server.calib_s()
        round_s, split = self.clock.advance(list(times.values()), server, self.gap_s)
        round_s += failed_s
        up = sum(r.upload_bytes for r in results)
        self.upload_bytes_total += up
        strategies = {r.cid: r.strategy for r in results}
        extra = {k: v for k, v in alloc.info.items() if isinstance(v, (int, float))}
        extra.update({f"sim_{k}_s": v for k, v in split.items()})
        extra["server_host_s"] = self.server_host_s
        ptq = [times[r.cid] for r in results if r.strategy == "ptq"]
        if ptq:   # what PTQ runs on the device beyond FP32 training, as a share of its client's time
            extra["ptq_extras_share"] = float(np.mean([sum(t.by_kind.get(k, 0.0) for k in PTQ_EXTRAS) / t.total_s
                                                       for t in ptq]))
        if self.uses_gap:
            extra["quant_gap_measured"] = self.gaps[-1]
        if failed_s:
            extra["sim_failed_s"] = failed_s
        rec = RoundRecord(rnd, metrics["acc_q"], metrics["acc_fp32"], metrics["loss_q"], metrics["loss_fp32"],
                          float(np.mean([r.train_loss for r in results])) if results else float("nan"),
                          round_s, self.clock.now_s, time.perf_counter() - self.wall_start, up,
                          sum(s == "qat" for s in strategies.values()), sum(s == "ptq" for s in strategies.values()),
                          sum(s == "fp32" for s in strategies.values()), alloc_s, strategies, extra,
                          dict(rejected or {}), attempts, float(sum(server.values())))
        rec.extra.update(observed)
        self.records.append(rec)
        self.rnd = rnd + 1
        return rec

    def deploy_ranges(self) -> dict[str, tuple[float, float]]:
        if self.cfg.strategy in ("fp32", "fedfq") or self.global_ranges is None:
            with span("calibrate (server)"):
                return calibrate_on_server(self.eval_model, self.global_state, self.server_calib.x)
        return self.global_ranges

    def deployed_bundle(self) -> dict[str, Any]:
        """Everything needed to rebuild the deployed quantized model, plus its int form."""
        ranges = self.deploy_ranges()
        load_model_state(self.eval_model, self.global_state)
        prepare_deploy(self.eval_model, ranges, self.global_steps)
        ints = integer_weights(self.eval_model)
        set_mode(self.eval_model, "fp")
        meta = {"model": self.cfg.model, "in_shape": list(self.in_shape), "num_classes": self.num_classes,
                "w_bits": self.cfg.w_bits, "a_bits": self.cfg.a_bits, "first_last_bits": self.cfg.first_last_bits,
                "dataset": self.dataset_name}
        return {"meta": meta, "state": self.global_state, "steps": self.global_steps, "ranges": ranges,
                "int_weights": ints}

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resumed run needs to continue exactly: the FP32 master, server state
        (ranges, QAT steps), round index, RNG state, allocator with its cost model and SigAcc fit
        data, the speed model and simulated clock, and the round records (metrics) so far."""
        assert self.speed is not None and self.clock is not None, "profile() first"
        tensors = {f"global/{k}": v for k, v in self.global_state.items()}
        tensors.update({f"steps/{k}": v for k, v in (self.global_steps or {}).items()})
        tensors["rng/torch"] = torch.get_rng_state()
        sig = getattr(self.allocator, "significance", None)
        meta = {"format": 1, "round": self.rnd, "run_id": self.run_id, "config": self.cfg.to_dict(),
                "has_steps": self.global_steps is not None,
                "global_ranges": None if self.global_ranges is None else {k: list(v) for k, v in self.global_ranges.items()},
                "records": [record_dict(r) for r in self.records],
                "clock": {"now_s": self.clock.now_s, "history": list(self.clock.history)},
                "speed": self.speed.to_state(), "allocator": self.allocator.state_dict(),
                "significance": sig.to_state() if hasattr(sig, "to_state") else None,
                "upload_bytes_total": self.upload_bytes_total, "gaps": self.gaps, "fit": dict(vars(self.fit)),
                "carried_s": self._carried_s,
                "wall_elapsed_s": time.perf_counter() - self.wall_start}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a run with this same config."""
        from .allocation.significance import SignificanceModel

        master = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
        if set(master) != set(self.global_state) or any(master[k].shape != v.shape for k, v in self.global_state.items()):
            raise ConfigError("checkpoint: its model does not match this run's model")
        device = next(iter(self.global_state.values())).device  # checkpoints hold CPU tensors
        self.global_state = {k: master[k].to(device=v.device, dtype=v.dtype) for k, v in self.global_state.items()}
        steps = {k[len("steps/"):]: v.to(device) for k, v in tensors.items() if k.startswith("steps/")}
        self.global_steps = steps if meta["has_steps"] else None
        ranges = meta["global_ranges"]
        self.global_ranges = None if ranges is None else {k: (v[0], v[1]) for k, v in ranges.items()}
        self.records = [record_from_dict(r) for r in meta["records"]]
        self.profile(RooflineModel(self.trace_book(), dict(meta["speed"]["overrides"])))
        assert self.clock is not None
        self.clock.now_s, self.clock.history = meta["clock"]["now_s"], list(meta["clock"]["history"])
        self.allocator.load_state_dict(meta["allocator"])
        if meta.get("significance"):
            self.set_significance(SignificanceModel.from_state(meta["significance"]))
        self.rnd = int(meta["round"])
        self.run_id = meta.get("run_id")
        self.upload_bytes_total = int(meta["upload_bytes_total"])
        self.gaps = [float(g) for g in meta.get("gaps", [])]
        self.fit = FitInfo(**meta["fit"]) if meta.get("fit") else self.fit
        self._carried_s = float(meta.get("carried_s", 0.0))
        self.wall_start = time.perf_counter() - float(meta["wall_elapsed_s"])
        torch.set_rng_state(tensors["rng/torch"])

    def significance_summary(self) -> dict[str, Any] | None:
        """SigAcc's fit quality and pilot round gains, when the allocator has a model."""
        sig = getattr(self.allocator, "significance", None)
        if sig is None:
            return None
        return {"train_r2": sig.train_r2, "cv_r2": sig.cv_r2, "cv_r2_rounds": sig.cv_r2_rounds,
                "round_gains": sig.tags.get("round_gains"), "n_samples": sig.tags.get("n_samples")}

    def should_eval(self, rnd: int) -> bool:
        return (rnd + 1) % self.cfg.eval_every == 0 or rnd + 1 == self.cfg.rounds

    def summary(self, run_id: str | None = None) -> dict[str, Any]:
        """The run's figures. ``total_sim_s`` is the rounds' simulated time; a SigAcc pilot made
        for this run is on its bill too: ``charged_total_sim_s`` adds ``fit_charged_sim_s``, and
        ``wall_s`` includes the pilot's wall time (``fit_charged_wall_s``)."""
        last = self.records[-1] if self.records else None
        total = self.clock.now_s if self.clock else 0.0
        return {
            "config": self.cfg.to_dict(),
            "rounds": [record_dict(r) for r in self.records],
            "final_acc_q": last.acc_q if last else None,
            "final_acc_fp32": last.acc_fp32 if last else None,
            "total_sim_s": total,
            "charged_total_sim_s": total + self.fit.charged_sim_s,
            **self.fit.to_dict(),
            "wall_s": time.perf_counter() - self.wall_start + self.fit.charged_wall_s,
            "upload_bytes": self.upload_bytes_total,
            "alloc_overhead_s": float(sum(r.alloc_s for r in self.records)),
            "qat_share": float(np.mean([r.n_qat / max(1, r.n_qat + r.n_ptq + r.n_fp32) for r in self.records]))
            if self.records else 0.0,
            "speed_model": self.speed.summary() if self.speed else None,
            "significance": self.significance_summary(),
            "sim_breakdown_s": sim_breakdown(self.records),
            "ptq_extras_share": _mean_of(r.extra.get("ptq_extras_share") for r in self.records),
            "rejected": {"total": sum(len(r.rejected) for r in self.records),
                         "by_reason": reject_counts(r.rejected for r in self.records),
                         "retried_rounds": sum(r.attempts > 1 for r in self.records)},
            "run_id": run_id,
        }


def default_concurrency(cfg: ExperimentConfig) -> int:
    return cfg.max_concurrency or (os.cpu_count() or 1)


@dataclass
class RoundOps:
    """How each round verb is executed: directly (default) or, in the flow, as Prefect tasks.
    ``submit_train(inputs, jobs)`` trains a list of :class:`ClientJob` from one
    :class:`RoundInputs` and returns a future (anything with ``.result(timeout)``) of their
    :class:`Upload` list."""

    submit_train: Callable[..., Any]
    sent_bytes: dict[int, int] = field(default_factory=dict)   # round -> bytes sent to workers (Dask)
    allocate: Callable[..., Any] = lambda sim, rnd, sampled: sim.allocate(rnd, sampled)
    aggregate: Callable[..., Any] = lambda sim, results: sim.aggregate(results)
    evaluate: Callable[..., Any] = lambda sim: sim.evaluate()


def worker_lost(err: BaseException) -> bool:
    """True when a task failed because the worker process running it died (Dask gave up on it
    after rescheduling it ``distributed.scheduler.allowed-failures`` times, or lost the
    connection), not because the client's code raised."""
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    text = str(err).lower()
    return bool(names & {"KilledWorker", "CommClosedError"}) or (
        "worker" in text and any(w in text for w in ("died", "lost", "killed", "closed")))


def collect(futures: list[tuple[list[ClientJob], Any]], timeout_s: float) -> list[Upload]:
    """Every task's uploads. A task that failed (after its retries) or that has not answered
    ``timeout_s`` x its client count after the round started yields one failed upload per
    client; its thread or worker is left behind and its late answer ignored."""
    start = time.perf_counter()
    uploads: list[Upload] = []
    for jobs, fut in futures:
        wait = None
        if timeout_s:
            wait = max(0.0, start + timeout_s * len(jobs) + 1.0 - time.perf_counter())
        try:
            uploads.extend(fut.result(timeout=wait))
        except TimeoutError:
            uploads.extend(Upload(j.cid, None, f"timeout: no answer within {wait:.1f} s") for j in jobs)
        except Exception as err:  # noqa: BLE001 - a task that failed for good loses only its clients
            why = "worker-lost" if worker_lost(err) else "task failed"
            uploads.extend(Upload(j.cid, None, f"{why}: {type(err).__name__}: {str(err)[:200]}") for j in jobs)
    return uploads


@dataclass
class RoundOutcome:
    """What the training part of a round produced (see :func:`train_round`)."""

    alloc: Allocation
    alloc_s: float
    results: list[ClientResult]      # accepted, by client id
    rejected: dict[int, str]         # client -> "reason: detail", over all attempts
    attempts: int
    failed_s: float                  # simulated seconds spent on failed attempts
    workers: int                     # distinct processes that trained the accepted clients


def train_round(sim: Simulation, ops: RoundOps, rnd: int) -> RoundOutcome:
    """Sample, allocate and train one round, re-sampling while fewer than ``min_clients`` updates
    are accepted (``round_retries`` times), else raise TooFewClients."""
    cfg = sim.cfg
    rejected: dict[int, str] = {}
    failed_s, alloc_s = 0.0, 0.0
    for attempt in range(cfg.round_retries + 1):
        sampled = sim.sample(rnd, attempt)
        with span("allocate (task)", rnd):
            alloc, spent = ops.allocate(sim, rnd, sampled)
        alloc_s += spent
        with span("train (tasks)", rnd):
            inputs = sim.round_inputs()
            jobs = sim.jobs(rnd, alloc, sampled, attempt)
            futures = [(chunk, ops.submit_train(inputs, chunk)) for chunk in sim.chunks(jobs)]
            uploads = collect(futures, cfg.client_timeout_s)
        with span("unpack", rnd):
            results, bad = sim.accept(uploads)
        rejected.update({c: f"{why} (attempt {attempt + 1})" if attempt else why for c, why in bad.items()})
        if len(results) >= cfg.min_clients:
            ok = {r.cid for r in results}
            workers = len({u.worker for u in uploads if u.cid in ok})
            return RoundOutcome(alloc, alloc_s, results, rejected, attempt + 1, failed_s, workers)
        failed_s += sim.fail_attempt(rnd, results)
    raise TooFewClients(
        f"round {rnd}: only {len(results)} of {len(sampled)} client updates were accepted after "
        f"{cfg.round_retries + 1} attempt(s) (min_clients={cfg.min_clients}); the global model was not updated. "
        f"Rejected: {format_reasons(reject_counts([rejected]))}")


def format_reasons(by_reason: dict[str, int]) -> str:
    """``{"raised": 2, "size": 1}`` -> ``"2 raised, 1 size"`` (console, tags and errors)."""
    return ", ".join(f"{n} {reason}" for reason, n in by_reason.items()) or "none"


def run_rounds(sim: Simulation, ops: RoundOps, on_round: Callable[[RoundRecord], None] | None = None,
               checkpoints: Any = None) -> Simulation:
    """All remaining rounds of ``sim``: train (with retries), aggregate, evaluate, close, and
    checkpoint (``checkpoints.save(sim)``) before anyone hears of the round."""
    for rnd in range(sim.rnd, sim.cfg.rounds):
        with span("round", rnd):
            out = train_round(sim, ops, rnd)
            with span("aggregate (task)", rnd):
                server_s = ops.aggregate(sim, out.results)
            with span("evaluate (task)", rnd):
                metrics = ops.evaluate(sim) if sim.should_eval(rnd) else None
            rec = sim.close_round(rnd, out.alloc, out.alloc_s, out.results, server_s, metrics, out.rejected,
                                  out.attempts, out.failed_s)
            rec.extra["workers"] = out.workers
            rec.extra["samples"] = sum(r.n_samples for r in out.results)
            if rnd in ops.sent_bytes:
                rec.extra["bytes_to_workers"] = ops.sent_bytes.pop(rnd)
            if checkpoints is not None:
                with span("checkpoint", rnd):
                    checkpoints.save(sim)
            if on_round:
                with span("tracking", rnd):
                    on_round(rec)
    return sim


def run(cfg: ExperimentConfig, on_round: Callable[[RoundRecord], None] | None = None,
        sim: Simulation | None = None, checkpoints: Any = None) -> Simulation:
    """Plain-Python run (no Prefect, no MLflow), clients trained concurrently on threads."""
    sim = sim or Simulation(cfg)
    if sim.speed is None:
        sim.profile()
    with ThreadPoolExecutor(default_concurrency(cfg)) as pool:
        ops = RoundOps(submit_train=lambda inputs, jobs: pool.submit(run_jobs, inputs, jobs))
        if sim.needs_significance():
            sim.set_significance(sim.fit_significance(ops.submit_train))
            sim.wall_start = time.perf_counter()   # the fit's wall time is added once, in summary()
        return run_rounds(sim, ops, on_round, checkpoints)
