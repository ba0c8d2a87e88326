"""The measurement base class (see the package's docstring)."""
from __future__ import annotations

from typing import Any

DURING, CARRIED = "during", "carried"


class Measurement:
    name = ""
    when = DURING
    later_only = False
    state_key: str | None = None

    def __init__(self, cfg: Any = None):
        self.cfg = cfg
        self.history: list[Any] = []
        self.fresh: dict[str, float] = {}   # this round's figures for its record (see take)

    def active(self) -> bool:
        """Whether the server takes it at all in this run (an allocator asked for it)."""
        return True

    def measure(self, server: Any, results: list[Any]) -> float:   # pragma: no cover
        raise NotImplementedError

    def read(self) -> Any:
        return self.history

    def take(self) -> dict[str, float]:
        """The figures measured since the last call, for the round's record (once)."""
        out, self.fresh = self.fresh, {}
        return out

    def state(self) -> list[Any]:
        return list(self.history)

    def load(self, values: list[Any]) -> None:
        self.history = list(values)
