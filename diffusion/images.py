"""The one conversion between model tensors in [-1, 1] and uint8 images, sample grids, and PNG files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.io import atomic_write


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding as the ADM evaluator's samplers do; video
    (B, C, T, H, W) -> (B, T, H, W, C)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(1, -1).cpu().numpy()


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..255 -> float32 in [-1, 1], any layout."""
    return x.float() / 127.5 - 1.0


def from_uint8(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Inverse of to_uint8_nhwc: (B, [T,] H, W, C) uint8 -> (B, C, [T,] H, W) float in [-1, 1]."""
    return to_unit_range(torch.as_tensor(np.asarray(x)).movedim(-1, 1))


def grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return out


def video_grid(clips: np.ndarray, max_clips: int = 8, context_frames: int = 0, pad: int = 2) -> np.ndarray:
    """(N, T, H, W, C) uint8 -> one image, a clip per row and a frame per column; with `context_frames` c, a
    bright bar under the first c frames marks them as given rather than generated."""
    clips = clips[:max_clips]
    n, t, h, w, c = clips.shape
    out = grid(clips.reshape(n * t, h, w, c), ncols=t, pad=pad)
    if context_frames:
        bar = np.zeros((pad + 2, out.shape[1], c), dtype=np.uint8)
        bar[1:-1, pad : context_frames * (w + pad)] = 255
        out = np.concatenate([out, bar])
    return out


def save_png_atomic(image: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """Write an (H, W, C) uint8 image as PNG, atomically (diffusion.io.atomic_write)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
