"""The centralized reference: the federated run's pooled images, its sample-steps, its schedule."""
from __future__ import annotations


def test_central_reference_trains_the_federated_runs_sample_steps(digits):
    from fedhq_core.central import federated_sample_steps, train_central
    from fedhq_core.config import ExperimentConfig
    from fedhq_core.simulation import Simulation

    cfg = ExperimentConfig(strategy="fp32", clients=6, rounds=3, fraction=0.5, local_epochs=1, batch_size=32,
                           lr_schedule="cosine", tracking=False)
    sim = Simulation(cfg, dataset=digits)
    sizes = [len(s) for s in sim.shards]
    steps = federated_sample_steps(cfg, sizes)
    assert steps == round(3 * 3 / 6 * 1 * sum(sizes))            # 3 of 6 clients a round, 3 rounds
    # the peak rate is chosen on validation; a rate that diverges stops early and is never chosen
    out = train_central(cfg, digits, lr_scales=(1e4, 1.0, 0.3))
    assert out["sample_steps"] == steps and out["pool_size"] == sum(sizes)
    assert out["acc_fp32"] > 0.5 and 0 <= out["val_acc_fp32"] <= 1   # ~1.5 epochs of digits: far above chance
    wild, *rest = out["candidates"]
    assert wild["diverged"] and wild["sample_steps"] < steps and "val_acc_fp32" not in wild
    assert out["lr"] in {c["lr"] for c in rest} and not out["diverged"]
    assert out["val_acc_fp32"] == max(c["val_acc_fp32"] for c in rest)
    # no validation split: nothing to choose on, the federated rate alone
    alone = train_central(cfg.replace(val_fraction=0.0), digits, lr_scales=(1e4, 1.0))
    assert [c["lr"] for c in alone["candidates"]] == [cfg.lr] and alone["lr"] == cfg.lr
