"""Typed, frozen configuration mirroring params.yaml, built once at the edge.

params.yaml holds every default (its `defaults:` section); a run deep-merges its own section over them. Runs live in
three sections by what the pipeline does with them (RUN_SECTIONS): `runs` are trained, sampled and evaluated;
`experts` (MEME) are only trained; `ensembles` (MEME multi-expert) are sampled and evaluated from their experts. The
loader rejects unknown keys, missing keys, wrong types and out-of-range values, naming the key path.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from diffusion.typed import ConfigError, bounded, build_dataclass, deep_merge

PARAMS_FILE = Path("params.yaml")
MAX_SEED = 2**32 - 1  # seeds combine with step and image indices into 64-bit generator seeds: keep them in range


@dataclass(frozen=True)
class ScheduleConfig:
    """gamma(t) from 1 at t=0 to 0 at t=1 (pix2seq `diffusion_utils`)."""

    # ldm: LDM's discrete "linear" schedule (sqrt(beta) linear from start to end over 1000 steps), t = k / 1000 at
    # step k, so that MEME's intervals ((n-1)/N T, n/N T] fall where LDM's 1000-step schedule puts them
    kind: Literal["cosine", "sigmoid", "linear", "ldm"]
    start: float  # sigmoid: input at t=0 (e.g. -3); cosine: t offset in [0, 1); ldm: beta of the first step
    end: float  # sigmoid: input at t=1 (e.g. 3); cosine: end of the t range in (0, 1]; ldm: beta of the last step
    tau: float = bounded(gt=0)  # temperature (sigmoid) or power/2 (cosine); unused by linear and ldm

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ConfigError(f"schedule.end must be > schedule.start, got start={self.start}, end={self.end}")
        if self.kind == "cosine" and not (0.0 <= self.start < self.end <= 1.0):
            raise ConfigError(f"cosine schedule needs 0 <= start < end <= 1, got start={self.start}, end={self.end}")
        if self.kind == "ldm" and not (0.0 < self.start < self.end < 1.0):
            raise ConfigError(f"ldm schedule needs betas 0 < start < end < 1 (LDM: 0.0015, 0.0195), got "
                              f"start={self.start}, end={self.end}")


@dataclass(frozen=True)
class DatasetConfig:
    """Where a dataset comes from and the tensor shape it is served at."""

    source: Literal["mnist", "fashion_mnist", "cifar10", "image_folder", "video_folder", "moving_mnist"]
    root: str  # raw data location (idx files, cifar-10-batches-py, an image or video folder)
    resolution: int = bounded(ge=8, le=1024)  # served side length; 28x28 digits are zero-padded to 32
    channels: Literal[1, 3]
    num_classes: int = bounded(ge=0)  # 0 for unlabelled data
    frames: int = bounded(ge=0)  # 0 for images, clip length for video
    random_flip: bool  # horizontal flip at training time (the papers use it on natural images, not on digits)
    shard_size: int = bounded(ge=1)  # samples per shard tar; the last shard of a split holds the rest
    max_samples: int = bounded(ge=0)  # cap per split after the seeded shuffle; 0 = all (Moving-MNIST: one per digit)
    seed: int = bounded(ge=0, le=MAX_SEED)  # write-time sample order and generated data (Moving-MNIST trajectories)
    clip_stride: int = bounded(ge=1)  # video: frames between the starts of consecutive clips of one file
    skip_corrupt: bool  # skip and count unreadable inputs instead of stopping with an error naming them
    download: bool  # fetch missing mnist / fashion_mnist / cifar10 files through torchvision (needs a network)

    def __post_init__(self) -> None:
        video = self.source in ("video_folder", "moving_mnist")
        if video != (self.frames > 0):
            raise ConfigError(f"source {self.source!r} needs frames {'> 0' if video else '= 0'}, got {self.frames}")


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture preset a run uses, plus field-by-field overrides of that preset."""

    family: str  # the model package (rin, meme: diffusion/registry.py FAMILIES); each run names it in its own section
    preset: str
    class_conditional: bool
    overrides: dict[str, Any]
    experts: tuple[str, ...]  # an ensemble's expert runs (section `experts`), expert 1 (t near 0) first; else []


@dataclass(frozen=True)
class DiffusionConfig:
    prediction: Literal["eps", "x0", "v"]  # what the network predicts; the loss is taken in the same space
    train_schedule: ScheduleConfig
    # Video prediction (RIN's Kinetics-600 protocol): the first N frames of each clip are given clean, as part of
    # the input, in training and sampling; noise and loss cover the other frames only. 0 for images.
    context_frames: int = bounded(ge=0)


@dataclass(frozen=True)
class ExpertConfig:
    """This run trains MEME expert `index` of `count`: each example's t is drawn on the expert's interval
    ((index-1)/count, index/count] with probability p, else on [0, 1) (soft assignment; p = 1 is the hard split)."""

    index: int = bounded(ge=1)
    count: int = bounded(ge=1)
    p: float = bounded(ge=0, le=1)

    def __post_init__(self) -> None:
        if self.index > self.count:
            raise ConfigError(f"expert.index must be <= expert.count, got index={self.index}, count={self.count}")


@dataclass(frozen=True)
class ProxyConfig:
    """Sample quality during training, a proxy of the final evaluation: KID of `num_samples` EMA samples (the run's
    sampler at `steps` steps) against the run's reference features, every `every` steps and at the last step."""

    every: int = bounded(ge=1)
    num_samples: int = bounded(ge=4)
    steps: int = bounded(ge=1, le=10000)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = bounded(ge=0, le=MAX_SEED)
    steps: int = bounded(ge=1)
    batch_size: int = bounded(ge=1)  # global batch, split across ranks
    optimizer: Literal["lamb", "adamw"]
    lr: float = bounded(gt=0, le=1)
    weight_decay: float = bounded(ge=0, le=1)
    beta1: float = bounded(ge=0, lt=1)
    beta2: float = bounded(ge=0, lt=1)
    warmup_steps: int = bounded(ge=0)
    lr_decay: Literal["cosine", "constant"]  # after warmup
    # The part of the cosine the decay covers (pix2seq `cosine@f`): 1 ends at 0; the authors' CIFAR-10 run uses 0.8
    # (ending at 9.5% of the peak), ImageNet-64 0.7 (20.6%).
    lr_decay_fraction: float = bounded(gt=0, le=1)
    grad_clip: float = bounded(ge=0)  # global norm; 0 disables
    ema_decay: float = bounded(ge=0, lt=1)
    self_cond_rate: float = bounded(ge=0, le=1)  # RIN latent self-conditioning; 0 disables it everywhere
    precision: Literal["fp32", "bf16"]  # bf16 autocast with fp32 master weights
    # torch.compile of the network for training and sampling: "auto" compiles on CUDA and not on CPU, where inductor
    # was slower than eager here (benchmarks/results/speed.json); "on" / "off" force it. Speed only: not fingerprinted.
    compile: Literal["auto", "on", "off"]
    log_every: int = bounded(ge=1)
    checkpoint_every: int = bounded(ge=1)
    data: Literal["memory", "stream"]  # memory: whole split in RAM, exact resume; stream: WebDataset shards
    num_workers: int = bounded(ge=0)  # DataLoader workers of the stream source
    sample_every: int = bounded(ge=0)  # a preview grid (EMA weights, 16 images) every N steps; 0 disables
    proxy: ProxyConfig | None  # proxy KID curve during training (image runs of `runs`); null: none. Not fingerprinted
    expert: ExpertConfig | None  # MEME: the expert's time interval (section `experts` only); null: t ~ U(0, 1)


@dataclass(frozen=True)
class SampleConfig:
    sampler: Literal["ddpm", "ddim"]
    steps: int = bounded(ge=1, le=10000)
    schedule: ScheduleConfig  # the paper samples with cosine whatever the training schedule
    variance: Literal["large", "small"]  # DDPM: beta_t (large) or the posterior's beta~_t (small)
    eta: float = bounded(ge=0, le=1)  # DDIM stochasticity; 0 is deterministic
    clip_x0: bool  # clip the x0 estimate to [-1, 1] at every step
    td: float = bounded(ge=0)  # time-difference offset, in units of one step (pix2seq's `td`)
    num_samples: int = bounded(ge=1)
    batch_size: int = bounded(ge=1)
    seed: int = bounded(ge=0, le=MAX_SEED)  # image i is drawn from seed + i
    use_ema: bool


@dataclass(frozen=True)
class EvalConfig:
    reference_split: Literal["train", "test"]  # real images the sample statistics are compared with
    num_reference: int = bounded(ge=2)  # the first N of the dataset's cached reference set (evaluation.references)
    is_classifier: str | None  # torchvision inception_v3 state dict for the Inception Score; null: "not available"
    is_splits: int = bounded(ge=1)  # IS (image, and video from the I3D logits): mean and std over this many chunks
    kid_subset_size: int = bounded(ge=2)  # KID/KVD: features per random subset (at most half the smaller set)
    kid_subsets: int = bounded(ge=1, le=10000)  # KID/KVD: mean and std over this many subset pairs


@dataclass(frozen=True)
class ImportedWeights:
    path: str  # a safetensors file
    sha256: str  # its pinned hash: new weights need a new hash here, which makes DVC rebuild what depends on them


@dataclass(frozen=True)
class AutoencoderConfig:
    """A KL-regularised autoencoder (meme/autoencoder.py) whose latent space runs can train in. Its params.yaml key
    names a latent dataset: a `datasets` entry equal to the source dataset's, whose shard folder the
    autoencoder@<name> stage fills with the source's shards and this autoencoder."""

    dataset: str  # the image dataset it encodes (one of pipeline.datasets)
    base_channels: int = bounded(ge=1)  # width of the first level
    channel_mult: tuple[int, ...]  # level widths / base_channels; f = 2^(levels - 1) per side (f = 4: three levels)
    num_res_blocks: int = bounded(ge=1)  # residual blocks per level, encoder and decoder
    z_channels: int = bounded(ge=1)  # latent channels (LDM's f = 4 models: 3)
    norm_groups: int = bounded(ge=1)  # GroupNorm groups; must divide every level width
    loss: Literal["l1", "l2"]  # reconstruction loss per pixel
    kl_weight: float = bounded(ge=0)  # weight of KL(q(z|x) || N(0, I)), a mean per latent element
    steps: int = bounded(ge=0)  # Adam steps on the train split (0 only with imported weights)
    batch_size: int = bounded(ge=1)
    lr: float = bounded(gt=0, le=1)
    seed: int = bounded(ge=0, le=MAX_SEED)  # initial weights, batch order and the posterior noise
    log_every: int = bounded(ge=1)  # loss terms recorded in autoencoder.json every N steps
    weights: ImportedWeights | None  # trained weights of this architecture to use instead of training; null: train

    def __post_init__(self) -> None:
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult needs >= 1 level of positive multipliers, got {list(self.channel_mult)}")
        if self.steps == 0 and self.weights is None:
            raise ConfigError("steps is 0 and no weights are imported: train (steps >= 1) or give weights")

    @property
    def factor(self) -> int:
        """Downsampling factor f per side."""
        return 2 ** (len(self.channel_mult) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(z_channels, H / f, W / f) of images of side `resolution`."""
        return self.z_channels, resolution // self.factor, resolution // self.factor


Section = Literal["runs", "experts", "ensembles"]


@dataclass(frozen=True)
class RunConfig:
    name: str
    section: Section  # the params.yaml section the run is in (RUN_SECTIONS says what the pipeline does with it)
    dataset_name: str
    dataset: DatasetConfig
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    sample: SampleConfig
    eval: EvalConfig
    experts: tuple[RunConfig, ...] = ()  # the runs named by model.experts, attached by parse_params
    autoencoder: AutoencoderConfig | None = None  # set when the dataset is a latent dataset (autoencoders.<dataset>)
    scope: str = ""  # "paper": a run of params.yaml's `paper` section (paper scale, not built by `dvc repro`)

    @property
    def params_key(self) -> str:
        """The run's key path in params.yaml, e.g. runs.rin_fmnist, experts.meme_fmnist_e1 or paper.runs.rin_cifar10."""
        return f"{self.scope}.{self.section}.{self.name}" if self.scope else f"{self.section}.{self.name}"


@dataclass(frozen=True)
class PipelineConfig:
    """What `dvc repro` builds on this machine: a shard stage per listed dataset (every run of every section goes
    through the pipeline, so its dataset must be listed here)."""

    datasets: tuple[str, ...]


@dataclass(frozen=True)
class ReferenceSet:
    """Real images every run on one dataset is compared with; refstats@<dataset> caches their Inception features."""

    split: Literal["train", "test"]
    num_images: int = bounded(ge=2)  # the first N of the split in shard order (a seeded shuffle); runs take <= N
    # The floor: this many held-out real images (clips) of the other split, scored against the reference exactly as a
    # run's samples are (same N, the first of them), so each row shows how far it is from real data; 0: none
    floor: int = bounded(ge=0, default=0)


@dataclass(frozen=True)
class ReportRow:
    """Where a run appears in the report: a row of one of the papers' tables (diffusion/report.py PAPER_TABLES)."""

    table: Literal["rin_table2", "rin_table3", "meme_table1", "meme_table2"]
    row: str  # a row key of that table, e.g. cifar10
    scale: str  # what the row says about our scale beside dataset and samples, e.g. "CPU scale"; "" for none


@dataclass(frozen=True)
class FourierConfig:
    """MEME's frequency analysis (diffusion/fourier.py, the `fourier` stage): the relative log amplitude of each
    layer's feature maps of trained runs, on real images noised to a few t."""

    # Runs or ensembles with U-Net feature maps (model family meme), each with trained weights. Like
    # evaluation.report, it may name runs that a trimmed params file lacks: the fourier stage refuses those.
    runs: tuple[str, ...]
    t: tuple[float, ...]  # noise levels, as times of each run's training schedule (0: clean, 1: pure noise)
    split: Literal["train", "test"]  # where the real images come from (the first num_images in shard order)
    num_images: int = bounded(ge=1)
    seed: int = bounded(ge=0, le=MAX_SEED)  # the noise added to the images (one draw, shared by every t and run)

    def __post_init__(self) -> None:
        for i, t in enumerate(self.t):
            if not 0.0 <= t <= 1.0:
                raise ConfigError(f"t[{i}] must lie in [0, 1], got {t}")


@dataclass(frozen=True)
class EvaluationConfig:
    references: dict[str, ReferenceSet]  # dataset -> its cached reference set; one per dataset that runs use
    report: dict[str, ReportRow]  # run -> the paper row it reproduces; unmapped runs are listed apart
    fourier: FourierConfig | None = None  # MEME's frequency analysis; absent: the fourier stage refuses to run


@dataclass(frozen=True)
class ClaimArm:
    """One arm of the claims (params.yaml claims.arms.<name>): a copy of a run of `runs` or of an ensemble of
    `ensembles` with some keys set; diffusion.claims turns it into one run (ensemble and experts) per seed."""

    base: str  # the run or ensemble it copies
    set: dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted keys within the run: {train.steps: 1}
    experts: dict[str, Any] = dataclasses.field(default_factory=dict)  # an ensemble's arm: set in each expert
    note: str = ""  # why the arm is what it is, shown in the claim's card


@dataclass(frozen=True)
class Claim:
    """A claim of a paper, tested by arms (params.yaml claims.claims.<id>)."""

    claim: str  # what the paper says, in one line
    evidence: str  # where: paper, arXiv id, figure or table
    # The paper's order, best first: each entry an arm or a group of arms (a group is represented by its best arm);
    # the verdict tests every adjacent pair by KID, paired by seed.
    order: tuple[tuple[str, ...], ...]
    figure: Literal["arms", "compute"] = "arms"  # compute: proxy KID against training PFLOP and minutes as well
    seeds: tuple[int, ...] | None = None  # None: claims.seeds

    def __post_init__(self) -> None:
        if len(self.order) < 2 or not all(self.order):
            raise ConfigError(f"order must list at least two non-empty entries (arms or groups), got {self.order}")

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(a for group in self.order for a in group)


@dataclass(frozen=True)
class ClaimsConfig:
    """The papers' claims at this scale (params.yaml `claims`): arms built only in a claims workspace
    (flows/claims.py, `reproduce-claims`), never by the repository's own `dvc repro`."""

    seeds: tuple[int, ...]  # train.seed of each arm's copies
    protocol: dict[str, Any]  # dotted keys set in every arm's run (its sample count, reference size, proxy)
    references: dict[str, ReferenceSet]  # the claims workspace's evaluation.references
    arms: dict[str, ClaimArm]
    claims: dict[str, Claim]

    def seeds_of(self, claim: str) -> tuple[int, ...]:
        return self.claims[claim].seeds or self.seeds


def parse_claims(raw: Any, runs: Mapping[str, RunConfig], path: str = "claims") -> ClaimsConfig | None:
    """The typed claims section (None when absent or empty), its names checked: a base that is there is a run or
    ensemble (like evaluation.report, it may name runs a trimmed params file lacks: building the claims workspace,
    diffusion.claims.claims_overrides, refuses those), every arm a claim lists is defined, seeds distinct. Arms' keys
    are checked by building them."""
    if not raw:
        return None
    raw = dict(raw)
    if isinstance(raw.get("claims"), Mapping):  # `order` entries may be an arm name or a list of them
        raw["claims"] = {cid: _listed_order(c) for cid, c in raw["claims"].items()}
    cfg = build_dataclass(ClaimsConfig, raw, path)
    for name, arm in cfg.arms.items():
        check_name(f"{path}.arms", name)
        base = runs.get(arm.base)
        if base is None:
            continue
        if base.section == "experts":
            raise ConfigError(f"params.yaml: {path}.arms.{name}.base must name a run of `runs` or an ensemble of "
                              f"`ensembles`, got {arm.base!r}")
        if arm.experts and base.section != "ensembles":
            raise ConfigError(f"params.yaml: {path}.arms.{name}.experts: {arm.base!r} is not an ensemble; set its "
                              "keys under `set`")
    for cid, claim in cfg.claims.items():
        check_name(f"{path}.claims", cid)
        for arm in claim.arms:
            if arm not in cfg.arms:
                raise ConfigError(f"params.yaml: {path}.claims.{cid}.order names {arm!r}, which is not an arm of "
                                  f"{path}.arms {sorted(cfg.arms)}")
        seeds = cfg.seeds_of(cid)
        if len(set(seeds)) != len(seeds) or not seeds:
            raise ConfigError(f"params.yaml: {path}.claims.{cid}: seeds must be distinct and at least one, got {seeds}")
    return cfg


def _listed_order(claim: Any) -> Any:
    if not isinstance(claim, Mapping) or not isinstance(claim.get("order"), list):
        return claim
    return dict(claim) | {"order": [[e] if isinstance(e, str) else e for e in claim["order"]]}


@dataclass(frozen=True)
class Params:
    pipeline: PipelineConfig
    datasets: dict[str, DatasetConfig]
    runs: dict[str, RunConfig]  # `runs`: trained, sampled and evaluated
    experts: dict[str, RunConfig]  # `experts`: MEME experts, only trained
    ensembles: dict[str, RunConfig]  # `ensembles`: MEME multi-expert runs, sampled and evaluated from their experts
    autoencoders: dict[str, AutoencoderConfig]  # latent dataset -> the autoencoder whose latents it serves
    evaluation: EvaluationConfig
    # The `paper` section: paper-scale pipeline, autoencoders, runs and evaluation, for GPUs (never built by
    # `dvc repro`); None when params.yaml has none.
    paper: Params | None = None
    claims: ClaimsConfig | None = None  # the papers' claims at this scale (a claims workspace builds their arms)

    @property
    def all_runs(self) -> dict[str, RunConfig]:
        """Every run of the three sections by name (names are unique across them)."""
        return self.runs | self.experts | self.ensembles

    def run(self, name: str) -> RunConfig:
        runs = self.all_runs
        if name not in runs:
            raise ConfigError(f"params.yaml: no run named {name!r} under {', '.join(RUN_SECTIONS)}; runs are "
                              f"{sorted(runs)}")
        return runs[name]

    def any_run(self, name: str) -> tuple[Params, RunConfig]:
        """A run of the pipeline's sections or of the `paper` section, with the params it belongs to."""
        for params in (self, self.paper):
            if params is not None and name in params.all_runs:
                return params, params.all_runs[name]
        paper = sorted(self.paper.all_runs) if self.paper else []
        raise ConfigError(f"params.yaml: no run named {name!r}; pipeline runs are {sorted(self.all_runs)}, "
                          f"paper-scale runs (section paper) are {paper}")


def check_role(run: RunConfig) -> None:
    """A run's section matches what it is: an expert trains one interval (train.expert), an ensemble routes between
    experts (model.experts), a run of `runs` is neither."""
    key = run.params_key
    if run.section == "experts" and run.train.expert is None:
        raise ConfigError(f"params.yaml: {key}.train.expert is null: an expert run trains one time interval, give "
                          "{index: n, count: N, p: p_n} (or move the run to `runs` to train on all of [0, 1])")
    if run.section != "experts" and run.train.expert is not None:
        raise ConfigError(f"params.yaml: {key}.train.expert is set: a run that trains one MEME expert belongs under "
                          "`experts:` (trained by train_expert@<name>, sampled through its ensemble)")
    if run.section == "ensembles" and not run.model.experts:
        raise ConfigError(f"params.yaml: {key}.model.experts is empty: an ensemble samples from its expert runs; "
                          "list them (section `experts`), expert 1 (t near 0) first")
    if run.section != "ensembles" and run.model.experts:
        raise ConfigError(f"params.yaml: {key}.model.experts is set: a multi-expert run trains nothing itself and "
                          "belongs under `ensembles:`")
    if run.train.proxy is not None and (run.section != "runs" or run.diffusion.context_frames):
        what = "an expert samples only through its ensemble" if run.section != "runs" else \
            "a run that predicts from context frames needs its clips' features (KVD), which the proxy does not draw"
        raise ConfigError(f"params.yaml: {key}.train.proxy is set, but {what}; set it to null")


def attach_experts(runs: dict[str, RunConfig]) -> dict[str, RunConfig]:
    """Resolve each ensemble's model.experts to the expert runs, checking that they form one MEME: expert n of N at
    position n, all on the ensemble's dataset and prediction type, with one training schedule."""
    out = dict(runs)
    experts_section = sorted(n for n, r in runs.items() if r.section == "experts")
    for name, run in runs.items():
        if not run.model.experts:
            continue
        path = f"params.yaml: {run.params_key}.model.experts"
        missing = [e for e in run.model.experts if e not in experts_section]
        if missing:
            raise ConfigError(f"{path} names no run {missing[0]!r} of the section `experts`; it has {experts_section}")
        experts = tuple(runs[e] for e in run.model.experts)
        for i, expert in enumerate(experts):
            e = expert.train.expert
            if e is None or (e.index, e.count) != (i + 1, len(experts)):
                has = "no train.expert" if e is None else f"train.expert index {e.index} of count {e.count}"
                raise ConfigError(f"{path}[{i}]: run {expert.name!r} must train expert {i + 1} of {len(experts)} "
                                  f"({expert.params_key}.train.expert), it has {has}")
            shared = {"dataset": (run.dataset_name, expert.dataset_name),
                      "diffusion.prediction": (run.diffusion.prediction, expert.diffusion.prediction),
                      "model.class_conditional": (run.model.class_conditional, expert.model.class_conditional),
                      "diffusion.train_schedule": (experts[0].diffusion.train_schedule,
                                                   expert.diffusion.train_schedule)}
            for what, (want, got) in shared.items():
                if want != got:
                    raise ConfigError(f"{path}[{i}]: run {expert.name!r} has {what} {got!r}, but the experts of "
                                      f"{name!r} must share {want!r}")
        out[name] = dataclasses.replace(run, experts=experts)
    return out


def check_latent_dataset(name: str, ae: AutoencoderConfig, datasets: Mapping[str, DatasetConfig],
                         pipeline: PipelineConfig) -> None:
    """autoencoders.<name> encodes a dataset that has a shard stage, into a latent dataset `datasets.<name>` equal
    to it (its shards are copies) that no shard stage writes, at a resolution the autoencoder divides."""
    key = f"params.yaml: autoencoders.{name}"
    if ae.dataset not in pipeline.datasets:
        raise ConfigError(f"{key}.dataset must name one of pipeline.datasets {list(pipeline.datasets)}, got "
                          f"{ae.dataset!r}")
    if datasets.get(name) != datasets.get(ae.dataset):
        raise ConfigError(f"{key}: the latent dataset needs an entry datasets.{name} with the same keys and values "
                          f"as datasets.{ae.dataset} (a YAML alias does it: `{name}: *<anchor of {ae.dataset}>`)")
    if name in pipeline.datasets:
        raise ConfigError(f"{key}: remove {name!r} from pipeline.datasets: autoencoder@{name} writes its shards, "
                          "not shard@")


def check_fourier(cfg: FourierConfig, runs: Mapping[str, RunConfig]) -> None:
    """The Fourier analysis hooks U-Net feature maps of images: the runs it names must be MEME-family image runs."""
    for i, name in enumerate(cfg.runs):
        key = f"params.yaml: evaluation.fourier.runs[{i}]"
        if name not in runs:
            continue
        run = runs[name]
        if run.model.family != "meme" or run.dataset.frames:
            raise ConfigError(f"{key}: {run.params_key} is a {run.model.family} model of "
                              f"{'video' if run.dataset.frames else 'images'}; the analysis hooks the feature maps "
                              "of U-Nets on images (model family meme)")


# What the pipeline does with the runs of each params.yaml section, and the keys each run writes (dvc.yaml lists
# <section>.<name>.<key> as stage params, so each must be present; `{}` takes the defaults).
RUN_SECTIONS: dict[str, tuple[str, ...]] = {
    "runs": ("dataset", "model", "diffusion", "train", "sample", "eval"),  # train@, sample@, evaluate@
    "experts": ("dataset", "model", "diffusion", "train"),  # train_expert@ only: sampled through an ensemble
    "ensembles": ("dataset", "model", "diffusion", "train", "sample", "eval"),  # sample_ensemble@, evaluate_ensemble@
}


def parse_run(section: Section, name: str, run_raw: Any, defaults: Mapping[str, Any],
              datasets: Mapping[str, DatasetConfig], pipeline: PipelineConfig,
              autoencoders: Mapping[str, AutoencoderConfig], scope: str = "") -> RunConfig:
    """One run of a section: its own keys deep-merged over `defaults`, typed and checked."""
    key, allowed = f"{section}.{name}", RUN_SECTIONS[section]
    if not isinstance(run_raw, Mapping):
        raise ConfigError(f"params.yaml: {key} must be a mapping of {list(allowed)}")
    unknown = sorted(set(run_raw) - set(allowed))
    if unknown:
        why = "; an expert is sampled only through its ensemble" if section == "experts" else ""
        raise ConfigError(f"params.yaml: unknown key {key}.{unknown[0]}; allowed: {list(allowed)}{why}")
    missing = [k for k in allowed if k not in run_raw]
    if "dataset" in missing:
        raise ConfigError(f"params.yaml: missing key {key}.dataset: name the run's dataset, one of {sorted(datasets)}")
    if missing:  # dvc.yaml lists <section>.<name>.<key> as stage params, so each must exist (`{}` is fine)
        raise ConfigError(f"params.yaml: missing key {key}.{missing[0]} (write `{missing[0]}: {{}}` to take the "
                          "defaults)")
    if not isinstance(run_raw.get("model"), Mapping) or "family" not in run_raw["model"]:
        raise ConfigError(f"params.yaml: missing key {key}.model.family: each run names its model family (the model "
                          "package, e.g. `model: {family: rin}`) in its own section, where dvc.yaml reads it to depend "
                          "on that package")
    merged = deep_merge(defaults, run_raw)
    dataset_name = merged.get("dataset")
    if not isinstance(dataset_name, str) or dataset_name not in datasets:
        raise ConfigError(f"params.yaml: {key}.dataset must name one of the datasets {sorted(datasets)}, "
                          f"got {dataset_name!r}")
    if dataset_name not in pipeline.datasets and dataset_name not in autoencoders:
        raise ConfigError(f"params.yaml: {key}.dataset {dataset_name!r} has no shard stage: add it to "
                          "pipeline.datasets (or make it a latent dataset under autoencoders)")
    merged = {k: v for k, v in merged.items() if k != "dataset"}
    run = build_dataclass(RunConfig, merged, key, extra={"name": name, "section": section,
                                                         "dataset_name": dataset_name,
                                                         "dataset": datasets[dataset_name],
                                                         "autoencoder": autoencoders.get(dataset_name),
                                                         "scope": scope})
    frames = datasets[dataset_name].frames
    if run.diffusion.context_frames and run.diffusion.context_frames >= max(frames, 1):
        what = f"the {frames} frames of its clips" if frames else "images (dataset frames: 0)"
        raise ConfigError(f"params.yaml: {key}.diffusion.context_frames={run.diffusion.context_frames} "
                          f"must be below {what}; use 0 for images")
    check_role(run)
    return run


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a run or dataset name: it becomes a folder name in dvc.yaml


def check_name(section: str, name: Any) -> None:
    """Run, expert, ensemble, dataset and autoencoder names become path components (outputs/<run>, data/shards/<name>):
    letters, digits, `_`, `.` and `-`, starting with a letter or digit, so none can climb out of its folder."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"params.yaml: {section}: the name {name!r} is not allowed: names become folder names, so "
                          "use letters, digits, '_', '.' and '-' (starting with a letter or digit, no '..')")


# The keys of params.yaml's `paper` section: a paper-scale params file that shares `datasets` and `defaults`.
PAPER_KEYS = ("pipeline", "autoencoders", *RUN_SECTIONS, "evaluation", "claims")


def paper_section(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    """params.yaml's data with the `paper` section in place of the pipeline's own sections (what a paper-scale
    workspace runs), or None when there is no such section."""
    paper = raw.get("paper")
    if not paper:
        return None
    if not isinstance(paper, Mapping):
        raise ConfigError(f"params.yaml: paper must be a mapping with keys {', '.join(PAPER_KEYS)}")
    unknown = sorted(set(paper) - set(PAPER_KEYS))
    if unknown:
        raise ConfigError(f"params.yaml: unknown key paper.{unknown[0]}; allowed: {', '.join(PAPER_KEYS)}")
    out = {k: v for k, v in raw.items() if k != "paper"}
    return out | {k: paper.get(k, {}) for k in PAPER_KEYS}


def parse_params(raw: Mapping[str, Any], scope: str = "") -> Params:
    """Turn the parsed YAML into typed objects, validating everything (including model overrides and the `paper`
    section)."""
    top = ("pipeline", "datasets", "autoencoders", "defaults", *RUN_SECTIONS, "evaluation", "claims", "paper")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params.yaml must be a mapping with keys {', '.join(top)}")
    unknown = sorted(set(raw) - set(top))
    if unknown:
        raise ConfigError(f"params.yaml: unknown top-level key {unknown[0]}; allowed: {', '.join(top)}")
    for key in top[:-2]:
        if not isinstance(raw.get(key), Mapping):
            raise ConfigError(f"params.yaml: missing or malformed top-level section {key!r} (a mapping; `{key}: {{}}` "
                              "when empty)")
    for section in ("datasets", "autoencoders", *RUN_SECTIONS):
        for name in raw[section]:
            check_name(section, name)
    datasets = {name: build_dataclass(DatasetConfig, d, f"datasets.{name}") for name, d in raw["datasets"].items()}
    pipeline = build_dataclass(PipelineConfig, raw["pipeline"], "pipeline")
    for i, name in enumerate(pipeline.datasets):
        if name not in datasets:
            raise ConfigError(f"params.yaml: pipeline.datasets[{i}] must name one of the datasets {sorted(datasets)}, "
                              f"got {name!r}")
    autoencoders = {name: build_dataclass(AutoencoderConfig, a, f"autoencoders.{name}")
                    for name, a in raw["autoencoders"].items()}
    for name, ae in autoencoders.items():
        check_latent_dataset(name, ae, datasets, pipeline)
    runs: dict[str, RunConfig] = {}
    for section in RUN_SECTIONS:
        for name, run_raw in raw[section].items():
            if name in runs:  # outputs/<name>/ and `diffusion.cli train <name>` address a run by its name alone
                raise ConfigError(f"params.yaml: {section}.{name}: the name is taken by {runs[name].params_key}; "
                                  "run names must be unique across runs, experts and ensembles")
            runs[name] = parse_run(section, name, run_raw, raw["defaults"], datasets, pipeline, autoencoders, scope)
    runs = attach_experts(runs)
    evaluation = build_dataclass(EvaluationConfig, raw["evaluation"], "evaluation")
    for name in evaluation.references:
        if name not in pipeline.datasets and name not in autoencoders:
            raise ConfigError(f"params.yaml: evaluation.references.{name} names no dataset of pipeline.datasets "
                              f"{list(pipeline.datasets)} or latent dataset of autoencoders {sorted(autoencoders)}: "
                              "add it there or remove the entry")
    if evaluation.fourier is not None:
        check_fourier(evaluation.fourier, runs)
    sections = {section: {n: r for n, r in runs.items() if r.section == section} for section in RUN_SECTIONS}
    paper_raw = paper_section(raw)
    paper = None
    if paper_raw is not None:
        try:
            paper = parse_params(paper_raw, scope="paper")
        except ConfigError as err:
            raise ConfigError(f"{err} (in params.yaml's `paper` section: the key paths are under paper.)") from None
    claims = parse_claims(raw.get("claims"), runs)
    return Params(pipeline=pipeline, datasets=datasets, autoencoders=autoencoders, evaluation=evaluation,
                  paper=paper, claims=claims, **sections)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (YAML's last-wins would hide a typo, and DVC
    refuses such a file); keys that a `<<:` merge brings in may still be overridden beside it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: line {line}: key {key!r} is written twice in one mapping (first at "
                                  f"line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def load_yaml(path: str | Path) -> Any:
    """A YAML file as plain data, refusing duplicate keys, non-text files and anything but plain YAML tags."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file; run from the repository root or pass --params PATH")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; pass --params PATH naming a params.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); pass --params PATH naming a params.yaml") from None
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    return parse_params(load_yaml(path))
