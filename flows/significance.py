"""SigAcc for a run, through the registry: a version fitted for exactly this setting is reused
(a one-off cost, counted on its version), else a pilot for this setting is run, charged to the
run, and registered; and the ``fedhq fit-significance`` flow."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

from flows import configure_prefect_env

configure_prefect_env()

from prefect import flow  # noqa: E402

from fedhq_core.allocation.pilot import fit_for_run  # noqa: E402
from fedhq_core.config import from_mapping  # noqa: E402
from fedhq_core.simulation import Simulation  # noqa: E402
from tasks import training as T  # noqa: E402
from tasks.run_tracking import tracker_for  # noqa: E402

from flows.runners import set_torch_threads, train_submitter  # noqa: E402


def obtain_significance(sim: Simulation, tracker=None, submit: Callable | None = None):
    """A registered SigAcc model fitted for exactly this setting (any version, found by its tags),
    else fit one now and register it (alias ``current`` points at the newest fit)."""
    from fedhq_core.allocation.pilot import FitInfo, pilot_length, setting_key, significance_tags

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
    model = fit_for_run(sim, submit or train_submitter(sim.cfg))   # the pilot trains where the run does
    print(f"fedhq: SigAcc R2 in-sample {model.train_r2:.2f}, cross-validated {model.cv_r2:.2f} (by client), "
          f"{model.cv_r2_rounds:.2f} (by pilot round); pilot round gains {model.tags['round_gains']}; "
          f"charged to this run: {model.fit_info.sim_s:.2f} simulated s, {model.fit_info.wall_s:.1f} wall s",
          file=sys.stderr)
    if tracker:
        tracker.start(f"fit-significance-{sim.dataset_name}", {**wanted}, tags={"kind": "fit-significance"})
        tracker.log_metrics({"train_r2": model.train_r2, "cv_r2": model.cv_r2, "cv_r2_rounds": model.cv_r2_rounds,
                             "mean_gain": model.tags["mean_gain"]})
        version = tracker.log_state(model.to_state(), "significance", name,
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
