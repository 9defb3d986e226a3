"""The train and sample stages as users run them: real processes, torchrun with gloo, kill -9 and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.usefixtures("fashion_mnist")  # missing, every test here fails (tests/helpers.py)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """512 real Fashion-MNIST training images in shards of 128, written by the shard stage's own function."""
    import dataclasses

    from data.prepare import write_dataset_shards
    from diffusion.config import load_params

    cfg = dataclasses.replace(load_params(REPO / "params.yaml").datasets["fashion_mnist"], max_samples=512,
                              shard_size=128)
    out = tmp_path_factory.mktemp("shards")
    write_dataset_shards(cfg, "fashion_mnist", out, splits=("train",))
    return out


def tiny_params(tmp_path: Path, **train) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["runs"] = {"tiny": {
        "dataset": "fashion_mnist",
        "model": {"family": "rin", "preset": "rin_tiny"},
        "diffusion": {},
        "eval": {},
        "train": {"steps": 8, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "warmup_steps": 2,
                  "precision": "fp32", "log_every": 2, "checkpoint_every": 4, "sample_every": 0,
                  "ema_decay": 0.9, "data": "memory"} | train,
        "sample": {"steps": 4, "num_samples": 6, "batch_size": 4},
    }}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_cmd(params: Path, out: Path, shards: Path, nproc: int = 0) -> list[str]:
    return cli(params, "train", "tiny", "--out", str(out), "--shards", str(shards), "--device", "cpu", nproc=nproc)


def cli(params: Path, *args: str, nproc: int = 0) -> list[str]:
    launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m"] if nproc else [sys.executable, "-m"]
    return [*launcher, "diffusion.cli", "--params", str(params), *args]


def run_ok(cmd: list[str]) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "DVCLIVE_LOGLEVEL": "WARNING"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def live_steps(folder: Path, live: str = "live") -> list[int]:
    """The steps of the loss rows dvclive wrote for a training run."""
    rows = (folder / live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    col = rows[0].split("\t").index("step")
    return [int(r.split("\t")[col]) for r in rows[1:]]


def weights(folder: Path, name: str = "model") -> dict:
    return load_file(str(folder / f"{name}.safetensors"))


def initial_weights(params: Path) -> dict:
    from diffusion.config import load_params
    from diffusion.registry import build_model

    run = load_params(params).run("tiny")
    torch.manual_seed(run.train.seed)
    return build_model(run).state_dict()


def test_two_processes_match_one(tmp_path, shards):
    params = tiny_params(tmp_path)
    run_ok(train_cmd(params, tmp_path / "one", shards))
    run_ok(train_cmd(params, tmp_path / "two", shards, nproc=2))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, worst
    initial = initial_weights(params)  # what the trainer starts from: torch.manual_seed(train.seed), then build
    moved = min((one[k] - initial[k]).abs().max().item() for k in one if k.endswith("weight"))
    assert moved > 100 * worst, (moved, worst)  # every weight matrix trained, far beyond the 1-vs-2 difference
    logs = [json.loads((tmp_path / name / "train_log.json").read_text())["history"] for name in ("one", "two")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [2, 4, 6, 8]
    for a, b in zip(*logs):  # the same global batch and noise: the same loss at every logged step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)


def test_kill_and_resume_equals_uninterrupted(tmp_path, shards):
    params = tiny_params(tmp_path, steps=64, checkpoint_every=4)  # long enough to be killed mid-run
    run_ok(train_cmd(params, tmp_path / "straight", shards))
    out = tmp_path / "killed"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(params, out, shards), cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-00000008").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"
    run_ok(train_cmd(params, out, shards))
    log = yaml.safe_load((out / "train_log.json").read_text())
    assert log["resumed_from"] >= 8
    for name in ("model", "ema"):
        a, b = weights(tmp_path / "straight", name), weights(out, name)
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), name
    # the loss curve of every session is kept: the resumed run logs the same rows as the uninterrupted one
    straight = yaml.safe_load((tmp_path / "straight" / "train_log.json").read_text())
    assert [(r["step"], r["loss"]) for r in log["history"]] == [(r["step"], r["loss"]) for r in straight["history"]]
    # ...and so does its dvclive curve: rows the killed session logged after its last checkpoint are not doubled
    assert live_steps(out) == live_steps(tmp_path / "straight") == list(range(2, 65, 2))


def test_sample_sets_identical_for_one_and_two_processes(tmp_path, shards):
    params = tiny_params(tmp_path, steps=2)
    train_dir = tmp_path / "train"
    run_ok(train_cmd(params, train_dir, shards))
    base = ["sample", "tiny", "--weights", str(train_dir), "--shards", str(shards), "--device", "cpu"]
    run_ok(cli(params, *base, "--out", str(tmp_path / "s1")))
    run_ok(cli(params, *base, "--out", str(tmp_path / "s2"), nproc=2))
    with np.load(tmp_path / "s1" / "samples.npz") as a, np.load(tmp_path / "s2" / "samples.npz") as b:
        assert a.files == ["arr_0"]  # unconditional: no labels array
        assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (6, 32, 32, 1)  # ADM layout: NHWC uint8
        assert np.array_equal(a["arr_0"], b["arr_0"])
        assert len({a["arr_0"][i].tobytes() for i in range(6)}) == 6
    assert (tmp_path / "s1" / "grid.png").stat().st_size > 0
    chunk = tmp_path / "s1" / "chunks" / "chunk-00000000.npz"
    stamp = chunk.stat().st_mtime_ns
    run_ok(cli(params, *base, "--out", str(tmp_path / "s1")))  # a re-run keeps finished chunks
    assert chunk.stat().st_mtime_ns == stamp


def test_changed_config_starts_over_and_keeps_old_checkpoints(tmp_path, shards):
    out = tmp_path / "run"
    run_ok(train_cmd(tiny_params(tmp_path, steps=4), out, shards))
    run_ok(train_cmd(tiny_params(tmp_path, steps=4, lr=5e-4), out, shards))
    log = yaml.safe_load((out / "train_log.json").read_text())
    assert log["resumed_from"] == 0
    stale = list(tmp_path.glob("run/checkpoints.stale-*"))
    assert len(stale) == 1 and (stale[0] / "latest").exists()
    old_live = list(tmp_path.glob("run/live.stale-*"))  # the old run's curves are kept aside, not run into the new
    assert len(old_live) == 1 and live_steps(old_live[0].parent, old_live[0].name) == [2, 4]
    assert live_steps(out) == [2, 4]
    before = json.loads((out / "metrics.json").read_text())
    run_ok(train_cmd(tiny_params(tmp_path, steps=4, lr=5e-4, log_every=1), out, shards))  # logging only: resumes
    assert yaml.safe_load((out / "train_log.json").read_text())["resumed_from"] == 4
    after = json.loads((out / "metrics.json").read_text())  # nothing left to train: the summary is kept, not NaN
    assert math.isfinite(after["final_loss"]) and after["final_loss"] == before["final_loss"]
    assert after["images_per_s"] > 0
