"""DVC as the flows see it: the stage graph and each stage's state through DVC's own API, and `dvc` commands run as
supervised subprocesses whose output streams into a logger, their failures sorted into infrastructure (retried)
and stage errors (a bad config or a bug: not retried)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.storage import scrub

SUPERVISOR = Path(__file__).with_name("supervise.py")
PROGRESS_EVERY_S = 30.0  # a progress bar (a line ended by \r) is logged at most this often
TAIL_LINES = 30  # output lines quoted in an error

# Output that marks a failure of the machine, the network or storage rather than of the stage's inputs.
INFRA_PATTERNS = re.compile(
    "|".join(
        (
            r"Unable to acquire lock",  # another DVC process holds the repository lock
            r"is busy, it is being blocked by",  # DVC's per-path lock
            r"EndpointConnectionError|Could not connect to the endpoint URL",
            r"ConnectTimeout|ReadTimeout|ConnectionResetError|Connection refused|BrokenPipeError",
            r"Temporary failure in name resolution|Name or service not known",
            r"SlowDown|ServiceUnavailable|InternalError|RequestTimeout|Throttling",
            r"CUDA error: (?:an illegal memory access|unspecified launch failure)|NCCL (?:error|timeout)",
            r"No space left on device",
        )
    )
)
EXIT_STATUS = re.compile(r"exited with (-?\d+)")


class StageError(RuntimeError):
    """A stage failed because of what it was given (exit status 1 or 2: a config error, a bug): retrying is futile."""


class InfrastructureError(RuntimeError):
    """A stage or a transfer failed for reasons outside its inputs (a signal, a lock, the network, S3): retried."""


def is_signal_status(code: int) -> bool:
    """A process status that means "killed by a signal": negative (Popen) or 128 + N (a shell's report)."""
    return code < 0 or 128 < code <= 128 + 64


def classify(returncode: int, output: str) -> type[RuntimeError]:
    """StageError or InfrastructureError for a failed `dvc` command, from its status and the stage's output."""
    if is_signal_status(returncode):
        return InfrastructureError
    stage_codes = [int(c) for c in EXIT_STATUS.findall(output)]
    if any(is_signal_status(c) for c in stage_codes):
        return InfrastructureError
    if INFRA_PATTERNS.search(output):
        return InfrastructureError
    return StageError


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_parallel(cpus: int | None = None) -> int:
    """Stages at once when the caller does not say: one on a machine of 3 CPUs or fewer (a CPU run there already
    uses every core, and a second one makes both several times slower), else two."""
    return 1 if (cpus or available_cpus()) < 4 else 2


def thread_env(parallel: int, cpus: int | None = None) -> dict[str, str]:
    """OMP/MKL thread counts that share the CPUs between `parallel` concurrent stages (at least one each), so
    torch's intra-op pools do not oversubscribe the cores. Empty when the caller's environment sets
    OMP_NUM_THREADS: that choice wins. A CPU run's floats depend on its thread count; with one stage at a time
    each stage keeps every core, as a plain `dvc repro` does, and gives the same numbers."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    n = str(max(1, (cpus or available_cpus()) // max(1, parallel)))
    return dict.fromkeys(THREAD_VARS, n)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the running interpreter's bin folder first on PATH (DVC runs `python` from PATH)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env |= {"PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1", "TQDM_MININTERVAL": "5"}
    return env | (extra or {})


def _lines(stream) -> Iterator[tuple[str, bool]]:
    """(text, is_progress) per line of a byte stream; a segment ended by a lone \\r is a progress-bar update."""
    buf = b""
    while chunk := stream.read1(65536):
        buf += chunk
        while (m := re.search(rb"\r\n|\r|\n", buf)) is not None:
            yield buf[: m.start()].decode("utf-8", "replace"), m.group() == b"\r"
            buf = buf[m.end() :]
    if buf:
        yield buf.decode("utf-8", "replace"), False


def run_logged(
    cmd: Sequence[str], cwd: Path, log: logging.Logger | logging.LoggerAdapter, env: dict[str, str] | None = None
) -> str:
    """Run `cmd` under the supervisor in `cwd`, streaming its output (credentials scrubbed) into `log`; progress
    bars at most every PROGRESS_EVERY_S. Returns the output's tail; raises StageError or InfrastructureError."""
    full = [sys.executable, str(SUPERVISOR), str(os.getpid()), "--", *cmd]
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    log.info("$ %s  (in %s)", " ".join(cmd), cwd)
    proc = subprocess.Popen(
        full,
        cwd=cwd,
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    last_progress, unlogged = 0.0, ""
    for raw, is_progress in _lines(proc.stdout):
        text = scrub(raw).rstrip()
        if not text:
            continue
        if is_progress and time.monotonic() - last_progress < PROGRESS_EVERY_S:
            unlogged = text
            continue
        last_progress = time.monotonic() if is_progress else last_progress
        unlogged = ""
        log.info("%s", text)
        tail.append(text)
    if unlogged:
        log.info("%s", unlogged)
        tail.append(unlogged)
    code = proc.wait()
    output = "\n".join(tail)
    if code != 0:
        kind = classify(code, output)
        what = "killed by a signal" if is_signal_status(code) else f"exit status {code}"
        raise kind(f"`{' '.join(cmd)}` in {cwd} failed ({what}); last output:\n{output}")
    return output


def dvc_cmd(*args: str) -> list[str]:
    """A `dvc` command line run with this interpreter, waiting for DVC's repository lock instead of failing."""
    return [sys.executable, "-m", "dvc", "--wait-for-lock", *args]


@dataclass(frozen=True)
class StageState:
    stage: str
    up_to_date: bool  # DVC: deps, params, command and outputs all match dvc.lock
    digest: str  # sha256 of the stage's command, dependency hashes and param values now (outputs excluded)
    changes: str  # DVC's status of the stage, for the log ("" when up to date)


def _open_repo(workspace: Path):
    from dvc.repo import Repo

    return Repo(str(workspace), _wait_for_lock=True)


def _stages(repo, workspace: Path) -> dict[str, Any]:
    """Stages of the workspace's own dvc.yaml by name (e.g. train@rin_fmnist), whatever the current directory."""
    own = str(workspace.resolve() / "dvc.yaml")
    return {s.name: s for s in repo.index.stages if str(Path(s.path).resolve()) == own}


def stage_graph(workspace: Path, targets: Sequence[str]) -> dict[str, list[str]]:
    """The targets and every stage they depend on, in an order where each stage follows its upstream stages:
    stage -> the stages it depends on directly. Read from DVC (dvc.yaml templated over params.yaml)."""
    with _open_repo(workspace) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = _stages(repo, workspace)
        unknown = [t for t in targets if t not in by_name]
        if unknown:
            raise StageError(f"{workspace}/dvc.yaml has no stage {unknown[0]!r}; stages are {sorted(by_name)}")
        order: dict[str, list[str]] = {}

        def visit(stage: Any) -> None:  # depth first: upstream stages enter `order` before their dependents
            if stage.name in order:
                return
            ups = sorted(graph.successors(stage), key=lambda s: s.name)
            for up in ups:
                visit(up)
            order[stage.name] = [up.name for up in ups]

        for target in targets:
            visit(by_name[target])
        return order


def stage_command(workspace: Path, stage_name: str) -> str:
    """The stage's command as dvc.yaml renders it (e.g. `python -m diffusion.cli train rin_fmnist`)."""
    with _open_repo(workspace) as repo:
        stage = _stages(repo, workspace).get(stage_name)
        if stage is None:
            raise StageError(f"{workspace}/dvc.yaml has no stage {stage_name!r}")
        return str(stage.cmd)


@contextlib.contextmanager
def _quiet_rwlock():
    """DVC's rwlock logs a warning when it removes the entry of a killed process (a stage killed with the flow), and
    its log handler raises LoggingException when that write fails (after a kill, the stream it holds can be gone),
    which failed the re-run of a killed flow; the entry is removed either way, so the warning is dropped here."""
    rwlock_log = logging.getLogger("dvc.rwlock")
    level = rwlock_log.level
    rwlock_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        rwlock_log.setLevel(level)


def stage_state(workspace: Path, stage_name: str) -> StageState:
    """What DVC says about one stage now. `digest` is computed like a dvc.lock entry without its outputs, so it is
    the same before the stage runs and after it has run; a Prefect cache key that includes it matches a completed
    run of exactly these inputs, and DVC's `up_to_date` decides whether that completion still stands."""
    from dvc.stage.serialize import to_single_stage_lockfile
    from dvc.utils import dict_sha256

    with _open_repo(workspace) as repo:
        stage = _stages(repo, workspace).get(stage_name)
        if stage is None:
            raise StageError(f"{workspace}/dvc.yaml has no stage {stage_name!r}")
        with repo.lock, _quiet_rwlock():
            status = stage.status()
            try:
                stage.save_deps()
            except Exception as err:  # a missing dependency: the stage cannot be up to date
                return StageState(stage_name, False, f"missing-deps:{type(err).__name__}", scrub(str(err)))
            entry = dict(to_single_stage_lockfile(stage))
        entry.pop("outs", None)
        changes = next(iter(status.values()), [])
        return StageState(stage_name, not changes, dict_sha256(entry), scrub(json.dumps(changes)) if changes else "")


PUBLISHED_SUFFIXES = (".png", ".json", ".md", ".csv", ".tex", ".safetensors")  # reports, grids, metrics, weights


def stage_outputs(workspace: Path, stages: Sequence[str]) -> list[Path]:
    """The files worth keeping off this machine among the stages' DVC outputs: every file of an output folder of the
    `report` stage, the newest checkpoint of a `checkpoints` folder, and output files that are reports, grids,
    metrics or weights (sample arrays, chunks and shards stay with DVC's cache and remote)."""
    files: list[Path] = []
    with _open_repo(workspace) as repo:
        for stage in (s for name, s in _stages(repo, workspace).items() if name in stages):
            for out in stage.outs:
                path = Path(out.fs_path)
                if path.is_file() and path.suffix in PUBLISHED_SUFFIXES:
                    files.append(path)
                elif path.is_dir() and stage.name == "report":
                    files += [p for p in path.rglob("*") if p.is_file()]
                elif path.is_dir() and path.name == "checkpoints":
                    steps = sorted(p for p in path.glob("step-*") if p.is_dir())
                    files += [p for p in steps[-1].rglob("*") if p.is_file()] if steps else []
                    files += [p for p in (path / "latest",) if p.is_file()]
    return sorted(set(files))
