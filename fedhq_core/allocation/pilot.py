"""Offline fitting of SigAcc, once per family (dataset + model), and what a run pays for it.

A family is fitted over a grid of settings (seeds, partition, clients, fraction, bits, lr, local
epochs; :func:`draw_settings`), never for the run that uses it. Each setting runs a paired pilot
(:func:`pilot_rows`): every round, every sampled client trains from the same master twice, once
under PTQ and once under QAT. The client's label
is its own measured gain: the round's hybrid (a seeded half-and-half pick of the two uploads)
aggregated with its QAT upload against with its PTQ upload, deployed, scored on the proxy split
(``server.swap_gains``): a per-client counterfactual, not the round's gain split by data share.
The master then advances on that hybrid, so later rows see later states of a run.

The rows of every setting are pooled into one regressor (:class:`Family`); the family's grid
ranges decide which runs it covers (:meth:`Family.covers`); its leave-one-setting-out CV R² says
how far it transfers. Shipped as plain JSON (``families/<dataset>-<model>.json``: rows and
targets, the grid, the command that built it and its one-off cost), refitted deterministically
by a run in well under a second; that refit is the run's only SigAcc cost (:class:`FitInfo`).
Building a family drives whole simulations, so it sits above them (``fedhq_core.family_build``).
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .significance import (FEATURES, GAP_WINDOW, SETTING_FEATURES, SignificanceModel, feature_rows, label_quality,
                           setting_level_fit, setting_level_scores, setting_of, setting_row)

FAMILY_DIR = Path(__file__).parent / "families"


@dataclass
class FitInfo:
    """What obtaining a run's SigAcc model cost, and where it came from.

    ``source``: ``family`` (a family fitted offline over a grid, shipped or registered: the run
    pays for refitting its rows, ``sim_s``; the family's build is a one-off, ``build_sim_s``,
    reported with the runs that reuse it), ``online`` (no family covers the setting: the run
    decides from its own rounds) or ``none`` (no SigAcc model)."""

    source: str = "none"
    sim_s: float = 0.0        # simulated seconds charged to this run (the refit of the family's rows)
    wall_s: float = 0.0       # this host's seconds for obtaining it (charged too)
    detail: str = ""
    reused_by: int = 0        # registry: runs that have reused this version (this one included)
    build_sim_s: float = 0.0  # the family's one-off build, simulated (not charged to the run)
    build_wall_s: float = 0.0
    build_settings: int = 0

    @property
    def charged_sim_s(self) -> float:
        return self.sim_s

    @property
    def charged_wall_s(self) -> float:
        return self.wall_s

    def to_dict(self) -> dict[str, Any]:
        return {"fit_source": self.source, "fit_sim_s": self.sim_s, "fit_wall_s": self.wall_s,
                "fit_detail": self.detail, "fit_reused_by": self.reused_by,
                "fit_charged_sim_s": self.charged_sim_s, "fit_charged_wall_s": self.charged_wall_s,
                "family_build_sim_s": self.build_sim_s, "family_build_wall_s": self.build_wall_s,
                "family_settings": self.build_settings}


def pilot_length(cfg) -> int:
    """Rounds of a setting's pilot: ``pilot_rounds``, or 0 for the setting's whole run."""
    return min(cfg.rounds, cfg.pilot_rounds) if cfg.pilot_rounds else cfg.rounds


def train_here(sim, rnd: int, cid: int, strategy: str) -> Any:
    """Train one client here and now, from the server's current master."""
    from ..client import train_client
    from ..worker import borrow_model

    shard, srv = sim.shards[cid], sim.server
    with borrow_model(sim.model_spec, sim.device) as model:
        return train_client(model, cid, shard.x, shard.y, srv.global_state, srv.global_ranges,
                            sim.dispatch.client_spec(rnd, cid, strategy), srv.global_steps)


@dataclass
class Pilot:
    """One setting's paired pilot (:func:`pilot_rows`)."""

    X: np.ndarray             # per-client feature rows
    gains: np.ndarray         # per-client labels (points)
    ses: np.ndarray           # each label's paired standard error (points)
    groups: np.ndarray        # client ids
    points: np.ndarray        # pilot rounds
    sim_s: float
    round_gains: list[float] = field(default_factory=list)   # setting level: all-QAT - all-PTQ aggregate, per round
    round_ses: list[float] = field(default_factory=list)     # after the online warm-up, as a run would compare

    @property
    def setting_gain(self) -> tuple[float, float]:
        """The setting's label, "does QAT pay here, and by how much": the rounds' all-QAT minus
        all-PTQ gains pooled (mean), and its standard error from the rounds' paired errors."""
        g, se = np.asarray(self.round_gains, dtype=float), np.asarray(self.round_ses, dtype=float)
        if not len(g):
            return float("nan"), float("nan")
        return float(g.mean()), float(np.sqrt((se ** 2).sum()) / len(se))


def pilot_rows(sim, rounds: int, train_fn: Callable[[int, list[int], str], list] | None = None) -> Pilot:
    """One setting's paired pilot. Every sampled client trains under both strategies from the same
    master; the round's hybrid is a seeded half-and-half pick of the two. A client's label is its
    own counterfactual in that round: the hybrid's aggregate with its QAT upload against the same
    aggregate with its PTQ upload, each deployed and scored on the same proxy images, QAT minus
    PTQ true-class probability in points (``server.swap_gains``: paired, with its standard error).
    From the first round an online run would explore (after its PTQ warm-up), the setting-level
    label compares the round's all-QAT and all-PTQ aggregates the same way. Both trainings are
    priced on the setting's clock one after the other (two rounds on the same fleet), with the
    server's sensitivity measurements, gap, and the aggregates it scores. ``sim`` is consumed
    (its master advances)."""
    from ..server import deployed_soft, paired_points, swap_gains
    from .fedhq import explore_window

    train_fn = train_fn or (lambda r, cids, strategy: [train_here(sim, r, c, strategy) for c in cids])
    srv, pricing, cfg = sim.server, sim.pricing, sim.cfg
    shards, setting = sim.shard_features(), setting_of(cfg)
    rng = np.random.default_rng([cfg.seed, 71])
    start = explore_window(cfg.rounds)[0]
    sens: dict[int, float] = {}
    X, gains, ses, groups, points, sim_s = [], [], [], [], [], 0.0
    round_gains, round_ses = [], []
    for rnd in range(rounds):
        cids = sim.dispatch.sample(rnd)
        rows = feature_rows(shards, cids, rnd / cfg.rounds, sim.quant_gap, sens, setting)
        ptq, qat = train_fn(rnd, cids, "ptq"), train_fn(rnd, cids, "qat")
        picks = rng.random(len(cids)) < 0.5
        g, e = swap_gains(srv.eval_model, srv.global_state, srv.global_ranges, ptq, qat, picks, srv.proxy.x, srv.proxy.y)
        X.extend(rows); gains.extend(g); ses.extend(e); groups.extend(cids); points.extend([rnd] * len(cids))
        # the uploads' sensitivities, then the gap of the master this round started from
        server_s = srv.measure("sensitivity", ptq)
        server_s += srv.measure("gap")
        n, n_q = len(cids), int(picks.sum())
        # each of the 1 + n hybrids is aggregated, scored and, where it mixes both strategies, its
        # steps blended (server.blend_steps)
        qat_counts = [n_q] + [n_q - 1 if p else n_q + 1 for p in picks]
        server_s += (n + 1) * (pricing.server.aggregate_s(n - n_q, n_q, cfg.upload_bits) + pricing.server.proxy_s())
        server_s += sum(0 < q < n for q in qat_counts) * pricing.server.mse_s()
        if rnd >= start:     # the setting-level comparison: both pure aggregates, scored
            rg, rse = paired_points(*(deployed_soft(srv.eval_model, srv.global_state, srv.global_ranges, side,
                                                   srv.proxy.x, srv.proxy.y) for side in (qat, ptq)))
            round_gains.append(rg)
            round_ses.append(rse)
            server_s += pricing.server.partial_s(n, n, cfg.upload_bits)
        for i, res in enumerate((ptq, qat)):   # the server's scoring waits for the second set
            times = list(pricing.client_times(rnd, res).values())
            sim_s += pricing.clock.round_length(times, {"server": pricing.aggregation_s(res) + (server_s if i else 0.0)},
                                                0.0)[0]
        if srv.aggregate_results([q if pick else p for p, q, pick in zip(ptq, qat, picks)]) and n_q == n:
            sim_s += pricing.server.mse_s()     # the steps bound's search, on no blend's bill
        sens = {r.cid: float(r.quant_loss) for r in ptq}       # seen by the next round
    return Pilot(np.asarray(X), np.asarray(gains), np.asarray(ses), np.asarray(groups), np.asarray(points), sim_s,
                 round_gains, round_ses)


# ---- the family: settings drawn from a grid ------------------------------------------------
GRID_FIELDS = ("seed", "partition", "alpha", "classes_per_client", "clients", "fraction", "w_bits", "a_bits",
               "first_last_bits", "lr", "local_epochs", "batch_size")
# a run is covered when each of these lies within the family's range of it (partition: one of its
# values); seeds are not: a new seed is the point of transfer
COVERED_FIELDS = tuple(f for f in GRID_FIELDS if f != "seed") + ("upload_bits",)


def parse_grid(text: str) -> dict[str, list[Any]]:
    """``"seed=0,1;alpha=0.3,1.0"`` -> ``{"seed": [0, 1], "alpha": [0.3, 1.0]}`` (typed like the config)."""
    from ..config import ExperimentConfig
    from ..errors import ConfigError

    types = {f: type(getattr(ExperimentConfig(), f)) for f in GRID_FIELDS}
    grid: dict[str, list[Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, values = part.partition("=")
        key = key.strip()
        if key not in types or not values.strip():
            raise ConfigError(f"grid: {part!r} is not FIELD=V1,V2 with FIELD one of {', '.join(GRID_FIELDS)}")
        try:
            grid[key] = [types[key](v.strip()) for v in values.split(",") if v.strip()]
        except ValueError as err:
            raise ConfigError(f"grid: {key}: {err}") from None
    return grid


def draw_settings(base, grid: dict[str, list[Any]], n: int, seed: int = 0) -> list:
    """``n`` distinct settings of ``base`` (a config) drawn from the grid's product, seeded; the
    whole product when it has at most ``n``."""
    keys = sorted(grid)
    product = list(itertools.product(*(grid[k] for k in keys)))
    rng = np.random.default_rng([seed, 29])
    picks = product if len(product) <= n else [product[i] for i in sorted(rng.choice(len(product), n, replace=False))]
    return [base.replace(**dict(zip(keys, p))) for p in picks]


@dataclass
class Family:
    """A family's fit data (plain arrays), its grid and what building it cost."""

    dataset: str
    model: str
    settings: list[dict[str, Any]]             # each setting's covered fields and seed
    X: list[list[float]]
    gains: list[float]
    groups: list[int]                          # client ids, unique across settings
    points: list[int]                          # pilot round
    setting_ids: list[int]
    r2: dict[str, float] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)   # sim_s / wall_s per setting and in all, command
    features: str = ",".join(FEATURES)
    seed: int = 0
    ses: list[float] = field(default_factory=list)            # each row label's paired standard error
    setting_gains: list[float] = field(default_factory=list)  # per setting: all-QAT - all-PTQ, pooled over rounds
    setting_ses: list[float] = field(default_factory=list)

    def setting_rows(self) -> np.ndarray:
        return np.stack([setting_row(s) for s in self.settings])

    def setting_data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, labels and standard errors of the settings that have a setting-level label (none
        for a family built without them; a pilot that ends before the online warm-up has none)."""
        g, se = np.asarray(self.setting_gains, dtype=float), np.asarray(self.setting_ses, dtype=float)
        if len(g) != len(self.settings):
            return np.zeros((0, len(SETTING_FEATURES))), g[:0], se[:0]
        keep = np.isfinite(g)
        return self.setting_rows()[keep], g[keep], se[keep]

    def setting_scores(self) -> dict[str, float]:
        """The setting-level model's leave-one-setting-out scores (``significance.setting_level_scores``)."""
        return setting_level_scores(*self.setting_data())

    def setting_r2(self) -> float:
        """Leave-one-setting-out R² of the setting-level question (NaN for a family built without
        setting-level labels)."""
        return float(self.r2.get("setting_level", float("nan")))

    def model_level(self, significance: str, floor: float) -> str | None:
        """Which of this family's models a run reads: ``client`` where the per-client model's
        leave-one-setting-out R² reaches ``floor``; ``setting`` where only the setting-level one
        does and the run asks for it (``significance: setting``); None where neither."""
        if float(self.r2.get("cv_settings", float("nan"))) >= floor:
            return "client"
        return "setting" if significance == "setting" and self.setting_r2() >= floor else None

    def label_quality(self) -> dict[str, dict[str, float]]:
        """Per-client and setting-level labels: median standard error against spread."""
        return {"client": label_quality(np.asarray(self.gains), np.asarray(self.ses)),
                "setting": label_quality(np.asarray(self.setting_gains), np.asarray(self.setting_ses))}

    def setting_prediction(self, cfg) -> float:
        """The setting-level model's predicted gain (points) of all-QAT over all-PTQ for ``cfg``."""
        rows, gains, _ = self.setting_data()
        fields = {f: getattr(cfg, f) for f in COVERED_FIELDS}
        return float(setting_level_fit(rows, gains).predict(setting_row(fields)[None, :])[0])

    def ranges(self) -> dict[str, Any]:
        """Each covered field's range over the settings ([min, max], or the values of a categorical)."""
        out: dict[str, Any] = {}
        for f in COVERED_FIELDS:
            vals = [s[f] for s in self.settings]
            out[f] = sorted(set(vals)) if isinstance(vals[0], str) else [min(vals), max(vals)]
        return out

    def covers(self, cfg) -> tuple[bool, str]:
        """Whether a run of ``cfg`` lies within this family, and why (the first field outside)."""
        if (cfg.dataset, cfg.model) != (self.dataset, self.model):
            return False, f"the family is {self.dataset}/{self.model}, the run {cfg.dataset}/{cfg.model}"
        if self.features != ",".join(FEATURES):
            return False, "the family was built with other features"
        for f, r in self.ranges().items():
            v = getattr(cfg, f)
            if isinstance(r[0], str):
                if v not in r:
                    return False, f"{f}={v} is not among the family's {r}"
            elif f == "alpha" and cfg.partition != "dirichlet" or f == "classes_per_client" and cfg.partition != "kclass":
                continue                     # that partition's parameter does not apply to the run
            elif not r[0] <= v <= r[1]:
                return False, f"{f}={v} lies outside the family's range {r[0]}..{r[1]}"
        return True, "every covered field lies within the family's grid"

    def field_status(self, cfg) -> dict[str, str]:
        """Per covered field of ``cfg``: ``grid value`` (a value some setting of the family was
        built at), ``in range`` (between them, never built), ``outside`` or ``n/a`` (a partition
        parameter the run does not use)."""
        out = {}
        for f, r in self.ranges().items():
            v = getattr(cfg, f)
            if f == "alpha" and cfg.partition != "dirichlet" or f == "classes_per_client" and cfg.partition != "kclass":
                out[f] = "n/a"
            elif v in {s[f] for s in self.settings}:
                out[f] = "grid value"
            else:
                out[f] = "outside" if isinstance(r[0], str) or not r[0] <= v <= r[1] else "in range"
        return out

    def model_for_run(self) -> SignificanceModel:
        """The family's regressor refitted on its rows (deterministic; no CV: its figures are
        the build's)."""
        m = SignificanceModel.fit(np.asarray(self.X), np.asarray(self.gains), self.seed, self.tags(), cv=False)
        m.cv_r2, m.cv_r2_rounds, m.cv_r2_settings = (self.r2.get(k, float("nan")) for k in ("cv", "cv_rounds",
                                                                                             "cv_settings"))
        return m

    def tags(self) -> dict[str, Any]:
        return {"family": f"{self.dataset}/{self.model}", "n_settings": len(self.settings), "n_samples": len(self.gains),
                "mean_gain": round(float(np.mean(self.gains)), 4), "features": self.features,
                "gap_window": GAP_WINDOW, "grid": json.dumps(self.ranges()),
                **{f"r2_{k}": round(v, 4) for k, v in self.r2.items()},
                **{f"label_{lvl}_{k}": round(v, 4) for lvl, q in self.label_quality().items()
                   for k, v in q.items() if k != "n"},
                "build_sim_s": round(float(self.build.get("sim_s", 0.0)), 3),
                "build_wall_s": round(float(self.build.get("wall_s", 0.0)), 1)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Family":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=None, separators=(",", ":")) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Family":
        return cls.from_dict(json.loads(Path(path).read_text()))


def family_path(dataset: str, model: str) -> Path:
    return FAMILY_DIR / f"{dataset}-{model}.json".replace(":", "-").replace("/", "-")


def shipped_family(dataset: str, model: str) -> Family | None:
    path = family_path(dataset, model)
    return Family.load(path) if path.is_file() else None


def family_for_run(sim, family: Family, source_detail: str) -> SignificanceModel:
    """The family's model for ``sim``'s run: its rows refitted (priced as counted server work and
    charged; the build is a one-off, reported beside it)."""
    from ..hardware.host_work import HostWork
    from ..hardware.server_work import gbr_fit_elements

    refit = HostWork()
    with refit.op("gbr_fit", 1, gbr_fit_elements(len(family.gains), len(FEATURES))):
        model = family.model_for_run()
    sim.setup_work = refit
    model.fit_info = FitInfo("family", refit.priced_s(), refit.measured_s, source_detail, 0,
                             float(family.build.get("sim_s", 0.0)), float(family.build.get("wall_s", 0.0)),
                             len(family.settings))
    return model


def find_family(cfg, registered: tuple[Family | None, str] | None = None) -> tuple[Family | None, str]:
    """The family covering ``cfg``: ``registered`` (the registry's newest covering version, and
    why, when a registry was searched), else the shipped one (``cfg.family_file`` replaces it);
    with why it covers the run, or why none does."""
    reasons = []
    if registered is not None:
        if registered[0] is not None:
            return registered
        reasons.append(registered[1])
    if cfg.family_file:
        family, source = Family.load(cfg.family_file), cfg.family_file
    else:
        family, source = shipped_family(cfg.dataset, cfg.model), f"the shipped {cfg.dataset}/{cfg.model} family"
    if family is None:
        reasons.append(f"no family ships for {cfg.dataset}/{cfg.model}")
        return None, "; ".join(reasons)
    ok, why = family.covers(cfg)
    if ok:
        return family, f"{source} ({len(family.settings)} settings): {why}"
    reasons.append(f"{source}: {why}")
    return None, "; ".join(reasons)


def choose_significance(sim, registered: tuple[Family | None, str] | None = None) -> SignificanceModel | None:
    """The run's SigAcc model, never a pilot: the covering family's (its refit charged), or None
    (``significance: online``, or no family covers the run: the allocator decides from the
    rounds). Either way ``sim.fit`` says where it came from and what it cost."""
    t0 = time.perf_counter()
    if sim.pricing.speed is None:
        sim.profile()
    if sim.cfg.significance == "online":
        family, why = None, "significance: online"
    else:
        family, why = find_family(sim.cfg, registered)
    floor = sim.capabilities.min_family_r2
    level = family.model_level(sim.cfg.significance, floor) if family is not None else None
    if family is not None and level != "client":
        if level == "setting" and hasattr(sim.allocator, "prior"):
            setting_level_decision(sim, family, why, t0)
            return None
        r2 = float(family.r2.get("cv_settings", float("nan")))
        family, why = None, (f"{why}; but its leave-one-setting-out R² is {r2:.2f} per client, below the "
                             f"{floor:.2f} {sim.allocator.name} requires, so it is not used (nor refitted; per "
                             f"setting {family.setting_r2():.2f}, read with significance: setting)")
    if family is None:
        sim.fit = FitInfo("online", 0.0, time.perf_counter() - t0,
                          f"no family ({why}): " + (
                              "the server races a QAT lineage against the PTQ lineage (explore: fork)"
                              if sim.cfg.explore == "fork" else
                              "the server compares the exploring rounds' QAT and PTQ partial aggregates"))
        return None
    model = family_for_run(sim, family, why)
    model.fit_info.wall_s = time.perf_counter() - t0
    sim.set_significance(model)
    return model


def setting_level_decision(sim, family: Family, why: str, t0: float) -> None:
    """``significance: setting``, where only the family's setting-level model predicts
    (leave-one-setting-out R² at the floor): its predicted all-QAT minus all-PTQ gain for the
    run's setting decides the run's mode once, after the PTQ warm-up, with no round spent
    exploring (``allocator.prior``). The ridge fit is priced as counted server work and charged,
    like a family refit. Not the default: its label is one round's comparison from a shared
    master, which on digits w2a4 favoured QAT by 12 points where all-PTQ runs end 20 higher."""
    from ..hardware.host_work import HostWork

    refit = HostWork()
    with refit.op("ridge_fit", 1, len(family.settings) * family.setting_rows().shape[1]):
        gain = family.setting_prediction(sim.cfg)
    sim.setup_work = refit
    r2 = family.setting_r2()
    sim.allocator.prior = {"mode": "qat" if gain > 0 else "ptq", "family_gain": gain, "family_r2": r2}
    sim.fit = FitInfo("family-setting", refit.priced_s(), time.perf_counter() - t0,
                      f"{why}; its setting-level model (leave-one-setting-out R² {r2:.2f}) predicts all-QAT "
                      f"{gain:+.2f} points over all-PTQ: the run commits to {sim.allocator.prior['mode']} after its "
                      "warm-up and explores no round", 0, float(family.build.get("sim_s", 0.0)),
                      float(family.build.get("wall_s", 0.0)), len(family.settings))
