"""MEME's first stage: a KL-regularised autoencoder (LDM's AutoencoderKL, Rombach et al. 2022, without the
perceptual and adversarial losses) that maps images to latents f times smaller per side, so that a run trains and
samples in its latent space (MEME's main results: LDM on f=4 latents of FFHQ / CelebA-HQ 256).

Loss: reconstruction (mean |x - x^| or (x - x^)^2 per pixel) + kl_weight * KL(q(z|x) || N(0, I)) (mean per latent
element), with z drawn from the posterior (reparameterised) while training. A run sees the posterior mean times
`latent_scale` (1 / std of the training latents, LDM's scale_factor), so its latents have about unit variance.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from diffusion.config import AutoencoderConfig, DatasetConfig
from diffusion.images import from_uint8

WEIGHTS = "autoencoder.safetensors"  # inside the latent dataset's shard folder, beside its train/ and test/ shards
METRICS = "autoencoder.json"
SCALE_IMAGES = 1024  # training images whose latents set latent_scale


class Block(nn.Module):
    """GN -> SiLU -> conv3x3, twice, plus a (1x1 when the width changes) skip: a residual block with no embedding."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                 nn.GroupNorm(groups, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.net(x)


class Autoencoder(nn.Module):
    """Encoder: conv -> per level, residual blocks then a strided conv (all but the last level) -> block -> GN, SiLU,
    conv to 2 z_channels (posterior mean and log-variance). The decoder mirrors it with nearest-neighbour x2
    upsampling. (B, C, H, W) <-> (B, z, H / f, W / f), f = 2^(levels - 1)."""

    def __init__(self, cfg: AutoencoderConfig, channels: int):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        enc: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                enc.append(Block(ch, width, cfg.norm_groups))
                ch = width
            if level < len(widths) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        enc += [Block(ch, ch, cfg.norm_groups), nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(),
                nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(cfg.z_channels, ch, 3, padding=1), Block(ch, ch, cfg.norm_groups)]
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(cfg.num_res_blocks):
                dec.append(Block(ch, width, cfg.norm_groups))
                ch = width
            if level > 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        dec += [nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) in [-1, 1] -> posterior mean and log-variance, each (B, z, H / f, W / f)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)  # (B, C, H, W)


def autoencoder_loss(model: Autoencoder, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """{"loss", "reconstruction", "kl"} for a batch of images x (B, C, H, W) in [-1, 1] (see the module docstring)."""
    mean, logvar = model.encode(x)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device) if generator is not None else \
        torch.randn_like(mean)
    z = mean + (0.5 * logvar).exp() * noise
    x_hat = model.decode(z)
    rec = (x_hat - x).abs().mean() if model.cfg.loss == "l1" else (x_hat - x).square().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return {"loss": rec + model.cfg.kl_weight * kl, "reconstruction": rec, "kl": kl}


def read_split(cfg: DatasetConfig, shard_root: str | Path, split: str) -> np.ndarray:
    """Every image of a split through the verifying loader: (N, H, W, C) uint8."""
    from diffusion.images import to_uint8_nhwc
    from diffusion.loader import loader_from_config

    loader = loader_from_config(cfg, shard_root, split, 1024, train=False)
    return np.concatenate([to_uint8_nhwc(x) for x, _ in loader])


def train_autoencoder(cfg: AutoencoderConfig, images: np.ndarray, random_flip: bool,
                      log: list[dict] | None = None) -> Autoencoder:
    """Adam on shuffled batches of `images` (N, H, W, C) uint8 (diffusion.sources.ArrayBatches: a pure function of
    cfg.seed and the step) for cfg.steps steps; appends {"step", "loss", "reconstruction", "kl"} to `log` every
    cfg.log_every steps."""
    from diffusion.sources import ArrayBatches

    torch.manual_seed(cfg.seed)
    model = Autoencoder(cfg, images.shape[-1]).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = ArrayBatches(images, np.zeros(len(images)), cfg.batch_size, cfg.seed, random_flip)
    for step in range(cfg.steps):
        x, _ = batches.batch(step)  # (B, C, H, W) in [-1, 1]
        terms = autoencoder_loss(model, x, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            log.append({"step": step + 1} | {k: v.item() for k, v in terms.items()})
    return model.eval()


@torch.no_grad()
def latent_scale(model: Autoencoder, images: np.ndarray, batch: int = 256) -> float:
    """1 / std of the posterior means of `images` (N, H, W, C) uint8 (LDM's scale_factor)."""
    means = torch.cat([model.encode(from_uint8(images[i:i + batch]))[0] for i in range(0, len(images), batch)])
    return 1.0 / means.std().item()


@torch.no_grad()
def reconstruction_error(model: Autoencoder, images: np.ndarray, batch: int = 256) -> dict[str, float]:
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


class FirstStage:
    """A trained autoencoder as a run uses it: encode images to scaled latents (posterior mean x scale), decode
    latents back to images in [-1, 1]. Frozen; `sha256` identifies its weights in training and sampling fingerprints."""

    def __init__(self, model: Autoencoder, scale: float, path: Path, sha256: str):
        self.model, self.scale = model.eval().requires_grad_(False), scale
        self.path, self.sha256 = path, sha256  # the weights file and its hash

    def to(self, device: torch.device | str) -> FirstStage:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.model.encode(x)[0] * self.scale  # (B, z, H / f, W / f)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z.float() / self.scale).clamp(-1.0, 1.0)  # (B, C, H, W)


def save_autoencoder(model: Autoencoder, scale: float, path: Path) -> None:
    from diffusion.train import save_weights

    save_weights(model.state_dict(), path, {"latent_scale": repr(scale), "config": json.dumps(asdict(model.cfg))})


def load_first_stage(path: Path, cfg: AutoencoderConfig, channels: int) -> FirstStage:
    """The autoencoder in `path` (safetensors with latent_scale metadata), built from cfg, as a FirstStage."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from diffusion.shards import sha256_file

    if not path.exists():
        raise FileNotFoundError(f"{path}: no autoencoder weights; run `python -m diffusion.cli autoencoder "
                                f"{path.parent.name}` (dvc.yaml autoencoder@{path.parent.name}) first")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if "latent_scale" not in meta:
        raise ValueError(f"{path}: no latent_scale in the safetensors metadata; write it with "
                         "meme.autoencoder.save_autoencoder")
    model = Autoencoder(cfg, channels)
    model.load_state_dict(load_file(str(path)))
    return FirstStage(model, float(meta["latent_scale"]), path, sha256_file(path))


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
    train = read_split(dataset, out_root, "train")
    history: list[dict] = []
    if cfg.weights is not None:
        model = import_weights(cfg, dataset.channels)
    else:
        model = train_autoencoder(cfg, train, dataset.random_flip, history)
    scale = latent_scale(model, train[:SCALE_IMAGES])
    save_autoencoder(model, scale, out_root / WEIGHTS)
    test = read_split(dataset, out_root, "test") if (out_root / "test").exists() else train[:1024]
    summary = {"name": name, "latent_shape": list(cfg.latent_shape(dataset.resolution)), "latent_scale": scale,
               "imported_from": cfg.weights and cfg.weights.path, "test": reconstruction_error(model, test),
               "history": history,
               "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}
    (out_root / METRICS).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def import_weights(cfg: AutoencoderConfig, channels: int) -> Autoencoder:
    """cfg.weights after checking the file's sha256 against the pinned one."""
    from safetensors.torch import load_file

    from diffusion.shards import sha256_file

    path = Path(cfg.weights.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such autoencoder weights file (autoencoders.<name>.weights.path)")
    digest = sha256_file(path)
    if digest != cfg.weights.sha256:
        raise ValueError(f"{path}: sha256 {digest} differs from the pinned weights.sha256 {cfg.weights.sha256}; "
                         "pin the new hash in params.yaml if these are the weights you mean")
    model = Autoencoder(cfg, channels)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def check_shapes(cfg: AutoencoderConfig, dataset: DatasetConfig) -> None:
    """Raise ValueError naming the field when cfg cannot encode the dataset's images."""
    f = cfg.factor
    if dataset.frames:
        raise ValueError("the autoencoder encodes images; the dataset holds video clips")
    if dataset.resolution % f:
        raise ValueError(f"channel_mult has {len(cfg.channel_mult)} levels (f = {f}), which must divide the "
                         f"dataset's resolution {dataset.resolution}")
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    if any(w % cfg.norm_groups for w in widths):
        raise ValueError(f"norm_groups {cfg.norm_groups} must divide every level width {widths}")
