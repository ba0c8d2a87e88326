"""FedHQ as a library: one experiment from a config, no Prefect, no MLflow.

::

    from fedhq_core import run_experiment

    summary = run_experiment({"strategy": "fedhq", "rounds": 10, "clients": 20})
    print(summary["final_acc_q"], summary["total_sim_s"])

The config is what ``fedhq run --config`` reads, as a dict, a YAML path or an
:class:`ExperimentConfig`; keyword overrides win. It is validated the same way (a
:class:`ConfigError` names the field). Clients train on threads in the plain-Python round loop
(:func:`fedhq_core.loop.run`); nothing is tracked, and checkpoints are written only when
``checkpoints=True``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .config import ExperimentConfig, from_mapping, load_config


def experiment_config(config: dict[str, Any] | ExperimentConfig | str | os.PathLike | None = None,
                      **overrides: Any) -> ExperimentConfig:
    """The validated config of ``config`` (dict, YAML path, config object or None for the
    defaults) with ``overrides``; the library never tracks (``tracking`` is forced off)."""
    if isinstance(config, ExperimentConfig):
        cfg = config
    elif isinstance(config, (str, os.PathLike)):
        cfg = load_config(str(Path(config)))
    else:
        cfg = from_mapping(dict(config or {}), source="config dict")
    values = {**overrides, "tracking": False}
    return from_mapping(values, base=cfg, source="overrides")


def run_experiment(config: dict[str, Any] | ExperimentConfig | str | os.PathLike | None = None, *,
                   on_round: Callable[[Any], None] | None = None, checkpoints: bool = False,
                   return_simulation: bool = False, **overrides: Any) -> Any:
    """Run one experiment and return its summary (the dict ``fedhq run --json`` writes: per-round
    records, ``final_acc_q``, ``final_acc_fp32``, ``total_sim_s``, ``charged_total_sim_s``, ...).

    Parameters
    ----------
    config : dict, YAML path, ExperimentConfig or None (default None: the embedded digits job)
    on_round : called with each round's :class:`~fedhq_core.records.RoundRecord` (default None)
    checkpoints : save a checkpoint after every round under ``state_dir`` (default False)
    return_simulation : return ``(summary, simulation)``; the simulation's
        ``deployed_bundle()`` is what ``tasks.onnx_export.export_bundle`` writes as ONNX
        (default False)
    **overrides : config fields, e.g. ``rounds=5``
    """
    from .checkpoint import Checkpoints, runs_root
    from .loop import run

    cfg = experiment_config(config, **overrides)
    ckpt = None
    if checkpoints:
        import uuid

        ckpt = Checkpoints(runs_root(cfg.state_dir) / f"lib-{uuid.uuid4().hex[:12]}", cfg.checkpoint_keep)
    sim = run(cfg, on_round=on_round, checkpoints=ckpt)
    summary = sim.summary()
    return (summary, sim) if return_simulation else summary
