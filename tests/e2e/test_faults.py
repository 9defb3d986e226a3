"""Faults while training, kept as tests: SIGTERM (a preemption) makes every rank save the step it stopped at and exit
with a signal's status; a run killed again and again (SIGKILL and SIGTERM at random moments, one process or two
torchrun ranks) resumes each time and ends bit-exact with an uninterrupted one, weights and logged curves alike."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.e2e.test_stages import REPO, live_steps, run_ok, shards, tiny_params, train_cmd, weights  # noqa: F401

ENV = os.environ | {"OMP_NUM_THREADS": "1", "DVCLIVE_LOGLEVEL": "WARNING"}


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("model", "ema"):
        wa, wb = weights(a, name), weights(b, name)
        assert wa.keys() == wb.keys() and all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa), name
    la = yaml.safe_load((a / "train_log.json").read_text())["history"]
    lb = yaml.safe_load((b / "train_log.json").read_text())["history"]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in la] == [(r["step"], r["loss"], r["grad_norm"]) for r in lb]
    assert live_steps(a) == live_steps(b)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its ranks in sessions of their own: no process group holds them)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def wait_gone(pids: list[int], timeout: float = 120) -> None:
    """Until every process has exited: a rank still writing its checkpoint holds the folder's lock, and a new
    session would rightly refuse to start beside it."""
    deadline = time.time() + timeout
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.time() < deadline, f"process {pid} outlived its launcher by {timeout} s"
            time.sleep(0.05)


def newest_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "manifest.json").exists()]
    return max(steps, default=0)


def test_sigterm_saves_the_current_step_and_a_rerun_resumes_bit_exact(tmp_path, shards):  # noqa: F811
    params = tiny_params(tmp_path, steps=64, checkpoint_every=16)
    run_ok(train_cmd(params, tmp_path / "straight", shards))
    out = tmp_path / "preempted"
    proc = subprocess.Popen(train_cmd(params, out, shards), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and newest_step(out) < 16:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped at step" in err and not (out / "model.safetensors").exists()
    stopped = newest_step(out)
    assert 16 < stopped < 64 and stopped % 16, stopped  # the step it stopped at, not the last periodic checkpoint
    run_ok(train_cmd(params, out, shards))
    assert yaml.safe_load((out / "train_log.json").read_text())["resumed_from"] == stopped
    assert_same_run(tmp_path / "straight", out)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [0, 2])
def test_ten_kills_at_random_moments_each_resume_bit_exact(tmp_path, shards, nproc):  # noqa: F811
    """10 kills (SIGKILL and SIGTERM alternately, at random moments, also during checkpoint writes), each followed by
    a resume; the final weights and curves equal an uninterrupted run's with the same number of processes (two ranks
    reduce gradients in another order than one, so they agree with one process only to rounding)."""
    params = tiny_params(tmp_path, steps=640, checkpoint_every=8, log_every=2)
    run_ok(train_cmd(params, tmp_path / "straight", shards, nproc=nproc))
    out, rng, kills = tmp_path / "killed", random.Random(1234), 0
    while kills < 10:
        proc = subprocess.Popen(train_cmd(params, out, shards, nproc=nproc), cwd=REPO, env=ENV, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = newest_step(out)
        deadline = time.time() + 120
        while time.time() < deadline and newest_step(out) == start and proc.poll() is None:
            time.sleep(0.02)  # wait for this session's first checkpoint, then kill a moment later
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break  # it finished before this kill
        sig = signal.SIGKILL if kills % 2 == 0 else signal.SIGTERM
        ranks = descendants(proc.pid)
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)  # torchrun's ranks: see below
        proc.wait(timeout=120)
        wait_gone(ranks)  # a SIGKILLed torchrun's ranks get SIGTERM from the kernel (PR_SET_PDEATHSIG) and stop
        kills += 1
    assert kills == 10, f"the run finished after {kills} kills; make it longer"
    run_ok(train_cmd(params, out, shards, nproc=nproc))
    assert_same_run(tmp_path / "straight", out)
