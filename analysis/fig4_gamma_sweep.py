#!/usr/bin/env python
"""Fig. 4 analogue: images and visual->text attention across a gamma sweep.

Image grid (rows: prompts, columns: gamma0 at one threshold) and the mass-versus-gamma0 curve with
95% bootstrap CIs, one line per threshold timestep.

    python analysis/fig4_gamma_sweep.py SWEEP_FOLDER --out figures/   # from `taca-probe sweep`
    python analysis/fig4_gamma_sweep.py STORE STORE ... --out figures/ # stores of several schedules
    python analysis/fig4_gamma_sweep.py                               # record the sweep first
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from taca_probe import analysis, open_sweep, plotting, sweep_schedules  # noqa: E402

GAMMA0 = (1.0, 1.1, 1.2, 1.3, 1.5)
T_THRESH = (970.0,)


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "fig4")
    p.add_argument("--gamma0", type=_common.floats, default=",".join(map(str, GAMMA0)),
                   help="gamma0 grid when recording")
    p.add_argument("--t-thresh", type=_common.floats, default=",".join(f"{t:g}" for t in T_THRESH),
                   help="thresholds when recording")
    args = p.parse_args(argv)
    if args.stores:
        source = args.stores[0] if len(args.stores) == 1 else args.stores
    else:
        schedules = sweep_schedules(gamma0=args.gamma0, t_thresh=args.t_thresh)
        source = _common.record(args, schedules=schedules, seeds=[0, 1])
    sweep = open_sweep(source)
    fmt = _common.formats(args)
    for name, fig in (
        ("fig4_gamma_grid", plotting.plot_gamma_grid(analysis.gamma_image_grid(sweep))),
        ("fig4_mass_vs_gamma", plotting.plot_mass_vs_gamma(analysis.mass_vs_gamma(sweep))),
    ):
        for path in plotting.save_figure(fig, args.out, name, formats=fmt):
            print(path)
    return 0


if __name__ == "__main__":
    _common.run(main)
