"""Speed, side by side in one process: this project's RIN against rin-pytorch and its U-Net against diffusers'
UNet2DModel (benchmarks/peers.py builds both at one configuration), the CPU runs' training steps on the old code
path against the new, and this CPU's bf16 / fp32 matmul ceiling, all timed in interleaved rounds.

    pip install -e '.[benchmark]'       # rin-pytorch and diffusers, the peers
    python -m benchmarks.speed --out benchmarks/results/speed.json

Each round times every arm in turn (one untimed call, then the median of --calls calls), so a slow moment of the
machine hits all arms of a round alike; the JSON holds the per-round seconds and ratios and their medians. Ratios
above 1 mean this project is faster. GFLOP/s use FLOPs counted once per arm by torch's FLOP counter on the fp32
call (2 per multiply-add), the same count for bf16.

Old path (the CPU runs): PyTorch's scaled_dot_product_attention under bf16, the token convolution in bf16, a full
first self-conditioning pass and the per-tensor AdamW loop; new: the matmul attention path on CPU in bf16
(diffusion/layers.py), the token convolution in fp32 on CPU and a first pass without the last write and readout
(rin/model.py), fused AdamW (diffusion/optim.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim.swa_utils import AveragedModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from tqdm.auto import tqdm

from benchmarks import peers
from diffusion.distributed import Dist
from diffusion.flops import count_flops
from diffusion.layers import attention_backend
from diffusion.objectives import NoiseDraw
from diffusion.optim import make_optimizer, param_groups
from diffusion.registry import build_model, load_run
from diffusion.schedules import Schedule
from diffusion.trainer import ema_update, step_generator, train_step


def legacy_token_conv(self, x: torch.Tensor) -> torch.Tensor:
    """rin.model.TokenConv.forward before the speed work: the depthwise convolution in the autocast precision."""
    b, n, d = x.shape
    h = self.norm(x).transpose(1, 2).reshape(b, d, *self.grid)
    h = self.conv(h).flatten(2).transpose(1, 2)
    return x + self.proj(torch.nn.functional.gelu(h))


@contextmanager
def old_path():
    """The code path before the speed work, for the old arms: SDPA attention under bf16, the token convolution in
    bf16, a full first self-conditioning pass (and, in run_step(old=True), the per-tensor AdamW loop)."""
    from rin.model import RIN, TokenConv

    current = TokenConv.forward
    TokenConv.forward = legacy_token_conv
    RIN.latents_only_pass = False
    try:
        with attention_backend("sdpa"):
            yield
    finally:
        TokenConv.forward = current
        RIN.latents_only_pass = True


@dataclasses.dataclass
class Arm:
    name: str
    fn: Callable[[], None]
    items: int  # images (or clips) per call
    group: str  # arms of a group are compared with each other
    old: bool = False  # run under old_path()
    gflop: float | None = None
    first_call_s: float | None = None  # compiled arms: the call that compiles
    count: bool = True  # count the arm's FLOPs (not for the compile and kernel arms)
    seconds: list[float] = dataclasses.field(default_factory=list)

    def run(self) -> None:
        with old_path() if self.old else nullcontext():
            self.fn()


def median_time(arm: Arm, calls: int) -> float:
    arm.run()  # untimed: caches, allocator, the first call's lazy init
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        arm.run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_arm(dtype: torch.dtype, n: int = 2048) -> Arm:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return Arm(f"ceiling_matmul_{str(dtype).split('.')[-1]}", lambda: [a @ b for _ in range(4)] and None, 1,
               "ceiling", gflop=4 * 2 * n**3 / 1e9)


class _OpFlops(TorchDispatchMode):
    """torch's FLOP formulas per aten op without FlopCounterMode's module tracker, which fails on rin-pytorch's
    no-grad pass ("Expected gradient function to be set")."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def gflop_of(fn: Callable[[], None]) -> float:
    """FLOPs of one call (2 per multiply-add), through the SDPA math path as diffusion.flops counts them."""
    try:
        return count_flops(fn)[0] / 1e9
    except AssertionError:
        with sdpa_kernel(SDPBackend.MATH), _OpFlops() as counter:
            fn()
        return counter.total / 1e9


def rin_arms(precisions: list[str], batch: int) -> list[Arm]:
    torch.manual_seed(0)
    arms = []
    for precision in precisions:
        base = peers.main_rin("rin_cifar10", self_cond=True)
        plain = peers.main_rin("rin_cifar10", self_cond=True, dropout=0.0, drop_path=0.0)
        peer = peers.peer_rin_like(base)
        g = f"rin_{precision}"
        arms += [
            Arm(f"main_train_{precision}", peers.main_train_step(base, batch, 0.9, precision), batch, g + "_train"),
            Arm(f"main_nodropout_train_{precision}", peers.main_train_step(plain, batch, 0.9, precision), batch,
                g + "_train"),
            Arm(f"peer_train_{precision}", peers.peer_train_step(peer, batch, precision), batch, g + "_train"),
            Arm(f"main_sample_{precision}", peers.main_sample_call(base, batch, precision), batch, g + "_sample"),
            Arm(f"peer_sample_{precision}", peers.peer_sample_call(peer, batch, precision), batch, g + "_sample"),
        ]
    return arms


def unet_arms(precisions: list[str], batch: int, preset: str) -> list[Arm]:
    torch.manual_seed(0)
    arms = []
    for precision in precisions:
        main = peers.main_unet(preset)
        peer = peers.peer_unet_like(main)
        g = f"unet_{precision}"
        arms += [
            Arm(f"main_unet_train_{precision}", peers.unet_train_step(main, batch, precision, "main"), batch,
                g + "_train"),
            Arm(f"peer_unet_train_{precision}", peers.unet_train_step(peer, batch, precision, "peer"), batch,
                g + "_train"),
            Arm(f"main_unet_sample_{precision}", peers.unet_call(main, batch, precision, "main"), batch,
                g + "_sample"),
            Arm(f"peer_unet_sample_{precision}", peers.unet_call(peer, batch, precision, "peer"), batch,
                g + "_sample"),
        ]
    return arms


def run_step(params: str, name: str, old: bool, compiled: bool = False) -> tuple[Callable[[], None], int]:
    """The trainer's step of a params.yaml run (train_step, then the EMA update) on a batch of synthetic data of
    the run's shape; `old`: the per-tensor AdamW loop the trainer used before (the attention path is the arm's);
    `compiled`: the network under torch.compile, as train.compile "on" runs it."""
    _, run = load_run(params, name)
    torch.manual_seed(0)
    model = build_model(run).train()
    net = torch.compile(model) if compiled else model
    ema = AveragedModel(model, multi_avg_fn=ema_update(run.train.ema_decay), use_buffers=True)
    if old:
        opt = torch.optim.AdamW(param_groups(model, run.train.weight_decay), lr=run.train.lr,
                                betas=(run.train.beta1, run.train.beta2))
    else:
        opt = make_optimizer(model, run.train)
    cfg = model.cfg
    b = run.train.batch_size
    shape = (b, cfg.channels, *cfg.data_shape)
    x0 = torch.rand(shape) * 2 - 1
    labels = torch.zeros(b, dtype=torch.long)
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    schedule = Schedule(run.diffusion.train_schedule)
    step = [0]

    def fn() -> None:
        noise = NoiseDraw.draw(step_generator(0, step[0]), shape)
        train_step(net, (x0, labels), noise, opt, run, schedule, d)
        ema.update_parameters(model)
        step[0] += 1

    return fn, b


def cpu_run_arms(params: str, runs: list[str]) -> list[Arm]:
    arms = []
    for name in runs:
        old_fn, b = run_step(params, name, old=True)
        new_fn, _ = run_step(params, name, old=False)
        arms += [Arm(f"{name}_old", old_fn, b, f"cpu_run_{name}", old=True),
                 Arm(f"{name}_new", new_fn, b, f"cpu_run_{name}")]
    return arms


def compile_arms(params: str, runs: list[str], batch: int) -> list[Arm]:
    """train.compile "on" against eager: rin_cifar10's bf16 step and the CPU runs' trainer steps, each with its
    compile time (the first call) recorded."""
    arms = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = peers.main_rin("rin_cifar10", self_cond=True)
        net = torch.compile(model) if compiled else model
        net.cfg = model.cfg
        arms.append(Arm(f"rin_cifar10_bf16_{'compiled' if compiled else 'eager'}",
                        peers.main_train_step(net, batch, 0.9, "bf16"), batch, "compile_rin_cifar10_bf16",
                        count=False))
    for name in runs:
        for compiled in (False, True):
            fn, b = run_step(params, name, old=False, compiled=compiled)
            arms.append(Arm(f"{name}_{'compiled' if compiled else 'eager'}", fn, b, f"compile_{name}", count=False))
    for arm in tqdm(arms, desc="first calls (compiling)", leave=False):  # outside the rounds: the compile is here
        t0 = time.perf_counter()
        arm.run()
        arm.first_call_s = time.perf_counter() - t0
    return arms


def kernel_arms() -> list[Arm]:
    """The single changes, each old against new on its own: attention at RIN's self-attention shape (bf16, forward
    and backward, SDPA against the matmul path), AdamW's per-tensor loop against the fused kernel (rin_cifar10's
    190 tensors) and the video run's depthwise token convolution in bf16 against fp32 (forward and backward)."""
    from diffusion.layers import attend
    from diffusion.optim import param_groups as groups

    arms = []
    q, k, v = (torch.randn(16, 16, 128, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for backend in ("sdpa", "matmul"):
        def attn(backend=backend) -> None:
            with attention_backend(backend):
                attend(q, k, v).float().sum().backward()
        arms.append(Arm(f"attention_bf16_{backend}", attn, 16, "kernel_attention", count=False))
    model = peers.main_rin("rin_cifar10", self_cond=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for name, kw in (("loop", {"foreach": False}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(groups(model, 0.01), lr=1e-6, **kw)
        arms.append(Arm(f"adamw_{name}", opt.step, 1, "kernel_adamw", count=False))
    conv = torch.nn.Conv3d(128, 128, 3, padding=1, groups=128)
    x = torch.randn(16, 8, 8, 8, 128).permute(0, 4, 1, 2, 3).requires_grad_()  # channels-last, as TokenConv's view
    for name, ctx in (("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16)), ("fp32", nullcontext)):
        def dwconv(ctx=ctx) -> None:
            with ctx():
                y = conv(x)
            y.float().sum().backward()
        arms.append(Arm(f"token_conv_{name}", dwconv, 16, "kernel_token_conv", count=False))
    return arms


RATIOS = [  # (label, numerator arm: the reference, denominator arm: ours); ratio = reference time / our time
    ("rin_train_fp32: main / rin-pytorch", "peer_train_fp32", "main_train_fp32"),
    ("rin_train_fp32: main without dropout / rin-pytorch", "peer_train_fp32", "main_nodropout_train_fp32"),
    ("rin_train_bf16: main / rin-pytorch", "peer_train_bf16", "main_train_bf16"),
    ("rin_train_bf16: main without dropout / rin-pytorch", "peer_train_bf16", "main_nodropout_train_bf16"),
    ("rin_sample_fp32: main / rin-pytorch", "peer_sample_fp32", "main_sample_fp32"),
    ("rin_sample_bf16: main / rin-pytorch", "peer_sample_bf16", "main_sample_bf16"),
    ("unet_train_fp32: main / diffusers", "peer_unet_train_fp32", "main_unet_train_fp32"),
    ("unet_train_bf16: main / diffusers", "peer_unet_train_bf16", "main_unet_train_bf16"),
    ("unet_sample_fp32: main / diffusers", "peer_unet_sample_fp32", "main_unet_sample_fp32"),
    ("unet_sample_bf16: main / diffusers", "peer_unet_sample_bf16", "main_unet_sample_bf16"),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3, help="timed calls per arm and round (median)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--parts", nargs="+", default=["rin", "unet", "cpu_runs", "compile", "kernels"],
                    choices=["rin", "unet", "cpu_runs", "compile", "kernels"])
    ap.add_argument("--rin-batch", type=int, default=16)
    ap.add_argument("--unet-batch", type=int, default=2)
    ap.add_argument("--unet-preset", default="ldm_s")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--runs", nargs="+", default=["rin_fmnist", "rin_moving_fmnist"], help="CPU runs (params.yaml)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    arms = [matmul_arm(torch.bfloat16), matmul_arm(torch.float32)]
    if "rin" in args.parts:
        arms += rin_arms(args.precision, args.rin_batch)
    if "unet" in args.parts:
        arms += unet_arms(args.precision, args.unet_batch, args.unet_preset)
    if "cpu_runs" in args.parts:
        arms += cpu_run_arms(args.params, args.runs)
    if "compile" in args.parts:
        arms += compile_arms(args.params, args.runs, args.rin_batch)
    if "kernels" in args.parts:
        arms += kernel_arms()
    for arm in tqdm(arms, desc="counting FLOPs", leave=False):  # on the fp32 twin: same count in bf16
        if arm.gflop is None and arm.count:
            with attention_backend("sdpa"):
                arm.gflop = gflop_of(arm.fn)
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for arm in arms:
            arm.seconds.append(median_time(arm, args.calls))

    by_name = {a.name: a for a in arms}
    rounds = []
    for r in range(args.rounds):
        ratios = {label: round(by_name[ref].seconds[r] / by_name[ours].seconds[r], 3)
                  for label, ref, ours in RATIOS if ref in by_name and ours in by_name}
        for name in args.runs if "cpu_runs" in args.parts else []:
            old, new = by_name[f"{name}_old"].seconds[r], by_name[f"{name}_new"].seconds[r]
            ratios[f"{name}: new / old"] = round(old / new, 3)
        for name in (["rin_cifar10_bf16", *args.runs] if "compile" in args.parts else []):
            eager, comp = by_name[f"{name}_eager"].seconds[r], by_name[f"{name}_compiled"].seconds[r]
            ratios[f"{name}: compiled / eager"] = round(eager / comp, 3)
        if "kernels" in args.parts:
            for label, old, new in (("attention bf16: matmul / sdpa", "attention_bf16_sdpa", "attention_bf16_matmul"),
                                    ("adamw: fused / loop", "adamw_loop", "adamw_fused"),
                                    ("token conv: fp32 / bf16", "token_conv_bf16", "token_conv_fp32")):
                ratios[label] = round(by_name[old].seconds[r] / by_name[new].seconds[r], 3)
        rounds.append(ratios)
    ceiling = statistics.median(by_name["ceiling_matmul_bfloat16"].gflop / s
                                for s in by_name["ceiling_matmul_bfloat16"].seconds)
    result = {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": "python -m benchmarks.speed " + " ".join(argv or []),
        "machine": {"threads": args.threads, "torch": torch.__version__, "platform": platform.platform()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "arms": [{
            "name": a.name, "group": a.group, "old_code_path": a.old, "items_per_call": a.items,
            "first_call_seconds": None if a.first_call_s is None else round(a.first_call_s, 1),
            "seconds_per_round": [round(s, 4) for s in a.seconds], "seconds": round(statistics.median(a.seconds), 4),
            "items_per_s": round(a.items / statistics.median(a.seconds), 2),
            "gflop_per_call": None if a.gflop is None else round(a.gflop, 2),
            "gflop_per_s": None if a.gflop is None else round(a.gflop / statistics.median(a.seconds), 1),
            "share_of_bf16_ceiling": None if a.gflop is None else round(a.gflop / statistics.median(a.seconds)
                                                                        / ceiling, 3),
        } for a in arms],
        "ratios_per_round": rounds,
        "ratios": {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]},
        "bf16_matmul_ceiling_gflop_per_s": round(ceiling, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in result["ratios"].items():
        print(f"{k:60s} {v:6.3f}")
    for a in result["arms"]:
        print(f"{a['name']:34s} {a['seconds']:8.4f} s  {a['items_per_s']:8.2f}/s  {a['gflop_per_s']} GFLOP/s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
