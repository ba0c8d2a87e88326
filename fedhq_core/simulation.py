"""One federated run, as plain Python: data, fleet, models, clock and the per-round verbs.

A round is ``sample -> allocate -> train (each sampled client) -> aggregate -> evaluate ->
close_round``. The Prefect flow (``flows/train.py``) calls these same verbs as tasks; :func:`run`
below calls them in a plain loop, so the library works from a notebook with no Prefect server
and no MLflow.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .allocation import Allocation, RoundFeedback, build_allocator
from .client import ClientResult, TrainSpec, train_client
from .config import ExperimentConfig
from .errors import ConfigError
from .data import Dataset, Split, load_dataset, partition
from .hardware import (Fleet, Measurement, RooflineModel, SimulatedClock, StepCounts, count_step,
                       measure_host_peaks, measure_step_times, predict_compute)
from .models import build_model
from .quant import (configure_observers, integer_weights, load_model_state, model_state, prepare_deploy,
                    prepare_model, set_mode)
from .server import average_steps, average_ranges, calibrate_on_server, evaluate_global, fedavg


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


def load_data(cfg: ExperimentConfig) -> Dataset:
    """The dataset a config names (cached decodes under ``<state_dir>/cache``)."""
    return load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.seed,
                        test_fraction=cfg.test_fraction, max_train=cfg.max_train_samples,
                        max_test=cfg.max_test_samples, cache_dir=os.path.join(cfg.state_dir, "cache"))


def split_clients(cfg: ExperimentConfig, ds: Dataset) -> tuple[Split, Split, list[Split]]:
    """Seeded split of the train set: (server calibration split, client pool, client shards)."""
    rng = np.random.default_rng([cfg.seed, 31])
    perm = rng.permutation(len(ds.train))
    n_cal = min(cfg.server_calib_size, max(1, len(ds.train) // 10))
    server_calib = ds.train.subset(np.sort(perm[:n_cal]))
    pool = ds.train.subset(np.sort(perm[n_cal:]))
    try:
        idx = partition(pool.y.numpy(), cfg.clients, cfg.partition, rng, alpha=cfg.alpha,
                        classes_per_client=cfg.classes_per_client, min_size=cfg.min_shard_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return server_calib, pool, [pool.subset(i) for i in idx]


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
        if not v.is_floating_point():
            continue
        if bits >= 16:
            total += v.numel() * bits // 8
        else:
            rows = v.shape[0] if v.dim() >= 2 else 1
            total += math.ceil(v.numel() * bits / 8) + 4 * rows
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

    def metrics(self) -> dict[str, float]:
        keys = ("acc_q", "acc_fp32", "loss_q", "loss_fp32", "train_loss", "sim_round_s", "sim_time_s", "wall_s",
                "upload_bytes", "n_qat", "n_ptq", "n_fp32", "alloc_s")
        out = {k: float(getattr(self, k)) for k in keys}
        out.update({k: float(v) for k, v in self.extra.items() if isinstance(v, (int, float))})
        return out


class Simulation:
    """State of one run. Construct, then :meth:`profile`, then rounds (see :func:`run`)."""

    def __init__(self, cfg: ExperimentConfig, dataset: Dataset | None = None, significance: Any = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        ds = dataset or load_data(cfg)
        self.dataset_name = ds.name
        self.num_classes = ds.num_classes
        self.in_shape = ds.in_shape
        self.server_calib, pool, self.shards = split_clients(cfg, ds)
        self.global_labels = pool.y.numpy()
        self.test: Split = ds.test
        self.n_clients = cfg.clients

        torch.manual_seed(cfg.seed)
        self.eval_model = self.new_model()
        self.global_state = {k: v.detach().clone() for k, v in model_state(self.eval_model).items()}
        self.global_ranges: dict[str, tuple[float, float]] | None = None
        self.global_steps: dict[str, torch.Tensor] | None = None
        self._models: queue.SimpleQueue[nn.Module] = queue.SimpleQueue()
        self.fleet = Fleet.build(cfg.clients, cfg.fleet, cfg.throttle_prob, cfg.throttle_factor,
                                 cfg.jitter_sigma, cfg.seed)
        self.speed: RooflineModel | None = None
        self.clock: SimulatedClock | None = None
        self.allocator = build_allocator(cfg, significance)
        self.records: list[RoundRecord] = []
        self.last_allocation_info: dict[str, Any] = {}
        self.rnd = 0
        self.wall_start = time.perf_counter()
        self.upload_bytes_total = 0

    def needs_significance(self) -> bool:
        """The allocator uses SigAcc, has none yet, and the config does not opt out (significance: none)."""
        return (self.cfg.significance != "none" and hasattr(self.allocator, "significance_of")
                and getattr(self.allocator, "significance", 0) is None)

    def set_significance(self, model: Any) -> None:
        self.allocator.significance = model  # type: ignore[attr-defined]

    def fit_significance(self, map_fn: Callable = map) -> Any:
        """Offline SigAcc fitting by pilot rounds (see allocation.pilot); does not touch the run's state."""
        from .allocation.pilot import fit_significance

        if self.speed is None:
            self.profile()
        return fit_significance(self, self.cfg.pilot_rounds, map_fn)

    # --- models -------------------------------------------------------------------------
    def new_model(self) -> nn.Module:
        m = build_model(self.cfg.model, self.in_shape, self.num_classes)
        prepare_model(m, self.cfg.w_bits, self.cfg.a_bits, self.cfg.first_last_bits)
        configure_observers(m, self.cfg.ema_momentum, self.cfg.ptq_act_percentile)
        return m.to(self.device)

    @contextlib.contextmanager
    def borrow_model(self) -> Iterator[nn.Module]:
        """A worker model from the pool (built once per concurrent slot, never per client)."""
        try:
            m = self._models.get_nowait()
        except queue.Empty:
            m = self.new_model()
        try:
            yield m
        finally:
            self._models.put(m)

    # --- hardware -----------------------------------------------------------------------
    def profile(self, speed: RooflineModel | None = None) -> RooflineModel:
        """Count and measure host steps, fit the roofline model, start the simulated clock."""
        if speed is None:
            bs = sorted(set(self.cfg.profile_batch_sizes))
            cache = self._profile_cache_path(bs)
            if self.cfg.profile_cache and cache.is_file():
                data = json.loads(cache.read_text())
                counts = {k: StepCounts(**v) for k, v in data["counts"].items()}
                ms = [Measurement(**m) for m in data["measurements"]]
                peak, bw = data["host_peak"], data["host_bw"]
            else:
                model = self.new_model()
                counts = {m: count_step(model, self.in_shape, self.num_classes, m, self.device)
                          for m in ("fp32", "qat", "fwd")}
                ms = measure_step_times(model, self.in_shape, self.num_classes, bs, self.cfg.profile_reps,
                                        self.device)
                peak, bw = measure_host_peaks(self.device)
                if self.cfg.profile_cache:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cache.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"counts": {k: vars(v) for k, v in counts.items()},
                                               "measurements": [vars(m) for m in ms],
                                               "host_peak": peak, "host_bw": bw}))
                    os.replace(tmp, cache)
            speed = RooflineModel.fit(counts, ms, peak, bw, holdout_batch=bs[-2] if len(bs) > 2 else None)
        self.speed = speed
        self.clock = SimulatedClock(self.fleet, speed)
        return speed

    def _profile_cache_path(self, batch_sizes: list[int]) -> Path:
        """One profile per host, model shape, torch build, thread count and profiling grid."""
        key = json.dumps([self.cfg.model, list(self.in_shape), self.num_classes, torch.__version__,
                          platform.processor() or platform.machine(), cpu_model(), torch.get_num_threads(),
                          str(self.device), batch_sizes, self.cfg.profile_reps])
        return Path(self.cfg.state_dir) / "profiles" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"

    def steps_of(self, cid: int) -> list[int]:
        """Batch sizes of a client's local optimizer steps."""
        return _batches(len(self.shards[cid]), self.cfg.batch_size) * self.cfg.local_epochs

    def calib_batches_of(self, cid: int) -> list[int]:
        """Batch sizes of a PTQ client's forward-only passes (calibration, then quantized check)."""
        n, b = len(self.shards[cid]), self.cfg.batch_size
        return _batches(min(n, self.cfg.calib_batches * b), b) * 2

    def predicted_times(self, cids: list[int]) -> dict[str, np.ndarray]:
        """Spec-sheet predicted local round time per client under PTQ and QAT (compute + upload)."""
        assert self.speed is not None, "profile() first"
        up = upload_size(self.global_state, self.cfg.upload_bits)
        out = {"ptq": [], "qat": []}
        for c in cids:
            dev = self.fleet.devices[c]
            steps = self.steps_of(c)
            upload = up * 8.0 / dev.uplink_bps
            # the same pricing the clock applies to what clients really did (hardware.clock)
            out["ptq"].append(predict_compute(self.speed, dev, "ptq", steps, self.calib_batches_of(c)) + upload)
            out["qat"].append(predict_compute(self.speed, dev, "qat", steps, []) + upload)
        return {k: np.asarray(v) for k, v in out.items()}

    # --- round verbs --------------------------------------------------------------------
    def sample(self, rnd: int) -> list[int]:
        rng = np.random.default_rng([self.cfg.seed, 17, rnd])
        k = max(1, int(round(self.cfg.fraction * self.n_clients)))
        return sorted(rng.choice(self.n_clients, size=k, replace=False).tolist())

    def allocate(self, rnd: int, sampled: list[int]) -> tuple[Allocation, float]:
        t0 = time.perf_counter()
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
                         upload_bits, cfg.calib_batches,
                         seed=int(np.random.default_rng([cfg.seed, 53, rnd, cid]).integers(2**62)), fedfq=fedfq)

    def train(self, rnd: int, cid: int, strategy: str, upload_bits: Any = None) -> ClientResult:
        shard = self.shards[cid]
        with self.borrow_model() as model:
            return train_client(model, cid, shard.x, shard.y, self.global_state, self.global_ranges,
                                self.client_spec(rnd, cid, strategy, upload_bits), self.global_steps)

    def train_many(self, rnd: int, jobs: list[tuple[int, str, Any]]) -> list[ClientResult]:
        """Train several clients one after the other on one borrowed model (one task's work)."""
        return [self.train(rnd, cid, strategy, bits) for cid, strategy, bits in jobs]

    def chunks(self, jobs: list[Any]) -> list[list[Any]]:
        """Split a round's client jobs into tasks: ``clients_per_task`` each, or one task per worker."""
        size = self.cfg.clients_per_task or math.ceil(len(jobs) / default_concurrency(self.cfg))
        return [jobs[i:i + size] for i in range(0, len(jobs), max(1, size))]

    def aggregate(self, results: list[ClientResult]) -> float:
        """FedAvg into the master; returns the server's measured seconds."""
        t0 = time.perf_counter()
        self.global_state = fedavg(self.global_state, results)
        self.global_ranges = average_ranges(results, self.global_ranges)
        # QAT clients' learned weight steps (None in a round without QAT: MSE scales then)
        self.global_steps = average_steps(results)
        return time.perf_counter() - t0

    def evaluate(self) -> dict[str, float]:
        # deploy_ranges: clients' averaged ranges; only when no client sent any (fp32, fedfq)
        # is the server's own small split used to calibrate.
        with all_cores():  # no client trains during evaluation: give it every core
            return evaluate_global(self.eval_model, self.global_state, self.deploy_ranges(), self.test.x,
                                   self.test.y, self.global_steps)

    def close_round(self, rnd: int, alloc: Allocation, alloc_s: float, results: list[ClientResult],
                    server_s: float, metrics: dict[str, float] | None) -> RoundRecord:
        assert self.clock is not None
        times = {r.cid: self.clock.client_time(rnd, r.cid, r.strategy, r.train_batches, r.forward_batches,
                                               r.upload_bytes) for r in results}
        round_s = self.clock.advance(list(times.values()), server_s)
        metrics = metrics if metrics is not None else (
            {k: self.records[-1].__dict__[k] for k in ("acc_q", "acc_fp32", "loss_q", "loss_fp32")}
            if self.records else {"acc_q": 0.0, "acc_fp32": 0.0, "loss_q": float("nan"), "loss_fp32": float("nan")})
        up = sum(r.upload_bytes for r in results)
        self.upload_bytes_total += up
        strategies = {r.cid: r.strategy for r in results}
        extra = {k: v for k, v in alloc.info.items() if isinstance(v, (int, float))}
        rec = RoundRecord(rnd, metrics["acc_q"], metrics["acc_fp32"], metrics["loss_q"], metrics["loss_fp32"],
                          float(np.mean([r.train_loss for r in results])) if results else float("nan"),
                          round_s, self.clock.now_s, time.perf_counter() - self.wall_start, up,
                          sum(s == "qat" for s in strategies.values()), sum(s == "ptq" for s in strategies.values()),
                          sum(s == "fp32" for s in strategies.values()), alloc_s, strategies, extra)
        self.records.append(rec)
        t0 = time.perf_counter()
        rec.extra.update(self.allocator.observe(RoundFeedback(rnd, results, times, metrics), self) or {})
        rec.alloc_s += time.perf_counter() - t0
        self.rnd = rnd + 1
        return rec

    def deploy_ranges(self) -> dict[str, tuple[float, float]]:
        if self.cfg.strategy in ("fp32", "fedfq") or self.global_ranges is None:
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

    def should_eval(self, rnd: int) -> bool:
        return (rnd + 1) % self.cfg.eval_every == 0 or rnd + 1 == self.cfg.rounds

    def summary(self, run_id: str | None = None) -> dict[str, Any]:
        last = self.records[-1] if self.records else None
        return {
            "config": self.cfg.to_dict(),
            "rounds": [dict(r.__dict__, strategies={str(k): v for k, v in r.strategies.items()}) for r in self.records],
            "final_acc_q": last.acc_q if last else None,
            "final_acc_fp32": last.acc_fp32 if last else None,
            "total_sim_s": self.clock.now_s if self.clock else 0.0,
            "wall_s": time.perf_counter() - self.wall_start,
            "upload_bytes": self.upload_bytes_total,
            "alloc_overhead_s": float(sum(r.alloc_s for r in self.records)),
            "qat_share": float(np.mean([r.n_qat / max(1, r.n_qat + r.n_ptq + r.n_fp32) for r in self.records]))
            if self.records else 0.0,
            "speed_model": self.speed.summary() if self.speed else None,
            "run_id": run_id,
        }


def default_concurrency(cfg: ExperimentConfig) -> int:
    return cfg.max_concurrency or (os.cpu_count() or 1)


@dataclass
class RoundOps:
    """How each round verb is executed: directly (default) or, in the flow, as Prefect tasks.
    ``submit_train(sim, rnd, jobs)`` trains a list of ``(cid, strategy, upload_bits)`` jobs and
    returns a future (anything with ``.result()``) of their results."""

    submit_train: Callable[..., Any]
    allocate: Callable[..., Any] = lambda sim, rnd, sampled: sim.allocate(rnd, sampled)
    aggregate: Callable[..., Any] = lambda sim, results: sim.aggregate(results)
    evaluate: Callable[..., Any] = lambda sim: sim.evaluate()


def run_rounds(sim: Simulation, ops: RoundOps, on_round: Callable[[RoundRecord], None] | None = None) -> Simulation:
    """All remaining rounds of ``sim``: sample, allocate, train concurrently, aggregate, evaluate."""
    for rnd in range(sim.rnd, sim.cfg.rounds):
        sampled = sim.sample(rnd)
        alloc, alloc_s = ops.allocate(sim, rnd, sampled)
        jobs = [(c, alloc.strategies[c], alloc.upload_bits.get(c)) for c in sampled]
        futures = [ops.submit_train(sim, rnd, chunk) for chunk in sim.chunks(jobs)]
        results = [r for f in futures for r in f.result()]
        server_s = ops.aggregate(sim, results)
        metrics = ops.evaluate(sim) if sim.should_eval(rnd) else None
        rec = sim.close_round(rnd, alloc, alloc_s, results, server_s, metrics)
        if on_round:
            on_round(rec)
    return sim


def run(cfg: ExperimentConfig, on_round: Callable[[RoundRecord], None] | None = None,
        sim: Simulation | None = None) -> Simulation:
    """Plain-Python run (no Prefect, no MLflow), clients trained concurrently on threads."""
    sim = sim or Simulation(cfg)
    if sim.speed is None:
        sim.profile()
    with ThreadPoolExecutor(default_concurrency(cfg)) as pool:
        if sim.needs_significance():
            sim.set_significance(sim.fit_significance(pool.map))
        ops = RoundOps(submit_train=lambda s, *a: pool.submit(s.train_many, *a))
        return run_rounds(sim, ops, on_round)
