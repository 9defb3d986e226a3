"""The claims stage (`python -m diffusion.cli claims --arms results/claims/cpu/arms --out outputs/claims`): the
papers' claims at this scale (params.yaml `claims`), one verdict each from its arms' records, as claims.json,
claims.md (the table: one row per claim), a figure and a card per claim.

An arm's record (results/claims/<scale>/arms/<run>.json) is what the reproduce-claims flow kept of one arm and seed
built in a claims workspace (flows/claims.py): its evaluation, its training (minutes, counted PFLOP, proxy points),
the workspace's dvc.lock digests and the commit, and the fingerprint of its configuration. A record whose
fingerprint differs from what params.yaml now builds is stale: its claim shows no verdict until it is rebuilt."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffusion.args import out_folder, parser
from diffusion.claims import ArmScore, arm_fingerprint, arm_run_name, claims_of, claims_overrides, verdict
from diffusion.config import Claim, ClaimsConfig, ConfigError, load_yaml
from diffusion.io import write_text
from diffusion.typed import set_dotted

RECORD_VERSION = 1


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read as JSON ({err}); delete it and re-run reproduce-claims") from None


# ---- records (flows/claims.py writes them) ------------------------------------------------------------------------


def write_record(folder: Path, record: Mapping[str, Any]) -> Path:
    path = folder / f"{record['run']}.json"
    write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def read_records(folder: Path) -> dict[str, dict[str, Any]]:
    """run name -> record, for every record in the folder (none when it does not exist)."""
    if not folder.is_dir():
        return {}
    out = {}
    for path in sorted(folder.glob("*.json")):
        record = read_json(path)
        if not isinstance(record, dict) or record.get("version") != RECORD_VERSION or "run" not in record:
            raise ConfigError(f"{path}: not an arm record of version {RECORD_VERSION}; delete it and re-run "
                              "reproduce-claims for its claim")
        out[record["run"]] = record
    return out


# ---- verdicts --------------------------------------------------------------------------------------------------


def arm_state(workspace_raw: Mapping[str, Any], records: Mapping[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """run -> (state, fingerprint wanted): `ok`, `missing` or `stale` for every arm run of a claims workspace."""
    out = {}
    for section in ("runs", "ensembles"):
        for run in workspace_raw[section]:
            want = arm_fingerprint(workspace_raw, run)
            have = records.get(run)
            out[run] = ("missing" if have is None else "ok" if have["fingerprint"] == want else "stale", want)
    return out


def claim_result(cid: str, claim: Claim, seeds: Sequence[int], records: Mapping[str, dict[str, Any]],
                 states: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """One claim: its arms' scores, the verdict (None until every arm and seed has a current record)."""
    runs = [arm_run_name(a, s) for a in claim.arms for s in seeds]
    absent = [r for r in runs if states[r][0] != "ok"]
    base = {"id": cid, "claim": claim.claim, "evidence": claim.evidence, "order": [list(g) for g in claim.order],
            "seeds": list(seeds), "figure": claim.figure,
            "arms": {r: records[r] for r in runs if states[r][0] == "ok"}}
    if absent:
        what = ", ".join(f"{r} ({states[r][0]})" for r in absent)
        return base | {"verdict": None, "reason": f"not built: {what}"}
    scores = {a: [ArmScore(a, s, float(records[arm_run_name(a, s)]["eval"]["kid"]),
                           float(records[arm_run_name(a, s)]["eval"]["kid_std"])) for s in seeds] for a in claim.arms}
    v = verdict(claim.order, scores)
    return base | {"verdict": v.verdict, "reason": v.reason,
                   "comparisons": [asdict(c) for c in v.comparisons], "representatives": list(v.representatives)}


def protocol_of(records: Sequence[Mapping[str, Any]]) -> str:
    """How the arms were scored, from their records (the same for every arm of a claim, by claims.protocol)."""
    protocols = sorted({
        f"KID +- std over {r['eval']['kid_subsets']} subsets of {r['eval']['kid_subset_size']} (and FID) of "
        f"{r['eval']['num_samples']:,} samples ({r['eval']['sampler']}, {r['eval']['sampling_steps']} steps) vs the "
        f"first {r['eval']['num_reference']:,} {r['eval']['reference_split']} images, {r['eval']['feature_network']}"
        for r in records})
    return "; ".join(protocols) if protocols else "not built yet"


def arm_summary(result: Mapping[str, Any], arm: str) -> str:
    """`arm KID mean +- seed std (n)`, from the records present."""
    kids = [r["eval"]["kid"] for r in result["arms"].values() if r["arm"] == arm]
    if not kids:
        return f"{arm} —"
    return f"{arm} {statistics.fmean(kids):.4f}" + (f" ± {statistics.stdev(kids):.4f}" if len(kids) > 1 else "")


def short_evidence(evidence: str) -> str:
    """The evidence's reference without its gloss: "RIN, arXiv 2212.11972, Sec. 3.2 (its cost ...)" -> "RIN, arXiv
    2212.11972, Sec. 3.2"."""
    return evidence.split(" (", 1)[0]


def table_markdown(results: Sequence[Mapping[str, Any]], link_prefix: str = "") -> str:
    """The claims table and, below it, one line per claim. The table holds short cells only (claim id, the paper's
    figure or table, seeds, verdict, card): the Prefect UI's artifact view does not wrap table cells, so a wide
    table runs off its ~830-px pane. The claim in full, its arms in the paper's order with their mean KID over seeds
    and the verdict's reason are the lines below."""
    head = ["claim", "paper's evidence", "seeds", "verdict", "card"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    details = []
    for res in results:
        cells = [f"`{res['id']}`", short_evidence(res["evidence"]), str(len(res["seeds"])),
                 f"**{res['verdict'] or 'not built'}**", f"[card]({link_prefix}cards/{res['id']}.md)"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        order = " > ".join("(" + ", ".join(arm_summary(res, a) for a in g) + ")" if len(g) > 1
                           else arm_summary(res, g[0]) for g in res["order"])
        shown = res["verdict"] or "not built"
        details.append(f"- `{res['id']}`: {res['claim']}. Paper: {res['evidence']}. Arms, best claimed first, KID "
                       f"(mean ± std over seeds): {order}. **{shown}**: {res['reason'].removeprefix(shown + ': ')}.")
    return "\n".join([*lines, "", *details])


def card_markdown(res: Mapping[str, Any]) -> str:
    """Everything behind one claim's row: protocol, every arm and seed with its costs and provenance, the pairs."""
    records = list(res["arms"].values())
    lines = [f"# Claim `{res['id']}`: {res['claim']}", "", f"- Paper's evidence: {res['evidence']}",
             f"- Verdict: **{res['verdict'] or 'not built'}**: {res['reason']}",
             f"- Protocol: {protocol_of(records)}",
             f"- Seeds: {', '.join(map(str, res['seeds']))} (train.seed; the samples' seeds are the same in every arm)",
             "- Rule (diffusion/claims.py): each adjacent pair of the paper's order, paired by seed; z = mean KID "
             "difference / its standard error (seed spread of the differences plus the KIDs' subset spread); holds "
             "at z >= 2, reversed at z <= -2.", "", "## Arms", "",
             "| run | KID ± std | FID (this N) | train min | train PFLOP | params | GFLOP per image-step |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        ev, nets = r["eval"], r["train"]
        lines.append(f"| {r['run']} | {ev['kid']:.4f} ± {ev['kid_std']:.4f} | {ev['fid']:.1f} | "
                     f"{sum(n['minutes'] for n in nets):.1f} | {sum(n['train_pflop'] for n in nets):.4f} | "
                     f"{ev['model_params']:,} | {ev['gflops_per_image']:.3f} |")
    losses = [r for r in records if r.get("interval_loss")]
    if losses:
        count = len(losses[0]["interval_loss"]["per_interval"])
        lines += ["", "## Each expert on its own interval", "",
                  f"Loss (the training objective) of {losses[0]['interval_loss']['images']} test images at "
                  f"{len(losses[0]['interval_loss']['times'][0])} times inside each interval, the same noise for "
                  "every run (diffusion/stages/interval_loss.py); interval n is expert n's.", "",
                  "| run | " + " | ".join(f"t in ({n}/{count}, {n + 1}/{count}]" for n in range(count)) + " | mean |",
                  "|---|" + "---|" * (count + 1)]
        for r in losses:
            il = r["interval_loss"]
            lines.append(f"| {r['run']} | " + " | ".join(f"{v:.4f}" for v in il["per_interval"])
                         + f" | {il['overall']:.4f} |")
    if res.get("comparisons"):
        lines += ["", "## Pairs", "", "| better (claimed) | worse | KID better | KID worse | difference ± se | z | |",
                  "|---|---|---|---|---|---|---|"]
        for c in res["comparisons"]:
            lines.append(f"| {c['better']} | {c['worse']} | {c['kid_better']:.4f} | {c['kid_worse']:.4f} | "
                         f"{c['diff']:+.4f} ± {c['se']:.4f} | {c['z']:.1f} | {c['status']} |")
    lines += ["", "## Provenance", "", "Per arm run: the commit it was built at, its configuration's sha256, its "
              "samples' sha256 and its stages' digests in the claims workspace's dvc.lock (a list: the Prefect UI "
              "does not wrap table cells).", ""]
    for r in records:
        digests = ", ".join(f"`{s}` {d[:12]}" for s, d in r["stage_digests"].items())
        lines.append(f"- `{r['run']}`: commit {r['commit'][:12]}; configuration {r['fingerprint'][:16]}; samples "
                     f"{r['eval'].get('samples_sha256', '—')[:16]}; {digests}")
    return "\n".join(lines) + "\n"


def plot_claim(res: Mapping[str, Any], path: Path) -> bool:
    """KID of every arm and seed (dots; bars: mean), the paper's order left to right; a compute claim adds the
    proxy KID against counted training PFLOP and against training minutes. False when no arm is built."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not res["arms"]:
        return False
    arms = [a for g in res["order"] for a in g]
    compute = res["figure"] == "compute"
    fig = Figure(figsize=(13.0 if compute else 6.5, 4.0))
    axes = fig.subplots(1, 3 if compute else 1)
    ax = axes[0] if compute else axes
    colors = colormaps["tab10"].colors
    for i, arm in enumerate(arms):
        kids = [r["eval"]["kid"] for r in res["arms"].values() if r["arm"] == arm]
        if kids:
            ax.bar(i, sum(kids) / len(kids), color=colors[i % len(colors)], alpha=0.4)
            ax.scatter([i] * len(kids), kids, color=colors[i % len(colors)], zorder=3)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("KID (lower is better)")
    ax.set_title(f"{res['id']}: the paper's order, best first", fontsize="medium")
    if compute:
        proxy = "proxy KID"
        for i, arm in enumerate(arms):
            for r in (r for r in res["arms"].values() if r["arm"] == arm):
                rows = sorted(r["train"][0]["proxy"], key=lambda row: row["step"])
                if not rows:
                    continue
                per_image = r["train"][0]["train_flops_per_example"]
                minutes = r["train"][0]["minutes"] / max(r["train"][0]["images_seen"], 1)
                label = arm if r["seed"] == res["seeds"][0] else None
                for axis, xs in ((axes[1], [row["images_seen"] * per_image / 1e15 for row in rows]),
                                 (axes[2], [row["images_seen"] * minutes for row in rows])):
                    axis.plot(xs, [row["kid"] for row in rows], marker="o", color=colors[i % len(colors)],
                              label=label, alpha=0.8)
                proxy = f"proxy KID ({rows[0]['proxy_samples']} samples, {rows[0]['proxy_sampling_steps']} steps)"
        axes[1].set_xlabel("training PFLOP (counted)")
        axes[2].set_xlabel("training minutes (2 CPU cores)")
        for axis in axes[1:]:
            axis.set_ylabel(proxy)
            axis.set_xscale("log")
            # 1-2-5 ticks in plain numbers: the default log labels of a sub-decade range overlap
            axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.grid(alpha=0.3)
        axes[1].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return True


def write_claims(cfg: ClaimsConfig, workspace_raw: Mapping[str, Any], records_dir: Path,
                 out: Path) -> list[dict[str, Any]]:
    """claims.md, claims.json, a card and a figure per claim of `cfg` into `out`, from the records in `records_dir`
    of the arms of the claims workspace whose params are `workspace_raw`."""
    records = read_records(records_dir)
    states = arm_state(workspace_raw, records)
    results = [claim_result(cid, c, cfg.seeds_of(cid), records, states) for cid, c in cfg.claims.items()]
    (out / "cards").mkdir(parents=True, exist_ok=True)
    lines = ["# The papers' claims at CPU scale", "",
             f"Arm records: {records_dir.as_posix()} ({len(records)} built). Protocol: "
             f"{protocol_of(list(records.values()))}. FID at this N is biased (compare it only within a claim); "
             "the verdicts use KID.", "", table_markdown(results), ""]
    for res in results:
        write_text(out / "cards" / f"{res['id']}.md", card_markdown(res))
        if plot_claim(res, out / f"{res['id']}.png"):
            lines += [f"![{res['id']}]({res['id']}.png)", ""]
    write_text(out / "claims.md", "\n".join(lines))
    write_text(out / "claims.json", json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("claims", __doc__)
    p.add_argument("--arms", required=True, help="the folder of arm records (results/claims/cpu/arms)")
    p.add_argument("--out", required=True, help="the output folder (outputs/claims)")
    args = p.parse_args(argv)
    raw = load_yaml(args.params)
    workspace_raw = set_dotted(raw, claims_overrides(raw))
    results = write_claims(claims_of(raw), workspace_raw, Path(args.arms), out_folder(args.out))
    for res in results:
        print(f"{res['id']}: {res['verdict'] or 'not built'} ({res['reason']})")
    return 0

