"""Building blocks that both model families share: the attention kernel choice.

Attention is softmax(q k^T / sqrt(d)) v over (B, heads, n, d) tensors. Which kernel computes it is a speed choice
only (benchmarks/profile_step.py):
- on GPUs, and on CPU in fp32, `F.scaled_dot_product_attention` (flash / memory-efficient kernels);
- on CPU in bf16 / fp16 with at most 256 x 256 query-key pairs per head, two batched matmuls around a softmax:
  PyTorch's CPU flash kernel is 3-5x slower there (forward and backward, RIN's 128-256 tokens of 32-wide heads),
  while the matmuls run on the bf16 matrix units. At 1024 tokens and more (a U-Net's attention at 32 x 32) the flash
  kernel is faster again and never holds the (n, m) scores. The scores and the softmax stay in the input precision,
  as under autocast in eager attention.

`attention_backend("sdpa" | "matmul" | "auto")` overrides the choice in a block (benchmarks time the old path with it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "sdpa", "matmul"]
_BACKEND: list[Backend] = ["auto"]
_LOW_PRECISION = (torch.bfloat16, torch.float16)
MATMUL_MAX_PAIRS = 256 * 256  # query-key pairs per head up to which "auto" takes the matmul path on CPU


@contextmanager
def attention_backend(name: Backend) -> Iterator[None]:
    """Use `name`'s kernel for every `attend` call in the block ("auto": the rule in this module's docstring)."""
    if name not in ("auto", "sdpa", "matmul"):
        raise ValueError(f"attention backend {name!r}: use 'auto', 'sdpa' or 'matmul'")
    _BACKEND.append(name)
    try:
        yield
    finally:
        _BACKEND.pop()


def chosen_backend(q: Tensor, k: Tensor) -> Literal["sdpa", "matmul"]:
    """The kernel `attend` uses for queries `q` and keys `k` under the current setting."""
    name = _BACKEND[-1]
    if name != "auto":
        return name
    small = q.shape[-2] * k.shape[-2] <= MATMUL_MAX_PAIRS
    return "matmul" if q.device.type == "cpu" and q.dtype in _LOW_PRECISION and small else "sdpa"


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, h, n, d), (B, h, m, d), (B, h, m, d) -> (B, h, n, d): softmax(q k^T / sqrt(d)) v, no mask, no dropout."""
    if chosen_backend(q, k) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))  # (B, h, n, m)
    return torch.matmul(scores.softmax(dim=-1), v)
