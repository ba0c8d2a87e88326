"""Poisoned uploads against the server's defences: the same seeded run, clean and with 30% of the
client tasks sending a poisoned upload (``scale``: the honest update x100; ``signflip``: x-4;
``ranges``: finite activation ranges x1e6; ``steps``: finite QAT weight steps x1e6), under each
aggregation (FedAvg, trimmed mean, coordinate-wise median) with the default bound (``norm_bound``:
on update norms, and on range widths, step norms and BatchNorm statistics against the round's
median), and FedAvg without it (what an undefended server suffers)::

    python -m flows.poisoning [--config FILE.yaml] [--rounds N] [--attacks scale,ranges] [--set KEY=VALUE ...]
                              [--json FILE]

Plain Python runs (``fedhq_core.loop.run``: no Prefect, no MLflow), one after the other; it prints
the table of docs/operations.md ("Poisoned updates") and writes every figure as JSON.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

ATTACKS = ("clean", "scale", "signflip", "ranges", "steps")
LABELS = {"scale": "scale (x100)", "signflip": "signflip (x-4)", "ranges": "ranges (x1e6)", "steps": "steps (x1e6)"}
SETTINGS = (("fedavg", None), ("trimmed-mean", None), ("median", None), ("fedavg", 0.0))   # (aggregation, norm_bound)


def grid(base: Any, rate: float = 0.3, attacks: tuple[str, ...] = ATTACKS) -> list[dict[str, Any]]:
    from fedhq_core.errors import TooFewClients
    from fedhq_core.loop import run
    from fedhq_core.simulation import Simulation

    rows = []
    for aggregation, bound in SETTINGS:
        for attack in ("clean", *(a for a in attacks if a != "clean")):
            changes = {"aggregation": aggregation, "tracking": False, "checkpoint": False}
            if bound is not None:
                changes["norm_bound"] = bound
            if attack != "clean":
                changes.update(fault_rate=rate, fault_kinds=[attack])
            sim = Simulation(base.replace(**changes))
            stopped = None
            try:
                run(sim.cfg, sim=sim)
            except TooFewClients as err:   # the model was destroyed: no update is finite any more
                stopped = str(err).split(";")[0]
            s = sim.summary()
            accs = [r["acc_q"] for r in s["rounds"]] or [0.0]
            if stopped:   # the rounds it did not run count at the deployed model's last accuracy
                accs = accs + [accs[-1]] * (base.rounds - len(accs))
            rows.append({"aggregation": aggregation, "norm_bound": sim.cfg.norm_bound, "attack": attack,
                         "final_acc_q": accs[-1], "tail_acc_q": sum(accs[-3:]) / len(accs[-3:]), "stopped": stopped,
                         "rejected": s["rejected"]["by_reason"], "total_sim_s": s["total_sim_s"]})
            print(f"{aggregation:13s} norm_bound={sim.cfg.norm_bound:<4g} {attack:9s} acc_q {accs[-1]:.4f} "
                  f"rejected {s['rejected']['by_reason']}" + (f" STOPPED: {stopped}" if stopped else ""),
                  file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    clean = {(r["aggregation"], r["norm_bound"]): r["tail_acc_q"] for r in rows if r["attack"] == "clean"}
    attacks = [a for a in ATTACKS[1:] if any(r["attack"] == a for r in rows)]
    out = ["| aggregation | bound | clean | " + " | ".join(f"30% {LABELS[a]}" for a in attacks)
           + " | rejected as norm (" + " / ".join(attacks) + ") |",
           "|---|---|---|" + "---|" * len(attacks) + "---|"]
    for (agg, bound), c in clean.items():
        by = {r["attack"]: r for r in rows if (r["aggregation"], r["norm_bound"]) == (agg, bound)}
        cell = lambda a: (f"{100 * by[a]['tail_acc_q']:.1f}% ({100 * (by[a]['tail_acc_q'] - c):+.1f})"  # noqa: E731
                          + (" stopped: no finite update" if by[a].get("stopped") else ""))
        rej = " / ".join(str(by[a]["rejected"].get("norm", 0)) for a in attacks)
        out.append(f"| {agg} | {bound:g}{' (off)' if not bound else ''} | {100 * c:.1f}% | "
                   + " | ".join(cell(a) for a in attacks) + f" | {rej} |")
    return out


def main(argv: list[str] | None = None) -> int:
    from fedhq_core.config import load_config
    from fedhq_core.errors import ConfigError
    from fedhq_core.records import write_json

    ap = argparse.ArgumentParser(prog="python -m flows.poisoning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--attacks", default=",".join(ATTACKS[1:]),
                    help=f"comma-separated, from {', '.join(ATTACKS[1:])} (the clean run always runs)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        print(f"fedhq: error: attacks: unknown kind {bad[0] if bad else ''!r} (choose from "
              f"{', '.join(ATTACKS[1:])})", file=sys.stderr)
        return 2
    import yaml

    try:
        overrides = {"rounds": args.rounds, **{k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in args.set_)}}
        base = load_config(args.config, overrides)
    except (ConfigError, ValueError) as err:
        print(f"fedhq: error: {err}", file=sys.stderr)
        return 2
    rows = grid(base, attacks=attacks)
    print("\n".join(table(rows)))
    if args.json:
        write_json(args.json, {"config": base.public_dict(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
