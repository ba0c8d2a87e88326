"""Step kinds a client runs, traced op by op and timed on this host.

:func:`step_runner` prepares a model for one step kind and returns the very function the client
runs for it (``client.train_step``, ``client.correct_count``, the weight-scale search,
``quant.pack_update``), so what is traced and timed is what clients execute.

* :class:`TraceBook` traces each kind on the CPU (deterministic: counts depend on shapes only)
  and caches the traces, in memory and, given a folder, on disk (keyed by the model, the torch
  version and this package's source, so any code change re-traces); train and forward steps are
  traced at two batch sizes and extrapolated linearly, calibration at the batch sizes actually
  used (its quantile subsample is not linear).
* :func:`measure_kinds` times every kind at several batch sizes with the reps *interleaved*
  (kind after kind inside each rep), so load drift on the host hits every kind alike, and keeps
  every rep so that ratios can be taken pair by pair.
* :func:`measure_host_peaks` measures this host's matmul FLOP/s and copy bandwidth, the peaks
  against which the host's efficiencies are fitted (``speed_model.fit_host``).
"""
from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..client import STEP_KINDS
from .server_work import AGG_KINDS, SERVER_KINDS, server_runner
from .trace import LinearTrace, StepTrace, trace

# fp32/qat: train steps; fwd: forward-only evaluation (deployed, quantized); calib: PTQ
# calibration forward (percentile observers); wsearch: PTQ/LSQ weight-scale search; pack: upload.
KINDS = STEP_KINDS
LINEAR_KINDS = ("fp32", "qat", "fwd")
BATCH_FREE_KINDS = ("wsearch", "pack")
_LINEAR_POINTS = (2, 4)


def step_runner(model: nn.Module, kind: str, batch: int, in_shape: tuple[int, ...], num_classes: int,
                upload_bits: int = 8, seed: int = 0) -> Callable[[], object]:
    """Prepare ``model`` for ``kind`` in its steady state (one warm-up step run) and return the
    client's own function for one more step. For ``pack``, ``batch`` is ignored and
    ``upload_bits`` is the width packed."""
    from ..client import TrainSpec, correct_count, make_optimizer, train_step
    from ..quant import (get_act_ranges, init_weight_steps, model_state, pack_update, prepare_deploy,
                         reset_act_ranges, set_mode)

    if kind in SERVER_KINDS:
        return server_runner(model, kind, batch, in_shape, num_classes, upload_bits, seed)
    g = torch.Generator().manual_seed(seed)
    b = max(1, batch)
    x = torch.randn(b, *in_shape, generator=g)
    y = torch.randint(0, num_classes, (b,), generator=g)
    idx = torch.arange(b)
    if kind in ("fp32", "qat"):
        if kind == "qat":
            init_weight_steps(model)
            reset_act_ranges(model)
        set_mode(model, kind if kind == "qat" else "fp")
        model.train()
        opt = make_optimizer(model, TrainSpec(kind, 1, b, lr=0.0))
        loss_sum = torch.zeros(())
        fn: Callable[[], object] = lambda: train_step(model, opt, x, y, idx, loss_sum)  # noqa: E731
    elif kind in ("fwd", "calib"):
        model.eval()
        reset_act_ranges(model)
        set_mode(model, "observe")
        correct_count(model, x, y)
        if kind == "fwd":
            prepare_deploy(model, get_act_ranges(model))
        fn = lambda: correct_count(model, x, y)  # noqa: E731
    elif kind == "wsearch":
        fn = lambda: init_weight_steps(model)  # noqa: E731
    elif kind == "pack":
        set_mode(model, "fp")
        local = {k: v.detach() for k, v in model_state(model).items()}
        glob = {k: v.clone() for k, v in local.items()}
        fn = lambda: pack_update(local, glob, upload_bits, g, {}, n_samples=b)  # noqa: E731
    else:
        raise ValueError(f"kind: unknown step kind {kind!r}")
    fn()
    return fn


class TraceBook:
    """Op traces of every step kind for one model shape, built on demand on the CPU and cached."""

    def __init__(self, build: Callable[[], nn.Module], in_shape: tuple[int, ...], num_classes: int,
                 cache_dir: str | os.PathLike | None = None, model_key: str = ""):
        self._build = build
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes
        self._linear: dict[str, LinearTrace] = {}
        self._exact: dict[tuple[str, int], StepTrace] = {}
        self._lock = threading.Lock()
        self._cache = Path(cache_dir) if cache_dir and model_key else None
        self._key = model_key

    def _cache_path(self, kind: str, batch: int, bits: int) -> Path | None:
        if self._cache is None:
            return None
        key = hashlib.sha256(repr((self._key, self.in_shape, self.num_classes, kind, batch, bits, torch.__version__,
                                   source_digest())).encode()).hexdigest()[:24]
        return self._cache / f"trace-{kind}-{key}.npz"

    def _trace(self, kind: str, batch: int, bits: int = 8) -> StepTrace:
        path = self._cache_path(kind, batch, bits)
        if path is not None and path.is_file():
            try:
                return load_trace(path)
            except Exception:  # noqa: BLE001 - a damaged cache file is traced afresh and rewritten
                pass
        model = self._build()      # a fresh CPU model per trace: nothing carries over between kinds
        fn = step_runner(model, kind, batch, self.in_shape, self.num_classes, upload_bits=bits)
        t = trace(kind, batch, fn)
        if path is not None:
            save_trace(path, t)
        return t

    def get(self, kind: str, batch: int) -> StepTrace:
        """The trace of one ``kind`` step at ``batch`` (for ``pack`` and the server's aggregation
        kinds: ``batch`` = upload bits; for the server's proxy kinds: the proxy split's size)."""
        with self._lock:
            if kind in LINEAR_KINDS:
                if kind not in self._linear:
                    lo, hi = (self._trace(kind, b) for b in _LINEAR_POINTS)
                    self._linear[kind] = LinearTrace.fit(lo, hi)
                return self._linear[kind].at(batch)
            key = (kind, 0 if kind == "wsearch" else batch)
            if key not in self._exact:
                self._exact[key] = (self._trace(kind, 0, bits=batch) if kind == "pack" or kind in AGG_KINDS
                                    else self._trace(kind, key[1]))
            return self._exact[key]

    def step(self, kind: str, batch: int, upload_bits: int = 8) -> StepTrace:
        """One step of ``kind`` at ``batch``; packing is traced at ``upload_bits`` instead."""
        return self.get(kind, upload_bits if kind == "pack" else batch)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of this package's Python sources: any change to a model, quantizer or step re-traces."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def save_trace(path: Path, t: StepTrace) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
    np.savez(tmp, kind=np.array(t.kind), batch=np.array(t.batch), names=np.array(t.names, dtype=str),
             flops=t.flops, bytes=t.bytes, mm=t.mm, engine=t.engine, sync=t.sync, phase=np.array(t.phase, dtype=str))
    os.replace(tmp, path)


def load_trace(path: Path) -> StepTrace:
    with np.load(path, allow_pickle=False) as z:
        return StepTrace(str(z["kind"]), int(z["batch"]), z["names"].tolist(), z["flops"], z["bytes"], z["mm"],
                         z["engine"], z["sync"], z["phase"].tolist())


@dataclass
class Timing:
    kind: str
    batch: int
    reps: list[float]          # seconds, one per interleaved rep

    @property
    def seconds(self) -> float:
        s = sorted(self.reps)
        return s[len(s) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_kinds(build: Callable[[], nn.Module], in_shape: tuple[int, ...], num_classes: int,
                  kinds: tuple[str, ...], batches: list[int], reps: int,
                  device: torch.device = torch.device("cpu")) -> dict[tuple[str, int], Timing]:
    """Wall time of every (kind, batch), reps interleaved across kinds and batch sizes.
    Batch-free kinds are timed once per rep (key batch 0; ``pack`` at 8 bits)."""
    runners: dict[tuple[str, int], Callable[[], object]] = {}
    for kind in kinds:
        for b in ([0] if kind in BATCH_FREE_KINDS else batches):
            model = build().to(device)
            runners[(kind, b)] = step_runner(model, kind, b, in_shape, num_classes)
    out = {k: Timing(k[0], k[1], []) for k in runners}
    for _ in range(reps):
        for key, fn in runners.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out[key].reps.append(time.perf_counter() - t0)
    return out


def measure_host_peaks(device: torch.device = torch.device("cpu"), n: int = 512,
                       copy_mb: int = 64) -> tuple[float, float]:
    """Measured peak FP32 FLOP/s (square matmul) and memory bandwidth (large copy) of this host."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best_f = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best_f = min(best_f, time.perf_counter() - t0)
    src = torch.empty(copy_mb * 2**20 // 4, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best_c = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best_c = min(best_c, time.perf_counter() - t0)
    return 2 * n**3 / best_f, 2 * src.numel() * 4 / best_c
