"""Prefect tasks over DVC stages and the scheduler that runs a set of stages in dependency order.

A stage task's cache key is the stage's name, its DVC digest (command, dependency hashes, param values) and the
task's source, not where the workspace is: the same inputs give the same key in any checkout. The scheduler asks DVC
about each stage just before submitting it: when DVC says the stage is not up to date there (an output deleted or
never pulled, dvc.lock from another configuration), the task runs and overwrites any cached result
(`refresh_cache`); when DVC says it is, an earlier completion with the same digest is a cache hit. So a re-run after a
crash skips what finished, DVC stays the judge of what is current, and a stage cut short resumes from its checkpoint.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.futures import PrefectFuture, as_completed
from prefect.tasks import exponential_backoff

from flows.stages import (
    InfrastructureError,
    StageError,
    auto_parallel,
    dvc_cmd,
    run_logged,
    stage_command,
    stage_graph,
    stage_outputs,
    stage_state,
    subprocess_env,
    thread_env,
)
from flows.storage import S3Location, StorageError, upload_files
from flows.workspace import sync_workspace

RETRIES = 2  # after the first attempt; only for infrastructure failures
RETRY_BACKOFF_S = 20.0  # 20 s, then 40 s (jittered)


def retry_infrastructure(task: object, task_run: object, state: object) -> bool:
    """Prefect retry condition: a signal, a lock, the network or S3, never a stage's own error (exit 1 or 2)."""
    err = getattr(state, "data", None)
    return isinstance(err, InfrastructureError) or (isinstance(err, StorageError) and err.transient)


RETRY = dict(
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(RETRY_BACKOFF_S),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_infrastructure,
)


# The digest says what the stage computes; where (workspace), how it is launched (launcher) and how many stages share
# the CPUs (concurrency) do not change it, as they do not change DVC's view.
STAGE_CACHE = (INPUTS - "workspace" - "launcher" - "concurrency") + TASK_SOURCE
LAUNCHED_STAGES = ("train", "sample")  # torchrun-aware stages (diffusion/distributed.py), which a launcher may wrap


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=STAGE_CACHE, persist_result=True, **RETRY)
def dvc_stage(workspace: str, stage: str, digest: str, launcher: str = "", concurrency: int = 1) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` in the workspace; `digest`, DVC's view of its inputs, keys the cache.
    `concurrency`: how many stages run at once on this machine; each gets its share of the CPUs as its thread count
    (flows.stages.thread_env).

    With a `launcher` (e.g. `torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=head:29500`),
    train and sample stages run their dvc.yaml command with `python` replaced by the launcher, then `dvc commit`
    records them: dvc.lock and the cache key are the same as for a plain `dvc repro`."""
    log, ws, start = get_run_logger(), Path(workspace), time.monotonic()
    threads = thread_env(concurrency)
    if threads:
        log.info("%s: %s threads per stage (%d at once)", stage, threads["OMP_NUM_THREADS"], concurrency)
    env = subprocess_env(threads)
    if launcher and stage.split("@")[0] in LAUNCHED_STAGES:
        if stage_state(ws, stage).up_to_date:
            log.info("%s is up to date", stage)
        else:
            cmd = shlex.split(stage_command(ws, stage))
            if cmd[0] != "python":
                raise StageError(f"{stage}: command {' '.join(cmd)!r} does not start with python; cannot launch it")
            run_logged([*shlex.split(launcher), *cmd[1:]], ws, log, env)
            run_logged(dvc_cmd("commit", "--force", stage), ws, log, env)
    else:
        run_logged(dvc_cmd("repro", "--single-item", stage), ws, log, env)
    return {"stage": stage, "digest": digest, "seconds": round(time.monotonic() - start, 1)}


@task(name="prepare-workspace", cache_policy=NO_CACHE)
def prepare_workspace(repo: str, name: str, overrides: dict[str, Any]) -> str:
    """Create or update the derived workspace .flows/workspaces/<name> (see flows.workspace)."""
    ws = sync_workspace(Path(repo), name, overrides)
    get_run_logger().info("workspace %s: %d override(s) of params.yaml", ws, len(overrides))
    return str(ws)


@task(name="publish-s3", cache_policy=NO_CACHE, **RETRY)
def publish(workspace: str, stages: list[str], label: str) -> list[dict[str, Any]]:
    """Upload the stages' reports, sample grids, metrics, weights and newest checkpoints to
    <RINMEME_S3_URL>/artifacts/<label>/, each with its sha256, verified. Local files are only read."""
    loc = S3Location.from_env()
    if loc is None:
        return []
    ws = Path(workspace)
    files = stage_outputs(ws, stages)
    uploaded = upload_files(loc, ws, files, "artifacts", label)
    get_run_logger().info(
        "uploaded %d files (%.1f MB) to %s, sha256-verified",
        len(uploaded),
        sum(u.size for u in uploaded) / 1e6,
        loc.url("artifacts", label),
    )
    return [{"key": u.key, "sha256": u.sha256, "size": u.size} for u in uploaded]


@task(name="dvc-push", cache_policy=NO_CACHE, **RETRY)
def dvc_push(workspace: str, stages: list[str]) -> None:
    """`dvc push` of the stages' cached outputs to the workspace's default DVC remote."""
    run_logged(dvc_cmd("push", *stages), Path(workspace), get_run_logger())


class PipelineError(RuntimeError):
    """One or more stages failed; the message lists them and the stages skipped because of them."""


def run_stages(
    workspace: Path, targets: Sequence[str], storage: Path | str, parallel: int = 0, launcher: str = ""
) -> dict[str, dict]:
    """Run `targets` and what they depend on, each stage as a `dvc-stage` task once its upstream stages are done, at
    most `parallel` at a time (0: flows.stages.auto_parallel, one on a machine of up to 3 CPUs, else two).
    Independent branches keep going when a stage fails; the flow fails at the end. Returns stage -> {state, seconds,
    cached} in completion order."""
    if parallel < 0:
        raise ValueError(f"parallel must be a number of stages >= 1, or 0 to choose from the CPU count; got {parallel}")
    log = get_run_logger()
    parallel = parallel or auto_parallel()
    graph = stage_graph(workspace, targets)
    log.info("stages: %s", ", ".join(graph))
    waiting = dict(graph)
    running: dict[PrefectFuture, str] = {}
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    while waiting or running:
        for stage, ups in list(waiting.items()):
            bad = [u for u in ups if u in failed]
            if bad:
                failed[stage] = f"skipped: upstream {bad[0]} failed"
                del waiting[stage]
        for stage in [s for s, ups in waiting.items() if all(u in done for u in ups)]:
            if len(running) >= parallel:
                break
            state = stage_state(workspace, stage)
            log.info(
                "%s: %s (digest %s)",
                stage,
                "up to date" if state.up_to_date else f"to run: {state.changes[:300]}",
                state.digest[:12],
            )
            options = dict(refresh_cache=not state.up_to_date, result_storage=storage)
            future = dvc_stage.with_options(**options).submit(str(workspace), stage, state.digest, launcher, parallel)
            running[future] = stage
            del waiting[stage]
        if not running:
            if waiting:
                raise PipelineError(f"stages {sorted(waiting)} can never run: their upstream stages are missing")
            break
        future = next(iter(as_completed(list(running))))
        stage = running.pop(future)
        try:
            result = future.result()
        except Exception as err:  # the task's own error (StageError, InfrastructureError, ...), re-raised here
            failed[stage] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.error("%s failed: %s", stage, failed[stage])
            continue
        done[stage] = {
            "state": future.state.name,
            "seconds": result["seconds"],
            "cached": future.state.name == "Cached",
        }
    if failed:
        raise PipelineError("; ".join(f"{s}: {why}" for s, why in failed.items()))
    return done
