"""Scheduled deployments: a nightly training run, a weekly tuning study and a weekly refit of the
offline SigAcc model. Served by ``fedhq serve`` (``prefect.serve``, needs a Prefect server:
schedules are not run by the ephemeral one) or deployed with ``prefect deploy --all`` from
``prefect.yaml``, which declares the same three.
"""
from __future__ import annotations

from typing import Any

from fedhq_core.config import ExperimentConfig

NIGHTLY_CRON = "0 2 * * *"     # 02:00 every day
WEEKLY_TUNE_CRON = "0 3 * * 0"  # 03:00 on Sundays
REFIT_CRON = "0 4 * * 1"       # 04:00 on Mondays


def deployments(config: dict[str, Any] | None = None, nightly_cron: str = NIGHTLY_CRON,
                tune_cron: str = WEEKLY_TUNE_CRON, refit_cron: str = REFIT_CRON) -> list:
    from flows.significance import fit_significance_flow
    from flows.train import train_flow
    from flows.tune import tune_flow

    from prefect.deployments.runner import EntrypointType

    cfg = config or ExperimentConfig(strategy="fedhq").to_dict()
    mod = {"entrypoint_type": EntrypointType.MODULE_PATH}  # import flows.* as the installed package
    return [
        train_flow.to_deployment("nightly-train", cron=nightly_cron, parameters={"config": cfg},
                                 tags=["fedhq", "train"], description="Nightly FedHQ training run", **mod),
        tune_flow.to_deployment("weekly-tune", cron=tune_cron,
                                parameters={"config": cfg, "study_name": "weekly", "trials": 8},
                                tags=["fedhq", "tune"], description="Weekly Optuna study of xi and bit-widths", **mod),
        fit_significance_flow.to_deployment("refit-models", cron=refit_cron, parameters={"config": cfg},
                                            tags=["fedhq", "refit"],
                                            description="Weekly refit of the SigAcc model (fedhq-significance)",
                                            **mod),
    ]


def serve(config: dict[str, Any] | None = None, **crons: str) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(config, **crons))
