"""Thin Prefect tasks around the round verbs of :class:`fedhq_core.Simulation`.

Results stay in memory (``persist_result=False``) and inputs are never hashed
(``NO_CACHE``): a task's arguments are models and payloads, and hashing them on every call
would cost more than the work.
"""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedhq_core.allocation import Allocation
from fedhq_core.client import ClientResult
from fedhq_core.models.spec import ModelSpec
from fedhq_core.worker import ClientJob, DataKey, RoundInputs, Upload, prepare_worker, run_jobs
from fedhq_core.hardware import RooflineModel
from fedhq_core.simulation import Simulation

OPTS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="profile-hardware", **OPTS)
def profile_hardware(sim: Simulation, speed: RooflineModel | None = None) -> RooflineModel:
    """Start the simulated clock: op traces of every step kind, priced with the device catalog."""
    return sim.profile(speed)


@task(name="allocate", **OPTS)
def allocate(sim: Simulation, rnd: int, sampled: list[int]) -> tuple[Allocation, float]:
    return sim.allocate(rnd, sampled)


def _clients_name() -> str:
    from prefect.runtime import task_run

    jobs = task_run.parameters.get("jobs", [])
    jobs = jobs.unquote() if hasattr(jobs, "unquote") else jobs  # passed as quote(jobs): not traversed
    rnd = jobs[0].rnd if jobs else "?"
    return f"train-r{rnd}-clients-" + "-".join(str(j.cid) for j in jobs)


def dask_worker_slot() -> int | None:
    """This Dask worker's index in a LocalCluster (its name), None outside Dask or when named."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return None
    return name if isinstance(name, int) else None


@task(name="train-clients", task_run_name=_clients_name, **OPTS)
def train_clients(inputs: RoundInputs, jobs: list[ClientJob]) -> list[Upload]:
    """Local training of the given clients on one worker slot (a thread here, or a Dask worker).
    Inputs are tensors (on Dask, the round's scattered copy on this worker); jobs carry shard
    indices; each client's upload comes back as bytes (``fedhq_core.wire``)."""
    if hasattr(inputs, "key") and hasattr(inputs, "result") and not isinstance(inputs, RoundInputs):
        inputs = inputs.result()   # a Dask future of the scattered inputs, if it was not resolved
    return run_jobs(inputs, jobs, dask_worker_slot())


@task(name="aggregate", **OPTS)
def aggregate(sim: Simulation, results: list[ClientResult]) -> float:
    return sim.aggregate(results)


@task(name="evaluate", **OPTS)
def evaluate(sim: Simulation) -> dict[str, float]:
    return sim.evaluate()


def warm_up(key: DataKey, spec: ModelSpec) -> str:
    """Run on each Dask worker as a run starts (beside the server's own start-up): unpickling this
    function imports this module, what every train-clients task needs; then the worker loads the
    dataset and builds a model (``fedhq_core.worker.prepare_worker``)."""
    return prepare_worker(key, spec)
