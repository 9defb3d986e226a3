"""DDPM and DDIM ancestral samplers over the continuous-time gamma(t), driven through the Denoiser protocol.

Each image i owns a torch.Generator seeded with seeds[i]; its initial noise and every step's noise come from
it alone, so an image does not depend on which batch, rank or batch size produced it (EDM's habit).
Step rules: DDPM (Ho et al. 2020, Eq. 11, variance beta_t or beta~_t), DDIM (Song et al. 2021, Eq. 12).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion.config import SampleConfig
from diffusion.objectives import Denoiser, Prediction, _bcast, to_x0_eps, with_context
from diffusion.schedules import Schedule
from diffusion.timesteps import time_pairs


def per_image_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device) -> Tensor:
    """(B, *shape) standard normal noise, row i drawn from generators[i] only."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


def step_ddpm(
    x_t: Tensor, x0: Tensor, eps: Tensor, g_now: Tensor, g_next: Tensor, noise: Tensor, variance: str
) -> Tensor:
    """One ancestral step t -> s with alpha = gamma(t) / gamma(s) (Ho et al. 2020, Eq. 11)."""
    alpha = g_now / g_next
    mean = (x_t - _bcast((1 - alpha) / (1 - g_now).sqrt(), x_t) * eps) / _bcast(alpha.sqrt(), x_t)
    if variance == "large":
        var = 1 - alpha
    else:
        var = (1 - g_next) / (1 - g_now) * (1 - alpha)
    return mean + _bcast(var.clamp_min(0).sqrt(), x_t) * noise


def step_ddim(x0: Tensor, eps: Tensor, g_now: Tensor, g_next: Tensor, noise: Tensor, eta: float) -> Tensor:
    """One DDIM step (Song et al. 2021, Eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's beta~_t."""
    var = eta**2 * (1 - g_next) / (1 - g_now) * (1 - g_now / g_next)
    var = var.clamp_min(0)
    direction = (1 - g_next - var).clamp_min(0).sqrt()
    return _bcast(g_next.sqrt(), x0) * x0 + _bcast(direction, x0) * eps + _bcast(var.sqrt(), x0) * noise


# The label stream's tag: image i's class comes from numpy's SeedSequence([seeds[i], LABEL_STREAM]), a stream apart
# from the torch generator seeded with seeds[i] that makes its noise. (An offset such as seed + 2^40 would not do:
# torch's CPU generator keeps only the low 32 bits of a seed, so it would replay the noise stream's first draw.)
LABEL_STREAM = 0x1ABE1


def sample_labels(seeds: Sequence[int], num_classes: int) -> Tensor | None:
    """Class of image i: drawn from its own seed, so labels are balanced in expectation and batch-independent."""
    if not num_classes:
        return None
    return torch.tensor([int(np.random.default_rng([int(s), LABEL_STREAM]).integers(num_classes)) for s in seeds])


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    shape: Sequence[int],
    seeds: Sequence[int],
    cfg: SampleConfig,
    prediction: Prediction,
    labels: Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    context: Tensor | None = None,
) -> Tensor:
    """Draw len(seeds) samples of per-image `shape` (e.g. (C, H, W)); returns (B, *shape) in [-1, 1].

    `context` (B, C, c, H, W), video only: the clips' first c frames, held fixed at every step (the noise drawn
    for those frames is discarded, so a sample's noise does not depend on c).
    """
    device = torch.device(device)
    schedule = Schedule(cfg.schedule)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if context is not None:
        context = context.to(device)
    x = with_context(per_image_noise(generators, shape, device), context)
    b = x.shape[0]
    state = None
    pairs = time_pairs(cfg.steps, cfg.td)
    for t_now, t_next in tqdm(pairs, desc=f"{cfg.sampler} sampling", disable=not progress, leave=False):
        g_now = schedule(torch.full((b,), t_now, device=device))
        g_next = schedule(torch.full((b,), t_next, device=device))
        output, state = denoiser(x, g_now, labels, state)
        x0, eps = to_x0_eps(prediction, output.float(), x, g_now, clip_x0=cfg.clip_x0)
        if t_next <= 0.0:
            x = x0
            break
        needs_noise = cfg.sampler == "ddpm" or cfg.eta > 0
        noise = per_image_noise(generators, shape, device) if needs_noise else torch.zeros_like(x)
        if cfg.sampler == "ddpm":
            x = step_ddpm(x, x0, eps, g_now, g_next, noise, cfg.variance)
        else:
            x = step_ddim(x0, eps, g_now, g_next, noise, cfg.eta)
        x = with_context(x, context)
    return with_context(x, context).clamp(-1.0, 1.0)
