"""Scale-out: the training flow on prefect-dask's DaskTaskRunner over a LocalCluster of two worker
processes ends with the same global weights as the same seeded run on the thread runner."""
from __future__ import annotations

import psutil
import pytest
import torch


@pytest.mark.slow
def test_dask_local_cluster_equals_thread_runner(tiny_cfg):
    from fedhq_core.checkpoint import read_state
    from flows.train import run_training, task_runner_for

    cfg = tiny_cfg.replace(rounds=3, strategy="fedhq", significance="none", adjust_every=1, max_concurrency=2)
    threads = run_training(cfg)
    before = set(psutil.Process().children(recursive=True))
    dask_cfg = cfg.replace(dask_local=2)
    assert type(task_runner_for(dask_cfg)).__name__ == "DaskTaskRunner"
    on_dask = run_training(dask_cfg)

    a, _ = read_state(threads["checkpoint"])
    b, _ = read_state(on_dask["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("global/"):
            assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5), k
    assert [r["strategies"] for r in threads["rounds"]] == [r["strategies"] for r in on_dask["rounds"]]
    assert on_dask["final_acc_q"] == pytest.approx(threads["final_acc_q"], abs=0.01)
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
