"""The `reproduce-table2` flow: RIN's image table (every run whose evaluation.report entry names rin_table2), then
the report; the DVC stages as cached, resumable Prefect tasks. `python -m flows.table2 --scale smoke` runs it once."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from diffusion.typed import set_dotted
from flows.artifacts import publish_markdown
from flows.results import result_storage
from flows.scale import Scale, scale_overrides, table_runs
from flows.storage import S3Location
from flows.tasks import dvc_push, prepare_workspace, publish, run_stages
from flows.workspace import read_params, repo_root, workspace_name, workspace_words

TABLE = "rin_table2"


def run_table(
    table: str, scale: str, overrides: dict[str, Any] | None, parallel: int, project: str | None, launcher: str
) -> dict:
    """Shared body of the per-table flows: pick the table's runs, prepare the workspace, run the stages, publish."""
    log = get_run_logger()
    repo = Path(project).resolve() if project else repo_root()
    raw = read_params(repo)
    extra = dict(overrides or {})
    all_overrides = scale_overrides(raw, scale) | extra
    runs = table_runs(set_dotted(raw, all_overrides), table)  # the paper scale's runs are its section's
    if not runs:
        raise ValueError(f"{repo}/params.yaml: no run has evaluation.report.<run>.table = {table} at {scale} scale; "
                         "add one")
    storage = result_storage(repo)
    if all_overrides:
        name = workspace_name(scale, extra)
        workspace = Path(prepare_workspace(str(repo), name, all_overrides))
    else:
        name, workspace = "repo", repo
    log.info("%s at %s scale: runs %s in %s; results in %s", table, scale, runs, workspace, storage)
    if scale == "paper":  # what the runs will cost, before they start (`python -m diffusion.cli plan RUN` alone)
        for line in plan_lines(workspace, runs):
            log.info("%s", line)
    targets = [f"evaluate@{run}" for run in runs] + ["report"]
    stages = run_stages(workspace, targets, storage, parallel, launcher)
    if S3Location.from_env() is not None:
        publish(str(workspace), list(stages), name)
        if workspace == repo and _has_dvc_remote(repo):
            dvc_push(str(workspace), list(stages))
    report = _report_folder(workspace) / "report.md"
    if report.exists():
        report_artifact(report, table, scale, name)
    return {"workspace": str(workspace), "runs": runs, "report": str(report), "stages": stages}


def report_artifact(report: Path, table: str, scale: str, workspace_name: str) -> None:
    """report.md as a Prefect Markdown artifact, its cards as artifacts it links and its figures embedded
    (flows.artifacts). Its header names the table, the scale and the workspace by name, never by its local path
    (which would show this machine's folders to everyone who reads the Prefect UI)."""
    where = workspace_words(workspace_name)
    publish_markdown(report, f"{table.replace('_', '-')}-{scale}", f"{table} at {scale} scale, in {where}",
                     f"outputs/report/ of {where}")


def plan_lines(workspace: Path, runs: list[str], gpus: int = 1) -> list[str]:
    """The compute plan of each run (diffusion.stages.plan: counted FLOPs, memory, time at its assumed throughput)."""
    from diffusion import registry
    from diffusion.config import load_params
    from diffusion.stages.plan import plan
    from diffusion.typed import ConfigError

    try:
        params = load_params(workspace / "params.yaml")
    except ConfigError as err:  # a DVC project of another shape (the flows drive any): nothing to count
        return [f"no compute plan: {workspace / 'params.yaml'} is not this pipeline's params file ({err})"]
    registry.check(params, runs=runs)
    return [line for run in runs for line in plan(params, params.run(run), gpus, 100.0).lines]


def _report_folder(workspace: Path) -> Path:
    """The `report` stage's output folder, as dvc.yaml names it (the only place paths are written)."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as r:
        (stage,) = [s for s in r.index.stages if s.name == "report"]
        return Path(stage.outs[0].fs_path)


def _has_dvc_remote(repo: Path) -> bool:
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return bool(r.config["core"].get("remote"))


@flow(name="reproduce-table2", flow_run_name="table2-{scale}")
def reproduce_table2(
    scale: Scale = "smoke",
    overrides: dict[str, Any] | None = None,
    parallel: int = 0,
    project: str | None = None,
    launcher: str = "",
) -> dict:
    """RIN Table 2 (image generation) at `scale`: "smoke" (a tiny configuration of the same runs, minutes on a CPU),
    "cpu" (params.yaml as it is) or "paper" (its `paper` section's runs, for a GPU cluster). `overrides`: extra
    dotted params.yaml keys (runs then in their own workspace); `parallel`: stages at once (0: one on a machine of
    up to 3 CPUs, else two; each stage's thread count is its share of the CPUs); `project`: another checkout of this
    repository; `launcher`: what runs the train and sample stages' `python` (e.g. `torchrun --nproc_per_node=8`)."""
    return run_table(TABLE, scale, overrides, parallel, project, launcher)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.table2", description=__doc__)
    p.add_argument("--scale", choices=["smoke", "cpu", "paper"], default="smoke")
    p.add_argument("--overrides", default="{}", help="JSON object of dotted params.yaml keys -> values")
    p.add_argument("--parallel", type=int, default=0, help="stages at once (0: 1 on up to 3 CPUs, else 2)")
    p.add_argument("--project", help="checkout to run in (default: this one)")
    p.add_argument("--launcher", default="", help="e.g. 'torchrun --standalone --nproc_per_node=8'")
    args = p.parse_args(argv)
    result = reproduce_table2(
        scale=args.scale,
        overrides=json.loads(args.overrides),
        parallel=args.parallel,
        project=args.project,
        launcher=args.launcher,
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
