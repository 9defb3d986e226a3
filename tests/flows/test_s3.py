"""S3 through moto's standalone server on 127.0.0.1 (conftest.s3_endpoint): sha256-carrying uploads that are verified,
downloads that refuse a corrupt object, retries that carry an upload over a moment of S3 hanging up, a bounded and clear
failure after 4 attempts when it never answers (no credential in it, no local file touched), DVC push / pull into a
fresh clone, and a flow's results and artifacts on S3."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from flows.storage import (
    S3Location,
    StorageError,
    download_file,
    endpoint_url,
    scrub,
    upload_file,
    verify_object,
)
from tests.helpers import TcpProxy

PY = sys.executable
SECRET = "wJalrXUtnFEMI-not-a-real-secret-K7MDENG"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git_env() -> dict[str, str]:
    names = {k: "t" for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME")}
    return os.environ | names | {"GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}


def sh(*cmd: str, cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=git_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_upload_carries_its_sha256_and_download_refuses_a_corrupt_object(s3_bucket, tmp_path):
    loc = S3Location.parse(f"{s3_bucket}/prefix", endpoint_url())
    src = tmp_path / "ema.safetensors"
    src.write_bytes(os.urandom(300_000))
    up = upload_file(loc, src, loc.key("run/ema.safetensors"))
    assert (up.key, up.sha256, up.size) == ("prefix/run/ema.safetensors", sha256(src), 300_000)
    head = boto3.client("s3").head_object(Bucket=loc.bucket, Key=up.key, ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == up.sha256
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(up.sha256)).decode()  # S3 checked it on arrival
    assert download_file(loc, up.key, tmp_path / "back").read_bytes() == src.read_bytes()

    boto3.client("s3").put_object(Bucket=loc.bucket, Key=up.key, Body=b"garbage", Metadata={"sha256": up.sha256})
    with pytest.raises(StorageError, match="does not match the local file"):
        verify_object(loc, up.key, up.sha256, up.size)
    keep = tmp_path / "keep"
    keep.write_bytes(b"the good copy")
    with pytest.raises(StorageError, match="corrupt"):
        download_file(loc, up.key, keep)
    assert keep.read_bytes() == b"the good copy" and not list(tmp_path.glob(".keep*"))  # no partial file left


class FlakyProxy(TcpProxy):
    """The first `drop` connections (all, with drop=None) are read and closed without an answer (S3 gone for a
    moment), the later ones are forwarded both ways."""

    def __init__(self, upstream: tuple[str, int], drop: int | None):
        self.drop = drop
        super().__init__(upstream)

    def handle(self, client: socket.socket, n: int) -> None:
        self._hang_up(client) if self.drop is None or n <= self.drop else self._forward(client)

    @staticmethod
    def _hang_up(client: socket.socket) -> None:
        try:
            client.recv(65536)
        except OSError:
            pass
        client.close()

    def _forward(self, client: socket.socket) -> None:
        server = socket.create_connection(self.upstream)

        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=copy, args=(server, client), daemon=True).start()
        copy(client, server)


def upstream(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    return host, int(port)


def test_s3_going_away_for_a_moment_is_retried(s3_bucket, s3_endpoint, tmp_path):
    """The first two connections are hung up on: the upload still lands, on the third attempt."""
    src = tmp_path / "metrics.json"
    src.write_text('{"fid": 3.1}')
    proxy = FlakyProxy(upstream(s3_endpoint), drop=2)
    try:
        loc = S3Location.parse(f"{s3_bucket}/p", proxy.endpoint)
        up = upload_file(loc, src, loc.key("metrics.json"))
    finally:
        proxy.close()
    assert proxy.connections >= 3
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=loc.bucket, Key=up.key)["Body"].read()
    assert body == src.read_bytes()


def test_unreachable_endpoint_gives_a_bounded_clear_error_without_credentials(tmp_path, monkeypatch, s3_endpoint):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    proxy = FlakyProxy(upstream(s3_endpoint), drop=None)  # every connection hung up on
    loc = S3Location.parse("s3://artifacts/p", proxy.endpoint)
    report = tmp_path / "report.md"
    report.write_text("| FID | 3.1 |\n")
    before = (sha256(report), report.stat().st_mtime_ns)
    start = time.monotonic()
    try:
        with pytest.raises(StorageError) as err:
            upload_file(loc, report, loc.key("report.md"))
    finally:
        proxy.close()
    assert time.monotonic() - start < 60  # bounded retries with backoff, then give up
    assert proxy.connections == 4  # the README's "4 attempts with backoff": one try and three retries
    message = str(err.value)
    assert proxy.endpoint in message and "unreachable after 4 attempts" in message and "Fix:" in message
    assert SECRET not in message and "AKIAEXAMPLEKEYID0001" not in message and err.value.transient
    assert (sha256(report), report.stat().st_mtime_ns) == before


def test_storage_check_names_the_endpoint_and_the_fix(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = os.environ | {"RINMEME_S3_URL": "s3://artifacts/p", "AWS_ENDPOINT_URL": endpoint}
    cli = subprocess.run([PY, "-m", "flows.storage", "check"], env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and endpoint in cli.stderr and "unreachable after 4 attempts" in cli.stderr
    assert "Fix:" in cli.stderr and SECRET not in cli.stdout + cli.stderr


def test_scrub_masks_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = f"secret {SECRET}; aws_secret_access_key = abc/def+ghi; url?X-Amz-Signature=0123abcd&x=1"
    assert scrub(text) == "secret ***; aws_secret_access_key = ***; url?X-Amz-Signature=***&x=1"


def test_bad_s3_url_is_named():
    with pytest.raises(StorageError, match="RINMEME_S3_URL='http://x' is not an s3://bucket"):
        S3Location.parse("http://x")
    assert S3Location.from_env({}) is None
    loc = S3Location.from_env({"RINMEME_S3_URL": "s3://my-bucket/a/b/", "AWS_ENDPOINT_URL": "http://minio:9000"})
    assert (loc.bucket, loc.prefix, loc.endpoint, loc.url("x")) == ("my-bucket", "a/b", "http://minio:9000",
                                                                   "s3://my-bucket/a/b/x")  # fmt: skip


def test_flow_results_artifacts_and_dvc_remote_on_s3_then_a_fresh_clone(
    prefect_server, toy_project, s3_bucket, tmp_path, monkeypatch
):
    from flows.table2 import reproduce_table2
    from tests.flows.test_flows import stage_states, task_states

    monkeypatch.setenv("RINMEME_S3_URL", f"{s3_bucket}/proj")
    remote = ("remote", "add", "-d", "--local", "s3", f"{s3_bucket}/proj/dvc")  # the README's command
    sh(PY, "-m", "dvc", *remote, cwd=toy_project)
    state = reproduce_table2(scale="cpu", project=str(toy_project), return_state=True)
    assert state.is_completed()
    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="proj/")["Contents"]}
    assert any(k.startswith("proj/prefect-results/") for k in keys)  # task results: S3, not the local folder
    assert not (toy_project / ".flows" / "results").exists()
    assert any(k.startswith("proj/dvc/files/md5/") for k in keys)  # the flow pushed to the default DVC remote
    report = "proj/artifacts/repo/outputs/report/report.md"
    head = s3.head_object(Bucket=bucket, Key=report)
    assert head["Metadata"]["sha256"] == sha256(toy_project / "outputs/report/report.md")

    sh("git", "add", "dvc.lock", "outputs", cwd=toy_project)  # what a user commits after a run: lock and metrics
    sh("git", "commit", "-qm", "results", cwd=toy_project)
    fresh = tmp_path / "fresh"
    sh("git", "clone", "-q", str(toy_project), str(fresh), cwd=tmp_path)
    sh(PY, "-m", "dvc", *remote, cwd=fresh)
    sh(PY, "-m", "dvc", "pull", cwd=fresh)
    for out in ("data/prep.json", "outputs/a/train/model.json", "outputs/b/train/model.json"):
        assert (fresh / out).read_bytes() == (toy_project / out).read_bytes()

    again = reproduce_table2(scale="cpu", project=str(fresh), return_state=True)
    stages = stage_states(task_states(again.state_details.flow_run_id))
    assert stages["prep"] == "Cached"  # up to date after the pull, and its result is found on S3
    assert stages["report"] == "Completed"  # its output is not in DVC's cache (cache: false): DVC says run it
