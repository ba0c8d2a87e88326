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

from ..hardware.host_work import HostWork

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

    def qat_samples_within(self, cids: list[int], budgets: np.ndarray) -> np.ndarray: ...  # partial work (optional):
    # per client, the most shard samples (whole batches) whose QAT round fits its spec-sheet budget (0: none)

    def shard_features(self) -> dict[int, np.ndarray]: ...   # SigAcc's shard features per client

    def measured(self, name: str) -> Any: ...   # what a measurement it reads shows (Capabilities.measurements)

    @property
    def quant_gap(self) -> float: ...   # measured("gap"): the master's quantization gap trend

    @property
    def setting(self) -> dict[str, float]: ...   # SigAcc's setting fields (significance.setting_of)

    @property
    def online_gains(self) -> list[float | None]: ...   # measured("partials"): QAT-vs-PTQ partial aggregates so far


@dataclass(frozen=True)
class Capabilities:
    """What an allocator needs the run to measure or provide for it (all off for a baseline, so a
    baseline never pays for them), and what sets its run apart.

    * ``uses_significance``: it wants a SigAcc model (the run obtains one before round 0);
    * ``measurements``: the server's measurements it reads (``fedhq_core.measurements``: ``gap``,
      the master's quantization gap; ``sensitivity``, the PTQ uploads' quantization sensitivity;
      ``partials``, the comparison of each round's QAT and PTQ partial aggregates); the server
      takes exactly these, and prices them;
    * ``server_calibrates``: its clients send no activation ranges (the server calibrates the
      deployment on its proxy split);
    * ``aggregate_bits``: the uplink width the server's decode is priced at, where it is not the
      config's ``upload_bits``;
    * ``min_family_r2``: it uses a covering family only where the family's leave-one-setting-out
      R² reaches this (below it the run neither refits nor reads the family: it decides online)."""

    uses_significance: bool = False
    measurements: frozenset[str] = frozenset()
    server_calibrates: bool = False      # its clients send no activation ranges: the server calibrates the deployment
    aggregate_bits: int | None = None    # the uplink width the aggregation is priced at (None: upload_bits)
    min_family_r2: float = float("-inf")  # a family predicting worse than this (setting-level R²) is not used

    def reads(self, measurement: str) -> bool:
        return measurement in self.measurements


@dataclass(frozen=True)
class UplinkSearch:
    """An allocation's uplink for a client that searches its own per-tensor bits (FedFQ's
    annealing, ``quant.bit_allocation``) at ``avg_bits`` on average, in ``iters`` moves."""

    avg_bits: float
    iters: int


@dataclass
class RoundFeedback:
    rnd: int
    results: list["ClientResult"]
    times: dict[int, "ClientTime"]
    metrics: dict[str, float]


@dataclass
class Allocation:
    strategies: dict[int, str]
    upload_bits: dict[int, "int | UplinkSearch"] = field(default_factory=dict)  # per client: a width, or a search
    max_samples: dict[int, int] = field(default_factory=dict)  # partial work: train on this many shard samples
    shadow: dict[int, str] = field(default_factory=dict)  # paired measurement: also train this mode, same start
    fork: str | None = None   # the server's master: "start" a fork before the round, or end it keeping "qat" / "ptq"
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
    def work(self) -> HostWork:
        """The run's host-work ledger (the Simulation sets it): operations nested in allocate or
        observe (a scikit-learn fit or prediction) are counted by their kind, the rest of
        allocate/observe as the allocator's own (``hardware.host_work``)."""
        if "_work" not in self.__dict__:
            self._work = HostWork()
        return self._work

    @work.setter
    def work(self, ledger: HostWork) -> None:
        self._work = ledger

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    @property
    def refits(self) -> list[dict[str, Any]]:
        """New cost-model versions so far (``version``, ``round``, ``model``, ``n_samples``)."""
        return []

    def allocate(self, rnd: int, sampled: list[int], view: FleetView) -> Allocation:  # pragma: no cover
        raise NotImplementedError

    def observe(self, feedback: RoundFeedback, view: FleetView) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
