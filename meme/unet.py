"""The ADM / LDM U-Net denoiser (Dhariwal & Nichol 2021; Rombach et al. 2022; both `openaimodel.UNetModel`) and
MEME's iU-Net (Lee et al., AAAI 2024): the same U-Net with an iFormer block after every residual block of the
encoder (in place of the encoder's self-attention; the decoder is unchanged: the paper merges the two kinds of block
asymmetrically), whose high-frequency share d_h / d is set per level and falls with depth.

The model maps (x_t, gamma, labels, state) -> (prediction, None): a U-Net carries no state between sampling steps.
It is conditioned on the noise level gamma in [0, 1] (the engine's convention), embedded like RIN's: sinusoidal
features of gamma * noise_embed_scale -> Linear -> SiLU -> Linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.layers import attend
from diffusion.typed import bounded
from meme.iformer import IFormerBlock, split_channels


@dataclass(frozen=True)
class UNetConfig:
    data_shape: tuple[int, ...]  # (H, W) of the input; both divisible by 2^(levels - 1)
    channels: int = bounded(ge=1)  # data channels C, in and out
    model_channels: int = bounded(ge=1)  # width of level 0 (LDM / ADM `model_channels`)
    channel_mult: tuple[int, ...]  # level k is model_channels * channel_mult[k] wide; one entry per level
    num_res_blocks: int = bounded(ge=1)  # residual blocks per encoder level; the decoder has one more per level (ADM)
    attention_levels: tuple[int, ...]  # levels (0 = full resolution) where self-attention follows residual blocks
    head_channels: int = bounded(ge=0)  # channels per attention head (LDM `num_head_channels`); 0: use num_heads
    num_heads: int = bounded(ge=0)  # heads per attention block when head_channels is 0 (ADM `num_heads`)
    dropout: float = bounded(ge=0, lt=1)  # in each residual block, before its second convolution
    norm_groups: int = bounded(ge=1)  # GroupNorm groups (ADM and LDM: 32); must divide every level's width
    scale_shift_norm: bool  # ADM's adaptive GroupNorm (scale and shift from the embedding); False: LDM's addition
    noise_embed_scale: float = bounded(gt=0)  # the sinusoidal embedding sees gamma * scale (RIN: 1000)
    iformer_ratios: tuple[float, ...]  # iU-Net: d_h / d of the encoder's iFormer blocks per level; (): plain U-Net
    iformer_pool: tuple[int, ...]  # iU-Net: low-mixer average-pool size per level (iFormer: 2 early, 1 deeper)
    iformer_mlp_ratio: float = bounded(gt=0)  # iU-Net: MLP hidden width / block width of the iFormer blocks
    # iU-Net: channels per head of the iFormer low mixer (they set the steps the ratios can take: d_l is whole
    # heads); 0: the U-Net's attention head width
    iformer_head_channels: int = bounded(ge=0)
    # iU-Net: the iFormer block also receives the noise-level embedding (SiLU -> Linear, added to its input, as a
    # residual block does); False: only the residual block before it does. The paper's Fig. 4 settles this; it is
    # not available here, so this stays a setting (default False, unverified).
    iformer_time_embed: bool
    num_classes: int = bounded(ge=0)  # 0: unconditional; otherwise a class embedding joins the noise-level embedding
    self_cond: bool  # must be False: a U-Net has no latent state to self-condition on

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def head_width(self, dim: int) -> int:
        """Channels per attention head in a block of width dim."""
        return self.head_channels if self.head_channels > 0 else dim // self.num_heads

    def iformer_head_width(self, dim: int) -> int:
        """Channels per head of the iFormer low mixer in a block of width dim."""
        return self.iformer_head_channels or self.head_width(dim)

    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration cannot build a model."""
        levels = len(self.channel_mult)
        if len(self.data_shape) != 2:
            raise ValueError(f"a U-Net takes images: data_shape must be (H, W), got {self.data_shape}")
        if levels < 1 or min(self.channel_mult) < 1 or self.num_res_blocks < 1 or self.model_channels < 1:
            raise ValueError(
                "channel_mult needs >= 1 level of positive multipliers, num_res_blocks and model_channels must be >= 1"
            )
        if any(s % 2 ** (levels - 1) for s in self.data_shape):
            raise ValueError(f"data_shape {self.data_shape} must be divisible by 2^{levels - 1} for {levels} levels")
        if any(not 0 <= lv < levels for lv in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} must lie in 0..{levels - 1}")
        if any(w % self.norm_groups for w in self.widths):
            raise ValueError(f"norm_groups {self.norm_groups} must divide every level width {self.widths}")
        if (
            self.head_channels < 0
            or (self.head_channels == 0 and self.num_heads < 1)
            or any(w % self.head_width(w) for w in self.widths)
        ):
            raise ValueError(
                f"head_channels {self.head_channels} / num_heads {self.num_heads} must divide every "
                f"level width {self.widths}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.self_cond:
            raise ValueError("a U-Net has no latent state to self-condition on: set train.self_cond_rate to 0")
        self._validate_iformer(levels)

    def _validate_iformer(self, levels: int) -> None:
        if not self.iformer_ratios and not self.iformer_pool:
            return
        if len(self.iformer_ratios) != levels or len(self.iformer_pool) != levels:
            raise ValueError(
                f"iformer_ratios {self.iformer_ratios} and iformer_pool {self.iformer_pool} need one "
                f"entry per level ({levels}), or both empty for a plain U-Net"
            )
        for k, (ratio, pool, width) in enumerate(zip(self.iformer_ratios, self.iformer_pool, self.widths)):
            try:
                split_channels(width, ratio, self.iformer_head_width(width))
            except ValueError as err:
                raise ValueError(f"iformer_ratios[{k}]: {err}") from None
            side = min(self.data_shape) // 2**k
            if pool < 1 or side % pool:
                raise ValueError(f"iformer_pool[{k}] = {pool} must divide the level's {side}-pixel feature map")
        if self.iformer_mlp_ratio <= 0:
            raise ValueError(f"iformer_mlp_ratio must be > 0, got {self.iformer_mlp_ratio}")


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal features of gamma * scale (cos and sin at geometric frequencies, ADM's `timestep_embedding`,
    width `freq_dim`) -> Linear -> SiLU -> Linear to `dim`."""

    def __init__(self, freq_dim: int, dim: int, scale: float):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.net = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, gamma: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=gamma.device) / half)
        arg = gamma.float()[:, None] * self.scale * freqs[None]  # (B, half)
        return self.net(torch.cat([arg.cos(), arg.sin()], dim=1).to(self.net[0].weight.dtype))  # (B, dim)


def zero(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias: a residual branch ending in it starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3, plus the embedding (added, or as GN scale and shift), GN -> SiLU -> dropout ->
    zero-initialised conv3x3; a 1x1 skip when the width changes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.scale_shift = cfg.scale_shift_norm
        self.norm_in = nn.GroupNorm(cfg.norm_groups, c_in)
        self.conv_in = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out if cfg.scale_shift_norm else c_out)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c_out)
        self.drop = nn.Dropout(cfg.dropout)
        self.conv_out = zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))  # (B, C_out, H, W)
        e = self.emb(F.silu(emb))[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm_out(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm_out(h + e))
        return self.skip(x) + self.conv_out(self.drop(h))


class AttentionBlock(nn.Module):
    """x + proj(MHSA(GN(x))) over all H*W positions; proj starts at zero (ADM `AttentionBlock`)."""

    def __init__(self, dim: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, dim)
        self.qkv = nn.Conv1d(dim, 3 * dim, 1)
        self.proj = zero(nn.Conv1d(dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # The 1x1 convolutions as matmuls over (B, HW, C) tokens, so that a head's channels are contiguous: PyTorch's
        # CPU flash kernel needs a unit stride there and falls back to its math path (2x slower here, and holding
        # the (HW, HW) scores) without it. Same weights as the convolutions (ADM's layout of the state dict).
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)  # (B, HW, 3C)
        q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = einops.rearrange(attend(q, k, v), "b h n d -> b n (h d)")  # (B, HW, C)
        out = F.linear(out, self.proj.weight[:, :, 0], self.proj.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Strided conv3x3: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then conv3x3: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A sequence of layers in which residual blocks also receive the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock | IFormerBlock) else layer(x)
        return x


class UNet(nn.Module):
    """The U-Net / iU-Net denoiser: forward(x_t, gamma, labels, state) -> (prediction, None)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        emb_dim = 4 * cfg.model_channels
        self.noise_embed = NoiseLevelEmbedding(cfg.model_channels, emb_dim, cfg.noise_embed_scale)
        self.class_embed = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.encoder = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.channels, cfg.model_channels, 3, padding=1))])
        skips, ch = [cfg.model_channels], cfg.model_channels  # widths of the skip tensors, in push order
        for level, width in enumerate(cfg.widths):
            for _ in range(cfg.num_res_blocks):
                self.encoder.append(EmbedSequential(ResBlock(ch, width, emb_dim, cfg), *self._mixer(level, width)))
                ch = width
                skips.append(ch)
            if level < len(cfg.widths) - 1:
                self.encoder.append(EmbedSequential(Downsample(ch)))
                skips.append(ch)
        self.middle = EmbedSequential(
            ResBlock(ch, ch, emb_dim, cfg), self._attention(ch), ResBlock(ch, ch, emb_dim, cfg)
        )
        self.decoder = nn.ModuleList()
        for level, width in reversed(list(enumerate(cfg.widths))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), width, emb_dim, cfg)]
                ch = width
                if level in cfg.attention_levels:
                    layers.append(self._attention(ch))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.decoder.append(EmbedSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(), zero(nn.Conv2d(ch, cfg.channels, 3, padding=1))
        )

    def _attention(self, dim: int) -> AttentionBlock:
        return AttentionBlock(dim, dim // self.cfg.head_width(dim), self.cfg.norm_groups)

    def _mixer(self, level: int, width: int) -> list[nn.Module]:
        """What follows an encoder residual block: the level's iFormer block in an iU-Net (it carries its own
        attention on the low-frequency channels), else self-attention at attention_levels, else nothing."""
        cfg = self.cfg
        if cfg.iformer_ratios:
            return [
                IFormerBlock(
                    width,
                    cfg.iformer_ratios[level],
                    cfg.iformer_head_width(width),
                    cfg.iformer_pool[level],
                    cfg.iformer_mlp_ratio,
                    emb_dim=4 * cfg.model_channels if cfg.iformer_time_embed else 0,
                )
            ]
        return [self._attention(width)] if level in cfg.attention_levels else []

    def feature_layers(self, gamma: Tensor | None = None) -> dict[str, nn.Module]:
        """The blocks whose (B, C, H, W) outputs MEME's Fourier analysis reads, in depth order: encoder blocks, the
        middle block, decoder blocks (the same at every noise level)."""
        layers = {f"enc{i}": m for i, m in enumerate(self.encoder)}
        layers["mid"] = self.middle
        return layers | {f"dec{i}": m for i, m in enumerate(self.decoder)}

    def embed(self, gamma: Tensor, labels: Tensor | None) -> Tensor:
        emb = self.noise_embed(gamma)  # (B, 4 C)
        if self.class_embed is not None:
            if labels is None:
                raise ValueError("this U-Net is class-conditional (num_classes > 0): pass labels")
            emb = emb + self.class_embed(labels)
        return emb

    def forward(
        self, x_t: Tensor, gamma: Tensor, labels: Tensor | None = None, state: Tensor | None = None
    ) -> tuple[Tensor, None]:
        emb = self.embed(gamma, labels)
        h, skips = x_t, []
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)  # (B, C_last, H / 2^(L-1), W / 2^(L-1))
        for block in self.decoder:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h), None  # (B, C, H, W)
