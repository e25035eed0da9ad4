#!/usr/bin/env python
"""Token ranking: which prompt tokens receive the most visual attention (padding separately).

    python analysis/fig5_token_ranking.py STORE --out figures/
    python analysis/fig5_token_ranking.py           # record on the default model first
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from taca_probe import analysis, open_run, open_sweep, plotting  # noqa: E402
from taca_probe.sweep import is_sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "fig2")  # shares the baseline recording of fig2
    p.add_argument("--top", type=int, default=10, help="tokens per prompt")
    args = p.parse_args(argv)
    if len(args.stores) > 1:  # the others would be ignored without a word
        p.error(f"give one STORE or sweep folder, not {len(args.stores)}")
    stores = args.stores or [_common.record(args, schedules=["none"], seeds=range(4))]
    src = Path(stores[0])
    ds = open_sweep(src).isel(schedule=0) if is_sweep(src) else open_run(src)
    fig = plotting.plot_token_ranking(analysis.token_ranking(ds, top=args.top))
    for path in plotting.save_figure(fig, args.out, "fig5_token_ranking", formats=_common.formats(args)):
        print(path)
    return 0


if __name__ == "__main__":
    _common.run(main)
