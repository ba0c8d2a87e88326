"""``fedhq tune``: an Optuna study of xi and the bit-widths (optionally local epochs), multi-objective:
maximise the deployed model's quantized accuracy on the validation split (the test split is only
reported, as ``test_acc_q``), minimise simulated time.

The study lives in an RDB storage (default ``sqlite:///<state_dir>/optuna.db``; any SQLAlchemy
URL via ``--storage``) and resumes by name. Each trial is an MLflow run nested under the study's
parent run; the Pareto-front plot is logged; the chosen trial's model is registered with its
parameters as tags.
"""
from __future__ import annotations

import contextvars
import os
import sys
import threading
from typing import Any

from flows import configure_prefect_env

configure_prefect_env()

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from prefect import flow  # noqa: E402

from fedhq_core.config import ExperimentConfig, from_mapping  # noqa: E402
from fedhq_core.errors import ConfigError  # noqa: E402
from fedhq_core.simulation import Simulation, load_data  # noqa: E402
from tasks import training as T  # noqa: E402

from flows.runners import set_torch_threads  # noqa: E402
from flows.significance import obtain_significance  # noqa: E402
from flows.train import execute_run  # noqa: E402
from tasks.run_tracking import model_tags, tracker_for  # noqa: E402


def choose(front: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
    """The knee of the front: best normalised accuracy minus normalised time."""
    acc = np.array([t.values[0] for t in front])
    tim = np.array([t.values[1] for t in front])
    span = lambda v: (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else np.zeros_like(v)  # noqa: E731
    return front[int(np.argmax(span(acc) - span(tim)))]


def pareto_plot(study: optuna.Study, front: list[optuna.trial.FrozenTrial], chosen, path: str) -> str:
    from tasks.plots import plt, save_figure

    done = [t for t in study.trials if t.values is not None]
    fig, ax = plt.subplots(figsize=(6.2, 4.4), dpi=110)
    ax.scatter([t.values[1] for t in done], [t.values[0] * 100 for t in done], c="lightgray", label="trials")
    f = sorted(front, key=lambda t: t.values[1])
    ax.plot([t.values[1] for t in f], [t.values[0] * 100 for t in f], "o-", c="tab:green", label="Pareto front")
    for t in f:
        ax.annotate(f"ξ={t.params['xi']:.2f} w{t.params['w_bits']}a{t.params['a_bits']}",
                    (t.values[1], t.values[0] * 100), fontsize=7, textcoords="offset points", xytext=(4, 3))
    ax.scatter([chosen.values[1]], [chosen.values[0] * 100], s=160, facecolors="none", edgecolors="k",
               label="chosen")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("deployed quantized validation accuracy (%)")
    ax.set_title(f"study {study.study_name}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


OBJECTIVE = "val_acc_q"   # (maximise) the deployed model's accuracy on the validation split; (minimise) sim time


@flow(name="fedhq-tune", persist_result=False)
def tune_flow(config: dict[str, Any], study_name: str, trials: int, timeout: float | None = None, n_jobs: int = 1,
              storage: str | None = None, tune_epochs: bool = False) -> dict[str, Any]:
    base = from_mapping({**config, "strategy": "fedhq"})
    if base.val_fraction <= 0:
        raise ConfigError("val_fraction: tune selects on the validation split; it must be > 0")
    set_torch_threads(base)
    storage = storage or f"sqlite:///{os.path.abspath(os.path.join(base.state_dir, 'optuna.db'))}"
    os.makedirs(base.state_dir, exist_ok=True)
    ds = load_data(base)
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                                directions=["maximize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(seed=base.seed))
    if study.trials and study.user_attrs.get("objective") != OBJECTIVE:
        raise ConfigError(f"study: {study_name!r} in {storage} was scored on the test split by an older build; "
                          "give a new --study name")
    study.set_user_attr("objective", OBJECTIVE)
    tracker = tracker_for(base)
    parent = tracker.start(f"tune-{study_name}", {**base.public_dict(), "study": study_name, "storage": storage,
                                                 "trials": trials}, tags={"kind": "tune"}) if tracker else None
    sim0 = Simulation(base, dataset=ds)
    speed = T.profile_hardware(sim0, None)
    bundles: dict[int, tuple[dict, dict]] = {}
    lock = threading.Lock()

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        changes: dict[str, Any] = {"xi": trial.suggest_float("xi", 0.0, 1.0),
                                   "w_bits": trial.suggest_int("w_bits", 2, 8),
                                   "a_bits": trial.suggest_int("a_bits", 2, 8)}
        if tune_epochs:
            changes["local_epochs"] = trial.suggest_int("local_epochs", 1, 4)
        cfg = base.replace(**changes)
        sim = Simulation(cfg, dataset=ds)
        sim.profile(speed)
        obtain_significance(sim, tracker_for(cfg))   # a covering family's model, or online: never a pilot
        res = execute_run(cfg, sim=sim, speed=speed, parent_run_id=parent, register=False,
                          run_name=f"{study_name}-trial-{trial.number}")
        trial.set_user_attr("run_id", res["run_id"])
        with lock:
            bundles[trial.number] = (sim.deployed_bundle(), model_tags(sim, res))
        # the objective reads the validation split (never the test split, which is only reported)
        trial.set_user_attr("test_acc_q", res["final_acc_q"])
        return res["final_acc_q_val"], res["total_sim_s"]

    main_ctx = contextvars.copy_context()  # trials on Optuna's threads still see the flow's context
    study.optimize(lambda t: main_ctx.copy().run(objective, t), n_trials=trials, timeout=timeout, n_jobs=n_jobs,
                   catch=())
    out = finish_study(study, storage, base, tracker, parent, bundles)
    print(f"fedhq tune: study {study_name!r} in {storage}", file=sys.stderr)
    return out



def finish_study(study: optuna.Study, storage: str, base: ExperimentConfig, tracker, parent: str | None,
                 bundles: dict[int, tuple[dict, dict]]) -> dict[str, Any]:
    """The study's Pareto front and chosen trial: plotted, logged on the study's MLflow run, the
    chosen trial's model registered (when it ran in this process), and published in Prefect."""
    study_name = study.study_name
    front = study.best_trials
    chosen = choose(front)
    out: dict[str, Any] = {
        "study": study_name, "storage": storage, "n_trials": len(study.trials),
        "pareto_front": [{"trial": t.number, **t.params, "val_acc_q": t.values[0], "sim_s": t.values[1],
                          "test_acc_q": t.user_attrs.get("test_acc_q"), "run_id": t.user_attrs.get("run_id")}
                         for t in sorted(front, key=lambda t: t.values[1])],
        "chosen": {"trial": chosen.number, **chosen.params, "val_acc_q": chosen.values[0], "sim_s": chosen.values[1],
                   "test_acc_q": chosen.user_attrs.get("test_acc_q")},
    }
    plot = pareto_plot(study, front, chosen, os.path.join(base.state_dir, "plots", f"tune-{study_name}",
                                                          "pareto.png"))
    out["plot"] = plot
    if tracker:
        tracker.run_id = parent
        tracker.log_artifact(plot, "plots")
        tracker.log_dict(out, "pareto.json")
        if chosen.number in bundles:  # trials of this process; resumed ones have no bundle here
            bundle, tags = bundles[chosen.number]
            tracker.run_id = chosen.user_attrs["run_id"]
            out["model_version"] = tracker.register_global_model(
                bundle, {**tags, **{f"param_{k}": v for k, v in chosen.params.items()}, "study": study_name,
                         "trial": chosen.number})
        tracker.run_id = parent
        run_url = tracker.run_url()
        tracker.end()
    from flows.artifacts import publish_table

    publish_table(f"tune-{study_name}", [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                                         for r in out["pareto_front"]],
                  f"Pareto front of study {study_name!r} ({out['n_trials']} trials); chosen trial "
                  f"{out['chosen']['trial']}" + (f", registered as version {out['model_version']}"
                                                 if out.get("model_version") else ""),
                  {"MLflow study run": run_url} if tracker else None)
    return out

def run_tune(cfg: ExperimentConfig, study: str, trials: int, timeout: float | None, n_jobs: int,
             storage: str | None, tune_epochs: bool) -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return tune_flow(cfg.public_dict(), study, trials, timeout, n_jobs, storage, tune_epochs)
