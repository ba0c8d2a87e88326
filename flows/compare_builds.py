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
fp32: random-hybrid takes fedhq's QAT share). Each setting's configs must be equal but for the strategy and keys the old
build did not have (listed in the output); the seeds must match. Bad input: one line, exit 2.
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


# baselines whose runs do not depend on fedhq's (random-hybrid takes fedhq's QAT share, so a new
# fedhq build changes its runs too)
INDEPENDENT = ("all-ptq", "all-qat", "fp32")


def combine(new: dict[str, Any], old: dict[str, Any], baselines: tuple[str, ...] = INDEPENDENT) -> dict[str, Any]:
    """The new study's fedhq runs with the old study's ``baselines``, per setting, summarized as a
    study summarizes a setting. Raises ConfigError where the two do not pair."""
    from fedhq_core.config import from_mapping
    from flows.study import summarize_setting

    olds = {s["name"]: s for s in old.get("settings", [])}
    settings, added = [], set()
    for s in new.get("settings", []):
        if s["name"] not in olds:
            raise ConfigError(f"setting {s['name']!r}: not in the baselines' study")
        o = olds[s["name"]]
        extra = set(s["config"]) - set(o["config"])
        added |= extra
        differ = sorted(k for k in set(s["config"]) & set(o["config"])
                        if k != "strategy" and s["config"][k] != o["config"][k])
        if differ or set(o["config"]) - set(s["config"]):
            raise ConfigError(f"setting {s['name']!r}: configs differ in {(differ or sorted(set(o['config']) - set(s['config'])))[0]!r}")
        mine = {r["seed"]: r for r in s["runs"] if r["strategy"] == METHOD}
        by_seed: dict[int, dict[str, dict[str, Any]]] = {}
        for r in o["runs"]:
            if r["strategy"] in baselines and r["seed"] in mine:
                by_seed.setdefault(r["seed"], {METHOD: dict(mine[r["seed"]])})[r["strategy"]] = dict(r)
        if set(by_seed) != set(mine):
            raise ConfigError(f"setting {s['name']!r}: seeds {sorted(set(mine) - set(by_seed))} have no baselines")
        strategies = [METHOD] + [n for n in old["strategies"] if n in baselines and n in by_seed[min(by_seed)]]
        entry = summarize_setting(s["name"], from_mapping(s["config"]), by_seed, strategies, new["protocol"]["criteria"])
        entry["builds"] = {METHOD: new["code_digest"], "baselines": old["code_digest"]}
        settings.append(entry)
    strategies = [METHOD] + [n for n in old["strategies"] if n in baselines]
    # the CPUs the paired runs ran on: another CPU gives another realization (float kernels)
    cpus = {side: sorted({str(r.get("cpu", "not recorded")) for s in settings for r in s["runs"]
                          if (r["strategy"] == METHOD) == (side == "method")}) for side in ("method", "baselines")}
    return {"study": new["study"], "compare_builds": {"method": new["code_digest"], "baselines": old["code_digest"],
                                                      "keys_the_baselines_lack": sorted(added), "cpus": cpus},
            "protocol": new["protocol"], "validation": new["validation"], "statistics": new["statistics"],
            "settings": settings, "strategies": strategies, "seeds": new["seeds"], "host": new["host"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.compare_builds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True, metavar="NEW.json", help="a study of fedhq at the newer build")
    ap.add_argument("--baselines", required=True, metavar="OLD.json", help="a study with the baselines")
    ap.add_argument("--json", metavar="OUT", help="write the combined results")
    args = ap.parse_args(argv)
    try:
        out = combine(_read(args.method), _read(args.baselines))
    except ConfigError as err:
        print(f"compare_builds: error: {err}", file=sys.stderr)
        return 2
    from flows.cli_options import format_table
    from flows.study import paired_table, study_table

    cb = out["compare_builds"]
    print(f"fedhq at code {cb['method']} against the baselines at code {cb['baselines']} (keys the baselines' "
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
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
