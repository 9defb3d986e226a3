"""MEME configurations: the paper's latent-space baselines and experts (SPEC.md section 2; LDM FFHQ config), small
ones for Fashion-MNIST on this CPU, and tiny ones for tests.

The registry doubles as the CLI's `--preset` choices. A run's dataset sets data_shape, channels and num_classes;
the values here are each preset's native ones. The exact iU-Net layout and per-level ratios of the paper are not
published: ours are parameters (iformer_ratios), set by the rule in meme.experts.expert_ratios.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from diffusion.schedules import Schedule
from meme.experts import MultiExpert, MultiExpertConfig, expert_ratios, falling_ratios
from meme.unet import UNet, UNetConfig

NUM_EXPERTS = 4  # MEME's N


def _unet(**kw) -> UNetConfig:
    base = dict(
        channels=3,
        num_res_blocks=2,
        head_channels=32,
        num_heads=0,
        dropout=0.0,
        norm_groups=32,
        scale_shift_norm=False,
        noise_embed_scale=1000.0,
        iformer_ratios=(),
        iformer_pool=(),
        iformer_mlp_ratio=4.0,
        iformer_head_channels=0,
        iformer_time_embed=False,
        num_classes=0,
        self_cond=False,
    )
    return UNetConfig(**(base | kw))


def _widths(model_channels: int, mult: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(model_channels * m for m in mult)


# Latent space of an f=4 autoencoder on 256x256 faces: 64x64x3 latents.
# LDM-L, the MEME baseline (CompVis latent-diffusion ffhq-ldm-vq-4: 224 channels, mult 1,2,3,4, 2 residual
# blocks, attention at latent 32/16/8, 32-channel heads); 274M parameters in the paper.
LDM_L = _unet(data_shape=(64, 64), model_channels=224, channel_mult=(1, 2, 3, 4), attention_levels=(1, 2, 3))
# LDM-S: the same layout at 128 channels (~90M, the size of MEME's small baselines).
LDM_S = _unet(data_shape=(64, 64), model_channels=128, channel_mult=(1, 2, 3, 4), attention_levels=(1, 2, 3))
# iU-LDM-S: iFormer blocks after the encoder's residual blocks; level 2 kept at 256 channels: 81.1M, against the
# paper's 82.9M for an iU-Net whose layout it does not publish (test_meme.py keeps it within 3%). Pool 2 on the 64
# and 32 maps, 1 deeper (as iFormer on its 56 and 28 maps). The low mixer's heads are 16 channels wide (the U-Net's
# attention keeps 32), so that the ratio d_h / d can step by 1/8 at level 0 and four experts can differ there.
_IU_MULT = (1, 2, 2, 4)
_IU_WIDTHS = _widths(128, _IU_MULT)
_IU_HEAD = 16
IU_LDM_S = _unet(
    data_shape=(64, 64),
    model_channels=128,
    channel_mult=_IU_MULT,
    attention_levels=(1, 2, 3),
    iformer_ratios=falling_ratios(_IU_WIDTHS, _IU_HEAD, 0.75, 0.25),
    iformer_pool=(2, 2, 1, 1),
    iformer_head_channels=_IU_HEAD,
)

# Every expert's d_h / d falls with depth, a later expert (larger t) starts lower and falls further: tops from 1
# (expert 1: pure convolution at full resolution) to 0.625 (expert 4), bottoms from 0.5 to 0 (pure attention). The
# paper gives the rule, not the values (SPEC section 2: unverified).
EXPERT_TOPS, EXPERT_BOTTOMS = (1.0, 0.625), (0.5, 0.0)


def _meme_ldm(n: int) -> UNetConfig:
    """MEME expert n of 4 in latent space."""
    ratios = expert_ratios(_IU_WIDTHS, _IU_HEAD, n, NUM_EXPERTS, EXPERT_TOPS, EXPERT_BOTTOMS)
    return replace(IU_LDM_S, iformer_ratios=ratios)


# Fashion-MNIST padded to 32x32x1 on a 2-core CPU: four levels down to 4x4, 16 channels at full resolution,
# one residual block per level, ADM's scale-shift norm, 8-channel attention heads. The iFormer low mixer's heads are
# 2 channels wide, so that the ratios step by 1/8, 1/16 and 1/32 at widths 16, 32 and 64 and the four experts can
# differ at every level (with 8-channel heads level 0 allows only 0, 0.5 and 1).
_FM_MULT = (1, 2, 4, 4)
_FM_WIDTHS = _widths(16, _FM_MULT)
UNET_FMNIST = _unet(
    data_shape=(32, 32),
    channels=1,
    model_channels=16,
    channel_mult=_FM_MULT,
    num_res_blocks=1,
    attention_levels=(2, 3),
    head_channels=8,
    norm_groups=8,
    scale_shift_norm=True,
    iformer_mlp_ratio=2.0,
)
_FM_HEAD = 2
IUNET_FMNIST = replace(
    UNET_FMNIST,
    iformer_ratios=falling_ratios(_FM_WIDTHS, _FM_HEAD, 0.75, 0.25),
    iformer_pool=(2, 2, 1, 1),
    iformer_head_channels=_FM_HEAD,
)


def _meme_fmnist(n: int) -> UNetConfig:
    """MEME expert n of 4 on Fashion-MNIST, by the latent-space experts' rule."""
    ratios = expert_ratios(_FM_WIDTHS, _FM_HEAD, n, NUM_EXPERTS, EXPERT_TOPS, EXPERT_BOTTOMS)
    return replace(IUNET_FMNIST, iformer_ratios=ratios)


# Unit tests: a few tens of thousands of parameters.
UNET_TINY = _unet(
    data_shape=(32, 32),
    channels=1,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    head_channels=4,
    norm_groups=4,
    scale_shift_norm=True,
    iformer_mlp_ratio=2.0,
)
IUNET_TINY = replace(UNET_TINY, iformer_ratios=(0.5, 0.25), iformer_pool=(2, 1))

PRESETS: dict[str, UNetConfig] = {
    "ldm_l": LDM_L,
    "ldm_s": LDM_S,
    "iu_ldm_s": IU_LDM_S,
    **{f"meme_ldm_e{n}": _meme_ldm(n) for n in range(1, NUM_EXPERTS + 1)},
    "unet_fmnist": UNET_FMNIST,
    "iunet_fmnist": IUNET_FMNIST,
    **{f"meme_fmnist_e{n}": _meme_fmnist(n) for n in range(1, NUM_EXPERTS + 1)},
    "unet_tiny": UNET_TINY,
    "iunet_tiny": IUNET_TINY,
}

# The template of a multi-expert run (`model.preset: multi_expert`): its experts and their training schedule come
# from the expert runs named in `model.experts` (diffusion.registry.resolve_model).
MULTI_EXPERT = MultiExpertConfig(
    experts=(), train_schedule=None, data_shape=(32, 32), channels=1, num_classes=0, self_cond=False
)
ENSEMBLE = ("multi_expert", MULTI_EXPERT)  # (preset name, template) of a run that routes between expert runs

# The paper's parameter counts beside ours (SPEC.md section 2, MEME Table 1 and the LDM config).
PAPER_PARAMS: dict[str, str] = {
    "ldm_l": "274M (LDM-L)",
    "ldm_s": "90M (ADM-S / LDM-S)",
    "iu_ldm_s": "82.9M (iU-Net)",
    **{f"meme_ldm_e{n}": "82.9M per expert" for n in range(1, NUM_EXPERTS + 1)},
}


def build(cfg: UNetConfig | MultiExpertConfig) -> nn.Module:
    """The network of a resolved preset (diffusion.registry calls this); a router builds its experts."""
    if isinstance(cfg, MultiExpertConfig):
        cfg.validate()
        return MultiExpert([build(c) for c in cfg.experts], Schedule(cfg.train_schedule), cfg)
    return UNet(cfg)


def load_experts(model: MultiExpert, state_dicts: Sequence[Mapping[str, Any]]) -> None:
    """Expert n's trained weights from state_dicts[n - 1]."""
    for expert, state in zip(model.experts, state_dicts, strict=True):
        expert.load_state_dict(state)
