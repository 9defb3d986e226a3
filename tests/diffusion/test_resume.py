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


# The checkpoint format itself (diffusion/checkpoint.py), on a two-tensor model: what a checkpoint holds, how a
# half-written one is left and cleaned, which ones are kept, and what each damage is called.


def linear_with_optimizer(kind: str = "adamw"):
    from timm.optim import Lamb

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = Lamb(model.parameters(), lr=0.1) if kind == "lamb" else torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(1, 3)).square().sum().backward()
        opt.step()
    return model, opt


def safetensors_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def test_optimizer_state_round_trips_through_the_flat_format():
    """Tensors (state and param-group ones, as timm's LAMB keeps its step count) go to safetensors, the rest to JSON;
    names may hold dots. unflatten(flatten(s)) is s after the JSON part has been through a file."""
    a, b, c = torch.arange(3.0), torch.tensor(2.0), torch.ones(2, 2)
    state = {"state": {0: {"exp_avg": a, "n_iter": 3}, 1: {"sum.sq": c, "count.seen": 5}, 2: {"only": 1.5}},
             "param_groups": [{"lr": 0.1, "params": [0], "step": b}, {"lr": 0.2, "params": [1]}]}  # fmt: skip
    tensors, rest = checkpoint.flatten_optimizer(state)
    assert sorted(tensors) == ["group.0.step", "state.0.exp_avg", "state.1.sum.sq"]
    assert rest["scalars"] == {"0.n_iter": 3, "1.count.seen": 5, "2.only": 1.5}  # 2: scalars only
    back = checkpoint.unflatten_optimizer(tensors, json.loads(json.dumps(rest)))
    assert sorted(back["state"]) == [0, 1, 2] and set(back["state"][0]) == {"exp_avg", "n_iter"}
    assert back["state"][2] == {"only": 1.5}
    assert torch.equal(back["state"][0]["exp_avg"], a) and back["state"][0]["n_iter"] == 3
    assert torch.equal(back["state"][1]["sum.sq"], c) and back["state"][1]["count.seen"] == 5
    assert torch.equal(back["param_groups"][0]["step"], b) and back["param_groups"][1] == {"lr": 0.2, "params": [1]}
    assert back["param_groups"][0]["lr"] == 0.1 and "step" not in back["state"][0]


@pytest.mark.parametrize("kind", ["adamw", "lamb"])
def test_a_reloaded_optimizer_takes_the_same_next_step(tmp_path, kind):
    model, opt = linear_with_optimizer(kind)
    path = checkpoint.save(tmp_path, 2, model, model, opt)
    model2, opt2 = linear_with_optimizer(kind)  # same start, then perturbed: load must overwrite both
    with torch.no_grad():
        model2.weight.add_(1.0)
    opt2.state.clear()
    checkpoint.load(path, model2, model2, opt2)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(torch.ones(1, 3)).square().sum().backward()
        o.step()
    assert torch.equal(model.weight, model2.weight) and torch.equal(model.bias, model2.bias)


def test_a_checkpoint_holds_four_hashed_files_with_its_step(tmp_path):
    from diffusion.io import sha256_file

    model, opt = linear_with_optimizer()
    path = checkpoint.save(tmp_path, 3, model, model, opt, extra={"fingerprint": "f"})
    assert path == tmp_path / "step-00000003" and (path.stat().st_mode & 0o777) == 0o755
    assert (tmp_path / "latest").read_text() == "step-00000003\n"
    names = ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    assert sorted(p.name for p in path.iterdir()) == sorted([*names, "manifest.json"])
    assert checkpoint.verify(path) == {"step": 3, "sha256": {n: sha256_file(path / n) for n in names}}
    for name in names[:3]:
        assert safetensors_metadata(path / name) == {"step": "3"}
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 3 and state["fingerprint"] == "f" and set(state["optimizer"]) == {"param_groups", "scalars"}


def test_save_weights_keeps_the_metadata_and_its_bytes_do_not_depend_on_its_order(tmp_path):
    tensors = {"w": torch.ones(2)}
    checkpoint.save_weights(tensors, tmp_path / "a.safetensors", {"b": "2", "a": "1"})
    checkpoint.save_weights(tensors, tmp_path / "b.safetensors", {"a": "1", "b": "2"})
    assert safetensors_metadata(tmp_path / "a.safetensors") == {"a": "1", "b": "2"}
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_only_the_newest_two_are_kept_and_a_step_written_again_replaces_it(tmp_path):
    model, opt = linear_with_optimizer()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, model, opt)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    (tmp_path / "step-00000003" / "stray").write_text("from a run killed after the rename")
    checkpoint.save(tmp_path, 3, model, model, opt)
    assert not (tmp_path / "step-00000003" / "stray").exists()
    checkpoint.verify(tmp_path / "step-00000003")


def test_a_save_killed_before_the_rename_leaves_a_hidden_folder_that_the_next_save_removes(tmp_path, monkeypatch):
    model, opt = linear_with_optimizer()
    checkpoint.save(tmp_path, 1, model, model, opt)

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "fsync_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, model, model, opt)
    (partial,) = tmp_path.glob(".step-00000002.*")  # beside the others, so the next save finds it
    assert (partial / "manifest.json").exists() and not (tmp_path / "step-00000002").exists()
    assert (tmp_path / "latest").read_text() == "step-00000001\n"
    monkeypatch.undo()
    checkpoint.save(tmp_path, 2, model, model, opt)
    assert not list(tmp_path.glob(".step-*")) and (tmp_path / "latest").read_text() == "step-00000002\n"


def test_each_damage_is_named_with_the_fix(tmp_path):
    model, opt = linear_with_optimizer()
    path = checkpoint.save(tmp_path, 1, model, model, opt)
    fix = "delete this checkpoint directory to resume from an earlier one"
    (path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{path}/model\.safetensors: sha256 [0-9a-f]{{64}} does "
                       rf"not match the manifest's [0-9a-f]{{64}}; the file is corrupt: {fix}$"):  # fmt: skip
        checkpoint.verify(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{path}/model\.safetensors: sha256 missing does not"):
        checkpoint.verify(path)
    (path / "manifest.json").write_text(json.dumps({"step": 1, "sha256": {"model.safetensors": "0"}}))
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{path}/manifest\.json: lists \['model\.safetensors'\], "
                       "not a checkpoint's four files$"):  # fmt: skip
        checkpoint.verify(path)
    (path / "manifest.json").write_text("{")
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{path}/manifest\.json: not a checkpoint manifest "
                       rf"\(.+\); {fix}$"):  # fmt: skip
        checkpoint.verify(path)
    (path / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{path}: no manifest\.json; the checkpoint is incomplete, "
                       "delete it to resume from an earlier one$"):  # fmt: skip
        checkpoint.verify(path)


@pytest.mark.parametrize("move", [True, False])
def test_a_damaged_newest_is_moved_aside_by_default_and_the_warning_says_what_was_done(tmp_path, caplog, move):
    model, opt = linear_with_optimizer()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model, model, opt)
    (tmp_path / "step-00000002" / "state.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="diffusion.checkpoint"):
        found = checkpoint.newest_intact(tmp_path) if move else checkpoint.newest_intact(tmp_path, move_damaged=False)
    assert found[0] == tmp_path / "step-00000001" and found[1]["step"] == 1
    (record,) = caplog.records
    aside = list(tmp_path.glob("damaged-step-00000002-*"))
    assert len(aside) == int(move) and (tmp_path / "step-00000002").exists() != move
    done = f"moved to {aside[0]}" if move else "skipped"
    damaged = tmp_path / "step-00000002"
    message = record.getMessage()
    assert message.startswith(f"{damaged} is damaged ({damaged}/state.json: sha256 "), message
    assert message.endswith(f"the file is corrupt: delete this checkpoint directory to resume from an earlier one); "
                            f"{done}, falling back to the previous checkpoint"), message  # fmt: skip


def test_a_latent_datasets_autoencoder_loads_with_its_scale_or_is_refused_naming_the_fix(tmp_path):
    from diffusion import registry
    from diffusion.config import AutoencoderConfig
    from diffusion.io import sha256_file

    cfg = AutoencoderConfig(dataset="fashion_mnist", base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                            z_channels=3, norm_groups=4, loss="l1", kl_weight=1e-6, steps=1, batch_size=16, lr=2e-3,
                            seed=0, log_every=50, weights=None)  # fmt: skip
    torch.manual_seed(0)
    trained = registry.build_autoencoder(cfg, 1).eval()
    path = tmp_path / "latents" / checkpoint.AUTOENCODER_FILE
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{path}: no autoencoder weights; run the latent dataset's "
                       r"autoencoder stage \(dvc.yaml autoencoder@latents\) first$"):  # fmt: skip
        checkpoint.load_first_stage(path, cfg, 1)
    path.parent.mkdir()
    checkpoint.save_weights(trained.state_dict(), path, {})
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{path}: no latent_scale in the safetensors metadata; "
                       "write it with the autoencoder stage$"):  # fmt: skip
        checkpoint.load_first_stage(path, cfg, 1)
    checkpoint.save_weights(trained.state_dict(), path, {"latent_scale": "0.25"})
    stage = checkpoint.load_first_stage(path, cfg, 1)
    assert stage.scale == 0.25 and stage.path == path and stage.sha256 == sha256_file(path)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(stage.encode(x), trained.encode(x)[0] * 0.25)


def test_a_runs_autoencoder_comes_from_its_latent_datasets_folder_on_the_device_asked(tmp_path):
    from types import SimpleNamespace

    from diffusion import registry
    from diffusion.config import AutoencoderConfig

    cfg = AutoencoderConfig(dataset="fashion_mnist", base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            z_channels=3, norm_groups=4, loss="l1", kl_weight=1e-6, steps=1, batch_size=16, lr=2e-3,
                            seed=0, log_every=50, weights=None)  # fmt: skip
    torch.manual_seed(0)
    trained = registry.build_autoencoder(cfg, 1)
    checkpoint.save_weights(trained.state_dict(), tmp_path / checkpoint.AUTOENCODER_FILE, {"latent_scale": "2.0"})
    run = SimpleNamespace(autoencoder=cfg, dataset=SimpleNamespace(channels=1))
    stage = checkpoint.first_stage(run, str(tmp_path), "meta")
    assert stage.path == tmp_path / checkpoint.AUTOENCODER_FILE and stage.scale == 2.0
    assert {p.device.type for p in stage.model.parameters()} == {"meta"}
    assert checkpoint.first_stage(SimpleNamespace(autoencoder=None), tmp_path, "cpu") is None


def test_trained_weights_load_on_the_cpu_by_default_and_bad_files_are_named(tmp_path):
    from diffusion import registry
    from diffusion.config import ConfigError
    from tests.diffusion.test_trainer import tiny_run

    run = tiny_run()
    weights = tmp_path / "model.safetensors"
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{weights}: no trained weights; train that run first "
                       r"\(dvc repro, or `python -m diffusion.cli train RUN`\)$"):  # fmt: skip
        checkpoint.load_trained(run, [weights])
    torch.manual_seed(0)
    net = registry.build_model(run)
    checkpoint.save_weights(net.state_dict(), weights, {})
    loaded = checkpoint.load_trained(run, [weights])
    assert not loaded.training and {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    assert {p.device.type for p in checkpoint.load_trained(run, [weights], "meta").parameters()} == {"meta"}
    other = tmp_path / "other.safetensors"
    checkpoint.save_weights({"w": torch.ones(1)}, other, {})
    with pytest.raises(ConfigError, match=rf"^{other}: weights of another architecture"):
        checkpoint.load_trained(run, [other])
    other.write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{other}: not a readable safetensors weights file "
                       r"\(SafetensorError: .+\); restore it \(`dvc pull`, `dvc checkout`\) or re-run the stage "
                       "that wrote it$"):  # fmt: skip
        checkpoint.read_weights(other)
    with pytest.raises(checkpoint.CheckpointError, match=r"^runs\.rin_fmnist: needs 1 train folder\(s\), one for "
                       r"each of \['rin_fmnist'\] in this order; got 2$"):  # fmt: skip
        checkpoint.weight_files(run, [tmp_path, tmp_path])


def test_safetensors_headers_follow_the_format_for_any_metadata_length(tmp_path):
    """The header is JSON that starts with '{' and is padded with trailing spaces only (the safetensors format), its
    metadata sorted, for metadata of every length mod 8 (one of them needs no padding)."""
    import struct

    from safetensors.torch import load

    for n in range(9):
        metadata = {"z": "1", "a": "x" * n}
        data = checkpoint.safetensors_bytes({"w": torch.arange(3.0)}, metadata)
        (size,) = struct.unpack("<Q", data[:8])
        header = data[8 : 8 + size]
        assert header.startswith(b'{"') and header.rstrip(b" ").endswith(b"}")
        assert json.loads(header)["__metadata__"] == metadata and list(json.loads(header)["__metadata__"]) == ["a", "z"]
        assert torch.equal(load(data)["w"], torch.arange(3.0))
    assert b"__metadata__" not in checkpoint.safetensors_bytes({"w": torch.ones(1)}, None)


class MeanScore:
    """A stand-in for the proxy KID (its features need the Inception weights): the samples' mean pixel, and the
    images it was called on."""

    def __init__(self):
        self.calls: list[np.ndarray] = []

    def __call__(self, images: np.ndarray) -> dict:
        self.calls.append(images)
        return {"kid": float(images.mean()), "kid_std": 0.0}


def proxied(**train):
    from diffusion.config import ProxyConfig

    return tiny_run(proxy=ProxyConfig(every=3, num_samples=5, steps=2), **train)


def test_proxy_points_fall_every_n_steps_and_at_the_end_with_counted_flops(tmp_path):
    from diffusion.flops import train_flops_per_example

    run = proxied()
    score = MeanScore()
    result = Trainer(run, tmp_path, CPU).fit(source(run), proxy=score)
    assert [r["step"] for r in result.proxy] == [3, 6, 8]
    per_example = train_flops_per_example(run)
    assert per_example > 0
    for row in result.proxy:
        assert row["images_seen"] == row["step"] * run.train.batch_size
        assert row["train_pflop"] == pytest.approx(row["images_seen"] * per_example / 1e15)
        assert (row["proxy_samples"], row["proxy_sampling_steps"]) == (5, 2)
    assert [im.shape for im in score.calls] == [(5, 32, 32, 1)] * 3 and all(im.dtype == np.uint8 for im in score.calls)
    assert not np.array_equal(score.calls[0], score.calls[-1])  # scored on the weights of the moment, not once
    assert Trainer(run, tmp_path / "off", CPU).fit(source(run)).proxy == []  # no score given: no points


def test_the_self_conditioning_pass_is_counted_in_the_training_flops():
    from diffusion.flops import run_cost, train_flops_per_example

    off, on = tiny_run(self_cond_rate=0.0), tiny_run(self_cond_rate=0.9)
    assert train_flops_per_example(off) == run_cost(off).train_flops
    cost = run_cost(on)  # with the warm-start MLP on the first pass's latents
    assert train_flops_per_example(on) == cost.train_flops + cost.forward_flops > train_flops_per_example(off)


def test_a_killed_run_keeps_its_proxy_points_and_scores_the_rest_as_an_uninterrupted_one(tmp_path):
    run = proxied()
    straight = Trainer(run, tmp_path / "straight", CPU).fit(source(run), proxy=MeanScore())
    killed = Trainer(run, tmp_path / "resumed", CPU)
    first = MeanScore()
    with pytest.raises(Stop):
        killed.fit(StopAfter(source(run), 7), proxy=first)  # points at 3 and 6, checkpoint at 4: 6 is lost
    assert len(first.calls) == 2
    again = MeanScore()
    resumed = Trainer(run, tmp_path / "resumed", CPU).fit(source(run), proxy=again)
    assert [r["step"] for r in resumed.proxy] == [3, 6, 8] and len(again.calls) == 2  # 6 redrawn, 3 kept
    keep = ("step", "images_seen", "train_pflop", "kid")
    assert [{k: r[k] for k in keep} for r in resumed.proxy] == [{k: r[k] for k in keep} for r in straight.proxy]


def test_the_throughput_leaves_out_the_proxys_time_and_a_resume_without_points_warns(tmp_path, caplog):
    import time

    class SlowScore(MeanScore):
        def __call__(self, images):
            time.sleep(0.5)
            return super().__call__(images)

    run = proxied()
    result = Trainer(run, tmp_path / "a", CPU).fit(source(run), proxy=SlowScore())
    plain = Trainer(run, tmp_path / "b", CPU).fit(source(run))  # the same steps without a proxy
    assert sum(r["proxy_seconds"] for r in result.proxy) > 1.5
    # 1.5 s of proxy against well under a second of training: counted in, the rate would be several times lower
    assert result.images_per_s > 0.5 * plain.images_per_s
    caplog.set_level(logging.WARNING)
    Trainer(run, tmp_path / "b", CPU).fit(source(run))  # b's checkpoints have no proxy points
    assert "no proxy points for steps 3, 6, 8" in caplog.text
