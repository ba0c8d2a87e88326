"""A training run's tracking in MLflow: the store opened early, the run started (or resumed, with
the metrics a kill left unsent), one observer that logs each round, and the run's end (cost-model
versions, final metrics, the registered model, the summary, parked calls when the server is
away)."""
from __future__ import annotations

import os
import sys
import uuid
from concurrent.futures import Future
from typing import Any

from fedhq_core.allocation.cost_model import ridge_to_state
from fedhq_core.checkpoint import runs_root
from fedhq_core.config import ExperimentConfig, redact_uri
from fedhq_core.phases import span
from fedhq_core.records import RoundRecord, format_reasons, write_json


def _new_tracker(cfg: ExperimentConfig):
    with span("import mlflow"):
        from tasks.tracking import Tracker, TrackingSettings
        import mlflow  # noqa: F401
    with span("tracking: store open"):
        return Tracker(TrackingSettings.load(tracking_uri=cfg.tracking_uri, experiment=cfg.experiment,
                                             registered_model=cfg.registered_model))


_EARLY: dict[tuple, Future] = {}  # tracking settings -> future of a Tracker opened in the background


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


def model_tags(sim: Any, summary: dict[str, Any]) -> dict[str, Any]:
    cfg = sim.cfg
    return {"strategy": cfg.strategy, "xi": cfg.xi, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
            "dataset": sim.dataset_name, "model": cfg.model, "final_acc_q": round(summary["final_acc_q"], 5),
            "final_acc_fp32": round(summary["final_acc_fp32"], 5), "total_sim_s": round(summary["total_sim_s"], 3),
            "seed": cfg.seed,
            # what promote compares: the validation split's accuracy ("" without one: not comparable)
            "final_acc_q_val": "" if summary.get("final_acc_q_val") is None else round(summary["final_acc_q_val"], 5)}


def log_checkpoint(tracker, cfg: ExperimentConfig):
    """``Checkpoints.on_save`` hook: the checkpoint goes to MLflow every ``checkpoint_log_every``
    rounds and after the last one (always to disk)."""
    every = cfg.checkpoint_log_every

    def on_save(path, sim: Any) -> None:
        if tracker and every and (sim.rnd % every == 0 or sim.rnd == cfg.rounds):
            tracker.log_artifact(path, "checkpoints")
    return on_save


def start_tracking(tracker, sim: Any, resume: bool, run_name: str | None, parent_run_id: str | None) -> None:
    """Start the run's MLflow run, or continue a resumed one (logging the rounds checkpointed
    before a kill whose metrics had not reached MLflow); the run gets its id either way, and from
    here on outlives its tracking server going away (``tasks.outbox``)."""
    cfg = sim.cfg
    if tracker and resume and sim.run_id and not sim.run_id.startswith("local-"):
        tracker.resume(sim.run_id, sim.rnd - 1)
        logged = tracker.logged_steps("acc_q")
        for rec in sim.records:
            if rec.round not in logged:
                tracker.log_metrics(rec.metrics(), step=rec.round)
    elif tracker:
        with span("tracking start"):
            tracker.start(run_name or f"{cfg.strategy}-{sim.dataset_name}-s{cfg.seed}", cfg.public_dict(),
                          tags={"strategy": cfg.strategy, "dataset": sim.dataset_name}, parent_run_id=parent_run_id)
            tracker.log_dict(sim.pricing.speed.describe(cfg.batch_size), "speed_model.json")
    sim.run_id = (tracker.run_id if tracker else None) or sim.run_id or f"local-{uuid.uuid4().hex[:12]}"
    if tracker:
        tracker.begin_outbox(runs_root(cfg.state_dir) / sim.run_id / "mlflow-outbox")


class TrackingObserver:
    """Logs every round's metrics (asynchronously, through the outbox)."""

    phase = "tracking"

    def __init__(self, tracker):
        self.tracker = tracker

    def on_round(self, sim: Any, rec: RoundRecord) -> None:
        self.tracker.log_metrics(rec.metrics(), step=rec.round)


class AllocationPlotObserver:
    """Draws the allocation scatter of round 0 and of every round right after a cost-model refit
    (``tasks.plots.allocation_scatter``, imported only when a round draws one) and logs it under
    ``allocation/``."""

    phase = "tracking"

    def __init__(self, tracker, plot_dir: str):
        self.tracker, self.plot_dir = tracker, plot_dir

    def on_round(self, sim: Any, rec: RoundRecord) -> None:
        scatter = sim.last_allocation_info.get("scatter")
        if scatter and (rec.round == 0 or scatter.get("adjusted") and sim.allocator_refit_before(rec.round)):
            from tasks.plots import allocation_scatter

            path = allocation_scatter(scatter, os.path.join(self.plot_dir, f"allocation-r{rec.round:03d}.png"))
            self.tracker.log_artifact(path, "allocation")


def finish_tracking(tracker, sim: Any, summary: dict[str, Any], register: bool) -> None:
    """The run's end in MLflow: cost-model versions, final metrics and tags, the registered model,
    the summary and rejected updates; where the server is still away, the parked calls."""
    cfg = sim.cfg
    for refit in sim.allocator.refits:
        tracker.log_state(ridge_to_state(refit["model"]), f"cost-model-v{refit['version']}", tracker.settings.cost_model,
                            {"strategy": cfg.strategy, "dataset": sim.dataset_name, "xi": cfg.xi,
                             "round": refit["round"], "n_samples": refit["n_samples"],
                             "run_version": refit["version"]}, aliases=("current",))
    rej = summary["rejected"]
    tracker.log_metrics({k: summary[k] for k in ("final_acc_q", "final_acc_q_val", "final_acc_fp32", "total_sim_s",
                                                 "charged_total_sim_s", "fit_sim_s", "fit_wall_s", "alloc_overhead_s")
                         if summary.get(k) is not None}
                        | {"total_upload_bytes": summary["upload_bytes"], "total_rejected": rej["total"]},
                        step=cfg.rounds)
    tracker.set_tags({"fedhq.rejected": f"{rej['total']} rejected ({format_reasons(rej['by_reason'])})"})
    if summary.get("significance"):
        tracker.log_metrics({f"sigacc_{k}": v for k, v in summary["significance"].items()
                             if k in ("train_r2", "cv_r2", "cv_r2_rounds")}, step=cfg.rounds)
    if register:
        with span("registration"):
            summary["model_version"] = tracker.register_global_model(sim.deployed_bundle(), model_tags(sim, summary))
    summary["wall_s"] = sim.summary()["wall_s"]
    summary["mlflow_run_url"] = redact_uri(tracker.run_url())
    summary["tracking_uri"] = redact_uri(tracker.settings.tracking_uri)
    if summary.get("model_version"):
        summary["registered_model"] = tracker.settings.registered_model
        summary["model_version_url"] = redact_uri(tracker.model_version_url(summary["model_version"]))
    with span("tracking end"):
        tracker.log_dict({k: v for k, v in summary.items() if k != "rounds"}, "summary.json")
        tracker.log_dict({str(r.round): {str(c): why for c, why in r.rejected.items()}
                          for r in sim.records if r.rejected}, "rejected_updates.json")
        tracker.end("FINISHED")
    if report_parked(tracker, summary):
        summary["tracking_pending"] = str(tracker.parked)


def report_parked(tracker, summary: dict[str, Any] | None = None) -> bool:
    """When the tracking server was still away at the run's end: say where the unsent calls wait
    (summary and model included) and the command that sends them."""
    if tracker.parked is None:
        return False
    folder = tracker.parked
    if summary is not None:
        write_json(str(folder.parent / "summary.json"), summary)
    print(f"fedhq: warning: MLflow at {redact_uri(tracker.settings.tracking_uri)} did not answer by the end of the run; "
          f"its summary, model and {sum(1 for _ in open(folder / 'ops.jsonl'))} unsent tracking calls wait in "
          f"{folder}. Send them when it is back with: fedhq upload {folder.parent}", file=sys.stderr, flush=True)
    return True
