"""``fedhq bench-overhead``: what the orchestration costs beside the training it drives.

Two fresh processes run the same fp32 FedAvg workload (same config, seed, sampled clients,
shards, local SGD steps):

* ``flow``: ``fedhq run --strategy fp32`` through the full Prefect flow with MLflow tracking on
  (the run's own Prefect API server, or the one ``PREFECT_API_URL`` names; a sqlite MLflow store
  in the state folder, apart from the user's), and
* ``bare``: a plain PyTorch loop in one process - load data, build the model, and for each round
  train the sampled clients with SGD, as many at once as the flow trains (``max_concurrency``
  threads, the cores shared out the same way), and average their weights.

Each is timed from outside (process start to exit, so start-up is included) and per round from
inside (steady state: the median round after the first two); with ``--reps`` the two run in
turn and each figure is the median over the repetitions. Peak RSS is the process's own maximum
plus its largest child's (the Prefect server). ``--breakdown`` also times each phase of both
processes (``fedhq_core.phases``; the flow's Prefect API server's CPU time is read from /proc).
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


def bare_loop(cfg_dict: dict[str, Any], out_path: str) -> None:
    """The reference: the same local SGD steps with no framework around them, the clients of a
    round trained with the flow's concurrency (``max_concurrency`` threads, each with its share
    of the cores, as the flow's thread runner does), so the two compare like with like."""
    t_start = time.perf_counter()
    from fedhq_core.phases import add as add_span, since_launch, span

    since_launch("interpreter and CLI")
    with span("import torch"):
        import torch
        import torch.nn.functional as F
    with span("import fedhq"):
        from concurrent.futures import ThreadPoolExecutor

        from fedhq_core.config import from_mapping
        from fedhq_core.models import build_model
        from fedhq_core.dispatch import default_concurrency
        from fedhq_core.simulation import load_data, split_clients

    cfg = from_mapping(cfg_dict)
    workers = default_concurrency(cfg)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))   # as flows.runners.set_torch_threads
    with span("data load"):
        ds = load_data(cfg)
        _, _, shards, _ = split_clients(cfg, ds)  # the same client split as the flow
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, ds.in_shape, ds.num_classes)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    free = [model] + [build_model(cfg.model, ds.in_shape, ds.num_classes) for _ in range(workers - 1)]

    def train(rnd: int, c: int) -> tuple[dict[str, Any], int]:
        m = free.pop()
        try:
            m.load_state_dict(global_state)
            opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, 53, rnd, c]).integers(2**62)))
            x, y = shards[c].x, shards[c].y
            m.train()
            for _ in range(cfg.local_epochs):
                order = torch.randperm(len(y), generator=gen)
                for i in range(0, len(y), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    loss = F.cross_entropy(m(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            return {k_: v.detach().clone() for k_, v in m.state_dict().items()}, len(y)
        finally:
            free.append(m)

    round_s = []
    with ThreadPoolExecutor(workers) as pool:
        for rnd in range(cfg.rounds):
            t0 = time.perf_counter()
            t_round = time.time()   # the round's span; its training starts at once
            k = max(1, int(round(cfg.fraction * cfg.clients)))
            sampled = sorted(np.random.default_rng([cfg.seed, 17, rnd]).choice(cfg.clients, size=k, replace=False))
            trained = list(pool.map(lambda c: train(rnd, int(c)), sampled))
            add_span("train-clients body", t_round, None, rnd)
            with span("aggregate", rnd):
                total = sum(n for _, n in trained)
                new = {k_: torch.zeros_like(v, dtype=torch.float32) for k_, v in global_state.items()}
                for state, n in trained:
                    for k_, v in state.items():
                        new[k_] += v.float() * (n / total)
                global_state = {k_: new[k_].to(v.dtype) for k_, v in global_state.items()}
            with span("evaluate fp32", rnd):
                model.load_state_dict(global_state)
                model.eval()
                with torch.no_grad():
                    acc = float((model(ds.test.x).argmax(1) == ds.test.y).float().mean())
            add_span("round", t_round, None, rnd)
            round_s.append(time.perf_counter() - t0)
    with open(out_path, "w") as f:
        json.dump({"round_s": round_s, "inner_wall_s": time.perf_counter() - t_start, "final_acc": acc,
                   "concurrency": workers}, f)


# --- per-phase breakdown (``--breakdown``) -------------------------------------------------------------
WORKER = ("train-clients body", "pack (quantize)", "pack (wire)")
STARTUP = [("interpreter and CLI", "interpreter start and CLI"), ("import torch", "import torch"),
           ("import prefect", "import prefect"), ("import fedhq", "import fedhq (rest)"),
           ("data load", "data load and split"), ("prefect api start (wait)", "Prefect API start-up (waited)"),
           ("prefect flow start", "Prefect flow start"), ("profile (task)", "profile (trace step kinds)"),
           ("import mlflow", "import mlflow"), ("tracking: store open", "tracking: MLflow store open"),
           ("tracking: wait for the store", "tracking: wait for the store opened in the background"),
           ("tracking start", "tracking: run start, params")]
ROUND = ["training (clients, critical path)", "packing (critical client task)", "unpacking and checks",
         "aggregation", "evaluation fp32", "evaluation quantized", "server calibration (fp32 strategy)",
         "checkpoint write", "tracking calls",
         "Prefect task bookkeeping", "  of which server-verb tasks", "allocation", "round, other"]
TEARDOWN = [("registration", "registration (model logged and registered)"), ("tracking end", "tracking: run end"),
            ("prefect artifacts", "Prefect artifacts (summary table, links)"), ("prefect flow end", "Prefect flow end"),
            ("prefect api stop", "Prefect API stop")]
_ROUND_NAMES = {"unpack": "unpacking and checks", "aggregate": "aggregation", "evaluate fp32": "evaluation fp32",
                "evaluate quantized": "evaluation quantized",
                "calibrate (server)": "server calibration (fp32 strategy)", "checkpoint": "checkpoint write",
                "tracking": "tracking calls", "allocate": "allocation", "round": "round, other",
                "train-clients body": "training (clients, critical path)"}


def self_times(spans: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """Each span of the main thread with its time less that of the spans directly inside it.
    Other threads' spans (concurrent client training, work in the background) are left out here."""
    seq = sorted((s for s in spans if s["thread"] == "MainThread"), key=lambda s: (s["start"], -s["end"]))
    out: list[list[Any]] = []
    stack: list[list[Any]] = []
    for s in seq:
        while stack and s["start"] >= stack[-1][0]["end"]:
            stack.pop()
        item = [s, s["end"] - s["start"]]
        if stack:
            stack[-1][1] -= item[1]
        stack.append(item)
        out.append(item)
    return [(s, t) for s, t in out]


def breakdown(doc: dict[str, Any], wall_s: float, t_exit: float) -> dict[str, float]:
    """Seconds per phase of one process (from its ``FEDHQ_PHASES`` file): start-up and teardown
    phases, round phases summed over rounds, and what is left ("other") so the rows add up to
    ``wall_s``."""
    spans = [s for s in doc["spans"] if s["thread"] != "value"]
    values = {s["name"]: s["end"] for s in doc["spans"] if s["thread"] == "value"}
    rows: dict[str, float] = {}
    add = lambda k, v: rows.__setitem__(k, rows.get(k, 0.0) + v)  # noqa: E731
    names = dict(STARTUP + TEARDOWN)
    train_self: dict[int, float] = {}
    for s, t in self_times(spans):
        n = s["name"]
        if n in names:
            add(names[n], t)
        elif n == "train (tasks)":
            train_self[s["round"]] = train_self.get(s["round"], 0.0) + t
        elif n.endswith("(task)"):
            add("Prefect task bookkeeping", t)
            add("  of which server-verb tasks", t)
        elif n in _ROUND_NAMES:
            add(_ROUND_NAMES[n], t)
    # the clients run on worker threads while the flow waits in "train (tasks)": the slowest task is
    # the training, the rest of the wait is Prefect's (submit, run, collect)
    by: dict[tuple[int, str], dict[str, float]] = {}
    for s in spans:
        if s["name"] in WORKER and s["thread"] != "MainThread":
            d = by.setdefault((s["round"], s["thread"]), {})
            d[s["name"]] = d.get(s["name"], 0.0) + s["end"] - s["start"]
    for rnd, waited in train_self.items():
        tasks = [d for (r, _), d in by.items() if r == rnd]
        crit = max(tasks, key=lambda d: d.get("train-clients body", 0.0), default={})
        body = crit.get("train-clients body", 0.0)
        pack = crit.get("pack (quantize)", 0.0) + crit.get("pack (wire)", 0.0)
        add("training (clients, critical path)", body - pack)
        add("packing (critical client task)", pack)
        add("Prefect task bookkeeping", waited - body)
    ends = [s["end"] for s in spans if s["thread"] == "MainThread"]
    rows["exit (server stop, interpreter teardown)"] = t_exit - max(ends) if ends else 0.0
    rows["rounds"] = sum(s["end"] - s["start"] for s in spans if s["name"] == "round")
    rows["n_rounds"] = len({s["round"] for s in spans if s["name"] == "round"})
    accounted = sum(v for k, v in rows.items() if k not in ("rounds", "n_rounds") and not k.startswith("  "))
    rows["other"] = wall_s - accounted
    for s in spans:  # work on other threads beside the main one (not the clients'): overlapped
        if s["thread"] != "MainThread" and s["name"] not in WORKER:
            label = names.get(s["name"], s["name"]).removesuffix(" (background)")
            key = f"{label} (background, overlapped)"
            rows[key] = rows.get(key, 0.0) + s["end"] - s["start"]
    if "prefect api cpu" in values:
        rows["Prefect API server CPU (its own process)"] = values["prefect api cpu"]
    return rows


def breakdown_table(flow: dict[str, float], bare: dict[str, float]) -> tuple[list[str], list[list[Any]]]:
    """Rows: phase, flow seconds, bare seconds, and per round (ms) for the round phases."""
    def cell(d: dict[str, float], k: str, per_round: bool = False) -> Any:
        if k not in d:
            return "-"
        return round(1000 * d[k] / max(1, d["n_rounds"]), 1) if per_round else round(d[k], 2)

    rows: list[list[Any]] = []
    for _, label in STARTUP:
        rows.append([label, cell(flow, label), "", cell(bare, label), ""])
    rows.append(["rounds (total)", cell(flow, "rounds"), cell(flow, "rounds", True), cell(bare, "rounds"),
                 cell(bare, "rounds", True)])
    for label in ROUND:
        rows.append(["  " + label, cell(flow, label), cell(flow, label, True), cell(bare, label),
                     cell(bare, label, True)])
    for label in [lbl for _, lbl in TEARDOWN] + ["exit (server stop, interpreter teardown)", "other"]:
        rows.append([label, cell(flow, label), "", cell(bare, label), ""])
    for label in [k for k in flow if k.endswith("(background, overlapped)")] + [
            "Prefect API server CPU (its own process)"]:
        if label in flow:
            rows.append([label, cell(flow, label), "", "-", ""])
    return ["phase", "flow_s", "flow_ms/round", "bare_s", "bare_ms/round"], rows


def _timed(cmd: list[str], env: dict[str, str], cwd: str,
           phases: str | None = None) -> tuple[float, dict[str, Any] | None, subprocess.CompletedProcess]:
    """Run ``cmd`` to its exit; with ``phases`` (a file path) also its phase breakdown."""
    if phases:
        env = {**env, "FEDHQ_PHASES": phases, "FEDHQ_T0": repr(time.time())}
    t_start = time.time()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = None
    if phases and p.returncode == 0:
        with open(phases) as f:
            rows = breakdown(json.load(f), wall, t_start + wall)
    return wall, rows, p


def _rss_child_cmd(inner: list[str]) -> list[str]:
    """Run ``inner`` and print the peak RSS (KiB) of it and its largest descendant."""
    code = ("import resource,subprocess,sys,json;p=subprocess.run(sys.argv[1:]);"
            "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
            "print('FEDHQ_RSS_KIB',r,file=sys.stderr);sys.exit(p.returncode)")
    return [sys.executable, "-c", code, *inner]


def measure(cfg_dict: dict[str, Any], reps: int = 1, phases: bool = False) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="fedhq-overhead-")
    env = dict(os.environ)
    # the user's Prefect home (as `fedhq run` uses it); a separate MLflow store in the state folder,
    # so the benchmark's runs stay out of the user's registry
    state = os.path.abspath(cfg_dict.get("state_dir", ".fedhq"))
    os.makedirs(state, exist_ok=True)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{state}/overhead-mlflow.db"
    cfg_path = os.path.join(work, "config.yaml")
    import yaml

    with open(cfg_path, "w") as f:
        # the user's state folder keeps its decoded-image and op-trace caches (both paths use them)
        yaml.safe_dump({**cfg_dict, "strategy": "fp32", "tracking": True}, f)
    cwd = os.getcwd()
    results: dict[str, Any] = {"flow_wall_s": [], "bare_wall_s": []}
    for _ in range(reps):
        flow_json = os.path.join(work, "flow.json")
        bare_json = os.path.join(work, "bare.json")
        wf, flow_rows, pf = _timed(_rss_child_cmd([sys.executable, "-m", "flows.cli", "run", "--config", cfg_path,
                                                   "--no-progress", "--json", flow_json]), env, cwd,
                                   os.path.join(work, "flow-phases.json") if phases else None)
        if pf.returncode != 0:
            raise RuntimeError(f"flow run failed: {pf.stderr.strip().splitlines()[-1:]}")
        wb, bare_rows, pb = _timed(_rss_child_cmd([sys.executable, "-m", "flows.overhead", "--bare", cfg_path,
                                                   bare_json]), env, cwd,
                                   os.path.join(work, "bare-phases.json") if phases else None)
        if pb.returncode != 0:
            raise RuntimeError(f"bare loop failed: {pb.stderr.strip().splitlines()[-1:]}")
        results["flow_wall_s"].append(wf)
        results["bare_wall_s"].append(wb)
        if phases:
            results.setdefault("phases_runs", []).append({"flow": flow_rows, "bare": bare_rows})
        rss = lambda p: int(next(l.split()[1] for l in p.stderr.splitlines() if l.startswith("FEDHQ_RSS_KIB")))  # noqa: E731,E741
        results["flow_peak_rss_mib"] = rss(pf) / 1024
        results["bare_peak_rss_mib"] = rss(pb) / 1024
        with open(flow_json) as f:
            flow = json.load(f)
        with open(bare_json) as f:
            bare = json.load(f)
        flow_rounds = np.diff([0.0] + [r["wall_s"] for r in flow["rounds"]])
        bare_rounds = np.asarray(bare["round_s"])
        skip = min(2, max(0, len(bare_rounds) - 1))  # steady state: after the first rounds
        results.setdefault("steady_round_flow_s_reps", []).append(float(np.median(flow_rounds[skip:])))
        results.setdefault("steady_round_bare_s_reps", []).append(float(np.median(bare_rounds[skip:])))
    results.update({
        "rounds": len(bare_rounds),
        "flow_wall_s_reps": results["flow_wall_s"], "bare_wall_s_reps": results["bare_wall_s"],
        "flow_wall_s": float(np.median(results["flow_wall_s"])),
        "bare_wall_s": float(np.median(results["bare_wall_s"])),
        "steady_round_flow_s": float(np.median(results["steady_round_flow_s_reps"])),
        "steady_round_bare_s": float(np.median(results["steady_round_bare_s_reps"])),
        "flow_final_acc_fp32": flow["final_acc_fp32"], "bare_final_acc": bare["final_acc"],
        "bare_concurrency": bare["concurrency"],
    })
    if phases:  # each phase's median over the repetitions
        runs = results.pop("phases_runs")
        results["phases"] = {who: {k: float(np.median([r[who][k] for r in runs if k in r[who]]))
                                   for k in runs[-1][who]} for who in ("flow", "bare")}
    results["ratio_total"] = results["flow_wall_s"] / results["bare_wall_s"]
    results["ratio_steady_round"] = results["steady_round_flow_s"] / results["steady_round_bare_s"]
    return results


if __name__ == "__main__":  # the bare-loop child: python -m flows.overhead --bare CONFIG OUT
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        import yaml

        with open(sys.argv[2]) as fh:
            bare_loop(yaml.safe_load(fh), sys.argv[3])
