"""``fedhq devices``: what every catalog device is predicted to spend per step, and (with
``--validate``) how well the same per-op model predicts this host at a held-out batch size.

Library only (no Prefect, no MLflow): the traces and prices come from ``fedhq_core.hardware``.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from fedhq_core.config import ExperimentConfig
from fedhq_core.hardware.profile import KINDS, TraceBook
from fedhq_core.hardware.speed_model import COEF_FIELDS, RooflineModel, catalog_table, host_device
from fedhq_core.hardware.validate import QAT_RATIO_TOLERANCE, passed, validate_host
from fedhq_core.models.spec import ModelSpec

INPUTS = {"digits": ((1, 8, 8), 10), "cifar10": ((3, 32, 32), 10), "cifar10-folder": ((3, 32, 32), 10),
          "svhn": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}


def ptq_extras(cfg: ExperimentConfig, batch: int) -> dict[str, list[int]]:
    """What a PTQ client runs per round beyond FP32 training (full calibration batches)."""
    calib = [batch * cfg.calib_batches]   # one forward pass (client.calibrate)
    work: dict[str, list[int]] = {"calib": calib, "pack": [cfg.upload_bits]}
    if cfg.report_sensitivity:
        work.update(wsearch=[0], fwd=list(calib))
    return work


def devices_report(cfg: ExperimentConfig, input_name: str, batch: int, validate: bool, reps: int) -> dict[str, Any]:
    shape, classes = INPUTS[input_name]
    spec = ModelSpec(cfg.model, shape, classes, cfg.w_bits, cfg.a_bits, cfg.first_last_bits, cfg.ema_momentum,
                     cfg.ptq_act_percentile)
    build = lambda: spec.build(torch.device("cpu"))  # noqa: E731
    speed = RooflineModel(TraceBook(build, shape, classes))
    out: dict[str, Any] = {"model": cfg.model, "input": input_name, "batch": batch,
                           "trace_ops": {k: speed.book.step(k, batch).totals() for k in KINDS}}
    devices = catalog_table(speed, batch, {"ptq_extras": ptq_extras(cfg, batch)})
    if validate:
        fit = [b for b in cfg.profile_batch_sizes if b != batch]
        if len(fit) < 2:
            raise ValueError("profile_batch_sizes: needs two batch sizes besides the held-out --batch-size")
        threads = torch.get_num_threads()
        v = validate_host(build, shape, classes, fit, batch, reps)
        v["torch_threads"] = threads
        out["validation"] = v
        h = v["host"]
        host = host_device(h["peak_flops"], h["mem_bw"], [h[k] for k in COEF_FIELDS])
        devices += catalog_table(speed, batch, {"ptq_extras": ptq_extras(cfg, batch)}, [host])
        devices[-1]["name"] = "this host (fitted)"
        import tempfile

        from flows.bench_host import held_out

        with tempfile.TemporaryDirectory() as tmp:   # the server's host work, priced against measured
            out["host_work"] = held_out(tmp)
    out["devices"] = devices
    return out


def print_report(r: dict[str, Any], fmt) -> None:
    print(f"model {r['model']}, input {r['input']}, batch {r['batch']}: predicted ms per step "
          f"(catalog constants; ptq_extras = one round's calibration, search, check and packing)")
    cols = ["name", "executor", "fp32_ms", "qat_ms", "fwd_ms", "ptq_extras_ms", "qat_over_fp32", "eta_c", "eta_m",
            "lam_py_us", "lam_eng_us"]
    print(fmt(cols, [[_round(d[c]) for c in cols] for d in r["devices"]]))
    v = r.get("validation")
    if not v:
        print("GPU entries are unchecked until a lent GPU measures them (README, 'GPU').")
        return
    print(f"\nvalidation on this host ({v['torch_threads']} threads): fitted on batch sizes {v['fit_batches']}, "
          f"predicting batch {v['holdout_batch']} (search and packing do not depend on batch size: in-sample), "
          f"{v['reps']} interleaved reps")
    rows = [[k, _round(x["predicted_ms"]), _round(x["measured_ms"]), f"{100 * x['error']:+.1f}%",
             _round(x["terms_ms"]["compute"]), _round(x["terms_ms"]["memory"]), _round(x["terms_ms"]["issue"]),
             x["ops"]] for k, x in v.items() if k in KINDS]
    print(fmt(["kind", "predicted_ms", "measured_ms", "error", "compute_ms", "memory_ms", "issue_ms", "ops"], rows))
    q, hq = v["qat_over_fp32"], v["heldout_qat"]
    print(f"QAT/FP32 at batch {v['holdout_batch']}: predicted {q['predicted']:.2f}, measured {q['measured']:.2f} "
          f"(median of paired reps), error {100 * q['error']:+.1f}% (limit {100 * QAT_RATIO_TOLERANCE:.0f}%)")
    print(f"QAT held out entirely (fit on the other kinds): QAT step error {100 * hq['qat']['error']:+.1f}%, "
          f"QAT/FP32 predicted {hq['qat_over_fp32']['predicted']:.2f}, error {100 * hq['qat_over_fp32']['error']:+.1f}%")
    print(f"host coefficients (validation only, never used by the clock): " +
          ", ".join(f"{k} {v['host'][k]:.3g}" for k in COEF_FIELDS) +
          f"; measured peak {v['host']['peak_flops'] / 1e9:.0f} GFLOP/s, bandwidth {v['host']['mem_bw'] / 1e9:.1f} GB/s")
    if "host_work" in r:
        from flows.bench_host import print_check

        print()
        print_check(r["host_work"])
        print(f"(limit {100 * HOST_WORK_TOLERANCE:.0f}% in all; prices from the shipped table, "
              f"python -m flows.bench_host)")


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.3g}") if abs(x) < 1000 else round(x)
    return x


HOST_WORK_TOLERANCE = 0.30     # the server's host work: priced within 30% of measured, in all


def validation_passed(r: dict[str, Any]) -> bool:
    host_ok = abs(r["host_work"]["error"]) <= HOST_WORK_TOLERANCE if "host_work" in r else True
    return (passed(r["validation"]) if "validation" in r else True) and host_ok


def profile_overrides(r: dict[str, Any]) -> dict[str, Any]:
    """A profile file (opt-in, ``--profile FILE``): the host's fitted efficiencies for every
    device; issue latencies stay the catalog's (they belong to each device's own CPU)."""
    h = r["validation"]["host"]
    return {"overrides": {"*": {"eta_c": h["eta_c"], "eta_m": h["eta_m"]}},
            "source": {"host": os.uname().nodename, "model": r["model"], "batch": r["batch"], **h}}


__all__ = ["devices_report", "print_report", "profile_overrides", "validation_passed"]
