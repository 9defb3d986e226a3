"""Small raw datasets in the exact on-disk formats the data sources read: idx files, CIFAR-10 python batches,
ImageFolder trees, short video files; plus a DatasetConfig builder for tests."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffusion.config import DatasetConfig

IDX_TYPE = {np.dtype(np.uint8): 0x08}


def dataset_config(source: str, root: str | Path, **overrides: Any) -> DatasetConfig:
    """A DatasetConfig with small-test defaults; every field can be overridden."""
    video = source in ("video_folder", "moving_mnist")
    base = dict(source=source, root=str(root), resolution=32, channels=1, num_classes=10, frames=8 if video else 0,
                random_flip=False, shard_size=7, max_samples=0, seed=0, clip_stride=1, skip_corrupt=False,
                download=False)
    return DatasetConfig(**(base | overrides))


def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's idx format (uint8), gzip-compressed when the name ends in .gz."""
    header = bytes([0, 0, IDX_TYPE[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, mtime=0) if path.suffix == ".gz" else raw)


def make_idx_dataset(root: Path, n_train: int, n_test: int, *, gz: bool = True, raw_dir: bool = True,
                     seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-style digits (N, 28, 28) uint8 + labels, in torchvision's root/raw layout (or flat); all distinct."""
    rng = np.random.default_rng(seed)
    folder = root / "raw" if raw_dir else root
    ext = ".gz" if gz else ""
    out = {}
    for split, n, (img_stem, lbl_stem) in (("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                           ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(folder / f"{img_stem}{ext}", images)
        write_idx(folder / f"{lbl_stem}{ext}", labels)
        out[split] = (images, labels.astype(np.int64))
    return out


def make_cifar_batches(root: Path, per_batch: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """root/cifar-10-batches-py/data_batch_1..5 and test_batch: pickled dicts with b'data' (N, 3072) uint8 and
    b'labels', as in the official archive. Returns (images (N, 32, 32, 3), labels) per split."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict[str, list] = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out["test" if name == "test_batch" else "train"].append((images, np.array(labels)))
    return {s: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for s, v in out.items()}


def random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def make_image_folder(root: Path, classes: list[str] | None, per_class: int, seed: int = 0) -> list[Path]:
    """ImageNet-style root/<class>/*.{png,JPEG} (classes) or FFHQ-style nested flat folders (classes=None), with
    assorted sizes and modes (RGB, grey, RGBA). Returns the files written."""
    rng = np.random.default_rng(seed)
    sizes = [(50, 40), (80, 120), (64, 64), (130, 70), (33, 47)]
    modes = ["RGB", "L", "RGBA", "RGB", "RGB"]
    files = []
    for c, cls in enumerate(classes or ["00000", "01000"]):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[(c + i) % len(sizes)]
            image = random_image(rng, w, h, modes[(c + i) % len(modes)])
            path = folder / (f"img{i:03d}.JPEG" if i % 3 == 2 and image.mode != "RGBA" else f"img{i:03d}.png")
            image.save(path)
            files.append(path)
    return files


def write_video(path: Path, frames: np.ndarray, fps: int = 10, codec: str = "libx264") -> None:
    """(T, H, W, 3) uint8 -> a video file through PyAV (H and W even for yuv420p)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def moving_square_video(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a bright square drifting over a smooth background (compresses well, decodes stably)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, int(rng.integers(0, 256)))], -1)
    video = np.repeat(base[None].astype(np.uint8), num_frames, axis=0)
    for t in range(num_frames):
        y, x = (3 * t) % (height - 8), (2 * t) % (width - 8)
        video[t, y : y + 8, x : x + 8] = 255
    return video


def replace_config(cfg: DatasetConfig, **changes: Any) -> DatasetConfig:
    return dataclasses.replace(cfg, **changes)
