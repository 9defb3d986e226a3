"""MEME's first stage: a KL-regularised autoencoder (LDM's AutoencoderKL, Rombach et al. 2022, without the
perceptual and adversarial losses) that maps images to latents f times smaller per side, so that a run trains and
samples in its latent space (MEME's main results: LDM on f=4 latents of FFHQ / CelebA-HQ 256).

Loss: reconstruction (mean |x - x^| or (x - x^)^2 per pixel) + kl_weight * KL(q(z|x) || N(0, I)) (mean per latent
element), with z drawn from the posterior (reparameterised) while training. A run sees the posterior mean times
`latent_scale` (1 / std of the training latents, LDM's scale_factor), so its latents have about unit variance.
Training it and building a latent dataset is the autoencoder stage (diffusion/stages/autoencoder.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.config import AutoencoderConfig, DatasetConfig


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
