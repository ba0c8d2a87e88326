"""One federated run as plain Python: the data split, the fleet, the model, and the rooms a round
goes through, composed:

* ``pricing``  (:class:`~fedhq_core.pricing.FleetPricing`): what clients and the server run and what it
  costs on their devices; the allocator's view of the fleet and the clock's price list;
* ``server``   (:class:`~fedhq_core.server_state.ServerState`): the master, ranges, steps and gaps;
  aggregation, measurements on the proxy split, deployment, evaluation;
* ``dispatch`` (:class:`~fedhq_core.dispatch.Dispatch`): the seeded sample, jobs and tasks, the checks
  on every upload;
* ``allocator`` (``fedhq_core.allocation``): PTQ or QAT per client, reading the run only through
  :class:`~fedhq_core.allocation.base.FleetView`, which :class:`Simulation` implements.

The round loop that drives them reads top to bottom in ``fedhq_core.loop``; the Prefect flow
(``flows/train.py``) runs the same loop with its task runner, so the library works from a notebook
with no Prefect server and no MLflow (``fedhq_core.loop.run``).
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from .allocation import Allocation, Capabilities, RoundFeedback, build_allocator
from .allocation.pilot import FitInfo
from .client import SHADOW_PREFIX, ClientResult, Mode
from .config import ExperimentConfig
from .data import Dataset, Split, partition
from .dispatch import Dispatch
from .errors import ConfigError
from .hardware import Fleet, RooflineModel
from .measurements import build as build_measurements
from .phases import span
from .pricing import FleetPricing
from .hardware.host_work import HostWork, host_work_summary
from .records import PTQ_EXTRAS, RoundRecord, record_dict, record_from_dict, records_summary
from .server_state import ServerState
from .models.spec import ModelSpec
from .worker import DataKey, ShardRef


def data_key(cfg: ExperimentConfig) -> DataKey:
    """The images a config trains and tests on: drawn with ``data_seed``, not the run's ``seed``
    (a bench or study loads them once for all its seeds)."""
    return DataKey(cfg.dataset, cfg.data_dir, cfg.download, cfg.data_seed, cfg.test_fraction, cfg.max_train_samples,
                   cfg.max_test_samples, os.path.join(cfg.state_dir, "cache"))


def load_data(cfg: ExperimentConfig) -> Dataset:
    """The dataset a config names (cached decodes under ``<state_dir>/cache``)."""
    return data_key(cfg).load()


def split_clients(cfg: ExperimentConfig, ds: Dataset) -> tuple[Split, np.ndarray, list[ShardRef], Split | None]:
    """Seeded split of the train set: (server calibration split, labels of the client pool,
    client shards as indices into ``ds.train``, the experimenter's validation split or None).
    The three parts are disjoint: no client trains on the proxy or the validation images."""
    rng = np.random.default_rng([cfg.seed, 31])
    perm = rng.permutation(len(ds.train))
    n_cal = min(cfg.server_calib_size, max(1, len(ds.train) // 10))
    n_val = int(round(cfg.val_fraction * len(ds.train)))
    server_calib = ds.train.subset(np.sort(perm[:n_cal]))
    val = ds.train.subset(np.sort(perm[n_cal:n_cal + n_val])) if n_val else None
    pool = np.sort(perm[n_cal + n_val:])
    labels = ds.train.y.numpy()[pool]
    try:
        idx = partition(labels, cfg.clients, cfg.partition, rng, alpha=cfg.alpha,
                        classes_per_client=cfg.classes_per_client, min_size=cfg.min_shard_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # the key ``ds`` was loaded with, not the run's: a benchmark loads its data once, with the
    # base seed, for every seed's runs, and a worker must reload that same split
    key = ds.source if ds.source is not None else data_key(cfg)
    return server_calib, labels, [ShardRef(key, pool[np.asarray(i, dtype=np.int64)], ds.train) for i in idx], val


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
        raise ConfigError("device: cuda requested but no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


class Simulation:
    """State of one run. Construct, then :meth:`profile`, then rounds (``fedhq_core.loop``)."""

    def __init__(self, cfg: ExperimentConfig, dataset: Dataset | None = None, significance: Any = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        ds = dataset or load_data(cfg)
        self.dataset_name, self.num_classes, self.in_shape = ds.name, ds.num_classes, ds.in_shape
        self.input_norm = {"mean": list(ds.mean), "std": list(ds.std), "classes": list(ds.classes)}
        self.server_calib, self.global_labels, self.shards, val = split_clients(cfg, ds)
        self.n_clients, self.rounds, self.proxy_size = cfg.clients, cfg.rounds, len(self.server_calib)
        self.fleet = Fleet.build(cfg.clients, cfg.fleet, cfg.throttle_prob, cfg.throttle_factor,
                                 cfg.jitter_sigma, cfg.seed)
        self.allocator = build_allocator(cfg, significance)
        # the server's host work of the round (the allocator's, the uploads' decoding): counted,
        # priced from measured constants and charged when the round closes (hardware.host_work)
        self.host_work = HostWork()
        self.setup_work = HostWork()      # once a run: the family's refit
        self.run_work = HostWork()        # every round's, by kind (the rounds this process ran)
        self.allocator.work = self.host_work
        # a PTQ client measures its sensitivity on the device only when asked to; by default the
        # server measures it from the uploads, and only for an allocator that reads it
        on_device = bool(cfg.report_sensitivity)
        if cfg.report_sensitivity is None:
            self.allocator.sensitivity_lag = 1
        torch.manual_seed(cfg.seed)
        self.pricing = FleetPricing(cfg, self.fleet, [len(s) for s in self.shards], self.model_spec,
                                    lambda: bool(self.server.global_steps), on_device,
                                    self.allocator.capabilities.aggregate_bits)
        self.server = ServerState(self.new_model(), self.server_calib, ds.test, self.pricing,
                                  calibrates=self.allocator.capabilities.server_calibrates, aggregation=cfg.aggregation,
                                  trim=cfg.trim_fraction, bound=cfg.norm_bound, val=val,
                                  measurements=build_measurements(cfg), server_momentum=cfg.server_momentum,
                                  server_lr=cfg.server_lr)
        self.dispatch = Dispatch(cfg, self.shards, self.server, self.model_spec, on_device, self.host_work)
        self.fit = FitInfo()         # what obtaining SigAcc cost this run (see allocation.pilot)
        self._shard_features: dict[int, np.ndarray] | None = None
        self.label_hist_s: float | None = None    # the clients' label histograms: simulated seconds, once sent
        self.label_hist_bytes = 0
        self.seen_samples: dict[int, int] = {}    # the sample count each client's uploads carried
        self.records: list[RoundRecord] = []
        self.last_allocation_info: dict[str, Any] = {}
        self.rnd = 0
        self.run_id: str | None = None
        self.wall_start = time.perf_counter()
        self.upload_bytes_total = 0

    # --- the model and the clock ------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec:
        c = self.cfg
        return ModelSpec(c.model, tuple(self.in_shape), self.num_classes, c.w_bits, c.a_bits, c.first_last_bits,
                         c.ema_momentum, c.ptq_act_percentile)

    def new_model(self) -> nn.Module:
        return self.model_spec.build(self.device)

    def profile(self, speed: RooflineModel | None = None) -> RooflineModel:
        """Start the simulated clock: every client's work is priced from op traces of the steps
        it runs and the catalog's constants (never from this host's timings), so the same config
        and seed give the same simulated times on any machine. A profile file (opt-in) replaces
        catalog coefficients with host-calibrated ones; they are stored with the run."""
        return self.pricing.start(speed, self.server.global_state, len(self.server_calib))

    # --- what the allocator may read (allocation.base.FleetView) and needs ---------------------
    def predicted_times(self, cids: list[int]) -> dict[str, np.ndarray]:
        return self.pricing.predicted_times(cids)

    def qat_samples_within(self, cids: list[int], budgets: np.ndarray) -> np.ndarray:
        return self.pricing.qat_samples_within(cids, budgets)

    def shard_features(self) -> dict[int, np.ndarray]:
        """SigAcc's shard features of every client. With ``share_label_histograms`` each client
        sends its label histogram once, the first time an allocator reads them (charged on the
        clock then: ``FleetPricing.label_histograms_s``); without, they come from the sample
        counts the uploads carried (``significance.measured_shard_features``)."""
        from .allocation.significance import fleet_shard_features, measured_shard_features

        if not self.cfg.share_label_histograms:
            return measured_shard_features(self.seen_samples, self.n_clients, self.num_classes)
        if self._shard_features is None:
            with self.host_work.op("histogram", self.n_clients, self.n_clients * self.num_classes):
                self._shard_features = fleet_shard_features(self.global_labels, [s.y.numpy() for s in self.shards],
                                                            self.num_classes)
        clock = self.pricing.clock
        if self.label_hist_s is None and clock is not None:
            self.label_hist_s, self.label_hist_bytes = self.pricing.label_histograms_s(self.num_classes)
            clock.now_s += self.label_hist_s
        return self._shard_features

    def measured(self, name: str) -> Any:
        """What allocators may read of a server measurement (``fedhq_core.measurements``)."""
        return self.server.read(name)

    @property
    def quant_gap(self) -> float:
        """SigAcc's gap feature: the trend of the gaps measured so far (significance.gap_trend)."""
        return self.measured("gap")

    @property
    def setting(self) -> dict[str, float]:
        from .allocation.significance import setting_of

        return setting_of(self.cfg)

    @property
    def online_gains(self) -> list[float | None]:
        """The server's QAT-vs-PTQ partial comparisons so far, less the newest: that one is
        measured while the next round trains, so its allocation has not seen it yet."""
        return self.measured("partials")

    @property
    def capabilities(self) -> Capabilities:
        return self.allocator.capabilities

    @property
    def server_measures_sensitivity(self) -> bool:
        """By default the server measures the PTQ uploads' sensitivity, and only for an allocator
        that reads it (it may start reading once it has a SigAcc model)."""
        return self.capabilities.reads("sensitivity") and self.server.measurements["sensitivity"].active()

    def needs_significance(self) -> bool:
        """The allocator uses SigAcc, has not been given a family model nor told to go online yet,
        and the config does not opt out (significance: none)."""
        return self.cfg.significance != "none" and self.capabilities.uses_significance and \
            self.allocator.significance is None and self.fit.source == "none"

    def set_significance(self, model: Any) -> None:
        """Give the allocator its SigAcc model; what obtaining it cost (``model.fit_info``) goes on
        this run's bill (``fit_*`` in the summary)."""
        self.allocator.significance = model
        self.fit = getattr(model, "fit_info", None) or FitInfo()

    # --- the round's server verbs (the loop calls them, or the flow as tasks) -----------------
    def allocate(self, rnd: int, sampled: list[int]) -> tuple[Allocation, float]:
        t0 = time.perf_counter()
        with span("allocate", rnd), self.host_work.op(f"allocate/{self.allocator.name}", 1, len(sampled)):
            alloc = self.allocator.allocate(rnd, sampled, self)
        if alloc.fork == "start":
            self.server.start_fork()
        elif alloc.fork is not None:
            self.server.end_fork(alloc.fork)
        self.last_allocation_info = alloc.info
        return alloc, time.perf_counter() - t0

    def allocator_refit_before(self, rnd: int) -> bool:
        """True when the cost model was refitted right before round ``rnd`` (an adjustment round)."""
        return any(r["round"] == rnd - 1 for r in self.allocator.refits)

    def aggregate(self, results: list[ClientResult]) -> float:
        """FedAvg into the master (``ServerState.aggregate``); the priced seconds after the uploads."""
        self.seen_samples.update({r.cid: r.n_samples for r in results})
        more = self.rnd + 1 < self.cfg.rounds     # a measurement only a later round can use is skipped in the last
        wanted = [m.name for m in self.server.measurements.values()
                  if self.capabilities.reads(m.name) and m.active() and (more or not m.later_only)]
        return self.server.aggregate(results, wanted, self.dispatch.norm_checks, self.averages(self.rnd))

    def averages(self, rnd: int) -> bool:
        """Round ``rnd``'s master joins the deployed running average (``server_average``: its last
        share of the rounds)."""
        c = self.cfg
        return c.server_average > 0 and rnd >= c.rounds - round(c.rounds * c.server_average)

    def evaluate(self) -> dict[str, float]:
        """The deployed model on the test split when it is due (``should_test``), and on the
        validation split; while the round runs, ``self.rnd`` is its index."""
        return self.server.evaluate(test=self.should_test(self.rnd))

    def _due(self, rnd: int, every: int) -> bool:
        c = self.cfg
        return (rnd + 1) % every == 0 or rnd + 1 == c.rounds or rnd >= c.rounds - c.eval_tail

    def should_eval(self, rnd: int) -> bool:
        return self._due(rnd, self.cfg.eval_every)

    def should_test(self, rnd: int) -> bool:
        return self._due(rnd, self.cfg.test_every or self.cfg.eval_every)

    def fail_attempt(self, rnd: int, results: list[ClientResult]) -> float:
        """A round attempt with too few accepted updates: the global model stays as it is, but the
        clock still pays for the wait on the clients that did report."""
        assert self.pricing.clock is not None
        return self.pricing.clock.advance(list(self.pricing.client_times(rnd, results).values()), {})[0]

    def close_round(self, rnd: int, alloc: Allocation, alloc_s: float, results: list[ClientResult],
                    server_s: float, metrics: dict[str, float] | None, rejected: dict[int, str] | None = None,
                    attempts: int = 1, failed_s: float = 0.0, waited: list[ClientResult] | None = None
                    ) -> RoundRecord:
        """Close round ``rnd`` on the clock: its accepted ``results`` and the uploads it ``waited``
        for before rejecting them (their clients' time is the round's too; only the accepted
        ones are aggregated, reported to the allocator and counted in the record)."""
        clock, server = self.pricing.clock, self.pricing.server
        assert clock is not None and server is not None
        times = self.pricing.client_times(rnd, results)
        waited_times = list(self.pricing.client_times(rnd, waited).values()) if waited else []
        # a round without an evaluation (or with the validation split's alone) carries the last figures
        fresh = metrics or {}
        carried = ({**{k: v for k, v in self.records[-1].extra.items() if k.startswith("val_")},
                    **{k: self.records[-1].__dict__[k] for k in ("acc_q", "acc_fp32", "loss_q", "loss_fp32")}}
                   if self.records else {"acc_q": 0.0, "acc_fp32": 0.0, "loss_q": float("nan"), "loss_fp32": float("nan")})
        metrics = {**carried, **fresh}
        t0 = time.perf_counter()
        with self.host_work.op(f"observe/{self.allocator.name}", 1, len(results)):
            observed = self.allocator.observe(RoundFeedback(rnd, results, times, metrics), self) or {}
        alloc_s += time.perf_counter() - t0
        # the server's priced work: allocation before the round, the uploads' decoding and their
        # aggregation after them, the allocator's bookkeeping and refits after that, and the
        # deployment's calibration (clients that send no ranges) once the last round is in
        decode = self.host_work.take(("decode",))
        host = self.host_work.take()
        parts = {"alloc": host.priced_s(), "decode": decode.priced_s(), "server": server_s}
        if rnd + 1 == self.cfg.rounds and self.server.calibrates:
            parts["deploy"] = server.calib_s()
        round_s, split = clock.advance(list(times.values()) + waited_times, parts, self.server.gap_s)
        round_s += failed_s
        up = sum(r.upload_bytes for r in results)
        self.upload_bytes_total += up
        strategies = {r.cid: r.strategy for r in results}
        extra = {k: v for k, v in alloc.info.items() if isinstance(v, (int, float))}
        extra.update({f"sim_{k}_s": v for k, v in split.items()})
        extra["server_host_s"] = self.server.host_s
        extra["server_measure_s"] = self.server.gap_s   # priced measurements run while this round's clients trained
        host.merge(decode)
        extra["host_priced_s"], extra["host_measured_s"] = host.priced_s(), host.measured_s
        self.run_work.merge(host)
        shadow_s = sum(v for t in times.values() for k, v in t.by_kind.items() if k.startswith(SHADOW_PREFIX))
        if shadow_s:   # every client's paired-measurement work (the critical client's is in the sim_shadow_* split)
            extra["shadow_device_s"] = float(shadow_s)
        ptq = [times[r.cid] for r in results if r.strategy == Mode.PTQ]
        if ptq:   # what PTQ runs on the device beyond FP32 training, as a share of its client's time
            extra["ptq_extras_share"] = float(np.mean([sum(t.by_kind.get(k, 0.0) for k in PTQ_EXTRAS) / t.total_s
                                                       for t in ptq]))
        if self.capabilities.reads("gap"):
            extra["quant_gap_measured"] = self.server.gaps[-1]
        extra.update(self.server.take_records())    # e.g. an exploring round's partial comparison, every statistic
        if failed_s:
            extra["sim_failed_s"] = failed_s
        extra.update({k: v for k, v in metrics.items() if k.startswith("val_")})   # the validation split's
        extra["evaluated"] = "acc_q" in fresh             # false: the test figures are the last evaluation's
        extra["val_evaluated"] = "val_acc_q" in fresh     # false: the validation figures are carried
        rec = RoundRecord(rnd, metrics["acc_q"], metrics["acc_fp32"], metrics["loss_q"], metrics["loss_fp32"],
                          float(np.mean([r.train_loss for r in results])) if results else float("nan"),
                          round_s, clock.now_s, time.perf_counter() - self.wall_start, up,
                          sum(s == Mode.QAT for s in strategies.values()), sum(s == Mode.PTQ for s in strategies.values()),
                          sum(s == Mode.FP32 for s in strategies.values()), alloc_s, strategies, extra,
                          dict(rejected or {}), attempts, float(sum(parts.values())))
        rec.extra.update(observed)
        self.records.append(rec)
        self.rnd = rnd + 1
        return rec

    def deployed_bundle(self) -> dict[str, Any]:
        """Everything needed to rebuild the deployed quantized model, plus its int form."""
        c = self.cfg
        return self.server.deployed_bundle({"model": c.model, "in_shape": list(self.in_shape),
                                            "num_classes": self.num_classes, "w_bits": c.w_bits, "a_bits": c.a_bits,
                                            "first_last_bits": c.first_last_bits, "dataset": self.dataset_name,
                                            **self.input_norm})

    # --- checkpoints and summary ------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resumed run needs to continue exactly: the server's state (master, ranges,
        QAT steps, gaps), round index, RNG state, allocator with its cost model and SigAcc fit
        data, the speed model and simulated clock, and the round records (metrics) so far."""
        speed, clock = self.pricing.speed, self.pricing.clock
        assert speed is not None and clock is not None, "profile() first"
        tensors = {**self.server.state_tensors(), "rng/torch": torch.get_rng_state()}
        sig = self.allocator.significance
        meta = {"format": 1, "round": self.rnd, "run_id": self.run_id, "config": self.cfg.public_dict(),
                **self.server.state_meta(),
                "records": [record_dict(r) for r in self.records],
                "clock": {"now_s": clock.now_s, "history": list(clock.history)},
                "speed": speed.to_state(), "allocator": self.allocator.state_dict(),
                "significance": sig.to_state() if sig is not None else None,
                "upload_bytes_total": self.upload_bytes_total, "fit": dict(vars(self.fit)),
                "norm_ref": self.dispatch.norm_ref, "norm_refs": self.dispatch.norm_refs,
                "label_hist": {"sim_s": self.label_hist_s, "bytes": self.label_hist_bytes},
                "seen_samples": {str(c): n for c, n in self.seen_samples.items()},
                "wall_elapsed_s": time.perf_counter() - self.wall_start}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a run with this same config."""
        from .allocation.significance import SignificanceModel

        self.server.load(tensors, meta)
        self.records = [record_from_dict(r) for r in meta["records"]]
        self.profile(RooflineModel(self.pricing.trace_book(), dict(meta["speed"]["overrides"])))
        clock = self.pricing.clock
        assert clock is not None
        clock.now_s, clock.history = meta["clock"]["now_s"], list(meta["clock"]["history"])
        self.allocator.load_state_dict(meta["allocator"])
        if meta.get("significance"):
            self.set_significance(SignificanceModel.from_state(meta["significance"]))
        self.rnd = int(meta["round"])
        self.run_id = meta.get("run_id")
        self.upload_bytes_total = int(meta["upload_bytes_total"])
        self.fit = FitInfo(**meta["fit"]) if meta.get("fit") else self.fit
        self.dispatch.norm_ref = float(meta.get("norm_ref", 0.0))
        self.dispatch.norm_refs = {str(k): float(v) for k, v in meta.get("norm_refs", {}).items()}
        hist = meta.get("label_hist") or {}
        self.label_hist_s, self.label_hist_bytes = hist.get("sim_s"), int(hist.get("bytes", 0))
        self.seen_samples = {int(c): int(n) for c, n in (meta.get("seen_samples") or {}).items()}
        self.wall_start = time.perf_counter() - float(meta["wall_elapsed_s"])
        torch.set_rng_state(tensors["rng/torch"])

    def significance_summary(self) -> dict[str, Any] | None:
        """SigAcc's fit quality (in-sample; CV by client, by pilot round, leave-one-setting-out) and
        its family, when the allocator has a model."""
        sig = self.allocator.significance
        if sig is None:
            return None
        return {"train_r2": sig.train_r2, "cv_r2": sig.cv_r2, "cv_r2_rounds": sig.cv_r2_rounds,
                "cv_r2_settings": sig.cv_r2_settings, "family": sig.tags.get("family"),
                "n_settings": sig.tags.get("n_settings"), "n_samples": sig.tags.get("n_samples")}

    def summary(self, run_id: str | None = None) -> dict[str, Any]:
        """The run's figures. ``total_sim_s`` is the rounds' simulated time; what obtaining SigAcc
        cost this run is on its bill too: ``charged_total_sim_s`` adds ``fit_charged_sim_s`` (a
        family's refit), and ``wall_s`` includes its wall time (``fit_charged_wall_s``)."""
        last = self.records[-1] if self.records else None
        clock, speed = self.pricing.clock, self.pricing.speed
        total = clock.now_s if clock else 0.0
        return {
            "config": self.cfg.public_dict(),
            "rounds": [record_dict(r) for r in self.records],
            "final_acc_q": last.acc_q if last else None,
            "final_acc_q_val": last.extra.get("val_acc_q") if last else None,   # what selections read
            "final_acc_fp32": last.acc_fp32 if last else None,
            "total_sim_s": total,
            "charged_total_sim_s": total + self.fit.charged_sim_s,
            **self.fit.to_dict(),
            "wall_s": time.perf_counter() - self.wall_start + self.fit.charged_wall_s,
            "upload_bytes": self.upload_bytes_total,
            # what the clients' label histograms cost (on the clock: in total_sim_s), and what they sent
            "label_hist_sim_s": self.label_hist_s or 0.0,
            "label_hist_bytes": self.label_hist_bytes,
            **host_work_summary([r.extra for r in self.records], self.setup_work, self.run_work),
            **records_summary(self.records),
            "speed_model": speed.summary() if speed else None,
            "significance": self.significance_summary(),
            "run_id": run_id,
        }
