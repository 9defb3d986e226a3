"""Resuming a training run (diffusion/trainer.py): a damaged newest checkpoint falls back to the one before, settings
that do not change training keep the checkpoints, a real change names what changed, and the loss log of a resumed
run equals an uninterrupted one's even when the resume falls inside a logging window."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from data.batches import ArrayBatches
from diffusion import checkpoint
from diffusion.config import load_params
from diffusion.distributed import Dist
from diffusion.trainer import Trainer

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(**train):
    run = load_params().run("rin_fmnist")
    t = dataclasses.replace(run.train, steps=8, batch_size=4, checkpoint_every=4, log_every=3, sample_every=0,
                            warmup_steps=2, precision="fp32", **train)
    return dataclasses.replace(run, model=dataclasses.replace(run.model, preset="rin_tiny", overrides={}), train=t)


def source(run) -> ArrayBatches:
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 1), dtype=np.uint8)
    return ArrayBatches(images, np.zeros(32, np.int64), run.train.batch_size, run.train.seed, False)


class Stop(Exception):
    pass


class StopAfter(ArrayBatches):
    """The batch source of a session killed after `steps` steps (the kill lands between checkpoints)."""

    def __init__(self, inner: ArrayBatches, steps: int):
        self.__dict__ |= inner.__dict__
        self.stop = steps

    def batch(self, step, rank=0, world_size=1):
        if step >= self.stop:
            raise Stop
        return super().batch(step, rank, world_size)


def losses(history):
    return [(row["step"], row["loss"], row["grad_norm"], row["lr"]) for row in history]


def test_a_resume_inside_a_logging_window_logs_what_an_uninterrupted_run_logs(tmp_path):
    run = tiny_run()
    straight = Trainer(run, tmp_path / "straight", CPU).fit(source(run))
    killed = Trainer(run, tmp_path / "resumed", CPU)
    with pytest.raises(Stop):
        killed.fit(StopAfter(source(run), 5))  # checkpoint at 4, inside the window of rows 3 and 6
    resumed = Trainer(run, tmp_path / "resumed", CPU)
    assert resumed.resume() == 4
    result = resumed.fit(source(run))
    assert losses(result.history) == losses(straight.history) and result.final_loss == straight.final_loss


def trained(tmp_path, run) -> Trainer:
    trainer = Trainer(run, tmp_path, CPU)
    trainer.fit(source(run))
    return trainer


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    run = tiny_run()
    trained(tmp_path, run)
    newest = tmp_path / "checkpoints" / "step-00000008"
    state = json.loads((newest / "state.json").read_text())
    (newest / "state.json").write_text(json.dumps(state | {"step": 7}))  # still valid JSON, no longer its hash
    again = Trainer(run, tmp_path, CPU)
    assert again.resume() == 4  # the progress up to step 4 is kept, nothing starts over
    assert [p.name.startswith("damaged-step-00000008-") for p in (tmp_path / "checkpoints").iterdir()].count(True) == 1
    assert not list(tmp_path.glob("checkpoints.stale-*"))


def test_a_truncated_newest_checkpoint_falls_back_too(tmp_path):
    run = tiny_run()
    trained(tmp_path, run)
    weights = tmp_path / "checkpoints" / "step-00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert Trainer(run, tmp_path, CPU).resume() == 4


def test_settings_that_do_not_change_training_keep_the_checkpoints(tmp_path):
    run = tiny_run()
    trained(tmp_path, run)
    moved = dataclasses.replace(run, dataset=dataclasses.replace(run.dataset, root="/elsewhere", download=True,
                                                                 skip_corrupt=True))
    assert Trainer(moved, tmp_path, CPU).resume() == 8


def test_a_real_change_starts_over_and_names_what_changed(tmp_path, caplog):
    run = tiny_run()
    trained(tmp_path, run)
    changed = tiny_run(lr=run.train.lr / 2)
    with caplog.at_level(logging.WARNING):
        assert Trainer(changed, tmp_path, CPU).resume() == 0
    assert f"train.lr {run.train.lr!r} -> {run.train.lr / 2!r}" in caplog.text
    assert len(list(tmp_path.glob("checkpoints.stale-*"))) == 1  # moved aside, not deleted


def test_newest_intact_skips_without_moving_when_asked(tmp_path):
    run = tiny_run()
    trained(tmp_path, run)
    (tmp_path / "checkpoints" / "step-00000008" / "manifest.json").write_text("not json")
    path, state = checkpoint.newest_intact(tmp_path / "checkpoints", move_damaged=False)
    assert path.name == "step-00000004" and state["step"] == 4
    assert (tmp_path / "checkpoints" / "step-00000008").exists()
