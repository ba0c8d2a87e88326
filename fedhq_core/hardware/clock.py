"""The simulated fleet and clock.

Each client gets a device class (drawn from the fleet's shares) and, with probability
``throttle_prob``, a hidden slowdown the spec sheet does not show (thermal throttling,
background load). A client's simulated time in a round is

    predicted compute (per-op roofline of everything it ran, on its device) x log-normal jitter
    x hidden slowdown
    + upload bytes / uplink bandwidth

and a round lasts as long as its slowest sampled client plus the server's work, priced from its
trace on the server's device class (``server_work``), never from this host's timings.
The allocator sees spec-sheet predictions only; the hidden slowdown and jitter show up in the
observed times, which is what the fine-grained cost model learns from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .catalog import DEVICES, DeviceClass
from .speed_model import RooflineModel


@dataclass
class Fleet:
    devices: list[DeviceClass]
    slowdown: np.ndarray           # hidden per-client factor (1 = as the spec sheet says)
    jitter_sigma: float
    seed: int

    @classmethod
    def build(cls, n_clients: int, shares: dict[str, float], throttle_prob: float, throttle_factor: float,
              jitter_sigma: float, seed: int) -> "Fleet":
        rng = np.random.default_rng([seed, 1009])
        names = sorted(shares)
        p = np.array([shares[n] for n in names], dtype=float)
        p /= p.sum()
        # Largest-remainder allocation of exact counts, then a seeded shuffle: the fleet mix is
        # what the config says, not a noisy sample of it.
        raw = p * n_clients
        counts = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - counts))[: n_clients - counts.sum()]:
            counts[i] += 1
        assigned = [n for n, c in zip(names, counts) for _ in range(c)]
        rng.shuffle(assigned)
        throttled = rng.random(n_clients) < throttle_prob
        slowdown = np.where(throttled, throttle_factor, 1.0)
        return cls([DEVICES[n] for n in assigned], slowdown, jitter_sigma, seed)

    def jitter(self, rnd: int, cid: int) -> float:
        if self.jitter_sigma == 0:
            return 1.0
        return float(np.random.default_rng([self.seed, 2029, rnd, cid]).lognormal(0.0, self.jitter_sigma))


@dataclass
class ClientTime:
    compute_s: float       # spec-sheet prediction
    observed_s: float      # what the simulated device actually took (jitter, hidden slowdown)
    upload_s: float
    by_kind: dict[str, float] = field(default_factory=dict)   # observed seconds per step kind

    @property
    def total_s(self) -> float:
        return self.observed_s + self.upload_s


def predict_compute(speed: RooflineModel, device: DeviceClass, work: dict[str, list[int]]) -> float:
    """Spec-sheet compute time of a local round: every step kind the client ran, priced from its
    op trace on ``device`` (``speed_model``)."""
    return speed.work_time(work, device)


@dataclass
class SimulatedClock:
    fleet: Fleet
    speed: RooflineModel
    now_s: float = 0.0
    history: list[float] = field(default_factory=list)

    def client_time(self, rnd: int, cid: int, work: dict[str, list[int]], upload_bytes: int) -> ClientTime:
        dev = self.fleet.devices[cid]
        kinds = self.speed.work_breakdown(work, dev)
        compute = float(sum(kinds.values()))
        factor = self.fleet.jitter(rnd, cid) * float(self.fleet.slowdown[cid])
        return ClientTime(compute, compute * factor, upload_bytes * 8.0 / dev.uplink_bps,
                          {k: v * factor for k, v in kinds.items()})

    @staticmethod
    def round_length(client_times: list[ClientTime], server: dict[str, float],
                     concurrent_s: float = 0.0) -> tuple[float, dict[str, float]]:
        """A round's length: the slowest client (or the server's work done while the clients
        train, ``concurrent_s``, when that is longer) plus the server's priced work before and
        after it (``server``: part -> seconds, e.g. allocation and aggregation). Also returns that
        length split by what it was spent on (the slowest client's step kinds and upload, each
        server part, and any server work the clients had to wait for)."""
        slowest = max(client_times, key=lambda c: c.total_s, default=None)
        clients_s = slowest.total_s if slowest else 0.0
        length = max(clients_s, concurrent_s) + float(sum(server.values()))
        split = dict(slowest.by_kind, upload=slowest.upload_s) if slowest else {}
        split.update({k: v for k, v in server.items() if v})
        if concurrent_s > clients_s:
            split["server_wait"] = concurrent_s - clients_s
        return length, split

    def advance(self, client_times: list[ClientTime], server: dict[str, float],
                concurrent_s: float = 0.0) -> tuple[float, dict[str, float]]:
        """Close a round (:meth:`round_length`) and move the clock on by its length."""
        length, split = self.round_length(client_times, server, concurrent_s)
        self.now_s += length
        self.history.append(length)
        return length, split
