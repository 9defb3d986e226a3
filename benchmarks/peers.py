"""The models the speed benchmarks time, built at one configuration so that their steps do comparable work:

- `main_rin`: this project's RIN (a preset of rin/presets.py) and its training step (diffusion.objectives, the code
  path of the trainer) or one denoiser call of the sampler;
- `peer_rin`: lucidrains' RIN (PyPI `rin-pytorch`, the benchmark extra) at the same interface / latent widths,
  blocks, latent layers and latents, with its own GaussianDiffusion training step;
- `main_unet` / `peer_unet`: MEME's U-Net at the `ldm_s` widths against diffusers' `UNet2DModel` with the same
  channels per level, blocks per level and attention levels.

Self-conditioning: the peer draws one coin per step (its `train_prob_self_cond`), this project keeps or zeroes
latents per example but always runs the first pass when the rate is above 0; the peer is built with probability 1
so that both run the no-grad pass on every step (equal work per step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import nullcontext

import torch

from diffusion.config import ScheduleConfig
from diffusion.objectives import NoiseDraw, diffusion_loss
from diffusion.schedules import Schedule

SCHEDULE = Schedule(ScheduleConfig("sigmoid", -3.0, 3.0, 0.9))
Step = Callable[[], None]


def precision_ctx(precision: str):
    """bf16 autocast with fp32 master weights (the trainer's "bf16"), or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def main_rin(preset: str = "rin_cifar10", **overrides) -> torch.nn.Module:
    from rin.model import RIN
    from rin.presets import PRESETS

    return RIN(dataclasses.replace(PRESETS[preset], **overrides))


def peer_rin_like(model: torch.nn.Module) -> torch.nn.Module:
    """rin-pytorch's RIN at `model`'s (this project's RIN) widths: interface dim, latent dim, latents, blocks and
    latent layers per block, patch size. Its own choices stay (linear attention over the patches, a depthwise conv,
    adaptive-norm time conditioning, 4 x 32-wide heads), which is what makes it a peer rather than a copy."""
    from rin_pytorch import RIN as PeerRIN

    c = model.cfg
    if len(c.patch) != 2 or c.patch[0] != c.patch[1] or c.data_shape[0] != c.data_shape[1]:
        raise ValueError(f"rin-pytorch builds square images with square patches, not {c.data_shape} / {c.patch}")
    return PeerRIN(dim=c.interface_dim, image_size=c.data_shape[0], patch_size=c.patch[0], channels=c.channels,
                   depth=c.num_blocks, latent_self_attn_depth=c.process_layers, dim_latent=c.latent_dim,
                   num_latents=c.num_latents)


def loss_step(denoiser, model: torch.nn.Module, shape: tuple[int, ...], rate: float, precision: str,
              opt: torch.optim.Optimizer | None = None, lr: float = 1e-4) -> Step:
    """One training step of `denoiser` (a Denoiser over `model`'s weights) as the trainer takes it: the eps loss
    (diffusion.objectives, self-conditioned at `rate`) on a fixed synthetic batch with fresh noise, backward, and
    `opt` (default AdamW)."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=lr)
    x0 = torch.rand(shape) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    model.train()

    def step() -> None:
        noise = NoiseDraw.draw(gen, shape)
        with precision_ctx(precision):
            loss = diffusion_loss(denoiser, x0, None, SCHEDULE, "eps", rate, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main_train_step(model, batch: int, rate: float, precision: str,
                    opt: torch.optim.Optimizer | None = None) -> Step:
    """This project's RIN: self-conditioned loss, backward, `opt` (default AdamW)."""
    return loss_step(model, model, (batch, model.cfg.channels, *model.cfg.data_shape), rate, precision, opt)


def peer_train_step(peer, batch: int, precision: str, lr: float = 1e-4) -> Step:
    from rin_pytorch import GaussianDiffusion

    diffusion = GaussianDiffusion(peer, train_prob_self_cond=1.0)  # every step runs the no-grad pass, as ours does
    opt = torch.optim.AdamW(diffusion.parameters(), lr=lr)
    x = torch.rand(batch, peer.channels, peer.image_size, peer.image_size)
    diffusion.train()

    def step() -> None:
        with precision_ctx(precision):
            loss = diffusion(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main_sample_call(model, batch: int, precision: str) -> Step:
    """One denoiser call of the sampler: x_t, gamma and the previous step's latents in, prediction and latents out."""
    shape = (batch, model.cfg.channels, *model.cfg.data_shape)
    x = torch.randn(shape)
    gamma = torch.full((batch,), 0.5)
    model.eval()
    with torch.no_grad(), precision_ctx(precision):
        _, state = model(x, gamma, None, None)

    def call() -> None:
        with torch.no_grad(), precision_ctx(precision):
            model(x, gamma, None, state)

    return call


def peer_sample_call(peer, batch: int, precision: str) -> Step:
    x = torch.randn(batch, peer.channels, peer.image_size, peer.image_size)
    t = torch.full((batch,), 0.5)
    peer.eval()
    with torch.no_grad(), precision_ctx(precision):
        x0, latents = peer(x, t, None, None, return_latents=True)

    def call() -> None:
        with torch.no_grad(), precision_ctx(precision):
            peer(x, t, x0, latents, return_latents=True)

    return call


def main_unet(preset: str = "ldm_s") -> torch.nn.Module:
    from meme.presets import PRESETS
    from meme.unet import UNet

    return UNet(PRESETS[preset])


def peer_unet_like(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers' UNet2DModel with this project's U-Net's (MEME / LDM) layout: widths per level, residual blocks
    per level (one more in the decoder, as both do), attention at the same levels and in the middle, heads of the
    same width, GroupNorm groups, the embedding added or as scale-shift, strided-conv down and nearest-conv up."""
    from diffusers import UNet2DModel

    c = model.cfg
    if c.iformer_ratios:
        raise ValueError("diffusers has no iFormer block: compare the plain U-Net presets (ldm_s, ldm_l, unet_fmnist)")
    levels = range(len(c.widths))
    down = [("AttnDownBlock2D" if k in c.attention_levels else "DownBlock2D") for k in levels]
    up = [("AttnUpBlock2D" if k in c.attention_levels else "UpBlock2D") for k in reversed(levels)]
    return UNet2DModel(sample_size=c.data_shape[0], in_channels=c.channels, out_channels=c.channels,
                       block_out_channels=tuple(c.widths), layers_per_block=c.num_res_blocks,
                       down_block_types=tuple(down), up_block_types=tuple(up),
                       attention_head_dim=c.head_width(c.widths[-1]), norm_num_groups=c.norm_groups,
                       resnet_time_scale_shift="scale_shift" if c.scale_shift_norm else "default",
                       dropout=c.dropout)


def _as_denoiser(model, kind: str):
    """Both U-Nets through the Denoiser protocol: diffusers' sees gamma * 1000 as its timestep."""
    if kind == "main":
        return model
    return lambda x, gamma, labels=None, state=None: (model(x, gamma * 1000).sample, None)


def _unet_shape(model, kind: str, batch: int) -> tuple[int, ...]:
    if kind == "main":
        return (batch, model.cfg.channels, *model.cfg.data_shape)
    return (batch, model.config.in_channels, model.config.sample_size, model.config.sample_size)


def unet_train_step(model, batch: int, precision: str, kind: str) -> Step:
    """eps-prediction loss (diffusion.objectives), backward, AdamW: the same step for either U-Net."""
    return loss_step(_as_denoiser(model, kind), model, _unet_shape(model, kind, batch), 0.0, precision)


def unet_call(model, batch: int, precision: str, kind: str) -> Step:
    x = torch.randn(_unet_shape(model, kind, batch))
    gamma = torch.full((batch,), 0.5)
    net = _as_denoiser(model, kind)
    model.eval()

    def call() -> None:
        with torch.no_grad(), precision_ctx(precision):
            net(x, gamma, None, None)

    return call
