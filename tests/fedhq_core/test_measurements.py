"""Server measurements as objects: the registry, and a new measurement added the documented way
(its class, registered, named by an allocator) runs each round, is priced and checkpointed."""
from __future__ import annotations

import pytest


def test_registry_names_the_measurements_in_their_order():
    from fedhq_core.measurements import CARRIED, DURING, NAMES, REGISTRY

    assert NAMES == ("gap", "sensitivity", "partials", "lineages")
    assert {m.name: m.when for m in REGISTRY} == {"gap": DURING, "sensitivity": CARRIED, "partials": CARRIED,
                                                  "lineages": DURING}
    assert [m.name for m in REGISTRY if m.later_only] == ["sensitivity", "partials", "lineages"]


def test_a_new_measurement_runs_where_an_allocator_reads_it(tiny_cfg):
    """The docs' worked example (docs/design.md, "Where a new thing goes"): the spread of the
    round's update norms, priced as one proxy-split pass, carried into the next round."""
    from fedhq_core.allocation import Capabilities
    from fedhq_core.allocation.uniform import UniformAllocator
    from fedhq_core.loop import run
    from fedhq_core.measurements import CARRIED, Measurement
    from fedhq_core.server import update_norm
    from fedhq_core.simulation import Simulation

    class UpdateSpread(Measurement):
        name, when, later_only, state_key = "spread", CARRIED, True, "spreads"

        def measure(self, server, results):
            norms = [update_norm(r) for r in results]
            self.history.append(max(norms) - min(norms))
            return server.pricing.server.proxy_s()

    class Reader(UniformAllocator):
        @property
        def capabilities(self) -> Capabilities:
            return Capabilities(measurements=frozenset({"spread"}))

    cfg = tiny_cfg.replace(rounds=3)
    sim = Simulation(cfg)
    spread = UpdateSpread(cfg)
    sim.server.measurements["spread"] = spread                # the registration line, for this run only
    sim.allocator = Reader("qat", "all-qat")
    run(cfg, sim=sim)
    assert len(spread.history) == cfg.rounds - 1 and all(v >= 0 for v in spread.history)   # none after the last
    assert sim.measured("spread") == spread.history
    assert sim.server.state_meta()["spreads"] == spread.history
    # not read by all-qat: not taken, not priced
    plain = run(cfg)
    assert "spread" not in plain.server.measurements and plain.server.gaps == []
    assert sim.pricing.clock.now_s >= plain.pricing.clock.now_s - 1e-9


def test_server_takes_only_what_the_allocator_names(tiny_cfg):
    from fedhq_core.loop import run

    sim = run(tiny_cfg.replace(rounds=2, strategy="all-ptq"))
    assert sim.server.gaps == [] and sim.server.partials == []
    assert all(m.history == [] for m in sim.server.measurements.values())
    with pytest.raises(KeyError):
        sim.server.read("nope")


def test_pilot_labels_are_paired_true_class_probabilities():
    """The family's labels score two models on the same images by the probability each gives the
    true class: a near-uniform model scores 1/C (below a confident model right on 20%, as accuracy
    orders them, unlike cross-entropy); a diverged model's NaN outputs score 0; a paired
    difference carries the standard error of the per-image differences."""
    import numpy as np
    import torch
    from torch import nn

    from fedhq_core.server import paired_points, true_class_prob

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.logits = logits

        def forward(self, x):
            return self.logits[: len(x)] + 0 * self.w

    y = torch.arange(10) % 10
    uniform = true_class_prob(Fixed(torch.zeros(10, 10)), torch.zeros(10, 1), y)
    confident = torch.full((10, 10), -20.0)     # sure of one class: the true one on 2 images of 10
    confident[torch.arange(10), torch.where(torch.arange(10) < 2, y, (y + 1) % 10)] = 20.0
    sharp = true_class_prob(Fixed(confident), torch.zeros(10, 1), y)
    assert np.allclose(uniform, 0.1) and sharp.mean() == pytest.approx(0.2)
    ce = lambda logits: float(nn.functional.cross_entropy(logits, y))  # noqa: E731
    assert ce(confident) > ce(torch.zeros(10, 10))   # cross-entropy would prefer the uniform model
    broken = true_class_prob(Fixed(torch.full((10, 10), float("nan"))), torch.zeros(10, 1), y)
    assert (broken == 0).all()
    mean, se = paired_points(np.array([0.5, 0.6, 0.7]), np.array([0.4, 0.5, 0.5]))
    assert mean == pytest.approx(100 * 0.4 / 3) and se == pytest.approx(100 * np.std([0.1, 0.1, 0.2], ddof=1) / np.sqrt(3))
