"""MEME's multi-architecture multi-expert strategy (Lee et al., AAAI 2024): N experts, expert n owning the time
interval I_n = ((n-1)/N, n/N]; soft interval assignment for training; per-expert iFormer ratio schedules; and the
router that sends every sampling step to the expert that owns it.

Routing is by noise level. The sampler hands a denoiser gamma, not t, and a run may sample with a schedule other
than the one it trained with (RIN trains with sigmoid and samples with cosine). An expert has learnt the noise levels
gamma_train(t) for t in its interval, so `MultiExpert` holds the experts' *training* schedule and sends gamma to the
expert n with gamma_train(n/N) <= gamma < gamma_train((n-1)/N): it inverts gamma -> t through the training schedule
by comparison with the N-1 boundary noise levels (exact and monotone, no numerical inversion). When the run samples
with its training schedule, this is routing by the sampler's own t, boundaries included. Passing the sampler's t
through an extended Denoiser call instead would pick the expert of the right time but, whenever the two schedules
differ, possibly of the wrong noise level; and it would change the call every sampler and RIN make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.config import ScheduleConfig
from diffusion.schedules import Schedule
from diffusion.timesteps import interval_bounds
from meme.iformer import split_channels


def valid_ratios(dim: int, head_width: int) -> list[float]:
    """Every high-frequency ratio d_h / d an iFormer block of width dim accepts (whole heads, even d_h)."""
    out = []
    for heads in range(dim // head_width + 1):
        try:
            split_channels(dim, 1 - heads * head_width / dim, head_width)
        except ValueError:
            continue
        out.append(1 - heads * head_width / dim)
    return out


def falling_ratios(widths: Sequence[int], head_width: int, top: float, bottom: float) -> tuple[float, ...]:
    """A per-level ratio schedule falling linearly from `top` at level 0 to `bottom` at the deepest level, each
    level's value snapped to the nearest ratio its width accepts (ties to the higher ratio)."""
    levels = len(widths)
    out = []
    for k, dim in enumerate(widths):
        want = top + (bottom - top) * k / max(levels - 1, 1)
        out.append(min(valid_ratios(dim, head_width), key=lambda r: (abs(r - want), -r)))
    return tuple(out)


def expert_ratios(
    widths: Sequence[int],
    head_width: int,
    n: int,
    count: int,
    tops: tuple[float, float],
    bottoms: tuple[float, float],
) -> tuple[float, ...]:
    """Expert n's schedule. MEME: d_h / d_l falls with depth, and falls faster for an expert at larger t. Each
    expert falls linearly from its top (level 0) to its bottom (deepest level); tops move linearly from tops[0]
    (expert 1, near t = 0) to tops[1] (expert N), bottoms from bottoms[0] to bottoms[1]. With a bottom range wider
    than the top range, a later expert starts lower and falls further; presets check that the snapped values fall
    at every level and differ between experts at every level (tests/meme/test_meme.py)."""
    f = (n - 1) / max(count - 1, 1)
    top = tops[0] + (tops[1] - tops[0]) * f
    bottom = bottoms[0] + (bottoms[1] - bottoms[0]) * f
    return falling_ratios(widths, head_width, top, bottom)


@dataclass(frozen=True)
class MultiExpertConfig:
    """A multi-expert run's model: the architectures of its experts, in interval order, and the training schedule
    that ties their intervals to noise levels. Filled by diffusion.registry.resolve_model from the expert runs."""

    experts: tuple[Any, ...]  # expert n's model config (a UNetConfig in MEME) at position n - 1
    train_schedule: ScheduleConfig | None  # the experts' common training schedule (routing boundaries)
    data_shape: tuple[int, ...]
    channels: int
    num_classes: int
    self_cond: bool  # must be False

    def validate(self) -> None:
        if not self.experts or self.train_schedule is None:
            raise ValueError(
                "the multi_expert preset needs model.experts: the names of its expert runs, expert 1 (t near 0) first"
            )
        for n, cfg in enumerate(self.experts, start=1):
            if (cfg.data_shape, cfg.channels, cfg.num_classes) != (self.data_shape, self.channels, self.num_classes):
                raise ValueError(
                    f"expert {n} models {cfg.channels}x{cfg.data_shape} with {cfg.num_classes} classes, "
                    f"the multi-expert run {self.channels}x{self.data_shape} with {self.num_classes}"
                )
        if self.self_cond:
            raise ValueError(
                "a multi-expert run has no latent state to self-condition on: set train.self_cond_rate to 0"
            )


class MultiExpert(nn.Module):
    """A Denoiser over N experts that sends each example to the expert owning its noise level (see the module
    docstring). The state is passed on to whichever expert is called (U-Nets return None)."""

    def __init__(self, experts: Sequence[nn.Module], train_schedule: Schedule, cfg: MultiExpertConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList(experts)
        self.train_schedule = train_schedule

    def feature_layers(self, gamma: Tensor) -> dict[str, nn.Module]:
        """The feature layers (UNet.feature_layers) of the expert that owns the noise level `gamma`, which every
        example must share."""
        owner = self.route(gamma)
        if not bool((owner == owner[0]).all()):
            raise ValueError("a MEME router's feature maps come from one expert: give every example the same t")
        return self.experts[int(owner[0])].feature_layers(gamma)

    def route(self, gamma: Tensor) -> Tensor:
        """0-based index of the expert owning each noise level: how many boundaries gamma_train(n/N), n = 1..N-1,
        gamma lies below. The boundaries are computed on gamma's device and in its dtype, by the same kernels that
        computed the sampler's gamma, so a step at t = n/N meets its boundary exactly. (B,) -> (B,) long."""
        dtype = gamma.dtype if gamma.dtype == torch.float64 else torch.float32
        bounds = self.train_schedule(interval_bounds(len(self.experts), dtype, gamma.device))  # (N-1,) falling
        return (gamma.to(dtype)[:, None] < bounds[None]).sum(dim=1)

    def forward(
        self, x_t: Tensor, gamma: Tensor, labels: Tensor | None = None, state: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        idx = self.route(gamma)  # (B,)
        first = int(idx[0])
        if bool((idx == first).all()):  # a sampling step: one expert for the whole batch
            return self.experts[first](x_t, gamma, labels, state)
        output, new_state = None, None
        for e in idx.unique().tolist():
            rows = (idx == e).nonzero().squeeze(1)
            out, st = self.experts[e](
                x_t[rows], gamma[rows], None if labels is None else labels[rows], None if state is None else state[rows]
            )
            if output is None:
                output = out.new_empty((x_t.shape[0], *out.shape[1:]))
            output[rows] = out
            if st is not None:
                if new_state is None:
                    new_state = st.new_zeros((x_t.shape[0], *st.shape[1:]))
                new_state[rows] = st
        return output, new_state
