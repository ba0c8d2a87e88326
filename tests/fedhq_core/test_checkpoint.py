"""Checkpoints: atomic, verified, safe to load; a corrupt one falls back to the previous good one,
and a run resumed from it ends where the uninterrupted run ends."""
from __future__ import annotations

import pytest
import torch

from fedhq_core.checkpoint import Checkpoints, find_run, read_state, save_state
from fedhq_core.errors import CheckpointError
from fedhq_core.loop import run
from fedhq_core.simulation import Simulation


class Crash(Exception):
    pass


def _crash_after(n):
    def on_round(rec):
        if rec.round == n:
            raise Crash
    return on_round


def test_corrupt_checkpoint_falls_back_and_resume_matches_uninterrupted(tiny_cfg, tmp_path):
    # with FedAvgM and the deployed running average: server state a resumed run must restore
    cfg = tiny_cfg.replace(rounds=4, strategy="fedhq", significance="none", adjust_every=1,
                           server_momentum=0.5, server_lr=0.5, server_average=0.5)
    ref = run(cfg)

    ck = Checkpoints(tmp_path / "runs" / "r1", keep=3)
    with pytest.raises(Crash):
        run(cfg, on_round=_crash_after(2), checkpoints=ck)
    files = ck.files()
    assert [p.name for p in files] == ["round-0000.ckpt", "round-0001.ckpt", "round-0002.ckpt"]
    assert not list(ck.dir.glob(".*tmp*"))  # no temporary left behind
    files[-1].write_bytes(files[-1].read_bytes()[:-100])  # truncated mid-write by a dying disk
    warnings: list[str] = []
    tensors, meta, path = Checkpoints(ck.run_dir).load_latest(warnings.append)
    assert path == files[-2] and meta["round"] == 2
    assert len(warnings) == 1 and "round-0002.ckpt" in warnings[0] and "truncated or corrupt" in warnings[0]
    assert "falling back to round-0001.ckpt" in warnings[0]

    sim = Simulation(cfg)
    sim.load_state_dict(tensors, meta)
    assert sim.rnd == 2 and len(sim.records) == 2 and sim.allocator.cost.version == 2
    run(cfg, sim=sim)
    for k, v in ref.server.global_state.items():
        assert torch.allclose(sim.server.global_state[k].to(v.dtype), v, atol=1e-6), k
    assert ref.server.velocity and all(torch.allclose(sim.server.velocity[k], v, atol=1e-6)
                                       for k, v in ref.server.velocity.items())
    assert ref.server.n_averaged == sim.server.n_averaged == 2 and all(
        torch.allclose(sim.server.averaged[k].double(), v.double(), atol=1e-6) for k, v in ref.server.averaged.items())
    assert [r.acc_q for r in sim.records] == [r.acc_q for r in ref.records]
    assert [r.strategies for r in sim.records] == [r.strategies for r in ref.records]


def test_unreadable_checkpoints_give_one_clear_error(tmp_path):
    ck = Checkpoints(tmp_path / "runs" / "r2")
    save_state(ck.dir / "round-0000.ckpt", {"w": torch.ones(2)}, {"round": 1})
    tensors, meta = read_state(ck.dir / "round-0000.ckpt")
    assert torch.equal(tensors["w"], torch.ones(2)) and meta == {"round": 1}
    (ck.dir / "round-0000.ckpt").write_bytes(b"PK\x03\x04 a zip, not ours")
    with pytest.raises(CheckpointError, match="round-0000.ckpt: not a FedHQ checkpoint"):
        read_state(ck.dir / "round-0000.ckpt")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ck.load_latest(lambda m: None)


def test_find_run(tmp_path):
    with pytest.raises(CheckpointError, match="no unfinished run with a checkpoint"):
        find_run(tmp_path, "latest")
    with pytest.raises(CheckpointError, match="no checkpoints for run abc"):
        find_run(tmp_path, "abc")
    with pytest.raises(CheckpointError, match="invalid run id"):
        find_run(tmp_path, "../etc")
    for name in ("old", "new"):
        save_state(tmp_path / "runs" / name / "checkpoints" / "round-0000.ckpt", {}, {})
    assert find_run(tmp_path, "latest").name == "new" and find_run(tmp_path, "old").name == "old"


def test_resume_latest_is_the_newest_unfinished_run(tmp_path):
    import os

    from fedhq_core.checkpoint import CheckpointError, find_run, runs_root

    root = runs_root(tmp_path)
    for i, name in enumerate(("interrupted", "finished")):
        ckpt = root / name / "checkpoints" / "round-00001.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (1000 + i, 1000 + i))        # the finished run's checkpoint is the newer
    (root / "finished" / "DONE").write_bytes(b"")
    assert find_run(tmp_path, "latest").name == "interrupted"
    (root / "interrupted" / "DONE").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no unfinished run"):
        find_run(tmp_path, "latest")
