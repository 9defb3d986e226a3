"""The training loop for any Denoiser: bf16 autocast with fp32 master weights, AdamW/LAMB with warmup + cosine,
gradient clipping, EMA, a NaN guard, and safetensors weights written atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from diffusion.config import RunConfig
from diffusion.objectives import diffusion_loss
from diffusion.optim import lr_factor, make_optimizer
from diffusion.registry import build_model
from diffusion.schedules import Schedule


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float  # mean of the last `log_every` losses
    images_per_s: float
    history: list[dict]


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def pad_to(images: np.ndarray, resolution: int) -> np.ndarray:
    """(N, h, w) or (N, h, w, C) uint8 -> zero-padded (centred) to resolution x resolution."""
    h, w = images.shape[1:3]
    if h > resolution or w > resolution:
        raise ValueError(f"images of {h}x{w} do not fit in resolution {resolution}; resize them first")
    top, left = (resolution - h) // 2, (resolution - w) // 2
    widths = [(0, 0), (top, resolution - h - top), (left, resolution - w - left)] + [(0, 0)] * (images.ndim - 3)
    return np.pad(images, widths)


class ArrayBatches:
    """Infinite shuffled batches from an in-memory uint8 array: (B, C, H, W) in [-1, 1] and (B,) labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, random_flip: bool):
        x = torch.from_numpy(np.ascontiguousarray(images))
        self.images = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W) uint8
        self.labels = torch.from_numpy(labels).long()
        self.batch_size, self.random_flip = batch_size, random_flip
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.images.shape[0]
        while True:
            order = torch.randperm(n, generator=self.generator)
            for i in range(0, n - self.batch_size + 1, self.batch_size):
                idx = order[i : i + self.batch_size]
                x = self.images[idx].float() / 127.5 - 1.0
                if self.random_flip:
                    flip = torch.rand(len(idx), generator=self.generator) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                yield x, self.labels[idx]


def save_safetensors_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def train_step(model, batch, optimizer, run: RunConfig, schedule: Schedule, generator, device) -> tuple[float, float]:
    """One optimisation step; returns (loss, grad norm before clipping)."""
    x0, labels = batch
    x0 = x0.to(device)
    labels = labels.to(device) if run.model.class_conditional else None
    with autocast(run.train.precision, device):
        loss = diffusion_loss(
            model, x0, labels, schedule, run.diffusion.prediction, run.train.self_cond_rate, generator
        ).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = run.train.grad_clip if run.train.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value}: stopping before the optimizer step; lower train.lr or check the data")
    optimizer.step()
    return value, float(grad_norm)


def train(run: RunConfig, batches: Iterator[tuple[Tensor, Tensor]], out_dir: Path, device: str = "cpu") -> TrainResult:
    """Train `run` on `batches` for run.train.steps; writes model.safetensors, ema.safetensors, train_log.json."""
    device_ = torch.device(device)
    torch.manual_seed(run.train.seed)
    model = build_model(run).to(device_).train()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(run.train.ema_decay), use_buffers=True)
    optimizer = make_optimizer(model, run.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, run.train))
    schedule = Schedule(run.diffusion.train_schedule)
    generator = torch.Generator().manual_seed(run.train.seed + 1)
    history, window = [], []
    it = iter(batches)
    start = time.perf_counter()
    bar = tqdm(range(run.train.steps), desc=f"train {run.name}", mininterval=2.0)
    for step in bar:
        loss, gnorm = train_step(model, next(it), optimizer, run, schedule, generator, device_)
        scheduler.step()
        ema.update_parameters(model)
        window.append(loss)
        if (step + 1) % run.train.log_every == 0 or step + 1 == run.train.steps:
            elapsed = time.perf_counter() - start
            row = {"step": step + 1, "loss": float(np.mean(window)), "grad_norm": gnorm,
                   "lr": scheduler.get_last_lr()[0], "images_per_s": (step + 1) * run.train.batch_size / elapsed}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
            window = []
    elapsed = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"run": run.name, "step": str(run.train.steps)}
    save_safetensors_atomic(model.state_dict(), out_dir / "model.safetensors", meta)
    save_safetensors_atomic(ema.module.state_dict(), out_dir / "ema.safetensors", meta)
    throughput = run.train.steps * run.train.batch_size / elapsed
    result = TrainResult(run.train.steps, history[-1]["loss"], throughput, history)
    (out_dir / "train_log.json").write_text(json.dumps(result.__dict__, indent=1))
    return result


def load_weights(run: RunConfig, path: Path, device: str = "cpu") -> nn.Module:
    """A model for `run` with weights from a safetensors file (no pickle involved)."""
    from safetensors.torch import load_file

    model = build_model(run)
    model.load_state_dict(load_file(str(path), device=device))
    return model.to(device).eval()
