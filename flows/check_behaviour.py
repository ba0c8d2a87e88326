"""Behaviour check for a change that must not change behaviour (a refactor).

For each registered strategy on the embedded digits, ``fedhq run --json`` (seeded,
no tracking, fresh state folders) is run in a checkout of ``--ref`` and in this working tree, and
the two JSON summaries must be equal in everything but wall-clock measurements::

    python -m flows.check_behaviour --ref <commit> [--rounds 6] [--strategies fp32,all-ptq,...]

Exit 0 when every pair is equal, 1 with each differing key printed. Simulated times, accuracies,
allocations, losses, upload sizes and the SigAcc fit all take part; only host timings, paths and
run ids are dropped (:data:`HOST_KEYS`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedhq_core.strategies import NAMES

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = NAMES   # every registered strategy
# keys that hold this host's wall-clock measurements, paths or ids: everything else must be equal
HOST_KEYS = {"wall_s", "alloc_s", "alloc_overhead_s", "fit_wall_s", "fit_charged_wall_s", "server_host_s",
             "alloc_compute_s", "cost_model_refit_s", "run_id", "run_dir", "checkpoint", "state_dir",
             "host_work_measured_s", "host_measured_s", "measured_s"}


def strip_host(obj: Any) -> Any:
    """``obj`` without the keys of :data:`HOST_KEYS`, recursively."""
    if isinstance(obj, dict):
        return {k: strip_host(v) for k, v in obj.items() if k not in HOST_KEYS}
    if isinstance(obj, list):
        return [strip_host(v) for v in obj]
    return obj


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ (a float is compared exactly: the runs are seeded)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: {a!r} != {b!r}"]


def run_summary(tree: Path, strategy: str, rounds: int, work: Path) -> dict[str, Any]:
    state, out = work / f"state-{strategy}", work / f"{strategy}.json"
    env = {**os.environ, "PYTHONPATH": str(tree), "FEDHQ_STATE_DIR": str(state), "PREFECT_HOME": str(state / "prefect")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--strategy", strategy, "--rounds", str(rounds), "--no-tracking",
           "--no-progress", "--state-dir", str(state), "--json", str(out)]
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{tree}: fedhq run --strategy {strategy} failed: {p.stderr.strip()[-500:]}")
    return strip_host(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.check_behaviour", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="git commit (or branch) to compare this working tree with")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedhq-behaviour-"))
    before = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.ref], cwd=ROOT, check=True)
    try:
        bad = 0
        for s in args.strategies.split(","):
            a = run_summary(before, s, args.rounds, work / "a")
            b = run_summary(ROOT, s, args.rounds, work / "b")
            diff = differences(a, b)
            print(f"{s}: " + ("equal" if not diff else f"{len(diff)} difference(s)"))
            for d in diff[:20]:
                print(f"  {d}")
            bad += bool(diff)
        return 1 if bad else 0
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
