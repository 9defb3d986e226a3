"""Faults around the flows, kept as tests: the Prefect server killed and restarted while a stage runs (the flow run
finishes, or its re-run resumes from the cache and the stage's checkpoints), and S3 failing in the middle of an upload
(no half object is ever there to be taken as done)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, start_prefect_server, stop_process_group
from tests.helpers import TcpProxy

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


@pytest.mark.slow
def test_the_prefect_server_killed_and_restarted_mid_stage_loses_nothing(tmp_path, toy_project):
    home, port = tmp_path / "prefect-home", free_port()
    home.mkdir()
    env = os.environ | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(home),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    overrides = {"runs.a.steps": 60, "runs.a.sleep": 0.2}
    cmd = [PY, "-m", "flows.table2", "--scale", "cpu", "--parallel", "1", "--project", str(toy_project),
           "--overrides", json.dumps(overrides)]
    server = start_prefect_server(home, port)
    flow = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = toy_project / ".flows" / "workspaces"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(ckpts.glob("*/outputs/a/train/ckpt/00005.json")):
        time.sleep(0.1)
    stop_process_group(server, signal.SIGKILL)  # the server dies in the middle of train@a
    time.sleep(3)
    server = start_prefect_server(home, port)  # and comes back on the same port and database
    try:
        first, _ = flow.communicate(timeout=600)
        (workspace,) = ckpts.iterdir()
        log = workspace / "outputs/a/train/log.json"
        if flow.returncode != 0:  # the run did not survive the outage: its re-run must resume, not start over
            again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
            assert json.loads(log.read_text())["resumed_from"] >= 5
        assert json.loads((workspace / "outputs/a/train/model.json").read_text())["steps"] == 60
        assert (workspace / "outputs/report/report.md").exists()
    finally:
        stop_process_group(server)


class CuttingProxy(TcpProxy):
    """Forwards the first `cut` bytes of every request and then drops the connection: an upload that fails half
    way, on the wire."""

    def __init__(self, upstream: tuple[str, int], cut: int):
        self.cut = cut
        super().__init__(upstream)

    def handle(self, client: socket.socket, n: int) -> None:
        server = socket.create_connection(self.upstream)
        sent = 0
        try:
            while sent < self.cut:
                data = client.recv(65536)
                if not data:
                    break
                server.sendall(data[: self.cut - sent])
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def test_an_upload_cut_in_the_middle_leaves_no_object(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    import boto3

    from flows.storage import S3Location, StorageError, upload_file

    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(3 << 20))  # 3 MB: one PUT, cut after 1 MB of it
    host, port = s3_endpoint.rsplit("//", 1)[1].split(":")
    proxy = CuttingProxy((host, int(port)), cut=1 << 20)
    try:
        loc = S3Location.parse(f"{s3_bucket}/runs", f"http://127.0.0.1:{proxy.port}")
        with pytest.raises(StorageError):
            upload_file(loc, path, loc.key("weights.bin"))
    finally:
        proxy.close()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    listed = s3.list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"), Prefix="runs/").get("Contents", [])
    assert listed == []  # nothing half-written to find and take as done
    good = S3Location.parse(f"{s3_bucket}/runs", s3_endpoint)
    assert upload_file(good, path, good.key("weights.bin")).size == 3 << 20  # and the retry, once S3 answers, lands
