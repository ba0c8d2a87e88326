"""What a run records: one :class:`RoundRecord` per round, its (de)serialisation, reject counts,
and the run's summary figures built from the records."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

PTQ_EXTRAS = ("calib", "wsearch", "fwd")   # a PTQ client's on-device work beyond FP32 training


@dataclass
class RoundRecord:
    round: int
    acc_q: float
    acc_fp32: float
    loss_q: float
    loss_fp32: float
    train_loss: float
    sim_round_s: float
    sim_time_s: float
    wall_s: float
    upload_bytes: int
    n_qat: int
    n_ptq: int
    n_fp32: int
    alloc_s: float
    strategies: dict[int, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)   # client -> "reason: detail", all attempts
    attempts: int = 1
    server_s: float = 0.0        # the server's priced share of sim_round_s (allocation, aggregation, refits)

    def metrics(self) -> dict[str, float]:
        keys = ("acc_q", "acc_fp32", "loss_q", "loss_fp32", "train_loss", "sim_round_s", "sim_time_s", "wall_s",
                "upload_bytes", "n_qat", "n_ptq", "n_fp32", "alloc_s", "attempts")
        out = {k: float(getattr(self, k)) for k in keys}
        out.update({k: float(v) for k, v in self.extra.items() if isinstance(v, (int, float))})
        out["n_rejected"] = float(len(self.rejected))
        for reason, n in reject_counts([self.rejected]).items():
            out[f"rejected_{reason}"] = float(n)
        return out


def sim_breakdown(records: Iterable[RoundRecord]) -> dict[str, float]:
    """The run's simulated time split by what the critical client of each round spent it on:
    step kinds (``client.STEP_KINDS``; ``shadow_<kind>``, a paired measurement's), upload,
    server and failed attempts."""
    out: dict[str, float] = {}
    for r in records:
        for k, v in r.extra.items():
            if k.startswith("sim_") and k.endswith("_s") and k not in ("sim_round_s", "sim_time_s"):
                name = k[4:-2]
                out[name] = out.get(name, 0.0) + float(v)
    return out


def _mean_of(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def reject_counts(rejected_maps: Iterable[dict[int, str]]) -> dict[str, int]:
    """How many client updates were rejected, by reason, over several client -> "reason: detail" maps."""
    out: dict[str, int] = {}
    for rejected in rejected_maps:
        for why in rejected.values():
            reason = why.split(":", 1)[0]
            out[reason] = out.get(reason, 0) + 1
    return dict(sorted(out.items()))


def record_dict(r: RoundRecord) -> dict[str, Any]:
    """A round record as JSON-ready data (client ids become string keys)."""
    return dict(r.__dict__, strategies={str(k): v for k, v in r.strategies.items()},
                rejected={str(k): v for k, v in r.rejected.items()},
                extra={k: v for k, v in r.extra.items() if isinstance(v, (int, float, str, bool))})


def record_from_dict(d: dict[str, Any]) -> RoundRecord:
    return RoundRecord(**{**d, "strategies": {int(k): v for k, v in d["strategies"].items()},
                          "rejected": {int(k): v for k, v in d.get("rejected", {}).items()}})


def format_reasons(by_reason: dict[str, int]) -> str:
    """``{"raised": 2, "size": 1}`` -> ``"2 raised, 1 size"`` (console, tags and errors)."""
    return ", ".join(f"{n} {reason}" for reason, n in by_reason.items()) or "none"


def records_summary(records: list[RoundRecord]) -> dict[str, Any]:
    """The figures of a run that come from its round records alone."""
    return {
        "alloc_overhead_s": float(sum(r.alloc_s for r in records)),
        "qat_share": float(np.mean([r.n_qat / max(1, r.n_qat + r.n_ptq + r.n_fp32) for r in records]))
        if records else 0.0,
        "sim_breakdown_s": sim_breakdown(records),
        "shadow_device_s": float(sum(r.extra.get("shadow_device_s", 0.0) for r in records)),
        "ptq_extras_share": _mean_of(r.extra.get("ptq_extras_share") for r in records),
        "rejected": {"total": sum(len(r.rejected) for r in records),
                     "by_reason": reject_counts(r.rejected for r in records),
                     "retried_rounds": sum(r.attempts > 1 for r in records)},
    }


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write a summary (or any JSON-ready result) atomically; numpy numbers become plain ones."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, p)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
