"""Where Prefect persists task results (and so finds cached tasks): <repo>/.flows/results on local disk by default,
or S3 when RINMEME_S3_URL is set, through a saved RemoteFileSystem block that holds the endpoint URL but no
credentials (s3fs reads those from the AWS variables)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from flows.storage import S3Location, check
from flows.workspace import flows_dir

BLOCK_PREFIX = "rin-meme-results"


def s3_block(loc: S3Location) -> str:
    """Save (or update) the RemoteFileSystem block for `loc` and return its slug."""
    from prefect.filesystems import RemoteFileSystem

    basepath = loc.url("prefect-results")
    settings = {"client_kwargs": {"endpoint_url": loc.endpoint}} if loc.endpoint else {}
    name = f"{BLOCK_PREFIX}-{hashlib.sha256(f'{basepath} {loc.endpoint}'.encode()).hexdigest()[:8]}"
    RemoteFileSystem(basepath=basepath, settings=settings).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def result_storage(repo: Path) -> Path | str:
    """A local folder, or the slug of the S3 block after checking that the bucket answers (StorageError if not)."""
    loc = S3Location.from_env()
    if loc is None:
        path = flows_dir(repo) / "results"
        path.mkdir(parents=True, exist_ok=True)
        return path
    check(loc)
    return s3_block(loc)
