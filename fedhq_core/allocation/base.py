"""The Allocator seam: each round the server asks an allocator which strategy each sampled
client runs (``fp32``, ``ptq`` or ``qat``), and tells it afterwards what the round showed.

Baselines live here; the FedHQ allocator (coarse + fine stages) builds on the same interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..hardware.server_work import HostOps

if TYPE_CHECKING:  # pragma: no cover
    from ..client import ClientResult
    from ..hardware.clock import ClientTime


class FleetView(Protocol):
    """What an allocator may look at: the spec-sheet world, never the hidden slowdowns."""

    n_clients: int

    def predicted_times(self, cids: list[int]) -> dict[str, np.ndarray]: ...  # {"ptq": (n,), "qat": (n,)}


@dataclass
class RoundFeedback:
    rnd: int
    results: list["ClientResult"]
    times: dict[int, "ClientTime"]
    metrics: dict[str, float]


@dataclass
class Allocation:
    strategies: dict[int, str]
    upload_bits: dict[int, Any] = field(default_factory=dict)  # per client override (fedfq)
    info: dict[str, Any] = field(default_factory=dict)         # for logging (e.g. scatter data)

    @property
    def qat_share(self) -> float:
        return float(np.mean([s == "qat" for s in self.strategies.values()])) if self.strategies else 0.0


class Allocator:
    """Base class. Subclasses implement :meth:`allocate`; :meth:`observe` is optional."""

    name = "base"
    reads_sensitivity = False      # whether PTQ clients' on-device sensitivity reports are read

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:  # pragma: no cover
        raise NotImplementedError

    def take_host_ops(self) -> HostOps:
        """The counted host work (numpy, scikit-learn) of the allocations and observations since
        the last call, for the server's clock (``hardware.server_work``); none by default."""
        return HostOps()

    def observe(self, feedback: RoundFeedback, view: FleetView) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class UniformAllocator(Allocator):
    """Every client runs the same strategy (fp32, all-ptq, all-qat)."""

    def __init__(self, strategy: str, name: str):
        self.strategy = strategy
        self.name = name

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:
        return Allocation({c: self.strategy for c in sampled})


class RandomHybridAllocator(Allocator):
    """Random PTQ/QAT with a given QAT share (the ablation of FedHQ's choice of *which* clients)."""

    name = "random-hybrid"

    def __init__(self, qat_share: float, seed: int):
        self.qat_share = qat_share
        self.seed = seed
        self._ops = HostOps()

    def take_host_ops(self) -> HostOps:
        ops, self._ops = self._ops, HostOps()
        return ops

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:
        rng = np.random.default_rng([self.seed, 4099, rnd])
        n_qat = int(round(self.qat_share * len(sampled)))
        self._ops.add(2, len(sampled))   # one draw, one choice
        qat = set(rng.choice(sampled, size=n_qat, replace=False).tolist()) if n_qat else set()
        return Allocation({c: ("qat" if c in qat else "ptq") for c in sampled})
