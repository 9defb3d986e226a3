"""RIN: shapes, the zero-initialised warm start, the stop-gradient of self-conditioning, the paper's size."""

import math

import pytest
import torch

from diffusion.config import ScheduleConfig
from diffusion.flops import count_flops, count_params, denoiser_cost
from diffusion.objectives import NoiseDraw, diffusion_loss, self_conditioning_state
from diffusion.schedules import Schedule
from rin.model import RIN, Attention
from rin.presets import PRESETS
from tests.helpers import tiny_config, tiny_rin


@pytest.mark.parametrize(
    "shape,patch,channels",
    [((32, 32), (4, 4), 1), ((32, 32), (2, 2), 3), ((16, 24), (4, 8), 3), ((64, 64), (8, 8), 3), ((28, 28), (7, 7), 1),
     ((4, 16, 16), (2, 4, 4), 3)],
)
def test_output_shapes(shape, patch, channels):
    model = tiny_rin(data_shape=shape, patch=patch, channels=channels)
    x = torch.randn(2, channels, *shape)
    out, latents = model(x, torch.rand(2))
    assert out.shape == x.shape
    assert latents.shape == (2, model.cfg.num_latents, model.cfg.latent_dim)
    assert model.cfg.num_tokens == torch.Size(s // p for s, p in zip(shape, patch)).numel()


@pytest.mark.parametrize("shape,patch,channels", [((8, 12), (4, 4), 2), ((4, 8, 12), (2, 4, 4), 1)])
def test_a_pixel_moves_one_token_and_the_output_of_its_own_patch(shape, patch, channels):
    """Tokens and readout are inverse layouts, seen from outside: changing one pixel changes exactly one token, and
    (the blocks' write attention silenced, so each interface token is carried on its own) exactly the output pixels
    of that pixel's patch. A swapped or interleaved axis in either layout moves the change elsewhere."""
    torch.manual_seed(0)
    model = tiny_rin(data_shape=shape, patch=patch, channels=channels, interface_conv=0).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.write.attn.to_out.weight.zero_()
            block.write.attn.to_out.bias.zero_()
    x, gamma = torch.randn(1, channels, *shape), torch.full((1,), 0.4)
    out, _ = model(x, gamma)
    tokens = model.tokenizer.tokens(x)
    rng = torch.Generator().manual_seed(1)
    for _ in range(6):
        pixel = [int(torch.randint(n, (1,), generator=rng)) for n in (channels, *shape)]
        moved = x.clone()
        moved[(0, *pixel)] += 1.0
        changed_tokens = (model.tokenizer.tokens(moved) - tokens).abs().amax(dim=2)[0] > 0  # (n,)
        assert int(changed_tokens.sum()) == 1, f"pixel {pixel} moved {int(changed_tokens.sum())} tokens"
        changed = (model(moved, gamma)[0] - out).abs().amax(dim=1)[0] > 0  # (*spatial)
        box = torch.zeros(shape, dtype=torch.bool)
        box[tuple(slice(c // p * p, (c // p + 1) * p) for c, p in zip(pixel[1:], patch))] = True
        assert torch.equal(changed, box), f"pixel {pixel} changed outputs outside its own patch (or missed some)"


def test_class_token_and_missing_labels():
    model = tiny_rin(num_classes=10)
    x = torch.randn(2, 1, 32, 32)
    out_a, _ = model(x, torch.full((2,), 0.5), torch.tensor([1, 2]))
    out_b, _ = model(x, torch.full((2,), 0.5), torch.tensor([3, 4]))
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(ValueError, match="labels"):
        model(x, torch.rand(2))


def test_warm_start_has_no_effect_at_initialisation():
    torch.manual_seed(0)
    model = tiny_rin().eval()
    x, g = torch.randn(3, 1, 32, 32), torch.rand(3)
    out_none, _ = model(x, g, None, None)
    out_prev, _ = model(x, g, None, torch.randn(3, model.cfg.num_latents, model.cfg.latent_dim) * 5)
    assert torch.equal(out_none, out_prev)
    torch.nn.init.ones_(model.prev_norm.weight)  # once the LayerNorm learns a scale, the path is live
    out_live, _ = model(x, g, None, torch.randn(3, model.cfg.num_latents, model.cfg.latent_dim))
    assert not torch.allclose(out_none, out_live)


def _live_model():
    torch.manual_seed(0)
    model = tiny_rin()
    torch.nn.init.normal_(model.prev_norm.weight)  # make the warm-start path matter for the gradient test
    return model


def test_no_gradient_reaches_the_first_pass():
    """The two-pass loss has the same gradient as a second pass fed constant latents: nothing flows back
    through the first pass."""
    model = _live_model()
    sched = Schedule(ScheduleConfig("sigmoid", -3, 3, 0.9))
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    noise = NoiseDraw.draw(torch.Generator().manual_seed(3), x0.shape)
    loss = diffusion_loss(model, x0, None, sched, "eps", 1.0, noise).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    eps, gamma = noise.eps, sched(noise.t)
    x_t = gamma.sqrt().view(-1, 1, 1, 1) * x0 + (1 - gamma).sqrt().view(-1, 1, 1, 1) * eps
    state = self_conditioning_state(model, x_t, gamma, None, torch.ones(4, dtype=torch.bool))
    assert not state.requires_grad
    out, _ = model(x_t, gamma, None, state.clone())
    manual = torch.autograd.grad(((out - eps) ** 2).flatten(1).mean(1).mean(), list(model.parameters()),
                                 allow_unused=True)
    for a, b in zip(grads, manual):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_self_conditioning_rate_is_per_example():
    model = _live_model()
    calls = []

    def spy(x_t, gamma, labels=None, state=None):
        calls.append(state)
        return model(x_t, gamma, labels, state)

    x0 = torch.rand(400, 1, 32, 32) * 2 - 1
    sched = Schedule(ScheduleConfig("sigmoid", -3, 3, 0.9))
    noise = NoiseDraw.draw(torch.Generator().manual_seed(0), x0.shape)
    with torch.no_grad():
        diffusion_loss(spy, x0, None, sched, "eps", 0.7, noise)
    kept = calls[1].flatten(1).abs().sum(1) > 0
    assert torch.equal(kept, noise.u < 0.7)  # per example, decided by the draw
    assert 0.6 < kept.float().mean().item() < 0.8  # Binomial(400, 0.7): 0.7 +- 5 sd is within this
    calls.clear()
    with torch.no_grad():
        diffusion_loss(spy, x0[:4], None, sched, "eps", 0.0, noise.rows(0, 4))
    assert calls == [None]  # rate 0: one pass, no state


def test_cifar10_preset_has_paper_size():
    params = count_params(RIN(PRESETS["rin_cifar10"]))
    assert abs(params - 31e6) / 31e6 < 0.05, params


def test_attention_flops_are_counted():
    attn = Attention(dim_q=64, dim_kv=32, heads=4, dim_att=32).eval()
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 7, 32)
    flops, by_op = count_flops(lambda: attn(x, ctx))
    linear = 2 * 2 * (10 * 64 * 32 + 7 * 32 * 64 + 10 * 32 * 64)  # q, kv, out projections
    attention = 2 * 2 * (2 * 10 * 7 * 32)  # QK^T and AV, batch 2
    assert flops == linear + attention
    assert sum(v for k, v in by_op.items() if "bmm" in k) == attention


def test_denoiser_cost_scales_with_tokens():
    small = denoiser_cost(RIN(tiny_config(patch=(8, 8))), (32, 32), 1)
    large = denoiser_cost(RIN(tiny_config(patch=(4, 4))), (32, 32), 1)
    assert large.flops > small.flops and large.params < small.params  # more tokens, smaller readout


@pytest.mark.parametrize("grid,dim", [((8, 8), 96), ((4, 8, 8), 128), ((16, 16), 256)])
def test_initial_positions_tell_every_token_apart(grid, dim):
    from rin.model import sincos_positions

    pos = sincos_positions(grid, dim)
    dist = torch.cdist(pos, pos)
    n = pos.shape[0]
    assert pos.shape == (n, dim) and n == torch.Size(grid).numel()
    assert dist[~torch.eye(n, dtype=torch.bool)].min() > 0.1  # no two positions (nearly) coincide


@pytest.mark.parametrize("grid", [(4, 4), (2, 4, 4)])
def test_token_conv_starts_as_identity_and_mixes_neighbours_only(grid):
    from rin.model import TokenConv, _init_linear

    conv = TokenConv(8, grid, 3)
    conv.apply(_init_linear)
    x = torch.randn(2, math.prod(grid), 8)
    assert torch.equal(conv(x), x)  # zero-initialised projection: the unit is the identity at the start
    torch.nn.init.normal_(conv.proj.weight)
    y = torch.randn_like(x)
    y2 = y.clone()
    y2[:, 0] += 1.0  # token 0 sits in the grid's corner
    changed = (conv(y2) - conv(y)).abs().amax(dim=(0, 2)).reshape(grid) > 0
    expect = torch.zeros(grid, dtype=torch.bool)
    expect[tuple(slice(0, 2) for _ in grid)] = True  # the corner and its 3x3(x3) neighbours
    assert torch.equal(changed, expect)


def test_interface_conv_must_be_an_odd_kernel():
    with pytest.raises(ValueError, match="interface_conv 2 must be 0"):
        tiny_config(interface_conv=2).validate()


@pytest.mark.parametrize("training", [False, True])
def test_a_latents_only_pass_returns_the_full_passs_latents_and_skips_the_last_write(training):
    """The self-conditioning first pass (latents_only) computes exactly the latents of a full pass (same weights,
    same dropout draws) and never runs the last block's write or the readout."""
    model = _live_model().train(training)
    x_t, gamma = torch.randn(3, 1, 32, 32), torch.rand(3)
    torch.manual_seed(5)
    out, z = model(x_t, gamma)
    ran = []
    hooks = [m.register_forward_hook(lambda *a, name=name: ran.append(name)) for name, m in
             (("last write", model.blocks[-1].write), ("readout", model.tokenizer.out))]
    torch.manual_seed(5)
    none, z_only = model(x_t, gamma, latents_only=True)
    for h in hooks:
        h.remove()
    assert none is None and ran == []
    assert torch.equal(z_only, z) and out is not None


def test_the_latents_only_pass_is_found_through_real_ddp_and_compile_wrappers(tmp_path):
    """DistributedDataParallel (a one-process gloo group) and torch.compile's wrapper, alone and nested in both
    orders: the RIN inside is found; a U-Net inside any of them has no such pass."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from diffusion.objectives import _has_latents_only_pass
    from meme.presets import PRESETS as MEME_PRESETS
    from meme.unet import UNet

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for net, has in ((_live_model(), True), (UNet(MEME_PRESETS["unet_tiny"]), False)):
            layouts = {"bare": net, "ddp": DDP(net), "compiled": torch.compile(net),
                       "ddp(compiled)": DDP(torch.compile(net)), "compiled(ddp)": torch.compile(DDP(net))}
            assert {k: _has_latents_only_pass(m) for k, m in layouts.items()} == dict.fromkeys(layouts, has)
    finally:
        dist.destroy_process_group()


def test_the_first_pass_asks_for_latents_only_through_wrappers():
    """self_conditioning_state passes latents_only=True to a network that has the pass, also inside a DDP-like
    `.module` wrapper, and nothing to one that lacks it (a U-Net, a test double)."""
    model = _live_model()
    seen = []

    class Wrapper(torch.nn.Module):  # the attribute layout of DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            seen.append(kwargs)
            return self.module(*args, **kwargs)

    x_t, gamma, keep = torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([True, True])
    state = self_conditioning_state(Wrapper(model), x_t, gamma, None, keep)
    assert seen == [{"latents_only": True}]
    torch.testing.assert_close(state, model(x_t, gamma)[1])

    def plain(x_t, gamma, labels=None, state=None):
        return x_t, torch.ones(len(x_t), 2)

    assert torch.equal(self_conditioning_state(plain, x_t, gamma, None, keep), torch.ones(2, 2))
