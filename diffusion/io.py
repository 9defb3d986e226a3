"""Files the pipeline writes and checks: the one atomic write (temp file in the same folder, fsync, rename, fsync of
the folder, ordinary permissions), JSON/text/npz on top of it, sha256 of bytes and files, fingerprints of settings,
and moving stale folders aside instead of deleting them."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffusion.errors import UserError

FILE_MODE = 0o644  # world-readable, like files written with open() under the usual umask (mkstemp makes 0600)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Move a finished temporary file of the same folder over `path`: fsync it, make it world-readable, rename it,
    fsync the folder. For files streamed to disk and checked before they become visible (downloads, weights)."""
    path = Path(path)
    fsync_file(tmp)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write `data` through a temporary file in the same folder and `publish` it: a reader sees the old file or the
    new one, never a part, and a crash leaves at most a hidden `.<name>.*.tmp`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, text.encode())


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """JSON with a final newline, atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def npz_bytes(**arrays: Any) -> bytes:
    """np.savez of the arrays, as bytes (the same bytes np.savez writes to a file)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_npz(path: str | Path, **arrays: Any) -> str:
    """np.savez atomically; returns the sha256 of the bytes written."""
    data = npz_bytes(**arrays)
    atomic_write(path, data)
    return sha256_bytes(data)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """A stable text form of JSON-able data (sorted keys, no spaces), for names and cache keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(blob: Any) -> str:
    """sha256 of JSON-able settings with sorted keys: what a checkpoint or a sample chunk must agree with."""
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # botocore's own variables, S3-specific first


class EndpointError(UserError):
    """An S3 endpoint variable that is not an http(s) URL."""


def s3_endpoint(env: Mapping[str, str] | None = None) -> str | None:
    """The S3 endpoint from the standard variables (None: the provider's default), checked to be an http(s) URL and
    with any user:password@ part removed (credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY only, and
    must not end up in logs or saved blocks)."""
    env = os.environ if env is None else env
    name = next((n for n in ENDPOINT_ENVS if env.get(n)), None)
    if name is None:
        return None
    url = urllib.parse.urlsplit(env[name].strip())
    if url.scheme not in ("http", "https") or not url.hostname:
        shown = env[name] if "@" not in env[name] else "***@" + env[name].rsplit("@", 1)[1]  # no credentials shown
        raise EndpointError(f"{name}={shown!r} is not an http(s) URL; write it with its scheme, e.g. "
                            "http://127.0.0.1:9000 (MinIO) or https://s3.<region>.amazonaws.com")
    netloc = url.hostname + (f":{url.port}" if url.port else "")
    return urllib.parse.urlunsplit((url.scheme, netloc, url.path, url.query, url.fragment))


def mask_userinfo(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host` anywhere in text."""
    return re.sub(r"(://[^/\s:@]*):[^/\s@]*@", r"\1:***@", text)


class Busy(UserError):
    """Another process holds the lock of a folder this process wants to write (e.g. the same run trained twice)."""


@contextlib.contextmanager
def exclusive_lock(folder: Path, what: str):
    """Hold an exclusive lock on <folder>/.lock while writing into folder; a second holder fails at once with Busy
    naming the first's pid (the lock goes with its process, so a killed run never leaves a stale one)."""
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".lock", "a+")  # noqa: SIM115 (held open for the whole block)
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise Busy(f"{folder}: {what} is already running there (pid {holder}); wait for it to finish or stop it "
                       "(it resumes from its checkpoints)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def move_aside(path: Path) -> Path:
    """Rename `path` to <name>.stale-<unix time> beside it (kept, never deleted) and return the new path."""
    aside = path.with_name(f"{path.name}.stale-{int(time.time())}")
    path.rename(aside)
    return aside
