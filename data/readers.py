"""Raw dataset readers: MNIST-style idx files, CIFAR-10 python batches (without running pickles), image folders with
class sub-folders; the ADM centre crop. Each split becomes a list of lazily read Units (video: data/video.py)."""

from __future__ import annotations

import codecs
import gzip
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.tarformat import DataError
from diffusion.config import DatasetConfig

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}
IDX_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "validation")}  # folder sources: split sub-folders
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), gzip-compressed or not, checking its header against its size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: truncated or corrupt idx file ({len(raw)} bytes, header says {expected})")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def find_idx(root: str | Path, stem: str) -> Path:
    """`stem` or `stem.gz` under root (also root/raw, torchvision's layout), else an error saying where we looked."""
    root = Path(root)
    candidates = [d / f"{stem}{ext}" for d in (root, root / "raw") for ext in ("", ".gz")]
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(
        f"idx file {stem} not found; looked at {[str(c) for c in candidates]}. For Fashion-MNIST on Debian: "
        "`apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist); for MNIST set "
        "datasets.<name>.download: true (torchvision's mirrors, needs a network); or point "
        "datasets.<name>.root in params.yaml at a folder holding the idx files"
    )


def load_idx_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of an MNIST-style split."""
    if split not in IDX_SPLITS:
        raise ValueError(f"MNIST-style data has splits {sorted(IDX_SPLITS)}, not {split!r}")
    images_stem, labels_stem = IDX_SPLITS[split]
    images = read_idx(find_idx(root, images_stem))
    labels = read_idx(find_idx(root, labels_stem)).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def download_idx(source: str, root: str | Path) -> None:
    """torchvision's download route for MNIST / Fashion-MNIST: its mirrors and md5s, into root/raw."""
    from torchvision.datasets import MNIST, FashionMNIST
    from torchvision.datasets.utils import download_and_extract_archive

    dataset = {"mnist": MNIST, "fashion_mnist": FashionMNIST}[source]
    for filename, md5 in dataset.resources:
        errors = []
        for mirror in dataset.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{filename}", download_root=str(Path(root) / "raw"),
                                             filename=filename, md5=md5)
                break
            except OSError as err:
                errors.append(f"{mirror}: {err}")
        else:
            raise OSError(f"could not download {filename}: {'; '.join(errors)}")


def load_digits(cfg: DatasetConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """load_idx_split, first fetching the files through torchvision when they are missing and cfg.download."""
    try:
        return load_idx_split(cfg.root, split)
    except FileNotFoundError as missing:
        if not cfg.download:
            raise
        source = "fashion_mnist" if cfg.source == "fashion_mnist" else "mnist"
        try:
            download_idx(source, cfg.root)
        except OSError as err:
            raise FileNotFoundError(f"{missing}; download: true was tried and failed: {err}") from None
        return load_idx_split(cfg.root, split)


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array reconstructor, whatever module it lives in
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3's protocol-2 pickles spell bytes
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: numpy arrays and plain containers; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return _CIFAR_GLOBALS[(module, name)]


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch -> (images (N, 32, 32, 3) uint8, labels (N,) int64), without running arbitrary code."""
    try:
        with open(path, "rb") as fh:
            entry = _CifarUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({err}); re-extract cifar-10-python.tar.gz") from err
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in dict(entry).items()}
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be an (N, 3072) uint8 array, got {getattr(data, 'shape', data)!r}")
    if labels is None or len(labels) != data.shape[0]:
        raise DataError(f"{path}: 'labels' must hold one label per image ({data.shape[0]})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R plane, G plane, B plane
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def find_cifar_folder(root: str | Path) -> Path:
    root = Path(root)
    candidates = [root / CIFAR_FOLDER, root]
    for c in candidates:
        if (c / "test_batch").exists() or (c / "data_batch_1").exists():
            return c
    raise FileNotFoundError(
        f"CIFAR-10 python batches not found; looked at {[str(c) for c in candidates]}. Set "
        "datasets.<name>.download: true (torchvision fetches cifar-10-python.tar.gz, needs a network) or extract "
        f"cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that {root}/{CIFAR_FOLDER} exists"
    )


def load_cifar_split(cfg: DatasetConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64), downloading through torchvision if allowed and missing."""
    if split not in CIFAR_SPLITS:
        raise ValueError(f"CIFAR-10 has splits {sorted(CIFAR_SPLITS)}, not {split!r}")
    try:
        folder = find_cifar_folder(cfg.root)
    except FileNotFoundError as missing:
        if not cfg.download:
            raise
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR10.url, cfg.root, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except OSError as err:
            raise FileNotFoundError(f"{missing}; download: true was tried and failed: {err}") from None
        folder = find_cifar_folder(cfg.root)
    missing_files = [f for f in CIFAR_SPLITS[split] if not (folder / f).exists()]
    if missing_files:
        raise FileNotFoundError(f"{folder}: missing {missing_files}; re-extract cifar-10-python.tar.gz there")
    parts = [read_cifar_batch(folder / f) for f in CIFAR_SPLITS[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM / pix2seq resize: halve with BOX while the short side >= 2*size, BICUBIC to short side == size, then
    crop the centre. (H, W) image -> (size, size) or (size, size, C) uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def fit_image(array: np.ndarray, cfg: DatasetConfig) -> np.ndarray:
    """(h, w) or (h, w, C) uint8 -> (res, res, cfg.channels): digits smaller than res are zero-padded (centred),
    anything else goes through center_crop_arr; channels are converted (grey <-> RGB, PIL's luma)."""
    res, mode = cfg.resolution, "RGB" if cfg.channels == 3 else "L"
    array = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
    image_mode = "L" if array.ndim == 2 else "RGB"
    if image_mode != mode:
        array = np.asarray(Image.fromarray(array).convert(mode))
    h, w = array.shape[:2]
    if (h, w) == (res, res):
        out = array
    elif h <= res and w <= res and cfg.source in ("mnist", "fashion_mnist"):
        top, left = (res - h) // 2, (res - w) // 2
        out = np.zeros((res, res, *array.shape[2:]), dtype=array.dtype)
        out[top : top + h, left : left + w] = array
    else:
        out = center_crop_arr(Image.fromarray(array), res)
    return out[..., None] if out.ndim == 2 else out


@dataclass(frozen=True)
class Unit:
    """One raw input (an image, a video file, a digit) read lazily into one or more samples."""

    index: int  # position in the source's own sorted order; sample keys derive from it
    ref: str  # provenance for metadata and errors: a path relative to root, or "<file>[i]"
    label: int  # class index, -1 when unlabelled
    read: Callable[[], Iterator[tuple[str, np.ndarray, dict[str, Any]]]]  # (key suffix, array, extra metadata)


class SplitMissing(LookupError):
    """A folder dataset that has no such split (e.g. FFHQ has no test folder)."""


def _array_sample(images: np.ndarray, i: int, cfg: DatasetConfig) -> Iterator[tuple[str, np.ndarray, dict]]:
    yield "", fit_image(images[i], cfg), {}


def array_units(images: np.ndarray, labels: np.ndarray, ref: str, cfg: DatasetConfig) -> list[Unit]:
    return [Unit(i, f"{ref}[{i}]", int(labels[i]), partial(_array_sample, images, i, cfg)) for i in range(len(images))]


def split_folder(root: Path, split: str) -> Path:
    """root/<split> (test also as val/ or validation/); a root without split folders is all 'train'."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder {root} does not exist. Put the images (or videos) there: class sub-folders for labelled "
            "data (ImageNet: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; Kinetics: train/<class>/*.mp4), a flat folder "
            "for FFHQ / CelebA-HQ; or `dvc pull` data/raw; or point datasets.<name>.root in params.yaml at the data"
        )
    names = SPLIT_FOLDERS.get(split, (split,))
    for name in names:
        if (root / name).is_dir():
            return root / name
    has_splits = any((root / n).is_dir() for ns in SPLIT_FOLDERS.values() for n in ns)
    if split == "train" and not has_splits:
        return root
    raise SplitMissing(f"{root} has no {split} split (looked for {[str(root / n) for n in names]})")


def list_files(folder: Path, exts: set[str]) -> list[Path]:
    """Files under folder (recursively) with one of the extensions, case-insensitive, sorted by relative path."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def labelled_files(root: Path, split: str, exts: set[str], num_classes: int) -> list[tuple[Path, int]]:
    """(file, label) pairs; with num_classes > 0 labels come from the train split's sorted class folders."""
    folder = split_folder(root, split)
    files = list_files(folder, exts)
    if num_classes == 0:
        return [(p, -1) for p in files]
    train = split_folder(root, "train")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) != num_classes:
        raise DataError(f"{train}: found {len(classes)} class folders, but num_classes is {num_classes}; "
                        "fix datasets.<name>.num_classes (0 for unlabelled data) or the folder layout")
    index = {c: i for i, c in enumerate(classes)}
    pairs = []
    for p in files:
        cls = p.relative_to(folder).parts[0]
        if cls not in index:
            raise DataError(f"{p}: not inside one of the {num_classes} class folders of {train}")
        pairs.append((p, index[cls]))
    return pairs


def read_image(path: Path, cfg: DatasetConfig) -> Iterator[tuple[str, np.ndarray, dict]]:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if cfg.channels == 3 else "L")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err
    array = center_crop_arr(image, cfg.resolution)
    yield "", array[..., None] if array.ndim == 2 else array, {}


def folder_units(cfg: DatasetConfig, split: str, exts: set[str], reader: Callable) -> list[Unit]:
    root = Path(cfg.root)
    pairs = labelled_files(root, split, exts, cfg.num_classes)
    if not pairs:
        raise FileNotFoundError(f"{split_folder(root, split)}: no files with extensions {sorted(exts)}")
    return [Unit(i, p.relative_to(root).as_posix(), label, partial(reader, p, cfg))
            for i, (p, label) in enumerate(pairs)]
