"""Every PTQ upload's quantization sensitivity, measured by the server."""
from __future__ import annotations

from typing import Any

from ..client import Mode
from ..server import upload_quant_loss
from .base import CARRIED, Measurement


class UploadSensitivity(Measurement):
    """Each PTQ upload's accuracy lost to quantization on the proxy split, from the master the
    clients started from; it sets the upload's ``quant_loss``, which the allocator reads from the
    round's feedback. Measured while the next round trains; only where clients do not measure it
    on the device (``report_sensitivity`` unset)."""

    name, when, later_only = "sensitivity", CARRIED, True

    def active(self) -> bool:
        return self.cfg.report_sensitivity is None

    def measure(self, server: Any, results: list[Any]) -> float:
        ptq = [r for r in results if r.strategy == Mode.PTQ]
        for r in ptq:
            r.quant_loss = upload_quant_loss(server.eval_model, server.global_state, r, server.proxy.x, server.proxy.y)
        return len(ptq) * server.pricing.server.sens_s()

    def read(self) -> None:
        return None
