"""Atomic, pickle-free weights and training checkpoints: safetensors for every tensor, JSON for the rest, a sha256
manifest; loading a run's trained network (an ensemble: its experts') and a latent dataset's autoencoder.

Layout: <dir>/step-000200/{model,ema,optimizer}.safetensors + state.json + manifest.json, and <dir>/latest
naming the newest complete checkpoint. A checkpoint directory appears only once fully written (rename).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion import registry
from diffusion.config import AutoencoderConfig, RunConfig
from diffusion.errors import UserError
from diffusion.io import atomic_write, fsync_dir, fsync_file, sha256_file, write_text

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
AUTOENCODER_FILE = "autoencoder.safetensors"  # a latent dataset's autoencoder, inside its shard folder


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weights file is missing, incomplete, or does not match its manifest."""


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer.state_dict() -> (tensors keyed 'state.<param>.<name>' or 'group.<i>.<name>', JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = value
    groups = []
    for i, group in enumerate(state["param_groups"]):  # e.g. timm's LAMB counts its steps in a group tensor
        plain = {}
        for name, value in group.items():
            if torch.is_tensor(value):
                tensors[f"group.{i}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain[name] = value
        groups.append(plain)
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    groups = [dict(g) for g in rest["param_groups"]]
    for key, value in tensors.items():
        kind, index, name = key.split(".", 2)
        if kind == "group":
            groups[int(index)][name] = value
        else:
            state.setdefault(int(index), {})[name] = value
    for key, value in rest["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": groups}


def save(root: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` under root atomically, point `latest` at it, keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:08d}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    opt_tensors, opt_rest = flatten_optimizer(optimizer.state_dict())
    meta = {"step": str(step)}
    for name, module in (("model", model), ("ema", ema)):
        (tmp / f"{name}.safetensors").write_bytes(safetensors_bytes(module.state_dict(), meta))
    (tmp / "optimizer.safetensors").write_bytes(safetensors_bytes(opt_tensors, meta))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_rest, **(extra or {})}, indent=1))
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": files}, indent=1))
    for path in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        fsync_file(path)
    fsync_dir(tmp)
    if final.exists():  # a stale copy of the same step (e.g. from a run killed after the rename)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def newest_intact(root: Path, move_damaged: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under root whose files match their manifest, and its state.json; None if there is none.
    A damaged newer one (truncated, corrupt, edited) is skipped with a warning and, with `move_damaged`, renamed to
    damaged-<name>-<time> beside the others (kept, never deleted), so training falls back to the one before."""
    done = sorted((p for p in root.glob("step-*") if (p / MANIFEST).exists()), reverse=True)
    for path in done:
        try:
            verify(path)
            state = json.loads((path / "state.json").read_text())
            int(state["step"])
            return path, state
        except (CheckpointError, OSError, ValueError, KeyError, TypeError) as err:
            aside = root / f"damaged-{path.name}-{int(time.time())}"
            if move_damaged:
                path.rename(aside)
            log.warning("%s is damaged (%s); %s, falling back to the previous checkpoint", path, err,
                        f"moved to {aside}" if move_damaged else "skipped")
    return None


def verify(path: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; returns the manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(
            f"{path}: no {MANIFEST}; the checkpoint is incomplete, delete it to resume from an earlier one")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest ({err}); delete this checkpoint directory "
                              "to resume from an earlier one") from None
    if set(files) != {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}:
        raise CheckpointError(f"{manifest_path}: lists {sorted(files)}, not a checkpoint's four files")
    for name, digest in files.items():
        actual = sha256_file(path / name) if (path / name).exists() else "missing"
        if actual != digest:
            raise CheckpointError(f"{path / name}: sha256 {actual} does not match the manifest's {digest}; "
                                  "the file is corrupt: delete this checkpoint directory to resume from an earlier one")
    return manifest


def load(path: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore a verified checkpoint into model / ema / optimizer; returns state.json."""
    verify(path)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    state = json.loads((path / "state.json").read_text())
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
    return state


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """safetensors.torch.save with its `__metadata__` keys in sorted order: the library writes them in a per-process
    random order, so identical weights would hash differently (and redraw every sample chunk keyed on the hash)."""
    data = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size], object_pairs_hook=dict)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > size:  # same keys and values in another order: the length cannot change
        raise AssertionError("safetensors header grew when its metadata was sorted")
    return data[:8] + text.ljust(size, b" ") + data[8 + size :]


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written atomically, byte-for-byte the same for the same tensors and metadata."""
    atomic_write(path, safetensors_bytes(tensors, metadata))


def weight_file(train_dir: Path, use_ema: bool) -> Path:
    """The exported weights of a train folder the sampler uses: ema.safetensors or model.safetensors."""
    return Path(train_dir) / ("ema.safetensors" if use_ema else "model.safetensors")


def weight_files(run: RunConfig, train_dirs: Sequence[Path]) -> list[Path]:
    """The exported weights a run samples from: its train folder's, or for an ensemble each expert's, in order."""
    wanted = [e.name for e in run.experts] or [run.name]
    if len(train_dirs) != len(wanted):
        raise CheckpointError(f"{run.params_key}: needs {len(wanted)} train folder(s), one for each of {wanted} in "
                              f"this order; got {len(train_dirs)}")
    return [weight_file(d, run.sample.use_ema) for d in train_dirs]


def load_trained(run: RunConfig, files: Sequence[Path], device: str | torch.device = "cpu") -> torch.nn.Module:
    """The run's trained network in eval mode, from one safetensors file per network (an ensemble: one per expert
    run, in interval order); no pickle involved."""
    for path in files:
        if not Path(path).exists():
            raise CheckpointError(f"{path}: no trained weights; train that run first (dvc repro, or "
                                  f"`python -m diffusion.cli train RUN`)")
    model = registry.with_weights(run, [read_weights(Path(p)) for p in files], path_of=files)
    return model.to(device).eval()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated, corrupt or non-safetensors file (a pickle, say) is a
    CheckpointError naming it and the fix (nothing is unpickled)."""
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError); no pickle is ever read
        raise CheckpointError(f"{path}: not a readable safetensors weights file ({type(err).__name__}: {err}); "
                              "restore it (`dvc pull`, `dvc checkout`) or re-run the stage that wrote it") from None


def load_first_stage(path: Path, cfg: AutoencoderConfig, channels: int):
    """The autoencoder in `path` (safetensors with latent_scale metadata), built from cfg, as the registry's
    FirstStage (encode to scaled latents, decode back)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no autoencoder weights; run the latent dataset's autoencoder stage "
                              f"(dvc.yaml autoencoder@{path.parent.name}) first")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if "latent_scale" not in meta:
        raise CheckpointError(f"{path}: no latent_scale in the safetensors metadata; write it with the autoencoder "
                              "stage")
    model = registry.build_autoencoder(cfg, channels)
    model.load_state_dict(read_weights(path))
    return registry.first_stage(model, float(meta["latent_scale"]), path, sha256_file(path))


def first_stage(run: RunConfig, shards: Path, device: str | torch.device):
    """A latent run's autoencoder, from its latent dataset's folder (<shards>/autoencoder.safetensors, written by the
    dataset's autoencoder stage); None for a run in pixel space."""
    if run.autoencoder is None:
        return None
    return load_first_stage(Path(shards) / AUTOENCODER_FILE, run.autoencoder, run.dataset.channels).to(device)
