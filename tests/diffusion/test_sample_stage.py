"""The sample stage (diffusion/stages/sample.py) through its command: a finished chunk is kept only when it was drawn
with the same weights, settings, sample count and context and still matches its checksum, and anything else is drawn
again; sample.use_ema picks the weights; class-conditional samples carry the label of their own seed (arr_1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion import cli
from diffusion.checkpoint import save_weights
from diffusion.config import parse_params
from diffusion.distributed import Dist
from diffusion.registry import build_model, resolve_model
from diffusion.stages.sample import generate, sampling_fingerprint
from tests.helpers import with_key

REPO = Path(__file__).resolve().parents[2]
CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_raw(**run) -> dict:
    """params.yaml with one tiny RIN run `tiny` (6 samples in chunks of 4, 2 DDPM steps); `run` merges into it."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny = {"dataset": "fashion_mnist", "model": {"family": "rin", "preset": "rin_tiny"}, "diffusion": {},
            "train": {"self_cond_rate": 0.0, "precision": "fp32"},
            "sample": {"steps": 2, "num_samples": 6, "batch_size": 4}, "eval": {}}
    for section, values in run.items():
        tiny[section] = tiny.get(section, {}) | values
    raw["runs"] = {"tiny": tiny}
    raw["experts"], raw["ensembles"] = {}, {}
    raw["evaluation"]["report"] = {}
    raw["evaluation"].pop("fourier")
    return raw


def write_params(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def perturbed(run, seed: int) -> dict[str, torch.Tensor]:
    """A state dict of the run's network, every tensor drawn from `seed` (large enough to change the samples)."""
    torch.manual_seed(seed)
    model = build_model(run)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.state_dict()


def random_weights(raw: dict, seed: int) -> dict[str, torch.Tensor]:
    """perturbed() weights of the tiny run of `raw`."""
    return perturbed(parse_params(raw).run("tiny"), seed)


def train_folder(folder: Path, model: dict, ema: dict) -> Path:
    folder.mkdir(parents=True)
    save_weights(model, folder / "model.safetensors", {})
    save_weights(ema, folder / "ema.safetensors", {})
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """Two train folders of the tiny run with different weights (a, b), and a with model and EMA swapped."""
    root = tmp_path_factory.mktemp("sample-stage")
    raw = tiny_raw()
    w1, w2, w3 = (random_weights(raw, seed) for seed in (1, 2, 3))
    return {"root": root, "params": write_params(root, raw), "shards": root,
            "a": train_folder(root / "a", model=w1, ema=w2), "b": train_folder(root / "b", model=w1, ema=w3),
            "a_swapped": train_folder(root / "a_swapped", model=w2, ema=w1)}


def draw(project, out: Path, params: Path | None = None, weights: str = "a", *extra: str) -> dict[str, np.ndarray]:
    """Run the sample stage into `out`; returns samples.npz's arrays."""
    argv = ["--params", str(params or project["params"]), "sample", "tiny", "--weights", str(project[weights]),
            "--shards", str(project["shards"]), "--out", str(out), "--device", "cpu", *extra]
    assert cli.main(argv) == 0
    with np.load(out / "samples.npz") as z:
        return {k: z[k] for k in z.files}


def chunk_stamps(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "chunks").glob("chunk-*.npz"))}


def test_a_rerun_with_the_same_settings_keeps_every_chunk(project, tmp_path):
    first = draw(project, tmp_path / "s")
    stamps = chunk_stamps(tmp_path / "s")
    assert len(stamps) == 2  # 6 samples in chunks of 4
    assert sorted(first) == ["arr_0"]  # unconditional: no labels array
    again = draw(project, tmp_path / "s")
    assert chunk_stamps(tmp_path / "s") == stamps
    assert np.array_equal(again["arr_0"], first["arr_0"])


def test_changed_weights_are_drawn_again(project, tmp_path):
    old = draw(project, tmp_path / "s", weights="a")
    new = draw(project, tmp_path / "s", weights="b")
    fresh = draw(project, tmp_path / "fresh", weights="b")
    assert not np.array_equal(old["arr_0"], fresh["arr_0"])  # the weights do change the images
    assert np.array_equal(new["arr_0"], fresh["arr_0"]), "chunks drawn before the change were kept"


@pytest.mark.parametrize("section,values", [
    ("sample", {"steps": 3}),
    ("sample", {"sampler": "ddim"}),
    ("sample", {"variance": "small"}),
    ("sample", {"clip_x0": False}),
    ("sample", {"td": 0.5}),
    ("sample", {"seed": 7}),
    ("sample", {"schedule": {"kind": "linear", "start": 0.0, "end": 1.0, "tau": 1.0}}),
    ("diffusion", {"prediction": "v"}),
    ("train", {"precision": "bf16"}),
])
def test_changed_sampler_settings_are_drawn_again(project, tmp_path, section, values):
    changed = write_params(tmp_path / "changed", tiny_raw(**{section: values}))
    old = draw(project, tmp_path / "s")
    new = draw(project, tmp_path / "s", changed)
    fresh = draw(project, tmp_path / "fresh", changed)
    assert not np.array_equal(old["arr_0"], fresh["arr_0"]), "this setting does not change the images"
    assert np.array_equal(new["arr_0"], fresh["arr_0"]), "chunks drawn before the change were kept"


def test_a_changed_eta_is_drawn_again(project, tmp_path):
    ddim = write_params(tmp_path / "ddim", tiny_raw(sample={"sampler": "ddim", "eta": 0.0}))
    noisy = write_params(tmp_path / "noisy", tiny_raw(sample={"sampler": "ddim", "eta": 1.0}))
    old = draw(project, tmp_path / "s", ddim)
    new = draw(project, tmp_path / "s", noisy)
    fresh = draw(project, tmp_path / "fresh", noisy)
    assert not np.array_equal(old["arr_0"], fresh["arr_0"])
    assert np.array_equal(new["arr_0"], fresh["arr_0"]), "chunks drawn before the change were kept"


def test_a_changed_batch_size_is_chunked_again(project, tmp_path):
    """Chunks of 3 start at 0 and 3: the old chunk at 0 holds 4 images, which kept would make 7 samples."""
    rechunked = write_params(tmp_path / "changed", tiny_raw(sample={"batch_size": 3}))
    old = draw(project, tmp_path / "s")
    new = draw(project, tmp_path / "s", rechunked)
    assert new["arr_0"].shape[0] == 6
    assert np.array_equal(new["arr_0"], old["arr_0"])  # one seed per image: the batch does not change an image


@pytest.mark.parametrize("before,after", [(6, 5), (5, 6), (6, 8)])
def test_a_changed_sample_count_is_drawn_again(project, tmp_path, before, after):
    draw(project, tmp_path / "s", None, "a", "--num-samples", str(before))
    new = draw(project, tmp_path / "s", None, "a", "--num-samples", str(after))
    fresh = draw(project, tmp_path / "fresh", None, "a", "--num-samples", str(after))
    assert new["arr_0"].shape[0] == after
    assert np.array_equal(new["arr_0"], fresh["arr_0"]), "chunks drawn before the change were kept"


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_images(path: Path) -> None:
    """A well-formed npz of the right shape whose images are not the ones drawn (its .json left as it was)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["images"] = 255 - arrays["images"]
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage", [_flip_a_byte, _other_images, _truncate], ids=["flipped", "replaced", "truncated"])
def test_a_damaged_chunk_is_drawn_again(project, tmp_path, damage):
    out = tmp_path / "s"
    first = draw(project, out)
    chunk = out / "chunks" / "chunk-00000004.npz"
    good = chunk.read_bytes()
    damage(chunk)
    again = draw(project, out)
    assert chunk.read_bytes() == good, "the damaged chunk was kept"
    assert np.array_equal(again["arr_0"], first["arr_0"])


def test_sample_use_ema_chooses_the_weights_that_are_sampled(project, tmp_path):
    """Folder a holds model=w1, ema=w2; a_swapped holds model=w2, ema=w1: use_ema picks which file is drawn from."""
    no_ema = write_params(tmp_path / "no-ema", tiny_raw(sample={"use_ema": False}))
    ema_of_a = draw(project, tmp_path / "ema-a")  # the default: use_ema true
    model_of_swapped = draw(project, tmp_path / "model-swapped", no_ema, "a_swapped")
    model_of_a = draw(project, tmp_path / "model-a", no_ema, "a")
    assert np.array_equal(ema_of_a["arr_0"], model_of_swapped["arr_0"]), "use_ema true did not sample ema.safetensors"
    assert not np.array_equal(ema_of_a["arr_0"], model_of_a["arr_0"])


# ---- video context: generate() as the stage calls it, with the context clips it reads from the test split ----


def video_run():
    raw = tiny_raw(model={"family": "rin", "preset": "rin_tiny_video"}, diffusion={"context_frames": 2},
                   sample={"steps": 2, "num_samples": 3, "batch_size": 2})
    raw["runs"]["tiny"]["dataset"] = "moving_fmnist"
    raw = with_key(with_key(raw, "datasets.moving_fmnist.resolution", 16), "datasets.moving_fmnist.frames", 8)
    return parse_params(raw).run("tiny")


def test_changed_context_clips_are_drawn_again(tmp_path):
    run = video_run()
    torch.manual_seed(0)
    model = build_model(run).eval()
    weights = tmp_path / "ema.safetensors"
    save_weights(model.state_dict(), weights, {})
    rng = np.random.default_rng(0)
    ctx_a, ctx_b = (rng.integers(0, 256, (3, 2, 16, 16, 1), dtype=np.uint8) for _ in range(2))

    def clips(out: Path, context: np.ndarray) -> np.ndarray:
        npz = generate(run, model, out, CPU, sampling_fingerprint(run, weights), progress=False, context=context)
        with np.load(npz) as z:
            return z["arr_0"]  # (N, T, H, W, C)

    old = clips(tmp_path / "s", ctx_a)
    new = clips(tmp_path / "s", ctx_b)
    fresh = clips(tmp_path / "fresh", ctx_b)
    assert np.array_equal(fresh[:, :2], ctx_b)  # the given frames are the context clips themselves
    assert not np.array_equal(old, fresh)
    assert np.array_equal(new, fresh), "chunks drawn for other context clips were kept"


# ---- class-conditional sampling ----


class LabelPainter(torch.nn.Module):
    """A denoiser that predicts x0 = an image whose every pixel encodes its label: label k -> 2 k / 9 - 1."""

    def forward(self, x_t, gamma, labels=None, state=None):
        assert labels is not None and labels.shape == (x_t.shape[0],), labels
        value = 2.0 * labels.float() / 9.0 - 1.0  # (B,)
        return value.view(-1, 1, 1, 1).expand_as(x_t).clone(), None


def conditional_run(**sample):
    raw = tiny_raw(model={"family": "rin", "preset": "rin_tiny", "class_conditional": True},
                   diffusion={"prediction": "x0"}, sample=sample)
    return parse_params(raw).run("tiny")


def test_each_image_is_drawn_for_the_label_stored_beside_it(tmp_path):
    run = conditional_run(num_samples=200, batch_size=64, seed=3)
    with np.load(generate(run, LabelPainter(), tmp_path / "s", CPU, "fp", progress=False)) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (200, 32, 32, 1) and labels.shape == (200,)
    painted = np.rint(images[:, 0, 0, 0] / 255 * 9).astype(int)  # the label each image was drawn for
    assert np.array_equal(painted, labels), "an image was drawn for another label than its arr_1 entry"
    assert (images == images[:, :1, :1]).all()  # one value per image: the label reached every pixel
    counts = np.bincount(labels, minlength=10)
    assert counts.size == 10 and counts.min() >= 5, counts  # every class, ~20 each (Binomial(200, 0.1))


def test_a_label_depends_only_on_its_seed(tmp_path):
    """Image i has seed sample.seed + i: its label is the same in any batch size and sample count, and another
    seed offset gives other labels."""
    def labels(out: Path, **sample) -> np.ndarray:
        with np.load(generate(conditional_run(**sample), LabelPainter(), out, CPU, "fp", progress=False)) as z:
            return z["arr_1"]

    base = labels(tmp_path / "a", num_samples=40, batch_size=16, seed=0)
    assert np.array_equal(labels(tmp_path / "b", num_samples=30, batch_size=7, seed=0), base[:30])
    assert np.array_equal(labels(tmp_path / "c", num_samples=20, batch_size=20, seed=20), base[20:40])
    assert not np.array_equal(labels(tmp_path / "d", num_samples=40, batch_size=16, seed=1), base)


def test_the_class_conditional_stage_writes_the_labels_of_its_chunks(tmp_path):
    raw = tiny_raw(model={"family": "rin", "preset": "rin_tiny", "class_conditional": True})
    folder = train_folder(tmp_path / "train", random_weights(raw, 1), random_weights(raw, 2))
    project = {"params": write_params(tmp_path, raw), "a": folder, "shards": tmp_path}
    conditional = draw(project, tmp_path / "s")
    assert sorted(conditional) == ["arr_0", "arr_1"]
    assert conditional["arr_1"].shape == (6,) and conditional["arr_1"].dtype.kind == "i"
    assert conditional["arr_1"].min() >= 0 and conditional["arr_1"].max() < 10
    chunk_labels = [np.load(p)["labels"] for p in sorted((tmp_path / "s" / "chunks").glob("chunk-*.npz"))]
    assert np.array_equal(np.concatenate(chunk_labels), conditional["arr_1"])


def test_the_context_clips_are_the_first_frames_of_the_test_splits_clips(tmp_path, fashion_mnist):
    import dataclasses

    from data.batches import read_split
    from data.prepare import write_dataset_shards
    from diffusion.stages.sample import context_clips

    run = video_run()  # 2 context frames of 8
    run = dataclasses.replace(run, dataset=dataclasses.replace(run.dataset, max_samples=3, shard_size=4, resolution=32))
    write_dataset_shards(run.dataset, "moving_fmnist", tmp_path)
    test, _ = read_split(run.dataset, tmp_path, "test")
    train, _ = read_split(run.dataset, tmp_path, "train")
    given = context_clips(run, tmp_path)
    assert given.shape == (3, 2, 32, 32, 1) and given.flags.c_contiguous and np.array_equal(given, test[:, :2])
    assert not np.array_equal(given, train[:, :2])
    assert context_clips(parse_params(tiny_raw()).run("tiny"), tmp_path) is None  # no context frames


def test_the_sample_command_documents_its_arguments_and_requires_the_weights(project, tmp_path, capsys):
    from diffusion.stages import sample as stage

    with pytest.raises(SystemExit) as exit_:
        stage.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m diffusion.cli sample [-h] [--params PARAMS] --weights DIR [DIR ...]")
    assert stage.__doc__.split()[0] in text and " run a run name from params.yaml (runs or ensembles) options:" in text
    for option, help_text in (
            ("--weights DIR [DIR ...]", "the run's train folder (outputs/<run>/train); an ensemble: each expert's, in "
                                        "interval order"),
            ("--shards SHARDS", "the dataset's shard root: the context clips of video prediction, a latent dataset's "
                                "decoder"),
            ("--out OUT", "the samples folder (outputs/<run>/samples)"),
            ("--num-samples NUM_SAMPLES", "override sample.num_samples")):
        assert f"{option} {help_text}" in text, option  # each option with its own help, as written
    assert "[--num-samples NUM_SAMPLES]" in text and "--shards SHARDS --out OUT" in text  # optional vs required
    given = {"--weights": str(project["a"]), "--shards": str(project["shards"]), "--out": str(tmp_path)}
    for missing in given:  # every required option is required
        rest = [x for k, v in given.items() if k != missing for x in (k, v)]
        argv = ["--params", str(project["params"]), "tiny", *rest]
        with pytest.raises(SystemExit) as exit_:
            stage.main(argv)
        assert exit_.value.code == 2 and f"the following arguments are required: {missing}" in capsys.readouterr().err


def test_an_ensembles_fingerprint_hashes_each_experts_weights_in_order(project):
    run = parse_params(tiny_raw()).run("tiny")
    a, b = project["a"] / "ema.safetensors", project["b"] / "ema.safetensors"
    both = sampling_fingerprint(run, [a, b])
    assert both == sampling_fingerprint(run, [a, b])  # stable
    assert len({both, sampling_fingerprint(run, [b, a]), sampling_fingerprint(run, [a]),
                sampling_fingerprint(run, a)}) == 4  # the order of the experts and each one's weights count


def test_cost_json_of_a_model_without_patches_has_a_null_patch(tmp_path):
    import json

    from diffusion.stages.sample import write_cost

    run = parse_params(tiny_raw(model={"family": "meme", "preset": "unet_tiny"})).run("tiny")
    model = build_model(run)
    cost = json.loads(write_cost(run, model, tmp_path).read_text())
    assert cost["patch"] is None and cost["model_params"] == sum(p.numel() for p in model.parameters())


def test_the_command_says_what_it_wrote(project, tmp_path, capsys):
    draw(project, tmp_path / "s")
    out = tmp_path / "s"
    assert f"wrote {out / 'samples.npz'}, {out / 'grid.png'} and {out / 'cost.json'}" in capsys.readouterr().out


def test_num_samples_must_be_at_least_one(project, tmp_path):
    from diffusion.stages import sample as stage
    from diffusion.typed import ConfigError

    argv = ["--params", str(project["params"]), "tiny", "--weights", str(project["a"]), "--shards",
            str(project["shards"]), "--out", str(tmp_path / "zero"), "--device", "cpu", "--num-samples", "0"]
    with pytest.raises(ConfigError, match=r"^--num-samples must be >= 1, got 0$"):
        stage.main(argv)
    assert draw(project, tmp_path / "one", None, "a", "--num-samples", "1")["arr_0"].shape[0] == 1  # 1 is allowed


def test_cost_json_names_the_sampled_networks_size_and_steps(project, tmp_path):
    import json

    draw(project, tmp_path / "s")
    cost = json.loads((tmp_path / "s" / "cost.json").read_text())
    run = parse_params(tiny_raw()).run("tiny")
    params = sum(p.numel() for p in build_model(run).parameters())
    assert set(cost) == {"model_params", "gflops_per_image", "sampling_steps", "patch"}
    assert cost["model_params"] == params and cost["gflops_per_image"] > 0 and cost["sampling_steps"] == 2
    assert cost["patch"] == list(resolve_model(run).patch)  # the grid evaluate's seam ratio measures


# ---- what the stage writes beside the samples: grid.png, the chunk meta, the progress bar ----


class Echo(torch.nn.Module):
    """A denoiser for any data shape that predicts x0 = x_t (clamped): every seed gives its own noise-like image."""

    def forward(self, x_t, gamma, labels=None, state=None):
        return x_t.clamp(-1, 1), None


def echo_run(resolution: int, frames: int = 0, context_frames: int = 0, **sample):
    """The tiny run at `resolution` (a video of `frames` frames when frames > 0), predicting x0 with 2 DDPM steps."""
    sample = {"steps": 2} | sample
    if not frames:
        raw = tiny_raw(diffusion={"prediction": "x0"}, sample=sample)
        return parse_params(with_key(raw, "datasets.fashion_mnist.resolution", resolution)).run("tiny")
    raw = tiny_raw(model={"family": "rin", "preset": "rin_tiny_video", "overrides": {"patch": [2, 1, 1]}},
                   diffusion={"prediction": "x0", "context_frames": context_frames}, sample=sample)
    raw["runs"]["tiny"]["dataset"] = "moving_fmnist"
    raw = with_key(with_key(raw, "datasets.moving_fmnist.resolution", resolution), "datasets.moving_fmnist.frames",
                   frames)
    return parse_params(raw).run("tiny")


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def upscaled(image: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 1) -> (H * scale, W * scale), as a nearest-neighbour resize draws it."""
    return image[..., 0].repeat(scale, axis=0).repeat(scale, axis=1)


@pytest.mark.parametrize("resolution,scale", [(32, 3), (64, 1)])  # 96 // width, and never below 1
def test_grid_png_shows_the_first_64_images_at_about_96_px_a_tile(tmp_path, resolution, scale):
    from diffusion.images import grid

    run = echo_run(resolution, num_samples=70, batch_size=35)
    with np.load(generate(run, Echo(), tmp_path, CPU, "fp", progress=False)) as z:
        images = z["arr_0"]
    assert images.shape == (70, resolution, resolution, 1)
    shown = read_png(tmp_path / "grid.png")
    assert np.array_equal(shown, upscaled(grid(images[:64]), scale))  # an 8 x 8 grid of images 0-63


@pytest.mark.parametrize("resolution,scale", [(13, 4), (16, 4), (64, 1)])  # 64 // frame width, never below 1
def test_a_videos_grid_shows_its_first_8_clips_with_the_context_frames_marked(tmp_path, resolution, scale):
    """10 clips continuing 3 context clips from sample.seed 1: clip i (seed 1 + i) continues context clip i mod 3, and
    grid.png shows clips 0-7, a row each, with a bar under the 2 given frames."""
    from diffusion.images import video_grid
    from diffusion.stages.sample import assemble

    run = echo_run(resolution, frames=4, context_frames=2, num_samples=10, batch_size=4, seed=1)
    context = np.random.default_rng(0).integers(0, 256, (3, 2, resolution, resolution, 1), dtype=np.uint8)
    with np.load(generate(run, Echo(), tmp_path, CPU, "fp", progress=False, context=context)) as z:
        clips = z["arr_0"]
    assert clips.shape == (10, 4, resolution, resolution, 1)
    for i, clip in enumerate(clips):
        assert np.array_equal(clip[:2], context[i % 3]), f"clip {i} does not continue context clip {i % 3}"
    marked = video_grid(clips[:8], context_frames=2)
    assert np.array_equal(read_png(tmp_path / "grid.png"), upscaled(marked, scale))
    assert marked.shape[0] == video_grid(clips[:8]).shape[0] + 4  # the bar (pad + 2 rows) is there
    # assemble on its own (a re-assembly of the same chunks) marks no frames unless told how many were given
    meta = json.loads((tmp_path / "chunks" / "chunk-00000000.json").read_text())
    assemble(tmp_path, [0, 4, 8], False, meta["fingerprint"])
    assert np.array_equal(read_png(tmp_path / "grid.png"), upscaled(video_grid(clips[:8]), scale))


def test_each_chunks_meta_names_its_seeds_checksum_and_fingerprint(tmp_path):
    from diffusion.io import sha256_file

    run = echo_run(32, num_samples=6, batch_size=4, seed=10)
    generate(run, Echo(), tmp_path, CPU, "fp", progress=False)
    for start, seeds in ((0, [10, 13]), (4, [14, 15])):
        chunk = tmp_path / "chunks" / f"chunk-{start:08d}.npz"
        meta = json.loads(chunk.with_suffix(".json").read_text())
        assert meta["seeds"] == seeds and meta["sha256"] == sha256_file(chunk), start  # first and last seed
        assert len(meta["fingerprint"]) == 64 and meta["fingerprint"] != "fp"  # the count and context are in it


def test_generate_shows_a_progress_bar_unless_told_not_to(tmp_path, capsys):
    run = echo_run(32, num_samples=6, batch_size=4)
    generate(run, Echo(), tmp_path / "a", CPU, "fp")
    shown = capsys.readouterr().err
    assert "sample tiny (rank 0)" in shown and "2/2" in shown  # one step per chunk of this rank
    generate(run, Echo(), tmp_path / "b", CPU, "fp", progress=False)
    assert "sample tiny" not in capsys.readouterr().err


def test_a_video_run_without_its_context_clips_is_refused(tmp_path):
    run = echo_run(16, frames=4, context_frames=2)
    with pytest.raises(ValueError, match=r"^tiny: diffusion\.context_frames > 0 needs the context clips "
                                         r"\(generate\.context_clips\)$"):
        generate(run, Echo(), tmp_path, CPU, "fp", progress=False)


def test_assembling_a_missing_chunk_names_it_and_the_fix(tmp_path):
    from diffusion.stages.sample import assemble

    generate(echo_run(32, num_samples=6, batch_size=4), Echo(), tmp_path, CPU, "fp", progress=False)
    meta = json.loads((tmp_path / "chunks" / "chunk-00000004.json").read_text())
    (tmp_path / "chunks" / "chunk-00000004.npz").unlink()
    with pytest.raises(RuntimeError, match=r"chunk-00000004\.npz is missing or corrupt; re-run the sample stage to "
                                           r"regenerate it$"):
        assemble(tmp_path, [0, 4], False, meta["fingerprint"])


def _garble(meta: Path) -> None:
    meta.write_text("{not json")


def _drop_fingerprint(meta: Path) -> None:
    info = json.loads(meta.read_text())
    del info["fingerprint"]
    meta.write_text(json.dumps(info))


@pytest.mark.parametrize("damage", [_garble, _drop_fingerprint, Path.unlink], ids=["garbled", "no-key", "deleted"])
def test_a_chunk_whose_meta_is_damaged_is_drawn_again(project, tmp_path, damage):
    out = tmp_path / "s"
    first = draw(project, out)
    meta = out / "chunks" / "chunk-00000004.json"
    good, stamps = meta.read_text(), chunk_stamps(out)
    damage(meta)
    again = draw(project, out)
    assert meta.read_text() == good and chunk_stamps(out)["chunk-00000004.npz"] != stamps["chunk-00000004.npz"]
    assert chunk_stamps(out)["chunk-00000000.npz"] == stamps["chunk-00000000.npz"]  # the sound chunk is kept
    assert np.array_equal(again["arr_0"], first["arr_0"])


def test_a_one_class_conditional_run_stores_its_labels(tmp_path):
    raw = tiny_raw(model={"family": "rin", "preset": "rin_tiny", "class_conditional": True},
                   diffusion={"prediction": "x0"}, sample={"num_samples": 5, "batch_size": 4})
    run = parse_params(with_key(raw, "datasets.fashion_mnist.num_classes", 1)).run("tiny")
    with np.load(generate(run, LabelPainter(), tmp_path, CPU, "fp", progress=False)) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"] and np.array_equal(z["arr_1"], np.zeros(5, dtype=np.int64))


# ---- the command on the runs that reach its other paths: video, ensemble, latent; train.compile ----


def test_a_video_run_continues_the_test_splits_clips_through_the_command(tmp_path, fashion_mnist):
    from data.batches import read_split
    from data.prepare import write_dataset_shards

    raw = tiny_raw(model={"family": "rin", "preset": "rin_tiny_video"}, diffusion={"context_frames": 2},
                   sample={"steps": 2, "num_samples": 4, "batch_size": 2, "seed": 1})
    raw["runs"]["tiny"]["dataset"] = "moving_fmnist"
    for key, value in (("resolution", 32), ("frames", 8), ("max_samples", 3), ("shard_size", 4)):
        raw = with_key(raw, f"datasets.moving_fmnist.{key}", value)
    run = parse_params(raw).run("tiny")
    write_dataset_shards(run.dataset, "moving_fmnist", tmp_path / "shards")
    test, _ = read_split(run.dataset, tmp_path / "shards", "test")
    assert len(test) == 3
    folder = train_folder(tmp_path / "train", random_weights(raw, 1), random_weights(raw, 2))
    project = {"params": write_params(tmp_path, raw), "a": folder, "shards": tmp_path / "shards"}
    clips = draw(project, tmp_path / "s")["arr_0"]
    assert clips.shape == (4, 8, 32, 32, 1)
    for i, clip in enumerate(clips):  # sample i has seed 1 + i and continues test clip i mod 3
        assert np.array_equal(clip[:2], test[i % 3, :2]), i


def ensemble_raw() -> dict:
    """The tiny run beside a two-expert ensemble `pair` of tiny U-Nets (experts pair_e1, pair_e2)."""
    raw = tiny_raw()
    net = {"family": "meme", "preset": "unet_tiny"}
    common = {"dataset": "fashion_mnist", "diffusion": {"prediction": "v"}}
    raw["experts"] = {f"pair_e{i}": common | {"model": net, "train": {
        "self_cond_rate": 0.0, "precision": "fp32", "expert": {"index": i, "count": 2, "p": p}}}
        for i, p in ((1, 0.8), (2, 0.4))}
    raw["ensembles"] = {"pair": common | {"model": {"family": "meme", "preset": "multi_expert",
                                                    "experts": ["pair_e1", "pair_e2"]},
                                          "train": {"self_cond_rate": 0.0, "precision": "fp32"}, "eval": {},
                                          "sample": {"steps": 2, "num_samples": 6, "batch_size": 4}}}
    return raw


def test_an_ensemble_is_drawn_again_when_any_experts_weights_change(tmp_path):
    raw = ensemble_raw()
    params = parse_params(raw)
    e1, e2 = (params.run(f"pair_e{i}") for i in (1, 2))
    folders = {"e1": train_folder(tmp_path / "e1", perturbed(e1, 1), perturbed(e1, 2)),
               "e2": train_folder(tmp_path / "e2", perturbed(e2, 3), perturbed(e2, 4)),
               "e2_new": train_folder(tmp_path / "e2_new", perturbed(e2, 5), perturbed(e2, 6))}
    path = write_params(tmp_path, raw)

    def ensemble(out: Path, second: str) -> np.ndarray:
        argv = ["--params", str(path), "sample", "pair", "--weights", str(folders["e1"]), str(folders[second]),
                "--shards", str(tmp_path), "--out", str(out), "--device", "cpu"]
        assert cli.main(argv) == 0
        with np.load(out / "samples.npz") as z:
            return z["arr_0"]

    old = ensemble(tmp_path / "s", "e2")
    stamps = chunk_stamps(tmp_path / "s")
    new = ensemble(tmp_path / "s", "e2_new")  # the same folder, the second expert retrained
    assert not any(chunk_stamps(tmp_path / "s")[k] == v for k, v in stamps.items()), "a chunk of old experts was kept"
    assert not np.array_equal(old, new)
    assert np.array_equal(new, ensemble(tmp_path / "fresh", "e2_new"))


def test_a_latent_runs_samples_are_decoded_and_drawn_again_for_a_new_autoencoder(tmp_path):
    from diffusion import registry
    from diffusion.checkpoint import AUTOENCODER_FILE, first_stage
    from tests.meme.test_autoencoder import latent_params

    raw = latent_params(tmp_path)
    params = parse_params(raw)
    run = params.run("latent")
    latent = tmp_path / "latent"
    latent.mkdir()

    def autoencoder(seed: int) -> None:
        torch.manual_seed(seed)
        model = registry.build_autoencoder(params.autoencoders["fmnist_f4"], 1)
        save_weights(model.state_dict(), latent / AUTOENCODER_FILE, {"latent_scale": "0.7"})

    folder = train_folder(tmp_path / "train", perturbed(run, 1), perturbed(run, 2))
    path = write_params(tmp_path, raw)

    def draw_latent(out: Path) -> np.ndarray:
        argv = ["--params", str(path), "sample", "latent", "--weights", str(folder), "--shards", str(latent),
                "--out", str(out), "--device", "cpu"]
        assert cli.main(argv) == 0
        with np.load(out / "samples.npz") as z:
            return z["arr_0"]

    autoencoder(0)
    images = draw_latent(tmp_path / "s")
    assert images.shape == (5, 32, 32, 1) and images.dtype == np.uint8  # decoded: the dataset's images
    decoder = first_stage(run, latent, "cpu")
    model = build_model(run)
    model.load_state_dict(perturbed(run, 2))  # sample.use_ema: the EMA weights
    by_hand = generate(run, model.eval(), tmp_path / "by-hand", CPU, "fp", progress=False, decode=decoder.decode)
    with np.load(by_hand) as z:
        assert np.array_equal(z["arr_0"], images), "the command's samples are not the decoded latents"
    stamps = chunk_stamps(tmp_path / "s")
    autoencoder(1)  # a retrained autoencoder: the same latents decode to other images
    again = draw_latent(tmp_path / "s")
    assert not any(chunk_stamps(tmp_path / "s")[k] == v for k, v in stamps.items()), "chunks of the old decoder kept"
    assert not np.array_equal(again, images)


@pytest.mark.parametrize("setting,compiled", [("on", True), ("off", False), ("auto", False)])  # auto: CUDA only
def test_train_compile_decides_whether_the_sampled_network_is_compiled(project, tmp_path, monkeypatch, setting,
                                                                       compiled):
    calls = []

    def compile_spy(model, *args, **kwargs):  # stands in for inductor (minutes on a CPU); records what it was given
        calls.append(model)
        return model

    monkeypatch.setattr(torch, "compile", compile_spy)
    params = write_params(tmp_path / setting, tiny_raw(train={"compile": setting}))
    draw(project, tmp_path / "s", params)
    assert len(calls) == int(compiled)
    if compiled:
        assert isinstance(calls[0], torch.nn.Module) and not calls[0].training  # the loaded network, in eval mode
