"""Continuous-time noise schedules gamma(t) = alpha_bar(t), falling from 1 at t=0 to 0 at t=1.

Formulas follow pix2seq `diffusion_utils` (RIN, Jabri et al. 2023, Sec. 3 and App. B):
x_t = sqrt(gamma(t)) x_0 + sqrt(1 - gamma(t)) eps.
"""

from __future__ import annotations

import math

import torch

from diffusion.config import ScheduleConfig

GAMMA_MIN = 1e-9  # gamma is clipped to [GAMMA_MIN, 1] so that sqrt(gamma) and 1/sqrt(gamma) stay finite


def cosine(t: torch.Tensor, start: float = 0.0, end: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """cos(pi/2 * s)^(2 tau) over s = start + t (end - start), rescaled to run from 1 to 0."""
    power = 2.0 * tau
    v_start = math.cos(start * math.pi / 2) ** power
    v_end = math.cos(end * math.pi / 2) ** power
    v = torch.cos((t * (end - start) + start) * math.pi / 2) ** power
    return ((v_end - v) / (v_end - v_start)).clamp(GAMMA_MIN, 1.0)


def sigmoid(t: torch.Tensor, start: float = -3.0, end: float = 3.0, tau: float = 0.9) -> torch.Tensor:
    """gamma = (-sig((t (end - start) + start) / tau) + sig(end / tau)) / (sig(end / tau) - sig(start / tau))."""
    v_start = 1.0 / (1.0 + math.exp(-start / tau))
    v_end = 1.0 / (1.0 + math.exp(-end / tau))
    v = torch.sigmoid((t * (end - start) + start) / tau)
    return ((v_end - v) / (v_end - v_start)).clamp(GAMMA_MIN, 1.0)


def linear(t: torch.Tensor) -> torch.Tensor:
    return (1.0 - t).clamp(GAMMA_MIN, 1.0)


class Schedule:
    """gamma(t) for a ScheduleConfig; call it on a tensor of times in [0, 1]."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64) if t.dtype == torch.float64 else t.float()
        if self.cfg.kind == "cosine":
            return cosine(t, self.cfg.start, self.cfg.end, self.cfg.tau)
        if self.cfg.kind == "sigmoid":
            return sigmoid(t, self.cfg.start, self.cfg.end, self.cfg.tau)
        return linear(t)

    def __repr__(self) -> str:
        c = self.cfg
        return f"Schedule({c.kind}, start={c.start}, end={c.end}, tau={c.tau})"
