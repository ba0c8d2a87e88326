"""The FedHQ allocator: the coarse rule, the exact search, signed gains, families and online, end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhq_core.allocation import FedHQAllocator, SignificanceModel, allocate_coarse, best_deadline, objective
from fedhq_core.allocation.pilot import choose_significance, parse_grid
from fedhq_core.family_build import build_family
from fedhq_core.allocation.significance import client_features, minmax, setting_of
from fedhq_core.simulation import Simulation


# --- coarse geometry ------------------------------------------------------------------
def _points():
    s = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    a = np.array([0.1, 0.9, 0.05, 0.0, 0.5])
    t_ptq = np.array([10.0, 8.0, 5.0, 2.0, 1.0])
    t_qat = t_ptq * 1.5
    return s, a, t_ptq, t_qat


def test_xi_zero_gives_qat_wherever_it_helps():
    s, a, tp, tq = _points()
    x, _ = allocate_coarse(s, a, tp, tq, 0.0)
    assert x.tolist() == (a > 0).tolist() == [True, True, True, False, True]


def test_xi_one_gives_free_qat_only():
    s, a, tp, tq = _points()
    x, free = allocate_coarse(s, a, tp, tq, 1.0)
    assert np.array_equal(x, free)
    assert np.array_equal(free, (tq <= tp.max()) & (a > 0))  # T* = slowest client's PTQ time; gain > 0


def test_above_line_gets_qat_below_gets_ptq():
    # no free QAT here (QAT far slower), so only the line decides
    s = np.array([0.5, 0.5])
    a = np.array([0.9, 0.05])
    tp = np.array([1.0, 1.0])
    tq = np.array([100.0, 100.0])
    x, free = allocate_coarse(s, a, tp, tq, 0.5)  # line: a >= 1 - s = 0.5
    assert not free.any()
    assert x.tolist() == [True, False]


def test_best_deadline_is_the_exact_minimum_of_j_and_fast_clients_go_first():
    rng = np.random.default_rng(0)
    for xi in (0.1, 0.3, 0.7):
        a = rng.normal(0.05, 0.1, 12)
        tp = rng.uniform(1, 3, 12)
        tq = tp * rng.uniform(1.0, 2.0, 12)
        x = best_deadline(a, tp, tq, xi)
        best = min(objective(np.array([(m >> k) & 1 for k in range(12)], bool), tp, tq, a, xi) for m in range(4096))
        assert objective(x, tp, tq, a, xi) == pytest.approx(best)
        # the QAT set is every positive-gain client up to a deadline: faster QAT first
        assert not x[a <= 0].any()
        if x.any():
            assert np.all(tq[(a > 0) & ~x] > tq[x].max())


def test_signed_gains_negative_fleet_gets_ptq_positive_fleet_free_qat():
    """A synthetic fleet: where every predicted gain is <= 0 nobody gets QAT, even free; where
    gains are positive, every client whose QAT fits in the slowest PTQ time gets it free."""
    rng = np.random.default_rng(3)
    tp = rng.uniform(1, 4, 16)
    tq = tp * 1.3
    s = minmax(1.0 / tp)
    for xi in (0.0, 0.2, 1.0):
        x, free = allocate_coarse(s, -rng.uniform(0.01, 0.2, 16), tp, tq, xi)
        assert not x.any() and not free.any()
        assert not best_deadline(-np.ones(16), tp, tq, xi).any()
    gains = rng.uniform(0.01, 0.2, 16)
    x, free = allocate_coarse(s, gains, tp, tq, 1.0)
    assert free.tolist() == (tq <= tp.max()).tolist() and free.sum() >= 10 and np.array_equal(x, free)
    mixed = np.where(np.arange(16) % 2 == 0, gains, -gains)
    x, free = allocate_coarse(s, mixed, tp, tq, 0.2)
    assert not x[mixed <= 0].any() and np.array_equal(free, (mixed > 0) & (tq <= tp.max()))
    # J counts signed gains: adding a negative-gain client to the QAT set never lowers it
    assert objective(x | (mixed <= 0), tp, tq, mixed, 0.2) >= objective(x, tp, tq, mixed, 0.2)


def test_allocator_follows_the_sign_of_the_fitted_gain(tiny_cfg):
    """A SigAcc model fitted on synthetic rows (gain = gap - 0.1) sends a fleet to PTQ while the
    server's measured gap is small (no probe: where a family predicts, the run spends no rounds
    probing) and to QAT once it is large; the scatter marks the excluded."""
    sim = Simulation(tiny_cfg.replace(strategy="fedhq"))
    sim.profile()
    rng = np.random.default_rng(0)
    shards = sim.shard_features()
    rows, gains = [], []
    for gap in np.linspace(0, 0.4, 9):
        for c in range(sim.n_clients):
            rows.append(client_features(shards[c], rng.random(), gap, None, None, setting_of(sim.cfg)))
            gains.append(gap - 0.1)
    sim.set_significance(SignificanceModel.fit(np.array(rows), np.array(gains), seed=0))
    sampled = list(range(sim.n_clients))
    sim.server.measurements["gap"].history = [0.0]
    low = sim.allocator.allocate(0, sampled, sim)
    n_qat = sum(v == "qat" for v in low.strategies.values())
    assert low.info["n_sign_ptq"] == len(sampled) and n_qat == 0
    assert all(g <= 0 for g in low.info["scatter"]["gain"])
    sim.server.measurements["gap"].history = [0.4, 0.4, 0.4]
    high = sim.allocator.allocate(1, sampled, sim)
    assert high.info["n_sign_ptq"] == 0 and high.info["n_free_qat"] >= 1 and "qat" in high.strategies.values()


def test_a_family_fitted_elsewhere_drives_a_run_without_a_pilot(tiny_cfg, tmp_path):
    """A family of two settings (seeds 0 and 1, lr 0.02 and 0.1) covers a run with seed 7 and lr
    0.05: the run refits its rows (deterministic, charged as counted server work), trains no
    pilot, and logs its estimate every round."""
    base = tiny_cfg.replace(rounds=2, pilot_rounds=2)
    fam = build_family(base, parse_grid("seed=0,1;lr=0.02,0.1"), 2, "test")
    # per-client labels: one per sampled client and pilot round, from paired trainings
    assert len(fam.gains) == 2 * 2 * 3 and len(set(fam.setting_ids)) == 2 and np.isfinite(fam.gains).all()
    assert set(fam.r2) == {"train", "cv", "cv_rounds", "cv_settings", "setting_level", "setting_level_sign",
                           "setting_level_regret"} and fam.build["sim_s"] > 0
    # each label carries its paired standard error; each setting a pooled all-QAT - all-PTQ label
    # (two settings: too few for a leave-one-out R²)
    assert len(fam.ses) == len(fam.gains) and (np.asarray(fam.ses) >= 0).all()
    assert len(fam.setting_gains) == 2 and np.isfinite(fam.setting_gains).all() and np.isnan(fam.setting_r2())
    q = fam.label_quality()
    assert q["client"]["n"] == 12 and q["client"]["ratio"] == pytest.approx(q["client"]["se_median"] / q["client"]["spread"])
    # fedhq uses a covering family only where it predicts (leave-one-setting-out R² >= 0.5):
    # below that it neither refits nor reads it; the coarse ablation takes any covering family
    fam.r2["cv_settings"] = 0.2
    cfg = tiny_cfg.replace(strategy="fedhq", rounds=4, adjust_every=2, seed=7, lr=0.05,
                           family_file=str(fam.save(tmp_path / "weak.json")))
    weak = Simulation(cfg)
    assert choose_significance(weak) is None and weak.fit.source == "online" and weak.fit.sim_s == 0
    assert "0.20 per client, below the 0.50" in weak.fit.detail
    assert weak.setup_work.priced_s() == 0
    coarse = Simulation(cfg.replace(strategy="fedhq-coarse"))
    assert choose_significance(coarse) is not None and coarse.fit.source == "family"
    fam.r2["cv_settings"] = 0.9     # (the gate, not the family's fit, is under test from here)
    path = fam.save(tmp_path / "fam.json")
    cfg = cfg.replace(family_file=str(path))
    assert fam.covers(cfg)[0] and not fam.covers(cfg.replace(lr=0.2))[0]
    sim = Simulation(cfg)
    trained = []
    import fedhq_core.allocation.pilot as P

    orig = P.train_here
    P.train_here = lambda *a: trained.append(a) or orig(*a)
    try:
        sig = choose_significance(sim)
    finally:
        P.train_here = orig
    assert not trained and sim.fit.source == "family" and sim.fit.sim_s > 0 and sim.fit.build_settings == 2
    # a checkpoint rebuilds the same model and keeps the R² figures it measured
    again = SignificanceModel.from_state(sig.to_state())
    X = np.asarray(sig.fit_data["X"])
    assert np.array_equal(again.predict(X), sig.predict(X)) and again.cv_r2_settings == sig.cv_r2_settings
    from fedhq_core.loop import run

    run(cfg, sim=sim)
    alloc = sim.allocator
    assert isinstance(alloc, FedHQAllocator)
    assert [r["version"] for r in alloc.refits] == [1, 2]
    assert all("cost_model_mape" in r.extra for r in sim.records)
    assert [r.extra["cost_model_version"] for r in sim.records] == [0, 0, 1, 1]
    # the estimate follows the run: logged per round with the gap and the family's level; no
    # partial aggregates are compared (no probing where the family predicts)
    assert all("family_gain" in r.extra and "quant_gap" in r.extra for r in sim.records)
    assert sim.server.partials == []
    s = sim.summary()
    assert s["fit_source"] == "family" and s["charged_total_sim_s"] == pytest.approx(s["total_sim_s"] + sim.fit.sim_s)


def test_a_family_that_predicts_only_per_setting_decides_without_exploring(tiny_cfg, tmp_path):
    """With ``significance: setting``, a covering family whose per-client model predicts nothing
    but whose setting-level model does (leave-one-setting-out R² >= 0.5): the run fits the
    setting-level model (priced, charged), commits to the sign of its prediction after the PTQ
    warm-up, and never explores (no partial aggregates measured). By default (``auto``) the same
    family is not read: the run decides online."""
    from fedhq_core.allocation.pilot import COVERED_FIELDS, Family
    from fedhq_core.allocation.significance import FEATURES

    cfg = tiny_cfg.replace(strategy="fedhq", rounds=5, seed=3, significance="setting")
    rng = np.random.default_rng(0)
    fam = Family("digits", "cnn", [{f: getattr(cfg.replace(lr=lr), f) for f in ("seed", *COVERED_FIELDS)}
                                   for lr in (0.02, 0.1)], rng.random((40, len(FEATURES))).tolist(),
                 rng.normal(0, 1, 40).tolist(), list(range(40)), [0] * 40, [0] * 20 + [1] * 20,
                 r2={"cv_settings": 0.1, "setting_level": 0.8})
    # a setting whose pilot ended before the warm-up has no label: left out, not fitted on as NaN
    fam.setting_gains, fam.setting_ses = [float("nan"), 3.0], [float("nan"), 0.1]
    rows, gains, _ = fam.setting_data()
    assert rows.shape[0] == 1 and gains.tolist() == [3.0]
    fam.setting_gains, fam.setting_ses = [2.0, 3.0], [0.1, 0.1]
    auto = Simulation(cfg.replace(significance="auto", family_file=str(fam.save(tmp_path / "auto.json"))))
    assert choose_significance(auto) is None and auto.fit.source == "online" and not auto.allocator.prior
    for gains, mode in (([2.0, 3.0], "qat"), ([-2.0, -1.0], "ptq")):
        fam.setting_gains, fam.setting_ses = gains, [0.1, 0.1]
        sim = Simulation(cfg.replace(family_file=str(fam.save(tmp_path / f"{mode}.json"))))
        assert choose_significance(sim) is None and sim.fit.source == "family-setting"
        assert sim.setup_work.priced_s() > 0 and sim.allocator.prior["mode"] == mode
        assert f"commits to {mode}" in sim.fit.detail
    from fedhq_core.loop import run

    run(sim.cfg, sim=sim)       # (the last: PTQ) one PTQ warm-up round, then the commit, no exploring
    assert sim.records[0].extra["qat_share"] == 0 and "committed_qat" not in sim.records[0].extra
    assert [r.extra["committed_qat"] for r in sim.records[1:]] == [0] * 4
    assert not any(r.extra["qat_share"] for r in sim.records)
    assert sim.server.partials == [] and sim.allocator.decision["round"] == 1
    assert not any(r.extra.get("exploring") for r in sim.records)
    assert sim.summary()["fit_source"] == "family-setting"


def test_setting_level_r2_reads_left_out_settings():
    """The setting-level model recovers a gain driven by the weight bits (R² near 1 on settings it
    never saw, every sign right) and scores noise near or below 0, with a regret; label quality
    is SE against spread."""
    from fedhq_core.allocation.significance import label_quality, setting_level_scores, setting_row

    rng = np.random.default_rng(0)
    base = {"partition": "dirichlet", "alpha": 0.5, "classes_per_client": 2, "clients": 10, "fraction": 0.5,
            "a_bits": 8, "first_last_bits": 8, "lr": 0.05, "local_epochs": 1, "batch_size": 32}
    settings = [dict(base, w_bits=int(b), alpha=float(a)) for b, a in zip(rng.choice([2, 3, 4, 8], 12),
                                                                          rng.choice([0.1, 0.5, 1.0], 12))]
    rows = np.stack([setting_row(s) for s in settings])
    signal = 40 * rows[:, 0]          # the weights' quantization step, 2^-w_bits
    good = setting_level_scores(rows, signal + rng.normal(0, 0.1, 12), np.full(12, 0.1))
    assert good["setting_level"] > 0.9 and good["setting_level_sign"] == 1.0
    noise = setting_level_scores(rows, rng.normal(0, 1, 12), np.full(12, 0.1))
    assert noise["setting_level"] < 0.3 and noise["setting_level_regret"] > 0
    q = label_quality(np.array([1.0, 3.0, 5.0]), np.array([0.5, 0.5, 1.0]))
    assert q["spread"] == pytest.approx(2.0) and q["ratio"] == pytest.approx(0.25)


class _View:
    """A FleetView of 10 clients: the fast half's QAT fits the slowest PTQ time."""

    n_clients, rounds, proxy_size = 10, 20, 200

    def __init__(self):
        self.quant_gap, self.online_gains = 0.0, []

    def predicted_times(self, cids):
        t = np.array([1.0 + c for c in cids])
        return {"ptq": t, "qat": t * 2.0}


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_online_explores_a_bounded_span_then_commits_once(sign):
    """Online (no predictive family): the first 20% of the rounds (4 of 20) warm up on PTQ; the
    next 20% explore with at most half the round's clients on QAT, all free, measuring the
    partial comparisons; then one commit by the comparisons' sign: QAT for every free client,
    or PTQ for all; nothing is measured after it, nor does it switch back. A checkpoint keeps
    the decision."""
    alloc, view, cids = FedHQAllocator(0.5, None, seed=3), _View(), list(range(10))
    free = {c for c in cids if 2.0 * (1 + c) <= 10.0}          # clients 0-4
    masks = []
    for rnd in range(14):
        a = alloc.allocate(rnd, cids, view)
        qat = {c for c, s in a.strategies.items() if s == "qat"}
        masks.append(qat)
        if rnd < 4:
            assert a.info["exploring"] == 0 and not qat and alloc.capabilities.measurements == frozenset()
        elif rnd < 8:
            assert a.info["exploring"] == 1 and 1 <= len(qat) <= 5 and qat <= free
            assert alloc.capabilities.measurements == {"partials"}
            view.online_gains.append(sign * 0.02 * (rnd + 1))
        else:
            assert a.info["exploring"] == 0 and alloc.capabilities.measurements == frozenset()
            assert qat == (free if sign > 0 else set())
    assert alloc.decision["round"] == 8 and alloc.decision["online_n"] == 4
    assert alloc.decision["mode"] == ("qat" if sign > 0 else "ptq")
    assert len({frozenset(m) for m in masks[8:]}) == 1          # never switches back
    again = FedHQAllocator(0.5, None, seed=3)
    again.load_state_dict(alloc.state_dict())
    assert again.decision == alloc.decision


def test_online_run_pays_only_for_what_it_measured(tiny_cfg):
    """A real online run: the partial comparisons the server took are exactly the exploring
    rounds' (3 of 5, after a round of warm-up), each finite; a baseline pays for none."""
    cfg = tiny_cfg.replace(strategy="fedhq", rounds=5, significance="online", fraction=1.0)
    sim = Simulation(cfg)
    from fedhq_core.loop import run

    run(cfg, sim=sim)
    assert sim.fit.source == "online" and sim.allocator.significance is None
    exploring = [r.extra["exploring"] for r in sim.records]
    assert exploring == [0, 1, 1, 1, 0] and len(sim.server.partials) == 3
    assert all(g is None or np.isfinite(g) for g in sim.server.partials)
    # the paired measurements' device work is charged and itemized: every client's in the
    # summary (a critical client's would stand as shadow_<kind> in the simulated-time split)
    paired = [r.extra.get("n_paired", 0) for r in sim.records]
    assert sum(paired) > 0 and all(p == 0 for p, e in zip(paired, exploring) if not e)
    s = sim.summary()
    assert s["shadow_device_s"] > 0
    assert s["shadow_device_s"] == pytest.approx(sum(r.extra.get("shadow_device_s", 0.0) for r in sim.records))
    assert all((r.extra.get("shadow_device_s", 0.0) > 0) == (p > 0) for r, p in zip(sim.records, paired))
    # every statistic of each comparison is on its round's record; the commit read accuracy's
    recorded = [r.extra for r in sim.records if "partial_tcp" in r.extra]
    assert len(recorded) == 3 and all({"partial_accuracy", "partial_tcp_se"} <= set(e) for e in recorded)
    assert sim.server.partials == pytest.approx([e["partial_accuracy"] for e in recorded])
    assert sim.allocator.decision["online_gain"] == pytest.approx(np.mean([e["partial_accuracy"] for e in recorded[:-1]]))
    tcp = Simulation(cfg.replace(online_statistic="tcp"))
    run(tcp.cfg, sim=tcp)
    assert tcp.server.partials == pytest.approx([r.extra["partial_tcp"] for r in tcp.records if "partial_tcp" in r.extra])
    base = Simulation(cfg.replace(strategy="all-ptq"))
    run(base.cfg, sim=base)
    assert base.server.partials == [] and base.server.gaps == []
    assert base.summary()["shadow_device_s"] == 0 and not any(k.startswith("shadow_") for k in base.summary()["sim_breakdown_s"])


def test_significance_none_skips_the_fit(tiny_cfg):
    sim = Simulation(tiny_cfg.replace(strategy="fedhq", significance="none"))
    assert not sim.needs_significance()
    sim.profile()
    alloc = sim.allocator.allocate(0, [0, 1, 2], sim)
    assert alloc.info["scatter"]["a_hat"] == [0.5, 0.5, 0.5]  # no information either way


def test_label_histograms_are_paid_for_once_by_whoever_reads_them(tiny_cfg):
    """A family's SigAcc reads every client's label histogram: the clients send them once, before
    the first allocation, and the clock charges the slowest uplink plus the server's host work
    (round 0 ends that much later). A pure strategy reads none and pays nothing, nor does fedhq
    deciding online. A resumed run does not pay again. With ``share_label_histograms: false``
    nothing is sent: the shard features come from the sample counts the uploads carried, the
    composition taken as the pool's."""
    from fedhq_core.loop import run
    from fedhq_core.simulation import Simulation

    # the shipped digits family covers it; fedhq-coarse takes it (fedhq does not: its R² < 0.5)
    cfg = tiny_cfg.replace(strategy="fedhq-coarse", clients=10, rounds=2, batch_size=16)
    sim = Simulation(cfg)
    run(cfg, sim=sim)
    s = sim.summary()
    hist_s, nbytes = sim.pricing.label_histograms_s(sim.num_classes)
    assert s["label_hist_sim_s"] == pytest.approx(hist_s) and hist_s > 0
    assert s["label_hist_bytes"] == nbytes == 10 * (4 * 10 + 64)
    r0 = s["rounds"][0]
    assert r0["sim_time_s"] == pytest.approx(hist_s + r0["sim_round_s"])
    again = Simulation(cfg)
    again.load_state_dict(*sim.state_dict())
    now = again.pricing.clock.now_s
    again.shard_features()
    assert again.pricing.clock.now_s == now and again.label_hist_s == pytest.approx(hist_s)

    for name in ("all-ptq", "fedhq"):
        pure = Simulation(cfg.replace(strategy=name))
        run(pure.cfg, sim=pure)
        assert pure.summary()["label_hist_sim_s"] == 0 and pure.label_hist_bytes == 0

    private = Simulation(cfg.replace(share_label_histograms=False))
    run(private.cfg, sim=private)
    p = private.summary()
    assert p["label_hist_sim_s"] == 0 and p["label_hist_bytes"] == 0
    feats = private.shard_features()
    seen = private.seen_samples
    assert seen and all(feats[c][0] == pytest.approx(np.log(n)) for c, n in seen.items())
    assert all(f[1] == pytest.approx(np.log(10)) and f[2] == 0 and f[3] == 10 for f in feats.values())


class _PartialView(_View):
    """_View with partial work priced: client c's shard is 100 samples in 10 batches; a QAT
    round's fixed part costs 1 s and each batch (1 + c) / 5 s, so a full QAT round is 2 (1 + c)
    + 1 s, and a budget buys the whole batches that fit after the fixed part."""

    def predicted_times(self, cids):
        t = np.array([1.0 + c for c in cids])
        return {"ptq": t, "qat": t * 2.0 + 1.0}

    def qat_samples_within(self, cids, budgets):
        return np.array([min(100, max(0, int((b - 1.0) // ((1 + c) / 5.0))) * 10) for c, b in zip(cids, budgets)])


@pytest.mark.parametrize("partial, mode", [(True, "qat"), (False, "qat"), (True, "ptq")])
def test_committed_qat_gives_slow_clients_the_qat_samples_that_fit(partial, mode):
    """Once committed to QAT, a client whose full QAT round misses the deadline (the slowest PTQ
    client's 10 s) trains QAT on the whole batches that fit it, not FP32; a client that fits no
    batch stays PTQ. Off (``partial_qat: false``) or committed to PTQ, nothing changes."""
    alloc, view, cids = FedHQAllocator(0.5, None, seed=3, partial_qat=partial), _PartialView(), list(range(10))
    alloc.decision = {"mode": mode, "round": 0}
    a = alloc.allocate(12, cids, view)
    full = {c for c in cids if 2.0 * (1 + c) + 1.0 <= 10.0}            # clients 0-3
    qat = {c for c, s in a.strategies.items() if s == "qat"}
    if not (partial and mode == "qat"):
        assert qat == (full if mode == "qat" else set()) and a.max_samples == {}
        return
    # client c fits floor(9 / ((1 + c) / 5)) batches: 4 -> 9, 5 -> 7, ..., 9 -> 4 (all of 10 for none)
    assert a.max_samples == {c: 10 * int(9.0 // ((1 + c) / 5.0)) for c in range(4, 10)}
    assert qat == set(cids) and a.info["n_partial_qat"] == 6 and a.info["qat_share"] == 1.0
    assert all(0 < m < 100 for m in a.max_samples.values())


def test_partial_work_is_priced_and_trained_as_allocated(tiny_cfg):
    """The pricing's partial work fits its budget (the whole shard at the full QAT round's time,
    fewer whole batches at the PTQ round's), and a client given ``max_samples`` trains and
    declares exactly those: its steps are what the clock prices, its sample count what FedAvg
    and the norm bound read."""
    from fedhq_core.client import Mode, train_client
    from fedhq_core.hardware import predict_compute

    sim = Simulation(tiny_cfg.replace(strategy="fedhq", significance="online"))
    sim.profile()
    cids = list(range(sim.cfg.clients))
    t = sim.predicted_times(cids)
    sizes, b = sim.pricing.sizes, sim.cfg.batch_size
    whole = sim.qat_samples_within(cids, t["qat"] + 1e-9)
    assert all((n // b) * b <= m <= n for m, n in zip(whole, sizes))
    part = sim.qat_samples_within(cids, t["ptq"])
    assert any(0 < m < n for m, n in zip(part, sizes))      # QAT costs more: the PTQ deadline buys part of a shard
    for c, m in zip(cids, part):
        assert m % b == 0 and m <= whole[c]
        if m == 0:          # not one batch fits (the fixed part, here the steps' search, may not)
            continue
        dev = sim.pricing.fleet.devices[c]
        work = {k: v for k, v in sim.pricing.expected_work(c, Mode.QAT).items() if k != "qat"}
        work["qat"] = [b] * (m // b) * sim.cfg.local_epochs
        upload = sim.pricing.upload_bytes * 8.0 / dev.uplink_bps
        assert predict_compute(sim.pricing.speed, dev, work) + upload <= t["ptq"][c] + 1e-9
    c = int(np.argmax(sizes))
    shard = sim.shards[c]
    spec = sim.dispatch.client_spec(0, c, Mode.QAT, max_samples=64)
    model = sim.model_spec.build(torch.device("cpu"))
    r = train_client(model, c, shard.x, shard.y, sim.server.global_state, None, spec)
    assert r.n_samples == 64 and r.payload.n_samples == 64 and len(r.work["qat"]) == 2 * sim.cfg.local_epochs


def test_a_qat_committed_run_trains_every_client_qat_within_the_ptq_deadline(tiny_cfg):
    """A real run committed to QAT from its first round (3 rounds: no warm-up): the clients whose full QAT round
    misses the deadline train QAT on part of their shard, and no round is predicted longer than
    the same allocation without partial work (its deadline is the slowest PTQ client's, which
    partial work fits)."""
    from fedhq_core.loop import run

    cfg = tiny_cfg.replace(strategy="fedhq", significance="online", rounds=3, clients=6, fraction=1.0)
    sims = {}
    for partial in (True, False):
        sim = Simulation(cfg.replace(partial_qat=partial))
        sim.allocator.prior = {"mode": "qat", "source": "test"}
        run(sim.cfg, sim=sim)
        sims[partial] = sim
    on, off = sims[True].records, sims[False].records
    assert all(r.extra["committed_qat"] == 1 for r in on)
    assert sum(r.extra["n_partial_qat"] for r in on) >= 1
    assert all(r.n_qat + r.n_ptq == 6 for r in on) and sum(r.n_qat for r in on) > sum(r.n_qat for r in off)
    assert all(r.extra["n_partial_qat"] == 0 for r in off)
    # the same predicted deadline; charged, within the hidden jitter's reach of it (measured: 0.4%)
    assert all(a.extra["pred_round_s"] == pytest.approx(b.extra["pred_round_s"]) for a, b in zip(on, off))
    assert all(a.sim_round_s <= 1.05 * b.sim_round_s for a, b in zip(on, off))


@pytest.mark.parametrize("paired", [True, False])
def test_exploring_rounds_pair_the_clients_with_slack(paired):
    """An exploring round: every client whose PTQ and QAT rounds together fit the deadline (the
    slowest PTQ client's 10 s; here clients 0-2, 3 (1 + c) <= 10) also trains the other mode,
    a shadow; its round time is predicted as both. Off, or once committed, there are none."""
    alloc, view, cids = FedHQAllocator(0.5, None, seed=3, paired_explore=paired), _View(), list(range(10))
    a = alloc.allocate(5, cids, view)                      # round 5 of 20: exploring (rounds 4-7)
    assert a.info["exploring"] == 1
    if not paired:
        assert a.shadow == {} and a.info["n_paired"] == 0
        return
    assert set(a.shadow) == {0, 1, 2} and a.info["n_paired"] == 3
    assert all(a.shadow[c] != a.strategies[c] for c in a.shadow)
    assert alloc._last_pred[1] == pytest.approx((2.0 + 4.0, 2.0 + 4.0))
    alloc.decision = {"mode": "qat", "round": 8}
    assert alloc.allocate(9, cids, view).shadow == {}


def test_a_shadow_is_trained_from_the_same_start_charged_and_compared_paired(tiny_cfg):
    """Two clients train both ways: each upload carries its shadow (the other mode, the same
    samples), the clock charges both trainings and both uploads, and the server's comparison is
    between those two clients' QAT and PTQ uploads. A shadow that is not the mode asked for is
    dropped."""
    from fedhq_core.allocation import Allocation
    from fedhq_core.server import partial_gain
    from fedhq_core.worker import run_jobs

    sim = Simulation(tiny_cfg.replace(strategy="fedhq", significance="online", clients=6, fraction=1.0))
    sim.profile()
    cids = list(range(6))
    alloc = Allocation({c: "qat" if c < 3 else "ptq" for c in cids}, shadow={0: "ptq", 4: "qat"})
    jobs = sim.dispatch.jobs(0, alloc, cids)
    uploads = run_jobs(sim.dispatch.round_inputs(), jobs)
    assert [u.shadow is not None for u in uploads] == [c in (0, 4) for c in cids]
    results, rejected = sim.dispatch.accept(uploads)
    assert not rejected
    by = {r.cid: r for r in results}
    for c in (0, 4):
        s = by[c].extra["shadow"]
        assert s.strategy == alloc.shadow[c] and s.n_samples == by[c].n_samples
        assert by[c].upload_bytes == by[c].payload.nbytes + s.payload.nbytes
        assert set(by[c].device_work) == set(by[c].work) | {"shadow_" + k for k in s.work}
    alone = sim.pricing.clock.client_time(0, 4, by[4].work, by[4].payload.nbytes)
    charged = sim.pricing.client_times(0, [by[4]])[4]
    assert charged.total_s > alone.total_s and charged.upload_s > alone.upload_s
    # the shadow's work is priced as its step kinds and itemized apart: the same seconds as alone
    shadow = sim.pricing.clock.client_time(0, 4, by[4].extra["shadow"].work, 0)
    assert charged.by_kind["shadow_qat"] == pytest.approx(shadow.by_kind["qat"])
    assert charged.observed_s == pytest.approx(alone.observed_s + shadow.observed_s)
    assert "shadow" not in by[1].extra
    seen = []
    import fedhq_core.server as S

    orig = S.deployed_scores
    S.deployed_scores = lambda m, st, rg, res, x, y: seen.append([(r.cid, r.strategy) for r in res]) or orig(m, st, rg, res, x, y)
    try:
        gain, k = partial_gain(sim.server.eval_model, sim.server.global_state, sim.server.global_ranges, results,
                               sim.server.proxy.x, sim.server.proxy.y)
    finally:
        S.deployed_scores = orig
    assert k == 2 and gain is not None and set(gain) == {"accuracy", "accuracy_se", "tcp", "tcp_se"}
    # each statistic is QAT minus PTQ of the same two deployments on the same images
    (cq, tq), (cp, tp) = (S.deployed_scores(sim.server.eval_model, sim.server.global_state, sim.server.global_ranges,
                                            [u for c in (0, 4) for u in (by[c], by[c].extra["shadow"]) if u.strategy == m],
                                            sim.server.proxy.x, sim.server.proxy.y) for m in ("qat", "ptq"))
    assert gain["accuracy"] == pytest.approx(cq.mean() - cp.mean())
    dq = cq.astype(float) - cp.astype(float)          # its paired standard error over the same images
    assert gain["accuracy_se"] == pytest.approx(dq.std(ddof=1) / np.sqrt(len(dq)))
    assert gain["tcp"] == pytest.approx((tq - tp).mean()) and gain["tcp_se"] == pytest.approx((tq - tp).std(ddof=1) / np.sqrt(len(tq)))
    assert seen == [[(0, "qat"), (4, "qat")], [(0, "ptq"), (4, "ptq")]]
    # a shadow of another mode than the one asked for (here the primary's own) is not kept
    first = run_jobs(sim.dispatch.round_inputs(), sim.dispatch.jobs(0, alloc, cids)[:1])
    sim.dispatch.shadows[0] = "qat"
    (again,), _ = sim.dispatch.accept(first)
    assert again.cid == 0 and "shadow" not in again.extra


def test_ptq_then_qat_is_the_schedule_without_the_decision(tiny_cfg):
    """The ablation: the PTQ warm-up (20% of rounds), then QAT committed without exploring, no
    comparison measured or priced, no SigAcc obtained; once committed it allocates as a
    QAT-committed fedhq run (free QAT, partial work for the rest)."""
    from fedhq_core.loop import run

    cfg = tiny_cfg.replace(strategy="ptq-then-qat", clients=10, rounds=10, fraction=0.5)
    sim = Simulation(cfg)
    run(cfg, sim=sim)
    assert [r.n_qat for r in sim.records][:2] == [0, 0] and all(r.n_qat > 0 for r in sim.records[2:])
    assert all(not r.extra.get("exploring") and "partial_accuracy" not in r.extra for r in sim.records)
    assert sim.server.partials == [] and sim.fit.source == "none" and sim.summary()["fit_sim_s"] == 0
    assert sim.allocator.decision == {"mode": "qat", "forced": 1, "round": 2}
    assert all(r.extra["committed_qat"] == 1 for r in sim.records[2:])


def test_fork_races_two_lineages_commits_on_them_and_resumes_mid_fork(tiny_cfg, tmp_path):
    """``explore: fork``: after the PTQ warm-up the server keeps a second master that half the
    round's clients (drawn at random) train with QAT (the others train the first with PTQ),
    compares the two deployments on its proxy split every round (priced), commits to the lineage
    ahead at the bound and drops the other; a run killed mid-fork resumes to the uninterrupted
    run's figures."""
    from fedhq_core.allocation.fedhq import explore_window, fork_commit, fork_rounds
    from fedhq_core.checkpoint import Checkpoints
    from fedhq_core.loop import run

    cfg = tiny_cfg.replace(strategy="fedhq", significance="online", explore="fork", rounds=10, clients=6,
                           fraction=1.0, server_calib_size=64)
    start, _ = explore_window(10)
    seen: dict[int, tuple[bool, bool]] = {}
    ref = Simulation(cfg)

    def watch(rec):
        fork = ref.server.fork
        seen[rec.round] = (fork is not None,
                           fork is not None and any(not torch.equal(fork["global_state"][k], v)
                                                    for k, v in ref.server.global_state.items() if v.is_floating_point()))

    run(cfg, sim=ref, on_round=watch)
    recs = ref.records
    dec = ref.allocator.decision
    assert start == 2 and dec["round"] == start + fork_rounds(10) and "evidence" in dec
    assert all(seen[r][0] and seen[r][1] for r in range(start, dec["round"]))   # forked, and the masters differ
    assert ref.server.fork is None and not any(seen[r][0] for r in range(dec["round"], 10))
    measured = [r for r in recs if "lineage_accuracy" in r.extra]
    assert measured and all(r.extra["server_measure_s"] > 0 for r in measured)
    assert all(r.extra.get("n_paired", 0) == 0 for r in recs)                     # no shadows in a fork
    forked = recs[start:dec["round"]]            # half the clients, drawn at random, train the QAT lineage
    assert all(r.n_qat == 3 for r in forked)
    last = measured[-1].extra
    assert dec["mode"] == ("qat" if last["lineage_accuracy"] > 0 else "ptq")
    # the rule on known numbers: a full window beyond 1.96 standard errors commits early
    # the rule on known numbers, at the bound: the lineage ahead; evidence beyond 1.96 standard errors
    assert fork_commit({"accuracy": 0.05, "accuracy_se": 0.02, "rounds": 3}) == {
        "mode": "qat", "online_gain": 0.05, "online_se": 0.02, "online_n": 3, "evidence": 1}
    assert fork_commit({"accuracy": -0.05, "accuracy_se": 0.02, "rounds": 2})["evidence"] == 0   # window not full
    assert fork_commit({"accuracy": -0.01, "accuracy_se": 0.02, "rounds": 3})["mode"] == "ptq"
    assert fork_commit(None)["mode"] == "ptq"

    ck = Checkpoints(tmp_path / "runs" / "fork", keep=2)

    def crash(rec):
        if rec.round == start + 1:
            raise RuntimeError("killed mid-fork")
    with pytest.raises(RuntimeError):
        run(cfg, on_round=crash, checkpoints=ck)
    tensors, meta, _ = Checkpoints(ck.run_dir).load_latest(lambda w: None)
    sim = Simulation(cfg)
    sim.load_state_dict(tensors, meta)
    assert sim.server.fork is not None
    run(cfg, sim=sim)
    assert [r.acc_q for r in sim.records] == [r.acc_q for r in recs]
    assert [r.strategies for r in sim.records] == [r.strategies for r in recs]
    assert sim.allocator.decision == dec
