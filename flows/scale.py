"""``fedhq bench-scale``: what a trained sample costs as the fleet grows.

Each point is one ``fedhq run`` in a fresh process (the CLI a user runs, tracking off as in the
report that asked for this), on the thread runner or on ``--dask-local N``. The points run
interleaved (``20, 1000, 20, 1000`` for two pairs), so a drift of the host hits both sides. For
each run it reads, from the run's own round records:

* round ``--round`` (the second by default, past the first round's warm-up) wall seconds, the
  samples trained in it, and so milliseconds per trained sample;
* the share of the run's wall time spent allocating (allocation, cost-model refits and the
  allocator's bookkeeping, ``alloc_s`` of every round);
* the bytes sent to workers per round (Dask only);

and from outside, the peak resident memory summed over the run's whole process tree (the run, its
Prefect API server, Dask's scheduler and workers), sampled every 0.2 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np


def _tree_rss(proc: "Any") -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_point(cfg: dict[str, Any], workdir: str, label: str) -> dict[str, Any]:
    """One ``fedhq run`` of ``cfg`` in a fresh process; its round records and peak tree RSS."""
    import psutil
    import yaml

    cfg_path = os.path.join(workdir, f"{label}.yaml")
    out_path = os.path.join(workdir, f"{label}.json")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", cfg_path, "--no-progress",
                             "--json", out_path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(ps))
        time.sleep(0.2)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: fedhq run exited {proc.returncode}: {err.strip().splitlines()[-1:]}")
    res = json.loads(open(out_path).read())
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mib": peak / 2**20, "rounds": res["rounds"],
            "run_wall_s": res["wall_s"], "alloc_overhead_s": res["alloc_overhead_s"]}


def round_figures(run: dict[str, Any], rnd: int) -> dict[str, Any]:
    """Wall seconds, trained samples and ms per sample of round ``rnd`` (0-based) of a run."""
    recs = run["rounds"]
    prev = recs[rnd - 1]["wall_s"] if rnd else 0.0
    r = recs[rnd]
    wall = r["wall_s"] - prev
    samples = int(r["extra"]["samples"])
    return {"round_wall_s": wall, "samples": samples, "ms_per_sample": 1000 * wall / max(1, samples),
            "clients_trained": len(r["strategies"]), "bytes_to_workers": r["extra"].get("bytes_to_workers"),
            "alloc_share": run["alloc_overhead_s"] / max(1e-9, run["run_wall_s"])}


def measure(base: dict[str, Any], points: list[tuple[int, float]], runners: list[str], pairs: int = 1,
            rnd: int = 1, log: Any = None) -> dict[str, Any]:
    """Every (clients, fraction) point on every runner, ``pairs`` times, interleaved."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedhq-scale-") as work:
        for rep in range(pairs):
            for runner in runners:
                for clients, fraction in points:
                    cfg = dict(base, clients=clients, fraction=fraction, tracking=False)
                    if runner.startswith("dask-local-"):
                        cfg["dask_local"] = int(runner.rsplit("-", 1)[1])
                    label = f"{runner}-{clients}-{rep}"
                    run = run_point(cfg, work, label)
                    row = {"runner": runner, "clients": clients, "fraction": fraction, "rep": rep,
                           "peak_rss_mib": run["peak_rss_mib"], "process_wall_s": run["wall_s"],
                           **round_figures(run, rnd)}
                    rows.append(row)
                    if log:
                        log(f"{label}: round {rnd + 1} {row['round_wall_s']:.1f} s, {row['samples']} samples, "
                            f"{row['ms_per_sample']:.3f} ms/sample, peak RSS {row['peak_rss_mib']:.0f} MiB")
    return {"config": base, "round": rnd + 1, "pairs": pairs, "rows": rows, "summary": summarize(rows, points)}


def summarize(rows: list[dict[str, Any]], points: list[tuple[int, float]]) -> list[dict[str, Any]]:
    """Per runner and point: medians over the repetitions, and each point's ratio to the first
    point (ms per trained sample) of the same runner, pair by pair and its median."""
    out = []
    for runner in dict.fromkeys(r["runner"] for r in rows):
        base = [r for r in rows if r["runner"] == runner and r["clients"] == points[0][0]]
        for clients, fraction in points:
            mine = [r for r in rows if r["runner"] == runner and r["clients"] == clients]
            ratios = [m["ms_per_sample"] / b["ms_per_sample"] for m, b in zip(mine, base)]
            out.append({"runner": runner, "clients": clients, "fraction": fraction,
                        "sampled": mine[0]["clients_trained"],
                        "ms_per_sample": float(np.median([m["ms_per_sample"] for m in mine])),
                        "ratio_pairs": ratios, "ratio": float(np.median(ratios)),
                        "peak_rss_mib": float(max(m["peak_rss_mib"] for m in mine)),
                        "alloc_share": float(np.median([m["alloc_share"] for m in mine])),
                        "bytes_to_workers": mine[0]["bytes_to_workers"]})
    return out
