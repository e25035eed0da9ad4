"""``figures`` and ``report``: draw stores and sweeps."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..analysis import GROUP_BY
from ..plotting import FIGURES, FORMATS
from ..rendering import render_figures, report
from ..selection import MAX_INT
from .args import Deprecated, bounded, check_out, comparison_args, int_list, path_arg, positive_int


def add_parsers(sub) -> None:
    fg = sub.add_parser(
        "figures", parents=[comparison_args(2000)],
        help="render the paper's Figs. 2-4 (and a token ranking) from stores or sweep folders as PNG and PDF",
        description="Render, from run stores and/or sweep folders: fig2 (suppression: relative magnitude vs "
        "timestep with CI bands and references, layer x timestep heatmap, timestep slopes, TACA amplification), "
        "fig3 (TACA - baseline per-token attention maps at early steps; needs stores recorded with --maps), "
        "fig4 (gamma sweep: image grid and mass vs gamma0; needs a sweep), fig5 (token ranking). With "
        "--figures all (default) figures the inputs cannot support are skipped with the reason.")
    fg.add_argument("--out", type=path_arg, default="figures", help="output folder (default ./figures)")
    fg.add_argument("--figures", default="all", metavar="LIST", help=f"comma list of {', '.join(FIGURES)}, or all (default)")
    fg.add_argument("--by", default="block_type", choices=list(GROUP_BY),
                    help="layer grouping of the Fig. 2 lines (default block_type)")
    fg.add_argument("--sample", type=int, default=0, help="which paired sample Fig. 3 shows (default 0)")
    fg.add_argument("--map-steps", dest="map_steps", type=int_list, default=None, metavar="LIST",
                    help="Fig. 3 steps, e.g. 0-3 (default: the first steps with maps, at most 4)")
    fg.add_argument("--steps", dest="map_steps", type=int_list, action=Deprecated, new="--map-steps",
                    help=argparse.SUPPRESS)  # --steps means denoising steps in every other command
    rows = fg.add_mutually_exclusive_group()  # --tokens would silently override --max-tokens
    rows.add_argument("--max-tokens", type=positive_int, default=8,
                      help="Fig. 3 rows: this many prompt tokens whose maps changed most (default 8)")
    rows.add_argument("--tokens", default=None, metavar="LIST",
                      help="Fig. 3 rows: these tokens instead, as words or text positions, e.g. red,circle or 2,17")
    fg.add_argument("--overlay", action="store_true", help="Fig. 3: draw the maps over the decoded image")
    fg.add_argument("--format", default="png,pdf", metavar="LIST", help=f"comma list of {', '.join(FORMATS)} (default png,pdf)")
    fg.add_argument("--dpi", type=bounded(10, 1200), default=150, help="PNG resolution (default 150)")
    fg.add_argument("--seed", type=bounded(0, MAX_INT), default=0, help="bootstrap seed (default 0)")
    fg.add_argument("--lazy", action="store_true", help="open stores with dask (for stores larger than memory)")
    fg.set_defaults(func=cmd_figures)

    rp = sub.add_parser(
        "report", parents=[comparison_args(1000)],
        help="write one self-contained interactive HTML page (images, suppression, heat map, map viewer)",
        description="Write DIR/index.html, which opens from disk with no server and no network: the generated "
        "images; visual->text mass over timesteps by block type with 95% intervals and the uniform reference; a "
        "layer x step heat map; for stores with maps, a viewer of the head-mean map of a chosen sample, step, "
        "layer and text token; for a TACA/baseline pair (or a sweep), the same side by side with the difference.")
    rp.add_argument("--out", type=path_arg, default="report", help="output folder (default ./report)")
    rp.set_defaults(func=cmd_report)


def cmd_figures(args: argparse.Namespace) -> int:
    check_out(Path(args.out))
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    res = render_figures(
        args.stores, args.out, figures=args.figures, baseline=args.baseline, treated=args.treated, by=args.by,
        sample=args.sample, steps=args.map_steps, max_tokens=args.max_tokens, overlay=args.overlay, formats=formats,
        tokens=[t.strip() for t in args.tokens.split(",") if t.strip()] if args.tokens else None,
        dpi=args.dpi, n_resamples=args.n_resamples, seed=args.seed, branch=args.branch,
        chunks={} if args.lazy else None,
    )
    # one line per figure (written or skipped), naming the run it was drawn from
    print(f"wrote {len(res['written'])} figure(s) as {', '.join(formats)} to {args.out}/")
    width = max(map(len, res["written"]), default=0)
    for name in res["written"]:
        print(f"  {name:<{width}}  from {res['sources'][name]}")
    for group, reason in res["skipped"].items():
        print(f"  skipped {group}: {reason}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    check_out(Path(args.out))
    t0 = time.perf_counter()
    res = report(args.stores, args.out, baseline=args.baseline, treated=args.treated,
                 n_resamples=args.n_resamples, branch=args.branch)
    print(f"wrote {res.path} ({res.size_bytes / 2**20:.1f} MiB, runs: {', '.join(res.runs)}) in "
          f"{time.perf_counter() - t0:.1f} s; open it in a browser (no server needed)")
    return 0
