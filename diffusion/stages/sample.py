"""The sample stage: `python -m diffusion.cli sample RUN --weights DIR [DIR ...] --shards DIR --out DIR`. N images
across ranks, one seed per image, in resumable chunks; an ADM-layout npz, a grid, and the network's cost per call.

Chunk c holds images [c * chunk, (c + 1) * chunk) and is written by rank c % world_size, so chunk contents (and
the batch each image is computed in) do not depend on how many processes ran. A finished chunk is skipped on a
re-run, after its checksum is checked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from data.batches import read_split
from diffusion import distributed
from diffusion.args import add_device, out_folder, parser
from diffusion.checkpoint import first_stage, load_trained, weight_files
from diffusion.config import ConfigError, RunConfig
from diffusion.distributed import Dist, autocast, barrier, use_compile
from diffusion.flops import denoiser_cost
from diffusion.images import from_uint8, grid, save_png_atomic, to_uint8_nhwc, video_grid
from diffusion.io import fingerprint as settings_fingerprint
from diffusion.io import sha256_file, write_json, write_npz, write_text
from diffusion.registry import load_run, resolve_model
from diffusion.sampling import sample, sample_labels


def _chunk_done(path: Path, fingerprint: str) -> bool:
    """A chunk counts as done when it matches its checksum and was drawn with the same weights and settings; a
    missing, damaged or foreign one is simply drawn again."""
    meta = path.with_suffix(".json")
    if not (path.exists() and meta.exists()):
        return False
    try:
        info = json.loads(meta.read_text())
        return info["fingerprint"] == fingerprint and sha256_file(path) == info["sha256"]
    except (ValueError, KeyError, TypeError, OSError):
        return False


def sampling_fingerprint(run: RunConfig, weights: Path | Sequence[Path]) -> str:
    """The weights file's hash (a multi-expert run: each expert's, in order) plus every setting that changes the
    images (batch_size included: it sets chunks)."""
    s = asdict(run.sample)
    digest = sha256_file(weights) if isinstance(weights, Path) else [sha256_file(w) for w in weights]
    blob = {"weights": digest, "sample": s, "prediction": run.diffusion.prediction,
            "precision": run.train.precision, "context_frames": run.diffusion.context_frames}
    return settings_fingerprint(blob)


def context_clips(run: RunConfig, shard_root: str | Path) -> np.ndarray | None:
    """Video prediction: the first context_frames frames of every clip of the dataset's test split (the clips the
    samples continue), (N, c, H, W, C) uint8; None for runs without context frames."""
    c = run.diffusion.context_frames
    if not c:
        return None
    clips, _ = read_split(run.dataset, shard_root, "test")
    return np.ascontiguousarray(clips[:, :c])


def generate(run: RunConfig, model: torch.nn.Module, out_dir: Path, d: Dist, fingerprint: str,
             num_samples: int | None = None, progress: bool = True, context: np.ndarray | None = None,
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Path | None:
    """Write out_dir/chunks/*.npz for this rank, then (rank 0) samples.npz + grid.png. Returns the npz path.

    `context` (N, c, H, W, C) uint8 (see `context_clips`): sample i continues context clip i mod N.
    `decode`: a latent run's autoencoder decoder, latents -> images in [-1, 1] (put its weights in `fingerprint`).
    """
    cfg = resolve_model(run)
    s = run.sample
    n = num_samples or s.num_samples
    if run.diffusion.context_frames and context is None:
        raise ValueError(f"{run.name}: diffusion.context_frames > 0 needs the context clips (generate.context_clips)")
    ctx_hash = hashlib.sha256(context.tobytes()).hexdigest() if context is not None else ""
    fingerprint = hashlib.sha256(f"{fingerprint}/{n}/{ctx_hash}".encode()).hexdigest()  # n sets the last chunk
    chunks_dir = out_dir / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    shape = (cfg.channels, *cfg.data_shape)
    starts = list(range(0, n, s.batch_size))
    mine = [c for i, c in enumerate(starts) if i % d.world_size == d.rank]
    bar = tqdm(mine, desc=f"sample {run.name} (rank {d.rank})", disable=not progress)
    for start in bar:
        path = chunks_dir / f"chunk-{start:08d}.npz"
        if _chunk_done(path, fingerprint):
            continue
        seeds = [s.seed + i for i in range(start, min(start + s.batch_size, n))]
        labels = sample_labels(seeds, cfg.num_classes)
        ctx = None
        if context is not None:
            ctx = from_uint8(context[[(i - s.seed) % len(context) for i in seeds]])
        with autocast(run.train.precision, d.device):
            x = sample(model, shape, seeds, s, run.diffusion.prediction,
                       labels=None if labels is None else labels.to(d.device), device=d.device, context=ctx)
        if decode is not None:
            x = decode(x)  # (B, C, H, W), in full precision
        arrays = {"images": to_uint8_nhwc(x)} | ({"labels": labels.numpy()} if labels is not None else {})
        digest = write_npz(path, **arrays)
        info = {"seeds": [seeds[0], seeds[-1]], "sha256": digest, "fingerprint": fingerprint}
        write_text(path.with_suffix(".json"), json.dumps(info))
    barrier(d)
    if not d.is_main:
        return None
    return assemble(out_dir, starts, cfg.num_classes > 0, fingerprint, run.diffusion.context_frames)


def assemble(out_dir: Path, starts: list[int], conditional: bool, fingerprint: str, context_frames: int = 0) -> Path:
    """Concatenate the chunks in seed order into samples.npz (arr_0 uint8 NHWC, arr_1 labels) and grid.png."""
    images, labels = [], []
    for start in starts:
        path = out_dir / "chunks" / f"chunk-{start:08d}.npz"
        if not _chunk_done(path, fingerprint):
            raise RuntimeError(f"{path} is missing or corrupt; re-run the sample stage to regenerate it")
        with np.load(path) as z:
            images.append(z["images"])
            if conditional:
                labels.append(z["labels"])
    arrays = {"arr_0": np.concatenate(images)} | ({"arr_1": np.concatenate(labels)} if conditional else {})
    npz = out_dir / "samples.npz"
    write_npz(npz, **arrays)
    first = arrays["arr_0"][:64]
    if first.ndim == 5:  # video (N, T, H, W, C): a clip per row
        image = video_grid(first, max_clips=8, context_frames=context_frames)
        save_png_atomic(image, out_dir / "grid.png", scale=max(1, 64 // first.shape[2]))
    else:
        save_png_atomic(grid(first), out_dir / "grid.png", scale=max(1, 96 // first.shape[1]))
    return npz


COST_FILE = "cost.json"  # beside samples.npz: what one call of the sampled network costs (evaluate reports it)


def write_cost(run: RunConfig, model: torch.nn.Module, out_dir: Path) -> Path:
    """Parameters and forward GFLOPs per image of one call of the network that drew the samples (an ensemble: of
    the expert a step calls), counted by diffusion.flops, and the patch size of a patch model (else null)."""
    cfg = resolve_model(run)
    cost = denoiser_cost(model, cfg.data_shape, cfg.channels, cfg.num_classes)
    patch = list(cfg.patch) if getattr(cfg, "patch", None) else None  # a patch model's grid: evaluate's seam ratio
    return write_json(out_dir / COST_FILE, {"model_params": cost.params, "gflops_per_image": cost.gflops,
                                            "sampling_steps": run.sample.steps, "patch": patch})


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("sample", __doc__)
    p.add_argument("run", help="a run name from params.yaml (runs or ensembles)")
    p.add_argument("--weights", nargs="+", required=True, metavar="DIR",
                   help="the run's train folder (outputs/<run>/train); an ensemble: each expert's, in interval order")
    p.add_argument("--shards", required=True,
                   help="the dataset's shard root: the context clips of video prediction, a latent dataset's decoder")
    p.add_argument("--out", required=True, help="the samples folder (outputs/<run>/samples)")
    p.add_argument("--num-samples", type=int, help="override sample.num_samples")
    add_device(p)
    args = p.parse_args(argv)
    _, run = load_run(args.params, args.run)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    files = weight_files(run, [Path(w) for w in args.weights])
    d = distributed.init(args.device)
    out, shards = out_folder(args.out), Path(args.shards)
    model = load_trained(run, files, d.device)
    context = context_clips(run, shards)
    decoder = first_stage(run, shards, d.device)
    if decoder is not None:  # a latent run: its samples are decoded, and the decoder is part of the fingerprint
        files = [*files, decoder.path]
    weights = files[0] if len(files) == 1 else files
    try:
        net = torch.compile(model) if use_compile(run.train.compile, d.device) else model  # train.compile
        npz = generate(run, net, out, d, sampling_fingerprint(run, weights), num_samples=args.num_samples,
                       context=context, decode=decoder.decode if decoder is not None else None)
    finally:
        distributed.shutdown(d)
    if npz is not None:
        write_cost(run, model, out)
        print(f"wrote {npz}, {out / 'grid.png'} and {out / COST_FILE}")
    return 0
