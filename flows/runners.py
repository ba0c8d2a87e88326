"""Where a run's clients train: the flow's task runner (threads here, or prefect-dask on a Dask
cluster) and the function that submits a task of client jobs to it (rounds and pilot rounds)."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from flows import configure_prefect_env

configure_prefect_env()

import torch  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from fedhq_core.config import ExperimentConfig  # noqa: E402
from fedhq_core.dispatch import default_concurrency, worker_lost  # noqa: E402
from fedhq_core.simulation import Simulation  # noqa: E402
from tasks import training as T  # noqa: E402


def set_torch_threads(cfg: ExperimentConfig) -> int:
    """Concurrent clients x intra-op threads must not exceed the cores, or they thrash."""
    workers = default_concurrency(cfg)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return workers


SCATTER_TIMEOUT_S = 30.0   # a round's inputs reach every worker in well under a second here


def train_submitter(cfg: ExperimentConfig, sent: dict[int, int] | None = None,
                    sim: Simulation | None = None) -> Callable[[Any, list], Any]:
    """``submit(inputs, jobs)``: one train-clients task on the flow's task runner (rounds and
    pilot rounds alike).

    * Threads: inputs and jobs go in ``quote()``: Prefect does not walk them looking for futures
      (they hold none), which halves a task's bookkeeping (measured: ~20 -> ~10 ms a task).
    * Dask: the round's inputs (global weights, ranges, steps) are scattered to every worker once
      per round and the tasks get their future; jobs carry shard indices, which each worker reads
      from its own once-loaded copy of the dataset. ``sent[round]`` counts the bytes sent to the
      workers (the inputs times the workers, plus each task's jobs). prefect-dask hands quoted
      arguments to the task as they are, so no ``quote()`` there."""
    from prefect.context import FlowRunContext

    train = T.train_clients.with_options(retries=cfg.task_retries, retry_delay_seconds=cfg.task_retry_delay_s)
    ctx = FlowRunContext.get()
    client = getattr(ctx.task_runner, "client", None) if ctx else None   # DaskTaskRunner's
    if client is None:
        return lambda inputs, jobs: train.submit(quote(inputs), quote(jobs))
    import pickle

    last: list[Any] = [None, None]   # the inputs last scattered, and their future
    if sim is not None:  # workers import, load the data and build a model while the server starts up
        from tasks.training import warm_up

        last.append([client.submit(warm_up, sim.shards[0].key, sim.model_spec, workers=[w], pure=False)
                     for w in client.scheduler_info().get("workers", {})])   # (kept: not cancelled)

    def scatter(inputs, attempts: int = 3):
        """The round's inputs on every worker. A worker that dies while they are being sent
        closes its connection, or leaves the broadcast waiting on it for good (seen when a worker
        is killed as the scatter starts): a scatter that fails so, or outlasts ``SCATTER_TIMEOUT_S``,
        goes again to the workers still there (and a restarted one), and only a cluster that
        keeps failing stops the run."""
        for attempt in range(attempts):
            try:
                return client.scatter(inputs, broadcast=True, hash=False, timeout=SCATTER_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - only a lost worker is retried
                if attempt == attempts - 1 or not (worker_lost(err) or isinstance(err, TimeoutError)):
                    raise
                time.sleep(0.5 * (attempt + 1))

    def submit(inputs, jobs):
        rnd = jobs[0].rnd if jobs else -1
        if inputs is not last[0]:
            last[:2] = [inputs, scatter(inputs)]
            if sent is not None:
                workers = len(client.scheduler_info().get("workers", {})) or 1
                sent[rnd] = sent.get(rnd, 0) + workers * len(pickle.dumps(inputs, protocol=5))
        if sent is not None:
            sent[rnd] = sent.get(rnd, 0) + len(pickle.dumps(jobs, protocol=5))
        return train.submit(last[1], jobs)
    return submit


MALLOC_TRIM, MALLOC_MMAP = 64 << 20, 32 << 20   # a Dask worker's glibc settings (task_runner_for)


def task_runner_for(cfg: ExperimentConfig):
    """Threads on this machine, or prefect-dask's DaskTaskRunner on ``dask_address`` or on a
    LocalCluster of ``dask_local`` worker processes (loopback only, no dashboard)."""
    if not (cfg.dask_address or cfg.dask_local):
        return ThreadPoolTaskRunner(max_workers=default_concurrency(cfg))
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    threads = max(1, (os.cpu_count() or 1) // cfg.dask_local)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the in-process scheduler's chatter
    import dask

    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=64 KiB, which also pins glibc's mmap
    # threshold at 128 KiB: every activation tensor is mapped and unmapped, and a client's training
    # took 2-2.5x the CPU in page faults (measured: ~390,000 minor faults against ~2,000). These
    # keep freed memory for reuse up to 64 MiB and serve tensors under 32 MiB from the heap.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": MALLOC_TRIM,
                     "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": MALLOC_MMAP})
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": cfg.dask_local, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": None, "silence_logs": logging.ERROR,
        # each worker's torch uses its share of the cores (no oversubscription)
        "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}})
