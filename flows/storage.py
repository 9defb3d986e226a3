"""Artifacts on S3 or any S3 API (MinIO, moto): configured only by the standard AWS variables, AWS_ENDPOINT_URL and
RINMEME_S3_URL=s3://bucket/prefix. Uploads carry their sha256 (object metadata and S3's own SHA256 checksum) and are
verified after; downloads are verified before they replace anything. Credentials never reach a message: `scrub`.

`python -m flows.storage check` says whether the configured bucket is reachable.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion.io import EndpointError, mask_userinfo, publish, s3_endpoint, sha256_file

S3_URL_ENV = "RINMEME_S3_URL"  # s3://bucket/prefix: where artifacts, DVC's remote and Prefect's results go
SECRET_ENVS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
ATTEMPTS = 4  # tries per S3 call, the first included (botocore "standard" retries: backoff with jitter between them)
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
SHA256_META = "sha256"  # x-amz-meta-sha256: hex sha256 of the whole file
MASK = "***"

_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(aws_secret_access_key|aws_session_token|secret_access_key|secretaccesskey|sessiontoken|"
    r"x-amz-security-token|x-amz-signature|x-amz-credential|signature)(\s*[=:]\s*['\"]?)([^\s'\"&,;]+)"
)


def scrub(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with the values of the AWS credential variables and anything shaped like `secret=...` masked."""
    env = os.environ if env is None else env
    for name in SECRET_ENVS:
        value = env.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, MASK)
    return mask_userinfo(_SECRET_ASSIGNMENT.sub(lambda m: m.group(1) + m.group(2) + MASK, text))


class StorageError(RuntimeError):
    """S3 could not be used; the message names the endpoint and the fix. `transient`: worth retrying later."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(scrub(message))
        self.transient = transient


def endpoint_url(env: Mapping[str, str] | None = None) -> str | None:
    """The checked S3 endpoint without credentials (diffusion.io.s3_endpoint); a bad one is a StorageError."""
    try:
        return s3_endpoint(env)
    except EndpointError as err:
        raise StorageError(str(err)) from None


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the bucket's root
    endpoint: str | None  # None: the provider's default endpoint (AWS)

    @classmethod
    def parse(cls, url: str, endpoint: str | None = None) -> S3Location:
        m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(/.*)?", url.strip())
        if not m:
            raise StorageError(
                f"{S3_URL_ENV}={url!r} is not an s3://bucket[/prefix] URL (bucket: 3-63 lowercase "
                "letters, digits, dots or dashes)"
            )
        return cls(m.group(1), (m.group(2) or "").strip("/"), endpoint)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Location | None:
        """The configured location, or None when RINMEME_S3_URL is unset (artifacts stay on local disk)."""
        env = os.environ if env is None else env
        url = env.get(S3_URL_ENV, "").strip()
        return cls.parse(url, endpoint_url(env)) if url else None

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def url(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}".rstrip("/")

    @property
    def where(self) -> str:
        return f"{self.url()} at {self.endpoint or 'the default AWS endpoint'}"


@dataclass(frozen=True)
class Uploaded:
    key: str
    sha256: str
    size: int


def client(loc: S3Location, attempts: int = ATTEMPTS) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": attempts, "mode": "standard"},  # max_attempts would count retries only
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
    )
    return boto3.client("s3", endpoint_url=loc.endpoint, config=config)


def explain(err: Exception, loc: S3Location, action: str, attempts: int = ATTEMPTS) -> StorageError:
    """A StorageError that names the endpoint, what failed and how to fix it (no credentials in it)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    keep = "Local files were not changed."
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"{action}: no AWS credentials for {loc.where}. Fix: export AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (and AWS_DEFAULT_REGION), or unset {S3_URL_ENV} to keep "
            f"artifacts on local disk only. {keep}"
        )
    if isinstance(err, ConnectionError | HTTPClientError):  # refused, timed out, or hung up before answering
        return StorageError(
            f"{action}: S3 endpoint {loc.endpoint or 'of AWS'} unreachable after {attempts} attempts "
            f"({type(err).__name__}). Fix: start the S3 service or correct AWS_ENDPOINT_URL (unset it "
            f"for AWS), check the network, or unset {S3_URL_ENV} to keep artifacts on local disk "
            f"only. {keep}",
            transient=True,
        )
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", "?"))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        missing = code in ("404", "NotFound", "NoSuchKey")
        if code == "NoSuchBucket" or (missing and action.startswith("checking bucket")):
            fix = f"create bucket {loc.bucket!r} there, or correct {S3_URL_ENV}"
        elif missing:
            fix = "the object does not exist: upload it first, or correct the key"
        elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken"):
            fix = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
        else:
            fix = "see the S3 error code above; retry later if the service is degraded"
        return StorageError(
            f"{action}: {loc.where} answered {code} (HTTP {status}). Fix: {fix}. {keep}",
            transient=status >= 500 or code in ("SlowDown", "RequestTimeout"),
        )
    return StorageError(f"{action}: {type(err).__name__}: {err} ({loc.where}). {keep}", transient=True)


def check(loc: S3Location, s3: Any | None = None) -> None:
    """Raise StorageError unless the bucket answers (bounded retries with backoff first)."""
    s3 = s3 or client(loc)
    try:
        s3.head_bucket(Bucket=loc.bucket)
    except Exception as err:
        raise explain(err, loc, f"checking bucket {loc.bucket}") from None


def _b64_sha256(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def verify_object(loc: S3Location, key: str, sha256: str, size: int, s3: Any | None = None) -> None:
    """Check an uploaded object: its size, its sha256 metadata and, when S3 kept a whole-object SHA256, that too."""
    s3 = s3 or client(loc)
    try:
        head = s3.head_object(Bucket=loc.bucket, Key=key, ChecksumMode="ENABLED")
    except Exception as err:
        raise explain(err, loc, f"verifying s3://{loc.bucket}/{key}") from None
    problems = []
    if head.get("ContentLength") != size:
        problems.append(f"size {head.get('ContentLength')} != {size}")
    if head.get("Metadata", {}).get(SHA256_META) != sha256:
        problems.append(f"metadata sha256 {head.get('Metadata', {}).get(SHA256_META)} != {sha256}")
    server = head.get("ChecksumSHA256")
    if server and "-" not in server and server != _b64_sha256(sha256):  # "-N": a multipart (composite) checksum
        problems.append(f"S3 SHA256 {server} != {_b64_sha256(sha256)}")
    if problems:
        raise StorageError(
            f"s3://{loc.bucket}/{key} does not match the local file: {'; '.join(problems)}. Fix: upload "
            "again (the flow's publish task does); the local file was not changed.",
            transient=True,
        )


def upload_file(loc: S3Location, path: Path, key: str, s3: Any | None = None) -> Uploaded:
    """Upload one file with its sha256 in the object's metadata and as S3's checksum, then verify the object."""
    from boto3.s3.transfer import TransferConfig

    s3 = s3 or client(loc)
    digest, size = sha256_file(path), path.stat().st_size
    extra = {"Metadata": {SHA256_META: digest}, "ChecksumAlgorithm": "SHA256"}
    try:
        s3.upload_file(
            str(path),
            loc.bucket,
            key,
            ExtraArgs=extra,
            Config=TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20),
        )
    except Exception as err:
        raise explain(err, loc, f"uploading {path}") from None
    if sha256_file(path) != digest:
        raise StorageError(
            f"{path} changed while it was uploaded to s3://{loc.bucket}/{key}; upload it again once "
            "the stage that writes it has finished",
            transient=True,
        )
    verify_object(loc, key, digest, size, s3)
    return Uploaded(key, digest, size)


def upload_files(loc: S3Location, root: Path, files: Iterable[Path], *parts: str) -> list[Uploaded]:
    """Upload files under `root` to <prefix>/<parts...>/<path relative to root>; one client, every file verified."""
    s3 = client(loc)
    return [upload_file(loc, f, loc.key(*parts, f.relative_to(root).as_posix()), s3) for f in sorted(files)]


def download_file(loc: S3Location, key: str, dest: Path, s3: Any | None = None) -> Path:
    """Download an object next to `dest`, check it against its sha256 metadata, then rename it over `dest`."""
    s3 = s3 or client(loc)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        try:
            head = s3.head_object(Bucket=loc.bucket, Key=key)
            s3.download_file(loc.bucket, key, tmp)
        except Exception as err:
            raise explain(err, loc, f"downloading s3://{loc.bucket}/{key}") from None
        expected = head.get("Metadata", {}).get(SHA256_META)
        actual = sha256_file(tmp)
        if expected and actual != expected:
            raise StorageError(
                f"s3://{loc.bucket}/{key} has sha256 {actual}, its metadata says {expected}: the object "
                f"is corrupt; {dest} was left as it was",
                transient=True,
            )
        return publish(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["check"]:
        print("usage: python -m flows.storage check", file=sys.stderr)
        return 2
    try:
        loc = S3Location.from_env()
        if loc is None:
            print(f"{S3_URL_ENV} is not set: artifacts stay on local disk")
            return 0
        check(loc)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{loc.where}: reachable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
