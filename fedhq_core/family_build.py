"""Building a SigAcc family: paired pilots (``allocation.pilot.pilot_rows``) over settings drawn
from a grid, each driving a :class:`~fedhq_core.simulation.Simulation` of its own, pooled into one
regressor. It sits above ``simulation`` (the family's data, coverage and use by a run stay in
``allocation.pilot``, which a simulation reads)."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .allocation.pilot import COVERED_FIELDS, Family, draw_settings, pilot_length, pilot_rows
from .allocation.significance import FEATURES, SignificanceModel
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
    X, gains, groups, points, sids, per = [], [], [], [], [], []
    settings = []
    t_all = time.perf_counter()
    for i, cfg in enumerate(cfgs):
        t0 = time.perf_counter()
        sim = Simulation(cfg.replace(strategy=FAST, significance="none"), dataset=dataset)
        sim.profile()
        x, g, grp, pts, sim_s = pilot_rows(sim, pilot_length(cfg))
        X.extend(x.tolist()); gains.extend(g.tolist()); points.extend(pts.tolist())
        groups.extend((i * 100_000 + grp).tolist()); sids.extend([i] * len(g))
        settings.append({f: getattr(cfg, f) for f in ("seed", *COVERED_FIELDS)})
        per.append({"sim_s": sim_s, "wall_s": time.perf_counter() - t0, "rows": len(g),
                    "mean_gain": float(np.mean(g))})
        if on_setting:
            on_setting(i, cfg, per[-1])
    m = SignificanceModel.fit(np.asarray(X), np.asarray(gains), base.seed, groups=np.asarray(groups),
                              points=np.asarray(points), settings=np.asarray(sids))
    folds = 5 + 5 + len(cfgs) + 1      # the model and its three cross-validations, on the same server
    fit_sim = price_of("gbr_fit").seconds(folds, gbr_fit_elements(len(gains), len(FEATURES), fits=folds))
    build = {"sim_s": sum(p["sim_s"] for p in per) + fit_sim, "wall_s": time.perf_counter() - t_all,
             "fit_sim_s": fit_sim, "per_setting": per, "command": command,
             "pilot_rounds": [pilot_length(c) for c in cfgs]}
    return Family(base.dataset, base.model, settings, X, gains, groups, points, sids, m.r2, build, seed=base.seed)
