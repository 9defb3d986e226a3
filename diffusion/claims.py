"""The papers' claims at this scale (params.yaml `claims`): the params of a claims workspace, in which every arm is
one run (or one ensemble with its experts) per seed, and the verdict of a claim from its arms' KIDs.

A verdict tests each adjacent pair of the claim's `order` (the paper's, best first) by KID, paired by seed: the
difference's mean over seeds against its standard error, which adds the seed-to-seed spread of the differences and
the KIDs' own subset spread (so one seed, or two seeds that happen to agree, does not look certain). A pair holds
at z >= 2, is reversed at z <= -2, and is unclear between. Supported: every pair holds. Not supported: some pair
is reversed. Inconclusive: otherwise. A group of arms (e.g. RIN at three sizes) is represented by its arm of lowest
mean KID, which favours groups with more arms; the card says which arm stood for it.

Imports neither torch nor a model package: the flows build workspaces from it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from diffusion.config import ClaimsConfig, parse_params
from diffusion.io import canonical_json
from diffusion.typed import ConfigError, set_dotted, unshared

Z_HOLDS = 2.0  # |z| at which a pair counts as decided (about 95% two-sided under a normal approximation)
CLAIMS_OUT = "outputs/claims"  # a claims workspace's claim stages write <CLAIMS_OUT>/<id>/


def arm_run_name(arm: str, seed: int) -> str:
    """The run (or ensemble) that is `arm` trained from `seed`."""
    return f"{arm}_s{seed}"


def expert_run_name(arm: str, seed: int, index: int) -> str:
    return f"{arm_run_name(arm, seed)}_e{index}"


def claims_of(raw: Mapping[str, Any]) -> ClaimsConfig:
    params = parse_params(raw)
    if params.claims is None:
        raise ConfigError("params.yaml has no `claims` section (or it is empty): nothing to build; see the README, "
                          "\"The papers' claims\"")
    return params.claims


def chosen_claims(cfg: ClaimsConfig, only: Sequence[str] | None) -> list[str]:
    """The claims to build: `only` in params order (every claim when None or empty); unknown ids are refused."""
    if not only:
        return list(cfg.claims)
    unknown = [c for c in only if c not in cfg.claims]
    if unknown:
        raise ConfigError(f"no claim {unknown[0]!r} in params.yaml claims.claims; claims are {list(cfg.claims)}")
    return [c for c in cfg.claims if c in set(only)]


def arm_seeds(cfg: ClaimsConfig, claims: Sequence[str]) -> dict[str, list[int]]:
    """arm -> the seeds the chosen claims need of it (an arm shared by two claims is built once per seed)."""
    out: dict[str, list[int]] = {}
    for cid in claims:
        for arm in cfg.claims[cid].arms:
            seeds = out.setdefault(arm, [])
            seeds += [s for s in cfg.seeds_of(cid) if s not in seeds]
    return out


def _seeded(run: Mapping[str, Any], seed: int, dotted: Mapping[str, Any]) -> dict[str, Any]:
    return set_dotted(run, dict(dotted) | {"train.seed": seed})


def claims_overrides(raw: Mapping[str, Any], only: Sequence[str] | None = None) -> dict[str, Any]:
    """The top-level keys that turn params.yaml data into a claims workspace's (flows/workspace.py applies them):
    `runs`, `experts` and `ensembles` replaced by the arms of the chosen claims (`only`; all when None), one per
    seed, each its base run with claims.protocol, the arm's keys and `train.seed` set (an ensemble's experts get the
    arm's `experts` keys and the seed); only the datasets and autoencoders they use; evaluation.references from
    claims.references; no paper tables, frequency
    figure, paper or claims section (the claims' bases are not in the workspace; verdicts are drawn in the
    repository, diffusion/stages/claims.py). Checked by parsing the result."""
    cfg = claims_of(raw)
    claims = chosen_claims(cfg, only)
    sections: dict[str, dict[str, Any]] = {"runs": {}, "experts": {}, "ensembles": {}}
    for arm_name, seeds in arm_seeds(cfg, claims).items():
        arm = cfg.arms[arm_name]
        if arm.base not in raw.get("runs", {}) and arm.base not in raw.get("ensembles", {}):
            raise ConfigError(f"params.yaml: claims.arms.{arm_name}.base must name a run of `runs` or an ensemble of "
                              f"`ensembles`, got {arm.base!r}")
        section = "ensembles" if arm.base in raw.get("ensembles", {}) else "runs"
        base = raw[section][arm.base]
        for seed in seeds:
            run = _seeded(base, seed, dict(cfg.protocol) | dict(arm.set))
            if section == "ensembles":
                names = []
                for i, expert in enumerate(base["model"]["experts"], start=1):
                    name = expert_run_name(arm_name, seed, i)
                    sections["experts"][name] = _seeded(raw["experts"][expert], seed, arm.experts)
                    names.append(name)
                run = set_dotted(run, {"model.experts": names})
            sections[section][arm_run_name(arm_name, seed)] = run
    datasets = {r["dataset"] for s in sections.values() for r in s.values()}
    autoencoders = {k: unshared(v) for k, v in raw.get("autoencoders", {}).items() if k in datasets}
    sources = datasets | {a["dataset"] for a in autoencoders.values()}  # a latent dataset's shards need its source's
    evaluation = {k: unshared(v) for k, v in raw["evaluation"].items() if k != "fourier"}
    out = sections | {
        "pipeline": unshared(raw["pipeline"]) | {"datasets": [d for d in raw["pipeline"]["datasets"] if d in sources]},
        "autoencoders": autoencoders,
        "evaluation": evaluation | {"references": unshared(raw["claims"]["references"]), "report": {}},
        "claims": {},
        "paper": {},
    }
    try:
        parse_params(set_dotted(raw, out))
    except ConfigError as err:
        raise ConfigError(f"{err} (in the claims workspace built from params.yaml `claims`: an arm's `set` or "
                          "`experts` key, or claims.protocol, is wrong; arm runs are named <arm>_s<seed>)") from None
    return out


def arm_fingerprint(workspace_raw: Mapping[str, Any], run: str) -> str:
    """sha256 of everything in a claims workspace's params that an arm's numbers depend on: its run (or ensemble and
    experts), the defaults they merge over, its dataset and reference set. A record of another fingerprint is of
    another configuration."""
    section = "ensembles" if run in workspace_raw["ensembles"] else "runs"
    spec = workspace_raw[section][run]
    dataset = spec["dataset"]
    # where the dataset lies and how it got there are not what it is (the trainer's fingerprint leaves them out too)
    data = {k: v for k, v in workspace_raw["datasets"][dataset].items()
            if k not in ("root", "download", "skip_corrupt")}
    blob = {"run": spec, "experts": [workspace_raw["experts"][e] for e in spec.get("model", {}).get("experts", [])],
            "defaults": workspace_raw["defaults"], "dataset": data,
            "reference": workspace_raw["evaluation"]["references"].get(dataset)}
    return hashlib.sha256(canonical_json(blob).encode()).hexdigest()


# ---- verdicts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmScore:
    """One arm trained from one seed, as its evaluation scored it."""

    arm: str
    seed: int
    kid: float
    kid_std: float  # over KID's random subsets


@dataclass(frozen=True)
class Comparison:
    """`better` (claimed) against `worse`, paired by seed: diff = KID(worse) - KID(better), > 0 when the claim's
    order holds."""

    better: str
    worse: str
    seeds: tuple[int, ...]
    kid_better: float  # mean over the seeds
    kid_worse: float
    diff: float
    se: float
    z: float
    status: Literal["holds", "reversed", "unclear"]


@dataclass(frozen=True)
class Verdict:
    verdict: Literal["supported", "not supported", "inconclusive"]
    reason: str
    comparisons: tuple[Comparison, ...]
    representatives: tuple[str, ...]  # the arm standing for each entry of the order


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def compare(better: Sequence[ArmScore], worse: Sequence[ArmScore]) -> Comparison:
    """The paired comparison of two arms over the seeds both have."""
    b = {s.seed: s for s in better}
    w = {s.seed: s for s in worse}
    seeds = tuple(sorted(set(b) & set(w)))
    if not seeds:
        name = (better or worse)[0].arm if (better or worse) else "?"
        raise ValueError(f"arms share no seed (arm {name}): a paired comparison needs the same seeds in both")
    diffs = [w[s].kid - b[s].kid for s in seeds]
    n = len(seeds)
    mean = _mean(diffs)
    seed_var = sum((d - mean) ** 2 for d in diffs) / (n - 1) / n if n > 1 else 0.0
    subset_var = sum(b[s].kid_std ** 2 + w[s].kid_std ** 2 for s in seeds) / n**2
    se = math.sqrt(seed_var + subset_var)
    z = mean / se if se > 0 else (math.inf if mean > 0 else -math.inf if mean < 0 else 0.0)
    status = "holds" if z >= Z_HOLDS else "reversed" if z <= -Z_HOLDS else "unclear"
    return Comparison(better=b[seeds[0]].arm, worse=w[seeds[0]].arm, seeds=seeds,
                      kid_better=_mean([b[s].kid for s in seeds]), kid_worse=_mean([w[s].kid for s in seeds]),
                      diff=mean, se=se, z=z, status=status)


def representative(group: Sequence[str], scores: Mapping[str, Sequence[ArmScore]]) -> str:
    """The arm of lowest mean KID in a group."""
    return min(group, key=lambda a: _mean([s.kid for s in scores[a]]))


def verdict(order: Sequence[Sequence[str]], scores: Mapping[str, Sequence[ArmScore]]) -> Verdict:
    """The claim's verdict from every arm's scores (see the module docstring for the rule)."""
    missing = [a for group in order for a in group if not scores.get(a)]
    if missing:
        raise ValueError(f"no scores for arm {missing[0]!r}: build it first (its evaluate stage)")
    reps = [representative(group, scores) for group in order]
    comps = tuple(compare(scores[a], scores[b]) for a, b in zip(reps, reps[1:], strict=False))
    reversed_ = [c for c in comps if c.status == "reversed"]
    unclear = [c for c in comps if c.status == "unclear"]
    if reversed_:
        c = reversed_[0]
        v, reason = "not supported", (f"{c.worse} beats {c.better}: KID {c.kid_worse:.4f} vs {c.kid_better:.4f} "
                                      f"(z = {c.z:.1f}, {len(c.seeds)} seeds)")
    elif unclear:
        c = unclear[0]
        v, reason = "inconclusive", (f"{c.better} vs {c.worse}: KID {c.kid_better:.4f} vs {c.kid_worse:.4f}, a "
                                     f"difference of {c.diff:+.4f} +- {c.se:.4f} (z = {c.z:.1f}, "
                                     f"{len(c.seeds)} seeds) is within the spread")
    else:
        v, reason = "supported", "; ".join(f"{c.better} < {c.worse} by {c.diff:.4f} (z = {c.z:.1f})" for c in comps)
    return Verdict(verdict=v, reason=reason, comparisons=comps, representatives=tuple(reps))
