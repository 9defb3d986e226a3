"""Shared fixtures: a local S3 (moto's standalone server on 127.0.0.1) for the whole session."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import require_fashion_mnist, require_fid_inception, require_i3d

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def fashion_mnist():
    """Debian's Fashion-MNIST idx folder; a test that asks for it fails (not skips) when it is not installed."""
    return require_fashion_mnist()


@pytest.fixture(scope="session")
def fid_inception():
    """The FID Inception weights (fetched into the cache on a miss); missing, the test fails."""
    return require_fid_inception()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git clone of this repository's HEAD (commit first to test your changes), one per test module."""
    root = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", str(Path(__file__).resolve().parents[1]), str(root)], check=True)
    return root


@pytest.fixture(scope="session")
def i3d_weights():
    """The I3D weights (fetched into the cache on a miss); missing, the test fails."""
    return require_i3d()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server; AWS_* variables (fake credentials, AWS_ENDPOINT_URL) set while it runs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (S3_ENV | {"AWS_ENDPOINT_URL": endpoint}).items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        yield endpoint
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket (name from the test's name) on the session's moto server; returns 's3://<bucket>'."""
    import boto3

    name = "t-" + "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    return f"s3://{name}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_prefect_server(home, port: int):
    """`prefect server start` on 127.0.0.1:port with its SQLite in `home`, healthy (~20-40 s on 2 cores); returns
    the process (its own session: stop it with os.killpg)."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = (Path(home) / "server.log").open("ab")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.read().strip() == b"true":
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"prefect server did not start: {(Path(home) / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def stop_process_group(proc, sig=None) -> None:
    import signal
    import subprocess

    os.killpg(proc.pid, sig or signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for the session (`prefect server start`, SQLite in a temporary PREFECT_HOME): ~20-40 s
    to start on 2 cores, so every flow test shares it. PREFECT_API_URL points at it, for this process (Prefect's
    settings) and for subprocesses (the environment). Returns the API URL."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    proc = start_prefect_server(home, port)
    try:
        with pytest.MonkeyPatch.context() as mp, temporary_settings({PREFECT_API_URL: url, PREFECT_HOME: str(home)}):
            mp.setenv("PREFECT_API_URL", url)
            mp.setenv("PREFECT_HOME", str(home))
            mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            yield url
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for worker in (APILogWorker, EventsWorker):  # deliver queued logs and events while the server is up
                worker.drain_all(timeout=20)
    finally:
        stop_process_group(proc)


TOY_SCRIPT = '''"""A toy pipeline shaped like the real one (prep -> train@run -> evaluate@run -> report), fast.
train writes one checkpoint per step and resumes from the newest; runs.<name>.fail makes it fail on purpose."""
import json, os, sys, time
from pathlib import Path

import yaml

stage, name = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
params = yaml.safe_load(open("params.yaml"))


def write(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


if stage == "prep":
    write("data/prep.json", {"seed": params["prep"]["seed"]})
elif stage == "train":
    run = params["runs"][name]
    if run.get("fail") == "config":
        print(f"error: params.yaml: runs.{name}.fail is set", file=sys.stderr)
        sys.exit(2)
    marker = Path(f"outputs/{name}/killed-once")
    if run.get("fail") == "signal" and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.kill(os.getpid(), 9)
    ckpt = Path(f"outputs/{name}/train/ckpt")
    done = sorted(int(p.stem) for p in ckpt.glob("*.json")) if ckpt.exists() else []
    start = done[-1] if done else 0
    for step in range(start + 1, run["steps"] + 1):
        time.sleep(run.get("sleep", 0.0))
        write(ckpt / f"{step:05d}.json", {"step": step})
        print(f"train {name}: step {step}", flush=True)
    write(f"outputs/{name}/train/model.json", {"steps": run["steps"], "n": run["n"]})
    write(f"outputs/{name}/train/log.json", {"resumed_from": start, "launcher": os.environ.get("TOY_LAUNCHER"),
                                             "threads": os.environ.get("OMP_NUM_THREADS")})
elif stage == "evaluate":
    model = json.loads(Path(f"outputs/{name}/train/model.json").read_text())
    write(f"outputs/{name}/eval/metrics.json", {"score": model["n"] * model["steps"]})
elif stage == "report":
    rows = {r: json.loads(Path(f"outputs/{r}/eval/metrics.json").read_text()) for r in params["runs"]}
    Path("outputs/report").mkdir(parents=True, exist_ok=True)
    Path("outputs/report/report.md").write_text("".join(f"| {r} | {m['score']} |\\n" for r, m in rows.items()))
'''

TOY_DVC_YAML = """stages:
  prep:
    cmd: python toy.py prep
    deps:
      - toy.py
    params:
      - prep
    outs:
      - data/prep.json
  train:
    foreach: ${runs}
    do:
      cmd: python toy.py train ${key}
      deps:
        - toy.py
        - data/prep.json
      params:
        - runs.${key}
      outs:
        - outputs/${key}/train/model.json
        - outputs/${key}/train/log.json:
            cache: false
        - outputs/${key}/train/ckpt:
            persist: true
            cache: false
  evaluate:
    foreach: ${runs}
    do:
      cmd: python toy.py evaluate ${key}
      deps:
        - toy.py
        - outputs/${key}/train/model.json
      metrics:
        - outputs/${key}/eval/metrics.json:
            cache: false
  report:
    cmd: python toy.py report
    deps:
      - toy.py
      - outputs/a/eval/metrics.json
      - outputs/b/eval/metrics.json
    params:
      - runs
    outs:
      - outputs/report:
          cache: false
"""


@pytest.fixture()
def toy_project(tmp_path: os.PathLike[str]) -> os.PathLike[str]:
    """A git + DVC project in a temporary folder whose stages mimic this repository's (prep -> train@{a,b} ->
    evaluate@{a,b} -> report; both runs in rin_table2) and take milliseconds. Returns its path."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(tmp_path) / "toy"
    root.mkdir()
    (root / "toy.py").write_text(TOY_SCRIPT)
    (root / "dvc.yaml").write_text(TOY_DVC_YAML)
    params = {
        "prep": {"seed": 0},
        "runs": {"a": {"n": 1, "steps": 3}, "b": {"n": 2, "steps": 3}},
        "evaluation": {"report": {"a": {"table": "rin_table2"}, "b": {"table": "rin_table2"}}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/data/\n/outputs/**\n!/outputs/**/\n!/outputs/*/eval/metrics.json\n/.flows/\n")
    env = os.environ | {
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "toy"],
    ):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread (two threads spin against each other, and against other jobs, on 2 cores).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")` (tests/conftest.py serves it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
