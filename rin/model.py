"""Recurrent Interface Network (Jabri, Fleet, Chen, ICML 2023, Sec. 2-3): read / process / write blocks over
an interface of patch tokens and a smaller set of latents, with latent self-conditioning (the warm start).

Images are (B, C, H, W) with 2-D patches; video is (B, C, T, H, W) with 3-D patches: the tokenizer is the only
part that knows which. The model maps (x_t, gamma, labels, previous latents) -> (prediction, latents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.layers import attend
from diffusion.typed import bounded


@dataclass(frozen=True)
class RINConfig:
    data_shape: tuple[int, ...]  # spatial shape served to the model: (H, W) for images, (T, H, W) for video
    channels: int = bounded(ge=1)  # data channels C
    patch: tuple[int, ...]  # patch size per spatial dim, e.g. (2, 2) or (2, 4, 4); kernel = stride
    num_blocks: int = bounded(ge=1)  # B read/process/write blocks, weights not shared
    process_layers: int = bounded(ge=1)  # K latent self-attention layers per block
    num_latents: int = bounded(ge=2)  # m latent tokens in total, including the noise-level (and class) token
    latent_dim: int = bounded(ge=16)  # d' latent width (the noise-level embedding needs >= 2 x 8 frequencies)
    interface_dim: int = bounded(ge=1)  # d interface width
    latent_heads: int = bounded(ge=1)  # heads of latent self-attention
    rw_heads: int = bounded(ge=1)  # heads of the read and write cross-attention
    latent_mlp_ratio: float = bounded(gt=0)  # MLP hidden = ratio * latent_dim
    interface_mlp_ratio: float = bounded(gt=0)  # MLP hidden = ratio * interface_dim (write MLP)
    dropout: float = bounded(ge=0, lt=1)  # hidden-unit dropout in the latent process MLPs (pix2seq `drop_units`)
    drop_path: float = bounded(ge=0, lt=1)  # stochastic depth on the latent process layers
    num_classes: int = bounded(ge=0)  # 0: unconditional; otherwise a class token joins the latents
    self_cond: bool  # build the warm-start path Z_init = Z_emb + LN0(Z_prev + MLP(Z_prev))
    noise_embed_scale: float = bounded(gt=0)  # the sinusoidal embedding sees gamma * scale
    token_norm: bool = True  # LayerNorm the patch embeddings (pix2seq); it divides out each patch's scale
    # Kernel of a depthwise convolution over the interface's token grid after each write (pix2seq's optional
    # `conv_kernel_size` unit); 0 (the paper's configurations) leaves tokens to exchange information via latents only.
    interface_conv: int = bounded(ge=0, default=0)
    # drop_path on every latent process layer (the authors' code), or rising linearly from 0 to it with depth (ViT)
    drop_path_schedule: Literal["constant", "linear"] = "constant"
    # LayerNorm on the keys / values of the read and write cross-attention (pix2seq `xattn_enc_ln`, off in the
    # authors' RIN configs; on in the CPU presets, which were tuned with it)
    rw_kv_norm: bool = True
    # The noise-level embedding as pix2seq's ScalarEmbedding(normalize=True): sinusoids at 10000^(-k / half) and
    # standardised per example before the MLP; False: sinusoids at 10000^(-k / (half - 1)), not standardised (the CPU
    # presets were tuned so)
    noise_embed_pix2seq: bool = False

    @property
    def num_tokens(self) -> int:
        """Interface length n = prod(data_shape / patch)."""
        return math.prod(s // p for s, p in zip(self.data_shape, self.patch, strict=True))

    @property
    def num_cond_tokens(self) -> int:
        return 1 + (1 if self.num_classes > 0 else 0)

    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration cannot build a model."""
        if len(self.patch) != len(self.data_shape) or len(self.patch) not in (2, 3):
            raise ValueError(f"patch {self.patch} must have one entry per spatial dim of data_shape {self.data_shape}")
        for s, p in zip(self.data_shape, self.patch, strict=True):
            if p < 1 or s % p:
                raise ValueError(f"patch {self.patch} must divide data_shape {self.data_shape}")
        if self.num_latents <= self.num_cond_tokens:
            raise ValueError(f"num_latents {self.num_latents} must exceed the {self.num_cond_tokens} condition tokens")
        for dim, heads, name in ((self.latent_dim, self.latent_heads, "latent"),
                                 (min(self.latent_dim, self.interface_dim), self.rw_heads, "rw")):
            if dim % heads:
                raise ValueError(f"{name}_heads={heads} must divide the attention width {dim}")
        if self.interface_conv < 0 or (self.interface_conv and self.interface_conv % 2 == 0):
            raise ValueError(f"interface_conv {self.interface_conv} must be 0 (off) or an odd kernel size")
        if self.latent_dim % 8:
            raise ValueError(f"latent_dim {self.latent_dim} must be a multiple of 8 (noise-level embedding)")


class MLP(nn.Module):
    """Linear -> GELU -> dropout -> Linear."""

    def __init__(self, dim: int, ratio: float, dropout: float = 0.0):
        super().__init__()
        hidden = int(round(dim * ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class Attention(nn.Module):
    """Multi-head attention from queries of width dim_q to a context of width dim_kv, in width dim_att."""

    def __init__(self, dim_q: int, dim_kv: int, heads: int, dim_att: int | None = None):
        super().__init__()
        dim_att = dim_att or dim_q
        self.heads = heads
        self.to_q = nn.Linear(dim_q, dim_att)
        self.to_kv = nn.Linear(dim_kv, 2 * dim_att)
        self.to_out = nn.Linear(dim_att, dim_q)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = einops.rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, h, n, d_h)
        k, v = einops.rearrange(self.to_kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        out = attend(q, k, v)  # (B, h, n, d_h)
        return self.to_out(einops.rearrange(out, "b h n d -> b n (h d)"))


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the residual branch per example with probability p."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


class SelfAttentionLayer(nn.Module):
    """Pre-LN transformer layer on the latents: Z = Z + MHA(Z, Z); Z = Z + MLP(Z)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, drop_path: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, heads)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.drop_path = drop_path

    def forward(self, z: Tensor) -> Tensor:
        h = self.norm1(z)
        z = z + drop_path(self.attn(h, h), self.drop_path, self.training)
        return z + drop_path(self.mlp(self.norm2(z)), self.drop_path, self.training)


class CrossAttentionLayer(nn.Module):
    """Pre-LN cross-attention + MLP: x = x + MHA(x, ctx); x = x + MLP(x). Read: x=Z, ctx=X; write: x=X, ctx=Z."""

    def __init__(self, dim: int, dim_context: int, heads: int, mlp_ratio: float, kv_norm: bool = True):
        super().__init__()
        self.norm_q, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim_context) if kv_norm else nn.Identity()
        self.attn = Attention(dim, dim_context, heads, dim_att=min(dim, dim_context))
        self.mlp = MLP(dim, mlp_ratio) if mlp_ratio > 0 else None

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context))
        return x + self.mlp(self.norm_mlp(x)) if self.mlp is not None else x


class TokenConv(nn.Module):
    """x = x + Linear(GELU(DWConv(LN(x)))) over the token grid: neighbouring patches mix directly. The projection
    starts at zero, so the unit starts as the identity."""

    def __init__(self, dim: int, grid: tuple[int, ...], kernel: int):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(grid)]
        self.grid = grid
        self.norm = nn.LayerNorm(dim)
        self.conv = conv(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.norm(x).transpose(1, 2).reshape(b, d, *self.grid)  # (B, d, *grid), a channels-last view
        if h.device.type == "cpu":
            # fp32 on CPU, also under bf16 autocast: oneDNN's channels-last depthwise backward took 9 ms in fp32
            # against 17 ms in bf16 for the video run's (16, 128, 8, 8, 8) grid (benchmarks/speed.py)
            with torch.autocast("cpu", enabled=False):
                h = self.conv(h.float())
        else:
            h = self.conv(h)
        return x + self.proj(F.gelu(h.flatten(2).transpose(1, 2)))  # (B, n, d)


class RINBlock(nn.Module):
    """read (latents <- interface), K x process (latents), write (interface <- latents) [, token conv]."""

    def __init__(self, cfg: RINConfig, drop_paths: list[float]):
        super().__init__()
        self.read = CrossAttentionLayer(cfg.latent_dim, cfg.interface_dim, cfg.rw_heads, cfg.latent_mlp_ratio,
                                        cfg.rw_kv_norm)
        self.process = nn.ModuleList(
            SelfAttentionLayer(cfg.latent_dim, cfg.latent_heads, cfg.latent_mlp_ratio, cfg.dropout, dp)
            for dp in drop_paths
        )
        self.write = CrossAttentionLayer(cfg.interface_dim, cfg.latent_dim, cfg.rw_heads, cfg.interface_mlp_ratio,
                                         cfg.rw_kv_norm)
        grid = tuple(s // p for s, p in zip(cfg.data_shape, cfg.patch, strict=True))
        self.conv = TokenConv(cfg.interface_dim, grid, cfg.interface_conv) if cfg.interface_conv else None

    def forward(self, z: Tensor, x: Tensor, write: bool = True) -> tuple[Tensor, Tensor]:
        """`write` False: the latents only (the interface comes back unchanged)."""
        z = self.read(z, x)  # (B, m, d')
        for layer in self.process:
            z = layer(z)
        if not write:
            return z, x
        x = self.write(x, z)  # (B, n, d)
        if self.conv is not None:
            x = self.conv(x)
        return z, x


def sincos_positions(grid: tuple[int, ...], dim: int) -> Tensor:
    """(prod(grid), dim) sin-cos features: dim split evenly over the axes, each axis half sin, half cos of its
    coordinate at geometric frequencies (Vaswani et al. 2017, per axis as in MAE / pix2seq)."""
    per_axis = (dim // len(grid)) // 2 * 2
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    feats = []
    for c in coords:
        freqs = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / max(per_axis // 2, 1))
        arg = c.reshape(-1, 1) * freqs[None]  # (n, per_axis / 2)
        feats += [arg.sin(), arg.cos()]
    out = torch.cat(feats, dim=1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1])).float()  # (n, dim)


class PatchTokenizer(nn.Module):
    """Non-overlapping 2-D or 3-D patches -> LayerNorm'd tokens + learned positions, and the inverse readout."""

    def __init__(self, data_shape: tuple[int, ...], channels: int, patch: tuple[int, ...], dim: int,
                 norm: bool = True):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(patch)]
        self.grid = tuple(s // p for s, p in zip(data_shape, patch, strict=True))
        self.patch, self.channels = patch, channels
        self.stem = conv(channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        # Learned positions, initialised with fixed sin-cos features (pix2seq's `sin_cos_plus_learned`): tokens are
        # LayerNorm'd to unit scale first, so a 0.02-scale random start would leave position nearly invisible.
        self.pos = nn.Parameter(sincos_positions(self.grid, dim))
        self.out_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, math.prod(patch) * channels)
        axes = "t h w"[-2 * len(patch) + 1 :].split()  # ["h", "w"] or ["t", "h", "w"]
        pats = [f"p{i}" for i in range(len(patch))]
        self._unpatch = (
            f"b ({' '.join(axes)}) ({' '.join(pats)} c) -> b c "
            + " ".join(f"({a} {p})" for a, p in zip(axes, pats, strict=True))
        )
        self._sizes = dict(zip(axes, self.grid, strict=True)) | {p: s for p, s in zip(pats, patch, strict=True)}

    def tokens(self, x: Tensor) -> Tensor:
        """(B, C, *spatial) -> (B, n, d)."""
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.norm(t) + self.pos

    def readout(self, x: Tensor) -> Tensor:
        """(B, n, d) -> (B, C, *spatial)."""
        return einops.rearrange(self.out(self.out_norm(x)), self._unpatch, **self._sizes, c=self.channels)


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal features of gamma * scale (width dim/4) -> Linear -> SiLU -> Linear (pix2seq ScalarEmbedding)."""

    def __init__(self, dim: int, scale: float, pix2seq: bool = False):
        super().__init__()
        self.freq_dim, self.scale, self.pix2seq = dim // 4, scale, pix2seq
        self.net = nn.Sequential(nn.Linear(self.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, gamma: Tensor) -> Tensor:
        half = self.freq_dim // 2
        steps = half if self.pix2seq else half - 1
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=gamma.device) / steps)
        arg = gamma.float()[:, None] * self.scale * freqs[None]  # (B, half)
        feats = torch.cat([arg.sin(), arg.cos()], dim=1)  # (B, freq_dim)
        if self.pix2seq:  # ScalarEmbedding(normalize=True): standardised per example
            feats = (feats - feats.mean(1, keepdim=True)) / feats.std(1, keepdim=True, unbiased=False)
        return self.net(feats.to(self.net[0].weight.dtype))


class RIN(nn.Module):
    """The RIN denoiser: forward(x_t, gamma, labels, latents_prev) -> (prediction, latents)."""

    # forward(..., latents_only=True) returns (None, latents) without the last write and the readout, whose outputs
    # a self-conditioning first pass discards (diffusion.objectives.self_conditioning_state)
    latents_only_pass = True

    def __init__(self, cfg: RINConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tokenizer = PatchTokenizer(cfg.data_shape, cfg.channels, cfg.patch, cfg.interface_dim, cfg.token_norm)
        self.latents = nn.Parameter(torch.zeros(cfg.num_latents - cfg.num_cond_tokens, cfg.latent_dim))
        nn.init.trunc_normal_(self.latents, std=0.02)
        self.noise_embed = NoiseLevelEmbedding(cfg.latent_dim, cfg.noise_embed_scale, cfg.noise_embed_pix2seq)
        self.class_embed = nn.Embedding(cfg.num_classes, cfg.latent_dim) if cfg.num_classes else None
        if cfg.self_cond:
            self.prev_norm_in = nn.LayerNorm(cfg.latent_dim)
            self.prev_mlp = MLP(cfg.latent_dim, cfg.latent_mlp_ratio)
            self.prev_norm = nn.LayerNorm(cfg.latent_dim)
            nn.init.zeros_(self.prev_norm.weight)  # warm start: Z_init = Z_emb at initialisation
            nn.init.zeros_(self.prev_norm.bias)
        total = cfg.num_blocks * cfg.process_layers
        rates = ([cfg.drop_path] * total if cfg.drop_path_schedule == "constant" else
                 [cfg.drop_path * i / max(total - 1, 1) for i in range(total)])
        self.blocks = nn.ModuleList(
            RINBlock(cfg, rates[b * cfg.process_layers : (b + 1) * cfg.process_layers]) for b in range(cfg.num_blocks)
        )
        self.apply(_init_linear)

    def init_latents(self, gamma: Tensor, labels: Tensor | None, latents_prev: Tensor | None) -> Tensor:
        """Z_init = [Z_emb; noise token; class token] (+ LN0(Z_prev + MLP(Z_prev)) with self-conditioning). Without
        previous latents (a first pass, the examples the training step drops, a sampler's first step) the warm start
        runs on zeros, as the authors' model does, so the mode that sampling's first step uses is trained."""
        b = gamma.shape[0]
        parts = [self.latents.expand(b, -1, -1), self.noise_embed(gamma)[:, None]]  # (B, m-c, d'), (B, 1, d')
        if self.class_embed is not None:
            if labels is None:
                raise ValueError("this RIN is class-conditional (num_classes > 0): pass labels")
            parts.append(self.class_embed(labels)[:, None])
        z = torch.cat(parts, dim=1)  # (B, m, d')
        if self.cfg.self_cond:
            zp = torch.zeros_like(z) if latents_prev is None else latents_prev.to(z.dtype)
            z = z + self.prev_norm(zp + self.prev_mlp(self.prev_norm_in(zp)))
        return z

    def forward(
        self, x_t: Tensor, gamma: Tensor, labels: Tensor | None = None, latents_prev: Tensor | None = None,
        latents_only: bool = False,
    ) -> tuple[Tensor | None, Tensor]:
        x = self.tokenizer.tokens(x_t)  # (B, n, d)
        z = self.init_latents(gamma, labels, latents_prev)  # (B, m, d')
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            z, x = block(z, x, write=not (latents_only and i == last))
        if latents_only:
            return None, z
        return self.tokenizer.readout(x), z  # (B, C, *spatial), (B, m, d')


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    if isinstance(m, TokenConv):
        nn.init.zeros_(m.proj.weight)
