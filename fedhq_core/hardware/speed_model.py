"""Roofline speed model, fitted to the host's measured step times.

    t_step(S, b, d) = FLOPs_S(b) / (eta_c * peak_d) + bytes_S(b) / (eta_m * bw_d) + c

FLOPs and bytes are counted (``profile.count_step``); ``eta_c``, ``eta_m`` and ``c`` are fitted
by non-negative least squares to the host's measured times over several batch sizes and all
strategies, against the host's *measured* peak FLOP/s and bandwidth. The same efficiencies are
then applied to every device class's published peaks to predict its step times.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from .catalog import DeviceClass
from .profile import Measurement, StepCounts


@dataclass
class RooflineModel:
    counts: dict[str, StepCounts]
    host_peak: float
    host_bw: float
    inv_eta_c: float = 1.0
    inv_eta_m: float = 1.0
    overhead_s: float = 0.0
    fit_mape: float = float("nan")          # on the fitting points
    holdout_mape: float = float("nan")      # on held-out host measurements
    holdout: list[dict] = field(default_factory=list)

    @property
    def eta_c(self) -> float:
        return 1.0 / self.inv_eta_c if self.inv_eta_c > 0 else float("inf")

    @property
    def eta_m(self) -> float:
        return 1.0 / self.inv_eta_m if self.inv_eta_m > 0 else float("inf")

    def _row(self, mode: str, b: float, peak: float, bw: float) -> np.ndarray:
        c = self.counts[mode]
        return np.array([c.flops(b) / peak, c.bytes(b) / bw, 1.0])

    def _coef(self) -> np.ndarray:
        return np.array([self.inv_eta_c, self.inv_eta_m, self.overhead_s])

    def step_time(self, mode: str, b: float, device: DeviceClass | None = None) -> float:
        peak, bw = (device.peak_flops, device.mem_bw) if device else (self.host_peak, self.host_bw)
        return float(self._row(mode, b, peak, bw) @ self._coef())

    def steps_time(self, mode: str, batches: list[int], device: DeviceClass | None = None) -> float:
        """Time of many steps; linear in b, so it only needs the step count and sample count."""
        if not batches:
            return 0.0
        n, total = len(batches), float(sum(batches))
        peak, bw = (device.peak_flops, device.mem_bw) if device else (self.host_peak, self.host_bw)
        c = self.counts[mode]
        row = np.array([c.flops_per_sample * total / peak,
                        (c.bytes_fixed * n + c.bytes_per_sample * total) / bw, float(n)])
        return float(row @ self._coef())

    def _solve(self, ms: list[Measurement]) -> np.ndarray:
        # Relative least squares: weight each row by 1/t so small steps count as much as big ones.
        X = np.stack([self._row(m.mode, m.batch_size, self.host_peak, self.host_bw) for m in ms])
        t = np.array([m.seconds for m in ms])
        coef, _ = nnls(X / t[:, None], np.ones_like(t))
        return coef

    def _mape(self, ms: list[Measurement]) -> float:
        return float(np.mean([abs(self.step_time(m.mode, m.batch_size) - m.seconds) / m.seconds for m in ms]))

    @classmethod
    def fit(cls, counts: dict[str, StepCounts], measurements: list[Measurement], host_peak: float,
            host_bw: float, holdout_batch: int | None = None) -> "RooflineModel":
        """Fit on all measurements but those at ``holdout_batch`` (reported), then refit on all."""
        model = cls(counts, host_peak, host_bw)
        if holdout_batch is not None:
            train = [m for m in measurements if m.batch_size != holdout_batch]
            held = [m for m in measurements if m.batch_size == holdout_batch]
            if train and held:
                model.inv_eta_c, model.inv_eta_m, model.overhead_s = model._solve(train)
                model.holdout_mape = model._mape(held)
                model.holdout = [{"mode": m.mode, "batch_size": m.batch_size, "measured_s": m.seconds,
                                  "predicted_s": model.step_time(m.mode, m.batch_size)} for m in held]
        model.inv_eta_c, model.inv_eta_m, model.overhead_s = model._solve(measurements)
        model.fit_mape = model._mape(measurements)
        return model

    def to_state(self) -> dict:
        """JSON-ready fitted model (for checkpoints: a resumed run prices rounds identically)."""
        return {"counts": {k: vars(v) for k, v in self.counts.items()}, "host_peak": self.host_peak,
                "host_bw": self.host_bw, "coef": [self.inv_eta_c, self.inv_eta_m, self.overhead_s],
                "fit_mape": self.fit_mape, "holdout_mape": self.holdout_mape, "holdout": self.holdout}

    @classmethod
    def from_state(cls, d: dict) -> "RooflineModel":
        c = d["coef"]
        return cls({k: StepCounts(**v) for k, v in d["counts"].items()}, d["host_peak"], d["host_bw"],
                   c[0], c[1], c[2], d["fit_mape"], d["holdout_mape"], list(d["holdout"]))

    def summary(self) -> dict[str, float]:
        return {"eta_c": self.eta_c, "eta_m": self.eta_m, "overhead_s": self.overhead_s,
                "host_peak_flops": self.host_peak, "host_bw": self.host_bw,
                "fit_mape": self.fit_mape, "holdout_mape": self.holdout_mape}
