"""The attention kernels (diffusion/layers.py): both paths compute the same attention, "auto" picks the faster one
by device, precision and size, and the U-Net's attention block still computes multi-head attention of its 1x1
convolutions' weights after it was rewritten as matmuls over tokens."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.layers import MATMUL_MAX_PAIRS, attend, attention_backend, chosen_backend
from meme.unet import AttentionBlock


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64, written out."""
    q, k, v = (t.double() for t in (q, k, v))
    w = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bhmd->bhnd", w.softmax(-1), v)


@pytest.mark.parametrize("backend", ["sdpa", "matmul"])
def test_both_kernels_compute_attention_and_its_gradient(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, requires_grad=True) for n in (5, 7, 7))
    with attention_backend(backend):
        out = attend(q, k, v)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = torch.autograd.grad(reference_attention(q, k, v).square().sum(), (q, k, v))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bf16_kernels_agree_within_bf16_error():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g).bfloat16() for _ in range(3))
    ref = reference_attention(q, k, v)
    for backend in ("sdpa", "matmul"):
        with attention_backend(backend):
            err = (attend(q, k, v).double() - ref).abs().max().item()
        assert err < 0.03, f"{backend}: max error {err}"


def test_auto_takes_matmul_on_cpu_in_low_precision_for_short_sequences_only():
    short = torch.zeros(1, 1, 128, 8, dtype=torch.bfloat16)
    long_side = int(math.isqrt(MATMUL_MAX_PAIRS)) * 2
    long = torch.zeros(1, 1, long_side, 8, dtype=torch.bfloat16)
    assert chosen_backend(short, short) == "matmul"
    assert chosen_backend(short.half(), short.half()) == "matmul"
    assert chosen_backend(short.float(), short.float()) == "sdpa"
    assert chosen_backend(long, long) == "sdpa"
    assert chosen_backend(short.to("meta"), short.to("meta")) == "sdpa"  # not a CPU tensor
    with attention_backend("sdpa"):
        assert chosen_backend(short, short) == "sdpa"
        with attention_backend("matmul"):
            assert chosen_backend(long, long) == "matmul"
        assert chosen_backend(short, short) == "sdpa"
    assert chosen_backend(short, short) == "matmul"


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="'flash'"), attention_backend("flash"):  # type: ignore[arg-type]
        pass


def test_unet_attention_block_is_multi_head_attention_of_its_convolution_weights():
    torch.manual_seed(0)
    block = AttentionBlock(dim=16, heads=2, groups=4)
    torch.nn.init.normal_(block.proj.weight)  # zero at init: give the output projection weights to see through
    x = torch.randn(2, 16, 4, 6)
    h = block.norm(x).flatten(2)  # (B, C, HW)
    qkv = torch.nn.functional.conv1d(h, block.qkv.weight, block.qkv.bias)  # (B, 3C, HW): the convolution itself
    q, k, v = (t.reshape(2, 2, 8, 24).transpose(-2, -1) for t in qkv.chunk(3, dim=1))  # (B, heads, HW, d)
    out = reference_attention(q, k, v).float().transpose(-2, -1).reshape(2, 16, 24)
    expected = x + torch.nn.functional.conv1d(out, block.proj.weight, block.proj.bias).reshape(2, 16, 4, 6)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
