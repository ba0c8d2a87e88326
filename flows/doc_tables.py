"""The docs' headline tables, rendered from the JSONs behind them.

Each table is a list of rows, and each row is rendered from one committed JSON. ``tests/test_docs.py``
requires every rendered row to stand verbatim in its document, so a figure that drifts from its
JSON (a number typed by hand, a JSON rerun without the docs) fails ``make test``::

    python -m flows.doc_tables            # print every table, to paste into the docs after a rerun

The transfer table adds what a mean hides: in how many seeds every part of the bar was met.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

# results.md's transfer table (the small-scale benches): (label, bench JSON)
TRANSFER = (
    ("`configs/digits.yaml` (w2a2, 30 rounds)", "transfer-digits.json"),
    ("`configs/digits-ptq-early.yaml` (w2a4, edges 8-bit)", "transfer-digits-ptq-early.json"),
    ("default digits (w4a8, 15 rounds)", "transfer-digits-default.json"),
    ("digits w3a3, α 0.7, 25 clients, lr 0.07", "transfer-digits-w3a3.json"),
    ("`configs/cifar10-cnn.yaml` (w2a8, 12 rounds)", "transfer-cifar10-cnn.json"),
)
TRANSFER_HEADER = ("| setting | seeds | tail: all-ptq, all-qat | fedhq tail (− better) | TTA / faster pure | "
                   "sim / all-ptq | QAT share | bar (means) | bar per seed |\n|---|---|---|---|---|---|---|---|---|")
BAR = {"acc_vs_best": -0.01, "tta_vs_best": 1.05, "sim_vs_all_ptq": 1.10}

# deploy.md's export figures: (label, export JSON)
EXPORTS = (
    ("digits, `make run` defaults, 15 rounds", "export-digits.json"),
    ("CIFAR-10 folder, cnn, 10 rounds", "export-cifar10-cnn.json"),
    ("same, `--a-bits 4` (Clip to 0..15)", "export-cifar10-cnn-w4a4.json"),
)
EXPORT_HEADER = ("| run | w/a (edge) | ONNX / FP32 | integer kernels / quantized layers | onnxruntime top-1 "
                 "(run's `final_acc_q`) | agreement with pyfunc | rule |\n|---|---|---|---|---|---|---|")
SPEED = (
    ("w4a8", "export-cifar10-cnn.json"),
    ("w4a8", "export-cifar10-cnn-1thread.json"),
    ("w4a4", "export-cifar10-cnn-w4a4.json"),
    ("digits w4a8", "export-digits.json"),
)
SPEED_HEADER = ("| setting | threads | batch 1: int / FP32 | batch 64: int / FP32 (images/s) | speed-up at 64 |\n"
                "|---|---|---|---|---|")

# results.md's label-histogram table: (label, transfer JSON with histograms, fedhq JSON without)
HISTOGRAMS = tuple((label, f, f.replace("transfer-", "hist-")) for label, f in TRANSFER)
HIST_HEADER = ("| setting | seeds | fedhq tail: with histograms, without | without − with, per seed | "
               "charged sim: with, without |\n|---|---|---|---|---|")

# results.md's paper comparison: the paper's figures beside the study's setting (the study JSON)
PAPER_SETTING = "a0.5-w2a8"
PAPER_HEADER = ("| | paper: ResNet-18, ξ 0.2, A6000 GPUs, CIFAR-10 | here: the study, " + PAPER_SETTING
                + " (small CNN, simulated fleet) |\n|---|---|---|")

# the README's study table: the current fedhq's studies; results.md's: the older builds' (STUDY_OLDER)
STUDY = (("build `191719d`", "study-cifar10-a0.5-191719d.json"), ("build `191719d`", "study-cifar10-a0.1-191719d.json"))
STUDY_OLDER = (("build `9f39465`", "study-cifar10-a0.5-9f39465.json"), ("build `68301b1`", "study-cifar10-a0.1-68301b1.json"),
               ("build `2dea7b9`", "study-cifar10.json"), ("build `dccd559`", "study-cifar10-a0.1.json"))
STUDY_HEADER = ("| setting | strategy | seeds | tail (test) | tail (validation) | TTA (sim s) | total (sim s) | "
                "QAT share | spread of last 10 (points) |\n|---|---|---|---|---|---|---|---|---|")

# operations.md's poisoning tables
# results.md's mixing table (``fedhq mixing``): (label of each difference, its key), from one JSON
MIXING = "mixing-cifar10-a0.5-w2a8.json"
MIXING_ROWS = (("all-QAT − all-PTQ aggregate", "qat_minus_ptq"),
               ("mixed − interpolation of the two (by QAT share)", "mixed_minus_interpolation"),
               ("mixed − the better pure aggregate", "mixed_minus_better_pure"),
               ("blended steps − MSE steps alone (same mixed master)", "blend_minus_mse_steps"),
               ("blended steps − learned steps alone", "blend_minus_learned_steps"))
POISONING = ("poisoning-digits.json", "poisoning-cifar10-4rounds.json")

# results.md's audit of fedhq's online commits: (label, build, study JSON)
COMMITS = (("CIFAR-10 a0.5-w2a8", "`191719d`", "study-cifar10-a0.5-191719d.json"),
           ("CIFAR-10 a0.1-w2a8", "`191719d`", "pool-cifar10-a0.1-s0-5-191719d.json"),
           ("CIFAR-10 a0.2-w3a3", "`191719d`", "study-cifar10-a0.2-w3a3-191719d.json"),
           ("`configs/digits.yaml`", "`fd666e5`", "evidence-digits-fd666e5.json"),
           ("`configs/digits-ptq-early.yaml`", "`fd666e5`", "evidence-digits-ptq-early-fd666e5.json"),
           ("CIFAR-10 a0.1-w2a8, `explore: fork`", "`1ece845`", "fork-cifar10-a0.1-s145-1ece845.json"),
           ("`configs/digits.yaml`, `explore: fork`", "`1ece845`", "fork-digits-1ece845.json"),
           ("`configs/digits-ptq-early.yaml`, `explore: fork`", "`1ece845`", "fork-digits-ptq-early-1ece845.json"))
LINEAGE_SHARES = (0.2, 0.4, 0.6)   # the shares of a run's rounds after which the pure lineages are compared
LINEAGE_HEADER = ("| setting | seed | all-QAT − all-PTQ on validation after 20%, 40%, 60% of the rounds (mean of "
                  "the last 10% of rounds before each; points) | end: validation tail, test tail (points) | fedhq's "
                  "comparisons (points) |\n|---|---|---|---|---|")
# results.md's forked-lineages table: (label, build of the fork, the mixed study JSON, the fork's study JSON)
FORKS = (("`configs/digits.yaml`", "`1ece845`", "evidence-digits-fd666e5.json", "fork-digits-1ece845.json"),
         ("`configs/digits-ptq-early.yaml`", "`1ece845`", "evidence-digits-ptq-early-fd666e5.json",
          "fork-digits-ptq-early-1ece845.json"),
         ("CIFAR-10 a0.1-w2a8", "`1ece845`", "pool-cifar10-a0.1-s0-5-191719d.json", "fork-cifar10-a0.1-s145-1ece845.json"))
FORK_HEADER = ("| setting | seed | all-ptq | all-qat | fedhq, mixed (commit) | fedhq, fork (commit: gain ± se, "
               "points) | fork − better pure | fork's time / all-ptq |\n|---|---|---|---|---|---|---|---|")
COMMIT_HEADER = ("| setting | build | commit per seed: QAT − PTQ comparisons, mean ± se (points) | right (the better "
                 "pure strategy on validation) | with evidence (95% interval excludes 0) |\n|---|---|---|---|---|")


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def seed_met(d: dict[str, float | None]) -> bool:
    """The bar, on one seed's figures."""
    tta = d.get("tta_vs_best")
    return (d["acc_vs_best"] >= BAR["acc_vs_best"] and tta is not None and tta <= BAR["tta_vs_best"]
            and d["sim_vs_all_ptq"] <= BAR["sim_vs_all_ptq"])


def transfer_row(label: str, d: dict[str, Any]) -> str:
    s, dom = d["strategies"], d["dominance"]
    ptq, qat, fedhq = (s[n]["tail_acc_q"] for n in ("all-ptq", "all-qat", "fedhq"))
    missed = [k for k, v in dom["met"].items() if not v]
    per = dom["per_seed"]
    met = [seed for seed in sorted(per, key=int) if seed_met(per[seed])]
    tta = "never" if dom["tta_vs_best"] is None else f"{dom['tta_vs_best']:.2f}×"
    return (f"| {label} | {', '.join(map(str, d['seeds']))} | {100 * ptq:.1f}%, {100 * qat:.1f}% | "
            f"{100 * fedhq:.1f}% ({100 * dom['acc_vs_best']:+.1f}) | {tta} | {dom['sim_vs_all_ptq']:.2f}× | "
            f"{s['fedhq']['qat_share']:.2f} | {'**met**' if not missed else 'missed: ' + ', '.join(missed)} | "
            f"{len(met)} of {len(per)} |")


def export_row(label: str, d: dict[str, Any]) -> str:
    m, c = d["metadata"], d["check"]
    ops = d["op_histogram"]
    kernels = ", ".join(f"{ops[k]} {k}" for k in ("QLinearConv", "QGemm") if ops.get(k))
    return (f"| {label} | {m['w_bits']}/{m['a_bits']} ({m['first_last_bits']}) | {d['onnx_bytes'] / 1e3:,.1f} / "
            f"{d['fp32_onnx_bytes'] / 1e3:,.1f} kB (**{d['size_ratio']:.3f}×**) | {d['integer_ops']} / "
            f"{d['quantized_layers']} ({kernels}) | {100 * c['onnxruntime_acc']:.2f}% "
            f"({100 * c['run_final_acc_q']:.2f}%) | {100 * c['agreement']:.2f}% ({c['n']:,} images) | {c['acc_rule']} |")


def speed_row(label: str, d: dict[str, Any]) -> str:
    ms, ips = d["latency_ms"], d["throughput_ips"]
    return (f"| {label} | {d['threads']} | {ms['int']['b1']:.3f} / {ms['fp32']['b1']:.3f} ms | "
            f"{ips['int']['b64']:,.0f} / {ips['fp32']['b64']:,.0f} | {d['speedup_b64']:.2f}× |")


def hist_row(label: str, with_: dict[str, Any], without: dict[str, Any]) -> str:
    """fedhq with and without the clients' label histograms, on the same seeds."""
    a, b = with_["per_seed"], without["per_seed"]
    seeds = sorted(b, key=int)
    diffs = ", ".join(f"{100 * (b[s]['fedhq']['tail_acc_q'] - a[s]['fedhq']['tail_acc_q']):+.1f}" for s in seeds)
    w, wo = with_["strategies"]["fedhq"], without["strategies"]["fedhq"]
    return (f"| {label} | {', '.join(seeds)} | {100 * w['tail_acc_q']:.1f}%, {100 * wo['tail_acc_q']:.1f}% | "
            f"{diffs} | {w['charged_total_sim_s']:.2f} s, {wo['charged_total_sim_s']:.2f} s |")


def paper_rows() -> list[str]:
    """The paper's headline figures beside the same figures of the study's setting: per seed,
    then the mean and the 95% t-interval over seeds (fedhq minus each pure strategy, paired)."""
    from fedhq_core.metrics import t_interval

    d = load(STUDY[0][1])
    s = next(e for e in d["settings"] if e["name"] == PAPER_SETTING)
    runs = {(r["strategy"], r["seed"]): r for r in s["runs"]}
    seeds = sorted({r["seed"] for r in s["runs"]})

    def stat(values: list[float], fmt: str, scale: float = 1.0, unit: str = "") -> str:
        m, ci = t_interval(values)
        each = ", ".join(format(scale * v, fmt) for v in values)
        return (f"{format(scale * m, fmt)}{unit} (seeds: {each}" + (f"; 95% interval {format(scale * ci[0], fmt)} to "
                                                                     f"{format(scale * ci[1], fmt)})" if ci else ")"))

    def per_seed(f) -> list[float]:
        return [f(runs[("fedhq", k)], runs[("all-ptq", k)]) for k in seeds]

    speed = [1 / r for r in s["paired"]["fedhq-vs-all-qat"]["tta_ratio_per_seed"] if r]
    return [
        PAPER_HEADER,
        "| hybrid's tail accuracy − all-PTQ's (points) | up to +11.15 | "
        + stat(s["paired"]["fedhq-vs-all-ptq"]["acc_per_seed"], "+.1f", 100) + " |",
        "| hybrid's tail accuracy − all-QAT's (points) | – | "
        + stat(s["paired"]["fedhq-vs-all-qat"]["acc_per_seed"], "+.1f", 100) + " |",
        "| hybrid's TTA speed-up over all-QAT | up to 2.47× | " + stat(speed, ".2f", unit="×") + " |",
        "| hybrid's time / all-PTQ's | – | "
        + stat(per_seed(lambda f, p: f["total_sim_s"] / p["total_sim_s"]), ".2f", unit="×") + " |",
        "| hybrid's deployed accuracy (tail) | 67.78% (221.0 min) | "
        + stat(per_seed(lambda f, p: f["tail_acc_q"]), ".1f", 100, "%") + ", in "
        + stat(per_seed(lambda f, p: f["total_sim_s"]), ".1f", unit=" simulated s") + " |",
    ]


def study_rows(label: str, d: dict[str, Any]) -> list[str]:
    """One row per setting and strategy of a study: means over its seeds (the seeds listed), the
    largest spread of the last evaluations among them; then the criteria's verdict per setting."""
    rows = []
    for s in d["settings"]:
        stab = s["criteria"]["stability_points"]
        for name in d["strategies"]:
            runs = [r for r in s["runs"] if r["strategy"] == name]
            mean = lambda k: sum(r[k] for r in runs) / len(runs)   # noqa: E731
            tta = [r["tta_sim_s"] for r in runs]
            spread = max(stab[name + "/seed" + str(r["seed"])] for r in runs)
            rows.append(f"| {label}: {s['name']} | {name} | {', '.join(str(r['seed']) for r in runs)} | "
                        f"{100 * mean('tail_acc_q'):.1f}% | {100 * mean('tail_acc_q_val'):.1f}% | "
                        + ("never" if None in tta else f"{sum(tta) / len(tta):.1f}") + f" | {mean('total_sim_s'):.1f} | "
                        f"{mean('qat_share'):.2f} | {spread:.2f} |")
        crit = s["criteria"]
        rows.append(f"Criteria, {s['name']}: " + ("met." if crit["met"] else "missed: " + "; ".join(crit["misses"]) + "."))
        for comp, e in s["paired"].items():
            ci = e.get("acc_ci95")
            rows.append(f"Paired, {s['name']}, {comp}: per seed "
                        + ", ".join(f"{100 * v:+.1f}" for v in e["acc_per_seed"]) + " points; "
                        + (f"95% interval {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f} ({e['verdict']})." if ci
                           else "no interval from one seed."))
    return rows


def mixing_rows(d: dict[str, Any]) -> list[str]:
    """The mixing table: each difference per seed, its mean and 95% interval over seeds (points)."""
    pts = lambda v: f"{100 * v:+.2f}".replace("-", "−")   # noqa: E731
    head = ("| difference (validation, points) | " + " | ".join(f"seed {s}" for s in d["seeds"])
            + " | mean | 95% interval | rounds below 0 |\n|---|" + "---|" * (len(d["seeds"]) + 3))
    rows = [head]
    for label, key in MIXING_ROWS:
        e = d["summary"][key]
        ci = "-" if e["ci95"] is None else f"[{pts(e['ci95'][0])}, {pts(e['ci95'][1])}]"
        rows.append(f"| {label} | " + " | ".join(pts(v) for v in e["per_seed"]) + f" | {pts(e['mean'])} | {ci} | "
                    f"{e['rounds_below_zero']} |")
    return rows


def families_line() -> str:
    """results.md's sentence on what the shipped families cost to build, from the benches that
    reused them."""
    parts = []
    for name, f in (("digits", "transfer-digits.json"), ("CIFAR-10", "transfer-cifar10-cnn.json")):
        e = load(f)["strategies"]["fedhq"]
        parts.append(f"{name} {e['family_settings']} settings, built once in {e['family_build_sim_s']:.1f} simulated s "
                     f"({e['family_build_wall_s']:.0f} s wall)")
    return "The families: " + "; ".join(parts) + "."


# results.md's families: the shipped JSONs, and the two rules on the digits benches (online, and
# significance: setting): (label, bench JSON suffix)
FAMILY_FILES = (("digits/cnn", "digits-cnn.json"), ("cifar10-folder/cnn", "cifar10-folder-cnn.json"))
FAMILY_HEADER = ("| family | settings | rows | build: simulated, wall | R² per client: in-sample, CV by client, by round, "
                 "leave one setting out | setting level: R² left out, signs right, regret | label SE / spread: "
                 "client, setting |\n|---|---|---|---|---|---|---|")
RULES = tuple((label, f.replace("transfer-", "")) for label, f in TRANSFER[:4])
RULES_HEADER = ("| setting | rule | fedhq − better pure, per seed (test) | fedhq tail, validation | TTA / faster pure | "
                "sim / all-ptq | QAT share | bar per seed |\n|---|---|---|---|---|---|---|---|")


def family_row(label: str, fam: dict[str, Any]) -> str:
    from fedhq_core.allocation.pilot import Family

    f = Family.from_dict(fam)
    r, b, q = f.r2, f.build, f.label_quality()
    return (f"| {label} | {len(f.settings)} | {len(f.gains)} | {b['sim_s']:.1f} s, {b['wall_s']:.0f} s | "
            f"{r['train']:.2f}, {r['cv']:.2f}, {r['cv_rounds']:.2f}, **{r['cv_settings']:.2f}** | "
            f"**{r['setting_level']:.2f}**, {100 * r['setting_level_sign']:.0f}%, {r['setting_level_regret']:.1f} points | "
            f"{q['client']['ratio']:.3f}, {q['setting']['ratio']:.3f} |")


def rule_row(label: str, rule: str, d: dict[str, Any]) -> str:
    per, dom = d["per_seed"], d["dominance"]
    seeds = sorted(per, key=int)
    diffs = ", ".join(f"{100 * dom['per_seed'][s]['acc_vs_best']:+.1f}" for s in seeds)
    val = ", ".join(f"{100 * per[s]['fedhq']['tail_acc_q_val']:.1f}" for s in seeds)
    met = sum(seed_met(dom["per_seed"][s]) for s in seeds)
    tta = "never" if dom["tta_vs_best"] is None else f"{dom['tta_vs_best']:.2f}×"
    return (f"| {label} | {rule} | {diffs} | {val} | {tta} | {dom['sim_vs_all_ptq']:.2f}× | "
            f"{d['strategies']['fedhq']['qat_share']:.2f} | {met} of {len(seeds)} |")


def family_rows() -> list[str]:
    fams = ROOT / "fedhq_core" / "allocation" / "families"
    rows = [FAMILY_HEADER] + [family_row(label, json.loads((fams / f).read_text())) for label, f in FAMILY_FILES]
    rows.append(RULES_HEADER)
    for label, f in RULES:
        rows += [rule_row(label, rule, load(f"rule-{key}-{f}")) for rule, key in
                 (("online (default)", "online"), ("`significance: setting`", "setting"))]
    return rows


def commit_row(label: str, build: str, d: dict[str, Any]) -> str:
    """One setting's commits: per seed the mode and what it rested on (``*``: wrong on validation)."""
    from fedhq_core.metrics import commit_audit
    from fedhq_core.strategies import METHOD, PURE

    a = commit_audit(_by_seed(d), METHOD, PURE)
    per = ", ".join(f"{k}: {r['commit'].upper()} {r['gain_pts']:+.1f} ± {r['se_pts']:.1f}" + ("" if r["right"] else "*")
                    for k, r in a["per_seed"].items())
    return f"| {label} | {build} | {per} | {a['right']}/{a['n']} | {a['with_evidence']}/{a['n']} |"


def lineage_rows(label: str, d: dict[str, Any]) -> list[str]:
    """What whole lineages show against fedhq's one-round comparisons: per seed, the all-QAT run's
    validation accuracy minus the all-PTQ run's (each trained alone, every round's clients), as a
    mean over the last 10% of rounds (at least one) before each of ``LINEAGE_SHARES`` of the rounds,
    beside the end and fedhq's comparisons."""
    rows = []
    for seed, runs in sorted(_by_seed(d).items()):
        q, p = ([pt[1] for pt in runs[n]["curve_val"]] for n in ("all-qat", "all-ptq"))
        w = max(1, round(0.1 * len(q)))
        at = [100 * (sum(q[r - w:r]) - sum(p[r - w:r])) / w for r in (round(f * len(q)) for f in LINEAGE_SHARES)]
        end = [100 * (runs["all-qat"][k] - runs["all-ptq"][k]) for k in ("tail_acc_q_val", "tail_acc_q")]
        dec = runs["fedhq"].get("decision", {})
        rows.append(f"| {label} | {seed} | " + ", ".join(f"{v:+.1f}" for v in at) + f" | {end[0]:+.1f}, {end[1]:+.1f} | "
                    + (f"{100 * dec['online_gain']:+.1f} ± {100 * dec['online_se']:.1f}" if dec else "–") + " |")
    return rows


def _by_seed(d: dict[str, Any]) -> dict[int, dict[str, dict[str, Any]]]:
    (s,) = d["settings"]
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for r in s["runs"]:
        out.setdefault(r["seed"], {})[r["strategy"]] = r
    return out


def fork_rows(label: str, mixed: dict[str, Any], fork: dict[str, Any]) -> list[str]:
    """Per seed: the pure strategies and fedhq mixed (from ``mixed``), and fedhq with ``explore:
    fork`` (from ``fork``, its baselines the same runs' where it has them); test tails, %."""
    base, new = _by_seed(mixed), _by_seed(fork)
    rows = []
    for seed in sorted(new):
        b, f = base[seed], new[seed]["fedhq"]
        ptq, qat = b["all-ptq"], b["all-qat"]
        mode = lambda r: "QAT" if r["decision"]["committed_qat"] else "PTQ"   # noqa: E731
        d = f["decision"]
        rows.append(f"| {label} | {seed} | {100 * ptq['tail_acc_q']:.1f} | {100 * qat['tail_acc_q']:.1f} | "
                    f"{100 * b['fedhq']['tail_acc_q']:.1f} ({mode(b['fedhq'])}) | {100 * f['tail_acc_q']:.1f} "
                    f"({mode(f)}: {100 * d['online_gain']:+.1f} ± {100 * d['online_se']:.1f}"
                    + ("" if d.get("evidence") else ", at the bound") + ") | "
                    f"{100 * (f['tail_acc_q'] - max(ptq['tail_acc_q'], qat['tail_acc_q'])):+.1f} | "
                    f"{f['total_sim_s'] / ptq['total_sim_s']:.2f}× |")
    return rows


def tables() -> dict[str, list[str]]:
    """Every headline table's lines, by the document they stand in."""
    from flows.poisoning import table as poisoning_table

    transfer = [TRANSFER_HEADER] + [transfer_row(label, load(f)) for label, f in TRANSFER]
    study, older = ([STUDY_HEADER] + [row for label, f in table for row in study_rows(label, load(f))]
                    for table in (STUDY, STUDY_OLDER))
    return {
        "README.md": study,
        "docs/results.md": (older + transfer + [families_line()] + [HIST_HEADER] + [hist_row(label, load(f), load(g)) for label, f, g in HISTOGRAMS]
                            + paper_rows() + mixing_rows(load(MIXING)) + family_rows()
                            + [FORK_HEADER] + [row for label, _, m, f in FORKS for row in fork_rows(label, load(m), load(f))]
                            + [COMMIT_HEADER] + [commit_row(label, b, load(f)) for label, b, f in COMMITS]
                            + [LINEAGE_HEADER] + [row for label, _, f in COMMITS[:5] for row in lineage_rows(label, load(f))]),
        "docs/deploy.md": ([EXPORT_HEADER] + [export_row(label, load(f)) for label, f in EXPORTS]
                           + [SPEED_HEADER] + [speed_row(label, load(f)) for label, f in SPEED]),
        "docs/operations.md": [line for f in POISONING for line in poisoning_table(load(f)["rows"])],
    }


def main() -> int:
    for doc, lines in tables().items():
        print(f"<!-- {doc} -->")
        print("\n".join(lines), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
