"""The training flow: one federated run as Prefect tasks, tracked in MLflow.

:func:`execute_run` prepares the run (clock, SigAcc, tracking, checkpoints), runs the round loop
of ``fedhq_core.loop`` with the flow's task runner and its observers (checkpoints, tracking,
allocation plots, progress), then finishes it (summary, registration).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from flows import configure_prefect_env

configure_prefect_env()

from prefect import flow  # noqa: E402

from fedhq_core.checkpoint import CheckpointError, Checkpoints, find_run, runs_root  # noqa: E402
from fedhq_core.config import ExperimentConfig, from_mapping  # noqa: E402
from fedhq_core.errors import TooFewClients  # noqa: E402
from fedhq_core.hardware import RooflineModel  # noqa: E402
from fedhq_core.loop import CallbackObserver, RoundOps, prepare, run_rounds  # noqa: E402
from fedhq_core.phases import add as add_span, span  # noqa: E402
from fedhq_core.records import RoundRecord  # noqa: E402
from fedhq_core.simulation import Simulation  # noqa: E402
from tasks import training as T  # noqa: E402
from tasks.run_tracking import (AllocationPlotObserver, TrackingObserver, finish_tracking, log_checkpoint,  # noqa: E402
                                open_tracker_early, report_parked, start_tracking, tracker_for)

from flows.runners import set_torch_threads, task_runner_for, train_submitter  # noqa: E402
from flows.significance import obtain_significance  # noqa: E402


def execute_run(cfg: ExperimentConfig, *, speed: RooflineModel | None = None, sim: Simulation | None = None,
                parent_run_id: str | None = None, run_name: str | None = None, progress: bool = False,
                on_round: Callable[[RoundRecord], None] | None = None, register: bool = True,
                resume: bool = False) -> dict[str, Any]:
    """Body of a training run; must be called inside a flow (tasks are submitted to its runner).
    ``resume``: ``sim`` was restored from a checkpoint; continue its MLflow run and rounds."""
    set_torch_threads(cfg)
    sim = sim or Simulation(cfg)
    sent: dict[int, int] = {}
    submit = train_submitter(cfg, sent, sim)
    tracker = tracker_for(cfg)
    # the library's set-up (fedhq_core.loop.prepare), with the flow's profiling task and a SigAcc
    # search that reads the MLflow registry too; its cost goes on the run's bill
    prepare(sim, speed, resume=resume, profile=T.profile_hardware, obtain=lambda s: obtain_significance(s, tracker))
    start_tracking(tracker, sim, resume, run_name, parent_run_id)
    ckpts = (Checkpoints(runs_root(cfg.state_dir) / sim.run_id, cfg.checkpoint_keep, log_checkpoint(tracker, cfg))
             if cfg.checkpoint else None)
    observers = run_observers(sim, tracker, ckpts, progress, on_round)
    # The server's verbs run inside the flow unless asked for as task runs of their own (each task
    # run costs bookkeeping here and in the API server: measured, ~40 ms a round on digits).
    ops = (RoundOps(submit_train=submit, sent_bytes=sent, allocate=T.allocate, aggregate=T.aggregate,
                    evaluate=T.evaluate) if cfg.server_tasks else RoundOps(submit_train=submit, sent_bytes=sent))
    status = "FAILED"
    try:
        run_rounds(sim, ops, observers)
        status = "FINISHED"
    except TooFewClients as err:
        if tracker:
            tracker.set_tags({"fedhq.failure": str(err)[:4000]})
        raise
    finally:
        for obs in observers:
            getattr(obs, "close", lambda: None)()
        if tracker and status == "FAILED":
            tracker.end("FAILED")
            report_parked(tracker)
    summary = sim.summary(tracker.run_id if tracker else None)
    summary["run_dir"] = str(ckpts.run_dir) if ckpts else None
    summary["checkpoint"] = str(ckpts.last) if ckpts and ckpts.last else None
    if tracker:
        finish_tracking(tracker, sim, summary, register)
    if ckpts:
        ckpts.mark_done()
    return summary


def run_observers(sim: Simulation, tracker, ckpts: Checkpoints | None, progress: bool,
                  on_round: Callable[[RoundRecord], None] | None) -> list[Any]:
    """What watches the run's rounds, in order: the checkpoint first (before anyone hears of the
    round), then MLflow (metrics, allocation plots), the progress bar, the caller's callback."""
    cfg = sim.cfg
    out: list[Any] = [ckpts] if ckpts else []
    if tracker:
        plot_dir = os.path.join(cfg.state_dir, "plots", tracker.run_id or f"{cfg.strategy}-s{cfg.seed}")
        out += [TrackingObserver(tracker), AllocationPlotObserver(tracker, plot_dir)]
    if progress:
        from flows.progress import ProgressObserver

        out.append(ProgressObserver(cfg, sim.rnd))
    if on_round:
        out.append(CallbackObserver(on_round))
    return out


# Simulations built by the caller before the flow starts (data loaded while Prefect boots),
# handed over by key: a flow's parameters must stay JSON-serializable.
_PREPARED: dict[str, Simulation] = {}
_CALLED: dict[str | None, float] = {}  # when the flow was called, and when its body returned (phase spans)


@flow(name="fedhq-train", persist_result=False)
def train_flow(config: dict[str, Any], progress: bool = False, prepared: str | None = None,
               resume: bool = False) -> dict[str, Any]:
    """One FedHQ training run. ``config`` holds ExperimentConfig fields (validated here)."""
    add_span("prefect flow start", _CALLED.get(prepared, time.time()))
    sim = _PREPARED.pop(prepared, None) if prepared else None
    cfg = sim.cfg if sim is not None else from_mapping(config)   # the parameters carry no credentials
    out = execute_run(cfg, sim=sim, progress=progress, resume=resume and sim is not None)
    with span("prefect artifacts"):
        from flows.artifacts import publish_run

        publish_run(cfg, out)
    _CALLED[prepared] = time.time()
    return out


def _start_flow(cfg: ExperimentConfig, sim: Simulation, progress: bool, resume: bool) -> dict[str, Any]:
    """Run :func:`train_flow` on the task runner ``cfg`` asks for, against this process's Prefect
    API server (launched by the CLI before the imports and the data load, else now) or the one
    ``PREFECT_API_URL`` names. Local Dask workers inherit the URL and report to the same server."""
    from flows import api_settings, start_api_server

    set_torch_threads(cfg)
    server = start_api_server()
    key = f"sim-{id(sim)}"
    _PREPARED[key] = sim
    if server is not None:
        with span("prefect api start (wait)"):
            server.wait_ready()
    try:
        with api_settings():
            f = train_flow.with_options(task_runner=task_runner_for(cfg))
            _CALLED[key] = time.time()
            out = f(cfg.public_dict(), progress=progress, prepared=key, resume=resume)
        add_span("prefect flow end", _CALLED[key])
        return out
    finally:
        _PREPARED.pop(key, None)
        _CALLED.pop(key, None)


def run_training(cfg: ExperimentConfig, progress: bool = False) -> dict[str, Any]:
    if cfg.tracking:   # an unreachable tracking server at the start: one line, before anything runs
        from tasks.tracking import TrackingSettings, probe_tracking

        probe_tracking(TrackingSettings.load(tracking_uri=cfg.tracking_uri).tracking_uri)
    open_tracker_early(cfg)
    with span("data load"):
        sim = Simulation(cfg)
    return _start_flow(cfg, sim, progress, resume=False)


def resumed_config(cfg: ExperimentConfig, saved: dict[str, Any], tracking_uri: str | None,
                   dask_address: str | None) -> ExperimentConfig:
    """A checkpoint's config, where it reaches outside the run, only as the current settings
    confirm it: the tracking server is the configured one (``--tracking-uri``, else
    MLFLOW_TRACKING_URI / mlflow.yaml) and must be the one the run tracked to unless
    ``--tracking-uri`` names it; a Dask scheduler only with ``--dask-address``; downloading never."""
    from fedhq_core.config import redact_uri
    from fedhq_core.errors import ConfigError

    changes: dict[str, Any] = {"download": False}
    if cfg.tracking:
        from tasks.tracking import TrackingSettings, probe_tracking

        configured = TrackingSettings.load(tracking_uri=tracking_uri).tracking_uri
        if saved.get("tracking_uri") and not tracking_uri and redact_uri(configured) != saved["tracking_uri"]:
            raise ConfigError(f"tracking_uri: the run tracked to {saved['tracking_uri']}, the configured server is "
                              f"{redact_uri(configured)}; pass --tracking-uri to say where it continues")
        probe_tracking(configured)
        changes["tracking_uri"] = configured
    if saved.get("dask_address") and not dask_address:
        raise ConfigError(f"dask_address: the run trained on {saved['dask_address']}; pass --dask-address to "
                          f"confirm where it continues")
    if dask_address:
        changes["dask_address"] = dask_address
    return cfg.replace(**changes)


def resume_training(state_dir: str, run_id: str, progress: bool = False, tracking_uri: str | None = None,
                    dask_address: str | None = None) -> dict[str, Any]:
    """Continue run ``run_id`` (or ``latest``) from its newest good checkpoint, into the same
    MLflow run. A corrupt checkpoint is reported and the previous one used. Its config is not
    trusted where it reaches outside the run (:func:`resumed_config`)."""
    folder = find_run(state_dir, run_id)
    ckpts = Checkpoints(folder)
    if ckpts.done:
        raise CheckpointError(f"{folder}: run {folder.name} already completed; nothing to resume")
    tensors, meta, path = ckpts.load_latest(lambda msg: print(f"fedhq: warning: {msg}", file=sys.stderr))
    cfg = resumed_config(from_mapping({**meta["config"], "tracking_uri": None, "dask_address": None}), meta["config"],
                         tracking_uri, dask_address)
    sim = Simulation(cfg)
    sim.load_state_dict(tensors, meta)
    print(f"fedhq: resuming run {sim.run_id} after round {sim.rnd - 1} from {path}", file=sys.stderr)
    return _start_flow(cfg, sim, progress, resume=True)
