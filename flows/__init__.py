"""Prefect flows and deployments of FedHQ.

Importing this package sets Prefect's defaults for a local, offline run *before* Prefect is
imported: PREFECT_HOME inside the project's state folder (unless the user set it), analytics
off. Without ``PREFECT_API_URL``, a run launches its own local API server (:class:`ApiServer`,
what Prefect's ephemeral mode does, but started earlier); set ``PREFECT_API_URL`` to use a
running server instead.
"""
from __future__ import annotations

import os
from pathlib import Path


_USER_PREFECT_HOME = os.environ.get("PREFECT_HOME")   # set by the user (kept), else ours (moves with the state)


def configure_prefect_env(state_dir: str | None = None) -> None:
    """Prefect's defaults for a local, offline run, before Prefect is imported. ``state_dir`` (the
    CLI's ``--state-dir``) moves Prefect's home with FedHQ's state unless the user set
    ``PREFECT_HOME`` themselves."""
    state = Path(state_dir or os.environ.get("FEDHQ_STATE_DIR", ".fedhq")).resolve()
    if state_dir is not None and not _USER_PREFECT_HOME:
        os.environ["PREFECT_HOME"] = str(state / "prefect")
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints the run's URL as it ends, credentials and all; FedHQ prints its own, redacted
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


configure_prefect_env()


class ApiServer:
    """Prefect's API server for this process, launched the way Prefect launches its ephemeral one
    (``uvicorn --factory prefect.server.api.server:create_app`` on 127.0.0.1, no UI), but started
    before torch, Prefect and MLflow are imported, so that it boots on another core while this
    process imports and loads data. Its URL goes into ``PREFECT_API_URL``, so flows, tasks and
    local Dask workers all report to it. It stops when this process exits and, on Linux, also
    when this process is killed (parent-death signal), so no server is left behind."""

    def __init__(self) -> None:
        import importlib.util
        import socket
        import subprocess
        import sys

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.ready = False
        spec = importlib.util.find_spec("prefect")
        app_dir = str(Path(list(spec.submodule_search_locations)[0]).parent)
        env = {**LOCAL_SERVER_SETTINGS, **os.environ, "PREFECT_UI_ENABLED": "0",
               "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        env.pop("FEDHQ_PHASES", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], env=env, preexec_fn=_die_with_parent)
        import atexit

        atexit.register(self.stop)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        import time
        import urllib.error
        import urllib.request

        if self.ready:
            return
        timeout_s = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect API server exited with code {self.process.returncode} while starting")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready = True
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"Prefect API server did not answer on {self.url} within {timeout_s:g} s")

    def stop(self) -> None:
        import subprocess

        from fedhq_core.phases import span

        with span("prefect api stop"):
            self._stop(subprocess)

    def cpu_seconds(self) -> float | None:
        """The server's CPU time so far (Linux), for the overhead breakdown."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def _stop(self, subprocess) -> None:
        from fedhq_core import phases

        cpu = self.cpu_seconds()
        if cpu is not None:
            phases.value("prefect api cpu", cpu)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the atexit stop still applies
        pass


_SERVER: ApiServer | None = None

# Settings of the API server a run launches for itself (a variable set in the environment wins).
# The task-run recorder (what puts task runs in the UI) inserts task runs in batches instead of
# one by one, flushed every second: measured, it cut the server's CPU time per run by about a
# fifth. Turning off the event persister, triggers and the event stream, and skipping the
# migrations of a migrated database, were measured too and did not pay off: they stay as they are.
LOCAL_SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


def start_api_server() -> ApiServer | None:
    """Launch this process's Prefect API server (once) and point ``PREFECT_API_URL`` at it.
    None when ``PREFECT_API_URL`` names a running server already: nothing to start."""
    global _SERVER
    if _SERVER is not None:
        return _SERVER
    if os.environ.get("PREFECT_API_URL"):
        return None
    _SERVER = ApiServer()
    os.environ["PREFECT_API_URL"] = _SERVER.url
    return _SERVER


def api_settings():
    """Prefect settings pointing at this process's API server, once it answers (for a Prefect
    imported before the server was launched: its settings were read at import); a no-op context
    without one."""
    import contextlib

    if _SERVER is None:
        return contextlib.nullcontext()
    _SERVER.wait_ready()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: _SERVER.url})
