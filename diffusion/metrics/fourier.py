"""Fourier analysis of a denoiser's feature maps (MEME, Lee et al., AAAI 2024, frequency figures; the measure of
Park & Kim, "How do vision transformers work?", ICLR 2022, Fig. 2): the relative log amplitude of the 2-D Fourier
transform of each layer's output against radial frequency in [0, pi], at a few noise levels t, on real images noised
to t. Convolutions pass high frequencies and self-attention damps them; MEME gives experts at small t more of the
former. Forward hooks collect the feature maps, so any model whose layers emit (B, C, H, W) maps can be analysed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion import io
from diffusion.objectives import q_sample
from diffusion.schedules import Schedule

EPS = 1e-6  # added to |F| before the log, as the ViT analysis does


def radial_bins(size: int) -> tuple[Tensor, Tensor]:
    """For a (size x size) 2-D DFT: each coefficient's radial bin k (its frequency radius sqrt(wx^2 + wy^2) rounded to
    a multiple of the step 2 pi / size) and the bin frequencies 0, 2 pi / size, ..., pi. Coefficients beyond pi (the
    corners) get bin -1. Returns ((size, size) long, (size // 2 + 1,) float)."""
    w = torch.fft.fftfreq(size) * 2 * math.pi  # (size,) radians per pixel in [-pi, pi)
    radius = (w[:, None] ** 2 + w[None, :] ** 2).sqrt()  # (size, size)
    step = 2 * math.pi / size
    k = (radius / step).round().long()
    k[k > size // 2] = -1
    return k, torch.arange(size // 2 + 1) * step


def relative_log_amplitude(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean log amplitude log(|FFT2(h)| + EPS) over examples, channels and the coefficients of each radial bin, minus
    its value at frequency 0. (B, C, H, H) -> (frequencies (H // 2 + 1,), relative log amplitude (H // 2 + 1,)); the
    first entry of the latter is 0 by construction."""
    if features.ndim != 4 or features.shape[-1] != features.shape[-2]:
        raise ValueError(f"expected square feature maps (B, C, H, H), got shape {tuple(features.shape)}")
    size = features.shape[-1]
    log_amp = (torch.fft.fft2(features.float()).abs() + EPS).log().mean(dim=(0, 1))  # (H, H)
    bins, freqs = radial_bins(size)
    keep = bins >= 0
    sums = torch.zeros(len(freqs)).index_add_(0, bins[keep], log_amp[keep])
    counts = torch.zeros(len(freqs)).index_add_(0, bins[keep], torch.ones_like(log_amp[keep]))
    profile = sums / counts  # (H // 2 + 1,)
    return freqs, profile - profile[0]


def feature_layers(model: nn.Module, gamma: Tensor) -> dict[str, nn.Module]:
    """The layers whose outputs are analysed, in depth order, from the model's own `feature_layers(gamma)` (a MEME
    U-Net: its blocks; a MEME router: those of the expert that owns `gamma`)."""
    if not hasattr(model, "feature_layers"):
        raise ValueError(f"{type(model).__name__} names no feature layers: the Fourier analysis needs a model with "
                         "feature_layers(gamma) -> {name: module emitting (B, C, H, W) maps} (MEME's U-Nets, routers)")
    return model.feature_layers(gamma)


def _keep(seen: dict[str, Tensor], name: str, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
    seen[name] = output


@torch.no_grad()
def capture(model: nn.Module, layers: Mapping[str, nn.Module], x_t: Tensor, gamma: Tensor,
            labels: Tensor | None = None) -> dict[str, Tensor]:
    """Run the denoiser once and return each layer's output (forward hooks, removed afterwards)."""
    seen: dict[str, Tensor] = {}
    handles = [module.register_forward_hook(partial(_keep, seen, name)) for name, module in layers.items()]
    try:
        model(x_t, gamma, labels, None)
    finally:
        for h in handles:
            h.remove()
    return seen


@dataclass(frozen=True)
class LayerSpectrum:
    name: str
    channels: int
    resolution: int  # H = W of the feature map
    frequencies: list[float]  # radians per pixel, 0 .. pi
    relative_log_amplitude: dict[str, list[float]]  # t (as text) -> one value per frequency


def analyse(model: nn.Module, x0: Tensor, t_values: Sequence[float], schedule: Schedule, seed: int,
            labels: Tensor | None = None) -> list[LayerSpectrum]:
    """Noise the real images x0 (B, C, H, W) in [-1, 1] to each t with the model's training schedule (noise from
    `seed`, the same draw for every t), run the model, and take each layer's relative log amplitude."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)  # (B, C, H, W)
    by_layer: dict[str, LayerSpectrum] = {}
    for t in t_values:
        gamma = schedule(torch.full((x0.shape[0],), float(t), device=x0.device))  # (B,)
        x_t = q_sample(x0, eps, gamma)
        layers = feature_layers(model, gamma)
        for name, h in capture(model, layers, x_t, gamma, labels).items():
            freqs, rla = relative_log_amplitude(h)
            spec = by_layer.setdefault(name, LayerSpectrum(name, h.shape[1], h.shape[-1], freqs.tolist(), {}))
            if (spec.channels, spec.resolution) != (h.shape[1], h.shape[-1]):
                raise ValueError(f"layer {name} changes shape with t ({spec.resolution} vs {h.shape[-1]} pixels): "
                                 "the experts of an ensemble must share their layout")
            spec.relative_log_amplitude[f"{t:g}"] = rla.tolist()
    return list(by_layer.values())


def high_frequency(spectra: Sequence[LayerSpectrum], t: float) -> list[float]:
    """Each layer's relative log amplitude at its highest frequency (pi): the ViT analysis' summary per depth."""
    return [s.relative_log_amplitude[f"{t:g}"][-1] for s in spectra]


def write_json(path: Path, runs: Mapping[str, Sequence[LayerSpectrum]], meta: Mapping[str, object]) -> Path:
    data = {**meta, "runs": {name: [vars(s) for s in spectra] for name, spectra in runs.items()}}
    return io.write_json(path, data)


def plot(runs: Mapping[str, Sequence[LayerSpectrum]], t_values: Sequence[float], path: Path) -> Path:
    """One panel per (run, t): a curve per layer, coloured by depth (dark: input side, bright: output side), then
    a last column with each layer's value at pi against depth, one line per t."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    cols = len(t_values) + 1
    fig = Figure(figsize=(3.2 * cols, 2.6 * len(runs)))
    axes = fig.subplots(len(runs), cols, squeeze=False, sharey=True)
    cmap = colormaps["viridis"]
    for row, (name, spectra) in enumerate(runs.items()):
        depth = max(len(spectra) - 1, 1)
        for col, t in enumerate(t_values):
            ax = axes[row][col]
            for i, s in enumerate(spectra):
                ax.plot(s.frequencies, s.relative_log_amplitude[f"{t:g}"], color=cmap(i / depth), lw=1)
            ax.set_xticks([0, math.pi / 2, math.pi], ["0", "π/2", "π"])
            ax.set_title(f"{name}, t = {t:g}", fontsize=9)
            ax.grid(alpha=0.3)
        ax = axes[row][-1]
        for t in t_values:
            ax.plot(range(len(spectra)), high_frequency(spectra, t), marker=".", label=f"t = {t:g}")
        ax.set_xticks(range(len(spectra)), [s.name for s in spectra], rotation=90, fontsize=6)
        ax.set_title(f"{name}: at frequency π, by layer", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("Δ log amplitude")
    for col in range(len(t_values)):
        axes[-1][col].set_xlabel("frequency (radians / pixel)")
    fig.suptitle("Relative log amplitude of feature maps; one curve per block, dark (input side) to bright (output "
                 "side)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path
