"""The training loop for any Denoiser: torchrun DDP (gloo on CPU, NCCL on GPU), bf16 autocast with fp32 master
weights, AdamW / LAMB with warmup + cosine, gradient clipping, EMA, exact resume, dvclive metrics, a NaN guard.

Every random draw of step s is a pure function of (seed, s): the batch, the noise (t, eps, self-conditioning
coin) drawn once for the global batch and sliced per rank, and dropout (seeded per rank). So a resumed run
repeats exactly what an uninterrupted one would have done, and N processes see the same global batch as one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from diffusion import checkpoint
from diffusion.config import RunConfig
from diffusion.distributed import Dist, autocast, barrier, reduce_step, use_compile
from diffusion.errors import Stopped, UserError
from diffusion.flops import train_flops_per_example
from diffusion.images import grid, to_uint8_nhwc, video_grid
from diffusion.io import fingerprint, move_aside, write_text
from diffusion.objectives import NoiseDraw, diffusion_loss
from diffusion.optim import lr_factor, make_optimizer
from diffusion.registry import build_model, resolve_model
from diffusion.sampling import sample, sample_labels
from diffusion.schedules import Schedule
from diffusion.timesteps import time_sampler

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


class Preempted(Stopped):
    """The run was asked to stop (SIGTERM: a preemption, a scheduler's time limit): every rank wrote the checkpoint of
    the step it stopped at first, so a re-run resumes exactly there."""

    def __init__(self, run: str, step: int):
        super().__init__(f"{run}: stopped at step {step} on request (SIGTERM) after saving its checkpoint; run the "
                         "same command again to resume")
        self.step = step


class BatchSource(Protocol):
    def batch(self, step: int, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
        """This rank's share of global batch `step`: (B / world, C, *spatial) in [-1, 1] and (B / world,) labels."""
        ...


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    final_loss: float  # mean of the last `log_every` losses
    images_per_s: float  # global throughput over all sessions of this run (a resumed run counts its earlier ones)
    history: list[dict]
    proxy: list[dict] = field(default_factory=list)  # proxy quality rows (step, images_seen, train_pflop, kid, ...)


# A proxy metric of sample quality: uint8 NHWC samples -> {"kid": ..., "kid_std": ..., ...} (the train stage's KID)
ProxyScore = Callable[[np.ndarray], dict]


# Settings that do not change what a run computes, left out of its training fingerprint: where the raw data lives and
# how it is fetched or how bad inputs are handled (the shards are what training reads), and logging intervals.
UNFINGERPRINTED = {"dataset": ("root", "download", "skip_corrupt"),
                   "train": ("log_every", "checkpoint_every", "sample_every", "num_workers", "compile", "proxy")}


def training_settings(run: RunConfig, first_stage_sha256: str | None = None) -> dict:
    """What a checkpoint must agree with to be resumed: model, dataset, objective and every training setting that
    changes the trajectory (train.steps included: it sets the cosine decay), and for a latent run the weights of its
    autoencoder (UNFINGERPRINTED lists what is left out)."""
    parts = {"dataset": asdict(run.dataset), "train": asdict(run.train)}
    for part, keys in UNFINGERPRINTED.items():
        for key in keys:
            parts[part].pop(key)
    if parts["train"]["expert"] is None:  # runs that train no MEME expert keep the settings they had before experts
        parts["train"].pop("expert")
    blob = {"model": asdict(resolve_model(run)), "dataset": parts["dataset"], "diffusion": asdict(run.diffusion),
            "train": parts["train"]}
    if first_stage_sha256 is not None:
        blob["first_stage"] = first_stage_sha256
    return blob


def training_fingerprint(run: RunConfig, first_stage_sha256: str | None = None) -> str:
    return fingerprint(training_settings(run, first_stage_sha256))


def changed_settings(old: dict | None, new: dict) -> str:
    """`train.lr 0.002 -> 0.001, ...` between two training_settings blobs (dotted keys), for the restart warning."""
    if old is None:
        return "unknown (the checkpoint predates recorded settings)"
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))
    return ", ".join(f"{k} {flat_old.get(k, '(none)')!r} -> {flat_new.get(k, '(none)')!r}" for k in keys) or "none"


def _flatten(blob: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in blob.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn for an EMA whose decay warms up as min(decay, (1 + n) / (10 + n)) over the n
    updates so far, so early random weights do not linger in the average (0.9999 would keep ~37% of the initial
    weights after 10k steps)."""

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_033 + step + 1)


def train_step(model: nn.Module, batch: tuple[Tensor, Tensor], noise: NoiseDraw, optimizer, run: RunConfig,
               schedule: Schedule, d: Dist, stop: bool = False) -> tuple[float, float, bool]:
    """One optimisation step on this rank's share; returns (global mean loss, grad norm before clipping, whether
    any rank asked to `stop`), the last two agreed in the step's one all-reduce."""
    x0, labels = batch[0].to(d.device), batch[1].to(d.device)
    with autocast(run.train.precision, d.device):
        loss = diffusion_loss(model, x0, labels if run.model.class_conditional else None, schedule,
                              run.diffusion.prediction, run.train.self_cond_rate, noise,
                              run.diffusion.context_frames).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = run.train.grad_clip if run.train.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    value, stop = reduce_step(loss.item(), stop, d)
    if not (math.isfinite(value) and math.isfinite(grad_norm)):
        raise TrainingDiverged(
            f"{run.name}: loss {value}, grad norm {grad_norm}: stopped before the optimizer step; the last "
            "checkpoint is kept. Lower train.lr, raise train.warmup_steps, or check the data for NaNs")
    optimizer.step()
    return value, grad_norm, stop


@torch.no_grad()
def draw_images(model: nn.Module, run: RunConfig, settings, n: int, device: torch.device | str, first_stage=None,
                desc: str = "sample") -> np.ndarray:
    """n uint8 NHWC samples from seeds settings.seed .. + n - 1 in batches of settings.batch_size, in the run's
    precision, with labels as the sample stage draws them and a latent run's samples decoded; a progress bar."""
    cfg, out = model.cfg, []
    for start in tqdm(range(0, n, settings.batch_size), desc=f"{desc} ({settings.sampler}, {settings.steps} steps)",
                      leave=False):
        seeds = [settings.seed + i for i in range(start, min(start + settings.batch_size, n))]
        labels = sample_labels(seeds, cfg.num_classes)
        with autocast(run.train.precision, device):
            x = sample(model, (cfg.channels, *cfg.data_shape), seeds, settings, run.diffusion.prediction,
                       labels=None if labels is None else labels.to(device), device=device)
        if first_stage is not None:
            x = first_stage.decode(x)
        out.append(to_uint8_nhwc(x))
    return np.concatenate(out)


class Trainer:
    """Owns the model, EMA, optimiser and output folder of one run; `fit` trains to run.train.steps."""

    def __init__(self, run: RunConfig, out_dir: Path, d: Dist, first_stage=None):
        """`first_stage`: a latent run's autoencoder (checkpoint.load_first_stage); batches are encoded, previews
        decoded."""
        self.run, self.out, self.d = run, Path(out_dir), d
        self.first_stage = first_stage
        torch.manual_seed(run.train.seed)  # identical initial weights on every rank
        self.model = build_model(run).to(d.device).train()
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(run.train.ema_decay), use_buffers=True)
        self.optimizer = make_optimizer(self.model, run.train)
        self.ddp = DistributedDataParallel(self.model) if d.enabled else self.model
        if use_compile(run.train.compile, d.device):
            self.ddp = torch.compile(self.ddp)  # the first step pays the compile time (logged as its step time)
        self.schedule = Schedule(run.diffusion.train_schedule)
        self.settings = training_settings(run, first_stage.sha256 if first_stage is not None else None)
        self.fingerprint = fingerprint(self.settings)
        self.draw_t = time_sampler(run.train.expert)
        self.step = 0
        self.history: list[dict] = []  # logged rows of every session, carried in the checkpoints
        self.proxy_rows: list[dict] = []  # proxy quality points of every session, carried too
        self.window: list[float] = []  # losses since the last logged row, carried too (a resume may fall inside)
        self.train_seconds = 0.0  # training time of earlier sessions, carried in the checkpoints
        self.proxy_seconds = 0.0  # of it, the proxy points' (left out of the throughput), carried too
        self.preview_context: Tensor | None = None
        self.train_flops: int | None = None  # counted training FLOPs per example, on the first proxy point
        self.resumed_from: int | None = None  # set by the first `resume`
        self.stop_requested = False  # set by `request_stop` (a SIGTERM handler); fit stops at the next step
        self.stop_agreed = False  # some rank had stop_requested at the last step's all-reduce

    def request_stop(self, *_signal) -> None:
        """Stop after the current step, with a checkpoint (usable as a signal handler)."""
        self.stop_requested = True

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def resume(self) -> int:
        """Continue from the newest checkpoint written for this exact configuration. Checkpoints of another
        configuration (an edited params.yaml) are moved aside, never deleted, and training starts over. Idempotent:
        a second call returns the first call's step."""
        if self.resumed_from is None:
            self.resumed_from = self._resume()
        return self.resumed_from

    def _resume(self) -> int:
        found = checkpoint.newest_intact(self.ckpt_dir, move_damaged=self.d.is_main)
        barrier(self.d)
        if found is None:
            return 0
        path, state = found
        if state.get("fingerprint") != self.fingerprint:
            if self.d.is_main:
                aside = move_aside(self.ckpt_dir)
                log.warning("%s: checkpoints were written for another configuration (changed: %s); moved to %s, "
                            "starting over", self.run.name, changed_settings(state.get("settings"), self.settings),
                            aside)
            barrier(self.d)
            return 0
        checkpoint.load(path, self.model, self.ema, self.optimizer)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.proxy_rows = list(state.get("proxy", []))
        self.window = list(state.get("window", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.proxy_seconds = float(state.get("proxy_seconds", 0.0))
        log.info("%s: resumed from %s", self.run.name, path)
        if self.d.is_main:
            have = {row["step"] for row in self.proxy_rows}
            missing = [s for s in range(1, self.step + 1) if self.proxy_due(s) and s not in have]
            if missing:
                log.warning("%s: the checkpoint has no proxy points for steps %s (it was written without train.proxy "
                            "or with other proxy steps); they cannot be drawn now. For the whole curve, move %s aside "
                            "and train again", self.run.name, ", ".join(map(str, missing)), self.ckpt_dir)
        return self.step

    def save(self, session_seconds: float = 0.0) -> None:
        if self.d.is_main:
            checkpoint.save(self.ckpt_dir, self.step, self.model, self.ema, self.optimizer,
                            extra={"run": self.run.name, "fingerprint": self.fingerprint, "settings": self.settings,
                                   "history": self.history, "proxy": self.proxy_rows, "window": self.window,
                                   "train_seconds": self.train_seconds + session_seconds,
                                   "proxy_seconds": self.proxy_seconds})

    def set_lr(self) -> float:
        lr = self.run.train.lr * lr_factor(self.step, self.run.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def one_step(self, source: BatchSource) -> tuple[float, float, float]:
        t = self.run.train
        lr = self.set_lr()
        batch = source.batch(self.step, self.d.rank, self.d.world_size)
        if self.first_stage is not None:
            batch = (self.first_stage.encode(batch[0].to(self.d.device)), batch[1])  # (B, z, H / f, W / f)
        c = self.run.diffusion.context_frames
        if c and self.preview_context is None:  # video prediction previews continue this process's first clips
            self.preview_context = batch[0][:16, :, :c].clone()
        local = batch[0].shape[0]
        noise = NoiseDraw.draw(step_generator(t.seed, self.step), (t.batch_size, *batch[0].shape[1:]), self.draw_t)
        noise = noise.rows(self.d.rank * local, (self.d.rank + 1) * local)
        torch.manual_seed(t.seed * 1_000_037 + self.step * 4_099 + self.d.rank)  # dropout / drop-path
        loss, gnorm, self.stop_agreed = train_step(self.ddp, batch, noise, self.optimizer, self.run, self.schedule,
                                                   self.d, self.stop_requested)
        self.ema.update_parameters(self.model)
        self.step += 1
        return loss, gnorm, lr

    @torch.no_grad()
    def preview(self, n: int = 16) -> np.ndarray:
        """A grid of n samples from the EMA weights (DDIM, eta 0, at most 50 steps), as an (H, W, C) uint8 image;
        video: one clip per row (at most 8), continuing training clips when the run predicts from context frames."""
        run, cfg = self.run, self.model.cfg
        quick = replace(run.sample, sampler="ddim", eta=0.0, steps=min(run.sample.steps, 50))
        video = len(cfg.data_shape) == 3
        context = self.preview_context
        n = min(n, 8, len(context) if context is not None else 8) if video else n
        labels = torch.arange(n, device=self.d.device) % cfg.num_classes if cfg.num_classes else None
        with autocast(run.train.precision, self.d.device):
            x = sample(self.ema.module.eval(), (cfg.channels, *cfg.data_shape), list(range(n)), quick,
                       run.diffusion.prediction, labels=labels, device=self.d.device,
                       context=context[:n] if context is not None else None)
        if self.first_stage is not None:
            x = self.first_stage.decode(x)
        if video:
            image = video_grid(to_uint8_nhwc(x), context_frames=run.diffusion.context_frames)
        else:
            image = grid(to_uint8_nhwc(x), ncols=8)  # (H, W, C)
        return image[..., 0] if image.shape[-1] == 1 else image

    def proxy_images(self) -> np.ndarray:
        """train.proxy.num_samples EMA samples, with the run's sampler at the proxy's number of steps."""
        settings = replace(self.run.sample, steps=self.run.train.proxy.steps)
        return draw_images(self.ema.module.eval(), self.run, settings, self.run.train.proxy.num_samples,
                           self.d.device, self.first_stage, desc=f"proxy samples {self.run.name}")

    def proxy_due(self, step: int) -> bool:
        """Whether train.proxy has a point at `step`: every `every` steps and at the last one."""
        p = self.run.train.proxy
        return p is not None and (step % p.every == 0 or step == self.run.train.steps)

    def proxy_point(self, score: ProxyScore) -> dict:
        """One point of the quality-against-compute curve: the proxy score of the EMA weights now, with the images
        and counted training FLOPs that led here."""
        t0 = time.perf_counter()  # all of it, the FLOP count included, is left out of the throughput
        if self.train_flops is None:
            self.train_flops = train_flops_per_example(self.run)
        p = self.run.train.proxy
        images = self.step * self.run.train.batch_size
        row = {"step": self.step, "images_seen": images, "train_pflop": images * self.train_flops / 1e15,
               **score(self.proxy_images()), "proxy_samples": p.num_samples, "proxy_sampler": self.run.sample.sampler,
               "proxy_sampling_steps": p.steps}
        row["proxy_seconds"] = time.perf_counter() - t0
        return row

    def fit(self, source: BatchSource, live=None, proxy: ProxyScore | None = None) -> TrainResult:
        """Train to train.steps from the newest checkpoint. `proxy` (main rank): the score of train.proxy's points,
        computed before the checkpoint of the same step, so a resumed run keeps every point it had."""
        t = self.run.train
        start_step = self.resume()
        history = self.history
        t0, bar, p0 = time.perf_counter(), None, self.proxy_seconds
        if self.d.is_main:
            bar = tqdm(total=t.steps, initial=start_step, desc=f"train {self.run.name}", mininterval=2.0)
        while self.step < t.steps:
            loss, gnorm, lr = self.one_step(source)
            self.window.append(loss)
            if self.step % t.log_every == 0 or self.step == t.steps:
                ips = (self.step - start_step) * t.batch_size / (time.perf_counter() - t0 - (self.proxy_seconds - p0))
                row = {"step": self.step, "loss": float(np.mean(self.window)), "grad_norm": gnorm, "lr": lr,
                       "images_per_s": ips}
                history.append(row)
                self.window = []
                if live is not None:
                    live.step = self.step
                    for k in ("loss", "grad_norm", "lr", "images_per_s"):
                        live.log_metric(f"train/{k}", row[k])
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{ips:.0f}")
            if self.proxy_due(self.step):
                if proxy is not None and self.d.is_main:
                    row = self.proxy_point(proxy)
                    self.proxy_rows.append(row)
                    self.proxy_seconds += row["proxy_seconds"]
                    if live is not None:
                        live.step = self.step
                        live.log_metric("proxy/kid", row["kid"])
                    if bar is not None:
                        bar.write(f"{self.run.name} step {self.step}: proxy KID {row['kid']:.4f} +- "
                                  f"{row['kid_std']:.4f} ({t.proxy.num_samples} samples, {row['proxy_seconds']:.0f} s)")
                barrier(self.d)
            saved = self.step % t.checkpoint_every == 0 or self.step == t.steps
            if saved:
                self.save(time.perf_counter() - t0)
            if self.step < t.steps and self.stop_agreed:  # every rank stops at the same step
                if not saved:
                    self.save(time.perf_counter() - t0)
                barrier(self.d)
                raise Preempted(self.run.name, self.step)
            if live is not None and t.sample_every and self.step % t.sample_every == 0:
                live.log_image(f"preview/step-{self.step:08d}.png", self.preview())
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        elapsed = self.train_seconds + time.perf_counter() - t0 - self.proxy_seconds  # training alone
        ips = t.steps * t.batch_size / elapsed if elapsed > 0 else 0.0
        final = history[-1]["loss"] if history else float("nan")
        return TrainResult(t.steps, start_step, final, ips, history, list(self.proxy_rows))

    def export(self, result: TrainResult) -> None:
        """Final weights beside the checkpoints: model.safetensors, ema.safetensors, train_log.json."""
        if not self.d.is_main:
            return
        meta = {"run": self.run.name, "step": str(self.step)}
        checkpoint.save_weights(self.model.state_dict(), self.out / "model.safetensors", meta)
        checkpoint.save_weights(self.ema.module.state_dict(), self.out / "ema.safetensors", meta)
        write_text(self.out / "train_log.json", json.dumps(asdict(result), indent=1))
        summary = {"steps": result.steps, "final_loss": result.final_loss, "images_per_s": result.images_per_s,
                   "images_seen": result.steps * self.run.train.batch_size}
        write_text(self.out / "metrics.json", json.dumps(summary, indent=1))


def align_live(live_dir: Path, step: int) -> None:
    """Make a dvclive folder agree with a run that continues from `step`: rows logged after it (by a session killed
    before its next checkpoint) are dropped from the metric files, and a run that starts over (step 0) moves the old
    folder aside to live.stale-<time>, so its curves do not run into the new ones. Call on the main rank, before
    `dvclive.Live(dir=live_dir, resume=True)`."""
    if not live_dir.exists():
        return
    if step == 0:
        aside = move_aside(live_dir)
        log.warning("%s: metrics of an earlier run that does not continue here moved to %s", live_dir, aside)
        return
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        header, *rows = tsv.read_text().splitlines()
        col = header.split("\t").index("step")
        kept = [r for r in rows if int(r.split("\t")[col]) <= step]
        if len(kept) < len(rows):
            write_text(tsv, "\n".join([header, *kept]) + "\n")
