"""Prefect artifacts: what a flow run found, shown where a user of the Prefect UI looks (the flow
run's Artifacts tab, and the Artifacts page, where runs with the same key form a history)."""
from __future__ import annotations

import re
from typing import Any

from fedhq_core.config import ExperimentConfig
from fedhq_core.records import format_reasons


def artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_run(cfg: ExperimentConfig, summary: dict[str, Any]) -> None:
    """What the run found, where a user of the Prefect UI looks: a table artifact with the
    summary, and a link artifact to the MLflow run and the registered model version. Keyed by
    strategy and dataset, so that the Artifacts page shows each nightly run's as a new version."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    dataset = summary["config"]["dataset"]
    rej = summary["rejected"]
    rows = [["deployed (quantized) test accuracy", f"{summary['final_acc_q']:.4f}"],
            ["FP32 master test accuracy", f"{summary['final_acc_fp32']:.4f}"],
            ["simulated time (s)", f"{summary['total_sim_s']:.2f}"],
            ["QAT share of client updates", f"{summary['qat_share']:.2f}"],
            ["rejected client updates", f"{rej['total']}" + (f" ({format_reasons(rej['by_reason'])})"
                                                              if rej["total"] else "")],
            ["rounds", str(cfg.rounds)], ["bits", f"w{cfg.w_bits}a{cfg.a_bits}"],
            ["wall time of the run (s)", f"{summary['wall_s']:.1f}"]]
    if summary.get("model_version"):
        rows.append(["registered model version", f"{summary['registered_model']} v{summary['model_version']}"])
    create_table_artifact([{"measure": k, "value": v} for k, v in rows],
                          key=artifact_key("fedhq", cfg.strategy, dataset, "summary"),
                          description=f"FedHQ {cfg.strategy} on {dataset}, seed {cfg.seed}")
    if summary.get("mlflow_run_url"):
        create_link_artifact(summary["mlflow_run_url"], link_text=f"MLflow run {summary['run_id']}",
                             key=artifact_key("fedhq", cfg.strategy, dataset, "mlflow-run"),
                             description="the run's parameters, per-round metrics, plots and checkpoints")
    if summary.get("model_version_url"):
        create_link_artifact(summary["model_version_url"],
                             link_text=f"{summary['registered_model']} version {summary['model_version']}",
                             key=artifact_key("fedhq", cfg.strategy, dataset, "model"),
                             description="the registered deployed (quantized) model")


def publish_table(key: str, rows: list[dict[str, Any]], description: str, links: dict[str, str] | None = None) -> None:
    """A table artifact (and link artifacts, text -> URL) for the flows other than training."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    create_table_artifact(rows, key=artifact_key("fedhq", key), description=description)
    for text, url in (links or {}).items():
        create_link_artifact(url, link_text=text, key=artifact_key("fedhq", key, "link"), description=description)
