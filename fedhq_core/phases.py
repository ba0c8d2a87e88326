"""Wall-clock spans of named phases, for ``fedhq bench-overhead --breakdown``.

Off unless the environment variable ``FEDHQ_PHASES`` names a JSON file: then every span (name,
round, start, end, thread) is kept in memory and the file is written when the process exits.
Times are epoch seconds, so that the parent process can line them up with the moment it started
this one (``FEDHQ_T0``). Off, a span costs one attribute check.
"""
from __future__ import annotations

import atexit
import json
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

PATH = os.environ.get("FEDHQ_PHASES") or None
ENABLED = PATH is not None
_spans: list[tuple[str, int | None, float, float, str]] = []


def add(name: str, start: float, end: float | None = None, rnd: int | None = None) -> None:
    """Record a span measured elsewhere (``time.time()`` seconds)."""
    if ENABLED:
        _spans.append((name, rnd, start, time.time() if end is None else end, threading.current_thread().name))


@contextmanager
def span(name: str, rnd: int | None = None) -> Iterator[None]:
    if not ENABLED:
        yield
        return
    t0 = time.time()
    try:
        yield
    finally:
        add(name, t0, None, rnd)


def value(name: str, v: float) -> None:
    """Record a measured quantity that is not a span (e.g. a child process's CPU seconds)."""
    if ENABLED:
        _spans.append((name, None, 0.0, float(v), "value"))


def since_launch(name: str) -> None:
    """Span from the parent's launch moment (``FEDHQ_T0``) to now: interpreter start-up."""
    t0 = os.environ.get("FEDHQ_T0")
    if ENABLED and t0:
        add(name, float(t0))


def dump(path: str | None = None) -> None:
    path = path or PATH
    if path:
        rows: list[dict[str, Any]] = [{"name": n, "round": r, "start": s, "end": e, "thread": t}
                                      for n, r, s, e, t in list(_spans)]
        with open(path, "w") as f:
            json.dump({"spans": rows, "dumped": time.time()}, f)


if ENABLED:
    atexit.register(dump)
