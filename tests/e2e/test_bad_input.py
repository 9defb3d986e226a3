"""Bad input through the CLI as a user gives it: every case exits 2 with `error:` naming the input (never a traceback)
and leaves every file written before byte-identical."""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from diffusion import cli
from tests.rawdata import make_idx_dataset

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_raw(root: Path) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["fashion_mnist"] |= {"root": str(root / "raw"), "shard_size": 32, "max_samples": 64}
    raw["runs"] = {"tiny": {
        "dataset": "fashion_mnist", "model": {"family": "rin", "preset": "rin_tiny"}, "diffusion": {},
        "train": {"steps": 2, "batch_size": 4, "optimizer": "adamw", "warmup_steps": 1, "precision": "fp32",
                  "log_every": 1, "checkpoint_every": 1, "sample_every": 0, "data": "memory"},
        "sample": {"steps": 2, "num_samples": 4, "batch_size": 4}, "eval": {}}}
    raw["experts"], raw["ensembles"] = {}, {}
    raw["evaluation"]["report"], raw["evaluation"]["fourier"] = {}, None
    raw["evaluation"].pop("fourier")
    return raw


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """A params file with one tiny run, its shards, and its trained weights."""
    root = tmp_path_factory.mktemp("project")
    make_idx_dataset(root / "raw", 64, 16)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(root)))
    shards, train = root / "shards", root / "train"
    with torch.no_grad():
        assert cli.main(["--params", str(params), "shard", "--dataset", "fashion_mnist", "--out", str(shards)]) == 0
    assert cli.main(["--params", str(params), "train", "tiny", "--shards", str(shards), "--out", str(train),
                     "--device", "cpu"]) == 0
    return {"root": root, "params": params, "shards": shards, "train": train}


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".lock" not in p.name}


def refused(argv: list[str], capsys, *expected: str) -> str:
    """Run the CLI, which must exit 2 with `error:` and every expected fragment, and no traceback."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # progress bars may come first
    assert last.startswith("error:") and "Traceback" not in err, err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    return err


def with_run(project, tmp_path: Path, **train) -> Path:
    raw = yaml.safe_load(project["params"].read_text())
    raw["runs"]["tiny"]["train"] |= train
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_argv(params: Path, project, out: Path, *extra: str) -> list[str]:
    return ["--params", str(params), "train", "tiny", "--shards", str(project["shards"]), "--out", str(out),
            "--device", "cpu", *extra]


def sample_argv(params: Path, project, out: Path, *extra: str, weights: Path | None = None) -> list[str]:
    return ["--params", str(params), "sample", "tiny", "--weights", str(weights or project["train"]), "--shards",
            str(project["shards"]), "--out", str(out), "--device", "cpu", *extra]


def test_params_that_are_not_a_params_file(project, tmp_path, capsys):
    before = snapshot(project["root"])
    dup = tmp_path / "dup.yaml"
    dup.write_text(project["params"].read_text() + "pipeline: {datasets: [fashion_mnist]}\n")
    refused(train_argv(dup, project, tmp_path / "o"), capsys, "key 'pipeline' is written twice")
    refused(train_argv(tmp_path, project, tmp_path / "o"), capsys, "not a file")
    binary = tmp_path / "params.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    refused(train_argv(binary, project, tmp_path / "o"), capsys, "not a text file")
    refused(train_argv(tmp_path / "absent.yaml", project, tmp_path / "o"), capsys, "no such file")
    assert snapshot(project["root"]) == before


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("seed", 2**70, "runs.tiny.train.seed must be >= 0 and <= 4294967295"),
    ("batch_size", 1000, "train.batch_size 1000 exceeds the 64 training samples"),
    ("lr", "fast", "runs.tiny.train.lr must be a number"),
])
def test_training_settings_out_of_range(project, tmp_path, capsys, key, value, fragment):
    before = snapshot(project["root"])
    refused(train_argv(with_run(project, tmp_path, **{key: value}), project, tmp_path / "o"), capsys, fragment)
    assert snapshot(project["root"]) == before


def test_a_streamed_batch_larger_than_the_split_is_refused_before_it_waits_forever(project, tmp_path, capsys):
    params = with_run(project, tmp_path, data="stream", batch_size=10**9)
    refused(train_argv(params, project, tmp_path / "o"), capsys, "train.batch_size 1000000000 exceeds the 64 training "
            "samples of")


def test_a_run_name_cannot_climb_out_of_its_folder(project, tmp_path, capsys):
    raw = yaml.safe_load(project["params"].read_text())
    raw["runs"]["../../escape"] = raw["runs"]["tiny"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    refused(["--params", str(path), "train", "../../escape", "--shards", str(project["shards"]), "--out",
             str(tmp_path / "o")], capsys, "the name '../../escape' is not allowed")


def test_command_line_values(project, tmp_path, capsys):
    before = snapshot(project["root"])
    params = project["params"]
    refused(train_argv(params, project, tmp_path / "o", "--device", "gpu"), capsys, "--device 'gpu'")
    if not torch.cuda.is_available():
        refused(train_argv(params, project, tmp_path / "o", "--device", "cuda"), capsys, "no CUDA GPU")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    refused(train_argv(params, project, a_file), capsys, "is a file, not a folder")
    refused(sample_argv(params, project, a_file), capsys, "is a file, not a folder")
    for n in ("0", "-5"):
        refused(sample_argv(params, project, tmp_path / "s", "--num-samples", n), capsys, "--num-samples must be >= 1")
    assert a_file.read_text() == "keep me" and snapshot(project["root"]) == before


def test_a_second_training_of_the_same_folder_is_refused(project, tmp_path, capsys):
    from diffusion.io import exclusive_lock

    out = tmp_path / "train"
    with exclusive_lock(out, "training of tiny"):
        refused(train_argv(project["params"], project, out), capsys, "training of tiny is already running there")
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("damage", ["truncated", "pickle", "other-architecture"])
def test_damaged_weights_at_sample_time(project, tmp_path, capsys, damage):
    weights = tmp_path / "train"
    weights.mkdir()
    good = (project["train"] / "ema.safetensors").read_bytes()
    if damage == "truncated":
        (weights / "ema.safetensors").write_bytes(good[: len(good) // 2])
        fragment = "not a readable safetensors weights file"
    elif damage == "pickle":
        (weights / "ema.safetensors").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
        fragment = "not a readable safetensors weights file"
    else:
        from diffusion.checkpoint import save_weights

        save_weights({"w": torch.zeros(3)}, weights / "ema.safetensors", {})
        fragment = "weights of another architecture than runs.tiny.model"
    refused(sample_argv(project["params"], project, tmp_path / "s", weights=weights), capsys, fragment)
    assert not (tmp_path / "s" / "samples.npz").exists()


def test_a_damaged_sample_chunk_is_drawn_again(project, tmp_path):
    out = tmp_path / "s"
    assert cli.main(sample_argv(project["params"], project, out)) == 0
    first = (out / "samples.npz").read_bytes()
    (out / "chunks" / "chunk-00000000.json").write_text("{not json")
    assert cli.main(sample_argv(project["params"], project, out)) == 0
    assert (out / "samples.npz").read_bytes() == first
    assert json.loads((out / "chunks" / "chunk-00000000.json").read_text())["sha256"]


def test_damaged_shard_manifests(project, tmp_path, capsys):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(project["shards"], shards)
    for text, fragment in (("{oops", "not a JSON manifest"), ("[1, 2]", "manifest format 'list'")):
        (shards / "train" / "manifest.json").write_text(text)
        refused(["--params", str(project["params"]), "train", "tiny", "--shards", str(shards), "--out",
                 str(tmp_path / "o"), "--device", "cpu"], capsys, fragment)


def test_an_s3_endpoint_without_a_scheme(project, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "user:secret@127.0.0.1:9000")
    err = refused(["--params", str(project["params"]), "train", "tiny", "--shards", "s3://bucket/shards", "--out",
                   str(tmp_path / "o"), "--device", "cpu"], capsys, "AWS_ENDPOINT_URL=", "is not an http(s) URL")
    assert "secret" not in err


def test_passwords_in_urls_are_masked():
    from diffusion.io import mask_userinfo

    assert mask_userinfo("at http://me:hunter2@host:9000/b") == "at http://me:***@host:9000/b"
    from flows.storage import endpoint_url, scrub

    assert "hunter2" not in scrub("GET http://me:hunter2@host/x failed")
    assert endpoint_url({"AWS_ENDPOINT_URL": "http://me:hunter2@host:9000"}) == "http://host:9000"


def test_a_full_disk_is_an_error_that_loses_nothing(project, tmp_path, capsys, monkeypatch):
    from diffusion.stages import sample

    out = tmp_path / "s"
    assert cli.main(sample_argv(project["params"], project, out)) == 0
    before = snapshot(out)

    def full(path, *arrays, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sample, "write_npz", full)
    (out / "chunks" / "chunk-00000000.json").unlink()  # one chunk to redraw, whose write then fails
    refused(sample_argv(project["params"], project, out), capsys, "no space left on the device")
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == {k: v for k, v in before.items() if k in after}
    assert "samples.npz" in after and after["samples.npz"] == before["samples.npz"]


def test_a_missing_dataset_key_says_what_to_write(project, tmp_path, capsys):
    raw = yaml.safe_load(project["params"].read_text())
    del raw["runs"]["tiny"]["dataset"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    err = refused(train_argv(path, project, tmp_path / "o"), capsys, "missing key runs.tiny.dataset: name the run's")
    assert "dataset: {}" not in err
