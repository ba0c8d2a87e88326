"""Server measurements as objects: the registry, and a new measurement added the documented way
(its class, registered, named by an allocator) runs each round, is priced and checkpointed."""
from __future__ import annotations

import pytest


def test_registry_names_the_measurements_in_their_order():
    from fedhq_core.measurements import CARRIED, DURING, NAMES, REGISTRY

    assert NAMES == ("gap", "sensitivity", "partials")
    assert {m.name: m.when for m in REGISTRY} == {"gap": DURING, "sensitivity": CARRIED, "partials": CARRIED}
    assert [m.name for m in REGISTRY if m.later_only] == ["sensitivity", "partials"]


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
