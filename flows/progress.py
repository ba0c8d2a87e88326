"""The console progress bar of a run, as an observer of its round loop (``fedhq_core.loop``)."""
from __future__ import annotations

import sys
from typing import Any


class ProgressObserver:
    """A tqdm bar on stderr: one step a round, with the deployed accuracy (test, when the round
    evaluated it; validation), simulated time, QAT clients and rejected updates of the round."""

    phase = "tracking"

    def __init__(self, cfg: Any, start: int):
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.rounds, initial=start, desc=f"{cfg.strategy}", unit="round", file=sys.stderr,
                        leave=True)

    def on_round(self, sim: Any, rec: Any) -> None:
        shown = {"acc_q": f"{rec.acc_q:.3f}"} if rec.extra.get("evaluated", True) else {}   # not a carried figure
        if "val_acc_q" in rec.extra:
            shown["val_acc_q"] = f"{rec.extra['val_acc_q']:.3f}"
        self.bar.set_postfix(**shown, sim_s=f"{rec.sim_time_s:.1f}", qat=rec.n_qat,
                             **({"rejected": len(rec.rejected)} if rec.rejected else {}))
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
