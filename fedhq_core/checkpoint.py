"""Checkpoints: after every round the server's whole state goes to one file, atomically.

A run's folder is ``<state_dir>/runs/<run id>/`` (the run id is the MLflow run's, or a local
one when tracking is off). Its ``checkpoints/round-NNNN.ckpt`` files hold

    b"FEDHQCK1" | sha256 of the rest (32 bytes) | torch.save({"meta": JSON text, "tensors": {...}})

written to a temporary file, flushed to disk and renamed over the final name, so a crash (even
SIGKILL) leaves either the old or the new checkpoint, never half of one. Loading checks the
magic and the digest before ``torch.load(weights_only=True)``, which cannot run code. A corrupt
or truncated file raises :class:`CheckpointError`; :meth:`Checkpoints.load_latest` then falls
back to the previous good one. The newest ``keep`` checkpoints stay on disk.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError

MAGIC = b"FEDHQCK1"


def write_atomic(path: Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` via a temporary file and rename (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"meta": json.dumps(meta), "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()}},
               buf)
    body = buf.getvalue()
    write_atomic(path, MAGIC + hashlib.sha256(body).digest() + body)


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and load one checkpoint, or raise CheckpointError naming the file and the fault."""
    try:
        blob = Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    if not blob.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a FedHQ checkpoint (bad header)")
    digest, body = blob[len(MAGIC):len(MAGIC) + 32], blob[len(MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{path}: truncated or corrupt (checksum mismatch, {len(blob)} bytes)")
    try:
        obj = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
        return dict(obj["tensors"]), json.loads(obj["meta"])
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__})") from None


def runs_root(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / "runs"


def find_run(state_dir: str | os.PathLike, run_id: str) -> Path:
    """The folder of run ``run_id``, or for ``latest`` of the unfinished run (no ``DONE`` marker)
    with the newest checkpoint: a run that completed is not a run to resume."""
    root = runs_root(state_dir)
    if run_id == "latest":
        runs = [p for p in root.glob("*/checkpoints/round-*.ckpt") if not (p.parent.parent / "DONE").exists()]
        if not runs:
            raise CheckpointError(f"{root}: no unfinished run with a checkpoint to resume")
        return max(runs, key=lambda p: p.stat().st_mtime).parent.parent
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise CheckpointError(f"resume: invalid run id {run_id!r}")
    folder = root / run_id
    if not (folder / "checkpoints").is_dir():
        raise CheckpointError(f"{folder}: no checkpoints for run {run_id}")
    return folder


class Checkpoints:
    """The checkpoints of one run; ``save(sim)`` after each round, ``load_latest()`` to resume."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3,
                 on_save: Callable[[Path, Any], None] | None = None):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep
        self.on_save = on_save        # e.g. log to MLflow every N rounds
        self.last: Path | None = None

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("round-*.ckpt"))

    phase = "checkpoint"   # as an observer of the round loop (fedhq_core.loop)

    def on_round(self, sim: Any, rec: Any) -> None:
        self.save(sim)

    def save(self, sim: Any) -> Path:
        tensors, meta = sim.state_dict()
        path = self.dir / f"round-{sim.rnd - 1:04d}.ckpt"
        save_state(path, tensors, meta)
        for old in self.files()[:-self.keep]:
            old.unlink(missing_ok=True)
        self.last = path
        if self.on_save is not None:
            self.on_save(path, sim)
        return path

    def load_latest(self, warn: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
        """The newest checkpoint that verifies; each bad one is reported through ``warn``."""
        files = self.files()
        for i, path in enumerate(reversed(files)):
            try:
                tensors, meta = read_state(path)
            except CheckpointError as err:
                older = files[len(files) - 2 - i].name if i + 1 < len(files) else None
                warn(f"{err}; " + (f"falling back to {older}" if older else "no older checkpoint"))
                continue
            self.last = path
            return tensors, meta, path
        raise CheckpointError(f"{self.dir}: no readable checkpoint to resume from")

    def mark_done(self) -> None:
        write_atomic(self.run_dir / "DONE", b"")

    @property
    def done(self) -> bool:
        return (self.run_dir / "DONE").exists()
