"""Where the diffusion times come from: the sampler's grid from t = 1 down to 0, and a training step's draws,
t ~ U(0, 1) or MEME's soft expert-interval assignment (Lee et al., AAAI 2024, Sec. 3): expert n of N owns
I_n = ((n-1)/N, n/N] and draws from it with probability p_n, else from [0, 1)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from diffusion.config import ExpertConfig

TimeSampler = Callable[[torch.Generator, int], Tensor]  # (generator, batch) -> t (B,)


def time_pairs(steps: int, td: float = 0.0) -> list[tuple[float, float]]:
    """(t_now, t_next) for each step from t=1 down to 0; `td` shifts t_next earlier by td steps (pix2seq)."""
    pairs = []
    for i in range(steps):
        t_now = 1.0 - i / steps
        t_next = max(1.0 - (i + 1 + td) / steps, 0.0)
        pairs.append((t_now, t_next))
    return pairs


def interval_bounds(count: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The N-1 inner boundaries t = n/N, n = 1..N-1, each the float nearest n/N (as the sampler builds its times)."""
    return torch.tensor([n / count for n in range(1, count)], dtype=dtype, device=device)


def owner(t: Tensor, count: int) -> Tensor:
    """1-based expert owning each t: n with t in ((n-1)/N, n/N]; t = 0 belongs to expert 1. (B,) -> (B,) long."""
    bounds = interval_bounds(count, t.dtype, t.device)
    return 1 + (t[:, None] > bounds[None]).sum(dim=1)


def draw_t(generator: torch.Generator, batch: int, n: int, count: int, p: float) -> Tensor:
    """MEME's soft expert strategy: per example, with probability p a t uniform on expert n's interval
    ((n-1)/N, n/N], otherwise a t uniform on [0, 1) (the whole range, own interval included). p = 1 is the hard
    split. Draws two uniforms per example from `generator`, so the result is a pure function of its state."""
    if not (1 <= n <= count and 0.0 <= p <= 1.0):
        raise ValueError(f"expert {n} of {count} with specialisation probability {p}: need 1 <= n <= N, 0 <= p <= 1")
    dev = generator.device
    own = torch.rand(batch, generator=generator, device=dev) < p  # (B,) the coin
    u = torch.rand(batch, generator=generator, device=dev)  # (B,) in [0, 1)
    lo = torch.tensor((n - 1) / count, device=dev)
    inside = torch.maximum((n - u) / count, torch.nextafter(lo, torch.ones_like(lo)))  # in (lo, n/N], never lo
    return torch.where(own, inside, u)


def time_sampler(expert: ExpertConfig | None) -> TimeSampler | None:
    """How a step draws t: None for U(0, 1) (objectives.NoiseDraw draws it); a MEME expert's soft assignment."""
    if expert is None:
        return None
    return partial(draw_t, n=expert.index, count=expert.count, p=expert.p)


def own_interval_rate(count: int, p: float) -> float:
    """Probability that a soft-assignment draw lands in the expert's own interval: p + (1 - p) / N."""
    return p + (1.0 - p) / count
