"""The host-work micro-benchmark: what the server's Python, numpy and scikit-learn work costs per
call and per element on this host's core, written as the clock's price table
(``fedhq_core/hardware/host_prices.json``, see :mod:`fedhq_core.hardware.host_work`).

    python -m flows.bench_host --write        # measure, print, and write the table (run once, quiet host)
    python -m flows.bench_host                # measure and print only

What it measures, each in the code the server runs:

* every registered strategy's ``allocate/<name>`` and ``observe/<name>``, the uploads' ``decode``,
  the cost model's ``ridge_fit``, SigAcc's ``gbr_predict`` and the label ``histogram`` features:
  in short digits runs at three fleet sizes (8, 30 and 80 clients, half of them a round), every
  operation timed where it runs;
* ``decode`` of larger uploads (the small CNN at CIFAR-10's shape, ResNet-18; 8 and 4 bits);
* the family refit's ``gbr_fit``: SigAcc's regressor refitted on a quarter, a half and all of each
  shipped family's rows.

Per kind, seconds ~ calls x per_call_s + elements x per_element_s, fitted by non-negative least
squares on the medians of equal-sized operations (``host_work.fit_prices``). The table is then
checked on a run it was not fitted on: the default digits run (20 clients, 10 a round), priced
against measured, per kind and in all (``fedhq devices --validate`` repeats that check).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from typing import Any

CALIBRATION_CLIENTS = (8, 30, 80)
CALIBRATION_ROUNDS = 6
HELD_OUT: dict[str, Any] = {}       # the held-out run: the default config (tests shorten it)
GBR_SHARES = (0.25, 0.5, 1.0)


def _digits_cfg(state_dir: str, **kw: Any) -> Any:
    from fedhq_core.config import ExperimentConfig

    return ExperimentConfig(**{"dataset": "digits", "tracking": False, "state_dir": state_dir, "profile_reps": 1,
                               "checkpoint": False, **kw})


def evict_caches(kind: str = "", _state: dict = {}) -> None:  # noqa: B006 - one buffer, reused
    """Write over 64 MiB before a server operation of another kind than the last is timed, as the
    clients' training (or the server's torch work) does between the phases of a round; uploads
    decoded one after another stay warm. The prices are those of the server's work as a run
    meets it (with warm caches throughout, the short calibration runs priced a default run's
    allocation 44% low)."""
    import numpy as np

    if kind and kind == _state.get("last"):
        return
    _state["last"] = kind
    if "buf" not in _state:
        _state["buf"] = np.zeros(8 << 20)
    _state["buf"] += 1.0


def in_situ_samples(state_dir: str, rounds: int = CALIBRATION_ROUNDS) -> list[tuple[str, float, float, float]]:
    """Every operation of short digits runs of every registered strategy at each fleet size."""
    from fedhq_core.data import load_dataset
    from fedhq_core.hardware.host_work import HostPrice, use_prices
    from fedhq_core.loop import run
    from fedhq_core.simulation import Simulation
    from fedhq_core.strategies import REGISTRY

    ds = load_dataset("digits")
    samples: list[tuple[str, float, float, float]] = []
    for clients in CALIBRATION_CLIENTS:
        for name in REGISTRY:
            cfg = _digits_cfg(state_dir, strategy=name, clients=clients, fraction=0.5, rounds=rounds,
                              local_epochs=1, adjust_every=1, min_shard_size=4)
            sim = Simulation(cfg, dataset=ds)
            sim.host_work.samples, sim.host_work.before = samples, evict_caches
            with use_prices({"*": HostPrice(0.0, 0.0)}):      # measuring: nothing is priced yet
                run(cfg, sim=sim)
            print(f"bench-host: {name:14s} {clients:3d} clients: {len(samples)} operations so far", file=sys.stderr)
    return samples


def decode_samples(reps: int = 5) -> list[tuple[str, float, float, float]]:
    """Uploads of larger networks than digits' (the small CNN on CIFAR-10's shape, ResNet-18)
    decoded and checked as ``Dispatch.accept`` does, at 8 and 4 bits: the price per byte."""
    import torch

    from fedhq_core.hardware.host_work import HostWork
    from fedhq_core.hardware.server_work import synthetic_upload
    from fedhq_core.models import build_model
    from fedhq_core.quant import model_state, prepare_model, quant_layers
    from fedhq_core.wire import decode_upload, save_wire, to_wire
    from fedhq_core.worker import expected_upload_limit

    work = HostWork(samples=[])
    g = torch.Generator().manual_seed(0)
    for model in ("cnn", "resnet18"):
        net = prepare_model(build_model(model, (3, 32, 32), 10), 4, 4, 8)
        state = model_state(net)
        ranges = {name: (0.0, 1.0) for name, _ in quant_layers(net)}
        expected = {k: tuple(v.shape) for k, v in state.items() if v.is_floating_point()}
        for bits in (8, 4):
            r = synthetic_upload(state, ranges, bits, g)
            blob = save_wire(to_wire(r))
            for _ in range(reps):
                evict_caches()         # each timed decode starts cold (as the round's first does)
                with work.op("decode", 1, r.upload_bytes):
                    decode_upload(blob, expected, max_bytes=expected_upload_limit(state, 4.0), max_samples=10)
    return list(work.samples or [])


def gbr_fit_samples(reps: int = 3) -> list[tuple[str, float, float, float]]:
    """SigAcc's regressor refitted (as a run refits its family) on the shipped families' own rows:
    a quarter, a half and all of each family's rows."""
    import numpy as np

    from fedhq_core.allocation.pilot import FAMILY_DIR, Family
    from fedhq_core.allocation.significance import FEATURES, SignificanceModel
    from fedhq_core.hardware.host_work import HostWork
    from fedhq_core.hardware.server_work import gbr_fit_elements

    work = HostWork(samples=[])
    for path in sorted(FAMILY_DIR.glob("*.json")):
        fam = Family.load(path)
        x, y = np.asarray(fam.X), np.asarray(fam.gains)
        for share in GBR_SHARES:
            n = max(20, int(share * len(y)))
            for _ in range(reps):
                evict_caches()
                with work.op("gbr_fit", 1, gbr_fit_elements(n, len(FEATURES))):
                    SignificanceModel.fit(x[:n], y[:n], fam.seed, {}, cv=False)
    return list(work.samples or [])


def held_out(state_dir: str, prices: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default digits run (not among the calibration's): priced against measured host work,
    per kind and in all, from the run's summary; ``prices``: a fitted table not yet written (else
    the shipped one)."""
    from contextlib import nullcontext

    from fedhq_core.hardware.host_work import prices_from, use_prices
    from fedhq_core.loop import run

    with use_prices(prices_from(prices)) if prices is not None else nullcontext():
        s = run(_digits_cfg(state_dir, **HELD_OUT)).summary()
    priced, measured = s["host_work_priced_s"], s["host_work_measured_s"]
    return {"run": "fedhq run (defaults: digits, 20 clients, 10 a round, 15 rounds)", "by_kind": s["host_work_by_kind"],
            "priced_s": priced, "measured_s": measured, "error": priced / measured - 1 if measured else float("nan")}


def print_check(check: dict[str, Any]) -> None:
    from flows.cli_options import format_table

    rows = [[k, f"{r['calls']:g}", f"{r['elements']:.3g}", f"{1e3 * r['priced_s']:.2f}", f"{1e3 * r['measured_s']:.2f}",
             f"{100 * (r['priced_s'] / r['measured_s'] - 1):+.0f}%" if r["measured_s"] > 0 else "-"]
            for k, r in check["by_kind"].items()]
    rows.append(["all", "", "", f"{1e3 * check['priced_s']:.2f}", f"{1e3 * check['measured_s']:.2f}",
                 f"{100 * check['error']:+.0f}%"])
    print(f"host work of {check['run']}: priced against measured on this host")
    print(format_table(["kind", "calls", "elements", "priced ms", "measured ms", "error"], rows))


def calibrate(state_dir: str) -> dict[str, Any]:
    import numpy
    import sklearn
    import torch

    from fedhq_core.hardware.host_work import fit_prices
    from fedhq_core.simulation import cpu_model

    samples = in_situ_samples(state_dir) + decode_samples() + gbr_fit_samples()
    prices = fit_prices(samples)
    check = held_out(state_dir, prices)
    return {"reference": {"cpu": cpu_model() or platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__,
                          "scikit-learn": sklearn.__version__, "torch": torch.__version__,
                          "date": datetime.date.today().isoformat(), "command": "python -m flows.bench_host --write",
                          "calibration": f"digits, every registered strategy, {CALIBRATION_CLIENTS} clients "
                                         f"(half a round), {CALIBRATION_ROUNDS} rounds; gbr_fit on {GBR_SHARES} of each shipped "
                                         f"family's rows"},
            "prices": prices,
            "held_out": {k: v for k, v in check.items() if k != "by_kind"}, "_check": check}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="write fedhq_core/hardware/host_prices.json")
    a = p.parse_args(argv)
    from fedhq_core.hardware.host_work import PRICES_FILE
    from flows.cli_options import format_table

    with tempfile.TemporaryDirectory() as tmp:
        out = calibrate(tmp)
    check = out.pop("_check")
    print(f"reference core: {out['reference']['cpu']}")
    print(format_table(["kind", "per call us", "per element ns", "ops", "sizes", "fit error"],
                       [[k, f"{1e6 * v['per_call_s']:.1f}", f"{1e9 * v['per_element_s']:.3f}", v["ops"], v["sizes"],
                         f"{100 * v['fit_mape']:.0f}%"] for k, v in out["prices"].items()]))
    print_check(check)
    if a.write:
        PRICES_FILE.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {PRICES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
