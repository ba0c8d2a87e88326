"""Host work: counted by kind, priced from the shipped table, timed exclusive of nested work."""
from __future__ import annotations

import time

import pytest

from fedhq_core.hardware.host_work import HostPrice, HostWork, fit_prices, host_prices, price_of, use_prices


def test_nested_operations_are_timed_apart_and_priced_from_the_table():
    w = HostWork(samples=[])
    with use_prices({"outer": HostPrice(1e-3, 1e-6), "inner": HostPrice(0.0, 2e-6)}):
        with w.op("outer", 1, 100):
            time.sleep(0.02)
            with w.op("inner", 1, 500):
                time.sleep(0.03)
        assert w.priced_s() == pytest.approx(1e-3 + 100e-6 + 500 * 2e-6)
        by = w.by_kind()
    # the outer operation's own time excludes the inner one's (each slept its share)
    assert 0.03 <= w.kinds["inner"][2] < 0.045 and 0.02 <= w.kinds["outer"][2] < 0.03
    assert w.measured_s == pytest.approx(sum(m for *_, m in w.samples))
    assert by["outer"]["priced_s"] == pytest.approx(1.1e-3) and by["inner"]["calls"] == 1
    taken = w.take(("inner",))
    assert set(taken.kinds) == {"inner"} and set(w.kinds) == {"outer"}


def test_prices_are_fitted_per_call_and_per_element():
    """Known constants come back from noisy operations (one outlier a size moves a median, not
    the price); a kind of one size gets a price per call."""
    samples = []
    for n in (10, 100, 1000, 5000):
        for rep in range(5):
            slow = 50.0 if rep == 0 else 1.0
            samples.append(("k", 1.0, float(n), slow * (2e-4 + n * 3e-7)))
    samples += [("one", 2.0, 0.0, 8e-4)] * 3
    prices = fit_prices(samples)
    assert prices["k"]["per_call_s"] == pytest.approx(2e-4, rel=1e-3)
    assert prices["k"]["per_element_s"] == pytest.approx(3e-7, rel=1e-3) and prices["k"]["sizes"] == 4
    assert prices["one"] == pytest.approx({"per_call_s": 4e-4, "per_element_s": 0.0, "ops": 3, "sizes": 1,
                                           "fit_mape": 0.0})


def test_shipped_table_prices_every_kind_a_run_counts():
    """The table holds the strategies the benchmarks compare and the server's kinds; every
    registered strategy is priced, one added since the table was measured (or a plug-in) at its
    verb's dearest price."""
    from fedhq_core.strategies import REGISTRY

    table = host_prices()
    for name in ("fedhq", "all-ptq", "all-qat", "random-hybrid", "fp32"):
        assert f"allocate/{name}" in table and f"observe/{name}" in table
    for name in REGISTRY:
        assert price_of(f"allocate/{name}").per_call_s > 0 and price_of(f"observe/{name}").per_call_s > 0
    assert {"decode", "gbr_fit", "gbr_predict", "ridge_fit", "histogram"} <= set(table)
    dearest = max((p for k, p in table.items() if k.startswith("allocate/")),
                  key=lambda p: (p.per_call_s, p.per_element_s))
    assert price_of("allocate/my-plugin") == dearest
    with pytest.raises(KeyError):
        price_of("no-such-kind")


def test_a_run_reports_priced_and_measured_host_work_and_charges_the_priced(tiny_cfg):
    from fedhq_core.loop import run

    s = run(tiny_cfg.replace(strategy="fedhq", rounds=3, adjust_every=1)).summary()
    by = s["host_work_by_kind"]
    assert {"allocate/fedhq", "observe/fedhq", "decode", "ridge_fit"} <= set(by)
    assert s["host_work_priced_s"] == pytest.approx(sum(k["priced_s"] for k in by.values()))
    assert s["host_work_measured_s"] > 0
    assert s["host_work_measured_s"] == pytest.approx(sum(k["measured_s"] for k in by.values()))
    for r in s["rounds"]:   # the allocator's and the decoding's priced seconds are on the clock
        assert r["extra"]["sim_alloc_s"] > 0 and r["extra"]["sim_decode_s"] > 0
        assert r["extra"]["host_priced_s"] == pytest.approx(r["extra"]["sim_alloc_s"] + r["extra"]["sim_decode_s"])
