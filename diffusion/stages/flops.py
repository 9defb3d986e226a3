"""`python -m diffusion.cli flops --preset NAME|all [--json]`: parameters and forward GFLOPs per image of the model
presets of every family beside the papers' sizes (a command for people, not a DVC stage)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from diffusion import registry
from diffusion.args import parser
from diffusion.flops import denoiser_cost


def _describe_preset(cfg) -> str:
    """What sets a preset's cost besides its width: RIN's patches and tokens, a U-Net's levels (and iFormer ratios)."""
    if hasattr(cfg, "patch"):
        return f"patch {list(cfg.patch)}, {cfg.num_tokens} tokens"
    text = f"widths {list(cfg.widths)} x {cfg.num_res_blocks} res blocks"
    return text + (f", iFormer d_h/d {list(cfg.iformer_ratios)}" if cfg.iformer_ratios else "")


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("flops", __doc__)
    p.add_argument("--preset", required=True, help="a preset name, or 'all'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    table = registry.all_presets()
    names = sorted(table) if args.preset == "all" else [args.preset]
    rows = []
    for name in names:
        if name not in table:
            print(f"error: unknown preset {name!r}; choose from {sorted(table)} or 'all'", file=sys.stderr)
            return 2
        family, cfg = table[name]
        cost = denoiser_cost(registry.build(family, cfg), cfg.data_shape, cfg.channels, cfg.num_classes)
        attn = sum(v for k, v in cost.by_op.items() if "bmm" in k)
        rows.append({"preset": name, "params": cost.params, "params_M": round(cost.params / 1e6, 2),
                     "paper_params": registry.paper_params(family).get(name, ""),
                     "gmacs_per_image": round(cost.gmacs, 3),
                     "gflops_per_image": round(cost.gflops, 3), "attention_gflops": round(attn / 1e9, 3),
                     "data_shape": [cfg.channels, *cfg.data_shape], "layout": _describe_preset(cfg)})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'preset':<16}{'params':>10}{'paper':>24}{'GMACs/img':>11}{'GFLOPs/img':>12}{'of which attn':>15}"
              "  shape, layout")
        for r in rows:
            print(f"{r['preset']:<16}{r['params_M']:>9.2f}M{r['paper_params']:>24}{r['gmacs_per_image']:>11.3f}"
                  f"{r['gflops_per_image']:>12.3f}{r['attention_gflops']:>15.3f}  {r['data_shape']}, {r['layout']}")
        print("Forward pass, one image, no self-conditioning input; 2 FLOPs per multiply-add (MAC).")
    return 0
