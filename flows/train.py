"""The training flow: one federated run as Prefect tasks, tracked in MLflow.

profile (once) -> per round: allocate -> train sampled clients (submitted to the task runner,
so they run concurrently) -> aggregate -> evaluate -> log. Ends by logging and registering the
deployed quantized model.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from typing import Any, Callable

from flows import configure_prefect_env

configure_prefect_env()

import torch  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from fedhq_core.config import ExperimentConfig, from_mapping  # noqa: E402
from fedhq_core.hardware import RooflineModel  # noqa: E402
from fedhq_core.checkpoint import CheckpointError, Checkpoints, find_run, runs_root  # noqa: E402
from fedhq_core.errors import TooFewClients  # noqa: E402
from fedhq_core.phases import add as add_span, span  # noqa: E402
from fedhq_core.simulation import (RoundOps, RoundRecord, Simulation, default_concurrency,  # noqa: E402
                                   format_reasons, run_rounds)
from tasks import training as T  # noqa: E402


def set_torch_threads(cfg: ExperimentConfig) -> int:
    """Concurrent clients x intra-op threads must not exceed the cores, or they thrash."""
    workers = default_concurrency(cfg)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return workers


def _new_tracker(cfg: ExperimentConfig):
    with span("import mlflow"):
        from tasks.tracking import Tracker, TrackingSettings
        import mlflow  # noqa: F401
    with span("tracking: store open"):
        return Tracker(TrackingSettings.load(tracking_uri=cfg.tracking_uri, experiment=cfg.experiment,
                                             registered_model=cfg.registered_model))


_EARLY: dict[tuple, Any] = {}  # tracking settings -> future of a Tracker opened in the background


def _tracker_key(cfg: ExperimentConfig) -> tuple:
    return cfg.tracking_uri, cfg.experiment, cfg.registered_model


def open_tracker_early(cfg: ExperimentConfig) -> None:
    """Import MLflow and open its store on a background thread while the run loads its data and
    Prefect starts the flow (much of which waits on the API server), for :func:`tracker_for`."""
    if cfg.tracking and _tracker_key(cfg) not in _EARLY:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="fedhq-mlflow-open")
        _EARLY[_tracker_key(cfg)] = pool.submit(_new_tracker, cfg)
        pool.shutdown(wait=False)


def tracker_for(cfg: ExperimentConfig):
    if not cfg.tracking:
        return None
    early = _EARLY.pop(_tracker_key(cfg), None)
    if early is not None:
        with span("tracking: wait for the store"):
            return early.result()
    return _new_tracker(cfg)


def model_tags(sim: Simulation, summary: dict[str, Any]) -> dict[str, Any]:
    cfg = sim.cfg
    return {"strategy": cfg.strategy, "xi": cfg.xi, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
            "dataset": sim.dataset_name, "model": cfg.model, "final_acc_q": round(summary["final_acc_q"], 5),
            "final_acc_fp32": round(summary["final_acc_fp32"], 5), "total_sim_s": round(summary["total_sim_s"], 3),
            "seed": cfg.seed}


def log_checkpoint(tracker, cfg: ExperimentConfig):
    """``Checkpoints.on_save`` hook: the checkpoint goes to MLflow every ``checkpoint_log_every``
    rounds and after the last one (always to disk)."""
    every = cfg.checkpoint_log_every

    def on_save(path, sim: Simulation) -> None:
        if tracker and every and (sim.rnd % every == 0 or sim.rnd == cfg.rounds):
            tracker.log_artifact(path, "checkpoints")
    return on_save


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
    if not resume:
        with span("profile (task)"):
            T.profile_hardware(sim, speed)
    tracker = tracker_for(cfg)
    if sim.needs_significance():   # its cost goes on the run's bill (sim.fit, the summary's fit_* fields)
        sim.set_significance(obtain_significance(sim, tracker, submit))
    if not resume:
        sim.wall_start = time.perf_counter()  # the run's wall time: rounds, evaluation and tracking (+ the fit's)
    if tracker and resume and sim.run_id and not sim.run_id.startswith("local-"):
        tracker.resume(sim.run_id, sim.rnd - 1)
        # rounds checkpointed before the kill whose metrics had not reached MLflow yet
        logged = tracker.logged_steps("acc_q")
        for rec in sim.records:
            if rec.round not in logged:
                tracker.log_metrics(rec.metrics(), step=rec.round)
    elif tracker:
        with span("tracking start"):
            tracker.start(run_name or f"{cfg.strategy}-{sim.dataset_name}-s{cfg.seed}", cfg.to_dict(),
                          tags={"strategy": cfg.strategy, "dataset": sim.dataset_name}, parent_run_id=parent_run_id)
            tracker.log_dict(sim.speed.describe(cfg.batch_size), "speed_model.json")
    run_id = tracker.run_id if tracker else None
    sim.run_id = run_id or sim.run_id or f"local-{uuid.uuid4().hex[:12]}"
    if tracker:  # from here on the run outlives its tracking server going away (tasks.outbox)
        tracker.begin_outbox(runs_root(cfg.state_dir) / sim.run_id / "mlflow-outbox")
    ckpts = (Checkpoints(runs_root(cfg.state_dir) / sim.run_id, cfg.checkpoint_keep, log_checkpoint(tracker, cfg))
             if cfg.checkpoint else None)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.rounds, initial=sim.rnd, desc=f"{cfg.strategy}", unit="round", file=sys.stderr,
                   leave=True)

    plot_dir = os.path.join(cfg.state_dir, "plots", run_id or f"{cfg.strategy}-s{cfg.seed}")

    def _on_round(rec: RoundRecord) -> None:
        if tracker:
            tracker.log_metrics(rec.metrics(), step=rec.round)
        scatter = sim.last_allocation_info.get("scatter")
        if tracker and scatter and (rec.round == 0 or scatter.get("adjusted") and sim.allocator_refit_before(rec.round)):
            from tasks.plots import allocation_scatter

            tracker.log_artifact(allocation_scatter(scatter, os.path.join(plot_dir, f"allocation-r{rec.round:03d}.png")),
                                 "allocation")
        if bar:
            bar.set_postfix(acc_q=f"{rec.acc_q:.3f}", sim_s=f"{rec.sim_time_s:.1f}", qat=rec.n_qat,
                            **({"rejected": len(rec.rejected)} if rec.rejected else {}))
            bar.update(1)
        if on_round:
            on_round(rec)

    # The server's verbs run inside the flow unless asked for as task runs of their own (each task
    # run costs bookkeeping here and in the API server: measured, ~40 ms a round on digits).
    ops = (RoundOps(submit_train=submit, sent_bytes=sent, allocate=T.allocate, aggregate=T.aggregate,
                    evaluate=T.evaluate) if cfg.server_tasks else RoundOps(submit_train=submit, sent_bytes=sent))
    status = "FAILED"
    try:
        run_rounds(sim, ops, _on_round, ckpts)
        status = "FINISHED"
    except TooFewClients as err:
        if tracker:
            tracker.set_tags({"fedhq.failure": str(err)[:4000]})
        raise
    finally:
        if bar:
            bar.close()
        if tracker and status == "FAILED":
            tracker.end("FAILED")
            report_parked(tracker)
    summary = sim.summary(run_id)
    summary["run_dir"] = str(ckpts.run_dir) if ckpts else None
    summary["checkpoint"] = str(ckpts.last) if ckpts and ckpts.last else None
    if tracker:
        for refit in getattr(sim.allocator, "refits", []):
            tracker.log_sklearn(refit["model"], f"cost-model-v{refit['version']}", tracker.settings.cost_model,
                                {"strategy": cfg.strategy, "dataset": sim.dataset_name, "xi": cfg.xi,
                                 "round": refit["round"], "n_samples": refit["n_samples"],
                                 "run_version": refit["version"]}, aliases=("current",))
        rej = summary["rejected"]
        tracker.log_metrics({"final_acc_q": summary["final_acc_q"], "final_acc_fp32": summary["final_acc_fp32"],
                             "total_sim_s": summary["total_sim_s"], "charged_total_sim_s": summary["charged_total_sim_s"],
                             "fit_sim_s": summary["fit_sim_s"], "fit_wall_s": summary["fit_wall_s"],
                             "total_upload_bytes": summary["upload_bytes"],
                             "alloc_overhead_s": summary["alloc_overhead_s"], "total_rejected": rej["total"]},
                            step=cfg.rounds)
        tracker.set_tags({"fedhq.rejected": f"{rej['total']} rejected ({format_reasons(rej['by_reason'])})"})
        if summary.get("significance"):
            tracker.log_metrics({f"sigacc_{k}": v for k, v in summary["significance"].items()
                                 if k in ("train_r2", "cv_r2", "cv_r2_rounds")}, step=cfg.rounds)
        if register:
            with span("registration"):
                summary["model_version"] = tracker.register_global_model(sim.deployed_bundle(),
                                                                         model_tags(sim, summary))
        summary["wall_s"] = sim.summary()["wall_s"]
        summary["mlflow_run_url"] = tracker.run_url()
        summary["tracking_uri"] = tracker.settings.tracking_uri
        if summary.get("model_version"):
            summary["registered_model"] = tracker.settings.registered_model
            summary["model_version_url"] = tracker.model_version_url(summary["model_version"])
        with span("tracking end"):
            tracker.log_dict({k: v for k, v in summary.items() if k != "rounds"}, "summary.json")
            tracker.log_dict({str(r.round): {str(c): why for c, why in r.rejected.items()}
                              for r in sim.records if r.rejected}, "rejected_updates.json")
            tracker.end("FINISHED")
        if report_parked(tracker, summary):
            summary["tracking_pending"] = str(tracker.parked)
    if ckpts:
        ckpts.mark_done()
    return summary


def report_parked(tracker, summary: dict[str, Any] | None = None) -> bool:
    """When the tracking server was still away at the run's end: say where the unsent calls wait
    (summary and model included) and the command that sends them."""
    if tracker.parked is None:
        return False
    folder = tracker.parked
    if summary is not None:
        from flows.cli import write_json

        write_json(str(folder.parent / "summary.json"), summary)
    print(f"fedhq: warning: MLflow at {tracker.settings.tracking_uri} did not answer by the end of the run; "
          f"its summary, model and {sum(1 for _ in open(folder / 'ops.jsonl'))} unsent tracking calls wait in "
          f"{folder}. Send them when it is back with: fedhq upload {folder.parent}", file=sys.stderr, flush=True)
    return True


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
        from fedhq_core.worker import warm_up

        last.append([client.submit(warm_up, sim.shards[0].key, sim.model_spec, workers=[w], pure=False)
                     for w in client.scheduler_info().get("workers", {})])   # (kept: not cancelled)

    def submit(inputs, jobs):
        rnd = jobs[0].rnd if jobs else -1
        if inputs is not last[0]:
            last[:2] = [inputs, client.scatter(inputs, broadcast=True, hash=False)]
            if sent is not None:
                workers = len(client.scheduler_info().get("workers", {})) or 1
                sent[rnd] = sent.get(rnd, 0) + workers * len(pickle.dumps(inputs, protocol=5))
        if sent is not None:
            sent[rnd] = sent.get(rnd, 0) + len(pickle.dumps(jobs, protocol=5))
        return train.submit(last[1], jobs)
    return submit


def obtain_significance(sim: Simulation, tracker=None, submit: Callable | None = None):
    """A registered SigAcc model fitted for exactly this setting (any version, found by its tags),
    else fit one now and register it (alias ``current`` points at the newest fit)."""
    from fedhq_core.allocation.pilot import pilot_length, setting_key, significance_tags

    from fedhq_core.allocation.pilot import FitInfo

    wanted = significance_tags(sim.cfg)
    name = tracker.settings.significance_model if tracker else None
    if tracker and sim.cfg.significance == "auto":
        t0 = time.perf_counter()
        model, why = tracker.load_significance(wanted)
        if model is not None:
            reused = int(model.tags.get("runs_reused", 1))
            model.fit_info = FitInfo("registry", float(model.tags.get("fit_sim_s", 0.0)), time.perf_counter() - t0,
                                     f"{name} {why}, fitted for this setting by an earlier pilot", reused)
            print(f"fedhq: using {name} {why} (fitted for this setting; a one-off cost of "
                  f"{model.fit_info.sim_s:.2f} simulated s, reused by {reused} run(s))", file=sys.stderr)
            return model
        print(f"fedhq: {why} in {name}; fitting one by a pilot run ({pilot_length(sim.cfg)} rounds per branch)",
              file=sys.stderr)
    model = sim.fit_significance(submit or train_submitter(sim.cfg))   # the pilot trains where the run does
    print(f"fedhq: SigAcc R2 in-sample {model.train_r2:.2f}, cross-validated {model.cv_r2:.2f} (by client), "
          f"{model.cv_r2_rounds:.2f} (by pilot round); pilot round gains {model.tags['round_gains']}; "
          f"charged to this run: {model.fit_info.sim_s:.2f} simulated s, {model.fit_info.wall_s:.1f} wall s",
          file=sys.stderr)
    if tracker:
        tracker.start(f"fit-significance-{sim.dataset_name}", {**wanted}, tags={"kind": "fit-significance"})
        tracker.log_metrics({"train_r2": model.train_r2, "cv_r2": model.cv_r2, "cv_r2_rounds": model.cv_r2_rounds,
                             "mean_gain": model.tags["mean_gain"]})
        version = tracker.log_sklearn(model.regressor, "significance", name,
                                      {**model.tags, "setting": setting_key(wanted),
                                       "fit_wall_s": round(model.fit_info.wall_s, 3)}, aliases=("current",))
        tracker.end()
        print(f"fedhq: registered {name} version {version} as current", file=sys.stderr)
    return model


@flow(name="fedhq-fit-significance", persist_result=False)
def fit_significance_flow(config: dict[str, Any]) -> dict[str, Any]:
    """Offline SigAcc fitting: pilot rounds, regressor, registry version with alias ``current``."""
    cfg = from_mapping({**config, "significance": "refit"})
    set_torch_threads(cfg)
    sim = Simulation(cfg.replace(strategy="fedhq"))
    T.profile_hardware(sim, None)
    model = obtain_significance(sim, tracker_for(cfg))
    out = {**model.tags, "train_r2": model.train_r2, "cv_r2": model.cv_r2, "cv_r2_rounds": model.cv_r2_rounds}
    from flows.artifacts import publish_table

    publish_table(f"significance-{sim.dataset_name}", [{"measure": k, "value": str(out[k])} for k in SIG_FIGURES
                                                        if k in out], "SigAcc fit (fedhq-significance)")
    return out


# the figures of a SigAcc fit shown by `fedhq fit-significance` and in its Prefect artifact
SIG_FIGURES = ("dataset", "model", "w_bits", "a_bits", "seed", "n_samples", "mean_gain", "train_r2", "cv_r2",
               "cv_r2_rounds", "round_gains")


# Simulations built by the caller before the flow starts (data loaded while Prefect boots),
# handed over by key: a flow's parameters must stay JSON-serializable.
_PREPARED: dict[str, Simulation] = {}
_CALLED: dict[str | None, float] = {}  # when the flow was called, and when its body returned (phase spans)


@flow(name="fedhq-train", persist_result=False)
def train_flow(config: dict[str, Any], progress: bool = False, prepared: str | None = None,
               resume: bool = False) -> dict[str, Any]:
    """One FedHQ training run. ``config`` holds ExperimentConfig fields (validated here)."""
    add_span("prefect flow start", _CALLED.get(prepared, time.time()))
    cfg = from_mapping(config)
    sim = _PREPARED.pop(prepared, None) if prepared else None
    out = execute_run(cfg, sim=sim, progress=progress, resume=resume and sim is not None)
    with span("prefect artifacts"):
        from flows.artifacts import publish_run

        publish_run(cfg, out)
    _CALLED[prepared] = time.time()
    return out


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
            out = f(cfg.to_dict(), progress=progress, prepared=key, resume=resume)
        add_span("prefect flow end", _CALLED[key])
        return out
    finally:
        _PREPARED.pop(key, None)
        _CALLED.pop(key, None)


def run_training(cfg: ExperimentConfig, progress: bool = False) -> dict[str, Any]:
    open_tracker_early(cfg)
    with span("data load"):
        sim = Simulation(cfg)
    return _start_flow(cfg, sim, progress, resume=False)


def resume_training(state_dir: str, run_id: str, progress: bool = False) -> dict[str, Any]:
    """Continue run ``run_id`` (or ``latest``) from its newest good checkpoint, into the same
    MLflow run. A corrupt checkpoint is reported and the previous one used."""
    folder = find_run(state_dir, run_id)
    ckpts = Checkpoints(folder)
    if ckpts.done:
        raise CheckpointError(f"{folder}: run {folder.name} already completed; nothing to resume")
    tensors, meta, path = ckpts.load_latest(lambda msg: print(f"fedhq: warning: {msg}", file=sys.stderr))
    cfg = from_mapping(meta["config"])
    sim = Simulation(cfg)
    sim.load_state_dict(tensors, meta)
    print(f"fedhq: resuming run {sim.run_id} after round {sim.rnd - 1} from {path}", file=sys.stderr)
    return _start_flow(cfg, sim, progress, resume=True)
