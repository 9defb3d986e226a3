"""RIN configurations: the paper's (SPEC.md section 1, pix2seq configs) and small ones for this CPU.

The registry doubles as the CLI's `--preset` choices. A run's dataset sets data_shape, channels and
num_classes, and its train.self_cond_rate sets self_cond; the values here are each preset's native ones.
"""

from __future__ import annotations

from rin.model import RIN, RINConfig


def build(cfg: RINConfig) -> RIN:
    """The network of a resolved preset (diffusion.registry calls this)."""
    return RIN(cfg)


def _rin(**kw) -> RINConfig:
    base = dict(dropout=0.0, drop_path=0.0, num_classes=0, self_cond=True, noise_embed_scale=1000.0)
    return RINConfig(**(base | kw))


def _paper(**kw) -> RINConfig:
    """A paper-scale preset: the authors' architecture choices (pix2seq tape.py and its RIN configs) where the CPU
    presets keep the ones they were tuned with: no LayerNorm on the cross-attention keys / values, pix2seq's noise
    embedding, the same drop_path on every process layer."""
    return _rin(rw_kv_norm=False, noise_embed_pix2seq=True, drop_path_schedule="constant", **kw)


PRESETS: dict[str, RINConfig] = {
    # CIFAR-10 32x32 (author's configuration, pix2seq issue): 3 x 2 blocks, 128 x 512 latents, 256 tokens; ~31M.
    "rin_cifar10": _paper(
        data_shape=(32, 32), channels=3, patch=(2, 2), num_blocks=3, process_layers=2, num_latents=128,
        latent_dim=512, interface_dim=256, latent_heads=16, rw_heads=8, latent_mlp_ratio=4.0,
        interface_mlp_ratio=2.0, dropout=0.1, drop_path=0.1,
    ),
    # ImageNet 64x64 class-conditional (pix2seq config_diffusion_imagenet64; patch 4 as in the paper).
    "rin_imagenet64": _paper(
        data_shape=(64, 64), channels=3, patch=(4, 4), num_blocks=4, process_layers=4, num_latents=128,
        latent_dim=768, interface_dim=512, latent_heads=16, rw_heads=16, latent_mlp_ratio=4.0,
        interface_mlp_ratio=4.0, num_classes=1000,
    ),
    # The default CPU run: Fashion-MNIST padded to 32x32, 64 tokens of 4x4 pixels; sized so that a 2-core CPU
    # trains ~220 images/s (benchmarks/bench_train.py), i.e. a few epochs in the main job's ~12-minute budget.
    # A 3x3 token convolution after each write (interface_conv): without it, 4k CPU steps leave every 4x4 patch
    # with its own brightness (blocky samples); the paper's presets keep it off.
    "rin_fmnist": _rin(
        data_shape=(32, 32), channels=1, patch=(4, 4), num_blocks=2, process_layers=2, num_latents=32,
        latent_dim=128, interface_dim=96, latent_heads=4, rw_heads=4, latent_mlp_ratio=4.0,
        interface_mlp_ratio=2.0, interface_conv=3,
    ),
    # Kinetics-600 frame prediction, 16x64x64 clips in 2x4x4 patches (2048 tokens). The paper gives the patch size,
    # token count and 387 GFLOPs (Fig. 1) but not the widths; these are ImageNet-64's heads and MLP ratios with
    # 6 x 6 blocks of 256 x 1024 latents, which count 364 GFLOPs here (unverified against the authors' config).
    "rin_kinetics600": _paper(
        data_shape=(16, 64, 64), channels=3, patch=(2, 4, 4), num_blocks=6, process_layers=6, num_latents=256,
        latent_dim=1024, interface_dim=512, latent_heads=16, rw_heads=16, latent_mlp_ratio=4.0,
        interface_mlp_ratio=4.0,
    ),
    # The CPU video run: 16-frame 64x64 single-channel clips in 2x8x8 patches (512 tokens).
    "rin_video_cpu": _rin(
        data_shape=(16, 64, 64), channels=1, patch=(2, 8, 8), num_blocks=2, process_layers=2, num_latents=32,
        latent_dim=128, interface_dim=128, latent_heads=4, rw_heads=4, latent_mlp_ratio=4.0,
        interface_mlp_ratio=2.0, interface_conv=3,
    ),
    # Unit tests: a few hundred thousand parameters.
    "rin_tiny": _rin(
        data_shape=(32, 32), channels=1, patch=(4, 4), num_blocks=2, process_layers=1, num_latents=16,
        latent_dim=64, interface_dim=64, latent_heads=4, rw_heads=4, latent_mlp_ratio=2.0,
        interface_mlp_ratio=2.0,
    ),
    "rin_tiny_video": _rin(
        data_shape=(8, 16, 16), channels=1, patch=(2, 4, 4), num_blocks=1, process_layers=1, num_latents=8,
        latent_dim=32, interface_dim=32, latent_heads=2, rw_heads=2, latent_mlp_ratio=2.0,
        interface_mlp_ratio=2.0,
    ),
}
