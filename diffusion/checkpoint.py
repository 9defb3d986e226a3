"""Atomic, pickle-free training checkpoints: safetensors for every tensor, JSON for the rest, sha256 manifest.

Layout: <dir>/step-000200/{model,ema,optimizer}.safetensors + state.json + manifest.json, and <dir>/latest
naming the newest complete checkpoint. A checkpoint directory appears only once fully written (rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffusion.shards import atomic_write_bytes, sha256_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match its manifest."""


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer.state_dict() -> (tensors keyed 'state.<param>.<name>', JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in rest["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save(root: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` under root atomically, point `latest` at it, keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:08d}."))
    opt_tensors, opt_rest = flatten_optimizer(optimizer.state_dict())
    meta = {"step": str(step)}
    for name, module in (("model", model), ("ema", ema)):
        tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(tensors, tmp / f"{name}.safetensors", meta)
    save_file(opt_tensors, tmp / "optimizer.safetensors", meta)
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_rest, **(extra or {})}, indent=1))
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": files}, indent=1))
    if final.exists():  # a stale copy of the same step (e.g. from a run killed after the rename)
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None. Directories are scanned rather than trusting the
    `latest` pointer, which lags the rename by a moment when a run is killed in between."""
    done = sorted(p for p in root.glob("step-*") if (p / MANIFEST).exists())
    return done[-1] if done else None


def verify(path: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; returns the manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(
            f"{path}: no {MANIFEST}; the checkpoint is incomplete, delete it to resume from an earlier one")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["sha256"].items():
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
