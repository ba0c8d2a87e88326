"""MLflow tracking for FedHQ runs: settings from ``mlflow.yaml``, run/metric logging and the
model registry. Only this package (and flows/) import mlflow; fedhq_core never does.

Settings precedence: CLI ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``mlflow.yaml`` in the
working folder > the packaged defaults (a sqlite file ``mlflow.db`` in the working folder with
artifacts under ``./mlartifacts``).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from fedhq_core.config import redact_uri


DEFAULTS = {
    "tracking_uri": "sqlite:///mlflow.db",
    "artifact_location": "./mlartifacts",
    "experiment": "fedhq",
    "registered_model": "fedhq-global-model",
    "cost_model": "fedhq-cost-model",
    "significance_model": "fedhq-significance",
    "async_logging": True,
    # where the MLflow UI serves this store, for links from the Prefect UI (default: the tracking
    # server itself, else what `mlflow ui` serves locally)
    "ui_url": None,
    # a training run's tracking calls held in memory while the server does not answer; beyond
    # this many they wait on disk in the run folder (nothing is dropped)
    "outbox_limit": 10000,
    # at the end of a run, how long to wait for an unreachable server before leaving what is
    # unsent (summary and model included) in the run folder for `fedhq upload`
    "outage_wait_s": 30.0,
}

# Explicit requirements: MLflow's inference imports the model and takes ~10 s per call.
def pip_requirements() -> list[str]:
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy", "safetensors", "fedhq"]


@dataclass
class TrackingSettings:
    tracking_uri: str
    artifact_location: str | None
    experiment: str
    registered_model: str
    cost_model: str
    significance_model: str
    async_logging: bool = True
    ui_url: str | None = None
    outbox_limit: int = 10000
    outage_wait_s: float = 30.0

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, tracking_uri: str | None = None,
             experiment: str | None = None, registered_model: str | None = None) -> "TrackingSettings":
        from fedhq_core.config import read_yaml

        values = dict(DEFAULTS)
        p = Path(path) if path else Path(os.environ.get("FEDHQ_MLFLOW_YAML", "mlflow.yaml"))
        if p.is_file():
            data = read_yaml(p)
            unknown = set(data) - set(DEFAULTS)
            if unknown:
                from fedhq_core.config import ConfigError
                raise ConfigError(f"{sorted(unknown)[0]}: unknown key in {p}")
            values.update({k: v for k, v in data.items() if v is not None})
        if os.environ.get("MLFLOW_TRACKING_URI"):
            values["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
        if tracking_uri:
            values["tracking_uri"] = with_credentials(tracking_uri)
        if experiment:
            values["experiment"] = experiment
        if registered_model:
            values["registered_model"] = registered_model
        art = values.get("artifact_location")
        if str(values["tracking_uri"]).startswith(("http://", "https://")) and art and "://" not in str(art):
            art = None  # a tracking server stores artifacts where its --artifacts-destination says
        elif art and "://" not in str(art):
            art = Path(art).resolve().as_uri()
        values["artifact_location"] = art
        if not values.get("ui_url"):
            uri = str(values["tracking_uri"])
            values["ui_url"] = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        values["ui_url"] = redact_uri(str(values["ui_url"]).rstrip("/"))   # links are shown: no credentials
        return cls(**values)


_lock = threading.Lock()


STATE_FILE = "state.json"   # a model stored as data (log_state)
_SECRET_WORDS = ("password", "secret", "token", "access_key", "credential", "api_key")


def redact(key: str, value: str) -> str:
    """What may be logged of a param: secrets by name masked, credentials dropped from URLs."""
    from fedhq_core.config import redact_uri

    if any(w in key.lower() for w in _SECRET_WORDS):
        return "***"
    return redact_uri(value) or value


def with_credentials(uri: str) -> str:
    """A URI FedHQ wrote redacted (``***@``, ``token=***``) takes its credentials back from
    ``MLFLOW_TRACKING_URI`` when that is the same URI unredacted; otherwise it is refused in one
    line (credentials are never written, so they must come from the environment or a flag)."""
    from fedhq_core.config import redact_uri
    from fedhq_core.errors import ConfigError

    if "***" not in uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and redact_uri(env) == uri:
        return env
    raise ConfigError(f"tracking_uri: {uri} was saved without its credentials; give them with MLFLOW_TRACKING_URI "
                      f"or --tracking-uri")


def probe_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Before a run starts: an http(s) tracking server that does not accept a connection is a
    one-line ConfigError (the user expects a run to be tracked where they said; an outage *during*
    a run is the outbox's job). Local stores (sqlite, file) need no server."""
    import socket
    from urllib.parse import urlsplit

    from fedhq_core.config import redact_uri
    from fedhq_core.errors import ConfigError

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"tracking_uri: no MLflow server answers at {redact_uri(uri)} ({type(err).__name__}: "
                          f"{err}); start it, point --tracking-uri elsewhere, or run with --no-tracking") from None


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def _without_type_hint_notice(show: Any) -> Any:
    def filtered(message, category, filename, lineno, file=None, line=None):
        if "Add type hints to the `predict` method" not in str(message):
            show(message, category, filename, lineno, file, line)
    return filtered


@contextlib.contextmanager
def without_type_hint_notice():
    """``predict()`` takes any array-like on purpose; MLflow's hint about type hints is noise here.
    MLflow warns when the PythonModel class is defined, under a "once" filter of its own that
    overrides ours, so the hint is dropped where warnings are shown."""
    with warnings.catch_warnings():
        warnings.showwarning = _without_type_hint_notice(warnings.showwarning)
        yield


class Tracker:
    """One MLflow run. Thread-safe; metrics are logged asynchronously off the hot path."""

    def __init__(self, settings: TrackingSettings):
        import logging

        import mlflow
        from mlflow import MlflowClient

        # the store's one-time "Creating initial MLflow database tables" INFO lines are MLflow's,
        # not the run's: keep them off the first screen (warnings and errors still show)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.settings = settings
        self.mlflow = mlflow
        if str(settings.tracking_uri).startswith(("http://", "https://")):
            # the outbox retries a server that is away; MLflow's own retries (7, with a backoff
            # of minutes) would only delay noticing it. A user's settings win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client = MlflowClient(tracking_uri=settings.tracking_uri)
        self.run_id: str | None = None
        self._pending: list[Any] = []
        self._experiment_ids: dict[str, str] = {}   # run id -> experiment id (URLs without a call)
        self._deadline: float | None = None
        self.outbox: Any = None                       # tasks.outbox.Outbox during a training run
        self.parked: Path | None = None               # where unsent calls wait for `fedhq upload`

    # --- outage-proof calls during a training run (tasks.outbox) -------------------------
    def begin_outbox(self, folder: str | os.PathLike) -> None:
        """From now until :meth:`end`, calls go through an outbox that survives the server going away."""
        from tasks.outbox import Outbox

        self.parked = None
        self._deadline = None   # the run's end waits on an away server outage_wait_s in all
        self.outbox = Outbox(self.client, self.register, Path(folder), self.settings.outbox_limit,
                             target={"tracking_uri": redact_uri(self.settings.tracking_uri), "run_id": self.run_id})

    def _put(self, op: dict[str, Any]):
        return self.outbox.put(self.outbox.stage(dict(op, run_id=self.run_id)))

    def experiment_id(self, name: str | None = None) -> str:
        name = name or self.settings.experiment
        with _lock:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            return self.client.create_experiment(name, artifact_location=self.settings.artifact_location)

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, run_id: str | None = None) -> str:
        if run_id:
            self.run_id = run_id
            return run_id
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self._experiment_ids[self.run_id] = run.info.experiment_id
        flat: dict[str, str] = {}
        _flatten("", params, flat)
        from mlflow.entities import Param
        items = [Param(k, redact(k, v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        return self.run_id

    def run_url(self) -> str:
        """The run's page in the MLflow UI."""
        exp = self._experiment_ids.get(self.run_id) or self.client.get_run(self.run_id).info.experiment_id
        return f"{self.settings.ui_url}/#/experiments/{exp}/runs/{self.run_id}"

    def model_version_url(self, version: str, name: str | None = None) -> str:
        return f"{self.settings.ui_url}/#/models/{name or self.settings.registered_model}/versions/{version}"

    def resume(self, run_id: str, from_round: int) -> str:
        """Continue run ``run_id`` (killed or failed) after its checkpointed round ``from_round``."""
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "fedhq.resumed_after_round", str(from_round))
        self.run_id = run_id
        return run_id

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.outbox:
            self._put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v == v]  # drop NaN
        if self.outbox:
            self._put({"kind": "metrics", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in ms]})
        elif self.settings.async_logging:
            self._pending.append(self.client.log_batch(self.run_id, metrics=ms, synchronous=False))
        else:
            self.client.log_batch(self.run_id, metrics=ms)

    def log_dict(self, data: dict, name: str) -> None:
        if self.outbox:
            self._put({"kind": "dict", "data": json.loads(json.dumps(data, default=str)), "name": name})
        else:
            self.client.log_dict(self.run_id, data, name)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.outbox:
            self._put({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def flush(self) -> None:
        for op in self._pending:
            if op is not None:
                op.wait()
        self._pending.clear()

    def end(self, status: str = "FINISHED") -> None:
        """End the run. With an outbox: wait up to ``outage_wait_s`` for it to drain; if the server
        is still away, park the unsent calls in the run folder (``self.parked``)."""
        if self.outbox:
            self._put({"kind": "end", "status": status})
            box, self.outbox = self.outbox, None
            if box.drain(self._end_wait()):
                box.close()
            else:
                self.parked = box.park()
            return
        self.flush()
        self.client.set_terminated(self.run_id, status)

    # --- registry --------------------------------------------------------------------
    def _log_model_dir(self, save: Any, artifact_path: str) -> str:
        """Save a model with an MLflow flavour's ``save_model`` and upload it as run artifacts.

        Much cheaper than ``log_model`` (no logged-model entity, no environment inference);
        the registry version points at ``runs:/<run>/<artifact_path>`` and loads the same way.
        """
        if self.outbox:  # saved into the outbox folder; removed once sent
            path = str(self.outbox.folder / "files" / f"{artifact_path}-{os.getpid()}-{id(save)}")
            save(path)
            self._put({"kind": "artifacts", "path": path, "artifact_path": artifact_path})
            return f"runs:/{self.run_id}/{artifact_path}"
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, artifact_path)
            save(path)
            self.client.log_artifacts(self.run_id, path, artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}"

    def register_global_model(self, bundle: dict[str, Any], tags: dict[str, Any]) -> str:
        """Log the deployed model as a pyfunc model plus its int form, register it, tag it."""
        entry = str(Path(__file__).with_name("pyfunc_entry.py"))
        with tempfile.TemporaryDirectory() as tmp, without_type_hint_notice():
            from tasks.pyfunc_model import save_bundle

            files = save_bundle(bundle, tmp)
            uri = self._log_model_dir(lambda path: self.mlflow.pyfunc.save_model(
                path, python_model=entry, artifacts=files, pip_requirements=pip_requirements()), "model")
            int_size = os.path.getsize(files["int_weights"])
            if self.outbox:
                # its temporary folder goes away now: always a copy in the outbox folder
                self._put(self.outbox.stage({"kind": "artifact", "path": files["int_weights"],
                                             "artifact_path": "deployable"}, always=True))
            else:
                self.client.log_artifact(self.run_id, files["int_weights"], "deployable")
        return self._register(self.settings.registered_model, uri, dict(tags, int_model_bytes=int_size))

    def log_state(self, state: dict[str, Any], name: str, registered: str, tags: dict[str, Any],
                  aliases: tuple[str, ...] = ()) -> str:
        """Log a fitted model *as data* (``state.json``: its arrays and settings, no pickle of any
        kind) in this run and register it as a new version of ``registered``. SigAcc models are
        rebuilt from their fit data by a deterministic refit, cost models from their coefficients
        (:meth:`load_significance`, ``allocation.cost_model.ridge_from_state``)."""
        def save(path: str) -> None:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, STATE_FILE), "w") as f:
                json.dump(state, f)

        uri = self._log_model_dir(save, name)
        return self._register(registered, uri, tags, aliases)

    def _register(self, name: str, model_uri: str, tags: dict[str, Any], aliases: tuple[str, ...] = ()) -> str | None:
        """Register now, or through the outbox: then the version when the server answers within
        ``outage_wait_s``, None while it is away (the registration waits in the outbox)."""
        if not self.outbox:
            return self.register(name, model_uri, tags, aliases)
        fut = self._put({"kind": "register", "name": name, "uri": model_uri,
                         "tags": {k: str(v) for k, v in tags.items()}, "aliases": list(aliases)})
        try:
            return fut.result(timeout=self._end_wait())
        except TimeoutError:
            return None

    def _end_wait(self) -> float:
        """Seconds left of ``outage_wait_s``, counted from the first wait at the run's end (the
        registrations and the final drain share it)."""
        import time

        if self._deadline is None:
            self._deadline = time.monotonic() + self.settings.outage_wait_s
        return max(0.0, self._deadline - time.monotonic())

    def tagged_states(self, name: str, tag: str, value: str) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The versions of registered model ``name`` whose tag ``tag`` is ``value``, newest first,
        each with its ``state.json`` (:meth:`log_state`; a version stored otherwise, older or
        foreign, is skipped: never unpickled)."""
        versions = self.client.search_model_versions(f"name='{name}' and tags.{tag} = '{value}'",
                                                     order_by=["version_number DESC"])
        for mv in versions:
            state = self.load_state(mv.source)
            if state is not None:
                yield mv, state

    def count_use(self, name: str, version: Any, tag: str = "runs_reused") -> int:
        """Add one to a version's use counter (tag ``tag``); the new count."""
        used = int(version.tags.get(tag, "0")) + 1
        self.client.set_model_version_tag(name, version.version, tag, str(used))
        return used

    def load_state(self, source: str) -> dict[str, Any] | None:
        """The ``state.json`` of a version logged by :meth:`log_state` (plain JSON, read as data),
        or None when the version holds no such file."""
        import mlflow.artifacts

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/{STATE_FILE}",
                                                           dst_path=tmp, tracking_uri=self.settings.tracking_uri)
                with open(path) as f:
                    data = json.load(f)
        except Exception:  # noqa: BLE001 - missing or unreadable: not a state version
            return None
        return data if isinstance(data, dict) else None

    def register(self, name: str, model_uri: str, tags: dict[str, Any], aliases: tuple[str, ...] = (),
                 run_id: str | None = None) -> str:
        from mlflow.exceptions import MlflowException

        with _lock:
            try:
                self.client.get_registered_model(name)
            except MlflowException:
                self.client.create_registered_model(name)
            mv = self.client.create_model_version(name, model_uri, run_id=run_id or self.run_id,
                                                  tags={k: str(v) for k, v in tags.items()})
        for alias in aliases:
            self.client.set_registered_model_alias(name, alias, mv.version)
        return str(mv.version)
