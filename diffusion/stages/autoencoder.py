"""The autoencoder stage of a latent dataset (MEME's first stage; the network: meme/autoencoder.py):
`python -m diffusion.cli autoencoder NAME --source DIR --out DIR` copies the source dataset's shards to <out> and
trains (or imports) the autoencoder beside them, so every later stage reads a latent dataset like any other."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.batches import ArrayBatches, read_split
from diffusion import registry
from diffusion.args import out_folder, parser
from diffusion.checkpoint import AUTOENCODER_FILE, read_weights, save_weights
from diffusion.config import AutoencoderConfig, ConfigError, DatasetConfig, load_params
from diffusion.images import from_uint8
from diffusion.io import sha256_file, write_json

METRICS = "autoencoder.json"  # beside the shards: reconstruction error, latent scale, training log
SCALE_IMAGES = 1024  # training images whose latents set latent_scale


def train_autoencoder(cfg: AutoencoderConfig, images: np.ndarray, random_flip: bool,
                      log: list[dict] | None = None) -> nn.Module:
    """Adam on shuffled batches of `images` (N, H, W, C) uint8 (data.batches.ArrayBatches: a pure function of
    cfg.seed and the step) for cfg.steps steps; appends {"step", "loss", "reconstruction", "kl"} to `log` every
    cfg.log_every steps."""
    torch.manual_seed(cfg.seed)
    model = registry.build_autoencoder(cfg, images.shape[-1]).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = ArrayBatches(images, np.zeros(len(images)), cfg.batch_size, cfg.seed, random_flip)
    for step in range(cfg.steps):
        x, _ = batches.batch(step)  # (B, C, H, W) in [-1, 1]
        terms = registry.autoencoder_loss(model, x, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            log.append({"step": step + 1} | {k: v.item() for k, v in terms.items()})
    return model.eval()


@torch.no_grad()
def latent_scale(model: nn.Module, images: np.ndarray, batch: int = 256) -> float:
    """1 / std of the posterior means of `images` (N, H, W, C) uint8 (LDM's scale_factor)."""
    means = torch.cat([model.encode(from_uint8(images[i:i + batch]))[0] for i in range(0, len(images), batch)])
    return 1.0 / means.std().item()


@torch.no_grad()
def reconstruction_error(model: nn.Module, images: np.ndarray, batch: int = 256) -> dict[str, float]:
    """Mean absolute and squared error of decode(posterior mean) on `images` (N, H, W, C) uint8, in [-1, 1] units,
    and the PSNR of the latter (peak-to-peak 2)."""
    l1 = l2 = 0.0
    for i in range(0, len(images), batch):
        x = from_uint8(images[i:i + batch])
        x_hat = model.decode(model.encode(x)[0]).clamp(-1, 1)
        l1 += (x_hat - x).abs().sum().item()
        l2 += (x_hat - x).square().sum().item()
    n = images.size
    return {"l1": l1 / n, "l2": l2 / n, "psnr_db": 10 * math.log10(4.0 / max(l2 / n, 1e-12))}


def save_autoencoder(model: nn.Module, scale: float, path: Path) -> None:
    save_weights(model.state_dict(), path, {"latent_scale": repr(scale), "config": json.dumps(asdict(model.cfg))})


def build_latent_dataset(name: str, cfg: AutoencoderConfig, dataset: DatasetConfig, source_root: Path,
                         out_root: Path) -> dict:
    """The autoencoder stage: out_root gets the source dataset's shards (so every stage reads a latent dataset
    like any other) and the autoencoder beside them, trained on the train split (or imported from cfg.weights),
    with its reconstruction error on the test split in autoencoder.json. Returns that summary."""
    start = time.perf_counter()
    for split in ("train", "test"):
        if (source_root / split).exists():
            if (out_root / split).exists():
                shutil.rmtree(out_root / split)
            shutil.copytree(source_root / split, out_root / split)
    train, _ = read_split(dataset, out_root, "train")
    history: list[dict] = []
    if cfg.weights is not None:
        model = import_weights(cfg, dataset.channels)
    else:
        model = train_autoencoder(cfg, train, dataset.random_flip, history)
    scale = latent_scale(model, train[:SCALE_IMAGES])
    save_autoencoder(model, scale, out_root / AUTOENCODER_FILE)
    test = read_split(dataset, out_root, "test")[0] if (out_root / "test").exists() else train[:1024]
    summary = {"name": name, "latent_shape": list(cfg.latent_shape(dataset.resolution)), "latent_scale": scale,
               "imported_from": cfg.weights and cfg.weights.path, "test": reconstruction_error(model, test),
               "history": history,
               "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}
    write_json(out_root / METRICS, summary)
    return summary


def import_weights(cfg: AutoencoderConfig, channels: int) -> nn.Module:
    """cfg.weights after checking the file's sha256 against the pinned one."""
    path = Path(cfg.weights.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such autoencoder weights file (autoencoders.<name>.weights.path)")
    digest = sha256_file(path)
    if digest != cfg.weights.sha256:
        raise ConfigError(f"{path}: sha256 {digest} differs from the pinned weights.sha256 {cfg.weights.sha256}; "
                         "pin the new hash in params.yaml if these are the weights you mean")
    model = registry.build_autoencoder(cfg, channels)
    model.load_state_dict(read_weights(path))
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("autoencoder", __doc__)
    p.add_argument("name", help="an entry of params.yaml autoencoders (the latent dataset's name)")
    p.add_argument("--source", required=True, help="the source dataset's shard root (data/shards/<dataset>)")
    p.add_argument("--out", required=True, help="the latent dataset's folder (data/shards/<name>)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    if args.name not in params.autoencoders:
        raise ConfigError(f"params.yaml: autoencoders has no entry {args.name!r}; it has {sorted(params.autoencoders)}")
    registry.check(params, runs=[])
    cfg = params.autoencoders[args.name]
    out = out_folder(args.out)
    summary = build_latent_dataset(args.name, cfg, params.datasets[cfg.dataset], Path(args.source), out)
    err = summary["test"]
    print(f"{args.name}: latents {summary['latent_shape']}, scale {summary['latent_scale']:.3f}, test reconstruction "
          f"L1 {err['l1']:.4f}, PSNR {err['psnr_db']:.1f} dB -> {out}")
    return 0
