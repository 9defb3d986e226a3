"""The train and sample stages as users run them: real processes, torchrun with gloo, kill -9 and resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="needs Fashion-MNIST")


def tiny_params(tmp_path: Path, **train) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["runs"] = {"tiny": {
        "dataset": "fashion_mnist",
        "model": {"preset": "rin_tiny"},
        "train": {"steps": 8, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "warmup_steps": 2,
                  "precision": "fp32", "log_every": 2, "checkpoint_every": 4, "sample_every": 0,
                  "ema_decay": 0.9} | train,
        "sample": {"steps": 4, "num_samples": 6, "batch_size": 4},
    }}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(params: Path, *args: str, nproc: int = 0) -> list[str]:
    launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m"] if nproc else [sys.executable, "-m"]
    return [*launcher, "diffusion.cli", "--params", str(params), *args]


def run_ok(cmd: list[str]) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "DVCLIVE_LOGLEVEL": "WARNING"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def weights(folder: Path, name: str = "model") -> dict:
    return load_file(str(folder / f"{name}.safetensors"))


def test_two_processes_match_one(tmp_path):
    params = tiny_params(tmp_path)
    run_ok(cli(params, "train", "tiny", "--out", str(tmp_path / "one"), "--device", "cpu"))
    run_ok(cli(params, "train", "tiny", "--out", str(tmp_path / "two"), "--device", "cpu", nproc=2))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, worst
    first = weights(tmp_path / "one")["tokenizer.pos"]
    assert not np.allclose(first.numpy(), 0)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    params = tiny_params(tmp_path, steps=24, checkpoint_every=4)
    run_ok(cli(params, "train", "tiny", "--out", str(tmp_path / "straight"), "--device", "cpu"))
    out = tmp_path / "killed"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli(params, "train", "tiny", "--out", str(out), "--device", "cpu"), cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-00000008").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"
    run_ok(cli(params, "train", "tiny", "--out", str(out), "--device", "cpu"))
    log = yaml.safe_load((out / "train_log.json").read_text())
    assert log["resumed_from"] >= 8
    for name in ("model", "ema"):
        a, b = weights(tmp_path / "straight", name), weights(out, name)
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), name


def test_sample_sets_identical_for_one_and_two_processes(tmp_path):
    params = tiny_params(tmp_path, steps=2)
    train_dir = tmp_path / "train"
    run_ok(cli(params, "train", "tiny", "--out", str(train_dir), "--device", "cpu"))
    base = ["sample", "tiny", "--weights", str(train_dir), "--device", "cpu"]
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
