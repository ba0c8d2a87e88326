"""What runs where the clients train: a thread of this process or a Dask worker process.

A training task gets plain data only: the round's :class:`RoundInputs` (model spec, global
weights, ranges and steps as tensors; on Dask scattered once per round to every worker) and a
list of :class:`ClientJob` (the client's shard as a :class:`ShardRef`, indices into the train
split that a Dask worker loads once, plus its :class:`~fedhq_core.client.TrainSpec`). It returns
one :class:`Upload` per client, whose result is ``bytes`` (``fedhq_core.wire``), so nothing
travels through files and nothing the server decodes can run code.

One client's failure never takes its task-mates down: an exception becomes an ``Upload`` with
``error`` set. Fault injection (``fault_rate``/``fault_kinds``) happens here, on the client's
side, so the server's defences are exercised exactly as a real misbehaving client would.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .client import Mode, TrainSpec, train_client
from .models.spec import ModelSpec
from .phases import span
from .quant import get_weight_steps, init_weight_steps, load_model_state
from .wire import save_wire, to_wire


_POOLS: dict[tuple[ModelSpec, str], queue.SimpleQueue] = {}
_POOLS_LOCK = threading.Lock()


@contextlib.contextmanager
def borrow_model(spec: ModelSpec, device: torch.device) -> Iterator[nn.Module]:
    """A model from this process's pool: built once per concurrent slot, never per client.
    Training overwrites every weight, buffer, range and step it uses, so reuse is safe."""
    key = (spec, str(device))
    with _POOLS_LOCK:
        pool = _POOLS.setdefault(key, queue.SimpleQueue())
    try:
        m = pool.get_nowait()
    except queue.Empty:
        m = spec.build(device)
    try:
        yield m
    finally:
        pool.put(m)


def worker_device(requested: str, slot: int | None = None) -> torch.device:
    """The device a worker trains on. ``auto``/``cuda`` on a machine with GPUs: worker ``slot``
    (its index in a LocalCluster) takes GPU ``slot % count``, so N local workers spread over the
    GPUs; a worker started with ``CUDA_VISIBLE_DEVICES=i`` sees one GPU and takes it."""
    if requested == "cpu" or not torch.cuda.is_available():
        if requested == "cuda":
            raise ValueError("device: cuda requested but this worker has no CUDA device")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    return torch.device(f"cuda:{(slot or 0) % count}")


@dataclass(eq=False)
class RoundInputs:
    """What every client of a round starts from (shared by all of the round's tasks)."""

    model: ModelSpec
    device: str
    global_state: dict[str, torch.Tensor]
    global_ranges: dict[str, tuple[float, float]] | None
    global_steps: dict[str, torch.Tensor] | None
    warm: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # see warm_steps()


_WARM_LOCK = threading.Lock()


def warm_steps(inputs: RoundInputs, model: nn.Module) -> dict[str, torch.Tensor]:
    """The QAT warm start of a round without learned steps: MSE-optimal weight steps of the
    global weights. It is the same for every client of the round, so this process computes it
    once per round (kept on the round's inputs); every client is still billed for the search."""
    with _WARM_LOCK:
        if inputs.warm is None:
            load_model_state(model, inputs.global_state)
            init_weight_steps(model)
            inputs.warm = get_weight_steps(model)
        return inputs.warm


@dataclass(frozen=True)
class DataKey:
    """The config fields that name, subsample and cache a dataset: any process (a Dask worker
    too) that loads with this key gets the very same train split."""

    dataset: str
    data_dir: str | None
    download: bool
    seed: int
    test_fraction: float
    max_train: int
    max_test: int
    cache_dir: str

    def load(self):
        from .data import load_dataset

        ds = load_dataset(self.dataset, self.data_dir, download=self.download, seed=self.seed,
                          test_fraction=self.test_fraction, max_train=self.max_train, max_test=self.max_test,
                          cache_dir=self.cache_dir)
        ds.source = self
        return ds


_TRAIN: dict[DataKey, Any] = {}
_TRAIN_LOCK = threading.Lock()


def train_split(key: DataKey) -> Any:
    """The train split of ``key``, loaded once per process (a Dask worker) and kept."""
    with _TRAIN_LOCK:
        if key not in _TRAIN:
            _TRAIN.clear()          # one dataset per worker
            _TRAIN[key] = key.load().train
        return _TRAIN[key]


def prepare_worker(key: DataKey, spec: ModelSpec) -> str:
    """Load the dataset of ``key`` and build a pooled model in this process (a Dask worker as a
    run starts: ``tasks.training.warm_up``), so round 0 does not pay for it."""
    train_split(key)
    with borrow_model(spec, worker_device("auto" if torch.cuda.is_available() else "cpu")):
        pass
    return WORKER_ID


class ShardRef:
    """A client's shard: sorted indices into the train split of ``key``. Its images are read
    (copied) on access, so a run holds the train split once. In the run's own process it reads
    the run's split directly; pickled (to a Dask worker) it travels as the key and the indices
    only, and the worker reads its own once-loaded copy of the same split."""

    def __init__(self, key: DataKey, idx: np.ndarray, split: Any = None):
        self.key, self.idx, self.split = key, np.asarray(idx, dtype=np.int64), split
        self.n_train = len(split) if split is not None else -1

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key, "idx": self.idx, "split": None, "n_train": self.n_train}

    def __len__(self) -> int:
        return len(self.idx)

    def _split(self) -> Any:
        split = self.split if self.split is not None else train_split(self.key)
        if self.n_train >= 0 and len(split) != self.n_train:
            raise RuntimeError(f"this worker's {self.key.dataset} train split has {len(split)} samples, the "
                               f"run's {self.n_train}: give the workers the same data_dir")
        return split

    @property
    def x(self) -> torch.Tensor:
        return self._split().x[torch.from_numpy(self.idx)]

    @property
    def y(self) -> torch.Tensor:
        return self._split().y[torch.from_numpy(self.idx)]

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        split, idx = self._split(), torch.from_numpy(self.idx)
        return split.x[idx], split.y[idx]


@dataclass
class ClientJob:
    rnd: int
    cid: int
    shard: ShardRef
    spec: TrainSpec
    fault: str | None = None        # injected misbehaviour (see FAULT_KINDS in config)
    timeout_s: float = 0.0          # the stall fault sleeps past this
    shadow: TrainSpec | None = None  # paired measurement: the same client, the other mode, the same start


@dataclass
class Upload:
    cid: int
    data: bytes | None              # wire-encoded ClientResult, None when the client failed
    error: str | None = None        # why there is no data (exception type and message)
    wall_s: float = 0.0             # wall time from the task picking the job up to the upload
    worker: str = ""                # host:pid that trained it
    shadow: bytes | None = None     # the shadow job's wire-encoded result (ClientJob.shadow)


WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class InjectedFault(RuntimeError):
    """The ``raise`` fault: a client that crashes before it trains."""


def draw_fault(seed: int, rnd: int, cid: int, attempt: int, rate: float, kinds: list[str]) -> str | None:
    """Seeded per (round, client, attempt): whether and how a client misbehaves."""
    if rate <= 0 or not kinds:
        return None
    rng = np.random.default_rng([seed, 7919, rnd, cid, attempt])
    if rng.random() >= rate:
        return None
    return kinds[int(rng.integers(len(kinds)))]


POISON_FACTORS = {"scale": 100.0, "signflip": -4.0}   # poisoned updates: the honest update times this
POISON_SIDE = 1e6   # ``ranges`` / ``steps``: finite activation ranges / QAT weight steps times this
CORRUPTIONS = ("nan", "inf", "shape", "dtype", "size", *POISON_FACTORS, "ranges", "steps")   # made on the wire


def corrupt(wire: dict, kind: str) -> dict:
    """Turn a valid upload into the kind of garbage ``kind`` names (the payload stays decodable)."""
    meta = json.loads(wire["meta"])
    name = next(iter(meta["tensors"]))
    spec = meta["tensors"][name]
    if kind in ("nan", "inf"):
        bad = float("nan") if kind == "nan" else float("inf")
        if spec["bits"] >= 16:
            vals = torch.full((wire["data"][name].numel() * 8 // spec["bits"],), bad,
                              dtype=torch.float16 if spec["bits"] == 16 else torch.float32)
            wire["data"][name] = torch.frombuffer(bytearray(vals.numpy().tobytes()), dtype=torch.uint8)
        else:
            wire["scale"][name] = torch.full_like(wire["scale"][name], bad)
    elif kind == "shape":
        spec["shape"] = [spec["shape"][0] + 1, *spec["shape"][1:]]
    elif kind == "dtype":
        wire["scale"][name] = wire["scale"][name].double()
    elif kind == "size":
        floats = sum(math.prod(t["shape"]) for t in meta["tensors"].values())
        wire["data"]["padding"] = torch.zeros(12 * floats + (1 << 20), dtype=torch.uint8)  # 3x the FP32 model
    elif kind in POISON_FACTORS:   # a well-formed, finite update, scaled: every check but the norm passes
        factor = POISON_FACTORS[kind]
        for t, spec_t in meta["tensors"].items():
            if spec_t["bits"] >= 16:
                dtype = torch.float16 if spec_t["bits"] == 16 else torch.float32
                vals = torch.frombuffer(bytearray(wire["data"][t].numpy().tobytes()), dtype=dtype) * factor
                wire["data"][t] = torch.frombuffer(bytearray(vals.numpy().tobytes()), dtype=torch.uint8)
            else:
                wire["scale"][t] = wire["scale"][t] * factor
    elif kind == "ranges":         # finite, well-formed, and a deployed layer quantized to noise
        meta["act_ranges"] = {k: [lo * POISON_SIDE, hi * POISON_SIDE] for k, (lo, hi) in meta["act_ranges"].items()}
    elif kind == "steps":          # a QAT client's learned steps (a PTQ client sends none to poison)
        wire["steps"] = {k: v * POISON_SIDE for k, v in wire["steps"].items()}
    wire["meta"] = json.dumps(meta)
    return wire


def run_job(inputs: RoundInputs, job: ClientJob, device: torch.device) -> Upload:
    t0 = time.perf_counter()
    try:
        if job.fault == "raise":
            raise InjectedFault(f"client {job.cid} crashed (injected fault)")
        if job.fault == "stall":
            time.sleep(job.timeout_s * 1.2 + 0.05)
        x, y = job.shard.read()
        results = []
        with borrow_model(inputs.model, device) as model:
            for spec in [job.spec] + ([job.shadow] if job.shadow is not None else []):
                warm = warm_steps(inputs, model) if spec.strategy == Mode.QAT and not inputs.global_steps else None
                results.append(train_client(model, job.cid, x, y, inputs.global_state, inputs.global_ranges,
                                            spec, inputs.global_steps, warm))
        with span("pack (wire)", job.rnd):
            wire = to_wire(results[0])
        if job.fault in CORRUPTIONS:
            wire = corrupt(wire, job.fault)
        with span("pack (wire)", job.rnd):
            data = save_wire(wire)
            shadow = save_wire(to_wire(results[1])) if len(results) > 1 else None
        return Upload(job.cid, data, None, time.perf_counter() - t0, WORKER_ID, shadow)
    except Exception as err:  # noqa: BLE001 - one client's failure is reported, not propagated
        return Upload(job.cid, None, f"{type(err).__name__}: {str(err)[:200]}", time.perf_counter() - t0, WORKER_ID)


def run_jobs(inputs: RoundInputs, jobs: list[ClientJob], slot: int | None = None) -> list[Upload]:
    """Train ``jobs`` one after another on one borrowed model (one task's work)."""
    with span("train-clients body", jobs[0].rnd if jobs else None):
        return _run_jobs(inputs, jobs, slot)


def _run_jobs(inputs: RoundInputs, jobs: list[ClientJob], slot: int | None) -> list[Upload]:
    device = worker_device(inputs.device, slot)
    if device.type != "cpu" or any(v.device.type != "cpu" for v in inputs.global_state.values()):
        inputs = RoundInputs(inputs.model, inputs.device,  # (a copy per task: its own warm start)
                             {k: v.to(device) for k, v in inputs.global_state.items()}, inputs.global_ranges,
                             {k: v.to(device) for k, v in (inputs.global_steps or {}).items()} or None)
    return [run_job(inputs, job, device) for job in jobs]


def expected_upload_limit(state: dict[str, torch.Tensor], factor: float) -> int:
    """Bytes above which an upload is absurd: ``factor`` x the FP32 model, plus header room."""
    fp32 = sum(4 * v.numel() for v in state.values() if v.is_floating_point())
    return int(math.ceil(factor * fp32)) + (256 << 10)
