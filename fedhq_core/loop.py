"""The round loop, read top to bottom: sample -> allocate -> train the sampled clients (on the
task runner) -> check their uploads -> aggregate -> evaluate -> close the round on the clock ->
tell the observers. :func:`run` runs it as plain Python (threads, no Prefect, no MLflow); the
Prefect flow runs the very same :func:`run_rounds` with its own task runner and observers.

An observer is anything with ``phase`` (its name in the phase breakdown) and
``on_round(sim, record)``: checkpoints, tracking, progress and plots each are one, in the room of
what they observe, and the loop knows none of them by name. They are told in order, so a
checkpoint is written before anyone hears of the round.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from .allocation import Allocation
from .client import ClientResult
from .config import ExperimentConfig
from .dispatch import collect, default_concurrency
from .errors import TooFewClients
from .phases import span
from .records import RoundRecord, format_reasons, reject_counts
from .simulation import Simulation
from .worker import run_jobs


class Observer(Protocol):
    phase: str

    def on_round(self, sim: Simulation, rec: RoundRecord) -> None: ...


@dataclass
class RoundOps:
    """How each round verb is executed: directly (default) or, in the flow, as Prefect tasks.
    ``submit_train(inputs, jobs)`` trains a list of :class:`~fedhq_core.worker.ClientJob` from
    one :class:`~fedhq_core.worker.RoundInputs` and returns a future (anything with
    ``.result(timeout)``) of their :class:`~fedhq_core.worker.Upload` list."""

    submit_train: Callable[..., Any]
    sent_bytes: dict[int, int] = field(default_factory=dict)   # round -> bytes sent to workers (Dask)
    allocate: Callable[..., Any] = lambda sim, rnd, sampled: sim.allocate(rnd, sampled)
    aggregate: Callable[..., Any] = lambda sim, results: sim.aggregate(results)
    evaluate: Callable[..., Any] = lambda sim: sim.evaluate()


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
    waited: list[ClientResult] = field(default_factory=list)   # rejected after arriving: on the clock too


def train_round(sim: Simulation, ops: RoundOps, rnd: int) -> RoundOutcome:
    """Sample, allocate and train one round, re-sampling while fewer than ``min_clients`` updates
    are accepted (``round_retries`` times), else raise TooFewClients."""
    cfg, dispatch = sim.cfg, sim.dispatch
    rejected: dict[int, str] = {}
    failed_s, alloc_s = 0.0, 0.0
    for attempt in range(cfg.round_retries + 1):
        sampled = dispatch.sample(rnd, attempt)
        with span("allocate (task)", rnd):
            alloc, spent = ops.allocate(sim, rnd, sampled)
        alloc_s += spent
        with span("train (tasks)", rnd):
            jobs = dispatch.jobs(rnd, alloc, sampled, attempt)
            futures = [(chunk, ops.submit_train(inputs, chunk)) for inputs, chunk in dispatch.tasks(jobs)]
            uploads = collect(futures, cfg.client_timeout_s)
        with span("unpack", rnd):
            results, bad = dispatch.accept(uploads)
        rejected.update({c: f"{why} (attempt {attempt + 1})" if attempt else why for c, why in bad.items()})
        if len(results) >= cfg.min_clients:
            ok = {r.cid for r in results}
            workers = len({u.worker for u in uploads if u.cid in ok})
            return RoundOutcome(alloc, alloc_s, results, rejected, attempt + 1, failed_s, workers,
                                list(dispatch.waited))
        failed_s += sim.fail_attempt(rnd, results + dispatch.waited)
    raise TooFewClients(
        f"round {rnd}: only {len(results)} of {len(sampled)} client updates were accepted after "
        f"{cfg.round_retries + 1} attempt(s) (min_clients={cfg.min_clients}); the global model was not updated. "
        f"Rejected: {format_reasons(reject_counts([rejected]))}")


def run_rounds(sim: Simulation, ops: RoundOps, observers: Iterable[Observer] = ()) -> Simulation:
    """All remaining rounds of ``sim``: train (with retries), aggregate, evaluate, close on the
    clock, then tell each observer (in order: a checkpoint observer first)."""
    observers = list(observers)
    for rnd in range(sim.rnd, sim.cfg.rounds):
        with span("round", rnd):
            out = train_round(sim, ops, rnd)
            with span("aggregate (task)", rnd):
                server_s = ops.aggregate(sim, out.results)
            with span("evaluate (task)", rnd):
                metrics = ops.evaluate(sim) if sim.should_eval(rnd) else None
            rec = sim.close_round(rnd, out.alloc, out.alloc_s, out.results, server_s, metrics, out.rejected,
                                  out.attempts, out.failed_s, out.waited)
            rec.extra["workers"] = out.workers
            rec.extra["samples"] = sum(r.n_samples for r in out.results)
            if rnd in ops.sent_bytes:
                rec.extra["bytes_to_workers"] = ops.sent_bytes.pop(rnd)
            for obs in observers:
                with span(obs.phase, rnd):
                    obs.on_round(sim, rec)
    return sim


@dataclass
class CallbackObserver:
    """``on_round(record)`` as an observer (a notebook's print, a test's list)."""

    callback: Callable[[RoundRecord], None]
    phase: str = "tracking"

    def on_round(self, sim: Simulation, rec: RoundRecord) -> None:
        self.callback(rec)


def prepare(sim: Simulation, speed: Any = None, *, resume: bool = False,
            profile: Callable[[Simulation, Any], Any] | None = None,
            obtain: Callable[[Simulation], Any] | None = None) -> Simulation:
    """A run's set-up before its first round, for :func:`run` and the Prefect flow alike: start the
    simulated clock (``profile(sim, speed)``, default ``sim.profile``; the flow passes its task),
    obtain SigAcc where the allocator wants one (``obtain(sim)``, default a covering family's or
    online, never a pilot: its cost goes on the run's bill), then start the run's wall clock (the
    fit's wall time is added once, in ``summary``). A resumed run keeps its clock and wall time."""
    from .allocation.pilot import choose_significance

    if not resume:
        with span("profile (task)"):
            (profile or (lambda s, sp: s.profile(sp)))(sim, speed)
    if sim.needs_significance():
        (obtain or choose_significance)(sim)
    if not resume:
        sim.wall_start = time.perf_counter()
    return sim


def run(cfg: ExperimentConfig, on_round: Callable[[RoundRecord], None] | None = None,
        sim: Simulation | None = None, checkpoints: Any = None) -> Simulation:
    """Plain-Python run (no Prefect, no MLflow), clients trained concurrently on threads.
    ``checkpoints``: a :class:`~fedhq_core.checkpoint.Checkpoints` (saved after every round).
    A ``sim`` already profiled (restored from a checkpoint) continues as it is."""
    sim = sim or Simulation(cfg)
    prepare(sim, resume=sim.pricing.speed is not None)
    with ThreadPoolExecutor(default_concurrency(cfg)) as pool:
        ops = RoundOps(submit_train=lambda inputs, jobs: pool.submit(run_jobs, inputs, jobs))
        observers = ([checkpoints] if checkpoints is not None else []) + (
            [CallbackObserver(on_round)] if on_round else [])
        return run_rounds(sim, ops, observers)
