"""What the server measures each round on its proxy split: one object per measurement.

A measurement is a :class:`Measurement` subclass in a module of its own here, registered by one
line in :data:`REGISTRY`. It declares:

* ``name``: what an allocator names in ``Capabilities.measurements`` to have it run;
* ``when``: ``DURING`` (while the round's clients train: on the clock only where it outlasts
  them) or ``CARRIED`` (while the next round trains);
* ``later_only``: it only serves a later round (skipped after the last one);
* ``state_key``: its history's key in the server's checkpoint (None: it keeps none);
* :meth:`measure`, which runs it on the server (``ServerState``: its master, ranges, proxy split
  and pricing) and returns its priced seconds, composed from the server's step kinds
  (``hardware.server_work.ServerPricing``);
* :meth:`read`, what allocators may read of it (``FleetView.measured(name)``).

``ServerState`` holds one instance of each and runs the requested ones, in registry order,
before the round's aggregation (``ServerState.aggregate``). Worked example: docs/design.md.
"""
from __future__ import annotations

from typing import Any

from .base import CARRIED, DURING, Measurement
from .gap import QuantGap
from .lineages import LineageGain
from .partials import PartialGain
from .sensitivity import UploadSensitivity

# one line per measurement, in the order a round takes them
REGISTRY: tuple[type[Measurement], ...] = (QuantGap, UploadSensitivity, PartialGain, LineageGain)
NAMES = tuple(m.name for m in REGISTRY)


def build(cfg: Any) -> list[Measurement]:
    """One instance of every registered measurement for a run of ``cfg``."""
    return [m(cfg) for m in REGISTRY]


__all__ = ["CARRIED", "DURING", "LineageGain", "Measurement", "NAMES", "PartialGain", "QuantGap", "REGISTRY", "UploadSensitivity",
           "build"]
