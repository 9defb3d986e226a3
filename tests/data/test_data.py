"""Data stage: raw sources -> WebDataset shards -> loader (diffusion.data, diffusion.shards, diffusion.video,
diffusion.loader): round trips, determinism, rank splits, corrupt input, S3."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data import prepare, readers, video
from data.loader import assign_shards, loader_from_config, make_loader
from data.prepare import write_dataset_shards
from data.readers import center_crop_arr
from data.tarformat import (
    MANIFEST,
    DataError,
    ManifestMismatch,
    ShardWriter,
    iter_tar_samples,
    ustar_index,
    write_manifest,
)
from diffusion.config import ConfigError, DatasetConfig, load_params
from tests.rawdata import (
    dataset_config,
    make_cifar_batches,
    make_idx_dataset,
    make_image_folder,
    moving_square_video,
    replace_config,
    write_video,
)


def load_all(loader) -> tuple[np.ndarray, np.ndarray]:
    """Every batch of an evaluation loader -> (uint8 (N, C, ...) images, (N,) labels)."""
    xs, ys = [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        xs.append(((x + 1) * 127.5).round().to(torch.uint8).numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def multiset(images: np.ndarray, labels: np.ndarray) -> Counter:
    return Counter((img.tobytes(), int(lbl)) for img, lbl in zip(images, labels, strict=True))


def padded_digits(images: np.ndarray, res: int = 32) -> np.ndarray:
    """(N, 28, 28) -> (N, 1, res, res), zero-padded in the centre."""
    out = np.zeros((len(images), 1, res, res), dtype=np.uint8)
    top = (res - 28) // 2
    out[:, 0, top : top + 28, top : top + 28] = images
    return out


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def idx_shards(tmp_path_factory) -> tuple[Path, DatasetConfig, dict]:
    """A fake MNIST (53 train, 19 test) in torchvision's raw/ layout, sharded 7 per tar."""
    tmp = tmp_path_factory.mktemp("idx")
    raw = make_idx_dataset(tmp / "MNIST", 53, 19)
    cfg = dataset_config("mnist", tmp / "MNIST")
    manifests = write_dataset_shards(cfg, "mnist", tmp / "shards")
    return tmp / "shards", cfg, {"raw": raw, "manifests": manifests}


def test_idx_round_trip_same_pixels_labels_and_manifest(idx_shards):
    root, cfg, info = idx_shards
    for split, n in (("train", 53), ("test", 19)):
        manifest = info["manifests"][split]
        images, labels = info["raw"][split]
        assert manifest["num_samples"] == n and manifest["num_shards"] == -(-n // 7)
        assert [s["num_samples"] for s in manifest["shards"]] == [7] * (n // 7) + ([n % 7] if n % 7 else [])
        assert manifest["class_histogram"] == np.bincount(labels, minlength=10).tolist()
        assert manifest["sample_shape"] == [1, 32, 32]
        assert json.loads((root / split / MANIFEST).read_text()) == manifest
        got_images, got_labels = load_all(make_loader(root, split, 5, train=False))
        assert got_images.shape == (n, 1, 32, 32)
        assert multiset(got_images, got_labels) == multiset(padded_digits(images), labels)


def test_shard_members_are_png_cls_json_with_provenance(idx_shards):
    root, _, info = idx_shards
    shard = root / "train" / "shard-000000.tar"
    samples = list(iter_tar_samples(shard.read_bytes(), str(shard)))
    assert len(samples) == 7
    images, labels = info["raw"]["train"]
    for s in samples:
        assert {"png", "cls", "json"} <= set(s)
        meta = json.loads(s["json"])
        i = meta["index"]
        assert s["__key__"] == f"{i:08d}" and meta["split"] == "train" and meta["ref"].endswith(f"[{i}]")
        assert int(s["cls"]) == labels[i] == meta["label"]
        pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert np.array_equal(pixels, padded_digits(images[i : i + 1])[0, 0])


def test_shards_are_byte_identical_for_same_input_and_seed(idx_shards, tmp_path):
    root, cfg, _ = idx_shards
    write_dataset_shards(cfg, "mnist", tmp_path / "again")
    assert shard_bytes(tmp_path / "again") == shard_bytes(root)
    tar = root / "train" / "shard-000000.tar"
    assert oct(tar.stat().st_mode & 0o777) == "0o644"
    write_dataset_shards(replace_config(cfg, seed=1), "mnist", tmp_path / "reseeded", splits=("train",))
    assert (tmp_path / "reseeded/train/shard-000000.tar").read_bytes() != tar.read_bytes()
    same = load_all(make_loader(tmp_path / "reseeded", "train", 64, train=False))
    assert multiset(*same) == multiset(*load_all(make_loader(root, "train", 64, train=False)))


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (3, 2)])
def test_ranks_and_workers_cover_every_sample_exactly_once(idx_shards, world_size, num_workers):
    root, _, info = idx_shards
    images, labels = info["raw"]["train"]
    seen: Counter = Counter()
    for rank in range(world_size):
        loader = make_loader(root, "train", 4, train=False, rank=rank, world_size=world_size,
                             num_workers=num_workers)
        got = multiset(*load_all(loader))
        assert sum(got.values()) == loader.rank_samples
        seen += got
    assert seen == multiset(padded_digits(images), labels)
    assert max(seen.values()) == 1


def test_training_shard_deal_is_disjoint_and_complete_every_epoch():
    for epoch in range(4):
        dealt = [assign_shards(11, r, 3, w, 2, epoch, seed=5) for r in range(3) for w in range(2)]
        flat = sorted(i for d in dealt for i in d)
        assert flat == list(range(11))
    assert assign_shards(11, 0, 3, 0, 2, 0, 5) != assign_shards(11, 0, 3, 0, 2, 1, 5)  # re-dealt per epoch


def test_training_loader_repeats_forever_shuffles_and_flips(idx_shards):
    root, _, info = idx_shards
    images, labels = info["raw"]["train"]
    originals = {img.tobytes() for img in padded_digits(images)}
    flipped = {img[..., ::-1].copy().tobytes() for img in padded_digits(images)}
    loader = make_loader(root, "train", 8, train=True, seed=3, random_flip=True, shuffle_buffer=20)
    batches = [b for _, b in zip(range(20), loader, strict=False)]  # 160 samples > 53: several epochs
    assert all(x.shape == (8, 1, 32, 32) and y.shape == (8,) for x, y in batches)
    got = [img.tobytes() for x, _ in batches for img in ((x + 1) * 127.5).round().to(torch.uint8).numpy()]
    assert set(got) <= originals | flipped
    assert set(got) & flipped - originals and set(got) & originals - flipped
    plain = make_loader(root, "train", 8, train=True, seed=3, shuffle_buffer=20)
    got_plain = [img.tobytes() for _, (x, _y) in zip(range(10), plain, strict=False)
                 for img in ((x + 1) * 127.5).round().to(torch.uint8).numpy()]
    assert set(got_plain) <= originals
    eval_order = load_all(make_loader(root, "train", 8, train=False))[1]
    train_order = torch.cat([y for _, y in batches])[: len(eval_order)].numpy()
    assert not np.array_equal(eval_order, train_order)


def test_training_needs_a_shard_per_reader(idx_shards):
    root, _, _ = idx_shards
    with pytest.raises(DataError, match="3 shards for 4 readers"):
        make_loader(root, "test", 4, train=True, world_size=2, num_workers=2)


def test_loader_from_config_checks_shape_and_uses_flip(idx_shards):
    root, cfg, _ = idx_shards
    assert loader_from_config(cfg, root, "test", 4, train=False).num_samples == 19
    with pytest.raises(DataError, match=r"shape \[1, 32, 32\].*\[1, 64, 64\]"):
        loader_from_config(replace_config(cfg, resolution=64), root, "test", 4, train=False)


def test_cifar_batches_round_trip_with_channel_layout(tmp_path):
    raw = make_cifar_batches(tmp_path / "cifar", per_batch=6)
    cfg = dataset_config("cifar10", tmp_path / "cifar", channels=3, shard_size=10)
    manifests = write_dataset_shards(cfg, "cifar10", tmp_path / "shards")
    assert manifests["train"]["num_samples"] == 30 and manifests["test"]["num_samples"] == 6
    for split in ("train", "test"):
        images, labels = raw[split]
        got = load_all(make_loader(tmp_path / "shards", split, 7, train=False))
        assert got[0].shape[1:] == (3, 32, 32)
        assert multiset(*got) == multiset(images.transpose(0, 3, 1, 2), labels)
    with open(tmp_path / "cifar/cifar-10-batches-py/data_batch_1", "rb") as fh:
        first = pickle.load(fh)[b"data"][0]
    image, _ = readers.read_cifar_batch(tmp_path / "cifar/cifar-10-batches-py/data_batch_1")
    assert image[0, 0, 0].tolist() == [first[0], first[1024], first[2048]]  # R, G, B planes


def test_cifar_unpickler_refuses_arbitrary_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="not allowed"):
        readers.read_cifar_batch(folder / "test_batch")
    assert not marker.exists()


def test_center_crop_arr_matches_adm_recipe():
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8))  # W=128, H=64, res 32
    expected = np.asarray(wide.resize((64, 32), resample=Image.BOX))[:, 16:48]  # one halving, no rescale
    assert np.array_equal(center_crop_arr(wide, 32), expected)
    odd = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))  # min side 40 < 64: bicubic only
    expected = np.asarray(odd.resize((40, 32), resample=Image.BICUBIC))[:, 4:36]
    assert np.array_equal(center_crop_arr(odd, 32), expected)


def test_image_folder_labels_from_sorted_class_folders(tmp_path):
    files = make_image_folder(tmp_path / "imnet" / "train", ["n02", "n01", "n03"], per_class=4)
    make_image_folder(tmp_path / "imnet" / "val", ["n01", "n02", "n03"], per_class=2, seed=1)
    cfg = dataset_config("image_folder", tmp_path / "imnet", channels=3, num_classes=3, shard_size=5)
    manifests = write_dataset_shards(cfg, "imnet", tmp_path / "shards")
    assert manifests["train"]["num_samples"] == 12 and manifests["test"]["num_samples"] == 6
    assert manifests["train"]["class_histogram"] == [4, 4, 4]
    images, labels = load_all(make_loader(tmp_path / "shards", "train", 5, train=False))
    expected = []
    for path in files:
        with Image.open(path) as im:
            expected.append(center_crop_arr(im.convert("RGB"), 32).transpose(2, 0, 1))
    names = sorted({p.parent.name for p in files})
    assert multiset(images, labels) == multiset(np.stack(expected), [names.index(p.parent.name) for p in files])


def test_flat_folder_is_unlabelled_train_only(tmp_path):
    make_image_folder(tmp_path / "ffhq", None, per_class=3)  # ffhq/00000/*.png, ffhq/01000/*.png
    cfg = dataset_config("image_folder", tmp_path / "ffhq", channels=3, num_classes=0, resolution=16)
    manifests = write_dataset_shards(cfg, "ffhq", tmp_path / "shards")
    assert list(manifests) == ["train"] and manifests["train"]["num_samples"] == 6
    assert manifests["train"]["class_histogram"] == []
    images, labels = load_all(make_loader(tmp_path / "shards", "train", 4, train=False))
    assert images.shape == (6, 3, 16, 16) and set(labels.tolist()) == {-1}
    assert not (tmp_path / "shards" / "test").exists()


def test_image_folder_class_count_mismatch_is_explained(tmp_path):
    make_image_folder(tmp_path / "imnet", ["a", "b"], per_class=1)
    cfg = dataset_config("image_folder", tmp_path / "imnet", channels=3, num_classes=1000)
    with pytest.raises(DataError, match="found 2 class folders, but num_classes is 1000"):
        write_dataset_shards(cfg, "imnet", tmp_path / "shards")


def test_corrupt_input_image_is_named_or_skipped_and_counted(tmp_path):
    make_image_folder(tmp_path / "imgs", ["a", "b"], per_class=3)
    bad = tmp_path / "imgs" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cfg = dataset_config("image_folder", tmp_path / "imgs", channels=3, num_classes=2)
    with pytest.raises(DataError, match=r"broken.png.*set datasets\.imgs\.skip_corrupt: true to skip"):
        write_dataset_shards(cfg, "imgs", tmp_path / "shards")
    manifests = write_dataset_shards(replace_config(cfg, skip_corrupt=True), "imgs", tmp_path / "shards")
    train = manifests["train"]
    assert train["num_samples"] == 6 and train["skipped"]["count"] == 1
    assert train["skipped"]["inputs"][0]["ref"] == "b/broken.png"
    assert "skip_corrupt" not in train["skipped"]["inputs"][0]["error"]  # it is set: no hint to set it


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """Kinetics-style train/<class>/*.mp4 (H.264): 23 and 9 frames in 'dance', 12 in 'run'; test/ with one clip."""
    root = tmp_path_factory.mktemp("kinetics")
    write_video(root / "train/dance/a.mp4", moving_square_video(23, 48, 40, seed=0))
    write_video(root / "train/dance/b.mp4", moving_square_video(9, 32, 64, seed=1))
    write_video(root / "train/run/c.mp4", moving_square_video(12, 40, 40, seed=2))
    write_video(root / "test/run/d.mp4", moving_square_video(8, 40, 40, seed=3))
    return root


def test_video_folder_clips_with_fixed_stride(video_root, tmp_path):
    cfg = dataset_config("video_folder", video_root, channels=3, num_classes=2, resolution=16, frames=8,
                         clip_stride=5, shard_size=3)
    manifests = write_dataset_shards(cfg, "kinetics", tmp_path / "shards")
    # starts 0, 5, 10, 15 in a (23 frames); 0 in b (9); 0 in c (12); 0 in d (8)
    assert manifests["train"]["num_samples"] == 6 and manifests["test"]["num_samples"] == 1
    assert manifests["train"]["class_histogram"] == [5, 1] and manifests["train"]["sample_shape"] == [3, 8, 16, 16]
    clips, labels = load_all(make_loader(tmp_path / "shards", "train", 4, train=False))
    assert clips.shape == (6, 3, 8, 16, 16)
    expected = []
    for name, label in (("dance/a.mp4", 0), ("dance/b.mp4", 0), ("run/c.mp4", 1)):
        frames = video.read_video_frames(video_root / "train" / name, 16, 3)
        for start in video.clip_starts(len(frames), 8, 5):
            expected.append((frames[start : start + 8].transpose(3, 0, 1, 2), label))
    assert multiset(clips, labels) == multiset(np.stack([e[0] for e in expected]), [e[1] for e in expected])
    x, _ = next(iter(make_loader(tmp_path / "shards", "train", 2, train=True, num_workers=0)))
    assert x.shape == (2, 3, 8, 16, 16) and x.dtype == torch.float32


def test_corrupt_video_is_named(video_root, tmp_path):
    broken = tmp_path / "vids" / "train" / "x" / "broken.mp4"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    cfg = dataset_config("video_folder", tmp_path / "vids", channels=3, num_classes=1, resolution=16)
    with pytest.raises(DataError, match="broken.mp4"):
        write_dataset_shards(cfg, "vids", tmp_path / "shards", splits=("train",))


def test_moving_mnist_is_deterministic_two_digits_bouncing(tmp_path):
    raw = make_idx_dataset(tmp_path / "MNIST", 6, 3)
    cfg = dataset_config("moving_mnist", tmp_path / "MNIST", num_classes=0, resolution=64, frames=20, seed=4)
    a = write_dataset_shards(cfg, "mm", tmp_path / "a")
    write_dataset_shards(cfg, "mm", tmp_path / "b")
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert a["train"]["num_samples"] == 6 and a["test"]["num_samples"] == 3
    write_dataset_shards(replace_config(cfg, seed=5), "mm", tmp_path / "c", splits=("test",))
    assert shard_bytes(tmp_path / "a" / "test") != shard_bytes(tmp_path / "c" / "test")
    clips, labels = load_all(make_loader(tmp_path / "a", "train", 6, train=False))
    assert clips.shape == (6, 1, 20, 64, 64) and set(labels.tolist()) == {-1}
    digits = raw["train"][0]
    rng = np.random.default_rng(0)
    seq = video.moving_mnist_sequence(digits, [0, 1], rng, 20, 64)
    rng = np.random.default_rng(0)
    for d in (0, 1):  # each digit is fully visible (max-composited) at its own trajectory
        for t, (y, x) in enumerate(video.bouncing_positions(rng, 20, 64 - 28)):
            assert 0 <= y <= 36 and 0 <= x <= 36
            assert (seq[t, y : y + 28, x : x + 28] >= digits[d]).all()


def test_bouncing_positions_keep_speed_and_reflect():
    pos = video.bouncing_positions(np.random.default_rng(1), 200, 1000).astype(float) / 1000
    steps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    assert np.isclose(np.median(steps), video.STEP, atol=2e-3)  # constant speed away from the walls
    assert pos.min() >= 0 and pos.max() <= 1 and (pos.min(0) < 0.05).all() and (pos.max(0) > 0.95).all()


def _rewrite_shard(root: Path, split: str, index: int, mutate) -> None:
    """Re-write shard `index` with `mutate(sample) -> sample`, updating the manifest (so the hash matches)."""
    folder = root / split
    manifest = json.loads((folder / MANIFEST).read_text())
    name = manifest["shards"][index]["name"]
    samples = [mutate(s) for s in iter_tar_samples((folder / name).read_bytes(), name)]
    writer = ShardWriter(root / "tmp", shard_size=10**6)
    for s in samples:
        writer.add(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
    record = writer.close()[0]
    os.replace(root / "tmp" / record["name"], folder / name)
    manifest["shards"][index] = record | {"name": name}
    write_manifest(folder, manifest)


@pytest.fixture()
def fresh_shards(tmp_path) -> Path:
    make_idx_dataset(tmp_path / "MNIST", 20, 10)
    write_dataset_shards(dataset_config("mnist", tmp_path / "MNIST", shard_size=5), "mnist", tmp_path / "shards")
    return tmp_path / "shards"


def test_corrupt_png_names_shard_and_key_or_is_skipped(fresh_shards):
    samples = list(iter_tar_samples((fresh_shards / "test/shard-000001.tar").read_bytes(), "s"))
    key = samples[1]["__key__"]
    _rewrite_shard(fresh_shards, "test", 1,
                   lambda s: s | {"png": s["png"][:40] + b"\x00" * 20} if s["__key__"] == key else s)
    with pytest.raises(DataError, match=rf"shard-000001\.tar: key {key}: corrupt sample"):
        load_all(make_loader(fresh_shards, "test", 4, train=False))
    loader = make_loader(fresh_shards, "test", 4, train=False, skip_corrupt=True)
    images, _ = load_all(loader)
    assert len(images) == 9 and loader.skipped == 1


def test_truncated_tar_is_refused_by_hash_else_named_or_skipped(fresh_shards):
    shard = fresh_shards / "train" / "shard-000002.tar"
    keys = [s["__key__"] for s in iter_tar_samples(shard.read_bytes(), "s")]
    members, _ = ustar_index(shard.read_bytes())
    _, start, _ = next(m for m in members if m[0] == f"{keys[2]}.png")
    shard.write_bytes(shard.read_bytes()[: start + 10])  # inside the 3rd sample's PNG
    with pytest.raises(ManifestMismatch, match="shard-000002.tar: sha256"):
        load_all(make_loader(fresh_shards, "train", 4, train=False, skip_corrupt=True))
    with pytest.raises(DataError, match=rf"shard-000002\.tar: truncated or corrupt tar at key '{keys[2]}'"):
        load_all(make_loader(fresh_shards, "train", 4, train=False, verify=False))
    loader = make_loader(fresh_shards, "train", 4, train=False, verify=False, skip_corrupt=True)
    images, _ = load_all(loader)
    assert len(images) == 17 and loader.skipped == 3  # 2 whole samples read before the cut


def test_tar_cut_at_a_member_boundary_is_caught_by_the_sample_count(fresh_shards):
    shard = fresh_shards / "train" / "shard-000000.tar"
    samples = list(iter_tar_samples(shard.read_bytes(), "s"))
    writer = ShardWriter(fresh_shards / "cut", 10**6)
    for s in samples[:3]:
        writer.add(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
    writer.close()
    os.replace(fresh_shards / "cut" / "shard-000000.tar", shard)
    with pytest.raises(DataError, match=rf"ends after key '{samples[2]['__key__']}' with 3 of the manifest's 5"):
        load_all(make_loader(fresh_shards, "train", 4, train=False, verify=False))


def test_a_shard_with_more_samples_than_listed_is_not_called_truncated(fresh_shards):
    manifest = json.loads((fresh_shards / "train" / MANIFEST).read_text())
    manifest["shards"][0]["num_samples"] -= 1
    (fresh_shards / "train" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"with 5 of the manifest's 4 samples \(more samples than the manifest lists"):
        load_all(make_loader(fresh_shards, "train", 4, train=False, verify=False))


def test_manifest_hash_mismatch_refuses_even_with_skip_corrupt(fresh_shards):
    manifest = json.loads((fresh_shards / "test" / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (fresh_shards / "test" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatch, match=r"shard-000000\.tar: sha256 .* refusing to load"):
        load_all(make_loader(fresh_shards, "test", 4, train=False, skip_corrupt=True))


def test_crash_mid_write_leaves_no_partial_shard_and_no_manifest(fresh_shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = prepare.encode_png

    def failing(array):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated crash")
        return real(array)

    monkeypatch.setattr(prepare, "encode_png", failing)
    with pytest.raises(KeyboardInterrupt):
        write_dataset_shards(dataset_config("mnist", tmp_path / "MNIST", shard_size=5), "mnist", fresh_shards)
    files = {p.name for p in (fresh_shards / "train").iterdir()}
    assert not any(name.endswith(".tmp") for name in files) and MANIFEST not in files
    with pytest.raises(FileNotFoundError, match="no shard manifest.*diffusion.cli shard"):
        make_loader(fresh_shards, "train", 4, train=False)


def test_missing_datasets_say_where_we_looked_and_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"datasets\.fm.*raw/train-images-idx3-ubyte.*dataset-fashion-mnist"):
        write_dataset_shards(dataset_config("fashion_mnist", tmp_path / "nope"), "fm", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*cifar-10-python\.tar\.gz"):
        write_dataset_shards(dataset_config("cifar10", tmp_path / "nope", channels=3), "c", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"nope does not exist.*class sub-folders"):
        write_dataset_shards(dataset_config("image_folder", tmp_path / "nope"), "i", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_download_route_uses_torchvision_mirrors(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, filename, md5):
        calls.append(url)
        make_idx_dataset(Path(download_root).parent, 4, 2)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    cfg = dataset_config("fashion_mnist", tmp_path / "fm", download=True)
    images, labels = readers.load_digits(cfg, "test")
    assert images.shape == (2, 28, 28) and calls[0].endswith("train-images-idx3-ubyte.gz")
    assert calls[0].startswith("http://fashion-mnist")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match="download: true was tried and failed: .*network unreachable"):
        readers.load_digits(dataset_config("mnist", tmp_path / "mnist", download=True), "train")


def test_shards_load_from_s3(idx_shards, s3_bucket):
    import fsspec
    import webdataset

    root, _, info = idx_shards
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put(str(root / "test"), f"{s3_bucket}/mnist/test", recursive=True)
    images, labels = info["raw"]["test"]
    for workers in (0, 2):
        got = load_all(make_loader(f"{s3_bucket}/mnist", "test", 4, train=False, num_workers=workers))
        assert multiset(*got) == multiset(padded_digits(images), labels)
    plain = webdataset.WebDataset(f"{s3_bucket}/mnist/test/shard-000000.tar", shardshuffle=False, empty_check=False)
    assert len(list(plain)) == 7  # the s3 gopen handler serves plain WebDataset pipelines too
    fs.pipe(f"{s3_bucket}/mnist/test/shard-000001.tar", b"not a tar")
    with pytest.raises(ManifestMismatch, match=rf"{s3_bucket}/mnist/test/shard-000001\.tar: sha256"):
        load_all(make_loader(f"{s3_bucket}/mnist", "test", 4, train=False))
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        make_loader(f"{s3_bucket}/elsewhere", "test", 4, train=False)


def test_real_fashion_mnist_subset(tmp_path, fashion_mnist):
    cfg = load_params().datasets["fashion_mnist"]
    manifests = write_dataset_shards(replace_config(cfg, max_samples=300, shard_size=128), "fm", tmp_path)
    assert manifests["train"]["num_samples"] == 300 and manifests["train"]["num_shards"] == 3
    assert manifests["train"]["num_inputs"] == 60000 and manifests["test"]["num_inputs"] == 10000
    assert [s["num_samples"] for s in manifests["test"]["shards"]] == [128, 128, 44]
    x, y = next(iter(make_loader(tmp_path, "test", 300, train=False)))
    assert x.shape == (300, 1, 32, 32) and (x[:, :, :2] == -1).all()  # zero padding maps to -1
    assert 0 <= y.min() and y.max() <= 9


@pytest.mark.slow
def test_full_fashion_mnist_shards(tmp_path, fashion_mnist):
    manifests = write_dataset_shards(load_params().datasets["fashion_mnist"], "fashion_mnist", tmp_path)
    assert manifests["train"]["num_samples"] == 60000 and manifests["test"]["num_samples"] == 10000
    assert manifests["train"]["class_histogram"] == [6000] * 10
    assert manifests["test"]["class_histogram"] == [1000] * 10


def test_params_datasets_are_complete_and_checked():
    params = load_params()
    assert "fashion_mnist" in params.datasets
    raw = yaml.safe_load(Path("params.yaml").read_text())
    broken = dict(raw["datasets"]["fashion_mnist"])
    del broken["shard_size"]
    from diffusion.config import parse_params

    with pytest.raises(ConfigError, match=r"missing key datasets\.fm\.shard_size"):
        parse_params(raw | {"datasets": {"fm": broken}, "runs": {}})
    with pytest.raises(ConfigError, match="needs frames > 0"):
        dataset_config("video_folder", "x", frames=0)


def test_dvc_yaml_shards_every_pipeline_dataset():
    stage = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]["shard"]
    assert stage["foreach"] == "${pipeline.datasets}"
    assert stage["do"]["cmd"] == "python -m diffusion.cli shard --dataset ${item} --out data/shards/${item}"
    assert stage["do"]["outs"] == ["data/shards/${item}"] and "data/prepare.py" in stage["do"]["deps"]
    assert stage["do"]["params"] == ["datasets.${item}"]
