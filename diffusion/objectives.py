"""The one place that converts between x0, eps and v, and the training loss (with latent self-conditioning).

Parameterisation: x_t = sqrt(g) x0 + sqrt(1-g) eps, v = sqrt(g) eps - sqrt(1-g) x0, g = gamma(t)
(Salimans & Ho 2022 for v; RIN Alg. 1-2 for the self-conditioned two-pass step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.schedules import Schedule

Prediction = Literal["eps", "x0", "v"]


class Denoiser(Protocol):
    """A network that predicts eps / x0 / v from (x_t, gamma) and carries a state between calls.

    `state` is None on the first call (meaning "no previous state", i.e. zeros) or a tensor whose first dim is
    the batch; the returned state is what the next call should receive (RIN: its final latents).
    """

    def __call__(
        self, x_t: Tensor, gamma: Tensor, labels: Tensor | None = None, state: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]: ...


def _bcast(g: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching `like`'s rank, in `like`'s dtype."""
    return g.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def q_sample(x0: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    """Forward process: x_t = sqrt(g) x0 + sqrt(1-g) eps."""
    g = _bcast(gamma, x0)
    return g.sqrt() * x0 + (1 - g).sqrt() * eps


def target(prediction: Prediction, x0: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    """What a network with this `prediction` type should output for (x0, eps) at noise level gamma."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    g = _bcast(gamma, x0)
    return g.sqrt() * eps - (1 - g).sqrt() * x0


def to_x0_eps(
    prediction: Prediction, output: Tensor, x_t: Tensor, gamma: Tensor, clip_x0: bool = False
) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a network output of the given type; with `clip_x0`, x0 is clipped to [-1, 1] and
    eps is recomputed from the clipped x0 so the pair stays consistent with x_t."""
    g = _bcast(gamma, x_t)
    sg, s1g = g.sqrt(), (1 - g).sqrt()
    if prediction == "eps":
        eps = output
        x0 = (x_t - s1g * eps) / sg
    elif prediction == "x0":
        x0 = output
        eps = (x_t - sg * x0) / s1g.clamp_min(1e-12)
    else:
        x0 = sg * x_t - s1g * output
        eps = s1g * x_t + sg * output
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - sg * x0) / s1g.clamp_min(1e-12)
    return x0, eps


def from_x0_eps(prediction: Prediction, x0: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    """Inverse of `to_x0_eps` (without clipping): the network output that encodes (x0, eps)."""
    return target(prediction, x0, eps, gamma)


@dataclass(frozen=True)
class NoiseDraw:
    """The random draws of one training step for a batch: t ~ U(0,1) (or from `draw_t`, e.g. a MEME expert's soft
    interval assignment), eps ~ N(0,I), and u ~ U(0,1) that keeps an example's self-conditioning latents when
    u < rate. Drawn once for the global batch, sliced per rank."""

    t: Tensor  # (B,)
    eps: Tensor  # (B, *data)
    u: Tensor  # (B,)

    @staticmethod
    def draw(generator: torch.Generator, shape: tuple[int, ...],
             draw_t: Callable[[torch.Generator, int], Tensor] | None = None) -> NoiseDraw:
        dev = generator.device
        t = torch.rand(shape[0], generator=generator, device=dev) if draw_t is None else draw_t(generator, shape[0])
        eps = torch.randn(shape, generator=generator, device=dev)
        u = torch.rand(shape[0], generator=generator, device=dev)
        return NoiseDraw(t, eps, u)

    def rows(self, start: int, stop: int) -> NoiseDraw:
        return NoiseDraw(self.t[start:stop], self.eps[start:stop], self.u[start:stop])

    def to(self, device: torch.device) -> NoiseDraw:
        return NoiseDraw(self.t.to(device), self.eps.to(device), self.u.to(device))


def _has_latents_only_pass(model) -> bool:
    """Whether the network under DDP / torch.compile wrappers can skip what a first pass discards (RIN's last write
    and readout: `latents_only_pass`)."""
    for attr in ("module", "_orig_mod", "module"):  # DDP(compiled) / compiled(DDP) in either order
        model = getattr(model, attr, model)
    return bool(getattr(model, "latents_only_pass", False))


def self_conditioning_state(
    model: Denoiser, x_t: Tensor, gamma: Tensor, labels: Tensor | None, keep: Tensor | None
) -> Tensor | None:
    """First pass of RIN's training step: latents from a pass with no previous state, with the gradient stopped,
    kept for the examples where `keep` is true and zeroed for the others. None when self-conditioning is off."""
    if keep is None:
        return None
    extra = {"latents_only": True} if _has_latents_only_pass(model) else {}
    with torch.no_grad():
        _, state = model(x_t, gamma, labels, None, **extra)
    assert state is not None, "self_cond_rate > 0 needs a denoiser that returns a state"
    return state.detach() * _bcast(keep.float(), state)


def with_context(x_t: Tensor, context: Tensor | None) -> Tensor:
    """Video prediction: x_t (B, C, T, H, W) with its first c frames replaced by the clean context (B, C, c, H, W).
    The network sees context and noisy frames as one clip; only the noisy ones are denoised."""
    if context is None or context.shape[2] == 0:
        return x_t
    return torch.cat([context.to(x_t.dtype), x_t[:, :, context.shape[2] :]], dim=2)


def diffusion_loss(
    model: Denoiser,
    x0: Tensor,
    labels: Tensor | None,
    schedule: Schedule,
    prediction: Prediction,
    self_cond_rate: float,
    noise: NoiseDraw,
    context_frames: int = 0,
) -> Tensor:
    """Mean squared error in the `prediction` space at the drawn t, per example: returns (B,).

    With `context_frames` c > 0 (video, x0 of shape (B, C, T, H, W)), the first c frames enter clean and the loss
    covers frames c..T-1 only.
    """
    noise = noise.to(x0.device)
    gamma = schedule(noise.t)
    x_t = with_context(q_sample(x0, noise.eps, gamma), x0[:, :, :context_frames] if context_frames else None)
    keep = noise.u < self_cond_rate if self_cond_rate > 0 else None
    state = self_conditioning_state(model, x_t, gamma, labels, keep)
    output, _ = model(x_t, gamma, labels, state)
    err = F.mse_loss(output.float(), target(prediction, x0, noise.eps, gamma).float(), reduction="none")
    if context_frames:
        err = err[:, :, context_frames:]
    return err.flatten(1).mean(1)
