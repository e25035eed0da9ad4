#!/usr/bin/env python
"""Fig. 2 analogue: how strongly MM-DiT full attention suppresses visual->text attention.

Relative magnitude of full attention against cross-attention (= the visual->text attention mass)
against the timestep, one line per block type with 95% bootstrap CIs, the uniform-attention and
cross-attention references; a layer x timestep heatmap; per-layer timestep slopes.

    python analysis/fig2_suppression.py STORE --out figures/      # a baseline store (schedule none)
    python analysis/fig2_suppression.py                           # record on the default model first
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from taca_probe import analysis, open_run, open_sweep, plotting  # noqa: E402
from taca_probe.sweep import is_sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "fig2")
    p.add_argument("--by", default="block_type", choices=analysis.GROUP_BY, help="layer grouping of the lines")
    args = p.parse_args(argv)
    if len(args.stores) > 1:  # the others would be ignored without a word
        p.error(f"give one STORE or sweep folder, not {len(args.stores)}")
    stores = args.stores or [_common.record(args, schedules=["none"], seeds=range(4))]
    src = Path(stores[0])
    ds = open_sweep(src).isel(schedule=0) if is_sweep(src) else open_run(src)
    fmt = _common.formats(args)
    for name, fig in (
        ("fig2_suppression", plotting.plot_suppression(analysis.suppression(ds, by=args.by))),
        ("fig2_suppression_heatmap", plotting.plot_suppression_heatmap(analysis.suppression(ds, by="layer"))),
        ("fig2_timestep_slope", plotting.plot_timestep_slope(analysis.timestep_awareness(ds, by="layer"))),
    ):
        for path in plotting.save_figure(fig, args.out, name, formats=fmt):
            print(path)
    return 0


if __name__ == "__main__":
    _common.run(main)
