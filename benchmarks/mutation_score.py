"""The mutation score of the core modules (`make mutation`): reads mutmut's results in mutants/ and writes, per
module, how many mutants the tests killed, how many survived, timed out or reached no test, and the score.

score = (killed + timeout) / (every mutant mutmut generated, less those it skipped): a mutant that no selected test
reaches counts as surviving. The tests per module, and the modules, are pyproject.toml's [tool.mutmut].

    mutmut run --max-children 1                         # in the checkout (make mutation); resumable
    python benchmarks/mutation_score.py --out benchmarks/results/mutation.json

A pass of some mutants by name (a fresh machine has no mutants/ of the last full pass) can carry the rest from
earlier full passes' results (--carry, later files first): a mutant not run now is counted as it ended then, a
survivor (or a listed equivalent) if it was one, else killed. That holds for functions unchanged since, with tests
that only grew; re-run every mutant of a changed function (mutmut run "module.x_function*").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no_tests", 33: "no_tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not_checked"}  # fmt: skip
# (mutmut.stats.status_by_exit_code; anything else is "suspicious")


def carried_survivors(files: list[Path], equivalent: dict[str, str]) -> dict[str, set[str]]:
    """module path -> the mutants that survived its last full pass, from earlier results files (a later file's
    entry for a module replaces an earlier's); only modules whose pass there ran every mutant."""
    out: dict[str, set[str]] = {}
    for path in files:
        for module, r in json.loads(path.read_text())["modules"].items():
            if r["not_checked"]:
                continue  # a partial pass: nothing to carry
            prefix = module[: -len(".py")].replace("/", ".") + "."
            out[module] = set(r["survivors"]) | {n for n in equivalent if n.startswith(prefix)}
    return out


def module_results(mutants: Path, equivalent: dict[str, str] | None = None,
                   carry: dict[str, set[str]] | None = None) -> dict[str, dict]:
    """module path -> counts, score and the surviving / untested mutants' names, from mutmut's .meta files.
    `equivalent` (mutant -> reason: benchmarks/results/mutation_equivalent.json) are survivors shown to behave as the
    original; score_without_equivalent leaves them out of the count. `carry` (carried_survivors): a module's mutants
    not run in this pass count as they ended in its last full pass."""
    equivalent, carry = equivalent or {}, carry or {}
    out = {}
    for meta in sorted(mutants.glob("**/*.py.meta")):
        module = str(meta.relative_to(mutants))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        status = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
        carried = 0
        if module in carry:
            for name in [n for n, s in status.items() if s == "not_checked"]:
                status[name], carried = ("survived" if name in carry[module] else "killed"), carried + 1
        counts = Counter(status.values())
        scored = len(status) - counts["skipped"] - counts["not_checked"]
        detected = counts["killed"] + counts["timeout"]
        alive = sorted(n for n, s in status.items() if s in ("survived", "no_tests", "suspicious"))
        same = [n for n in alive if n in equivalent]
        out[module] = {
            "mutants": len(status),
            **{k: counts[k] for k in ("killed", "survived", "timeout", "no_tests", "suspicious", "not_checked")},
            "score": round(detected / scored, 4) if scored else None,
            "equivalent": len(same),
            "score_without_equivalent": round(detected / (scored - len(same)), 4) if scored > len(same) else None,
            "survivors": [n for n in alive if n not in equivalent],
            "carried": carried,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's working copy")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mutation.json"))
    parser.add_argument("--label", default="", help="what this run is (e.g. 'before the new tests', 'partial')")
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the mutmut run")
    parser.add_argument("--equivalent", type=Path, default=Path("benchmarks/results/mutation_equivalent.json"),
                        help="surviving mutants shown equivalent, each with its reason")
    parser.add_argument("--carry", type=Path, action="append", default=[],
                        help="an earlier results file whose full passes count the mutants not run now (repeatable)")
    args = parser.parse_args(argv)
    import tomllib

    config = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]
    equivalent = json.loads(args.equivalent.read_text()) if args.equivalent.exists() else {}
    modules = module_results(args.mutants, equivalent, carried_survivors(args.carry, equivalent))
    if not modules:
        sys.exit(f"error: no mutmut results in {args.mutants}/. Fix: run `mutmut run` (make mutation) first")
    result = {
        "what": "mutation score of the core maths and the resume / chunk logic (issue 22)",
        "label": args.label,
        "tool": f"mutmut {version('mutmut')}",
        "command": "OMP_NUM_THREADS=1 mutmut run --max-children 1  (make mutation)",
        "score_definition": "(killed + timeout) / (mutants - skipped - not checked); untested ones count as survived",
        "equivalent": "survivors shown equivalent (benchmarks/results/mutation_equivalent.json) are left out of "
                      "score_without_equivalent and listed in benchmarks/results/mutation.md",
        "tests": config["pytest_add_cli_args_test_selection"],
        "machine": {"cpu_threads_used": 1, "python": platform.python_version(), "platform": platform.platform()},
        "seconds": args.seconds,
        "carried_from": [str(p) for p in args.carry],
        "modules": modules,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for module, r in modules.items():
        print(f"{module:32s} {r['killed']:4d} killed {r['survived']:4d} survived {r['timeout']:3d} timeout "
              f"{r['no_tests']:3d} untested {r['not_checked']:4d} unchecked {r['carried']:4d} carried  "
              f"score {r['score']} "
              f"({r['score_without_equivalent']} without {r['equivalent']} equivalent)")  # fmt: skip


if __name__ == "__main__":
    main()
