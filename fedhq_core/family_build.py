"""Building a SigAcc family: paired pilots (``allocation.pilot.pilot_rows``) over settings drawn
from a grid, each driving a :class:`~fedhq_core.simulation.Simulation` of its own, pooled into one
regressor. It sits above ``simulation`` (the family's data, coverage and use by a run stay in
``allocation.pilot``, which a simulation reads)."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .allocation.pilot import COVERED_FIELDS, Family, draw_settings, pilot_length, pilot_rows
from .allocation.significance import FEATURES, SETTING_FEATURES, SignificanceModel
from .hardware.host_work import price_of
from .hardware.server_work import gbr_fit_elements
from .simulation import Simulation, load_data
from .strategies import FAST


def build_family(base, grid: dict[str, list[Any]], n_settings: int, command: str = "",
                 on_setting: Callable[[int, Any, dict[str, Any]], None] | None = None,
                 dataset=None) -> Family:
    """Paired pilots over ``n_settings`` settings drawn from ``grid`` around ``base``, pooled; the
    regressor's CV R² by client, by round and leave-one-setting-out. ``dataset``: a loaded
    dataset to reuse (every setting reads the same one)."""
    dataset = dataset or load_data(base)
    cfgs = draw_settings(base, grid, n_settings, base.seed)
    X, gains, ses, groups, points, sids, per = [], [], [], [], [], [], []
    setting_gains, setting_ses, settings = [], [], []
    t_all = time.perf_counter()
    for i, cfg in enumerate(cfgs):
        t0 = time.perf_counter()
        sim = Simulation(cfg.replace(strategy=FAST, significance="none"), dataset=dataset)
        sim.profile()
        p = pilot_rows(sim, pilot_length(cfg))
        X.extend(p.X.tolist()); gains.extend(p.gains.tolist()); ses.extend(p.ses.tolist())
        points.extend(p.points.tolist()); groups.extend((i * 100_000 + p.groups).tolist()); sids.extend([i] * len(p.gains))
        sg, sse = p.setting_gain
        setting_gains.append(sg); setting_ses.append(sse)
        settings.append({f: getattr(cfg, f) for f in ("seed", *COVERED_FIELDS)})
        per.append({"sim_s": p.sim_s, "wall_s": time.perf_counter() - t0, "rows": len(p.gains),
                    "mean_gain": float(np.mean(p.gains)), "setting_gain": sg, "setting_se": sse})
        if on_setting:
            on_setting(i, cfg, per[-1])
    m = SignificanceModel.fit(np.asarray(X), np.asarray(gains), base.seed, groups=np.asarray(groups),
                              points=np.asarray(points), settings=np.asarray(sids))
    family = Family(base.dataset, base.model, settings, X, gains, groups, points, sids, dict(m.r2), seed=base.seed,
                    ses=ses, setting_gains=setting_gains, setting_ses=setting_ses)
    t_set = time.perf_counter()
    family.r2.update(family.setting_scores())
    t_set = time.perf_counter() - t_set
    folds = 5 + 5 + len(cfgs) + 1      # the model and its three cross-validations, on the same server
    fit_sim = price_of("gbr_fit").seconds(folds, gbr_fit_elements(len(gains), len(FEATURES), fits=folds))
    # the setting-level model's leave-one-out: one ridge fit per left-out setting, priced as a run's refit
    fit_sim += price_of("ridge_fit").seconds(len(cfgs), len(cfgs) ** 2 * len(SETTING_FEATURES))
    family.build = {"sim_s": sum(p["sim_s"] for p in per) + fit_sim, "wall_s": time.perf_counter() - t_all,
                    "fit_sim_s": fit_sim, "setting_fit_wall_s": t_set, "per_setting": per, "command": command,
                    "pilot_rounds": [pilot_length(c) for c in cfgs]}
    return family
