"""Typed, validated experiment configuration.

One :class:`ExperimentConfig` describes a run. It is loaded from YAML and/or CLI flags and
validated once, at the edge, by :func:`load_config`; every error names the offending field
and is raised as :class:`ConfigError`, which the CLI turns into a one-line message and exit
code 2. Inner code trusts the object it is given.

Every constant marked [design] (the project's own choices, listed in ``docs/design.md`` under
"Design choices") is a field here, so a user who has the paper's exact values can set them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


from .errors import ConfigError
from .plugins import is_spec
from .strategies import NAMES as STRATEGY_NAMES


DATASETS = ("digits", "cifar10-folder", "image-folder", "cifar10", "cifar100", "svhn")  # or package.module:loader
MODELS = ("cnn", "resnet18")  # or package.module:factory (any nn.Module)
PARTITIONS = ("iid", "dirichlet", "kclass")
UPLOAD_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)  # 2..8: bit-packed integers; 16/32: float16/float32
FAULT_KINDS = ("raise", "stall", "nan", "inf", "shape", "dtype", "size", "scale", "signflip", "ranges", "steps")
AGGREGATIONS = ("fedavg", "trimmed-mean", "median")
LR_SCHEDULES = ("constant", "cosine")
STRATEGIES = STRATEGY_NAMES      # fedhq_core.strategies: one registry line per strategy

# Default fleet: device class -> share of clients. Names index hardware.catalog.DEVICES.
DEFAULT_FLEET = {
    "raspberry-pi-4": 0.15,
    "raspberry-pi-5": 0.15,
    "jetson-nano": 0.15,
    "jetson-xavier-nx": 0.1,
    "snapdragon-8-gen-2": 0.15,
    "apple-m2-laptop": 0.1,
    "jetson-agx-orin": 0.1,
    "nvidia-t4": 0.05,
    "nvidia-a6000": 0.05,
}


@dataclass
class ExperimentConfig:
    """All knobs of one FedHQ run. Defaults are the embedded digits run of ``make run``."""

    # --- data -------------------------------------------------------------------------
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False           # only ever with an explicit --download
    max_train_samples: int = 0       # 0 = all; subsample the train split (seeded)
    max_test_samples: int = 0
    test_fraction: float = 0.2       # digits only: held-out share
    server_calib_size: int = 256     # server proxy split: fp32 calibration, SigAcc pilot scores, fedhq's gap
    val_fraction: float = 0.1        # the experimenter's validation split: this share of the training images, held out
                                     # from the clients and the server's proxy; every selection (tune, promote, study
                                     # targets) reads it, the test split is only reported; 0 = none
    partition: str = "dirichlet"
    alpha: float = 0.5               # Dirichlet concentration
    classes_per_client: int = 2      # for partition=kclass
    min_shard_size: int = 10
    # --- model / training ---------------------------------------------------------------
    model: str = "cnn"
    clients: int = 20
    rounds: int = 15
    fraction: float = 0.5
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    lr_schedule: str = "constant"    # constant | cosine: the clients' lr decays over the rounds to lr x lr_final
    lr_final: float = 0.0            # cosine: the floor's lr as a share of lr
    lr_hold: float = 0.0             # cosine: this share of the last rounds stays at the floor (the decay ends before)
    momentum: float = 0.9
    weight_decay: float = 0.0
    # --- quantization -------------------------------------------------------------------
    w_bits: int = 4
    a_bits: int = 8
    upload_bits: int = 8
    first_last_bits: int = 8         # [design] first conv and last linear kept at this; 0 = same as w/a bits
    ptq_act_percentile: float = 99.99  # [design] PTQ activation clipping percentile
    calib_batches: int = 4           # [design] PTQ calibration batches on the device
    ema_momentum: float = 0.9        # [design] QAT activation-range EMA
    qat_step_lr_scale: float = 0.01  # [design] LSQ weight steps' lr relative to lr (no weight decay)
    # --- strategy / allocation --------------------------------------------------------
    strategy: str = "fedhq"
    xi: float = 0.5                  # [design] equal weight on relative round time and relative accuracy gain (J)
    qat_share: float = -1.0          # random-hybrid: QAT share; <0 = take fedhq's when known, else 0.5
    adjust_every: int = 3            # [design] fine-grained adjustment period (rounds)
    max_stretch: float = 1.0         # [design] fedhq: QAT may stretch a round to at most this x its PTQ deadline (1: free QAT only)
    partial_qat: bool = True         # [design] fedhq committed to QAT: a client whose full QAT round misses the deadline
                                     # trains QAT on the shard samples that fit it (false: it trains FP32, PTQ)
    paired_explore: bool = True      # [design] fedhq exploring: clients with the slack train both ways (same start and
                                     # minibatches) and the server compares the same clients' QAT and PTQ uploads
    explore: str = "mixed"           # [design] fedhq exploring: mixed (one master; each round's QAT and PTQ partial
                                     # aggregates compared) | fork (two masters race: a QAT lineage and a PTQ lineage)
    online_statistic: str = "accuracy"  # [design] fedhq exploring: the comparisons' gain: accuracy | tcp (QAT minus PTQ
                                     # mean true-class probability, paired per image: less noisy, but biased to QAT)
    pilot_rounds: int = 0            # [design] fit-significance: paired pilot rounds per setting; 0 = the setting's run
    significance: str = "auto"       # auto | setting | online | none : a covering family's model else online;
                                     # also its setting-level model; online only; skip
    family_file: str | None = None   # a SigAcc family JSON instead of the shipped one (fit-significance --out)
    fedfq_avg_bits: float = 4.0      # fedfq: average upload bits per parameter
    fedfq_iters: int = 300           # fedfq: simulated-annealing iterations
    # --- simulated fleet / clock ------------------------------------------------------
    fleet: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FLEET))
    jitter_sigma: float = 0.15       # [design] log-normal sigma of per-round time jitter
    throttle_prob: float = 0.2       # [design] share of clients throttled beyond their spec sheet
    throttle_factor: float = 2.5     # [design] slowdown of a throttled client
    report_sensitivity: bool | None = None  # [design] PTQ clients measure (and are billed for) their local quantization
                                     # loss; None = only in runs whose allocator reads it (fedhq's fine stage)
    server_device: str = "nvidia-a100"  # [design] device class the server's work is priced on (hardware.catalog)
    profile_file: str | None = None  # opt-in host-calibrated coefficients (fedhq devices --validate --write-profile)
    # host validation only (fedhq devices --validate); the clock never uses host timings
    profile_batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    profile_reps: int = 5
    # --- execution ----------------------------------------------------------------------
    seed: int = 0
    data_seed: int = 0               # the dataset's own draws (digits' train/test split, the --max-*-samples subsets):
                                     # fixed while seed varies, so `fedhq run --seed N` is seed N of a bench or study
    replicate: int = 0               # > 0 re-draws only the clients' minibatch order (same shards, devices, samples,
                                     # initial weights): a replicate of the seed, to measure its SGD noise
    device: str = "auto"             # auto | cpu | cuda
    max_concurrency: int = 0         # concurrent client trainings; 0 = number of CPU cores
    clients_per_task: int = 0        # clients trained by one task; 0 = auto (one task per worker), 1 = per client
    server_tasks: bool = False       # allocate/aggregate/evaluate as Prefect tasks too (else plain calls in the flow)
    eval_every: int = 1
    eval_tail: int = 0               # also evaluate every round of the last N rounds (a run's tail, read densely)
    test_every: int = 0              # the test split only every N rounds (a multiple of eval_every; and in the tail);
                                     # the rounds between evaluate the validation split alone; 0 = at every evaluation
    dask_address: str | None = None  # tcp://host:8786: train clients on this Dask cluster (prefect-dask)
    dask_local: int = 0              # >0: start a LocalCluster of this many worker processes
    # --- failure handling -----------------------------------------------------------------
    client_timeout_s: float = 0.0    # a client's update arriving later than this (wall s) is dropped; 0 = no limit
    min_clients: int = 1             # fewer accepted updates: the round is retried, then the run stops
    round_retries: int = 1           # re-sampled attempts of a round that got fewer than min_clients
    task_retries: int = 0            # Prefect retries of a failed training task (transient failures)
    task_retry_delay_s: float = 0.0
    max_upload_factor: float = 2.0   # an upload over this x the FP32 model's size is rejected
    norm_bound: float = 3.0          # [design] an update whose L2 norm per local step is over this x the round's median is rejected
                                     # (reason "norm"; 0 = off; needs 3 or more uploads); activation ranges, QAT steps
                                     # and BatchNorm statistics beyond this x the round's median (or the server's last
                                     # value) are left out of their aggregate
    share_label_histograms: bool = True   # each client sends its label histogram once (priced), for SigAcc's shard
                                          # features; false: the allocator reads only the sample counts uploads carry
    aggregation: str = "fedavg"      # fedavg | trimmed-mean | median (coordinate-wise, robust to poisoned updates)
    server_momentum: float = 0.0     # FedAvgM (Hsu et al. 2019, Flower's FedAvgM): the server's momentum on the
                                     # pseudo-gradient (old master - FedAvg's); 0 = FedAvg
    server_lr: float = 1.0           # FedAvgM's server learning rate (1 - server_momentum keeps FedAvg's effective
                                     # step: the momentum then only filters the round-to-round client sampling noise)
    server_average: float = 0.0      # SWA on the server (Izmailov et al. 2018; in FL, Caldarola et al. 2022): over this
                                     # last share of the rounds the deployed model is the uniform running average of the
                                     # masters (clients still train from the latest); 0 = the latest master
    trim_fraction: float = 0.2       # [design] trimmed-mean: share of the uploads cut at each end, per coordinate
    fault_rate: float = 0.0          # fault injection: share of client tasks that misbehave
    fault_kinds: list[str] = field(default_factory=lambda: ["raise", "nan", "inf", "shape", "dtype", "size"])
    # --- checkpoints ----------------------------------------------------------------------
    checkpoint: bool = True          # after every round, to <state_dir>/runs/<run id>/checkpoints
    checkpoint_keep: int = 3         # newest checkpoints kept on disk (older good ones are the fallback)
    checkpoint_log_every: int = 5    # log the checkpoint to MLflow every N rounds (0 = never)
    # --- tracking -----------------------------------------------------------------------
    tracking: bool = True
    tracking_uri: str | None = None  # default from mlflow.yaml
    experiment: str | None = None
    registered_model: str | None = None
    state_dir: str = ".fedhq"

    # ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as FedHQ writes it anywhere (checkpoints, summaries, Prefect parameters,
        MLflow): the URIs without their credentials (:func:`redact_uri`). A redacted tracking URI
        takes its credentials from ``MLFLOW_TRACKING_URI`` again (``tasks.tracking``)."""
        return {**self.to_dict(), "tracking_uri": redact_uri(self.tracking_uri),
                "dask_address": redact_uri(self.dask_address)}

    def round_lr(self, rnd: int) -> float:
        """The clients' learning rate in round ``rnd`` (0-based): ``lr``, or with ``cosine`` the
        half-cosine from ``lr`` in the first round to the floor ``lr x lr_final``, reached in the
        last round or, with ``lr_hold``, that share of the rounds before the end and held."""
        import math

        span = max(1, round(self.rounds * (1 - self.lr_hold)) - 1)   # rounds from lr to the floor
        if self.lr_schedule == "constant" or self.rounds == 1:
            return self.lr
        floor = self.lr * self.lr_final
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * min(rnd, span) / span))

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return validate(dataclasses.replace(self, **changes))


FIELD_NAMES = tuple(f.name for f in fields(ExperimentConfig))

# Per-dataset defaults for keys the user leaves unset, so that a bare
# `fedhq run --dataset cifar10-folder --data-dir ...` finishes in minutes on 2 CPU cores.
# Any of them can be overridden by YAML or flags (e.g. --max-train-samples 0 for all images).
_IMAGE_DEFAULTS = {"max_train_samples": 10000, "max_test_samples": 2000, "batch_size": 32, "rounds": 10,
                   "local_epochs": 1, "min_shard_size": 32}
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {},
    "cifar10-folder": _IMAGE_DEFAULTS, "image-folder": _IMAGE_DEFAULTS, "cifar10": _IMAGE_DEFAULTS, "cifar100": _IMAGE_DEFAULTS,
    "svhn": _IMAGE_DEFAULTS,
}


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("typing.", "")


def _coerce(name: str, ftype: str, value: Any) -> Any:
    """Coerce a YAML/CLI value to the field's declared type, or raise ConfigError."""
    if value is None:
        if "None" in ftype:
            return None
        raise ConfigError(f"{name}: must not be empty")
    try:
        if ftype.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if ftype.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if ftype.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if ftype.startswith("str"):
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
        if ftype.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): float(v) for k, v in value.items()}
        if ftype.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            if "str" in ftype:
                return [str(v).strip() for v in value]
            return [int(v) for v in value]
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{name}: expected {ftype.split(' ')[0]}, got {value!r}")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every field's range; return ``cfg`` or raise ConfigError naming the field."""
    _validate_run(cfg)
    _validate_clock(cfg)
    _validate_execution(cfg)
    return cfg


def _validate_run(cfg: ExperimentConfig) -> None:
    """Data, model, training, quantization and strategy fields."""

    _check(cfg.dataset in DATASETS or is_spec(cfg.dataset), "dataset",
           f"unknown dataset {cfg.dataset!r} (choose from {', '.join(DATASETS)}, or package.module:loader)")
    _check(cfg.model in MODELS or is_spec(cfg.model), "model",
           f"unknown model {cfg.model!r} (choose from {', '.join(MODELS)}, or package.module:factory)")
    _check(cfg.partition in PARTITIONS, "partition", f"unknown partition {cfg.partition!r} (choose from {', '.join(PARTITIONS)})")
    _check(cfg.strategy in STRATEGIES, "strategy", f"unknown strategy {cfg.strategy!r} (choose from {', '.join(STRATEGIES)})")
    for name in ("w_bits", "a_bits"):
        _check(2 <= getattr(cfg, name) <= 8, name, f"must be in 2..8, got {getattr(cfg, name)}")
    _check(cfg.upload_bits in UPLOAD_BITS, "upload_bits", f"must be 2..8, 16 or 32, got {cfg.upload_bits}")
    _check(cfg.first_last_bits == 0 or 2 <= cfg.first_last_bits <= 8, "first_last_bits", "must be 0 or in 2..8")
    _check(cfg.rounds >= 1, "rounds", f"must be >= 1, got {cfg.rounds}")
    _check(cfg.clients >= 1, "clients", f"must be >= 1, got {cfg.clients}")
    _check(0.0 < cfg.fraction <= 1.0, "fraction", f"must be in (0, 1], got {cfg.fraction}")
    _check(cfg.local_epochs >= 1, "local_epochs", f"must be >= 1, got {cfg.local_epochs}")
    _check(cfg.batch_size >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
    _check(cfg.lr > 0, "lr", "must be > 0")
    _check(cfg.lr_schedule in LR_SCHEDULES, "lr_schedule",
           f"unknown schedule {cfg.lr_schedule!r} (choose from {', '.join(LR_SCHEDULES)})")
    _check(0 <= cfg.lr_final <= 1, "lr_final", "must be in [0, 1]")
    _check(0 <= cfg.lr_hold < 1, "lr_hold", "must be in [0, 1)")
    _check(0 <= cfg.val_fraction < 0.5, "val_fraction", "must be in [0, 0.5)")
    _check(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)")
    _check(cfg.alpha > 0, "alpha", f"must be > 0, got {cfg.alpha}")
    _check(cfg.classes_per_client >= 1, "classes_per_client", "must be >= 1")
    _check(cfg.min_shard_size >= 1, "min_shard_size", "must be >= 1")
    _check(0 < cfg.test_fraction < 1, "test_fraction", "must be in (0, 1)")
    _check(cfg.max_train_samples >= 0, "max_train_samples", "must be >= 0")
    _check(cfg.max_test_samples >= 0, "max_test_samples", "must be >= 0")
    _check(cfg.server_calib_size >= 1, "server_calib_size", "must be >= 1")
    _check(0.0 <= cfg.xi <= 1.0, "xi", f"must be in [0, 1], got {cfg.xi}")
    _check(cfg.qat_share <= 1.0, "qat_share", "must be <= 1 (negative = automatic)")
    _check(cfg.adjust_every >= 1, "adjust_every", "must be >= 1")
    _check(cfg.max_stretch >= 1.0, "max_stretch", "must be >= 1 (1: free QAT only)")
    _check(cfg.pilot_rounds >= 0, "pilot_rounds", "must be >= 0 (0: the whole run)")
    _check(cfg.significance in ("auto", "setting", "online", "none"), "significance",
           "must be auto, setting, online or none")
    _check(cfg.online_statistic in ("tcp", "accuracy"), "online_statistic", "must be tcp or accuracy")
    _check(cfg.explore in ("mixed", "fork"), "explore", "must be mixed or fork")
    _check(0.5 <= cfg.fedfq_avg_bits <= 16, "fedfq_avg_bits", "must be in [0.5, 16]")
    _check(cfg.fedfq_iters >= 1, "fedfq_iters", "must be >= 1")
    _check(50 < cfg.ptq_act_percentile <= 100, "ptq_act_percentile", "must be in (50, 100]")
    _check(cfg.calib_batches >= 1, "calib_batches", "must be >= 1")
    _check(0 <= cfg.ema_momentum < 1, "ema_momentum", "must be in [0, 1)")
    _check(0 <= cfg.qat_step_lr_scale <= 1, "qat_step_lr_scale", "must be in [0, 1]")


def _validate_clock(cfg: ExperimentConfig) -> None:
    """The simulated fleet and clock, and the host profile."""
    _check(cfg.jitter_sigma >= 0, "jitter_sigma", "must be >= 0")
    _check(0 <= cfg.throttle_prob <= 1, "throttle_prob", "must be in [0, 1]")
    _check(cfg.throttle_factor >= 1, "throttle_factor", "must be >= 1")
    _check(len(cfg.profile_batch_sizes) >= 2 and all(b >= 1 for b in cfg.profile_batch_sizes),
           "profile_batch_sizes", "needs at least two positive batch sizes")
    _check(cfg.profile_reps >= 1, "profile_reps", "must be >= 1")
    _check(cfg.profile_file is None or Path(cfg.profile_file).is_file(), "profile_file",
           f"file not found: {cfg.profile_file}")


def _validate_execution(cfg: ExperimentConfig) -> None:
    """Execution, failure handling, checkpoints, the fleet's devices and the data folder."""
    from .hardware.catalog import DEVICES  # local import: catalog is data only

    _check(cfg.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    _check(cfg.replicate >= 0, "replicate", "must be >= 0")
    _check(cfg.max_concurrency >= 0, "max_concurrency", "must be >= 0")
    _check(cfg.clients_per_task >= 0, "clients_per_task", "must be >= 0")
    _check(cfg.eval_every >= 1, "eval_every", "must be >= 1")
    _check(cfg.eval_tail >= 0, "eval_tail", "must be >= 0")
    _check(cfg.test_every >= 0 and cfg.test_every % cfg.eval_every == 0, "test_every",
           f"must be 0 or a multiple of eval_every ({cfg.eval_every})")
    _check(cfg.test_every == 0 or cfg.val_fraction > 0, "test_every", "needs a validation split (val_fraction > 0)")
    _check(cfg.dask_local >= 0, "dask_local", "must be >= 0")
    _check(not (cfg.dask_local and cfg.dask_address), "dask_address", "give either dask_address or dask_local, not both")
    _check(cfg.dask_address is None or "://" in cfg.dask_address, "dask_address",
           f"expected a scheduler address like tcp://host:8786, got {cfg.dask_address!r}")
    _check(cfg.client_timeout_s >= 0, "client_timeout_s", "must be >= 0 (0 = no limit)")
    _check(cfg.min_clients >= 1, "min_clients", "must be >= 1")
    _check(cfg.min_clients <= max(1, int(round(cfg.fraction * cfg.clients))), "min_clients",
           f"must not exceed the clients sampled per round ({max(1, int(round(cfg.fraction * cfg.clients)))})")
    _check(cfg.round_retries >= 0, "round_retries", "must be >= 0")
    _check(cfg.task_retries >= 0, "task_retries", "must be >= 0")
    _check(cfg.task_retry_delay_s >= 0, "task_retry_delay_s", "must be >= 0")
    _check(cfg.max_upload_factor >= 1, "max_upload_factor", "must be >= 1")
    _check(cfg.norm_bound == 0 or cfg.norm_bound >= 1, "norm_bound", "must be 0 (off) or >= 1")
    _check(isinstance(cfg.share_label_histograms, bool), "share_label_histograms",
           f"must be true or false, got {cfg.share_label_histograms!r}")
    _check(cfg.aggregation in AGGREGATIONS, "aggregation",
           f"unknown aggregation {cfg.aggregation!r} (choose from {', '.join(AGGREGATIONS)})")
    _check(0 <= cfg.server_momentum < 1, "server_momentum", "must be in [0, 1)")
    _check(0 < cfg.server_lr <= 1, "server_lr", "must be in (0, 1]")
    _check(0 <= cfg.server_average < 1, "server_average", "must be in [0, 1)")
    _check(0 <= cfg.trim_fraction < 0.5, "trim_fraction", "must be in [0, 0.5)")
    _check(0 <= cfg.fault_rate <= 1, "fault_rate", f"must be in [0, 1], got {cfg.fault_rate}")
    _check(bool(cfg.fault_kinds) or cfg.fault_rate == 0, "fault_kinds", "must name at least one kind when fault_rate > 0")
    for kind in cfg.fault_kinds:
        _check(kind in FAULT_KINDS, "fault_kinds", f"unknown kind {kind!r} (choose from {', '.join(FAULT_KINDS)})")
    _check(not (cfg.fault_rate > 0 and "stall" in cfg.fault_kinds and cfg.client_timeout_s <= 0), "fault_kinds",
           "stall needs client_timeout_s > 0")
    _check(cfg.checkpoint_keep >= 1, "checkpoint_keep", "must be >= 1")
    _check(cfg.checkpoint_log_every >= 0, "checkpoint_log_every", "must be >= 0 (0 = never)")
    _check(bool(cfg.fleet), "fleet", "must name at least one device class")
    for name, share in cfg.fleet.items():
        _check(name in DEVICES, "fleet", f"unknown device class {name!r} (see fedhq_core/hardware/catalog.py)")
        _check(share >= 0, "fleet", f"share of {name!r} must be >= 0")
    _check(sum(cfg.fleet.values()) > 0, "fleet", "shares must not all be zero")
    _check(cfg.server_device in DEVICES, "server_device",
           f"unknown device class {cfg.server_device!r} (see fedhq_core/hardware/catalog.py)")
    if cfg.family_file is not None:
        _check(Path(cfg.family_file).is_file(), "family_file", f"file not found: {cfg.family_file}")
    if cfg.dataset == "digits":
        pass
    elif is_spec(cfg.dataset):   # the user's loader reads what it likes; a data_dir is passed if given
        if cfg.data_dir is not None:
            _check(Path(cfg.data_dir).exists(), "data_dir", f"not found: {cfg.data_dir}")
    else:
        _check(cfg.data_dir is not None, "data_dir", f"dataset {cfg.dataset!r} needs --data-dir")
        if not cfg.download:
            _check(Path(cfg.data_dir).is_dir(), "data_dir", f"directory not found: {cfg.data_dir}")


def from_mapping(values: dict[str, Any], base: ExperimentConfig | None = None, source: str = "config") -> ExperimentConfig:
    """Build a validated config from ``base`` updated with ``values`` (unknown keys rejected)."""
    types = {f.name: _type_name(f) for f in fields(ExperimentConfig)}
    cfg = dataclasses.replace(base) if base is not None else ExperimentConfig()
    if base is None and values.get("dataset") in DATASET_DEFAULTS:
        for key, value in DATASET_DEFAULTS[values["dataset"]].items():
            setattr(cfg, key, value)
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{key}: unknown key in {source}")
        setattr(cfg, key, _coerce(key, types[key], value))
    return validate(cfg)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a syntax error raises ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: YAML syntax error{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys")
    return data


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """YAML file (optional) then CLI overrides (``None`` values are ignored)."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    for source, mapping in ((str(path), values), ("flags", flags)):
        unknown = [k for k in mapping if k not in FIELD_NAMES]
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown key in {source}")
    return from_mapping({**values, **flags})


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without its credentials: ``user:password@`` becomes ``***@`` and the values of
    query parameters that carry secrets (token, key, secret, password, signature) ``***``."""
    import re

    if not uri:
        return uri
    out = re.sub(r"(://)[^/@\s]+@", r"\1***@", uri)
    return re.sub(r"([?&](?:[\w.-]*(?:token|key|secret|password|passwd|pwd|signature|sig|auth)[\w.-]*)=)[^&#\s]*",
                  r"\1***", out, flags=re.IGNORECASE)
