"""Prefect flows and deployments of FedHQ.

Importing this package sets Prefect's defaults for a local, offline run *before* Prefect is
imported: PREFECT_HOME inside the project's state folder (unless the user set it), analytics
off, and no API URL, so Prefect runs in its ephemeral mode. Set ``PREFECT_API_URL`` to use a
real server.
"""
from __future__ import annotations

import os
from pathlib import Path


def configure_prefect_env(state_dir: str | None = None) -> None:
    state = Path(state_dir or os.environ.get("FEDHQ_STATE_DIR", ".fedhq")).resolve()
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


configure_prefect_env()


def prestart_ephemeral_server():
    """Boot Prefect's ephemeral API server in a background thread, so that its start-up overlaps
    with loading the data. Returns the thread (join it before the first flow), or None when a
    server is configured (PREFECT_API_URL) and nothing needs starting."""
    import threading

    if os.environ.get("PREFECT_API_URL"):
        return None

    def _start() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        try:
            SubprocessASGIServer().start()
        except Exception:  # the flow's own start will retry and report the error
            pass

    thread = threading.Thread(target=_start, name="prefect-ephemeral-start", daemon=True)
    thread.start()
    return thread
