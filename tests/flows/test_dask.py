"""Scale-out: the training flow on prefect-dask's DaskTaskRunner over a LocalCluster of two worker
processes ends with the same global weights as the same seeded run on the thread runner, even
with one worker process killed by PID while the last round trains: Dask runs its clients again
on the other worker (a client it gives up on is rejected as ``worker-lost``) and the run completes."""
from __future__ import annotations

import psutil
import pytest
import torch


_THREADS: dict = {}     # the thread runner's run of the same seeded config, trained once for both kills


@pytest.mark.integration
# a worker killed while a task runs, early or late; killed as the scatter starts (0.0 s) the flow
# can wait for good: an open defect (the scatter now times out and retries, but another wait remains)
@pytest.mark.parametrize("kill_after_s", [0.3, 1.0])
def test_dask_local_cluster_equals_thread_runner(tiny_cfg, monkeypatch, kill_after_s):
    import os
    import threading
    import time

    from prefect.context import FlowRunContext

    from fedhq_core.checkpoint import read_state
    from fedhq_core.dispatch import Dispatch
    from fedhq_core.simulation import Simulation
    from flows.runners import task_runner_for
    from flows.train import run_training

    cfg = tiny_cfg.replace(rounds=3, strategy="fedhq", significance="none", adjust_every=1, max_concurrency=2,
                           local_epochs=2)
    threads = _THREADS.get("run") or _THREADS.setdefault("run", run_training(cfg))
    before = set(psutil.Process().children(recursive=True))
    dask_cfg = cfg.replace(dask_local=2)
    assert type(task_runner_for(dask_cfg)).__name__ == "DaskTaskRunner"
    killed: list[int] = []
    chunks = Dispatch.chunks

    def kill_a_worker(self, jobs):           # called right before the round's tasks are submitted
        if jobs and jobs[0].rnd == 2 and not killed and self.cfg.dask_local:
            pid = sorted(FlowRunContext.get().task_runner.client.run(os.getpid).values())[0]

            def later():
                time.sleep(kill_after_s)     # its first task is running (0.3 s) or further on (1.0 s)
                psutil.Process(pid).kill()
                killed.append(pid)
            threading.Thread(target=later, daemon=True).start()
        return chunks(self, jobs)

    monkeypatch.setattr(Dispatch, "chunks", kill_a_worker)
    on_dask = run_training(dask_cfg)
    assert killed and (not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == "zombie")
    assert set(on_dask["rejected"]["by_reason"]) <= {"worker-lost"}
    assert all(r["extra"]["bytes_to_workers"] > 0 for r in on_dask["rounds"])
    # the round's global weights go to each worker once, not with every task
    assert on_dask["rounds"][0]["extra"]["bytes_to_workers"] < 3 * 4 * sum(
        v.numel() for v in Simulation(cfg).server.global_state.values())

    a, _ = read_state(threads["checkpoint"])
    b, _ = read_state(on_dask["checkpoint"])
    # the model's tensors always; learned steps only where the same clients were accepted (a
    # rejected QAT client leaves the Dask run without them)
    assert {k for k in a if k.startswith("global/")} == {k for k in b if k.startswith("global/")}
    # rounds 0 and 1 trained before the kill: the same clients, strategies and accuracies, always
    for t, d in zip(threads["rounds"][:2], on_dask["rounds"][:2]):
        assert t["strategies"] == d["strategies"] and not d["rejected"]
        assert d["acc_q"] == pytest.approx(t["acc_q"], abs=1e-6) and d["acc_fp32"] == pytest.approx(t["acc_fp32"], abs=1e-6)
    if on_dask["rejected"]["total"] == 0:          # Dask ran the killed worker's clients again
        assert a.keys() == b.keys()
        for k in a:
            if k.startswith("global/"):
                assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5), k
        assert [r["strategies"] for r in threads["rounds"]] == [r["strategies"] for r in on_dask["rounds"]]
        assert on_dask["final_acc_q"] == pytest.approx(threads["final_acc_q"], abs=0.01)
    else:                                          # or gave up on them: rejected, and the run went on
        assert len(on_dask["rounds"]) == 3 and on_dask["rounds"][2]["rejected"]
    # clients really trained in two other processes
    assert [r["extra"]["workers"] for r in threads["rounds"]] == [1, 1, 1]
    assert max(r["extra"]["workers"] for r in on_dask["rounds"]) == 2
    # the LocalCluster's worker processes are gone with the flow
    left = [p for p in set(psutil.Process().children(recursive=True)) - before if p.is_running()
            and "distributed" in " ".join(p.cmdline())]
    assert not left


def test_worker_device_spreads_local_workers_over_gpus(monkeypatch):
    from fedhq_core.worker import worker_device

    assert worker_device("auto", 3).type == "cpu" or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [str(worker_device("auto", s)) for s in (0, 1, 2, None)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:0"]
    assert str(worker_device("cpu", 1)) == "cpu"



@pytest.mark.integration
def test_bench_on_dask_equals_the_thread_runner_per_seed(tmp_path, monkeypatch):
    """`fedhq bench --dask-local 1` over two seeds: each seed's accuracies equal the thread
    runner's. The bench loads its data once (the base seed); a worker reloads the train split
    from the shards' key, which is the key that data was loaded with (with the run's seed in it,
    seed 1's worker trained on another split, its test images included: 0.706 against 0.375).
    Like with like: one client at a time with the same intra-op threads (torch's thread count
    changes float sums; at 1 thread against 2, seed 0 ended 2 images apart)."""
    import json

    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    out = {}
    for name, extra in (("threads", []), ("dask", ["--dask-local", "1"])):
        out[name] = tmp_path / f"{name}.json"
        assert main(["bench", "--rounds", "2", "--clients", "8", "--local-epochs", "1", "--no-progress",
                     "--strategies", "fedhq", "--seeds", "0,1", "--no-tracking", "--set", "profile_reps=1",
                     "--set", "max_concurrency=1", "--json", str(out[name]), *extra]) == 0
    threads, dask = (json.loads(out[n].read_text())["per_seed"] for n in ("threads", "dask"))
    for seed in ("0", "1"):
        for metric in ("final_acc_q", "tail_acc_q", "final_acc_fp32", "total_sim_s"):
            assert dask[seed]["fedhq"][metric] == threads[seed]["fedhq"][metric], (seed, metric)
