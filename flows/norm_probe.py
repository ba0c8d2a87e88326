"""How an honest update's norm grows with its client's local steps, and what the norm bound sees:
one round from the initial master, clients picked across the range of shard sizes, every one
trained honestly (PTQ and QAT), at each learning rate given::

    fedhq norm-probe [--protocol FILE.yaml --setting NAME | --config FILE.yaml] [flags]
                     [--lrs 0.05,0.001] [--probe-clients 10] [--json FILE]

(``python -m flows.norm_probe`` takes the same arguments.)

Per mode and lr it prints the shard sizes' steps, the fitted exponent of norm against steps, and
the spread (max / median, min / median) of the raw norms and of the norms per step (what
``Dispatch.bound_norms`` compares), with the clients the server's bound rejected. Plain Python
(no Prefect, no MLflow).
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np


def probe(cfg: Any, lrs: list[float], n_clients: int = 10, modes: tuple[str, ...] = ("ptq", "qat")) -> dict[str, Any]:
    from fedhq_core.allocation import Allocation
    from fedhq_core.server import update_norm
    from fedhq_core.simulation import Simulation
    from fedhq_core.worker import run_jobs

    out: dict[str, Any] = {"rows": []}
    for lr in lrs:
        sim = Simulation(cfg.replace(lr=lr, lr_schedule="constant", tracking=False, checkpoint=False))
        sizes = np.array([len(s) for s in sim.shards])
        pick = sorted({int(c) for c in np.argsort(sizes, kind="stable")[
            np.linspace(0, len(sizes) - 1, min(n_clients, len(sizes))).astype(int)]})
        out["shard_sizes"] = {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())}
        for mode in modes:
            sim.dispatch.forget_norms()     # each probe is a first round
            jobs = sim.dispatch.jobs(0, Allocation({c: mode for c in pick}), pick)
            uploads = run_jobs(sim.dispatch.round_inputs(), jobs)
            results, rejected = sim.dispatch.accept(uploads)
            every = sorted(results + sim.dispatch.waited, key=lambda r: r.cid)
            steps = np.array([sim.dispatch.local_steps(r.n_samples) for r in every], dtype=float)
            norms = np.array([update_norm(r) for r in every])
            per = norms / steps
            row = {"lr": lr, "mode": mode, "cids": [r.cid for r in every], "steps": steps.astype(int).tolist(),
                   "norms": norms.tolist(), "rejected": sorted(rejected),
                   "exponent": float(np.polyfit(np.log(steps), np.log(norms), 1)[0]) if len(set(steps)) > 1 else None,
                   "raw_spread": [float(norms.max() / np.median(norms)), float(norms.min() / np.median(norms))],
                   "per_step_spread": [float(per.max() / np.median(per)), float(per.min() / np.median(per))]}
            out["rows"].append(row)
    return out


def report(out: dict[str, Any]) -> str:
    """The probe's lines: shard sizes, then per mode and lr the steps, the exponent and the spreads."""
    s = out["shard_sizes"]
    lines = [f"shards: {s['min']} to {s['max']} images (median {s['median']:g})"]
    for r in out["rows"]:
        exp = "n/a" if r["exponent"] is None else f"{r['exponent']:.2f}"
        lines.append(f"{r['mode']} lr {r['lr']:g}: steps {r['steps']}; norm ~ steps^{exp}; raw max/median "
                     f"{r['raw_spread'][0]:.2f}, min/median {r['raw_spread'][1]:.2f}; per step max/median "
                     f"{r['per_step_spread'][0]:.2f}, min/median {r['per_step_spread'][1]:.2f}; rejected {r['rejected']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.norm_probe ...`` is ``fedhq norm-probe ...``."""
    from flows.cli import main as cli

    return cli(["norm-probe", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
