"""fedhq of a newer build against the baselines of a study run at an older build.

A change to fedhq's own code changes the study's code digest, so a study at the new build runs
every strategy again (hours a setting here). Where the change leaves the baselines' code path
as it was, their runs at the old build are the runs the new build would make:
``python -m flows.check_behaviour --ref OLD`` checks that on seeded digits runs of every
strategy. This command then pairs the new build's fedhq runs with the old build's baselines,
per setting and seed, and reports them as a study does (paired differences, intervals, the
bar)::

    python -m flows.compare_builds --method NEW.json --baselines OLD.json [--json OUT]

``NEW.json``: a study of fedhq alone (``fedhq study --strategies fedhq``); ``OLD.json``: a study
with the baselines. Only those whose runs do not depend on fedhq's are taken (all-ptq, all-qat,
fp32: random-hybrid takes fedhq's QAT share). ``--take NAMES`` takes other strategies from
``NEW.json`` instead (e.g. a new baseline, ``--take ptq-then-qat``, against the old build's
fedhq and pure strategies). Each setting's configs must be equal but for the strategy and keys the old
build did not have (listed in the output); the seeds must match. Bad input: one line, exit 2.

``--pool A.json B.json ...`` instead pools the seeds of studies of the same settings run at
builds whose behaviour is the same (checked with ``check_behaviour``): every strategy of each
seed from one study, the seeds disjoint, the intervals over all of them; which build and CPU
ran each seed is listed::

    python -m flows.compare_builds --pool A.json B.json [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedhq_core.errors import ConfigError
from fedhq_core.records import write_json
from fedhq_core.strategies import METHOD


def _read(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read a study JSON ({type(err).__name__})") from None


def _check_configs(s: dict[str, Any], o: dict[str, Any]) -> set[str]:
    """Setting ``s``'s config against ``o``'s (an older build's): equal but for the strategy and
    keys ``o`` lacks, which are returned. Raises ConfigError naming the first key that differs."""
    differ = sorted(k for k in set(s["config"]) & set(o["config"]) if k != "strategy" and s["config"][k] != o["config"][k])
    if differ or set(o["config"]) - set(s["config"]):
        raise ConfigError(f"setting {s['name']!r}: configs differ in {(differ or sorted(set(o['config']) - set(s['config'])))[0]!r}")
    return set(s["config"]) - set(o["config"])


def _build(study: dict[str, Any]) -> str:
    """A study's code digest; a pooled study's, its builds joined (``pool``)."""
    return study.get("code_digest") or ", ".join(dict.fromkeys(study.get("pool", {}).get("builds", []))) or "not recorded"


def _cpus(runs: list[dict[str, Any]]) -> list[str]:
    return sorted({str(r.get("cpu", "not recorded")) for r in runs})


def pool(studies: list[dict[str, Any]]) -> dict[str, Any]:
    """The seeds of several studies of the same settings pooled, per setting: each seed's runs
    (every strategy) from the one study that ran it, summarized as one study over all the seeds.
    Raises ConfigError where they do not pool (configs, strategies or a seed in two studies)."""
    from fedhq_core.config import from_mapping
    from flows.study import summarize_setting

    if len(studies) < 2:
        raise ConfigError("--pool: give two or more study JSONs")
    first = studies[0]
    settings: list[dict[str, Any]] = []
    strategies: list[str] = []
    for s in first.get("settings", []):
        parts = [next((o for o in st.get("settings", []) if o["name"] == s["name"]), None) for st in studies]
        if any(p is None for p in parts):
            raise ConfigError(f"setting {s['name']!r}: not in every study")
        for p in parts[1:]:
            if _check_configs(s, p):     # equal, key for key (it raises where a value differs or p has more)
                raise ConfigError(f"setting {s['name']!r}: configs differ in {sorted(set(s['config']) - set(p['config']))[0]!r}")
        strategies = [n for n in first["strategies"] if all(any(r["strategy"] == n for r in p["runs"]) for p in parts)]
        by_seed: dict[int, dict[str, dict[str, Any]]] = {}
        builds: dict[str, list[int]] = {}
        for st, p in zip(studies, parts):
            for seed in sorted({r["seed"] for r in p["runs"]}):
                if seed in by_seed:
                    raise ConfigError(f"setting {s['name']!r}: seed {seed} is in two studies")
                by_seed[seed] = {r["strategy"]: dict(r) for r in p["runs"] if r["seed"] == seed and r["strategy"] in strategies}
                builds.setdefault(_build(st), []).append(seed)
        missing = [(k, n) for k, runs in by_seed.items() for n in strategies if n not in runs]
        if missing:
            raise ConfigError(f"setting {s['name']!r}: seed {missing[0][0]} has no {missing[0][1]} run")
        entry = summarize_setting(s["name"], from_mapping(s["config"]), by_seed, strategies, first["protocol"]["criteria"])
        entry["builds"] = builds
        entry["cpus"] = {str(k): _cpus(list(v.values())) for k, v in sorted(by_seed.items())}
        settings.append(entry)
    seeds = sorted({k for s in settings for k in (int(x) for x in s["cpus"])})
    return _study(first, settings, strategies, seeds,
                  pool={"builds": [_build(st) for st in studies],
                        "cpus": sorted({c for s in settings for v in s["cpus"].values() for c in v})})


def _study(like: dict[str, Any], settings: list[dict[str, Any]], strategies: list[str], seeds: list[int],
           **extra: Any) -> dict[str, Any]:
    """A study JSON of ``settings``, its protocol, validation, statistics and host as ``like``'s."""
    return {"study": like["study"], **extra, **{k: like[k] for k in ("protocol", "validation", "statistics")},
            "settings": settings, "strategies": strategies, "seeds": seeds, "host": like["host"]}


def combine(new: dict[str, Any], old: dict[str, Any], take: tuple[str, ...] = (METHOD,)) -> dict[str, Any]:
    """The new study's runs of the strategies ``take`` (fedhq by default) with the old study's
    runs of the others, per setting and seed, summarized as a study summarizes a setting. From
    the old study every strategy is taken that is not in ``take`` and does not take its QAT
    share from one that is (random-hybrid reads fedhq's). Raises ConfigError where the two do
    not pair."""
    from fedhq_core.config import from_mapping
    from fedhq_core.strategies import REGISTRY
    from flows.study import summarize_setting

    unknown = [n for n in take if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"--take: unknown strategy {unknown[0]!r}")
    from_old = [n for n in old["strategies"] if n not in take and REGISTRY[n].share_from not in take]
    olds = {s["name"]: s for s in old.get("settings", [])}
    settings, added = [], set()
    for s in new.get("settings", []):
        if s["name"] not in olds:
            raise ConfigError(f"setting {s['name']!r}: not in the baselines' study")
        o = olds[s["name"]]
        added |= _check_configs(s, o)
        mine: dict[int, dict[str, dict[str, Any]]] = {}
        for r in s["runs"]:
            if r["strategy"] in take:
                mine.setdefault(r["seed"], {})[r["strategy"]] = dict(r)
        by_seed: dict[int, dict[str, dict[str, Any]]] = {}
        for r in o["runs"]:
            if r["strategy"] in from_old and r["seed"] in mine:
                by_seed.setdefault(r["seed"], dict(mine[r["seed"]]))[r["strategy"]] = dict(r)
        if not mine or set(by_seed) != set(mine):
            raise ConfigError(f"setting {s['name']!r}: seeds {sorted(set(mine) - set(by_seed)) or 'none'} have no baselines")
        strategies = [n for n in [METHOD, *from_old, *take] if all(n in runs for runs in by_seed.values())]
        strategies = list(dict.fromkeys(strategies))
        entry = summarize_setting(s["name"], from_mapping(s["config"]), by_seed, strategies, new["protocol"]["criteria"])
        entry["builds"] = {", ".join(take): _build(new), "baselines": _build(old)}
        settings.append(entry)
    # the CPUs the paired runs ran on: another CPU gives another realization (float kernels)
    cpus = {side: _cpus([r for s in settings for r in s["runs"] if (r["strategy"] in take) == (side == "method")])
            for side in ("method", "baselines")}
    return _study(new, settings, list(dict.fromkeys(r["strategy"] for st in settings for r in st["runs"])), new["seeds"],
                  compare_builds={"method": _build(new), "baselines": _build(old),
                                  "taken_from_method": list(take), "keys_the_baselines_lack": sorted(added), "cpus": cpus})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.compare_builds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", metavar="NEW.json", help="a study of fedhq at the newer build")
    ap.add_argument("--baselines", metavar="OLD.json", help="a study with the baselines")
    ap.add_argument("--take", default=METHOD, metavar="NAMES", help="the strategies taken from NEW.json, comma-separated "
                    "(default fedhq); the rest come from OLD.json")
    ap.add_argument("--pool", nargs="+", metavar="STUDY.json", help="pool the seeds of these studies instead")
    ap.add_argument("--json", metavar="OUT", help="write the combined results")
    args = ap.parse_args(argv)
    try:
        if args.pool:
            if args.method or args.baselines:
                raise ConfigError("--pool: give either --pool or --method and --baselines")
            out = pool([_read(f) for f in args.pool])
        elif not (args.method and args.baselines):
            raise ConfigError("give --method NEW.json and --baselines OLD.json, or --pool STUDY.json ...")
        else:
            out = combine(_read(args.method), _read(args.baselines), tuple(args.take.split(",")))
    except ConfigError as err:
        print(f"compare_builds: error: {err}", file=sys.stderr)
        return 2
    from flows.cli_options import format_table
    from fedhq_core.metrics import commit_line
    from flows.study import paired_table, study_table

    if args.pool:
        for s in out["settings"]:
            print(f"{s['name']}: seeds pooled from builds " + "; ".join(f"{b}: {', '.join(map(str, k))}"
                                                                      for b, k in s["builds"].items())
                  + f" (CPUs: {', '.join(out['pool']['cpus'])}); check that they behave alike with "
                  "python -m flows.check_behaviour --ref <commit>")
    else:
        cb = out["compare_builds"]
        print(f"{', '.join(cb['taken_from_method'])} at code {cb['method']} against the others at code {cb['baselines']} (keys the baselines' "
              f"build lacks: {', '.join(cb['keys_the_baselines_lack']) or 'none'}); check that the baselines' code path "
              "is unchanged with python -m flows.check_behaviour --ref <their commit>")
        if cb["cpus"]["method"] != cb["cpus"]["baselines"]:
            print(f"runs on other CPUs ({', '.join(cb['cpus']['method'])} against {', '.join(cb['cpus']['baselines'])}) "
                  "pair as replicates: float kernels differ, so the same run gives other accuracies")
    print(format_table(*study_table(out)))
    print(format_table(*paired_table(out)))
    for s in out["settings"]:
        if s.get("bar"):
            per = s["bar"]["per_seed"]
            print(f"{s['name']}: bar per seed: " + ", ".join(
                f"seed {k}: {100 * v['acc_vs_best']:+.1f} pts, "
                + ("TTA not reached" if v["tta_vs_best"] is None else f"TTA {v['tta_vs_best']:.2f}x")
                + f", {v['sim_vs_all_ptq']:.2f}x time" for k, v in per.items()))
        line = commit_line(s["name"], s.get("decisions"))
        if line:
            print(line)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
