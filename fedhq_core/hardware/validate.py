"""Check the per-op roofline's form against this host (``fedhq devices --validate``).

Every step kind is traced and timed here (reps interleaved across kinds and batch sizes). The
host's ``eta_c``, ``eta_m``, ``lam_py`` and ``lam_eng`` are fitted on all batch sizes but one;
the held-out batch size is then predicted for each kind, and so is the QAT/FP32 ratio, whose
measured value is the median of the ratios of paired reps (FP32 and QAT timed back to back).
A second fit leaves the QAT step kind out entirely (fit on FP32, forward, calibration, search
and packing; predict QAT): the closest local proxy for predicting a device the model was not
fitted on. On a miss, each term (compute, memory, issue) is reported; no per-kind correction
factor exists.

These fitted host coefficients validate the model; they never price the catalog devices.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch import nn

from .profile import BATCH_FREE_KINDS, KINDS, TraceBook, measure_host_peaks, measure_kinds
from .speed_model import COEF_FIELDS, fit_host, host_device, price_terms

QAT_RATIO_TOLERANCE = 0.20   # `fedhq devices --validate` fails above this error on QAT/FP32


def validate_host(build: Callable[[], nn.Module], in_shape: tuple[int, ...], num_classes: int,
                  fit_batches: list[int], holdout: int, reps: int) -> dict[str, Any]:
    book = TraceBook(build, in_shape, num_classes)
    batches = sorted(set(fit_batches) | {holdout})
    timings = measure_kinds(build, in_shape, num_classes, KINDS, batches, reps)
    peak, bw = measure_host_peaks()
    points = {key: (book.step(*key), t.seconds) for key, t in timings.items()}

    def fit(keep: Callable[[str, int], bool]) -> np.ndarray:
        return fit_host([p for (k, b), p in points.items() if keep(k, b)], peak, bw)

    def report(coef: np.ndarray, kinds: tuple[str, ...]) -> dict[str, Any]:
        host = host_device(peak, bw, coef)
        out: dict[str, Any] = {}
        for kind in kinds:
            b = 0 if kind in BATCH_FREE_KINDS else holdout
            tr, measured = points[(kind, b)]
            terms = price_terms(tr, host)
            out[kind] = {"batch": b, "predicted_ms": 1e3 * terms["total"], "measured_ms": 1e3 * measured,
                         "error": terms["total"] / measured - 1.0,
                         "terms_ms": {k: 1e3 * v for k, v in terms.items() if k != "total"},
                         "ops": tr.n_ops, "in_fit": b != holdout}
        return out

    def ratio(coef: np.ndarray) -> dict[str, float]:
        host = host_device(peak, bw, coef)
        pred = price_terms(points[("qat", holdout)][0], host)["total"] / \
            price_terms(points[("fp32", holdout)][0], host)["total"]
        pairs = [q / f for q, f in zip(timings[("qat", holdout)].reps, timings[("fp32", holdout)].reps)]
        meas = float(np.median(pairs))
        return {"predicted": pred, "measured": meas, "error": pred / meas - 1.0,
                "measured_pairs": [float(p) for p in pairs]}

    coef = fit(lambda k, b: b != holdout)
    coef_noqat = fit(lambda k, b: k != "qat")
    return {
        "host": {"peak_flops": peak, "mem_bw": bw, **dict(zip(COEF_FIELDS, map(float, coef)))},
        "fit_batches": sorted(set(fit_batches) - {holdout}), "holdout_batch": holdout, "reps": reps,
        **report(coef, KINDS),
        "qat_over_fp32": ratio(coef),
        "heldout_qat": {"host": dict(zip(COEF_FIELDS, map(float, coef_noqat))),
                        "qat": report(coef_noqat, ("qat",))["qat"], "qat_over_fp32": ratio(coef_noqat)},
    }


def passed(v: dict[str, Any]) -> bool:
    return abs(v["qat_over_fp32"]["error"]) <= QAT_RATIO_TOLERANCE
