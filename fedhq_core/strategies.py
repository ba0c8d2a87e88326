"""The strategies a run can name, one registry line each.

A strategy is an allocator (``fedhq_core.allocation``): what differs between strategies at run
time is declared by the allocator itself (:class:`~fedhq_core.allocation.base.Capabilities`,
:class:`~fedhq_core.allocation.base.Allocation`), never looked up by name. This table holds what
the rest of the system needs to know *before* an allocator exists: the names a config accepts,
where each allocator's factory lives, and the roles a benchmark or study gives it.

The factory is named as ``module:function`` inside ``fedhq_core.allocation`` and called with the
run's config and SigAcc model (``allocation.build_allocator``); naming it keeps this table at the
bottom floor (``config`` reads it), below the allocators it names.

Adding a strategy: its allocator module under ``allocation/`` with a ``build(cfg, significance)``
function, one line in :data:`REGISTRY`, and a test (docs/design.md, "Where a new thing goes").
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    factory: str                     # "module:function" in fedhq_core.allocation: (cfg, significance) -> Allocator
    summary: str
    role: str = "baseline"           # "method": what benchmarks compare; "fast" / "accurate": the pure strategies,
                                     # all-PTQ (the time reference) and all-QAT; "reference": the FP32 reference
    share_from: str | None = None    # with qat_share < 0 (automatic) it takes this strategy's QAT share, same seed
    uses_significance: bool = False  # it can read a SigAcc model (the CLI reports where that came from)


REGISTRY: dict[str, Strategy] = {s.name: s for s in (
    Strategy("fp32", "uniform:build_fp32", "FP32 training; the server calibrates the deployment on its proxy split",
             "reference"),
    Strategy("all-ptq", "uniform:build_all_ptq", "every client trains in FP32 and quantizes on the device", "fast"),
    Strategy("all-qat", "uniform:build_all_qat", "every client trains with fake quantization", "accurate"),
    Strategy("random-hybrid", "random_hybrid:build", "PTQ/QAT at random, at fedhq's QAT share", share_from="fedhq"),
    Strategy("fedhq", "fedhq:build", "FedHQ: the cost model and SigAcc choose PTQ or QAT per client", "method",
             uses_significance=True),
    Strategy("fedhq-coarse", "fedhq:build_coarse", "FedHQ's coarse stage only (spec-sheet times)",
             uses_significance=True),
    Strategy("ptq-then-qat", "fedhq:build_ptq_then_qat", "fedhq's schedule, its decision fixed to QAT: PTQ warm-up "
             "(20% of rounds), then QAT where it costs no round time (partial work elsewhere); no exploring"),
    Strategy("fedfq", "fedfq:build", "FP32 training, uplink bits per tensor by simulated annealing (FedFQ)"),
)}

NAMES: tuple[str, ...] = tuple(REGISTRY)
METHOD = next(n for n, s in REGISTRY.items() if s.role == "method")
REFERENCE = next(n for n, s in REGISTRY.items() if s.role == "reference")
FAST = next(n for n, s in REGISTRY.items() if s.role == "fast")
ACCURATE = next(n for n, s in REGISTRY.items() if s.role == "accurate")
PURE: tuple[str, ...] = (FAST, ACCURATE)


def run_order(names: list[str]) -> list[str]:
    """``names`` with every strategy after the one it takes its QAT share from (then in the given order)."""
    out: list[str] = []
    for n in names:
        dep = REGISTRY[n].share_from
        if dep in names and dep not in out:
            out.append(dep)
        if n not in out:
            out.append(n)
    return out


def with_shares(cfg, runs: dict[str, dict]):
    """``cfg`` with its QAT share taken from the run its strategy reads it from (``share_from``;
    ``runs``: strategy -> finished run of the same seed), where the config leaves it automatic."""
    dep = REGISTRY[cfg.strategy].share_from
    if dep and cfg.qat_share < 0 and dep in runs:
        return cfg.replace(qat_share=runs[dep]["qat_share"])
    return cfg
