"""From stores to files: :func:`render_figures` writes the matplotlib figures, :func:`report` one interactive page.

The page opens from disk with no server or network: plotly.js is inlined, images are PNG data URIs, the
attention maps travel as base64 float16 and a little JavaScript decodes the one selected for ``Plotly.restyle``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import plotly.graph_objects as go
import seaborn as sns
import xarray as xr
from PIL import Image
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from . import analysis as A
from . import plotting as P
from .errors import TacaProbeError
from .schedules import parse
from .stats import sample_keys
from .store import StoreError, is_store, open_run
from .sweep import SweepError, is_sweep, join_schedules, open_schedules

__all__ = ["Run", "open_inputs", "complete_runs", "choose_runs", "render_figures", "report", "Report", "ReportError"]


class ReportError(TacaProbeError):
    """A report that cannot be built from the given inputs."""


class Run(NamedTuple):
    """One run of the inputs: a store, or one schedule of a sweep (``label`` says which), and its store paths."""

    label: str
    spec: str
    ds: xr.Dataset
    stores: tuple[Path, ...] = ()


def open_inputs(sources: str | os.PathLike | Sequence[str | os.PathLike], chunks: Any = None, *,
                as_sweep: bool = True) -> tuple[list[Run], xr.Dataset | None, str]:
    """The runs of stores and sweep folders, a sweep Dataset (or None) and why there is no sweep.

    A run holds all its schedule's complete samples. With ``as_sweep``, stores and sweep folders are also opened
    together as one sweep on the samples complete in all (which warns of the others; callers of the runs alone pass
    False); a schedule in several inputs is one run of all of them, either way, where they join.
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not sources:
        raise P.FigureError("no input: give one or more stores or sweep folders")
    seen: dict[Path, Any] = {}
    for src in sources:  # one run listed twice would be drawn, compared and counted as two
        key = Path(src).resolve()
        if key in seen:
            raise P.FigureError(f"{str(src)!r} is given twice (also as {str(seen[key])!r}); give each store or "
                                "sweep once")
        seen[key] = src
    runs: list[Run] = []
    sweep = None
    stores: list[str] = []
    folders = 0
    why = "fig4 needs a sweep: a folder written by `taca-probe sweep`, or stores recorded with several schedules"
    for src in sources:
        p = Path(src)
        if is_sweep(p):  # each schedule's run holds its own complete samples: a sweep records one schedule after another
            folders += 1
            label, call, found = open_schedules(p, chunks=chunks)
            runs += [Run(f"{p} [{spec}]", spec, ds, paths) for spec, (ds, _, _, paths) in found.items()]
            if as_sweep and len(sources) == 1:
                sweep = join_schedules(label, call, found, of=" of Fig. 4")  # Figs. 2, 3, 5 use them all
        elif is_store(p):
            ds = open_run(p, chunks=chunks)
            runs.append(Run(str(p), str(ds.attrs.get("schedule", "none")), ds, (p.resolve(),)))
            stores.append(str(p))
        elif not p.exists():
            raise StoreError(f"no store or sweep at {str(p)!r}")
        else:
            raise StoreError(f"{str(p)!r} is neither a taca-probe store nor a sweep folder (no sweep.json)")
    full = [r.spec for r in runs if r.ds.sizes.get("sample", 0)]  # a store of no sample stays one report names
    shared = len(set(full)) < len(full)  # a schedule in two inputs (a sweep grown by a second folder)
    if len(sources) >= 2 and (shared or as_sweep and (folders or len(stores) >= 2)):  # fig4 from every input
        try:
            label, call, found = open_schedules(sources, chunks=chunks)
            sweep = join_schedules(label, call, found, of=" of Fig. 4") if as_sweep else None
        except (SweepError, A.AnalysisError) as e:  # not the first input's alone, named as all of them
            sweep, why = None, f"fig4 needs stores of several schedules on the same prompts and seeds: {e}"
        else:
            if shared:  # one run of both, as figures and report draw it alike
                runs = [Run(f"{label} [{spec}]", spec, ds, paths) for spec, (ds, _, _, paths) in found.items()]
    return runs, sweep, why


def complete_runs(runs: list[Run], left_out: str, error: type[TacaProbeError]) -> list[Run]:
    """The runs that hold a complete sample; the others are named in a warning, or in ``error`` if none does."""
    full = [r for r in runs if r.ds.sizes.get("sample", 0)]
    empty = ", ".join(r.label for r in runs if not r.ds.sizes.get("sample", 0))
    if not full:
        raise error(f"{empty}: no complete sample (the recording finished none; resume it with --resume)")
    if empty:  # else the output would not say that a run it was given is missing
        warnings.warn(f"{empty}: no complete sample; {left_out}")
    return full


def _paired_runs(treated: Run, baseline: Run) -> tuple[Run, Run, str]:
    """Both runs on the samples both hold where they share some (a sweep completes one schedule after another),
    and what a warning says of the others once they compare ("" if none is left out)."""
    kt, kb = sample_keys(treated.ds), sample_keys(baseline.ds)
    both = set(kt) & set(kb)
    if not both or len(both) == len(kt) == len(kb):  # else pair_samples says why they do not pair
        return treated, baseline, ""
    return (treated._replace(ds=treated.ds.isel(sample=[i for i, k in enumerate(kt) if k in both])),
            baseline._replace(ds=baseline.ds.isel(sample=[i for i, k in enumerate(kb) if k in both])),
            f"{treated.label} and {baseline.label} are compared on the {len(both)} sample(s) both hold; "
            f"{len(kt) + len(kb) - 2 * len(both)} other(s) left out of the comparison")


def _find_run(runs: list[Run], key: str, what: str) -> Run:
    for run in runs:
        if key in (run.label, run.spec) or Path(run.label) == Path(key) or Path(key).resolve() in run.stores:
            return run
    try:
        canonical = parse(key).spec
    except TacaProbeError:
        canonical = None
    for run in runs:
        if run.spec == canonical:
            return run
    raise P.FigureError(f"--{what} {key!r} matches no input; inputs: "
                        + ", ".join(f"{r.label} ({r.spec})" for r in runs))


def choose_runs(runs: list[Run], *, baseline: str | None = None, treated: str | None = None,
                ) -> tuple[Run | None, Run | None]:
    """(baseline, treated): the runs named (a store path or a schedule spec), else the run with an
    identity schedule and ``step:1.2@970`` if present, else the first other schedule."""
    base = (_find_run(runs, baseline, "baseline") if baseline is not None
            else next((r for r in runs if parse(r.spec).is_identity), None))
    if treated is not None:
        treat = _find_run(runs, treated, "treated")
        if treat is base:  # every difference would be zero
            raise P.FigureError(f"baseline and treated name the same run, {base.label!r}; name two different runs")
        return base, treat
    others = [r for r in runs if r is not base and not parse(r.spec).is_identity]
    return base, next((r for r in others if r.spec == "step:1.2@970"), others[0] if others else None)


def render_figures(sources: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   figures: str | Sequence[str] = "all", baseline: str | None = None, treated: str | None = None,
                   by: str = "block_type", sample: int = 0, steps: Sequence[int] | None = None, max_tokens: int = 8,
                   tokens: Sequence[int | str] | None = None, overlay: bool = False,
                   formats: Sequence[str] = ("png", "pdf"), dpi: int = 150, n_resamples: int = 2000, seed: int = 0,
                   branch: str | None = None, chunks: Any = None, log: Any = None) -> dict[str, Any]:
    """Write every figure the inputs (run stores and/or sweep folders) allow, or the ones asked for.

    ``figures``: ``"all"`` (a figure the inputs cannot support is skipped with its reason) or
    :data:`~taca_probe.plotting.FIGURES` keys (one that cannot be drawn raises). ``baseline`` /
    ``treated``: store paths or schedule specs (defaults: :func:`choose_runs`). ``by``: grouping
    of the Fig. 2 lines. ``sample``, ``steps`` (default the first 4 with maps), ``max_tokens`` /
    ``tokens``, ``overlay``: Fig. 3. ``n_resamples``, ``seed``, ``branch``: analysis options;
    ``chunks``: ``{}`` opens with dask; ``log``: called with one line per figure written or skipped.

    Returns ``{"written": {name: [paths]}, "skipped": {group: reason}, "sources": {name: run(s)}}``.
    """
    if isinstance(figures, str):
        wanted = list(P.FIGURES) if figures == "all" else [f.strip() for f in figures.split(",") if f.strip()]
        explicit = figures != "all"
    else:
        wanted, explicit = list(figures), True
    bad = [f for f in wanted if f not in P.FIGURES]
    if bad or not wanted:
        raise P.FigureError(f"unknown figure(s) {', '.join(bad) or '(none)'}; choose from all, {', '.join(P.FIGURES)}")
    fmt = P.check_formats(formats)
    A.choice(by, A.GROUP_BY, "grouping 'by'")
    say = log or (lambda msg: None)
    stats = {"n_resamples": n_resamples, "seed": seed, "branch": branch}

    runs, sweep, why_no_sweep = open_inputs(sources, chunks)
    runs = complete_runs(runs, "left out of the figures", P.FigureError)
    base_run, treat_run = choose_runs(runs, baseline=baseline, treated=treated)
    main_run = base_run or runs[0]
    written: dict[str, list[Path]] = {}
    skipped: dict[str, str] = {}
    used: dict[str, str] = {}

    def what(run: Run) -> str:
        return f"{run.label} ({run.spec})" if run.label != run.spec and f"[{run.spec}]" not in run.label else run.label

    drawn: list[tuple[str, Any, str]] = []  # saved once all are drawn

    def emit(name: str, fig, source: str) -> None:
        drawn.append((name, fig, source))

    def skip(group: str, reason: str) -> None:
        if explicit:
            raise P.FigureError(reason)
        skipped[group] = reason
        say(f"skipped {group}: {reason}")

    ds, src = main_run.ds, what(main_run)
    if "fig2" in wanted:
        A.require(ds, "vis_txt_mass", needed_for="Fig. 2", label=main_run.label)
        emit("fig2_suppression", P.plot_suppression(A.suppression(ds, by=by, **stats)), src)
        emit("fig2_suppression_heatmap", P.plot_suppression_heatmap(A.suppression(ds, by="layer", **stats)), src)
        emit("fig2_timestep_slope", P.plot_timestep_slope(A.timestep_awareness(ds, by="layer", **stats)), src)
        if treat_run is not None:
            emit("fig2_amplification", P.plot_amplification(A.amplification(treat_run.ds, by=by, **stats)),
                 what(treat_run))
    if "fig3" in wanted:
        if base_run is None or treat_run is None:
            skip("fig3", "fig3 needs a TACA store and a baseline store (schedule none) recorded with the same "
                         "prompts and seeds and with --maps; give both (or a sweep folder), or name them with "
                         "--baseline/--treated")
        else:
            try:
                for run in (treat_run, base_run):
                    A.require(run.ds, "maps", needed_for="Fig. 3 (attention-map differences)", label=run.label)
                t, b, unpaired = _paired_runs(treat_run, base_run)
                common = [s for s in A.recorded_map_steps(t.ds) if s in set(A.recorded_map_steps(b.ds))]
                md = A.map_difference(t.ds, b.ds, steps=list(steps) if steps is not None else common[:4], branch=branch)
            except A.AnalysisError as e:
                skip("fig3", str(e))
            else:
                if unpaired:
                    warnings.warn(unpaired)
                pair = f"{what(treat_run)} − {what(base_run)}"
                emit("fig3_attention_map_diff", P.plot_map_difference(md, sample=sample, max_tokens=max_tokens,
                                                                    tokens=tokens, overlay=overlay), pair)
                emit("fig3_token_change", P.plot_token_change(md, sample=sample, tokens=tokens), pair)
    if "fig4" in wanted:
        if sweep is None or sweep.sizes.get("schedule", 0) < 2:
            skip("fig4", why_no_sweep if sweep is None else "fig4 needs at least two schedules in the sweep")
        elif not sweep.sizes.get("sample", 0):  # a store of no complete sample leaves none complete in all
            skip("fig4", "fig4 needs samples complete in every schedule's store; these inputs have none")
        else:
            specs = f"the sweep ({', '.join(str(v) for v in sweep['schedule'].values)})"
            emit("fig4_gamma_grid", P.plot_gamma_grid(A.gamma_image_grid(sweep)), specs)
            emit("fig4_mass_vs_gamma", P.plot_mass_vs_gamma(A.mass_vs_gamma(sweep, by="all", **stats)), specs)
    if "fig5" in wanted:
        emit("fig5_token_ranking", P.plot_token_ranking(A.token_ranking(ds, branch=branch)), src)
    if not drawn:
        raise P.FigureError("no figure could be drawn: " + "; ".join(skipped.values()))
    # every file rendered before any is written: a figure that fails to render leaves no others behind
    files = [(name, source, P.figure_files(fig, out, name, formats=fmt, dpi=dpi)) for name, fig, source in drawn]
    for name, source, rendered in files:
        written[name] = P.write_files(rendered)
        used[name] = source
        say(f"wrote {', '.join(str(p) for p in written[name])} from {source}")
    return {"written": written, "skipped": skipped, "sources": used}


_COLORS = sns.color_palette(P.PALETTE).as_hex()  # the PNG figures' palette
_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


@dataclass
class Report:
    """The written page: ``path`` (``DIR/index.html``) and its size; shows inline in Jupyter."""

    path: Path
    size_bytes: int
    runs: list[str]

    def _repr_html_(self) -> str:
        # srcdoc keeps the page's scripts in their own document, as when opened from disk
        doc = html.escape(self.path.read_text(encoding="utf-8"), quote=True)
        return f'<iframe srcdoc="{doc}" style="width:100%;height:1100px;border:1px solid #ccc"></iframe>'


def _png_uri(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _line_with_band(fig: go.Figure, t: np.ndarray, res: xr.Dataset, names: tuple[str, str, str], name: str,
                    color: str, hover: str, *, dash: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A line with its CI band (a missing bound collapses onto the line); returns the band's bounds."""
    mean, lo, hi = (np.asarray(res[v].values, float) for v in names)
    lo, hi = np.where(np.isfinite(lo), lo, mean), np.where(np.isfinite(hi), hi, mean)
    group = name if dash else None  # the suppression lines toggle with their bands
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))  # translucent, so that overlapping bands stay readable
    fig.add_trace(go.Scatter(x=np.concatenate([t, t[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                             fillcolor=f"rgba({r},{g},{b},0.2)", line={"width": 0}, hoverinfo="skip", showlegend=False,
                             legendgroup=group))
    fig.add_trace(go.Scatter(x=t, y=mean, mode="lines+markers", name=name, legendgroup=group,
                             line={"color": color, **({"dash": dash} if dash else {})},
                             hovertemplate=f"t=%{{x:.0f}}<br>{hover}<extra>{html.escape(name)}</extra>"))
    return lo, hi


def _suppression_figure(runs: list[Run], stats: dict[str, Any]) -> go.Figure:
    """Visual->text mass against timestep, one line per (run, block type), CI bands, uniform reference."""
    fig = go.Figure()
    uniforms = set()  # one per token count: runs of another max_sequence_length have their own
    lo_all, hi_all = [], []
    for r, (label, spec, ds, _) in enumerate(runs):
        res = A.suppression(ds, by="block_type", **stats)
        uniforms |= {float(res["uniform_reference"])} if "uniform_reference" in res else set()
        t = np.asarray(res["timestep"].values, float)
        for g, bt in enumerate(str(v) for v in res["block_type"].values):
            lo, hi = _line_with_band(fig, t, res.sel(block_type=bt), ("mean", "ci_low", "ci_high"), f"{spec} · {bt}",
                                     _COLORS[(r * 3 + g) % len(_COLORS)], "mass %{y:.4f}", dash=_DASHES[r % len(_DASHES)])
            lo_all.append(np.nanmin(lo))
            hi_all.append(np.nanmax(hi))
    ns = [r.ds.sizes.get("sample", 0) for r in runs]  # runs need not hold as many samples
    n = f"{ns[0]} per run" if len(set(ns)) == 1 else ", ".join(f"{k} ({r.spec})" for k, r in zip(ns, runs))
    for uniform in sorted(uniforms):
        fig.add_hline(y=uniform, line={"color": "#555", "dash": "dash"},
                      annotation_text=f"uniform attention N_txt/(N_txt+N_vis) = {uniform:.3g}",
                      annotation_position="top left")
        lo_all.append(uniform)
        hi_all.append(uniform)
    # fit the data and the uniform reference, not 0-1: the masses sit in a narrow band
    lo, hi = float(np.nanmin(lo_all)), float(np.nanmax(hi_all))
    pad = 0.08 * (hi - lo or abs(hi) or 1.0)
    fig.update_layout(
        title=f"Visual→text attention mass over timesteps by block type (95% bootstrap CI; n = {n})",
        xaxis={"title": "timestep t (1000 = pure noise; denoising runs left to right)", "autorange": "reversed"},
        yaxis={"title": "visual→text attention mass (fraction)", "range": [lo - pad, hi + pad]},
        height=460, margin={"t": 60, "l": 70, "r": 20, "b": 60}, legend={"title": "run · block type"},
    )
    return fig


def _difference_figure(treated: Run, baseline: Run, stats: dict[str, Any]) -> go.Figure:
    """Paired TACA - baseline difference of the mass over timesteps, per block type, with 95% CIs."""
    res = A.compare_runs(treated.ds, baseline.ds, by="block_type", **stats)
    t = np.asarray(res["timestep"].values, float)
    fig = go.Figure()
    for g, bt in enumerate(str(v) for v in res["block_type"].values):
        _line_with_band(fig, t, res.sel(block_type=bt), ("diff", "diff_ci_low", "diff_ci_high"), bt,
                        _COLORS[g % len(_COLORS)], "Δ mass %{y:+.4f}")
    fig.add_hline(y=0, line={"color": "#555", "dash": "dot"})
    fig.update_layout(
        title=f"{treated.spec} − {baseline.spec}: paired difference of the visual→text mass "
              f"(95% bootstrap CI; n = {res.attrs.get('n_pairs')} pairs)",
        xaxis={"title": "timestep t", "autorange": "reversed"},
        yaxis={"title": "Δ visual→text mass"}, height=360, margin={"t": 60, "l": 70, "r": 20, "b": 60},
        legend={"title": "block type"})
    return fig


def _heatmap_figure(runs: list[Run], pair: tuple[Run, Run] | None, branch: str | None) -> go.Figure:
    """Layer x step mean mass per run, and treated - baseline (on the samples they pair on) where a pair exists."""
    def mean(r: Run) -> np.ndarray:
        return np.asarray(A._select_branch(r.ds, branch)["vis_txt_mass"].mean(("sample", "head"))
                          .transpose("layer", "step").values, float)
    means = [mean(r) for r in runs]
    titles = [r.spec for r in runs]
    if pair is not None:
        means.append(mean(pair[0]) - mean(pair[1]))
        titles.append(f"{pair[0].spec} − {pair[1].spec}")
    fig = make_subplots(rows=1, cols=len(means), subplot_titles=titles, horizontal_spacing=0.1)
    vmin = min(float(np.nanmin(m)) for m in means[: len(runs)])
    vmax = max(float(np.nanmax(m)) for m in means[: len(runs)])
    for c, m in enumerate(means, 1):
        is_diff = pair is not None and c == len(means)
        ds = (pair[0] if is_diff else runs[c - 1]).ds  # each panel's own axes: runs may differ in steps and layers
        layers = [P.short_layer(str(n), str(b)) for n, b in zip(ds["layer"].values, ds["block_type"].values)]
        # the step in the label: a Heun scheduler passes each timestep twice, and equal categories would merge
        t = np.asarray(ds["timestep"].isel(sample=0).values, float)
        x = [f"{v:.0f} ({s})" for s, v in zip(ds["step"].values, t)]
        bar_x = fig.layout[f"xaxis{c if c > 1 else ''}"].domain[1] + 0.005
        kw: dict[str, Any] = ({"colorscale": "RdBu_r", "zmid": 0.0} if is_diff
                              else {"colorscale": "Viridis", "zmin": vmin, "zmax": vmax})
        fig.add_trace(go.Heatmap(z=m, x=x, y=layers, showscale=is_diff or c == len(runs),
                                 colorbar={"x": bar_x, "len": 0.9,
                                           "title": "diff" if is_diff else "mass", "thickness": 10},
                                 hovertemplate="t (step) %{x}<br>%{y}<br>%{z:.4f}<extra></extra>", **kw), row=1, col=c)
        fig.update_xaxes(title_text="timestep t (step)", row=1, col=c, type="category", nticks=8)
        fig.update_yaxes(autorange="reversed", row=1, col=c, type="category", showticklabels=c == 1)
    fig.update_layout(title="Visual→text attention mass per layer and timestep (mean over heads and samples)",
                      height=360, margin={"t": 80, "l": 90, "r": 30, "b": 60})
    return fig


def _map_viewer(runs: list[Run], base_index: int | None, treated_index: int | None,
                branch: str | None) -> tuple[dict[str, Any] | None, go.Figure | None]:
    """Data and the Plotly figure of the map viewer (None without maps)."""
    with_maps = [i for i, run in enumerate(runs) if "maps" in run.ds]
    if not with_maps:
        return None, None
    # one layout decodes every run's maps: a run of other tokens or latent size is left out of the viewer
    size = {d: runs[with_maps[0]].ds.sizes[d] for d in ("token", "y", "x")}
    with_maps = [i for i in with_maps if all(runs[i].ds.sizes[d] == n for d, n in size.items())]
    common = sample_keys(runs[with_maps[0]].ds)
    for i in with_maps[1:]:
        other = set(sample_keys(runs[i].ds))
        kept = [k for k in common if k in other]
        if kept:
            common = kept
    viewer = [i for i in with_maps if set(common) <= set(sample_keys(runs[i].ds))]
    ref = runs[viewer[0]].ds
    steps, layers = A.recorded_map_steps(ref), A.recorded_map_layers(ref)
    for i in viewer[1:]:
        steps = [s for s in steps if s in set(A.recorded_map_steps(runs[i].ds))]
        layers = [name for name in layers if name in set(A.recorded_map_layers(runs[i].ds))]
    if not steps or not layers:
        return None, None
    ref_pos = {k: j for j, k in enumerate(sample_keys(ref))}
    ref_idx = [ref_pos[k] for k in common]
    text = np.asarray(ref["token_text"].values)[ref_idx]
    padding = np.asarray(ref["token_is_padding"].values, bool)[ref_idx] if "token_is_padding" in ref else np.zeros(text.shape, bool)
    source = [str(s) for s in ref["token_source"].values] if "token_source" in ref.coords else [None] * text.shape[1]
    layer_bt = dict(zip((str(v) for v in ref["layer"].values), (str(v) for v in ref["block_type"].values)))
    maps_b64, images, recorded = {}, {}, None
    for i in viewer:
        ds = A._select_branch(runs[i].ds, branch)
        pos = {k: j for j, k in enumerate(sample_keys(ds))}
        idx = [pos[k] for k in common]
        arr = ds["maps"].isel(sample=idx).sel(step=steps, layer=layers).transpose("sample", "step", "layer", "token", "y", "x")
        values = np.ascontiguousarray(np.asarray(arr.values, dtype="<f2"))
        maps_b64[str(i)] = base64.b64encode(values.tobytes()).decode("ascii")
        rec = np.isfinite(values).any(axis=(1, 2, 4, 5))  # (sample, token): recorded somewhere
        recorded = rec if recorded is None else recorded & rec
        images[str(i)] = [_png_uri(ds["image"].isel(sample=j).values) for j in idx]
    ny, nx = ref.sizes["y"], ref.sizes["x"]
    t = np.asarray(ref["timestep"].isel(sample=ref_idx[0]).values, float)
    step_pos = {int(s): j for j, s in enumerate(ref["step"].values)}
    data = {
        "runs": [{"index": i, "label": runs[i].label, "spec": runs[i].spec} for i in viewer],
        "baseline": base_index if base_index in viewer else None,
        "treated": treated_index if treated_index in viewer else viewer[0],
        "samples": [{"prompt": p, "seed": s, "batch_index": b,
                     "tokens": [{"pos": q, "label": P.token_label(text[j, q], source[q], q),
                                 "padding": bool(padding[j, q]), "recorded": bool(recorded[j, q])}
                                for q in range(text.shape[1])]}
                    for j, (p, s, b) in enumerate(common)],
        "steps": [{"step": int(s), "timestep": float(t[step_pos[int(s)]])} for s in steps],
        "layers": [{"name": n, "label": P.short_layer(n, layer_bt.get(n))} for n in layers],
        "shape": [len(common), len(steps), len(layers), int(text.shape[1]), int(ny), int(nx)],
        "maps": maps_b64,
        "images": images,
    }
    panels = ["selected run"] + (["baseline", "selected − baseline"] if data["baseline"] is not None else [])
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels, horizontal_spacing=0.11)
    empty = np.full((ny, nx), np.nan)
    for c, name in enumerate(panels, 1):
        kw: dict[str, Any] = {"colorscale": "RdBu_r", "zmid": 0.0} if c == 3 else {"colorscale": "Viridis"}
        right = fig.layout[f"xaxis{c if c > 1 else ''}"].domain[1]
        fig.add_trace(go.Heatmap(z=empty, name=name, colorbar={"x": right + 0.005, "len": 0.8, "thickness": 10},
                                 hovertemplate="y=%{y} x=%{x}<br>%{z:.4g}<extra>" + name + "</extra>", **kw),
                      row=1, col=c)
        fig.update_xaxes(title_text="latent x", row=1, col=c, constrain="domain")
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{c if c > 1 else ''}", row=1, col=c, constrain="domain")
    fig.update_layout(height=380, margin={"t": 50, "l": 40, "r": 30, "b": 50})
    return data, fig


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.2em 2em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;width:150px;font-size:0.78em}
.gallery img,#view-image{image-rendering:pixelated;width:128px;height:128px;border:1px solid #ccc}
.controls label{margin-right:1em;font-size:0.9em}.controls select{margin-left:0.3em}
.viewer{display:flex;gap:1em;align-items:flex-start}.viewer>div.plot{flex:1}
.note{color:#555;font-size:0.85em}table.meta td{padding:0 1em 0 0;font-size:0.85em;vertical-align:top}
"""

# The viewer's selection logic: decode the chosen float16 map(s) and restyle the Plotly heatmaps.
_JS = r"""
(function () {
  const D = JSON.parse(document.getElementById('taca-data').textContent);
  const $ = (id) => document.getElementById(id);
  const bytes = {};
  for (const k in D.maps) bytes[k] = new Uint16Array(Uint8Array.from(atob(D.maps[k]), (c) => c.charCodeAt(0)).buffer);
  function half(h) {  // IEEE 754 binary16 -> number
    const s = (h & 0x8000) ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * Math.pow(2, e - 15) * (1 + f / 1024);
  }
  const [NS, NST, NL, NT, NY, NX] = D.shape;
  function map(run, sample, step, layer, token) {
    const off = ((((sample * NST + step) * NL + layer) * NT + token) * NY * NX), a = bytes[String(run)];
    return Array.from({length: NY}, (_, y) => Array.from({length: NX}, (_, x) => half(a[off + y * NX + x])));
  }
  function fill(sel, items) {
    const old = sel.value; sel.innerHTML = '';
    for (const [v, t] of items) { const o = document.createElement('option'); o.value = v; o.textContent = t; sel.appendChild(o); }
    if ([...sel.options].some((o) => o.value === old)) sel.value = old;
  }
  fill($('sel-run'), D.runs.map((r) => [r.index, r.spec + (r.index === D.baseline ? ' (baseline)' : '')]));
  $('sel-run').value = String(D.treated);
  fill($('sel-sample'), D.samples.map((s, i) => [i, `${s.prompt} · seed ${s.seed}` + (s.batch_index ? ` #${s.batch_index}` : '')]));
  fill($('sel-step'), D.steps.map((s, i) => [i, `step ${s.step} (t = ${s.timestep.toFixed(0)})`]));
  fill($('sel-layer'), D.layers.map((l, i) => [i, l.label]));
  function tokens() {
    const s = D.samples[+$('sel-sample').value], pad = $('show-padding').checked;
    fill($('sel-token'), s.tokens.filter((t) => t.recorded && (pad || !t.padding)).map((t) => [t.pos, t.label]));
  }
  function update() {
    const run = +$('sel-run').value, i = +$('sel-sample').value, st = +$('sel-step').value;
    const l = +$('sel-layer').value, tok = +$('sel-token').value;
    const zs = [map(run, i, st, l, tok)];
    if (D.baseline !== null) {
      const b = map(D.baseline, i, st, l, tok);
      zs.push(b, zs[0].map((row, y) => row.map((v, x) => Math.fround(v) - Math.fround(b[y][x]))));
    }
    // the run and the baseline share one colour scale, so that their maps compare by eye
    let top = 0;
    for (const z of zs.slice(0, 2)) for (const row of z) for (const v of row) if (v > top) top = v;
    Plotly.restyle('map-view', {z: zs}, zs.map((_, k) => k));
    Plotly.restyle('map-view', {zmin: 0, zmax: top || 1}, zs.length === 3 ? [0, 1] : [0]);
    $('view-image').src = D.images[String(run)][i];
    const s = D.samples[i], t = s.tokens[tok];
    $('view-caption').textContent = `${D.runs.find((r) => r.index === run).spec} · ${s.prompt} · seed ${s.seed} · ` +
      `step ${D.steps[st].step} (t = ${D.steps[st].timestep.toFixed(0)}) · ${D.layers[l].label} · token ${t.label}`;
    window.tacaReport.selection = {run, sample: i, step: D.steps[st].step, layer: D.layers[l].name, token: tok};
  }
  window.tacaReport = {data: D, update};
  $('sel-sample').addEventListener('change', () => { tokens(); update(); });
  $('show-padding').addEventListener('change', () => { tokens(); update(); });
  for (const id of ['sel-run', 'sel-step', 'sel-layer', 'sel-token']) $(id).addEventListener('change', update);
  tokens(); update();
})();
"""


def _div(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def report(sources: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
           baseline: str | None = None, treated: str | None = None, n_resamples: int = 1000, seed: int = 0,
           branch: str | None = None) -> Report:
    """Write ``out/index.html``: images, suppression with CIs, layer x step heat map, map viewer.

    ``sources``, ``baseline``, ``treated`` as for :func:`render_figures`; ``n_resamples``, ``seed``,
    ``branch``: analysis options. The returned :class:`Report` displays the page in Jupyter.
    """
    runs = complete_runs(open_inputs(sources, as_sweep=False)[0], "left out of the page", ReportError)
    base, treat = choose_runs(runs, baseline=baseline or None, treated=treated or None)
    bi = next((i for i, r in enumerate(runs) if r is base), None)
    ti = next((i for i, r in enumerate(runs) if r is treat), None)
    pair = None
    if bi is not None and ti is not None:
        t, b, unpaired = _paired_runs(runs[ti], runs[bi])
        try:
            A.pair_samples(t.ds, b.ds)
            A._check_same_structure(t.ds, b.ds, ("layer", "step"))
            pair = (t, b)
        except A.AnalysisError:
            pass  # no pair: the page shows each run alone
        else:
            if unpaired:
                warnings.warn(unpaired)
    stats = {"n_resamples": n_resamples, "seed": seed, "branch": branch}

    gallery = []
    for label, spec, ds, _ in runs:
        figs = "".join(
            f'<figure><img src="{_png_uri(ds["image"].isel(sample=j).values)}" alt="{html.escape(str(p))}">'
            f"<figcaption>{html.escape(str(p))}<br>seed {int(s)}</figcaption></figure>"
            for j, (p, s, _) in enumerate(sample_keys(ds)))
        gallery.append(f"<h3>{html.escape(spec)} <span class='note'>{html.escape(label)}</span></h3>"
                       f"<div class='gallery'>{figs}</div>")
    sections = ["<h2>Generated images</h2>" + "".join(gallery)]
    sections.append("<h2>Suppression: visual→text attention over timesteps</h2>"
                    + _div(_suppression_figure(runs, stats), "suppression")
                    + "<p class='note'>Dashed line: the mass that uniform attention over all keys would put on "
                      "text. Cross-attention alone (text keys only) would give 1, far above this axis.</p>")
    if pair is not None:
        sections.append(_div(_difference_figure(*pair, stats), "difference"))
    sections.append("<h2>Layer × timestep</h2>" + _div(_heatmap_figure(runs, pair, branch), "heatmap"))
    data, viewer = _map_viewer(runs, bi, ti, branch)
    script = ""
    if data is not None:
        sections.append(
            "<h2>Attention maps</h2><p class='note'>Head-mean attention from each image token (latent grid) to the "
            "chosen text token. Padding tokens are hidden unless shown below.</p>"
            "<div class='controls'>"
            "<label>run<select id='sel-run'></select></label><label>sample<select id='sel-sample'></select></label>"
            "<label>step<select id='sel-step'></select></label><label>layer<select id='sel-layer'></select></label>"
            "<label>token<select id='sel-token'></select></label>"
            "<label><input type='checkbox' id='show-padding'> show padding tokens</label></div>"
            "<div class='viewer'><figure style='margin:0'><img id='view-image' alt='generated image'>"
            "<figcaption id='view-caption' class='note' style='width:200px'></figcaption></figure>"
            f"<div class='plot'>{_div(viewer, 'map-view')}</div></div>")
        # no '<' at all: '<!--<script>' in a prompt would make the parser run past this element's '</script>'
        payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
        script = f"<script type='application/json' id='taca-data'>{payload}</script><script>{_JS}</script>"
    else:
        sections.append("<h2>Attention maps</h2><p class='note'>No maps in these runs: record with "
                        "<code>--maps steps=0-4</code> to get the map viewer.</p>")
    ds0 = runs[0].ds
    meta = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(ds0.attrs.get(k)))}</td></tr>"
                   for k in ("model", "pipeline_class", "steps", "height", "width", "guidance", "n_txt", "n_vis")
                   if k in ds0.attrs)
    pair_text = (f"compared: <b>{html.escape(pair[0].spec)}</b> against the baseline "
                 f"<b>{html.escape(pair[1].spec)}</b>" if pair else "no TACA/baseline pair in the inputs")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>taca-probe report</title>"
        f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>"
        f"<h1>taca-probe report</h1><p>{len(runs)} run(s): "
        + ", ".join(f"<b>{html.escape(spec)}</b> ({r.ds.sizes['sample']} samples)" for r in runs for spec in [r.spec])
        + f"; {pair_text}.</p><table class='meta'>{meta}</table>"
        + "".join(sections) + script + "</body></html>"
    )
    path = Path(out) / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".index.html.tmp")
    try:  # a failed write (disk full) leaves an earlier page whole; a path that is not UTF-8 shows as '?'
        tmp.write_text(page, encoding="utf-8", errors="replace")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Report(path=path, size_bytes=path.stat().st_size, runs=[r.spec for r in runs])
