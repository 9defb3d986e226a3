"""The `ablation` flow: a grid of params.yaml overrides, each combination one DVC experiment (`dvc exp run --temp -S
key=value ...`), so `dvc exp show` lists and compares them. A finished combination is a cache hit on a re-run; a
combination cut short starts over (DVC's temporary workspace does not outlive the process).
`python -m flows.ablation --grid '{"runs.rin_fmnist.train.lr": [1e-3, 2e-3]}'` runs it once."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from diffusion.io import canonical_json
from flows.results import result_storage
from flows.scale import OverrideError, Scale, scale_overrides, set_args
from flows.stages import dvc_cmd, run_logged, subprocess_env
from flows.tasks import RETRY
from flows.workspace import read_params, repo_root


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the grid's key order: {"a": [1, 2], "b": [3]} -> 2 dicts."""
    if not grid:
        raise OverrideError('ablation grid is empty; pass e.g. {"runs.rin_fmnist.train.steps": [1000, 2000]}')
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise OverrideError(f"ablation grid {key!r}: values must be a non-empty list, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def baseline(repo: Path) -> str:
    """What `dvc exp run --temp` starts from: the HEAD commit plus a digest of uncommitted changes to tracked files."""

    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True).stdout

    head = git("rev-parse", "HEAD").decode().strip()
    dirty = hashlib.sha256(git("diff", "HEAD", "--binary")).hexdigest()[:8]
    return f"{head[:12]}+{dirty}"


def experiment_name(scale: str, combo: dict[str, Any], base: str) -> str:
    """A readable, git-ref-safe name: <scale>-<last key part><value>...-<hash of combination and baseline>."""
    slug = "-".join(f"{key.rsplit('.', 1)[-1]}{value}" for key, value in combo.items())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", slug)[:40].strip("._-")
    digest = hashlib.sha256(canonical_json({"combo": combo, "scale": scale, "baseline": base}).encode()).hexdigest()[:6]
    return f"{scale}-{slug}-{digest}"


def experiments(repo: Path) -> set[str]:
    """Names of the DVC experiments on the current baseline."""
    out = subprocess.run(
        dvc_cmd("exp", "list", "--name-only"), cwd=repo, env=subprocess_env(), capture_output=True, text=True
    )
    return {line.strip() for line in out.stdout.splitlines() if line.strip()} if out.returncode == 0 else set()


@task(name="dvc-experiment", task_run_name="{name}", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **RETRY)
def dvc_experiment(
    repo: str, name: str, base_overrides: dict[str, Any], combo: dict[str, Any], targets: list[str], baseline: str
) -> dict[str, Any]:
    """One combination: `dvc exp run --temp -n <name> -S ...`; skipped when the experiment already exists."""
    log = get_run_logger()
    if name in experiments(Path(repo)):
        log.info("experiment %s already exists on baseline %s", name, baseline)
        return {"name": name, "overrides": combo, "seconds": 0.0}
    start = time.monotonic()
    args = ["exp", "run", "--temp", "-n", name, *set_args(base_overrides | combo), *targets]
    run_logged(dvc_cmd(*args), Path(repo), log)
    return {"name": name, "overrides": combo, "seconds": round(time.monotonic() - start, 1)}


@flow(name="ablation", flow_run_name="ablation-{scale}")
def ablation(
    grid: dict[str, list[Any]], scale: Scale = "smoke", targets: list[str] | None = None, project: str | None = None
) -> list[dict[str, Any]]:
    """Run every combination of `grid` (dotted params.yaml key -> list of values) as a DVC experiment, at `scale`
    ("smoke" shrinks every run first; "cpu" leaves params.yaml as it is; a paper run is ablated by copying it into
    `runs`: experiments run in the checkout, on the pipeline's sections). `targets`: stages to reproduce (default:
    the whole pipeline). Combinations run one after another; each is as parallel as its own stages."""
    log = get_run_logger()
    repo = Path(project).resolve() if project else repo_root()
    raw = read_params(repo)
    combos = expand_grid(grid)
    if scale == "paper":
        raise OverrideError("ablation runs DVC experiments in the checkout, on params.yaml's pipeline sections: use "
                            "scale cpu (params.yaml as it is) and copy the paper runs to ablate into `runs`")
    base_overrides = scale_overrides(raw, scale)
    base = baseline(repo)
    storage = result_storage(repo)
    existing = experiments(repo)
    log.info("%d combination(s) at %s scale on baseline %s", len(combos), scale, base)
    results = []
    for combo in combos:
        name = experiment_name(scale, combo, base)
        run = dvc_experiment.with_options(refresh_cache=name not in existing, result_storage=storage)
        results.append(run(str(repo), name, base_overrides, combo, list(targets or []), base))
    names = [r["name"] for r in results]
    table = subprocess.run(
        dvc_cmd("exp", "show", "--md", "--no-pager", "--only-changed", "--hide-workspace", "--drop", "Created"),
        cwd=repo,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    log.info("dvc exp show:\n%s", table.stdout or table.stderr)
    if table.returncode == 0:
        create_markdown_artifact(
            key=f"ablation-{scale}", markdown=table.stdout, description=f"dvc exp show after {', '.join(names)}"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.ablation", description=__doc__)
    p.add_argument("--grid", required=True, help='JSON: {"runs.rin_fmnist.train.lr": [0.001, 0.002], ...}')
    p.add_argument("--scale", choices=["smoke", "cpu"], default="smoke")
    p.add_argument("--targets", nargs="*", default=[], help="stages to reproduce (default: all)")
    p.add_argument("--project", help="checkout to run in (default: this one)")
    args = p.parse_args(argv)
    result = ablation(grid=json.loads(args.grid), scale=args.scale, targets=args.targets, project=args.project)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
