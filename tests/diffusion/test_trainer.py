"""Training: a tiny RIN overfits real images; the LR schedule and the LR each step is taken with; gradient clipping;
the weight-decay groups; LAMB (the authors' rule, and that it trains); EMA by hand; NaN guard; checkpoints."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from timm.optim import Lamb

from data.batches import ArrayBatches, pad_to
from data.readers import load_idx_split
from diffusion import checkpoint
from diffusion.config import ScheduleConfig, load_params
from diffusion.distributed import Dist
from diffusion.objectives import NoiseDraw, diffusion_loss
from diffusion.optim import lr_factor
from diffusion.schedules import Schedule
from diffusion.trainer import Trainer, TrainingDiverged, TrainResult, train_step
from tests.helpers import require_fashion_mnist, tiny_rin

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def real_batch(n: int) -> torch.Tensor:
    images, _ = load_idx_split(require_fashion_mnist(), "test")
    x = torch.from_numpy(pad_to(images[:n], 32)).float()[:, None] / 127.5 - 1
    return x  # (n, 1, 32, 32) in [-1, 1]


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("lamb", marks=pytest.mark.slow)])
def test_tiny_rin_overfits_a_real_batch(optimizer):
    torch.manual_seed(0)
    x0 = real_batch(8)
    model = tiny_rin()
    sched = Schedule(ScheduleConfig("sigmoid", -3, 3, 0.9))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3) if optimizer == "adamw" else Lamb(params, lr=2e-2, max_grad_norm=None)
    noise = NoiseDraw.draw(torch.Generator().manual_seed(0), x0.shape)  # the same draws every step: memorisable

    def loss_fixed_noise():
        return diffusion_loss(model, x0, None, sched, "eps", 0.5, noise).mean()

    with torch.no_grad():
        first = loss_fixed_noise().item()
    for _ in range(200):
        loss = loss_fixed_noise()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_fixed_noise().item()
    assert last < first / 10, (first, last)


def test_lr_warmup_then_cosine():
    cfg = load_params().run("rin_fmnist").train
    assert lr_factor(0, cfg) == pytest.approx(1 / cfg.warmup_steps)
    assert lr_factor(cfg.warmup_steps - 1, cfg) == pytest.approx(1.0)
    mid = cfg.warmup_steps + (cfg.steps - cfg.warmup_steps) // 2
    assert lr_factor(mid, cfg) == pytest.approx(0.5, abs=0.01)
    assert lr_factor(cfg.steps, cfg) == pytest.approx(0.0, abs=1e-9)


def test_lamb_trust_ratio_scales_update_to_weight_norm():
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))  # ||w|| = 8
    opt = Lamb([{"params": [w], "weight_decay": 0.0, "always_adapt": True}], lr=0.1, max_grad_norm=None)
    w.grad = torch.ones(4, 4) * 1e-3
    opt.step()
    # Adam's first update is sign(grad) with norm 4; the trust ratio 8/4 makes the step lr * ||w|| = 0.8 in norm.
    assert (torch.full((4, 4), 2.0) - w.detach()).norm().item() == pytest.approx(0.8, rel=1e-4)


def tfa_lamb_step(w, g, m, v, t, lr, wd, adapt, b1=0.9, b2=0.999, eps=1e-8):
    """One step of TensorFlow Addons' LAMB (the optimiser of pix2seq's RIN runs), in float64 numpy: the oracle."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * w
    ratio = 1.0
    if adapt:
        w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(update)
        ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    return w - lr * ratio * update, m, v


# weight decay 0: the trust ratio still applies to kernels (pix2seq); 0.03: not timm's default 0.01, so the test sees
# whether the configured value reaches the optimiser
@pytest.mark.parametrize("weight_decay", [0.0, 0.03])
def test_lamb_follows_the_authors_update_rule_and_exempts_biases_and_norms(weight_decay):
    from diffusion.optim import LAMB_EPS, make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    torch.nn.init.zeros_(model[2].weight)  # a zero-initialised kernel (trust ratio 1 until it grows)
    torch.nn.init.zeros_(model[0].bias)  # a zero-initialised bias
    model = model.double()
    cfg = dataclasses.replace(load_params().run("rin_fmnist").train, optimizer="lamb", lr=3e-3,
                              weight_decay=weight_decay)
    opt = make_optimizer(model, cfg)
    exempt = {"0.bias", "1.weight", "1.bias", "2.bias"}  # biases, LayerNorm gamma and beta
    oracle = {n: (p.detach().numpy().copy(), np.zeros(p.shape), np.zeros(p.shape)) for n, p in model.named_parameters()}
    rng = np.random.default_rng(1)
    for t in range(1, 6):
        for name, p in model.named_parameters():
            g = rng.normal(size=p.shape)
            p.grad = torch.from_numpy(g)
            w, m, v = oracle[name]
            oracle[name] = tfa_lamb_step(w, g, m, v, t, cfg.lr, 0.0 if name in exempt else cfg.weight_decay,
                                         adapt=name not in exempt, b1=cfg.beta1, b2=cfg.beta2, eps=LAMB_EPS)
        opt.step()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), oracle[name][0], rtol=1e-10, atol=1e-12, err_msg=name)
    # the defect this guards against: a zero-initialised bias under the trust ratio (||w|| = 0) barely moves
    assert model[0].bias.detach().abs().min() > 1e-3


def test_nan_loss_stops_with_clear_error():
    run = load_params().run("rin_fmnist")
    model = tiny_rin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    bad = (torch.full((2, 1, 32, 32), math.nan), torch.zeros(2, dtype=torch.long))
    noise = NoiseDraw.draw(torch.Generator().manual_seed(0), (2, 1, 32, 32))
    with pytest.raises(TrainingDiverged, match="loss nan"):
        train_step(model, bad, noise, opt, run, Schedule(run.diffusion.train_schedule), CPU)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched


def test_array_batches_epochs_and_rank_slices():
    images = np.arange(10 * 4 * 4, dtype=np.uint8).reshape(10, 4, 4)
    labels = np.arange(10)
    src = ArrayBatches(images, labels, 4, seed=0, random_flip=True)
    x1, y1 = src.batch(0)
    y2 = src.batch(1)[1]
    assert x1.shape == (4, 1, 4, 4) and x1.min() >= -1 and x1.max() <= 1
    assert len(set(torch.cat([y1, y2]).tolist())) == 8  # within an epoch no image repeats
    assert torch.equal(src.batch(5)[0], ArrayBatches(images, labels, 4, 0, True).batch(5)[0])  # pure in step
    halves = [src.batch(3, rank=r, world_size=2) for r in range(2)]
    whole = src.batch(3)
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = tiny_rin()
    ema = torch.optim.swa_utils.AveragedModel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 32, 32), torch.rand(2))[0].sum().backward()
    opt.step()
    path = checkpoint.save(tmp_path, 7, model, ema, opt, extra={"note": "x"})
    assert checkpoint.newest_intact(tmp_path)[0] == path
    fresh, fresh_ema = tiny_rin(), torch.optim.swa_utils.AveragedModel(tiny_rin())
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = checkpoint.load(path, fresh, fresh_ema, fresh_opt)
    assert state["step"] == 7 and state["note"] == "x"
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    s0, s1 = opt.state_dict()["state"][0], fresh_opt.state_dict()["state"][0]
    assert torch.equal(s0["exp_avg_sq"], s1["exp_avg_sq"]) and torch.equal(s0["step"], s1["step"])
    with (path / "model.safetensors").open("r+b") as fh:  # flip one byte
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors: sha256 .* does not match"):
        checkpoint.load(path, fresh, fresh_ema, fresh_opt)


def test_preview_grid_is_a_loggable_image(tmp_path):
    import dataclasses

    from dvclive import Live

    run = load_params().run("rin_fmnist")
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, preset="rin_tiny"),
                              sample=dataclasses.replace(run.sample, steps=2))
    trainer = Trainer(run, tmp_path, CPU)
    image = trainer.preview(n=4)
    assert image.dtype == np.uint8 and image.ndim == 2  # grayscale: (H, W), which PIL and dvclive accept
    with Live(dir=str(tmp_path / "live"), save_dvc_exp=False, dvcyaml=False) as live:
        live.log_image("preview/x.png", image)
    assert (tmp_path / "live" / "plots" / "images" / "preview" / "x.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("decay", "after_three"),
    [
        (0.9, 1 / 22 * 1.0 + 9 / 44 * 2.0 + 3 / 4 * 4.0),  # warm-up decays 2/11, 3/12 (both below 0.9)
        (0.2, 0.2 * (2 / 11 * 1.0 + 9 / 11 * 2.0) + 0.8 * 4.0),  # 2/11 < 0.2, then the decay itself
    ],
)
def test_ema_of_three_known_weights(decay, after_three):
    """By hand: the 1st update copies; the n-th after it keeps min(decay, (1 + n) / (10 + n)) of the average."""
    from torch.optim.swa_utils import AveragedModel

    from diffusion.trainer import ema_update

    w = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(w, multi_avg_fn=ema_update(decay), use_buffers=True)
    seen = []
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            w.weight.fill_(value)
        ema.update_parameters(w)
        seen.append(ema.module.weight.item())
    assert seen[0] == 1.0
    assert seen[2] == pytest.approx(after_three, rel=1e-6)


def test_ema_tracks_with_its_decay_once_warmed_up():
    from torch.optim.swa_utils import AveragedModel

    from diffusion.trainer import ema_update

    w = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(w, multi_avg_fn=ema_update(0.5), use_buffers=True)
    with torch.no_grad():
        w.weight.fill_(1.0)
    for _ in range(20):
        ema.update_parameters(w)
    with torch.no_grad():
        w.weight.fill_(0.0)
    ema.update_parameters(w)  # n = 20: (1 + 20) / (10 + 20) = 0.7 > 0.5, so the decay 0.5 itself
    assert ema.module.weight.item() == pytest.approx(0.5, rel=1e-6)


def tiny_run(**train):
    """rin_fmnist shrunk to the rin_tiny preset, fp32, 4 images a step; `train` overrides its train section."""
    run = load_params().run("rin_fmnist")
    base = {"steps": 3, "batch_size": 4, "precision": "fp32", "self_cond_rate": 0.0, "optimizer": "adamw",
            "warmup_steps": 0, "ema_decay": 0.9, "weight_decay": 0.0, "grad_clip": 1.0}
    return dataclasses.replace(run, model=dataclasses.replace(run.model, preset="rin_tiny", overrides={}),
                               train=dataclasses.replace(run.train, **(base | train)))


def random_source(batch_size: int = 4) -> ArrayBatches:
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32), dtype=np.uint8)
    return ArrayBatches(images, np.zeros(16, dtype=np.int64), batch_size, seed=0, random_flip=False)


def test_trainer_ema_and_exported_weights(tmp_path):
    """Three real steps: the EMA is 1/22 w1 + 9/44 w2 + 3/4 w3 of the weights after each step (decay 0.9, warm-up
    2/11 then 3/12), and export writes it to ema.safetensors beside the raw weights, which differ from it."""
    from safetensors.torch import load_file

    trainer = Trainer(tiny_run(), tmp_path, CPU)
    source, after = random_source(), []
    for _ in range(3):
        trainer.one_step(source)
        after.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    w1, w2, w3 = after
    expected = {k: 1 / 22 * w1[k] + 9 / 44 * w2[k] + 3 / 4 * w3[k] for k in w3}
    ema = trainer.ema.module.state_dict()
    for k in expected:
        torch.testing.assert_close(ema[k], expected[k], rtol=1e-5, atol=1e-7,
                                   msg=f"EMA of {k} is not 1/22 w1 + 9/44 w2 + 3/4 w3")
    trainer.export(TrainResult(3, 0, 0.0, 0.0, []))
    model_file, ema_file = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "ema.safetensors")
    assert all(torch.equal(model_file[k], w3[k]) for k in w3)
    assert all(torch.equal(ema_file[k], ema[k]) for k in ema), "ema.safetensors does not hold the EMA"
    assert max((model_file[k] - ema_file[k]).abs().max().item() for k in ema_file) > 1e-4


@pytest.mark.parametrize(("warmup", "decay"), [(0, "cosine"), (2, "cosine"), (0, "constant")])
def test_the_lr_the_optimizer_steps_with(warmup, decay, tmp_path):
    """Every parameter group steps with lr x the schedule at the step being taken: linear warmup from 1/warmup,
    then 0.5 (1 + cos(pi p)) over the steps after warmup (p their fraction), or 1 (constant)."""
    steps, lr = 6, 0.01
    run = tiny_run(steps=steps, warmup_steps=warmup, lr=lr, lr_decay=decay, lr_decay_fraction=1.0, weight_decay=0.1)
    trainer = Trainer(run, tmp_path, CPU)
    applied = []
    real_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        applied.append([g["lr"] for g in trainer.optimizer.param_groups])
        return real_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    first = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    source, logged = random_source(), []
    for k in range(steps):
        logged.append(trainer.one_step(source)[2])
        if k == 0:  # Adam's first update is lr * sign(grad): a bias moves by exactly the lr applied
            bias = trainer.model.tokenizer.out.bias
            moved = (bias.detach() - first["tokenizer.out.bias"]).abs()
            assert moved.max().item() == pytest.approx(applied[0][0], rel=1e-4)
    expected = []
    for k in range(steps):
        if k < warmup:
            expected.append(lr * (k + 1) / warmup)
        elif decay == "constant":
            expected.append(lr)
        else:
            expected.append(lr * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))))
    assert len(trainer.optimizer.param_groups) == 2  # decayed and not decayed: both follow the schedule
    for k, groups in enumerate(applied):
        assert groups == pytest.approx([expected[k]] * 2, rel=1e-9), k
    assert logged == pytest.approx(expected, rel=1e-9)


def reference_gradients(model, run, batch, noise) -> dict[str, torch.Tensor]:
    """The step's gradients computed here, on a copy: the loss of diffusion_loss, backward, nothing clipped."""
    import copy

    twin = copy.deepcopy(model)
    loss = diffusion_loss(twin, batch[0], None, Schedule(run.diffusion.train_schedule), run.diffusion.prediction,
                          0.0, noise).mean()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in twin.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("clip_fraction", [0.25, 0.0])
def test_gradient_clipping_scales_the_step_to_the_global_norm(clip_fraction):
    """With SGD(lr=1) the step is minus the gradient the optimizer got: the reference gradient scaled by
    grad_clip / ||g|| when the global norm ||g|| exceeds grad_clip, untouched with grad_clip 0 (off)."""
    torch.manual_seed(0)
    model = tiny_rin(self_cond=False)
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    batch = (x0, torch.zeros(4, dtype=torch.long))
    noise = NoiseDraw.draw(torch.Generator().manual_seed(2), x0.shape)
    probe = tiny_run()
    grads = reference_gradients(model, probe, batch, noise)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    run = tiny_run(grad_clip=clip_fraction * norm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, grad_norm, _ = train_step(model, batch, noise, torch.optim.SGD(model.parameters(), lr=1.0), run,
                                 Schedule(run.diffusion.train_schedule), CPU)
    assert grad_norm == pytest.approx(norm, rel=1e-4)  # reported before clipping
    scale = clip_fraction if clip_fraction else 1.0
    for n, p in model.named_parameters():
        want = before[n] - scale * grads[n] if n in grads else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-7,
                                   msg=f"{n}: the step is not -{scale:g} x the unclipped gradient")


def expected_decay(model: torch.nn.Module, optimizer: str) -> dict[str, bool]:
    """The rule, per parameter, from what owns it: AdamW decays Linear / conv kernels only; LAMB (pix2seq) decays
    everything but biases and normalisation scales and shifts (so also embeddings, positions, latents)."""
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)
    kernels = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    out = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if optimizer == "adamw":
                out[full] = isinstance(module, kernels) and name == "weight"
            else:
                out[full] = name != "bias" and not isinstance(module, norms)
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
@pytest.mark.parametrize("family", ["rin", "meme"])
def test_weight_decay_reaches_exactly_the_parameters_it_should(optimizer, family):
    """With zero gradients a step is weight decay alone: AdamW shrinks a decayed tensor by (1 - lr wd); LAMB's trust
    ratio turns wd w into a step of lr ||w|| (w -> (1 - lr) w); an exempt tensor does not move."""
    from diffusion.optim import make_optimizer
    from meme.presets import PRESETS as MEME_PRESETS
    from meme.unet import UNet

    torch.manual_seed(0)
    if family == "rin":
        model = tiny_rin(num_classes=10)  # class embedding, positions, latents, LayerNorms
    else:
        model = UNet(dataclasses.replace(MEME_PRESETS["iunet_tiny"], num_classes=3))  # GroupNorm, iFormer norms
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.5)  # no tensor at zero (its trust ratio would be 1, its decay invisible)
    lr, wd = 0.1, 0.5
    cfg = dataclasses.replace(tiny_run().train, optimizer=optimizer, lr=lr, weight_decay=wd)
    opt = make_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    shrink = 1 - lr * wd if optimizer == "adamw" else 1 - lr
    rule = expected_decay(model, optimizer)
    assert set(rule) == set(before)
    assert any(rule.values()) and not all(rule.values())
    for n, p in model.named_parameters():
        factor = shrink if rule[n] else 1.0
        torch.testing.assert_close(p.detach(), factor * before[n], rtol=1e-5, atol=0, msg=f"{n} ({optimizer})")


def test_lamb_trains_a_tiny_problem_fast():
    """The optimiser the paper presets use, built as the trainer builds it (pix2seq's groups and eps), fits a small
    regression: the loss falls 20-fold in 150 steps."""
    from diffusion.optim import make_optimizer

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 1)) + 0.5 * x[:, :1] ** 2  # (64, 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                torch.nn.Linear(32, 1))
    cfg = dataclasses.replace(tiny_run().train, optimizer="lamb", lr=1e-2, weight_decay=0.01)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, Lamb)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def test_live_metrics_are_trimmed_to_the_checkpoint_or_moved_aside(tmp_path):
    from diffusion.trainer import align_live

    tsv = tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("timestamp\tstep\tloss\n" + "".join(f"{100 + s}\t{s}\t0.{s}\n" for s in (2, 4, 6, 8, 10, 12)))
    align_live(tmp_path / "live", 8)  # a session killed at step 12 resumes from its checkpoint at 8
    assert [r.split("\t")[1] for r in tsv.read_text().splitlines()[1:]] == ["2", "4", "6", "8"]
    align_live(tmp_path / "live", 0)  # a run that starts over keeps the old curves aside
    assert not (tmp_path / "live").exists()
    [aside] = tmp_path.glob("live.stale-*")
    assert (aside / "plots" / "metrics" / "train" / "loss.tsv").read_text().count("\n") == 5


@pytest.mark.parametrize(("fraction", "end"), [(1.0, 0.0), (0.8, 0.0955), (0.7, 0.2061)])
def test_the_decay_covers_a_fraction_of_the_cosine_as_pix2seq_cosine_at(fraction, end):
    cfg = dataclasses.replace(load_params().run("rin_fmnist").train, steps=1000, warmup_steps=100,
                              lr_decay="cosine", lr_decay_fraction=fraction)
    assert lr_factor(99, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(1.0)
    assert lr_factor(1000, cfg) == pytest.approx(end, abs=1e-4)  # 0.5 (1 + cos(pi f)): 9.5% and 20.6% of the peak


def test_the_optimisers_take_the_configured_betas_and_skip_only_frozen_tensors():
    from diffusion.optim import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)  # frozen, and first: the tensors after it still train
    for optimizer in ("adamw", "lamb"):
        cfg = dataclasses.replace(tiny_run().train, optimizer=optimizer, beta1=0.8, beta2=0.95)
        opt = make_optimizer(model, cfg)
        assert {g["betas"] for g in opt.param_groups} == {(0.8, 0.95)}
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        assert trained == {id(p) for p in model.parameters()} - {id(model[0].weight)}


def test_the_lr_stays_at_the_end_of_its_decay_past_the_last_step_and_a_one_step_decay_ends_there():
    cfg = dataclasses.replace(tiny_run().train, steps=10, warmup_steps=2, lr_decay="cosine", lr_decay_fraction=1.0)
    assert lr_factor(10, cfg) == pytest.approx(0.0, abs=1e-12) and lr_factor(15, cfg) == lr_factor(10, cfg)
    one = dataclasses.replace(cfg, steps=3)  # one step of decay after the warmup
    assert lr_factor(2, one) == 1.0 and lr_factor(3, one) == pytest.approx(0.0, abs=1e-12)


def test_the_fused_adamw_takes_the_per_tensor_loops_steps(tmp_path):
    """The trainer's AdamW is the fused kernel (a speed choice, benchmarks/speed.py): three steps from the same
    weights and batches land where the per-tensor loop lands, decay groups included."""
    from diffusion.optim import param_groups

    run = tiny_run(weight_decay=0.1)
    trainer = Trainer(run, tmp_path, CPU)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)
    twin = Trainer(run, tmp_path / "twin", CPU)
    t = run.train
    twin.optimizer = torch.optim.AdamW(param_groups(twin.model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                       foreach=False)
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    a, b = random_source(), random_source()
    for _ in range(3):
        trainer.one_step(a)
        twin.one_step(b)
    moved = 0.0
    for (name, p), q in zip(trainer.model.named_parameters(), twin.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"fused and looped AdamW differ at {name}")
        moved = max(moved, (p - init[name]).abs().max().item())
    assert moved > 1e-4, "three steps did not move the weights"


def test_compile_setting_compiles_on_cuda_only_when_auto():
    from diffusion.distributed import use_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert (use_compile("auto", cpu), use_compile("auto", cuda)) == (False, True)
    assert use_compile("on", cpu) and use_compile("on", cuda)
    assert not use_compile("off", cpu) and not use_compile("off", cuda)


@pytest.mark.slow
def test_a_compiled_trainer_follows_the_eager_one(tmp_path):
    """train.compile "on" (torch.compile, inductor on CPU; about a minute to compile): the same losses as eager."""
    eager = Trainer(tiny_run(), tmp_path / "eager", CPU)
    compiled = Trainer(tiny_run(compile="on"), tmp_path / "compiled", CPU)
    assert compiled.ddp is not compiled.model
    a, b = random_source(), random_source()
    for _ in range(3):
        la, _, _ = eager.one_step(a)
        lb, _, _ = compiled.one_step(b)
        assert lb == pytest.approx(la, rel=1e-4)
