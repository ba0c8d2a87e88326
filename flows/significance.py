"""SigAcc for a run, without a pilot: a family model (fitted offline over a grid of settings of
the run's dataset and model) that covers the run's setting, from the registry or as shipped with
the project; else none, and the run decides online from its own rounds. And the ``fedhq
fit-significance`` flow that builds a family and registers it."""
from __future__ import annotations

import sys
from typing import Any

from flows import configure_prefect_env

configure_prefect_env()

from prefect import flow  # noqa: E402

from fedhq_core.allocation.pilot import Family, choose_significance, parse_grid  # noqa: E402
from fedhq_core.family_build import build_family  # noqa: E402
from fedhq_core.config import from_mapping  # noqa: E402
from fedhq_core.simulation import Simulation, load_data  # noqa: E402
from tasks.run_tracking import tracker_for  # noqa: E402

from flows.runners import set_torch_threads  # noqa: E402


def obtain_significance(sim: Simulation, tracker=None):
    """The run's SigAcc model (``allocation.pilot.choose_significance``; the registry is searched
    first when tracking is on), set on ``sim``; None when it decides online. Says which and why."""
    search = tracker is not None and sim.cfg.significance == "auto"   # online: no version is used, none counted
    model = choose_significance(sim, registered_family(tracker, sim.cfg) if search else None)
    f = sim.fit
    if model is None:
        level = f.source == "family-setting"
        charged = f"; its fit charged {f.sim_s * 1e3:.2f} simulated ms" if level else ""
        print(f"fedhq: SigAcc {'from the family, setting level' if level else 'online'}: {f.detail}{charged}",
              file=sys.stderr)
    else:
        print(f"fedhq: SigAcc from {f.detail}; leave-one-setting-out CV R2 {model.cv_r2_settings:.2f}; refit "
              f"charged {f.sim_s * 1e3:.2f} simulated ms, {f.wall_s:.2f} wall s (the family's one-off build: "
              f"{f.build_sim_s:.0f} simulated s, {f.build_wall_s:.0f} wall s, {f.build_settings} settings)",
              file=sys.stderr)
    return model


@flow(name="fedhq-fit-significance", persist_result=False)
def fit_significance_flow(config: dict[str, Any], grid: str = "", settings: int = 12,
                          out: str | None = None) -> dict[str, Any]:
    """Offline SigAcc fitting of a family: paired pilots over ``settings`` settings drawn from
    ``grid`` around ``config``; registered as a version of the significance model (tags: the
    grid's ranges, the CV figures and the build cost) and, with ``out``, written as JSON."""
    cfg = from_mapping(config)
    set_torch_threads(cfg)
    grid_d = parse_grid(grid) if grid else {}
    command = f"fedhq fit-significance --grid '{grid}' --settings {settings}  # around {cfg.dataset}/{cfg.model}: " + \
        " ".join(f"{k}={v}" for k, v in sorted(cfg.public_dict().items()) if k in ("rounds", "pilot_rounds", "data_dir"))

    def report(i, c, p):
        print(f"fedhq fit-significance: setting {i + 1}/{settings} ({', '.join(f'{k}={getattr(c, k)}' for k in grid_d)})"
              f": {p['rows']} rows, mean gain {p['mean_gain']:+.3f}, setting gain {p['setting_gain']:+.2f} "
              f"± {p['setting_se']:.2f} points, {p['sim_s']:.1f} simulated s, {p['wall_s']:.1f} wall s",
              file=sys.stderr, flush=True)

    family = build_family(cfg, grid_d, settings, command, report, dataset=load_data(cfg))
    if out:
        family.save(out)
    tracker = tracker_for(cfg)
    res = {**family.tags(), **{f"r2_{k}": v for k, v in family.r2.items()}}
    if tracker:
        name = tracker.settings.significance_model
        tracker.start(f"fit-significance-{cfg.dataset}", {**cfg.public_dict(), "grid": grid, "settings": settings},
                      tags={"kind": "fit-significance"})
        tracker.log_metrics({f"r2_{k}": v for k, v in family.r2.items()})
        res["version"] = tracker.log_state(family.to_dict(), "significance", name, family.tags(), aliases=("current",))
        tracker.end()
        print(f"fedhq: registered {name} version {res['version']} as current", file=sys.stderr)
    from flows.artifacts import publish_table

    publish_table(f"significance-{cfg.dataset}", [{"measure": k, "value": str(res[k])} for k in SIG_FIGURES
                                                  if k in res], "SigAcc family fit (fedhq-significance)")
    return res


# the figures of a family fit shown by `fedhq fit-significance` and in its Prefect artifact
SIG_FIGURES = ("family", "n_settings", "n_samples", "mean_gain", "grid", "r2_train", "r2_cv", "r2_cv_rounds",
               "r2_cv_settings", "r2_setting_level", "label_client_se_median", "label_client_spread",
               "label_client_ratio", "label_setting_se_median", "label_setting_spread", "label_setting_ratio",
               "build_sim_s", "build_wall_s", "version")


def registered_family(tracker, cfg) -> tuple[Family | None, str]:
    """The newest registered SigAcc family of ``cfg``'s dataset and model that covers its setting
    (``Family.covers``), found by its ``family`` tag; with why it qualifies, or why none does. Each
    run that reuses a version is counted on it (``runs_reused``)."""
    name = tracker.settings.significance_model
    misses = []
    for mv, state in tracker.tagged_states(name, "family", f"{cfg.dataset}/{cfg.model}"):
        try:
            family = Family.from_dict(state)
        except TypeError:
            continue
        ok, miss = family.covers(cfg)
        if not ok:
            misses.append(f"{name} version {mv.version}: {miss}")
            continue
        reused = tracker.count_use(name, mv)
        return family, f"{name} version {mv.version} ({len(family.settings)} settings, reused by {reused} run(s))"
    return None, misses[0] if misses else f"no {name} version of family {cfg.dataset}/{cfg.model}"
