"""The Prefect flows over the DVC stages: smoke configuration, failure classes, caching that defers to DVC, retries,
kill-and-rerun, served deployments triggered from the CLI. Fast tests drive a toy DVC project (conftest.toy_project)
against one real Prefect server; the `slow` ones run this repository's pipeline at smoke scale in a clone."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffusion.config import parse_params
from diffusion.typed import ConfigError
from diffusion.typed import set_dotted as apply_overrides
from flows.ablation import expand_grid, experiment_name
from flows.scale import OverrideError, set_args, smoke_overrides, table_runs
from flows.stages import InfrastructureError, StageError, auto_parallel, available_cpus, classify, thread_env

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
PREFECT = str(Path(sys.executable).parent / "prefect")


def task_states(flow_run_id) -> dict[str, tuple[str, int]]:
    """task run name -> (state name, run count) of one flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: (r.state.name, r.run_count) for r in runs}


def processes_running(word: str) -> list[str]:
    """Command lines of live processes that contain `word` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if word in text:
            found.append(text)
    return found


def run_table2(project: Path, **params):
    from flows.table2 import reproduce_table2

    state = reproduce_table2(project=str(project), return_state=True, **({"scale": "cpu"} | params))
    return state, task_states(state.state_details.flow_run_id)


def stage_states(states: dict[str, tuple[str, int]]) -> dict[str, str]:
    return {name: s for name, (s, _) in states.items() if "@" in name or name in ("prep", "report")}


# Configuration and classification: no server needed.


def test_smoke_overrides_give_a_valid_tiny_configuration():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    runs = table_runs(raw, "rin_table2")
    assert runs and all(raw["evaluation"]["report"][r]["table"] == "rin_table2" for r in runs)
    smoke = parse_params(apply_overrides(raw, smoke_overrides(parse_params(raw))))  # the real loader accepts it
    paper = parse_params(raw)
    for name, run in smoke.runs.items():
        full, video = paper.runs[name], run.dataset.frames > 0
        if run.model.family == "rin":
            assert run.model.preset == ("rin_tiny_video" if video else "rin_tiny") and not run.model.overrides
        assert run.sample.num_samples <= 64 and 0 < run.dataset.max_samples <= 512
        assert run.train.steps <= 40 or run.model.experts  # ensembles train nothing
        assert run.eval.num_reference <= smoke.evaluation.references[run.dataset_name].num_images
        assert (run.train.lr, run.diffusion) == (full.train.lr, full.diffusion)  # what is not shrunk stays
        if name in smoke.evaluation.report:
            assert smoke.evaluation.report[name].scale == "smoke test"  # the report says so
    for section in ("experts", "ensembles"):
        assert all(name in json.dumps(smoke_overrides(parse_params(raw))) for name in raw.get(section) or {})
    assert raw == yaml.safe_load((REPO / "params.yaml").read_text())  # the input was not modified


def test_overrides_do_not_leak_through_yaml_anchors():
    shared = {"steps": 100}
    raw = {"runs": {"a": {"sample": shared}, "b": {"sample": shared}}}  # what `sample: *anchor` loads as
    out = apply_overrides(raw, {"runs.a.sample.steps": 5})
    assert out["runs"]["a"]["sample"]["steps"] == 5 and out["runs"]["b"]["sample"]["steps"] == 100
    assert "&id" not in yaml.safe_dump(out)


def test_overrides_and_their_dvc_arguments():
    raw = {"runs": {"r": {"train": {"lr": 1.0}}}}
    out = apply_overrides(raw, {"runs.r.train.lr": 0.5, "runs.r.sample.steps": 10})
    assert out == {"runs": {"r": {"train": {"lr": 0.5}, "sample": {"steps": 10}}}}
    with pytest.raises(ConfigError, match="runs.r.train.lr"):
        apply_overrides(raw, {"runs.r.train.lr.x": 1})
    assert set_args({"a.b": "rin_tiny", "c": [1, 2], "d": 0.001}) == [
        "-S", '++a.b="rin_tiny"', "-S", "++c=[1, 2]", "-S", "++d=0.001"
    ]  # fmt: skip


def test_the_report_artifact_names_its_workspace_without_a_local_path(tmp_path, monkeypatch):
    import flows.artifacts
    import flows.table2 as table2

    made = []
    monkeypatch.setattr(flows.artifacts, "create_markdown_artifact", lambda **kwargs: made.append(kwargs))
    report = tmp_path / ".flows" / "workspaces" / "smoke" / "outputs" / "report" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("# the report\n")
    table2.report_artifact(report, "rin_table2", "smoke", "smoke")
    table2.report_artifact(report, "rin_table2", "paper", "repo")
    assert [m["description"] for m in made] == ["rin_table2 at smoke scale, in workspace 'smoke' (.flows/workspaces/)",
                                                "rin_table2 at paper scale, in the checkout itself"]
    assert made[0]["markdown"] == "# the report\n" and made[0]["key"] == "rin-table2-smoke"


def test_grid_and_experiment_names():
    combos = expand_grid({"runs.r.train.lr": [0.001, 0.002], "runs.r.train.steps": [10]})
    assert combos == [{"runs.r.train.lr": 0.001, "runs.r.train.steps": 10},
                      {"runs.r.train.lr": 0.002, "runs.r.train.steps": 10}]  # fmt: skip
    names = [experiment_name("smoke", c, "abc+def") for c in combos]
    assert names[0] == experiment_name("smoke", combos[0], "abc+def") and len(set(names)) == 2
    assert names[0] != experiment_name("smoke", combos[0], "abc+other")  # a new baseline, a new experiment
    assert all(n.startswith("smoke-lr0.00") and all(c.isalnum() or c in "._-" for c in n) for n in names)
    with pytest.raises(OverrideError):
        expand_grid({"runs.r.train.lr": []})


def parse_set_args(args: list[str]) -> dict:
    """`-S ++key=<json>` pairs (what set_args writes for `dvc exp run`) back into {dotted key: value}."""
    assert args[::2] == ["-S"] * (len(args) // 2), args
    pairs = [a.removeprefix("++").split("=", 1) for a in args[1::2]]
    return {key: json.loads(value) for key, value in pairs}


@pytest.fixture()
def recorded_ablation(tmp_path, monkeypatch):
    """flows.ablation's flow and task run as plain functions, no Prefect server: the `dvc exp run` commands are
    recorded instead of run, `dvc exp list` answers from `existing`, `dvc exp show` fails. Returns a callable
    (grid, scale, targets) -> (results, commands, task options) over a git repository holding params.yaml."""
    import logging

    import flows.ablation as ab

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "params"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    commands, options, existing = [], [], set()
    task_fn = ab.dvc_experiment.fn
    real_run = subprocess.run

    class PlainTask:
        @staticmethod
        def with_options(**kwargs):
            options.append(kwargs)
            return task_fn

    def run_without_dvc(cmd, *args, **kwargs):
        if "dvc" in cmd:  # only `dvc exp show` is left: the table is not needed here
            return subprocess.CompletedProcess(cmd, 1, "", "not a DVC repository")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(ab, "get_run_logger", lambda: logging.getLogger("test-ablation"))
    monkeypatch.setattr(ab, "run_logged", lambda cmd, cwd, log: commands.append(list(cmd)) or "")
    monkeypatch.setattr(ab, "experiments", lambda _repo: set(existing))
    monkeypatch.setattr(ab, "dvc_experiment", PlainTask())
    monkeypatch.setattr(ab, "create_markdown_artifact", lambda **kwargs: None)
    monkeypatch.setattr(ab.subprocess, "run", run_without_dvc)

    def run(grid, scale, targets, already=()):
        commands.clear()
        options.clear()
        existing.clear()
        existing.update(already)
        results = ab.ablation.fn(grid=grid, scale=scale, targets=targets, project=str(repo))
        return results, list(commands), list(options)

    run.repo = repo
    return run


def test_ablation_runs_each_combination_as_one_experiment_with_the_grid_over_the_scale(recorded_ablation):
    from flows.ablation import baseline

    grid = {"runs.rin_fmnist.train.steps": [30, 40], "runs.rin_fmnist.train.lr": [0.001]}
    results, commands, options = recorded_ablation(grid, "smoke", ["train@rin_fmnist"])
    combos = [{"runs.rin_fmnist.train.steps": 30, "runs.rin_fmnist.train.lr": 0.001},
              {"runs.rin_fmnist.train.steps": 40, "runs.rin_fmnist.train.lr": 0.001}]
    base = baseline(recorded_ablation.repo)
    names = [experiment_name("smoke", c, base) for c in combos]
    assert [(r["name"], r["overrides"]) for r in results] == list(zip(names, combos))
    assert len(commands) == 2 and [o["refresh_cache"] for o in options] == [True, True]
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for cmd, name, combo in zip(commands, names, combos):
        exp = cmd[cmd.index("exp"):]
        assert exp[:5] == ["exp", "run", "--temp", "-n", name] and exp[-1] == "train@rin_fmnist", exp
        params = parse_params(apply_overrides(raw, parse_set_args(exp[5:-1])))  # what the experiment runs with
        run = params.run("rin_fmnist")
        assert run.train.steps == combo["runs.rin_fmnist.train.steps"]  # the grid's value, over smoke's 20
        assert run.train.lr == 0.001
        assert run.model.preset == "rin_tiny" and run.sample.num_samples == 64  # smoke scale shrank the run
        assert params.run("unet_fmnist").train.steps == 20  # ...and every other run

    again, commands, options = recorded_ablation(grid, "smoke", ["train@rin_fmnist"], already={names[0]})
    assert [o["refresh_cache"] for o in options] == [False, True]  # a finished combination is a cache hit
    assert len(commands) == 1 and names[1] in commands[0] and again[0]["seconds"] == 0.0


def test_ablation_at_cpu_scale_sets_only_the_grid(recorded_ablation):
    results, commands, _ = recorded_ablation({"runs.rin_fmnist.train.lr": [0.003]}, "cpu", [])
    (cmd,) = commands
    exp = cmd[cmd.index("exp"):]
    assert parse_set_args(exp[5:]) == {"runs.rin_fmnist.train.lr": 0.003}  # no targets: the whole pipeline
    assert results[0]["name"].startswith("cpu-lr0.003-")
    with pytest.raises(OverrideError, match="use scale cpu"):  # experiments run on the pipeline's sections only
        recorded_ablation({"runs.rin_fmnist.train.lr": [0.003]}, "paper", [])


@pytest.mark.parametrize(
    ("code", "output", "kind"),
    [
        (-9, "", InfrastructureError),  # the dvc process itself was killed
        (255, "ERROR: failed to reproduce 'train@r': failed to run: python x, exited with -9", InfrastructureError),
        (255, "failed to run: python x, exited with 137", InfrastructureError),  # a shell's report of SIGKILL
        (255, "ERROR: Unable to acquire lock. Most likely another DVC process is running", InfrastructureError),
        (
            255,
            "botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL",
            InfrastructureError,
        ),
        (255, "failed to run: python -m diffusion.cli train r, exited with 2", StageError),  # a config error
        (255, "failed to run: python x, exited with 1\nValueError: bad", StageError),  # a bug
        (1, "ERROR: 'dvc.yaml' is invalid", StageError),
    ],
)
def test_failures_are_classified(code, output, kind):
    assert classify(code, output) is kind


def test_concurrent_stages_share_the_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert auto_parallel(2) == 1 and auto_parallel(3) == 1 and auto_parallel(4) == 2
    assert thread_env(1, cpus=2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert thread_env(2, cpus=2)["OMP_NUM_THREADS"] == "1"
    assert thread_env(4, cpus=2)["OMP_NUM_THREADS"] == "1"  # never zero
    assert thread_env(2, cpus=64)["OMP_NUM_THREADS"] == "32"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_env(2, cpus=64) == {}  # the caller's choice wins


def test_a_negative_parallel_is_refused_naming_the_parameter(tmp_path):
    from flows.tasks import run_stages

    with pytest.raises(ValueError, match="parallel must be .* got -1"):
        run_stages(tmp_path, [], tmp_path, parallel=-1)


# Flows against a real Prefect server, on the toy project.


def test_flow_runs_the_graph_and_caches_what_dvc_calls_current(prefect_server, toy_project, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    state, states = run_table2(toy_project)
    assert state.is_completed()
    stages = stage_states(states)
    assert stages == dict.fromkeys(["prep", "train@a", "train@b", "evaluate@a", "evaluate@b", "report"], "Completed")
    threads = json.loads((toy_project / "outputs/a/train/log.json").read_text())["threads"]
    assert threads == str(max(1, available_cpus() // auto_parallel()))  # each stage got its share of the CPUs
    assert (toy_project / "outputs/report/report.md").read_text() == "| a | 3 |\n| b | 6 |\n"

    _, states = run_table2(toy_project)  # nothing changed: every stage is a cache hit, nothing runs
    assert set(stage_states(states).values()) == {"Cached"}

    params = yaml.safe_load((toy_project / "params.yaml").read_text())
    params["runs"]["b"]["n"] = 5
    (toy_project / "params.yaml").write_text(yaml.safe_dump(params))
    (toy_project / "outputs/a/train/model.json").unlink()  # DVC: train@a is stale although its inputs are not
    _, states = run_table2(toy_project)
    expected = {"prep": "Cached", "train@a": "Completed", "evaluate@a": "Cached", "train@b": "Completed",
                "evaluate@b": "Completed", "report": "Completed"}  # fmt: skip
    assert stage_states(states) == expected
    assert (toy_project / "outputs/report/report.md").read_text() == "| a | 3 |\n| b | 15 |\n"


def test_launcher_wraps_train_stages_and_dvc_commits_them(prefect_server, toy_project):
    state, states = run_table2(toy_project, launcher=f"env TOY_LAUNCHER=yes {PY}")
    assert state.is_completed() and set(stage_states(states).values()) == {"Completed"}
    for run in ("a", "b"):  # train ran under the launcher; evaluate (not a launched stage) through dvc repro
        assert json.loads((toy_project / f"outputs/{run}/train/log.json").read_text())["launcher"] == "yes"
    status = subprocess.run([PY, "-m", "dvc", "status", "--json"], cwd=toy_project, capture_output=True, text=True)
    assert json.loads(status.stdout) == {}  # `dvc commit` recorded the launched stages in dvc.lock
    _, states = run_table2(toy_project)  # no launcher now: same cache keys, same DVC state
    assert set(stage_states(states).values()) == {"Cached"}


def test_stage_errors_fail_at_once_and_killed_stages_are_retried(prefect_server, toy_project):
    from prefect import flow

    from flows.stages import dvc_cmd, run_logged
    from flows.tasks import dvc_stage

    params = yaml.safe_load((toy_project / "params.yaml").read_text())
    params["runs"]["a"]["fail"], params["runs"]["b"]["fail"] = "config", "signal"
    (toy_project / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(dvc_cmd("repro", "prep"), cwd=toy_project, check=True, capture_output=True)

    @flow(name="retry-probe")
    def probe() -> dict:
        task = dvc_stage.with_options(retry_delay_seconds=0, result_storage=toy_project / ".results")
        out = {}
        for stage in ("train@a", "train@b"):
            out[stage] = task(str(toy_project), stage, f"probe-{stage}-{time.time()}", return_state=True).name
        return out

    state = probe(return_state=True)
    assert state.result() == {"train@a": "Failed", "train@b": "Completed"}
    states = task_states(state.state_details.flow_run_id)
    assert states["train@a"] == ("Failed", 1)  # exit status 2: a config error is not retried
    assert states["train@b"] == ("Completed", 2)  # SIGKILL once: retried, then done
    with pytest.raises(StageError, match="exited with 2"):
        run_logged(dvc_cmd("repro", "--single-item", "train@a"), toy_project, __import__("logging").getLogger())


def test_killed_flow_reruns_from_its_cache_and_checkpoints(prefect_server, toy_project):
    overrides = {"runs.a.steps": 60, "runs.a.sleep": 0.2}  # extra overrides: a derived workspace, .flows/workspaces
    cmd = [PY, "-m", "flows.table2", "--scale", "cpu", "--parallel", "1", "--project", str(toy_project),
           "--overrides", json.dumps(overrides)]  # fmt: skip
    flow = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = toy_project / ".flows" / "workspaces"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(ckpts.glob("*/outputs/a/train/ckpt/00005.json")):
        time.sleep(0.1)
    flow.send_signal(signal.SIGKILL)  # the flow process alone; its supervisors take the stage down with it
    flow.wait()
    (workspace,) = ckpts.iterdir()
    assert not (workspace / "outputs/a/train/model.json").exists(), "train@a finished before it could be killed"
    time.sleep(1.0)
    assert not processes_running("toy.py"), "a stage outlived the killed flow"

    state, states = run_table2(toy_project, overrides=overrides, parallel=1)
    assert state.is_completed()
    stages = stage_states(states)
    assert stages["prep"] == "Cached" and stages["train@a"] == "Completed"
    assert json.loads((workspace / "outputs/a/train/log.json").read_text())["resumed_from"] >= 5
    assert json.loads((workspace / "outputs/a/train/model.json").read_text())["steps"] == 60
    assert not (toy_project / "outputs").exists()  # the repository's own outputs were never touched


def test_served_deployment_runs_from_the_cli(prefect_server, toy_project):
    serve = subprocess.Popen([PY, "-m", "flows.deploy", "serve"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        subprocess.run([PY, "-m", "flows.deploy", "wait", "reproduce-table2/cpu"], cwd=REPO, check=True, timeout=150)
        project = f"project={json.dumps(str(toy_project))}"
        run = subprocess.run(
            [PREFECT, "deployment", "run", "reproduce-table2/cpu", "--param", project, "--watch"],
            cwd=REPO, capture_output=True, text=True, timeout=330,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Flow run finished successfully in 'Completed'" in run.stdout
        assert (toy_project / "outputs/report/report.md").exists()
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)


# This repository's pipeline at smoke scale: the default run's chain in the default suite, the whole graph (slow).
# Missing data or weights fail these tests (tests/helpers.py): a skip would pass on the machine that lacks them.
needs_data = pytest.mark.usefixtures("fashion_mnist", "fid_inception", "i3d_weights")
DEFAULT_CHAIN = ["shard@fashion_mnist", "train@rin_fmnist", "sample@rin_fmnist", "refstats@fashion_mnist",
                 "evaluate@rin_fmnist"]  # fmt: skip


def env_with_venv() -> dict[str, str]:
    return os.environ | {"PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def working_tree_copy(root: Path) -> Path:
    """This checkout's tracked files as they are on disk (edits included, outputs/ and caches not) in a fresh git
    repository at `root`, its params.yaml shrunk to smoke scale (flows/scale.py); returns root."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, smoke_overrides(parse_params(raw)))))
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "smoke"]):  # dvclive wants a commit
        subprocess.run(["git", *cmd], cwd=root, env=env, check=True)
    return root


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "dvc", *args], cwd=root, env=env_with_venv(), capture_output=True, text=True)


def dvc_status(root: Path, *targets: str) -> dict:
    """`dvc status --json` of the targets and everything upstream of them ({} when all are up to date)."""
    proc = dvc(root, "status", "--json", *(["--with-deps", *targets] if targets else []))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout or "{}")


@pytest.mark.timeout(600)  # ~1 min on an idle 2-core machine
@pytest.mark.usefixtures("fashion_mnist", "fid_inception")
def test_smoke_dvc_repro_of_the_default_run_then_dvc_status_is_clean(tmp_path):
    """Real DVC on the real dvc.yaml: `dvc repro evaluate@rin_fmnist` at smoke scale runs shard -> train -> sample
    (-> refstats) -> evaluate, records them in dvc.lock, and `dvc status` then calls them up to date; a changed
    sampler setting makes exactly sample and evaluate stale again. (The report stage reads every run's outputs, so
    the whole graph through the report is the slow test below.)"""
    root = working_tree_copy(tmp_path / "repo")
    proc = dvc(root, "repro", "evaluate@rin_fmnist")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage '")]
    assert sorted(ran) == sorted(DEFAULT_CHAIN)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]  # the committed lock, these five re-recorded
    assert lock["train@rin_fmnist"]["params"]["params.yaml"]["runs.rin_fmnist.train"]["steps"] == 20
    (out,) = lock["evaluate@rin_fmnist"]["outs"]
    assert out["md5"] == hashlib.md5((root / "outputs/rin_fmnist/eval/metrics.json").read_bytes()).hexdigest()
    train = json.loads((root / "outputs/rin_fmnist/train/metrics.json").read_text())
    assert train["steps"] == 20 and train["images_seen"] == 20 * 16 and math.isfinite(train["final_loss"])
    with np.load(root / "outputs/rin_fmnist/samples/samples.npz") as samples:
        assert samples["arr_0"].shape == (64, 32, 32, 1) and samples["arr_0"].dtype == np.uint8
    metrics = json.loads((root / "outputs/rin_fmnist/eval/metrics.json").read_text())
    assert metrics["num_samples"] == 64 and metrics["num_reference"] == 64 and math.isfinite(metrics["fid"])

    assert dvc_status(root, "evaluate@rin_fmnist") == {}
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["runs"]["rin_fmnist"]["sample"]["steps"] = 9
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    assert sorted(dvc_status(root, "evaluate@rin_fmnist")) == ["evaluate@rin_fmnist", "sample@rin_fmnist"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on an idle 2-core machine; more when it is shared
@needs_data
def test_smoke_dvc_repro_end_to_end(tmp_path):
    root = working_tree_copy(tmp_path / "repo")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    proc = dvc(root, "repro")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run, entry in raw["runs"].items():
        n = 16 if raw["datasets"][entry["dataset"]]["frames"] else 64  # clips (FVD) or images (FID)
        metrics = json.loads((root / f"outputs/{run}/eval/metrics.json").read_text())
        assert metrics["num_samples"] == n and metrics["num_reference"] == n
    assert "rin_fmnist" in (root / "outputs/report/report.md").read_text()
    assert dvc_status(root) == {}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on an idle 2-core machine; more when it is shared
@needs_data
def test_smoke_table2_deployment_then_kill_and_rerun(prefect_server, clone):
    serve = subprocess.Popen([PY, "-m", "flows.deploy", "serve"], cwd=clone, env=env_with_venv(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        subprocess.run([PY, "-m", "flows.deploy", "wait", "reproduce-table2/smoke"], cwd=clone, check=True)
        run = subprocess.run([PREFECT, "deployment", "run", "reproduce-table2/smoke", "--watch"], cwd=clone,
                             env=env_with_venv(), capture_output=True, text=True, timeout=1500)  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
    smoke = clone / ".flows/workspaces/smoke"
    assert "rin_fmnist" in (smoke / "outputs/report/report.md").read_text()
    assert not (clone / "outputs").exists()

    overrides = {"runs.rin_fmnist.train.steps": 100, "runs.rin_fmnist.train.checkpoint_every": 10}
    cmd = [PY, "-m", "flows.table2", "--scale", "smoke", "--overrides", json.dumps(overrides)]
    flow = subprocess.Popen(cmd, cwd=clone, env=env_with_venv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not list(clone.glob(".flows/workspaces/smoke-*/outputs/*/train/checkpoints/"
                                                               "step-00000020")):  # fmt: skip
        time.sleep(0.5)
    flow.send_signal(signal.SIGKILL)
    flow.wait()
    (workspace,) = clone.glob(".flows/workspaces/smoke-*")
    assert not (workspace / "outputs/rin_fmnist/train/model.safetensors").exists(), "finished before the kill"
    from flows.table2 import reproduce_table2

    state = reproduce_table2(scale="smoke", overrides=overrides, project=str(clone), return_state=True)
    stages = stage_states(task_states(state.state_details.flow_run_id))
    assert stages["shard@fashion_mnist"] == "Cached" and stages["train@rin_fmnist"] == "Completed"
    log = json.loads((workspace / "outputs/rin_fmnist/train/train_log.json").read_text())
    assert log["resumed_from"] >= 20


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on an idle 2-core machine; more when it is shared
@needs_data
def test_smoke_ablation_is_listed_by_dvc_exp_show(prefect_server, clone):
    from flows.ablation import ablation

    grid = {"runs.rin_fmnist.train.lr": [0.001, 0.003]}
    results = ablation(grid=grid, scale="smoke", targets=["train@rin_fmnist"], project=str(clone))
    shown = subprocess.run([PY, "-m", "dvc", "exp", "show", "--json"], cwd=clone, env=env_with_venv(),
                           capture_output=True, text=True, check=True)  # fmt: skip
    exps = {
        r["name"]: r["data"] for c in json.loads(shown.stdout) for e in c.get("experiments") or [] for r in e["revs"]
    }
    for result, lr in zip(results, grid["runs.rin_fmnist.train.lr"]):
        data = exps[result["name"]]
        assert data["params"]["params.yaml"]["data"]["runs"]["rin_fmnist"]["train"]["lr"] == lr
        assert "final_loss" in json.dumps(data["metrics"]["outputs/rin_fmnist/train/metrics.json"])
    again = ablation(grid=grid, scale="smoke", targets=["train@rin_fmnist"], project=str(clone), return_state=True)
    assert {s for s, _ in task_states(again.state_details.flow_run_id).values()} == {"Cached"}


def test_paper_scale_prints_the_plan_of_its_runs(tmp_path):
    from flows.table2 import plan_lines

    lines = plan_lines(REPO, ["rin_fmnist"])
    assert lines[0].startswith("runs.rin_fmnist:") and any("PFLOP" in line for line in lines)
    (tmp_path / "params.yaml").write_text("stages: {}\n")
    assert plan_lines(tmp_path, ["x"])[0].startswith("no compute plan:")
