"""The iFormer block (Si et al., "Inception Transformer", NeurIPS 2022; sail-sg/iFormer HighMixer, LowMixer,
Mixer, Block) on (B, C, H, W) feature maps, as MEME's iU-Net (Lee et al., AAAI 2024) merges it into a U-Net: an
inception mixer that sends d_h channels to convolution / max-pooling (high frequencies) and d_l channels to pooled
self-attention (low frequencies).

Channel bookkeeping for a block of width d and high-frequency ratio r = d_h / d (`split_channels`):
- d_l = d - d_h is a whole number of attention heads of the block's head width w (iFormer: w = d / num_heads and
  d_l = attention_heads * w), so r may only take the values 1 - k w / d, k = 0 .. d / w;
- d_h is split in two halves (max-pool branch, depthwise-conv branch), so d_h must be even; each branch doubles
  its half (iFormer's expansion), so the high mixer emits 2 d_h channels;
- the fusion sees 2 d_h + d_l channels and projects them back to d.
r = 1 is a pure convolution mixer, r = 0 pure (pooled) attention; both are allowed.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.layers import attend


def split_channels(dim: int, ratio: float, head_width: int) -> tuple[int, int]:
    """(d_h, d_l) for a block of width `dim` whose high mixer gets the fraction `ratio` of the channels; raises
    ValueError, naming the nearest valid ratios, when d_l is not a whole number of heads or d_h is odd."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"high-frequency ratio d_h/d must lie in [0, 1], got {ratio}")
    if head_width < 1 or dim % head_width:
        raise ValueError(f"head width {head_width} must divide the block width {dim}")
    heads = (1.0 - ratio) * dim / head_width  # low-mixer heads this ratio asks for
    if not math.isclose(heads, round(heads), abs_tol=1e-6):
        below, above = 1 - math.ceil(heads) * head_width / dim, 1 - math.floor(heads) * head_width / dim
        raise ValueError(
            f"high-frequency ratio {ratio} at width {dim} gives d_l = {dim - ratio * dim:g} channels, "
            f"not a whole number of {head_width}-channel heads; nearest valid ratios: {below:g}, "
            f"{above:g}"
        )
    d_l = round(heads) * head_width
    d_h = dim - d_l
    if d_h % 2:
        raise ValueError(
            f"high-frequency ratio {ratio} at width {dim} gives d_h = {d_h}, which cannot be halved "
            "between the max-pool and depthwise-conv branches; pick an even d_h"
        )
    return d_h, d_l


class HighMixer(nn.Module):
    """Two branches on halves of the d_h channels, each widening its half x2 (iFormer's high-frequency mixer):
    Y_h1 = GELU(DWConv3x3(FC(Z_h1))), Y_h2 = GELU(FC(MaxPool3x3(Z_h2))). (B, d_h, H, W) -> (B, 2 d_h, H, W)."""

    def __init__(self, d_h: int):
        super().__init__()
        half = d_h // 2
        self.conv_in = nn.Conv2d(half, d_h, kernel_size=1, bias=False)  # FC before the depthwise conv
        self.conv_dw = nn.Conv2d(d_h, d_h, kernel_size=3, padding=1, groups=d_h, bias=False)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.pool_fc = nn.Conv2d(half, d_h, kernel_size=1)  # FC after the max-pool
        self.half = half

    def forward(self, z: Tensor) -> Tensor:
        y1 = F.gelu(self.conv_dw(self.conv_in(z[:, : self.half])))  # (B, d_h, H, W)
        y2 = F.gelu(self.pool_fc(self.pool(z[:, self.half :])))  # (B, d_h, H, W)
        return torch.cat([y1, y2], dim=1)


class LowMixer(nn.Module):
    """iFormer's low-frequency mixer Y_l = Up(MHSA(AvgPool(Z_l))): attention over (H/p) x (W/p) pooled tokens,
    upsampled back by nearest-neighbour repetition; p = 1 attends over every position. (B, d_l, H, W) -> same."""

    def __init__(self, d_l: int, heads: int, pool: int):
        super().__init__()
        self.heads, self.pool = heads, pool
        self.qkv = nn.Linear(d_l, 3 * d_l)

    def forward(self, z: Tensor) -> Tensor:
        h, w = z.shape[-2:]
        if h % self.pool or w % self.pool:
            raise ValueError(f"low-mixer pool size {self.pool} must divide the feature map {h}x{w}")
        pooled = F.avg_pool2d(z, self.pool) if self.pool > 1 else z  # (B, d_l, h/p, w/p)
        tokens = einops.rearrange(pooled, "b c y x -> b (y x) c")
        q, k, v = einops.rearrange(self.qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = attend(q, k, v)  # (B, heads, n, d_l / heads)
        out = einops.rearrange(out, "b h (y x) d -> b (h d) y x", y=h // self.pool)
        return F.interpolate(out, scale_factor=self.pool, mode="nearest") if self.pool > 1 else out


class InceptionMixer(nn.Module):
    """Split d = d_h + d_l, mix each part, fuse: Y_c = [Y_h; Y_l], Y = FC(Y_c + DWConv3x3(Y_c)) (iFormer's fusion)."""

    def __init__(self, dim: int, ratio: float, head_width: int, pool: int):
        super().__init__()
        self.d_h, self.d_l = split_channels(dim, ratio, head_width)
        self.high = HighMixer(self.d_h) if self.d_h else None
        self.low = LowMixer(self.d_l, self.d_l // head_width, pool) if self.d_l else None
        fused = 2 * self.d_h + self.d_l
        self.fuse_dw = nn.Conv2d(fused, fused, kernel_size=3, padding=1, groups=fused, bias=False)
        self.proj = nn.Conv2d(fused, dim, kernel_size=1)

    @property
    def fused_channels(self) -> int:
        return 2 * self.d_h + self.d_l

    def forward(self, x: Tensor) -> Tensor:
        parts = []
        if self.high is not None:
            parts.append(self.high(x[:, : self.d_h]))  # (B, 2 d_h, H, W)
        if self.low is not None:
            parts.append(self.low(x[:, self.d_h :]))  # (B, d_l, H, W)
        y = torch.cat(parts, dim=1)  # (B, 2 d_h + d_l, H, W)
        return self.proj(y + self.fuse_dw(y))  # (B, d, H, W)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (iFormer normalises channels-last tokens)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class IFormerBlock(nn.Module):
    """x = x + Mixer(LN(x)); x = x + MLP(LN(x)), with a 1x1-conv GELU MLP. The two branch outputs start at zero
    (ADM's habit for residual branches in a denoiser; iFormer itself uses a 1e-6 layer scale to the same end)."""

    def __init__(self, dim: int, ratio: float, head_width: int, pool: int, mlp_ratio: float, dropout: float = 0.0,
                 emb_dim: int = 0):
        super().__init__()
        hidden = int(round(dim * mlp_ratio))
        # emb_dim > 0: the noise-level embedding, projected, is added to the block's input (as in a residual block)
        self.emb = nn.Linear(emb_dim, dim) if emb_dim else None
        self.norm1, self.norm2 = ChannelLayerNorm(dim, eps=1e-6), ChannelLayerNorm(dim, eps=1e-6)
        self.mixer = InceptionMixer(dim, ratio, head_width, pool)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Dropout(dropout), nn.Conv2d(hidden, dim, 1))
        for layer in (self.mixer.proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.emb is not None:
            if emb is None:
                raise ValueError("this iFormer block takes the noise-level embedding (emb_dim > 0); pass emb")
            x = x + self.emb(F.silu(emb))[:, :, None, None]  # (B, d, H, W)
        x = x + self.mixer(self.norm1(x))  # (B, d, H, W)
        return x + self.mlp(self.norm2(x))
