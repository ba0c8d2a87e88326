"""Dispatch: who trains in a round and how their work goes out and comes back. The seeded
client sample, each client's job (shard, hyper-parameters, injected fault), the tasks the jobs
are split into, collecting the tasks' uploads, and the server's checks on every upload before
it may touch the master (``fedhq_core.wire``)."""
from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from .hardware.host_work import HostWork
from .allocation import Allocation, UplinkSearch
from .client import ClientResult, Mode, TrainSpec
from .config import ExperimentConfig
from .server import update_norm
from .server_state import ServerState
from .wire import RejectedUpdate, decode_upload
from .models.spec import ModelSpec
from .worker import ClientJob, RoundInputs, ShardRef, Upload, draw_fault, expected_upload_limit

DASK_TASKS = 16


def default_concurrency(cfg: ExperimentConfig) -> int:
    return cfg.max_concurrency or (os.cpu_count() or 1)


class Dispatch:
    """The round's outgoing jobs and incoming uploads for one run."""

    def __init__(self, cfg: ExperimentConfig, shards: list[ShardRef], server: ServerState, spec: ModelSpec,
                 on_device_sensitivity: bool, host_work: HostWork | None = None):
        self.cfg, self.shards, self.server, self.spec = cfg, shards, server, spec
        self.host_work = host_work if host_work is not None else HostWork()   # decoding is host work
        self.on_device_sensitivity = on_device_sensitivity
        self.norm_checks = 0          # update norms the last accept() computed (priced with the aggregation)
        self.waited: list[ClientResult] = []   # the last accept()'s decoded but rejected uploads: the round waited for them
        self.norm_ref = 0.0           # the median norm of the last accepted updates (the norm bound's cap)
        self.norm_refs: dict[str, float] = {}   # the same per training mode ("qat", "fp"), where a mode had 3+
        self.assigned: dict[int, str] = {}      # the last jobs' modes, as the server assigned them
        self.shadows: dict[int, str] = {}       # the last jobs' shadow modes (paired measurement)

    def sample(self, rnd: int, attempt: int = 0) -> list[int]:
        """Seeded client sample of a round; a retried round (``attempt`` > 0) draws afresh."""
        rng = np.random.default_rng([self.cfg.seed, 17, rnd] + ([attempt] if attempt else []))
        k = max(1, int(round(self.cfg.fraction * self.cfg.clients)))
        return sorted(rng.choice(self.cfg.clients, size=k, replace=False).tolist())

    def client_spec(self, rnd: int, cid: int, strategy: str, upload_bits: int | UplinkSearch | None = None,
                    max_samples: int | None = None) -> TrainSpec:
        """A client's job: its mode, this round's lr, and its uplink: the allocation's width for it,
        or a search of its own (``UplinkSearch``), else float32 for an FP32 client and
        ``upload_bits`` otherwise."""
        cfg = self.cfg
        fedfq = (upload_bits.avg_bits, upload_bits.iters) if isinstance(upload_bits, UplinkSearch) else None
        if upload_bits is None or fedfq:
            upload_bits = 32 if strategy == Mode.FP32 and not fedfq else cfg.upload_bits
        return TrainSpec(strategy, cfg.local_epochs, cfg.batch_size, cfg.round_lr(rnd), cfg.momentum, cfg.weight_decay,
                         upload_bits, cfg.calib_batches, self.on_device_sensitivity,
                         seed=int(np.random.default_rng([cfg.seed, 53, rnd, cid] + ([cfg.replicate] if cfg.replicate else [])
                                                        ).integers(2**62)), fedfq=fedfq,
                         step_lr_scale=cfg.qat_step_lr_scale, max_samples=max_samples)

    def round_inputs(self, qat_lineage: bool = False) -> RoundInputs:
        """What the round's clients start from: the master, or during a fork with ``qat_lineage``
        the QAT lineage's (``ServerState.lineage``)."""
        s = self.server
        with s.lineage(qat_lineage):
            return RoundInputs(self.spec, self.cfg.device, s.global_state, s.global_ranges, s.global_steps)

    def tasks(self, jobs: list[ClientJob]) -> list[tuple[RoundInputs, list[ClientJob]]]:
        """The round's jobs in :meth:`chunks`, each with the inputs its clients start from: during
        a fork the QAT clients the QAT lineage's master, the others the master."""
        if self.server.fork is None:
            inputs = self.round_inputs()
            return [(inputs, chunk) for chunk in self.chunks(jobs)]
        return [(self.round_inputs(qat), chunk) for qat in (False, True)
                for chunk in self.chunks([j for j in jobs if (j.spec.strategy == Mode.QAT) == qat])]

    def jobs(self, rnd: int, alloc: Allocation, sampled: list[int], attempt: int = 0) -> list[ClientJob]:
        """One job per sampled client: its shard, its spec and (if configured) its injected fault."""
        cfg = self.cfg
        self.assigned = {c: alloc.strategies[c] for c in sampled}
        self.shadows = {c: alloc.shadow[c] for c in sampled if c in alloc.shadow}
        # a shadow job starts from the same master with the same seed (the same minibatches): the
        # two uploads differ by their mode alone
        return [ClientJob(rnd, c, self.shards[c],
                          self.client_spec(rnd, c, alloc.strategies[c], alloc.upload_bits.get(c),
                                           alloc.max_samples.get(c)),
                          draw_fault(cfg.seed, rnd, c, attempt, cfg.fault_rate, cfg.fault_kinds), cfg.client_timeout_s,
                          self.client_spec(rnd, c, alloc.shadow[c]) if c in alloc.shadow else None)
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
        expected = {k: tuple(v.shape) for k, v in self.server.global_state.items() if v.is_floating_point()}
        limit = expected_upload_limit(self.server.global_state, self.cfg.max_upload_factor)
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
                with self.host_work.op("decode", 1) as op:   # counted in the tensors' bytes (the header's vary)
                    r = decode_upload(blob, expected, max_bytes=limit, max_samples=len(self.shards[up.cid]))
                    op.elements = r.upload_bytes
                if r.cid != up.cid:
                    raise RejectedUpdate("keys", f"claims to be client {r.cid}")
                self._attach_shadow(r, up, expected, limit)
                results.append(r)
            except RejectedUpdate as err:
                rejected[up.cid] = str(err)
        kept, rejected = self.bound_norms(sorted(results, key=lambda r: r.cid), rejected)
        # an upload rejected for its norm was received and decoded first: the round waited for it,
        # so the clock pays for its client's time like any other's
        self.waited = [r for r in results if r.cid in rejected]
        return kept, rejected

    def _attach_shadow(self, r: ClientResult, up: Upload, expected: dict[str, tuple[int, ...]], limit: int) -> None:
        """A paired measurement's second upload, decoded and checked like the first, kept on the
        result (``extra["shadow"]``: the clock charges its work and bytes, the server's paired
        comparison reads it; it never touches the master). One that fails a check is dropped."""
        if up.shadow is None or r.cid not in self.shadows:
            return
        blob, up.shadow = up.shadow, None
        try:
            with self.host_work.op("decode", 1) as op:
                s = decode_upload(blob, expected, max_bytes=limit, max_samples=len(self.shards[up.cid]))
                op.elements = s.upload_bytes
        except RejectedUpdate:
            return
        if s.cid == r.cid and s.strategy == self.shadows[r.cid] != r.strategy:
            r.extra["shadow"] = s

    def forget_norms(self) -> None:
        """Forget the norm bound's caps (the next round is bounded as a first round is)."""
        self.norm_ref, self.norm_refs = 0.0, {}

    def local_steps(self, n_samples: int) -> int:
        """The SGD steps a client runs on ``n_samples`` images (``client._sgd_epochs``)."""
        return self.cfg.local_epochs * max(1, math.ceil(n_samples / self.cfg.batch_size))

    def bound_norms(self, results: list[ClientResult], rejected: dict[int, str]
                    ) -> tuple[list[ClientResult], dict[int, str]]:
        """Reject (``norm``) every update whose L2 norm *per local SGD step* is over ``norm_bound``
        x a reference: the median of the round's decoded updates, but never above the previous
        round's accepted median (``norm_ref``), so a round where poisoned updates are the majority
        cannot lift the bound with them. A poisoned update scaled up passes every other check.
        Per step, because an honest update's norm grows with its client's steps (epochs x
        batches of its declared sample count, checked against its shard): on CIFAR-10 at
        Dirichlet 0.1 the shards hold 32 to 1,860 images, 1 to 59 steps, and the largest raw norm
        of ten honest updates was 4-13x their median, so a raw bound turned away the large
        shards, the accepted median fell, and its cap then turned away most of every round (6-9
        of 10 uploads in the last 10 rounds of a 50-round run). Per step the largest was
        1.3-2.3x the median (``python -m flows.norm_probe``, lr 0.05 and 0.001:
        ``docs/results.md``). With fewer than three updates there is no median to speak of, and
        nothing is bounded.

        Per training mode, where a mode (as the server assigned it: QAT, or FP32 training for PTQ
        and fp32) has three or more updates in the round: QAT's steps are smaller per step, so in
        a mixed round a pooled median sat below the FP32 updates and turned away honest PTQ
        uploads (5 in the last 10 rounds of one CIFAR-10 run at Dirichlet 0.1). Each mode's
        reference is capped by that mode's last accepted median, as the pooled one is."""
        bound = self.cfg.norm_bound
        self.norm_checks = len(results) if bound and len(results) >= 3 else 0
        if not self.norm_checks:
            return results, rejected
        norms = {r.cid: update_norm(r) / self.local_steps(r.n_samples) for r in results}
        mode = {r.cid: "qat" if self.assigned.get(r.cid, r.strategy) == Mode.QAT else "fp" for r in results}

        def reference(values: list[float], last: float) -> float:
            ref = float(np.median(values))
            return min(ref, last) if last else ref

        pooled = reference(list(norms.values()), self.norm_ref)
        refs = {m: reference(v, self.norm_refs.get(m, 0.0))
                for m in set(mode.values()) if len(v := [norms[c] for c in norms if mode[c] == m]) >= 3}
        for r in results:
            ref = refs.get(mode[r.cid], pooled)
            if norms[r.cid] > bound * ref:
                rejected[r.cid] = (f"norm: update norm per local step {norms[r.cid]:.3g} > {bound:g} x the "
                                   f"reference {ref:.3g}")
        kept = [r for r in results if r.cid not in rejected]
        if kept:
            self.norm_ref = float(np.median([norms[r.cid] for r in kept]))
        for m in refs:
            if len(ok := [norms[r.cid] for r in kept if mode[r.cid] == m]) >= 3:
                self.norm_refs[m] = float(np.median(ok))
        return kept, rejected


def _distributed_names(err: BaseException) -> set[str]:
    """The names of ``err``'s classes that Dask's ``distributed`` defines (read from the classes'
    modules, so ``fedhq_core`` needs no import of it)."""
    return {c.__name__ for c in type(err).__mro__ if c.__module__.split(".")[0] == "distributed"}


def worker_lost(err: BaseException) -> bool:
    """True when a task failed because the worker process running it died, not because the
    client's code raised: Dask gave up on it after rescheduling it
    ``distributed.scheduler.allowed-failures`` times (``KilledWorker``), lost the connection
    (``CommClosedError``), or cancelled it because its inputs were scattered data that died with
    the worker (``FutureCancelledError``, reason "lost dependencies" if it was submitted after,
    "already forgotten" if it was waiting on them: the scheduler forgets the dependants of data it
    cannot recompute; the run never cancels a task itself, so neither reason has another cause).
    Judged by the exception classes ``distributed`` defines, on ``err`` and what caused it, never
    by message text: a client's own error that mentions a worker is ``raised``."""
    for e in (err, err.__cause__, err.__context__):
        if e is None:
            continue
        names = _distributed_names(e)
        if names & {"KilledWorker", "CommClosedError"}:
            return True
        if "FutureCancelledError" in names and getattr(e, "reason", None) in ("lost dependencies", "already forgotten"):
            return True
    return False


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
