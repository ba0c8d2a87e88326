"""The server's host work (its Python, numpy and scikit-learn), priced from measured constants.

Torch work on the server is traced op by op (:mod:`.server_work`). What runs on the server's
host core has no op to trace: the allocator's search and bookkeeping, the scikit-learn fits and
predictions, the label-histogram features, the decoding and checks of every upload. Each such
operation runs inside :meth:`HostWork.op`, which

* counts it: ``calls`` and ``elements`` of a named kind (e.g. ``gbr_fit``: one call, the split
  search's elements), and prices it as ``calls x per_call_s + elements x per_element_s`` from
  :data:`PRICES_FILE`, a table measured once on a reference core by the micro-benchmark
  ``python -m flows.bench_host`` (its source is shipped; it writes the table). The clock reads only
  the counts and the table, so the same config and seed give the same simulated times anywhere.
* times it on this host (``perf_counter``, exclusive of nested operations), so a run reports the
  priced and the measured seconds of the very same operations (``host_work_priced_s``,
  ``host_work_measured_s``). The measured figure is a metric only: it never reaches the clock.

The simulator's own machinery is not the server's work: pricing a step kind on a device class from
its op trace the first time (a catalog lookup for a real server) runs inside :func:`simulator_work`,
whose time leaves the operation it interrupts.

A kind that the table does not hold (a plug-in allocator's ``allocate/<name>``) is priced at the
table's dearest entry for the same verb (``allocate/*``); ``HostWork.by_kind`` marks it
``priced: false``.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

PRICES_FILE = Path(__file__).with_name("host_prices.json")


@dataclass(frozen=True)
class HostPrice:
    per_call_s: float
    per_element_s: float

    def seconds(self, calls: float, elements: float) -> float:
        return calls * self.per_call_s + elements * self.per_element_s


_OVERRIDE: list[dict[str, HostPrice]] = []
_OPEN: list["HostWork"] = []      # ledgers with an operation running (the server's thread)


def prices_from(raw: dict[str, dict[str, float]]) -> dict[str, HostPrice]:
    """A price table from its JSON form (``{kind: {per_call_s, per_element_s, ...}}``)."""
    return {k: HostPrice(float(v["per_call_s"]), float(v["per_element_s"])) for k, v in raw.items()}


@lru_cache(maxsize=4)
def _table(path: str) -> dict[str, HostPrice]:
    return prices_from(json.loads(Path(path).read_text())["prices"])


def host_prices() -> dict[str, HostPrice]:
    """The price table (kind -> :class:`HostPrice`): the shipped one, or :func:`use_prices`'s."""
    return _OVERRIDE[-1] if _OVERRIDE else _table(str(PRICES_FILE))


@contextmanager
def use_prices(table: dict[str, HostPrice]) -> Iterator[None]:
    """Price with ``table`` inside the block (the micro-benchmark: zero while it measures, then
    the table it fitted on its held-out run). A ``"*"`` entry prices every kind it lacks."""
    _OVERRIDE.append(table)
    try:
        yield
    finally:
        _OVERRIDE.pop()


def price_of(kind: str, prices: dict[str, HostPrice] | None = None) -> HostPrice:
    """``kind``'s price, or the dearest of its verb's (``allocate/x`` -> every ``allocate/*``)."""
    prices = prices if prices is not None else host_prices()
    if kind in prices:
        return prices[kind]
    if "*" in prices:
        return prices["*"]
    verb = kind.split("/")[0] + "/"
    same = [p for k, p in prices.items() if k.startswith(verb)]
    if not same:
        raise KeyError(f"host work kind {kind!r} has no price in {PRICES_FILE.name}")
    return max(same, key=lambda p: (p.per_call_s, p.per_element_s))


@dataclass
class OpCount:
    calls: float
    elements: float


@dataclass
class HostWork:
    """Counted host work by kind (``calls``, ``elements``) with the measured seconds of the same
    operations. ``samples`` (when a list) receives every operation, for the micro-benchmark."""

    kinds: dict[str, list[float]] = field(default_factory=dict)   # kind -> [calls, elements, measured_s]
    samples: list[tuple[str, float, float, float]] | None = None
    before: Callable[[str], None] | None = None   # called (untimed) with the kind of each outermost operation
    _inner: list[float] = field(default_factory=list, repr=False)

    def count(self, kind: str, calls: float, elements: float = 0.0, measured_s: float = 0.0) -> None:
        self._add_row(kind, calls, elements, measured_s)
        if self.samples is not None:
            self.samples.append((kind, float(calls), float(elements), float(measured_s)))

    @contextmanager
    def op(self, kind: str, calls: float = 1.0, elements: float = 0.0) -> Iterator["OpCount"]:
        """Count ``kind`` and time the block, less the operations nested in it (counted apart).
        The block may set the count it only learns while it runs (``as o: ... o.elements = n``)."""
        count = OpCount(calls, elements)
        if self.before is not None and not self._inner:
            self.before(kind)
        self._inner.append(0.0)
        _OPEN.append(self)
        t0 = time.perf_counter()
        try:
            yield count
        finally:
            spent = time.perf_counter() - t0
            _OPEN.pop()
            own = spent - self._inner.pop()
            if self._inner:
                self._inner[-1] += spent
            self.count(kind, count.calls, count.elements, own)

    def _exclude(self, seconds: float) -> None:
        if self._inner:
            self._inner[-1] += seconds

    def merge(self, other: "HostWork") -> "HostWork":
        for k, (c, e, m) in other.kinds.items():     # its operations were sampled when they ran
            self._add_row(k, c, e, m)
        return self

    def _add_row(self, kind: str, c: float, e: float, m: float) -> None:
        row = self.kinds.setdefault(kind, [0.0, 0.0, 0.0])
        row[0] += c
        row[1] += e
        row[2] += m

    def take(self, prefixes: tuple[str, ...] | None = None) -> "HostWork":
        """The work counted so far (of the kinds starting with ``prefixes``), removed from here."""
        taken = HostWork()
        for k in [k for k in self.kinds if prefixes is None or k.startswith(prefixes)]:
            taken.kinds[k] = self.kinds.pop(k)
        return taken

    def priced_s(self, prices: dict[str, HostPrice] | None = None) -> float:
        # summed in a fixed order (fsum): the same counts give the same seconds, bit for bit
        return math.fsum(price_of(k, prices).seconds(c, e) for k, (c, e, _) in sorted(self.kinds.items()))

    @property
    def measured_s(self) -> float:
        return float(sum(m for _, _, m in self.kinds.values()))

    def by_kind(self, prices: dict[str, HostPrice] | None = None) -> dict[str, dict[str, float]]:
        table = prices if prices is not None else host_prices()
        return {k: {"calls": c, "elements": e, "priced_s": price_of(k, table).seconds(c, e), "measured_s": m,
                    "priced": k in table}
                for k, (c, e, m) in sorted(self.kinds.items())}


def host_work_summary(round_extras: list[dict[str, Any]], setup: HostWork, rounds: HostWork) -> dict[str, Any]:
    """A run's host work, priced (on the clock) and measured on this host for the same
    operations: the rounds' from their records' extras (a resumed run's too) plus the run's
    set-up (``setup``: the family's refit). ``host_work_by_kind`` covers the set-up and the
    rounds this process ran (``rounds``)."""
    both = HostWork().merge(setup).merge(rounds)
    return {"host_work_priced_s": math.fsum(e.get("host_priced_s", 0.0) for e in round_extras) + setup.priced_s(),
            "host_work_measured_s": math.fsum(e.get("host_measured_s", 0.0) for e in round_extras) + setup.measured_s,
            "host_work_by_kind": both.by_kind()}


@contextmanager
def simulator_work() -> Iterator[None]:
    """The simulator's machinery inside a server operation: its time is not the operation's."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if _OPEN:
            _OPEN[-1]._exclude(time.perf_counter() - t0)


def fit_prices(samples: list[tuple[str, float, float, float]]) -> dict[str, dict[str, float]]:
    """Per kind, ``seconds ~ per_call x calls + per_element x elements`` (non-negative least
    squares) over the medians of the operations of equal size: one slow call (a page fault, the
    collector) moves a median, not the price."""
    import numpy as np
    from scipy.optimize import nnls

    out: dict[str, dict[str, float]] = {}
    for kind in sorted({s[0] for s in samples}):
        groups: dict[tuple[float, float], list[float]] = {}
        for _, c, e, m in (s for s in samples if s[0] == kind):
            groups.setdefault((c, e), []).append(m)
        keys = sorted(groups)
        a = np.array([[c, e] for c, e in keys], dtype=float)
        b = np.array([float(np.median(groups[k])) for k in keys])
        if len({e for _, e in keys}) < 2 or not a[:, 1].any():      # one size: a price per call
            per_call, per_el = float(b.sum() / a[:, 0].sum()), 0.0
        else:
            scale = np.maximum(a.max(axis=0), 1e-12)
            w = 1.0 / np.maximum(b, 1e-9)                           # relative error, not absolute
            coef, _ = nnls(a / scale * w[:, None], b * w)
            per_call, per_el = float(coef[0] / scale[0]), float(coef[1] / scale[1])
        pred = a[:, 0] * per_call + a[:, 1] * per_el
        out[kind] = {"per_call_s": per_call, "per_element_s": per_el, "ops": int(sum(len(v) for v in groups.values())),
                     "sizes": len(keys), "fit_mape": float(np.mean(np.abs(pred - b) / np.maximum(b, 1e-12)))}
    return out
