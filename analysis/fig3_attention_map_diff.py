#!/usr/bin/env python
"""Fig. 3 analogue: what TACA changes in the visual->text attention maps early in denoising.

TACA minus baseline per-token maps (rows: prompt tokens, columns: the first steps), same prompt and
seed, and the per-token summary of how much each token's map changed.

    python analysis/fig3_attention_map_diff.py TACA_STORE BASELINE_STORE --out figures/
    python analysis/fig3_attention_map_diff.py SWEEP_FOLDER --out figures/   # none vs step:1.2@970
    python analysis/fig3_attention_map_diff.py                               # record first

Both stores need maps (`taca-probe record --maps steps=0-3`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from taca_probe import analysis, open_run, open_sweep, plotting  # noqa: E402
from taca_probe.schedules import parse  # noqa: E402
from taca_probe.sweep import is_sweep  # noqa: E402

SCHEDULE = "step:1.2@970"


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "fig3")
    p.add_argument("--schedule", default=SCHEDULE, help=f"TACA schedule of a sweep to compare (default {SCHEDULE})")
    p.add_argument("--sample", type=int, default=0, help="which paired sample to draw")
    p.add_argument("--overlay", action="store_true", help="draw the maps over the decoded image")
    args = p.parse_args(argv)
    first_steps = f"steps=0-{min(3, args.steps - 1)}" if args.steps else "steps=0-3"  # steps that exist
    stores = args.stores or [_common.record(args, schedules=["none", args.schedule], seeds=[0], maps=first_steps,
                                            n_prompts=2)]
    if len(stores) == 1 and is_sweep(stores[0]):
        sweep = open_sweep(stores[0])
        missing = [spec for spec in (parse(args.schedule).spec, "none") if spec not in sweep.attrs["schedules"]]
        if missing:  # sel would raise a KeyError about an index
            p.error(f"the sweep has no schedule {missing[0]!r}; it holds {', '.join(sweep.attrs['schedules'])}")
        treated, baseline = sweep.sel(schedule=parse(args.schedule).spec), sweep.sel(schedule="none")
    elif len(stores) == 2:
        treated, baseline = open_run(stores[0]), open_run(stores[1])
        if analysis.schedule_of(treated) == "none" != analysis.schedule_of(baseline):  # titled "TACA (none)"
            p.error(f"the first store is the stock model (schedule none), the second "
                    f"{analysis.schedule_of(baseline)!r}: give TACA_STORE BASELINE_STORE")
    else:
        p.error("give TACA_STORE BASELINE_STORE, or one sweep folder")
    steps = analysis.recorded_map_steps(treated)[:4] if "maps" in treated else None
    md = analysis.map_difference(treated, baseline, steps=steps)
    fmt = _common.formats(args)
    for name, fig in (
        ("fig3_attention_map_diff", plotting.plot_map_difference(md, sample=args.sample, overlay=args.overlay)),
        ("fig3_token_change", plotting.plot_token_change(md, sample=args.sample)),
    ):
        for path in plotting.save_figure(fig, args.out, name, formats=fmt):
            print(path)
    return 0


if __name__ == "__main__":
    _common.run(main)
