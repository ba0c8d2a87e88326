"""A training run's MLflow calls, sent in order by one background thread, that outlive an outage.

During a run every tracking call (metrics, tags, artifacts, model files, registrations, the
run's end) becomes an *op*: a small JSON-able dict, put in the outbox and sent by the outbox's
thread, so the rounds never wait on the server. When the server does not answer (refused or
dropped connections, time-outs, 502/503/504), the thread prints one warning line, keeps the op
and tries again every few seconds; the run goes on. Ops wait in memory up to ``limit``; beyond
that they are appended to ``spill.jsonl`` in the outbox folder (the run folder's
``mlflow-outbox``) and read back in order, so the buffer is bounded and nothing is dropped. When
the server answers again a second line says how many held calls were sent.

If the server is still away when the run ends, :meth:`Outbox.park` writes every unsent op to
``ops.jsonl`` (files they name are copied into the folder first) with the tracking URI, and
``fedhq upload <run folder>`` sends them later (:func:`upload`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

OPS_FILE = "ops.jsonl"
SPILL_FILE = "spill.jsonl"
TARGET_FILE = "target.json"
_OUTAGE_WORDS = ("connection", "max retries exceeded", "timed out", "timeout", "temporarily unavailable",
                 "bad gateway", "gateway time", "service unavailable", " 502", " 503", " 504", "remote end closed")


def unreachable(err: BaseException) -> bool:
    """True for errors that mean the server is away (try again later), not that it refused the call."""
    try:
        import requests

        if isinstance(err, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(err).__name__} {err}".lower()
    return any(w in text for w in _OUTAGE_WORDS)


def warn(msg: str) -> None:
    print(f"fedhq: warning: {msg}", file=sys.stderr, flush=True)


def send_op(client: Any, register: Callable[..., str], op: dict[str, Any]) -> Any:
    """Perform one op against ``client`` (an ``MlflowClient``); returns what the call returns."""
    kind, run_id = op["kind"], op.get("run_id")
    if kind == "metrics":
        from mlflow.entities import Metric

        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]])
    elif kind == "tags":
        from mlflow.entities import RunTag

        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, op["path"], op.get("artifact_path"))
    elif kind == "artifacts":
        client.log_artifacts(run_id, op["path"], op.get("artifact_path"))
    elif kind == "dict":
        client.log_dict(run_id, op["data"], op["name"])
    elif kind == "register":
        return register(op["name"], op["uri"], op["tags"], tuple(op.get("aliases", ())), run_id)
    elif kind == "end":
        client.set_terminated(run_id, op["status"])
    else:
        raise ValueError(f"unknown tracking op {kind!r}")
    return None


class Outbox:
    """See the module docstring. ``folder``: where ops wait on disk (spill, park)."""

    def __init__(self, client: Any, register: Callable[..., str], folder: Path, limit: int = 10000,
                 retry_s: float = 2.0, target: dict[str, Any] | None = None):
        self.client, self.register, self.folder = client, register, Path(folder)
        self.limit, self.retry_s, self.target = max(1, limit), retry_s, dict(target or {})
        self._q: deque[tuple[dict[str, Any], Future]] = deque()
        self._cv = threading.Condition()
        self._spilled = 0             # ops waiting in the spill file, after every op in memory
        self._stop = False
        self.offline_since: float | None = None
        self.held_max = 0
        self._thread = threading.Thread(target=self._loop, name="fedhq-mlflow-outbox", daemon=True)
        self._thread.start()

    # --- producer side ----------------------------------------------------------------
    @property
    def offline(self) -> bool:
        return self.offline_since is not None

    def pending(self) -> int:
        with self._cv:
            return len(self._q) + self._spilled

    def put(self, op: dict[str, Any]) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._stop:
                raise RuntimeError("outbox closed")
            if self._spilled or len(self._q) >= self.limit:
                if not self._spilled:
                    warn(f"{len(self._q)} tracking calls held in memory (outbox_limit); further ones wait in "
                         f"{self.folder / SPILL_FILE} until MLflow answers")
                self._append(SPILL_FILE, [self._stage(op)])
                self._spilled += 1
                fut.set_result(None)   # its answer is not awaited (only metrics and tags spill in practice)
            else:
                self._q.append((op, fut))
            self.held_max = max(self.held_max, len(self._q) + self._spilled)
            self._cv.notify_all()
        return fut

    def stage(self, op: dict[str, Any], always: bool = False) -> dict[str, Any]:
        """``op`` with the file it names copied into the outbox folder when the server is away (a
        checkpoint may be rotated out before the server is back), or ``always``."""
        return self._stage(op) if always or self.offline else op

    def drain(self, timeout: float) -> bool:
        """Wait until every op is sent, at most ``timeout`` seconds; True when all were."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._q or self._spilled:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.5))
            return True

    def close(self) -> None:
        """Stop the sender after a drain; nothing is left to keep, so the folder goes too."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=self.retry_s + 60)
        if not self._q and not self._spilled:
            shutil.rmtree(self.folder, ignore_errors=True)

    def park(self) -> Path:
        """Stop sending and write every unsent op, in order, to ``ops.jsonl`` for :func:`upload`."""
        with self._cv:
            self._stop = True
            ops = [self._stage(op) for op, _ in self._q]
            self._q.clear()
            self._cv.notify_all()
        self._thread.join(timeout=5)
        spill = self.folder / SPILL_FILE
        self._append(OPS_FILE, ops)
        if spill.exists():
            with open(spill) as src, open(self.folder / OPS_FILE, "a") as dst:
                shutil.copyfileobj(src, dst)
            spill.unlink()
        (self.folder / TARGET_FILE).write_text(json.dumps(self.target))
        return self.folder

    # --- the sender thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._spilled and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                if not self._q:
                    self._load_spill()
                    continue
                op, fut = self._q[0]
            try:
                result = send_op(self.client, self.register, op)
            except Exception as err:  # noqa: BLE001 - the server's problem, not the run's
                if unreachable(err):
                    self._went_away(err)
                    with self._cv:
                        self._cv.wait_for(lambda: self._stop, timeout=self.retry_s)
                    continue
                warn(f"MLflow refused a tracking call ({op['kind']}): {str(err)[:200]}")
                result = None
            with self._cv:
                if self._q and self._q[0][0] is op:
                    self._q.popleft()
                parked = self._stop     # parked while this call was in flight: ops.jsonl names its file
                self._cv.notify_all()
            if not parked:
                self._unstage(op)
            fut.set_result(result)
            if self.offline:
                self._came_back()

    def _went_away(self, err: BaseException) -> None:
        if self.offline_since is None:
            self.offline_since = time.monotonic()
            warn(f"MLflow at {self.target.get('tracking_uri', '?')} does not answer ({type(err).__name__}); "
                 f"the run goes on and its tracking calls are held (up to {self.limit} in memory, then in "
                 f"{self.folder}) until it does")

    def _came_back(self) -> None:
        away = time.monotonic() - (self.offline_since or time.monotonic())
        self.offline_since = None
        print(f"fedhq: MLflow answers again after {away:.0f} s; sending {self.pending() + 1} held tracking "
              f"calls", file=sys.stderr, flush=True)

    def _load_spill(self) -> None:
        """Move up to ``limit`` spilled ops back to memory, in order (the lock is held)."""
        spill = self.folder / SPILL_FILE
        lines = spill.read_text().splitlines() if spill.exists() else []
        take, rest = lines[:self.limit], lines[self.limit:]
        for line in take:
            self._q.append((json.loads(line), Future()))
        if rest:
            spill.write_text("\n".join(rest) + "\n")
        elif spill.exists():
            spill.unlink()
        self._spilled = len(rest)

    # --- files ------------------------------------------------------------------------
    def _append(self, name: str, ops: list[dict[str, Any]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / name, "a") as f:
            for op in ops:
                f.write(json.dumps(op) + "\n")

    def _stage(self, op: dict[str, Any]) -> dict[str, Any]:
        path = op.get("path")
        if op["kind"] not in ("artifact", "artifacts") or not path or self._inside(path):
            return op
        dst = self.folder / "files" / f"{time.time_ns()}-{Path(path).name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if op["kind"] == "artifacts" else shutil.copy2)(path, dst)
        return dict(op, path=str(dst))

    def _inside(self, path: str) -> bool:
        return Path(path).resolve().is_relative_to(self.folder.resolve())

    def _unstage(self, op: dict[str, Any]) -> None:
        path = op.get("path")
        if op["kind"] in ("artifact", "artifacts") and path and self._inside(path):
            (shutil.rmtree if os.path.isdir(path) else os.unlink)(path)


OP_KINDS = ("metrics", "tags", "artifact", "artifacts", "dict", "register", "end")
REMOTE_MODEL_URIS = ("runs:/", "models:/")


def check_outbox(folder: Path) -> list[dict[str, Any]]:
    """Every op of a parked outbox, refused as a whole (one-line ``CheckpointError``, nothing sent)
    unless each is a tracking call FedHQ writes and every file it sends lies inside the run
    folder (``folder``'s parent), symbolic links resolved: a folder made elsewhere cannot make
    ``fedhq upload`` send a file from outside it."""
    from fedhq_core.errors import CheckpointError

    path = folder / OPS_FILE
    run_dir = folder.parent.resolve()

    def refuse(n: int, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: line {n}: {why}; nothing was sent")

    def inside(p: Any) -> bool:
        return isinstance(p, str) and bool(p) and Path(p).resolve().is_relative_to(run_dir)

    ops = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            op = json.loads(line)
        except ValueError:
            raise refuse(n, "not a tracking call (not JSON)") from None
        kind = op.get("kind") if isinstance(op, dict) else None
        if kind not in OP_KINDS:
            raise refuse(n, f"unknown tracking call {kind!r}")
        files = [op.get("path")] if kind in ("artifact", "artifacts") else []
        if kind == "register" and not str(op.get("uri", "")).startswith(REMOTE_MODEL_URIS):
            files = [op.get("uri")]
        if kind == "artifacts" and inside(op.get("path")) and os.path.isdir(op["path"]):
            files += [os.path.join(d, f) for d, _, names in os.walk(op["path"]) for f in names]
        bad = next((f for f in files if not inside(f)), None)
        if files and (bad is not None or not all(os.path.exists(f) for f in files)):
            raise refuse(n, f"{kind} names {bad or files[0]!r}, which is not a file inside the run folder {run_dir}")
        ops.append(op)
    return ops


def upload(folder: Path, client: Any, register: Callable[..., str], log: Callable[[str], None]) -> dict[str, Any]:
    """Send a parked outbox (``folder``/ops.jsonl) in order, once :func:`check_outbox` has passed
    every op; stops at the first failure and keeps the ops not yet sent. Returns what was sent
    and the registered versions."""
    path = folder / OPS_FILE
    lines = path.read_text().splitlines()
    ops = check_outbox(folder)
    versions: list[str] = []
    for i, op in enumerate(ops):
        try:
            result = send_op(client, register, op)
        except Exception:
            path.write_text("\n".join(lines[i:]) + "\n")
            raise
        if op["kind"] == "register" and result is not None:
            versions.append(f"{op['name']} version {result}")
    log(f"sent {len(lines)} tracking calls" + (f"; registered {', '.join(versions)}" if versions else ""))
    shutil.rmtree(folder)
    return {"sent": len(lines), "registered": versions}
