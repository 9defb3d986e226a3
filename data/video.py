"""Video sources: a folder of video files (Kinetics-style) cut into fixed-stride clips with PyAV, and Moving-MNIST
generated from MNIST digits by the standard recipe (Srivastava et al. 2015: two digits bouncing in 64x64, 20 frames).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from data.readers import IDX_SPLITS, Unit, center_crop_arr, load_digits
from data.tarformat import DataError
from diffusion.config import DatasetConfig

VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg"}
AV_PIN = "av==18.1.0"  # PyAV, the video decoder (bundles FFmpeg)
DIGIT = 28  # MNIST digit side
NUM_DIGITS = 2  # digits per Moving-MNIST sequence
STEP = 0.1  # per-frame displacement as a fraction of the free canvas (size - 28), the standard recipe


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise ImportError(f"reading video files needs PyAV: `pip install {AV_PIN}`") from None
    return av


def read_video_frames(path: Path, size: int, channels: int) -> np.ndarray:
    """Every frame of the first video stream, each through center_crop_arr: (N, size, size, C) uint8."""
    av = _import_av()
    mode = "RGB" if channels == 3 else "L"
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(center_crop_arr(frame.to_image().convert(mode), size))
    except (av.FFmpegError, OSError) as err:
        raise DataError(f"{path}: undecodable video ({type(err).__name__}: {err})") from err
    if not frames:
        return np.zeros((0, size, size, channels), dtype=np.uint8)
    video = np.stack(frames)  # (N, size, size) or (N, size, size, 3)
    return video[..., None] if video.ndim == 3 else video


def clip_starts(num_frames: int, frames: int, stride: int) -> range:
    """First frames of the clips of `frames` frames, `stride` apart, that fit in a video of num_frames."""
    return range(0, num_frames - frames + 1, stride)


def read_video_clips(path: Path, cfg: DatasetConfig) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """(key suffix, clip (T, H, W, C) uint8, metadata) for each clip of one video file."""
    video = read_video_frames(path, cfg.resolution, cfg.channels)
    for start in clip_starts(len(video), cfg.frames, cfg.clip_stride):
        yield f"_{start:06d}", video[start : start + cfg.frames], {"start_frame": start, "video_frames": len(video)}


def bouncing_positions(rng: np.random.Generator, frames: int, free: int) -> np.ndarray:
    """Top-left corners (T, 2) as (y, x) of a digit moving at constant speed and bouncing off the canvas edges."""
    pos = rng.random(2)  # (y, x) in units of the free canvas
    theta = rng.random() * 2 * math.pi
    vel = np.array([math.sin(theta), math.cos(theta)]) * STEP
    out = np.empty((frames, 2))
    for t in range(frames):
        pos = pos + vel
        for axis in range(2):
            if pos[axis] <= 0.0 or pos[axis] >= 1.0:
                pos[axis] = min(max(pos[axis], 0.0), 1.0)
                vel[axis] = -vel[axis]
        out[t] = pos
    return (out * free).astype(np.int64)


def moving_mnist_sequence(digits: np.ndarray, picks: list[int], rng: np.random.Generator, frames: int,
                          size: int) -> np.ndarray:
    """Digits (N, 28, 28) uint8, the ones in `picks` bouncing in a size x size canvas -> (T, size, size) uint8.

    Overlaps combine by maximum, as in the original generator.
    """
    canvas = np.zeros((frames, size, size), dtype=np.uint8)
    for d in picks:
        for t, (y, x) in enumerate(bouncing_positions(rng, frames, size - DIGIT)):
            window = canvas[t, y : y + DIGIT, x : x + DIGIT]
            np.maximum(window, digits[d], out=window)
    return canvas


def _moving_sample(digits: np.ndarray, labels: np.ndarray, i: int, cfg: DatasetConfig,
                   split: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), i])  # per sequence: caps do not shift it
    picks = [i, *(int(j) for j in rng.integers(len(digits), size=NUM_DIGITS - 1))]
    clip = moving_mnist_sequence(digits, picks, rng, cfg.frames, cfg.resolution)[..., None]  # (T, H, W, 1)
    if cfg.channels == 3:
        clip = np.repeat(clip, 3, axis=-1)
    yield "", clip, {"digits": picks, "digit_labels": [int(labels[j]) for j in picks]}


def moving_mnist_units(cfg: DatasetConfig, split: str) -> list[Unit]:
    """One sequence per MNIST digit of the split (that digit plus a seeded random partner)."""
    if cfg.resolution < DIGIT:
        raise ValueError(f"Moving-MNIST needs resolution >= {DIGIT}, got {cfg.resolution}")
    digits, labels = load_digits(cfg, split)
    if digits.shape[1:] != (DIGIT, DIGIT):
        raise DataError(f"{cfg.root}: Moving-MNIST needs 28x28 digits, got {digits.shape[1:]}")
    ref = IDX_SPLITS[split][0]
    return [Unit(i, f"{ref}[{i}]", -1, partial(_moving_sample, digits, labels, i, cfg, split))
            for i in range(len(digits))]
