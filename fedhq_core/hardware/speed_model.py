"""Per-op roofline with issue latency: what every step a client runs costs on a device.

For one traced step (``trace.StepTrace``) on device ``d``::

    op time      = max(F_op / (eta_c * peak_d), B_op / (eta_m * bw_d))
    issue time   = lam_py (op issued from Python) or lam_eng (issued by the autograd engine)
    cpu executor : t = sum(op time) + sum(issue time)
    gpu executor : the CPU issues ops asynchronously; each stretch between device syncs
                   (``_local_scalar_dense``) costs max(sum issue, sum op time); a sync ends its
                   stretch.

The catalog's constants price every catalog device (deterministic). The host's own
coefficients are *fitted* (:func:`fit_host`) only to validate the model's form; the clock uses
them only if a user opts in with a profile file (``RooflineModel(overrides=...)``).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from .host_work import simulator_work
from .catalog import DEVICES, DeviceClass
from ..client import SHADOW_PREFIX
from .profile import KINDS, TraceBook
from .trace import StepTrace

COEF_FIELDS = ("eta_c", "eta_m", "lam_py", "lam_eng")


def price_terms(t: StepTrace, d: DeviceClass) -> dict[str, float]:
    """Seconds of one traced step on ``d``, with its terms: ``compute`` (ops bound by FLOPs),
    ``memory`` (ops bound by bytes), ``issue`` (per-op latency) and ``total``."""
    fc = t.flops / (d.eta_c * d.peak_flops)
    fm = t.bytes / (d.eta_m * d.mem_bw)
    op = np.maximum(fc, fm)
    issue = np.where(t.engine, d.lam_eng, d.lam_py)
    terms = {"compute": float(op[fc >= fm].sum()), "memory": float(op[fc < fm].sum()),
             "issue": float(issue.sum())}
    if d.executor == "cpu" or t.n_ops == 0:
        terms["total"] = float(op.sum() + issue.sum())
        return terms
    # GPU: stretches end at (and include) each sync op
    stretch = np.concatenate([[0], np.cumsum(t.sync)[:-1]])
    n = int(stretch[-1]) + 1
    terms["total"] = float(np.maximum(np.bincount(stretch, issue, n), np.bincount(stretch, op, n)).sum())
    return terms


def price_trace(t: StepTrace, d: DeviceClass) -> float:
    return price_terms(t, d)["total"]


@dataclass
class RooflineModel:
    """Prices client work (``ClientResult.work``: kind -> batch sizes) from op traces."""

    book: TraceBook
    overrides: dict[str, dict[str, float]] = field(default_factory=dict)   # device -> COEF_FIELDS (opt-in)
    _cache: dict = field(default_factory=dict, repr=False)

    def device(self, d: DeviceClass) -> DeviceClass:
        o = self.overrides.get(d.name) or self.overrides.get("*")
        return dataclasses.replace(d, **{k: float(o[k]) for k in COEF_FIELDS if k in o}) if o else d

    def step_time(self, kind: str, batch: int, d: DeviceClass) -> float:
        key = (kind, batch, d.name)
        if key not in self._cache:
            with simulator_work():      # a real server looks the device's step time up
                self._cache[key] = price_trace(self.book.get(kind, batch), self.device(d))
        return self._cache[key]

    def work_breakdown(self, work: dict[str, list[int]], d: DeviceClass) -> dict[str, float]:
        """Seconds per step kind of everything a client ran (see ``client.STEP_KINDS``; a kind
        prefixed ``client.SHADOW_PREFIX``, a paired measurement's, is priced as the kind)."""
        return {kind: sum(n * self.step_time(kind.removeprefix(SHADOW_PREFIX), b, d) for b, n in Counter(sizes).items())
                for kind, sizes in work.items() if sizes}

    def work_time(self, work: dict[str, list[int]], d: DeviceClass) -> float:
        return float(sum(self.work_breakdown(work, d).values()))

    def describe(self, batch: int) -> dict:
        """Op counts of every step kind at ``batch`` and each catalog device's predicted step
        times (what ``fedhq devices`` prints), for the run's record."""
        return {"batch": batch, "overrides": self.overrides,
                "trace": {k: self.book.step(k, batch).totals() for k in KINDS},
                "devices": catalog_table(self, batch)}

    def to_state(self) -> dict:
        return {"overrides": self.overrides}

    def summary(self) -> dict[str, float]:
        return {"host_calibrated": float(bool(self.overrides))}


# --- host fit (validation of the model's form) --------------------------------------------
def host_device(peak: float, bw: float, coef: np.ndarray | None = None) -> DeviceClass:
    eta_c, eta_m, lam_py, lam_eng = coef if coef is not None else (1.0, 1.0, 0.0, 0.0)
    return DeviceClass("host", "host", peak, bw, 1e9, "measured on this host (matmul, copy)", "cpu",
                       float(eta_c), float(eta_m), float(lam_py), float(lam_eng), "fitted on this host")


def fit_host(points: list[tuple[StepTrace, float]], peak: float, bw: float) -> np.ndarray:
    """Fit (eta_c, eta_m, lam_py, lam_eng) of the cpu-executor roofline to measured seconds of
    traced steps (relative least squares on log-coefficients; deterministic)."""
    def resid(logc: np.ndarray) -> np.ndarray:
        d = host_device(peak, bw, np.exp(logc))
        return np.array([price_trace(t, d) / s - 1.0 for t, s in points])

    x0 = np.log([0.5, 0.5, 3e-6, 1e-6])
    lo, hi = np.log([1e-3, 1e-3, 1e-8, 1e-8]), np.log([50.0, 50.0, 1e-3, 1e-3])
    return np.exp(least_squares(resid, x0, bounds=(lo, hi)).x)


def catalog_table(speed: RooflineModel, batch: int, kinds_work: dict[str, dict[str, list[int]]] | None = None,
                  devices: list[DeviceClass] | None = None) -> list[dict[str, float | str]]:
    """Predicted ms per step of every catalog device (``fedhq devices``)."""
    rows = []
    for d in devices or list(DEVICES.values()):
        fp, qat, fwd = (1e3 * speed.step_time(k, batch, d) for k in ("fp32", "qat", "fwd"))
        priced = speed.device(d)   # with any opt-in overrides
        row: dict[str, float | str] = {"name": d.name, "executor": d.executor, "fp32_ms": fp, "qat_ms": qat,
                                       "fwd_ms": fwd, "qat_over_fp32": qat / fp, "eta_c": priced.eta_c,
                                       "eta_m": priced.eta_m, "lam_py_us": 1e6 * priced.lam_py,
                                       "lam_eng_us": 1e6 * priced.lam_eng}
        for name, work in (kinds_work or {}).items():
            row[f"{name}_ms"] = 1e3 * speed.work_time(work, d)
        rows.append(row)
    return rows


def load_profile(path: str) -> dict[str, dict[str, float]]:
    """Host-calibrated coefficients written by ``fedhq devices --validate --write-profile``:
    ``{"overrides": {device name or "*": {eta_c, eta_m, lam_py, lam_eng}}}``."""
    import json

    from ..errors import ConfigError

    try:
        data = json.loads(open(path).read())
        over = {str(k): {f: float(v[f]) for f in COEF_FIELDS if f in v} for k, v in data["overrides"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"profile_file: {path}: not a FedHQ profile ({type(err).__name__})") from None
    bad = [k for k, v in over.items() if any(x <= 0 for x in v.values())]
    if bad:
        raise ConfigError(f"profile_file: {path}: coefficients must be positive ({bad[0]})")
    return over
