"""The Allocator seam: each round the server asks an allocator which strategy each sampled
client runs (``fp32``, ``ptq`` or ``qat``), and tells it afterwards what the round showed.

An allocator reads the run only through :class:`FleetView` (everything it may look at, all of
it the spec-sheet world: never the hidden slowdowns) and declares what the run must measure for
it in :class:`Capabilities`; the simulation reads those declarations, it never probes. One
allocator per module: ``uniform`` (fp32, all-ptq, all-qat), ``random_hybrid``, ``fedfq``, ``fedhq``
(coarse + fine stages, also ``fedhq-coarse``).
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
    """Everything an allocator may read of the run: the spec-sheet world, never the hidden
    slowdowns (those show up only in :class:`RoundFeedback`'s observed times)."""

    n_clients: int
    rounds: int                                       # R: progress is rnd / rounds
    proxy_size: int                                   # samples in the server's proxy split

    def predicted_times(self, cids: list[int]) -> dict[str, np.ndarray]: ...  # {"ptq": (n,), "qat": (n,)}, seconds

    def shard_features(self) -> dict[int, np.ndarray]: ...   # SigAcc's shard features per client

    @property
    def quant_gap(self) -> float: ...   # the master's quantization gap trend (only if Capabilities.reads_gap)

    @property
    def setting(self) -> dict[str, float]: ...   # SigAcc's setting fields (significance.setting_of)

    @property
    def online_gains(self) -> list[float | None]: ...   # QAT-vs-PTQ partial aggregates measured so far


@dataclass(frozen=True)
class Capabilities:
    """What an allocator needs the run to measure or provide for it (all off for a baseline, so a
    baseline never pays for them).

    * ``uses_significance``: it wants a SigAcc model (the run obtains one before round 0);
    * ``reads_gap``: it reads the master's quantization gap, measured by the server each round;
    * ``reads_sensitivity``: it reads the PTQ uploads' quantization sensitivity;
    * ``reads_partials``: it reads the server's comparison of each round's QAT and PTQ partial
      aggregates (``server.partial_gain``)."""

    uses_significance: bool = False
    reads_gap: bool = False
    reads_sensitivity: bool = False
    reads_partials: bool = False


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
    significance: Any = None       # a SigAcc model, when Capabilities.uses_significance
    sensitivity_lag = 0            # 1: sensitivity reports reach it one round late (measured by the server)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    @property
    def refits(self) -> list[dict[str, Any]]:
        """New cost-model versions so far (``version``, ``round``, ``model``, ``n_samples``)."""
        return []

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
