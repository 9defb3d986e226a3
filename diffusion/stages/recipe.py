"""`python -m diffusion.cli recipe RUN [--all] [--json]`: every setting of a run (of the pipeline or of params.yaml's
`paper` section) beside the paper's or the authors' value and its source (recipes.yaml), differences flagged. A
command for people, not a DVC stage; the report shows the same count per row."""

from __future__ import annotations

import json
from collections.abc import Sequence

from diffusion import registry
from diffusion.args import parser
from diffusion.config import ConfigError, load_params
from diffusion.recipes import RECIPES_FILE, compare, differences, load_recipes, row_key, run_settings

MARK = {"same": "", "differs": "DIFFERS", "kept": "kept", "not given": ""}


def _text(value) -> str:
    return "-" if value is None else json.dumps(value) if isinstance(value, list | bool) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("recipe", __doc__)
    p.add_argument("run", help="a run, expert or ensemble name (params.yaml, or its `paper` section)")
    p.add_argument("--recipes", default=str(RECIPES_FILE), help="the recipes file (default: recipes.yaml)")
    p.add_argument("--all", action="store_true", help="also list the settings the sources do not give")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    params, run = load_params(args.params).any_run(args.run)
    registry.check(params, runs=[run.name, *(e.name for e in run.experts)])
    row = row_key(params.evaluation.report, run.name)
    if row is None:
        raise ConfigError(f"params.yaml: {run.params_key} has no paper row: add evaluation.report.{run.name} "
                          "{table, row, scale} (in the same section) to set it beside a paper's recipe")
    rows = compare(run_settings(run, registry.resolve_model(run)), load_recipes(args.recipes), row, run.name)
    diff = differences(rows)
    if args.json:
        print(json.dumps({"run": run.params_key, "paper_row": row, "differs": [r.key for r in diff],
                          "settings": [vars(r) for r in rows]}, indent=1, default=str))
        return 0
    shown = [r for r in rows if args.all or r.status != "not given"]
    width = max(len(r.key) for r in shown) + 2
    print(f"{run.params_key} beside {row} (recipes.yaml)\n")
    print(f"{'setting':<{width}}{'ours':>14}{'paper':>14}  {'':<8}source / note")
    for r in shown:
        note = f"{r.source}" + (f" - {r.note}" if r.note else "")
        print(f"{r.key:<{width}}{_text(r.ours):>14}{_text(r.paper):>14}  {MARK[r.status]:<8}{note}")
    given = sum(r.status != "not given" for r in rows)
    kept = [r.key for r in rows if r.status == "kept"]
    print(f"\n{given} settings given by the sources: {len(diff)} differ" + (f" ({', '.join(r.key for r in diff)})"
                                                                           if diff else "")
          + (f"; {len(kept)} kept on purpose ({', '.join(kept)})" if kept else "")
          + f"; {len(rows) - given} more not given by them" + ("" if args.all else " (--all lists them)"))
    return 0
