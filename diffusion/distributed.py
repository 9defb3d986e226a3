"""torchrun-aware process group (NCCL on GPUs, gloo on CPU; the same code path for 1 and N processes) and the
precision context (bf16 autocast with fp32 master weights)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffusion.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class DeviceError(UserError):
    """--device names no device this machine has."""


def init(device: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment (a no-op for a single process). `device`: auto
    (CUDA when present), cpu, or cuda; anything else, or cuda without a GPU, is a DeviceError."""
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"--device {device!r}: use auto (CUDA when present), cpu or cuda (each process takes the GPU "
                          "of its LOCAL_RANK)")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is visible to this process (torch.cuda.is_available() is False); "
                          "use --device cpu or auto")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker, which torchrun starts in a session of its own
        stop_with_launcher()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        # fp32 matmuls and convolutions on TF32 tensor cores (cuDNN convolutions already default to it): the
        # precision="fp32" runs' speed on Ampere and later; bf16 autocast runs are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_launcher() -> None:
    """Have the kernel send this process SIGTERM when its parent (torchrun) dies, so a launcher killed outright
    (SIGKILL, OOM) does not leave its ranks training on as orphans: they checkpoint and stop (the train stage's SIGTERM
    handler). Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def reduce_step(loss: float, stop: bool, d: Dist) -> tuple[float, bool]:
    """A training step's one all-reduce: the mean loss over ranks, and whether any rank was asked to stop (so every
    rank stops at the same step). Plain values for one process."""
    if not d.enabled:
        return loss, stop
    t = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t[0].item() / d.world_size, t[1].item() > 0


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def use_compile(setting: str, device: torch.device) -> bool:
    """train.compile: "auto" compiles on CUDA only (on this project's CPU runs inductor was slower than eager)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def autocast(precision: str, device: torch.device):
    """bf16 autocast on the device's type for precision "bf16"; nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
