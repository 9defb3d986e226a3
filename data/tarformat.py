"""The shard format: deterministic, atomically written WebDataset tars of PNG samples, their per-split manifest, a
fast ustar reader, and DataError.

Layout: <out>/<split>/shard-000000.tar ... and <out>/<split>/manifest.json (counts, class histogram, sha256s).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffusion.config import DatasetConfig
from diffusion.errors import UserError
from diffusion.io import FILE_MODE, atomic_write, fsync_dir, sha256_file

MANIFEST = "manifest.json"
FORMAT = "rin-meme-shards/1"
SHARD_NAME = "shard-{:06d}.tar"
IMAGE_EXT = "png"  # (H, W, C) uint8, one PNG
CLIP_EXT = "frames.png"  # (T, H, W, C) uint8 as one (T*H, W, C) PNG film strip: lossless and compressed
PNG_LEVEL = 6  # zlib level; fixed so the bytes depend on the pixels only


class DataError(UserError, ValueError):
    """Unusable data: a corrupt input, shard or sample; the message names it (shard and key) and the fix."""


class ManifestMismatch(DataError):
    """A shard whose bytes do not hash to the manifest's sha256: it is refused whatever skip_corrupt says."""


def encode_png(array: np.ndarray) -> bytes:
    """(H, W, C) uint8 with C in {1, 3} -> PNG bytes; no metadata, fixed zlib level, so deterministic."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1|3) uint8 array, got {array.dtype} {array.shape}")
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_LEVEL, optimize=False)
    return buf.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8, checking the channel count; raises on a corrupt or truncated file."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        mode = {1: "L", 3: "RGB"}[channels]
        if image.mode != mode:
            raise ValueError(f"PNG has mode {image.mode}, the manifest says {channels} channel(s) ({mode})")
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def sample_shape(cfg: DatasetConfig) -> list[int]:
    """The tensor shape of one sample of a dataset's shards: (C, H, W) for images, (C, T, H, W) for video."""
    spatial = [cfg.resolution, cfg.resolution]
    return [cfg.channels, cfg.frames, *spatial] if cfg.frames else [cfg.channels, *spatial]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes samples into <folder>/shard-NNNNNN.tar, `shard_size` per tar, each tar atomically and reproducibly."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.shards: list[dict[str, Any]] = []  # name, num_samples, bytes, sha256 of each finished shard
        self._tar: tarfile.TarFile | None = None
        self._tmp = ""
        self._count = 0

    def add(self, key: str, payload: dict[str, bytes]) -> None:
        """One sample: `payload` maps extension (e.g. 'png', 'cls', 'json') to bytes; members in sorted order."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"shard key {key!r} must be non-empty without '.' or '/' (WebDataset splits at a dot)")
        if self._tar is None:
            self._open()
        for ext in sorted(payload):
            data = payload[ext]
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._count += 1
        if self._count == self.shard_size:
            self._close_shard()

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = SHARD_NAME.format(len(self.shards))
        fd, self._tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600 files
        self._tar = tarfile.open(fileobj=os.fdopen(fd, "wb"), mode="w", format=tarfile.USTAR_FORMAT)

    def _close_shard(self) -> None:
        assert self._tar is not None
        fh = self._tar.fileobj
        self._tar.close()
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        path = self.folder / SHARD_NAME.format(len(self.shards))
        digest = sha256_file(self._tmp)
        os.replace(self._tmp, path)
        self.shards.append({"name": path.name, "num_samples": self._count, "bytes": path.stat().st_size,
                            "sha256": digest})
        self._tar, self._tmp, self._count = None, "", 0

    def close(self) -> list[dict[str, Any]]:
        """Finish the last (partial) shard and fsync the folder; returns the shard records for the manifest."""
        if self._tar is not None:
            self._close_shard()
        if self.shards:
            fsync_dir(self.folder)
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (after an error); finished shards stay, without a manifest."""
        if self._tar is not None:
            self._tar.fileobj.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._tar = None


def remove_temporaries(folder: Path) -> None:
    """Delete the hidden temporary files a killed writer left behind (never shards or a manifest)."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Atomically write the manifest, then delete shard files it does not list (left by an earlier, larger run)."""
    atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    listed = {s["name"] for s in manifest["shards"]}
    for stale in folder.glob("shard-*.tar"):
        if stale.name not in listed:
            stale.unlink()


class _NotPlainUstar(Exception):
    """The archive uses pax or GNU extension headers: read it with tarfile instead."""


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 numbers
        raise _NotPlainUstar
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    """The header checksum: the byte sum with the checksum field read as spaces (some old tars sum signed bytes)."""
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 256 + sum(header[156:])
    if unsigned == stored:
        return True
    high = sum(1 for b in header[:148] + header[156:] if b > 127)
    return unsigned - 256 * high == stored


def ustar_index(data: bytes) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, start, end) of each regular file of an in-memory ustar archive, and why reading stopped early
    (None at a clean end-of-archive block). Parses headers only, which is several times faster than tarfile."""
    members: list[tuple[str, int, int]] = []
    offset, size = 0, len(data)
    while True:
        if offset + 512 > size:
            return members, f"ends at byte {size} without the end-of-archive block"
        header = data[offset : offset + 512]
        if header.count(0) == 512:
            return members, None
        if header[156:157] in (b"x", b"g", b"L", b"K"):
            raise _NotPlainUstar
        if not _checksum_ok(header):
            return members, f"corrupt tar header at byte {offset}"
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        name = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
        start = offset + 512
        end = start + _octal(header[124:136])
        if end > size:
            return members, f"member {name} ends at byte {end}, past the end of the file ({size} bytes)"
        if header[156:157] in (b"0", b"\0"):
            members.append((name, start, end))
        offset = start + (end - start + 511) // 512 * 512


def _member_key(name: str) -> tuple[str, str]:
    key, _, ext = name.rpartition("/")[2].partition(".")
    return key, ext


def iter_tar_samples(data: bytes, url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard's bytes: {'__key__', '__url__', ext: bytes, ...}, grouped by key (up to the first dot).

    A truncated or corrupt tar yields its complete samples, then raises DataError naming the shard and the key.
    """
    try:
        members, error = ustar_index(data)
    except _NotPlainUstar:
        yield from _tarfile_samples(data, url)
        return
    sample: dict[str, Any] = {}
    for name, start, end in members:
        key, ext = _member_key(name)
        if sample and key != sample["__key__"]:
            yield sample
            sample = {}
        sample.setdefault("__key__", key)
        sample["__url__"] = url
        sample[ext] = data[start:end]
    if error is not None:
        at = sample.get("__key__", "(first sample)")
        raise DataError(f"shard {url}: truncated or corrupt tar at key {at!r} ({error}); "
                        "re-write it with `python -m diffusion.cli shard` or restore it (`dvc pull`)")
    if sample:
        yield sample


def _tarfile_samples(data: bytes, url: str) -> Iterator[dict[str, Any]]:
    """iter_tar_samples through tarfile, for archives with pax / GNU headers (e.g. written by other tools)."""
    sample: dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _member_key(member.name)
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample["__url__"] = url
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"shard {url}: truncated or corrupt tar at key {sample.get('__key__')!r} ({err}); "
                        "re-write it with `python -m diffusion.cli shard` or restore it (`dvc pull`)") from err
    if sample:
        yield sample
