"""RIN's latent self-conditioning without previous latents: the warm start runs on zeros (as in the authors' model), so
the first-pass mode that sampling's first step uses gets a gradient, and a model without self-conditioning has none."""

import pytest
import torch

from tests.helpers import tiny_rin


def test_the_warm_start_runs_on_zeros_when_there_are_no_previous_latents():
    torch.manual_seed(0)
    model = tiny_rin(self_cond=True)
    x, gamma = torch.randn(2, 1, 32, 32), torch.rand(2)
    out, _ = model(x, gamma, None, None)
    out.square().sum().backward()
    assert model.prev_norm.bias.grad is not None and model.prev_norm.bias.grad.abs().sum() > 0
    zeros = torch.zeros(2, model.cfg.num_latents, model.cfg.latent_dim)
    with torch.no_grad():
        assert torch.equal(model(x, gamma, None, None)[0], model(x, gamma, None, zeros)[0])


def test_without_self_conditioning_there_is_no_warm_start():
    model = tiny_rin(self_cond=False)
    assert not any("prev" in name for name, _ in model.named_parameters())


def test_drop_path_is_the_same_on_every_process_layer_unless_asked_to_rise():
    from rin.presets import PRESETS

    assert PRESETS["rin_cifar10"].drop_path == 0.1  # the authors' CIFAR-10 sweep: drop_path 0.1
    rates = [layer.drop_path for block in tiny_rin(drop_path=0.1, num_blocks=2).blocks for layer in block.process]
    assert rates == [0.1] * len(rates) and len(rates) >= 2
    rising = [layer.drop_path for block in tiny_rin(drop_path=0.1, num_blocks=2, drop_path_schedule="linear").blocks
              for layer in block.process]
    assert rising[0] == 0.0 and rising[-1] == pytest.approx(0.1)


def test_paper_presets_follow_the_authors_architecture_choices():
    from rin.model import NoiseLevelEmbedding
    from rin.presets import PRESETS

    for name in ("rin_cifar10", "rin_imagenet64", "rin_kinetics600"):
        cfg = PRESETS[name]
        assert not cfg.rw_kv_norm and cfg.noise_embed_pix2seq and cfg.drop_path_schedule == "constant", name
    assert PRESETS["rin_fmnist"].rw_kv_norm and not PRESETS["rin_fmnist"].noise_embed_pix2seq  # as tuned on CPU
    seen = {}
    embed = NoiseLevelEmbedding(64, 1000.0, pix2seq=True)
    embed.net[0].register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
    embed(torch.tensor([0.0, 0.3, 0.99]))
    feats = seen["x"]  # (3, 16) standardised sinusoids at 10000^(-k / 8), k = 0..7
    assert torch.allclose(feats.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(feats.std(1, unbiased=False), torch.ones(3), atol=1e-5)
    model = tiny_rin(rw_kv_norm=False)
    assert isinstance(model.blocks[0].read.norm_kv, torch.nn.Identity)
