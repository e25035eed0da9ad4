"""Figures for people: each ``plot_*`` takes an analysis result and returns a matplotlib Figure.

Figures are built without pyplot (no global state); titles give what is shown and the number of samples,
palettes are colour-blind safe. Writing every figure of a run is :func:`taca_probe.rendering.render_figures`.
"""

from __future__ import annotations

import functools
import io
import os
import re
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .analysis import branch_of, on_grid, readable_token, schedule_of
from .errors import TacaProbeError
from .selection import index_list, positive_int

__all__ = ["FIGURES", "FORMATS", "PALETTE", "DIVERGING_CMAP", "SEQUENTIAL_CMAP", "FigureError", "plot_suppression",
           "plot_suppression_heatmap", "plot_timestep_slope", "plot_amplification", "plot_map_difference",
           "plot_token_change", "plot_gamma_grid", "plot_mass_vs_gamma", "plot_token_ranking", "save_figure",
           "short_layer", "token_label"]

#: Figure groups (``taca-probe figures --figures``) and the files each writes.
FIGURES: dict[str, tuple[str, ...]] = {
    "fig2": ("fig2_suppression", "fig2_suppression_heatmap", "fig2_timestep_slope", "fig2_amplification"),
    "fig3": ("fig3_attention_map_diff", "fig3_token_change"),
    "fig4": ("fig4_gamma_grid", "fig4_mass_vs_gamma"),
    "fig5": ("fig5_token_ranking",),
}
#: File formats :func:`save_figure` writes.
FORMATS = ("png", "pdf", "svg")
#: Qualitative palette (colour-blind safe).
PALETTE = "colorblind"
#: Colormap of differences, always centred at 0.
DIVERGING_CMAP = "RdBu_r"
#: Colormap of magnitudes.
SEQUENTIAL_CMAP = "viridis"

_MASS_LABEL = "visual→text attention mass"


class FigureError(TacaProbeError):
    """A figure that cannot be drawn from the given inputs."""


def _styled(plot):
    """Draw ``plot`` in seaborn's whitegrid look (no global change), without seaborn's deprecation chatter."""
    @functools.wraps(plot)
    def styled(*args, **kwargs):
        rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.15),
              "axes.titleweight": "bold", "figure.dpi": 100,
              "text.parse_math": False}  # prompts and tokens are plain text: '$5 and $6' is no formula
        with matplotlib.rc_context(rc), warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            return plot(*args, **kwargs)
    return styled


def _figure(width: float, height: float):
    return Figure(figsize=(width, height), layout="constrained")


def _colors(n: int) -> list:
    return sns.color_palette(PALETTE, n) if n <= 10 else sns.color_palette(SEQUENTIAL_CMAP, n)


def _group_dim(res: xr.Dataset | xr.DataArray, *, expect: Sequence[str] = ("step",)) -> str | None:
    """The layer-group dimension of a result; refuses results with other extra dims (e.g. a sweep's)."""
    by = res.attrs.get("by")
    gdim = by if by in res.dims else None
    var = res["mean"] if isinstance(res, xr.Dataset) and "mean" in res else res
    extra = [d for d in var.dims if d != gdim and d not in expect]
    if extra:
        raise FigureError(f"the result has the extra dimension(s) {', '.join(map(str, extra))}; select one first, "
                          f"e.g. result.isel({extra[0]}=0) (or analyse ds.sel({extra[0]}=...))")
    return gdim


def _needs(res: Any, plot: str, made_by: str, *names: str) -> None:
    """Refuse what ``made_by`` did not return: one FigureError naming what it is, not a KeyError from inside."""
    have = set(res.variables) | set(res.dims) if isinstance(res, xr.Dataset) else \
        set(res.coords) | set(res.dims) if isinstance(res, xr.DataArray) else set()
    missing = [n for n in names if n not in have]
    if missing:
        what = (f"a {res.attrs['quantity']!r} result" if isinstance(getattr(res, "attrs", None), dict)
                and "quantity" in res.attrs else f"a {type(res).__name__}")
        raise FigureError(f"{plot} draws the result of taca_probe.analysis.{made_by}; got {what} without "
                          f"{missing[0]!r}")


def _samples_text(attrs: dict) -> str:
    n = attrs.get("n_samples")
    n = int(n) if n is not None else 0
    return f"n = {n} sample" + ("" if n == 1 else "s")


def _about(res: xr.Dataset) -> str:
    # a sweep result's .isel(schedule=i) names its schedule in the scalar coordinate, not the attribute
    return f"{res.attrs.get('model', '')}, schedule {schedule_of(res) or 'none'}{_branch(res)}"


def _branch(res: xr.Dataset) -> str:
    """``", uncond branch"`` for a result of the unconditional CFG branch; nothing for the usual cond."""
    branch = branch_of(res)
    return "" if branch == "cond" else f", {branch} branch"


def _coord(obj: xr.Dataset | xr.DataArray, name: str, default: Any) -> Any:
    return np.asarray(obj[name].values, float) if name in obj.coords else default


def short_layer(name: str, block_type: str | None = None) -> str:
    """``transformer_blocks.3.attn`` -> ``joint 3``; ``single_transformer_blocks.5.attn`` -> ``single 5``."""
    m = re.search(r"(\d+)", name)
    idx = m.group(1) if m else name
    if block_type is None:
        block_type = "single" if name.startswith("single") else "joint"
    suffix = "" if name.endswith(".attn") or not m else " " + name.rsplit(".", 1)[-1]
    return f"{block_type} {idx}{suffix}"


def _group_lines(res: xr.Dataset, height: float, default_group: str):
    """A figure with one line per layer group (CI band) over the timestep axis: ``(fig, ax, gdim, t)``."""
    gdim = _group_dim(res)
    groups = [str(g) for g in res[gdim].values] if gdim else [default_group]
    fig = _figure(7.5, height)
    ax = fig.subplots()
    if "timestep" in res.coords:
        t = np.asarray(res["timestep"].values, dtype=float)
        ax.set_xlabel("timestep t (1000 = pure noise; denoising runs left to right)")
        if len(t) > 1 and t[0] > t[-1]:
            ax.set_xlim(max(t) + 0.02 * (max(t) - min(t) or 1), min(t) - 0.02 * (max(t) - min(t) or 1))
    else:
        t = np.asarray(res["step"].values, dtype=float)
        ax.set_xlabel("denoising step")
    for color, g in zip(_colors(len(groups)), groups):
        sub = res.sel({gdim: g}) if gdim else res
        ax.plot(t, sub["mean"].values, marker="o", ms=3.5, color=color, label=short_layer(g) if gdim == "layer" else g)
        ax.fill_between(t, sub["ci_low"].values, sub["ci_high"].values, color=color, alpha=0.22, lw=0)
    return fig, ax, gdim, t


def _fit(text: str, fig, fontsize: float = 10.0, frac: float = 0.92) -> str:
    """Wrap each line of a title so that it fits ``frac`` of the figure's width (bold type included)."""
    chars = max(20, int(fig.get_figwidth() * frac * 72 / (fontsize * 0.7)))
    return "\n".join(textwrap.fill(line, chars) if line else line for line in str(text).split("\n"))


def _title(obj, text: str, *, frac: float = 0.92) -> None:
    """Title an axes, or a figure (its suptitle), with ``text`` fitted to the figure, in 10 pt."""
    if isinstance(obj, Figure):
        obj.suptitle(_fit(text, obj, frac=frac), fontsize=10)
    else:
        obj.set_title(_fit(text, obj.figure, frac=frac), fontsize=10)


def _grid_with_labels(fig, labels: Sequence[str], heads: Sequence[str], *, fontsize: float = 9.0) -> np.ndarray:
    """A (rows, columns) grid of bare panels under column ``heads``, after right-aligned row ``labels``."""
    n_cols = len(heads)
    lines = [line for label in labels for line in str(label).split("\n")] or [""]
    label_in = 0.1 + 0.62 * fontsize / 72 * max(len(line) for line in lines)
    panel_in = (fig.get_figwidth() - label_in) / max(n_cols, 1)
    grid = fig.add_gridspec(len(labels), n_cols + 1, width_ratios=[label_in / max(panel_in, 0.1)] + [1.0] * n_cols)
    axes = np.empty((len(labels), n_cols), dtype=object)
    for r, label in enumerate(labels):
        lab = fig.add_subplot(grid[r, 0])
        lab.axis("off")
        lab.text(1.0, 0.5, label, ha="right", va="center", fontsize=fontsize, transform=lab.transAxes)
        for c in range(n_cols):
            axes[r, c] = fig.add_subplot(grid[r, c + 1], xticks=[], yticks=[])
            axes[r, c].grid(False)
            if r == 0:
                axes[r, c].set_title(heads[c], fontsize=fontsize, fontweight="normal")
    return axes


def _wrap(text: str, width: int = 28) -> str:
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def token_label(text: str, source: str | None, position: int) -> str:
    src = f"{source.upper()} " if source else ""
    return f"{readable_token(text)}  [{src}#{position}]"


@_styled
def plot_suppression(res: xr.Dataset, *, title: str | None = None, log: bool = False):
    """Fig. 2 analogue: relative magnitude (visual->text mass) against timestep, CI bands, references.

    ``res``: a :func:`~taca_probe.analysis.suppression` result (any ``by``); ``log``: logarithmic
    mass axis (useful when the uniform reference is far below 1).
    """
    _needs(res, "plot_suppression", "suppression", "mean", "ci_low", "ci_high")
    fig, ax, _, _ = _group_lines(res, 4.6, res.attrs.get("by", "all layers"))
    uniform = float(res["uniform_reference"]) if "uniform_reference" in res else res.attrs.get("uniform_reference")
    if uniform is not None:
        ax.axhline(uniform, color="0.35", ls="--", lw=1.5,
                   label=f"uniform attention N_txt/(N_txt+N_vis) = {uniform:.3g}")
    # Fit the data and the uniform reference: the masses sit far below the cross-attention value 1,
    # which a 0-1 axis would squeeze into its bottom. Where 1 is off the axis, the legend says so.
    vals = np.concatenate([np.ravel(np.asarray(res[v].values, float)) for v in ("mean", "ci_low", "ci_high")]
                          + ([np.array([uniform])] if uniform is not None else []))
    vals = vals[np.isfinite(vals)]
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    top_ref = hi * 1.1 >= 1.0 or log
    if top_ref:
        hi = max(hi, 1.0)
    ax.axhline(1.0, color="0.15", ls=":", lw=1.5, label="cross-attention (text keys only) = 1"
               + ("" if top_ref else ", above this axis"))
    ax.set_ylabel("relative magnitude, full / cross attention\n(= " + _MASS_LABEL + ", fraction)")
    if log:
        ax.set_yscale("log")
    else:
        pad = 0.08 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    _title(ax, title or ("Fig. 2 analogue: suppression of visual→text attention\n"
                         f"{_about(res)}; mean over heads{'' if res.attrs.get('by') == 'layer' else ' and layers'}, "
                         f"{res.attrs.get('ci', 0.95):.0%} bootstrap "
                         f"CI; {_samples_text(res.attrs)}"))
    ax.legend(fontsize=8, loc="best", title=(res.attrs.get("by") or "").replace("_", " "), title_fontsize=8)
    return fig


@_styled
def plot_suppression_heatmap(res: xr.Dataset, *, title: str | None = None):
    """Layer x timestep heatmap of the visual->text mass (``suppression(ds, by="layer")``)."""
    _needs(res, "plot_suppression_heatmap", "suppression", "mean", "step")
    gdim = _group_dim(res)
    if gdim is None:
        raise FigureError("the heatmap needs a result with a layer dimension: suppression(ds, by='layer')")
    ylabels = [str(v) for v in res[gdim].values]
    if gdim == "layer":
        bts = [str(v) for v in res["block_type"].values] if "block_type" in res.coords else [None] * len(ylabels)
        ylabels = [short_layer(n, b) for n, b in zip(ylabels, bts)]
    t = np.asarray(res["timestep" if "timestep" in res.coords else "step"].values, float)
    xlabels = [f"{v:.0f}" for v in t]
    fig = _figure(max(5.5, 0.42 * len(xlabels) + 3.2), max(3.2, 0.28 * len(ylabels) + 1.8))
    ax = fig.subplots()
    sns.heatmap(res["mean"].transpose(gdim, "step").values, ax=ax, cmap=SEQUENTIAL_CMAP, xticklabels=xlabels,
                yticklabels=ylabels, cbar_kws={"label": _MASS_LABEL + " (fraction)"}, linewidths=0)
    for set_ticks, labels, most in ((ax.set_xticks, xlabels, 14), (ax.set_yticks, ylabels, 30)):
        every = max(1, len(labels) // most)
        set_ticks(np.arange(len(labels))[::every] + 0.5, labels[::every], rotation=0)
    ax.set_xlabel("timestep t (denoising runs left to right)")
    ax.set_ylabel("attention layer (model order)")
    ref = f"; uniform attention would give {float(res['uniform_reference']):.3g}" if "uniform_reference" in res else ""
    _title(ax, title or (f"Visual→text attention mass per layer and timestep{ref}\n{_about(res)}; "
                         f"mean over heads and samples; {_samples_text(res.attrs)}"), frac=0.8)
    return fig


@_styled
def plot_timestep_slope(res: xr.Dataset, *, title: str | None = None):
    """Timestep awareness: per-layer slope of the mass against t/1000 with CI error bars."""
    _needs(res, "plot_timestep_slope", "timestep_awareness", "slope", "slope_ci_low", "slope_ci_high")
    gdim = _group_dim(res["slope"].assign_attrs(res.attrs), expect=())
    names = [str(v) for v in res[gdim].values] if gdim else ["all layers"]
    labels = [short_layer(n) if gdim == "layer" else n for n in names]
    slope, lo, hi = (np.atleast_1d(res[v].values) for v in ("slope", "slope_ci_low", "slope_ci_high"))
    fig = _figure(max(5.0, 0.45 * len(labels) + 2.5), 4.2)
    ax = fig.subplots()
    x = np.arange(len(labels))
    ax.bar(x, slope, color=_colors(1) * len(labels), alpha=0.85)
    err = np.vstack([slope - lo, hi - slope])
    ax.errorbar(x, slope, yerr=np.where(np.isfinite(err), err, 0), fmt="none", ecolor="0.2", capsize=3)
    ax.axhline(0, color="0.2", lw=1)
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center")
    ax.set_xlabel("attention layer")
    ax.set_ylabel("slope of mass vs t/1000\n(mass change per 1000 timesteps)")
    _title(ax, title or ("Timestep awareness: does visual→text attention change with the timestep?\n"
                         f"{_about(res)}; > 0: more text attention at high noise; "
                         f"{res.attrs.get('ci', 0.95):.0%} bootstrap CI; {_samples_text(res.attrs)}"))
    return fig


@_styled
def plot_amplification(res: xr.Dataset, *, title: str | None = None):
    """TACA's effect per step: applied / gamma=1 visual->text mass, with the applied gamma."""
    _needs(res, "plot_amplification", "amplification", "mean", "ci_low", "ci_high")
    fig, ax, gdim, t = _group_lines(res, 4.4, "all layers")
    ax.axhline(1.0, color="0.3", ls=":", lw=1.2, label="no change (γ = 1)")
    ax.set_ylabel("visual→text mass, applied / at γ = 1\n(ratio)")
    if "gamma" in res.coords:
        ax2 = ax.twinx()
        g = res["gamma"].mean(gdim) if gdim else res["gamma"]
        ax2.plot(t, np.asarray(g.values, float), color="0.45", ls="--", lw=1.2, marker="s", ms=3, drawstyle="steps-mid")
        ax2.set_ylabel("γ applied (dashed)")
        ax2.grid(False)
    ax.legend(fontsize=8, loc="best")
    _title(ax, title or (f"TACA amplification of visual→text attention, schedule {schedule_of(res)}{_branch(res)}\n"
                         f"{res.attrs.get('model', '')}; {res.attrs.get('ci', 0.95):.0%} bootstrap CI; "
                         f"{_samples_text(res.attrs)}"))
    return fig


def _token_rows(md: xr.Dataset, i: int, max_tokens: int, tokens: Sequence[int | str] | None,
                ) -> tuple[list[int], list[str], str]:
    """Sample ``i``'s positions along ``token`` to show, their labels, and how they were chosen: ``tokens``
    (positions or words, every occurrence), else at most ``max_tokens`` that changed most, in prompt order."""
    positive_int(max_tokens, "max_tokens", error=FigureError)
    n = md.sizes["sample"]
    if not 0 <= i < n:
        raise FigureError(f"sample {i} out of range: the result holds {n} paired samples (0..{n - 1})")
    sub = md.isel(sample=i)
    absch = np.asarray(sub["token_abs_change"].values, float)  # (step, token)
    ok = np.isfinite(absch).any(axis=0)
    positions = [int(v) for v in np.asarray(md["token"].values)]
    raw = np.asarray(sub["token_text"].values).astype(object) if "token_text" in sub.coords else None
    sources = np.asarray(sub["token_source"].values).astype(object) if "token_source" in sub.coords else None
    if tokens is not None:
        texts = [readable_token(t) for t in raw] if raw is not None else []
        rows: list[int] = []
        for want in tokens:
            if isinstance(want, (int, np.integer)) or str(want).strip().isdigit():
                hits = [positions.index(int(want))] if int(want) in positions else []
            else:
                hits = [k for k, t in enumerate(texts) if t.lower() == str(want).strip().lower()]
            hits = [k for k in hits if ok[k]]
            if not hits:
                recorded = sorted({texts[k] for k in np.flatnonzero(ok)}) if texts else []
                raise FigureError(f"token {want!r} has no recorded map in sample {i}; recorded tokens: "
                                  + ", ".join(recorded[:40]))
            rows += [k for k in hits if k not in rows]
        note = f"rows: the {len(rows)} token(s) asked for"
    else:
        if "token_is_padding" in sub.coords:
            ok &= ~np.asarray(sub["token_is_padding"].values, bool)
        pos = np.flatnonzero(ok)
        if len(pos) > max_tokens:
            score = np.nanmean(absch[:, pos], axis=0)
            pos = np.sort(pos[np.argsort(-score, kind="stable")[:max_tokens]])
        rows = pos.tolist()
        note = (f"rows: the {len(rows)} of {int(ok.sum())} prompt tokens whose maps changed most (mean |Δ|), in prompt "
                "order" if len(rows) < ok.sum() else f"rows: all {int(ok.sum())} prompt tokens")
    if not rows:
        raise FigureError(f"sample {i} has no recorded prompt-token map")
    labels = [token_label(raw[k] if raw is not None else "", sources[k] if sources is not None else None, positions[k])
              for k in rows]
    return rows, labels, note


@_styled
def plot_map_difference(md: xr.Dataset, *, sample: int = 0, steps: Sequence[int] | None = None, max_tokens: int = 8,
                        tokens: Sequence[int | str] | None = None, overlay: bool = False, title: str | None = None):
    """Fig. 3 analogue: TACA - baseline maps of a :func:`~taca_probe.analysis.map_difference` result.

    Rows: tokens (``tokens``: positions or words; else the ``max_tokens`` whose maps changed most);
    columns: ``steps`` (default the first 6); one paired ``sample``; ``overlay`` draws each map
    over the decoded TACA image (greyscale).
    """
    _needs(md, "plot_map_difference", "map_difference", "diff", "token_abs_change", "sample", "step")
    tokens, labels, note = _token_rows(md, sample, max_tokens, tokens)
    all_steps = [int(s) for s in md["step"].values]
    steps = all_steps[:6] if steps is None else index_list(steps, "steps", f"steps: {all_steps}", FigureError)
    bad = [s for s in steps if s not in all_steps]
    if bad:
        raise FigureError(f"step(s) {bad} not in the map difference; steps: {all_steps}")
    sub = md.isel(sample=sample).sel(step=steps)
    diff = np.asarray(sub["diff"].values, float)  # (step, token, y, x)
    shown = diff[:, tokens]
    vmax = (float(np.nanmax(np.abs(shown))) if np.isfinite(shown).any() else 0.0) or 1e-9
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
    if overlay and "treated_image" not in sub:
        raise FigureError("overlay=True needs the decoded images, and these stores hold none; drop overlay")
    image = np.asarray(sub["treated_image"].values) if overlay else None
    t = _coord(sub, "timestep", None)
    ny, nx = diff.shape[-2:]
    fig = _figure(1.55 * len(steps) + 1.6 + 0.08 * max(len(x) for x in labels), 1.3 * len(tokens) + 1.8)
    heads = [f"step {s}" + (f"\nt = {t[c]:.0f}" if t is not None else "") for c, s in enumerate(steps)]
    axes = _grid_with_labels(fig, labels, heads)
    mappable = None
    over = {} if image is None else {"extent": (0, image.shape[1], image.shape[0], 0), "alpha": 0.7}
    for r, k in enumerate(tokens):
        for c in range(len(steps)):
            ax = axes[r, c]
            if image is not None:
                ax.imshow(image.mean(axis=-1), cmap="gray", extent=over["extent"], vmin=0, vmax=255)
            mappable = ax.imshow(diff[c, k], cmap=DIVERGING_CMAP, norm=norm, interpolation="nearest", **over)
    cbar = fig.colorbar(mappable or matplotlib.cm.ScalarMappable(norm=norm, cmap=DIVERGING_CMAP),
                        ax=axes, shrink=0.8, pad=0.02)
    cbar.set_label("Δ attention probability\n(TACA − baseline; red: TACA attends more)")
    prompt = str(sub["prompt"].values) if "prompt" in sub.coords else ""
    seed = int(sub["seed"].values) if "seed" in sub.coords else None
    _title(fig, title or (
        f"Fig. 3 analogue: visual→text attention maps, TACA ({md.attrs.get('treated_schedule')}) − baseline "
        f"({md.attrs.get('baseline_schedule') or 'none'}){_branch(md)}\n'{_wrap(prompt, 60)}', seed {seed}; head mean, "
        f"{md.attrs.get('n_layers')} layer(s) averaged; each panel: {ny} × {nx} latent image-token grid; "
        f"n = 1 sample (of {md.attrs.get('n_pairs')} pairs){'; over the TACA image' if overlay else ''}\n{note}"))
    return fig


@_styled
def plot_token_change(md: xr.Dataset, *, sample: int = 0, max_tokens: int = 16,
                      tokens: Sequence[int | str] | None = None, title: str | None = None):
    """Per-token summary of Fig. 3: relative change of each token's mean attention, tokens x steps."""
    _needs(md, "plot_token_change", "map_difference", "token_relative_change", "token_abs_change", "sample", "step")
    tokens, labels, note = _token_rows(md, sample, max_tokens, tokens)
    sub = md.isel(sample=sample, token=tokens)
    rel = 100.0 * np.asarray(sub["token_relative_change"].transpose("token", "step").values, float)
    t = np.asarray(sub["timestep" if "timestep" in sub.coords else "step"].values, float)
    v = float(np.nanmax(np.abs(rel))) if np.isfinite(rel).any() else 1.0
    fig = _figure(max(5.0, 0.9 * rel.shape[1] + 3.5), 0.34 * len(labels) + 2.0)
    ax = fig.subplots()
    sns.heatmap(rel, ax=ax, cmap=DIVERGING_CMAP, center=0.0, vmin=-v, vmax=v, annot=rel.shape[1] <= 8,
                fmt=".1f", xticklabels=[f"{s}\n(t={x:.0f})" for s, x in zip(sub["step"].values, t)],
                yticklabels=labels, cbar_kws={"label": "change of the token's mean attention (%)"})
    ax.set_xlabel("denoising step (timestep)")
    ax.set_ylabel("prompt token")
    ax.tick_params(axis="y", rotation=0)
    prompt = str(sub["prompt"].values) if "prompt" in sub.coords else ""
    _title(ax, title or (f"Per-token change of visual→text attention, TACA − baseline\n'{_wrap(prompt, 60)}', "
                         f"seed {int(sub['seed'].values) if 'seed' in sub.coords else ''}{_branch(md)}; "
                         f"relative to the baseline; n = 1 sample (of {md.attrs.get('n_pairs')} pairs)\n{note}"),
           frac=0.8)
    return fig


@_styled
def plot_gamma_grid(grid: xr.DataArray, *, title: str | None = None):
    """Fig. 4 analogue: images, rows prompts, columns the sweep's gamma0 (from ``gamma_image_grid``)."""
    _needs(grid, "plot_gamma_grid", "gamma_image_grid", "prompt", "schedule", "image_y", "image_x", "channel")
    n_p, n_s = grid.sizes["prompt"], grid.sizes["schedule"]
    g0 = _coord(grid, "gamma0", np.full(n_s, np.nan))
    tt = _coord(grid, "t_thresh", np.full(n_s, np.nan))
    heads = ["γ = 1 (stock)" if g == 1.0 else f"γ₀ = {g:g}" if np.isfinite([g, t]).all() else str(s)
             for g, t, s in zip(g0, tt, grid["schedule"].values)]
    labels = [_wrap(str(p), 22) for p in grid["prompt"].values]
    fig = _figure(1.7 * n_s + 0.3 + 0.08 * max(len(line) for x in labels for line in x.split("\n")),
                  1.75 * n_p + 1.2)
    axes = _grid_with_labels(fig, labels, heads)
    for r in range(n_p):
        for c in range(n_s):
            axes[r, c].imshow(np.asarray(grid.isel(prompt=r, schedule=c).values, dtype=np.uint8))
    thr = grid.attrs.get("t_thresh")
    thr_text = f"γ₀ while t ≥ {thr:g}" if thr is not None and np.isfinite(thr) else "schedules as labelled"
    _title(fig, title or (f"Fig. 4 analogue: images across the gamma sweep ({thr_text}); rows: prompts, "
                          f"columns: γ₀\nseed {grid.attrs.get('seed')}; n = {n_p} prompt(s) × 1 seed"))
    return fig


@_styled
def plot_mass_vs_gamma(res: xr.Dataset, *, title: str | None = None):
    """Fig. 4 curve: visual->text mass against gamma0 with CI bands, one line per t_thresh."""
    _needs(res, "plot_mass_vs_gamma", "mass_vs_gamma", "mean", "ci_low", "ci_high", "schedule")
    gdim = _group_dim(res, expect=("schedule",))
    groups = [str(g) for g in res[gdim].values] if gdim else [None]
    g0 = _coord(res, "gamma0", np.arange(res.sizes["schedule"], dtype=float))
    tt = _coord(res, "t_thresh", np.full(res.sizes["schedule"], np.nan))
    specs = [str(s) for s in res["schedule"].values]
    tt = np.where(on_grid(specs), tt, np.nan)  # a restricted schedule is a point of its own, not on a threshold's line
    base = [i for i in range(len(specs)) if not np.isfinite(tt[i]) and g0[i] == 1.0]
    thresholds = sorted({float(v) for v in tt if np.isfinite(v)}, reverse=True)
    others = [i for i in range(len(specs)) if not np.isfinite(tt[i]) and i not in base]
    fig = _figure(5.2 * len(groups) + 1.0, 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(groups), squeeze=False)[0])
    colors = _colors(max(1, len(thresholds) + len(others)))
    for ax, g in zip(axes, groups):
        sub = res.sel({gdim: g}) if gdim else res
        mean, lo, hi = (np.asarray(sub[v].values, float) for v in ("mean", "ci_low", "ci_high"))
        lines = [(f"t_thresh = {thr:g}", [i for i in range(len(specs)) if tt[i] == thr] + base)
                 for thr in thresholds] or [("schedules", base)]
        for color, (label, idx) in zip(colors, lines):
            idx = sorted(set(idx), key=lambda i: g0[i])
            if not idx:
                continue
            x = g0[idx]
            ax.plot(x, mean[idx], marker="o", color=color, label=label)
            ax.fill_between(x, lo[idx], hi[idx], color=color, alpha=0.2, lw=0)
            ax.errorbar(x, mean[idx], yerr=[mean[idx] - lo[idx], hi[idx] - mean[idx]], fmt="none",
                        ecolor=color, capsize=3, lw=1)
        for color, i in zip(colors[len(thresholds):], others):
            ax.errorbar([g0[i]], [mean[i]], yerr=[[mean[i] - lo[i]], [hi[i] - mean[i]]], fmt="s", color=color,
                        capsize=3, label=specs[i])
        if "uniform_reference" in res:
            ax.axhline(float(res["uniform_reference"]), color="0.35", ls="--", lw=1.2,
                       label=f"uniform attention = {float(res['uniform_reference']):.3g}")
        ax.set_xlabel("γ₀ (temperature on visual→text logits)")
        ax.set_ylabel(_MASS_LABEL + " (fraction)")
        if g is not None:
            ax.set_title(g, fontsize=10)
        ax.legend(fontsize=8)
    ts = [f"{v:.0f}" for v in res.attrs.get("timesteps") or []]
    when = f"steps {res.attrs.get('steps')}" + (f" (t = {', '.join(ts[:4])}{'…' if len(ts) > 4 else ''})" if ts else "")
    _title(fig, title or (f"Fig. 4 analogue: visual→text attention mass against γ₀, mean over {when}\n"
                          f"{res.attrs.get('model', '')}{_branch(res)}; {res.attrs.get('ci', 0.95):.0%} bootstrap CI; "
                          f"{_samples_text(res.attrs)} per schedule"))
    return fig


@_styled
def plot_token_ranking(rank: xr.Dataset, *, max_prompts: int = 4, title: str | None = None):
    """Which prompt tokens receive the most visual attention (share of the visual->text mass), per prompt."""
    _needs(rank, "plot_token_ranking", "token_ranking", "token", "share", "padding_share", "prompt", "rank")
    positive_int(max_prompts, "max_prompts", error=FigureError)
    prompts = [str(p) for p in rank["prompt"].values][:max_prompts]
    fig = _figure(7.0, (0.28 * rank.sizes["rank"] + 1.2) * len(prompts) + 0.8)
    axes = np.atleast_1d(fig.subplots(len(prompts), 1, squeeze=False)[:, 0])
    color = _colors(2)[0]
    for ax, p in zip(axes, prompts):
        sub = rank.sel(prompt=p)
        ok = np.asarray(sub["token"].values) >= 0
        share = 100.0 * np.asarray(sub["share"].values, float)[ok]
        columns = (np.asarray(sub[v].values)[ok] for v in ("token_text", "token_source", "token"))
        labels = [token_label(x, s, int(q)) for x, s, q in zip(*columns)]
        y = np.arange(len(labels))
        ax.barh(y, share, color=color)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("share of the visual→text attention mass (%)")
        pad = float(sub["padding_share"].values)
        # wrapped to the panel (right of the token labels), so that it is never cut at the right
        ax.set_title(_fit(f"'{p}' — {int(sub['n_prompt_tokens'])} prompt tokens; "
                          f"{int(sub['n_padding_tokens'])} padding tokens take {pad:.1%}", fig, fontsize=9, frac=0.62),
                     fontsize=9, fontweight="normal", loc="left")
    _title(fig, title or ("Prompt tokens ranked by the visual attention they receive (padding reported separately)\n"
                          f"{_about(rank)}; mean over steps, layers, heads, image queries and seeds; "
                          f"{_samples_text(rank.attrs)}"))
    return fig


def check_formats(formats: str | Sequence[str]) -> list[str]:
    """``formats`` (one or several) as a list, each one of :data:`FORMATS`."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise FigureError(f"unknown figure format(s) {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    return formats


def save_figure(fig, out: str | os.PathLike, name: str, *, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``out/name.<format>`` for each format; returns the paths."""
    return write_files(figure_files(fig, out, name, formats=formats, dpi=dpi))


def figure_files(fig, out: str | os.PathLike, name: str, *, formats: Sequence[str] = ("png", "pdf"),
                 dpi: int = 150) -> list[tuple[Path, bytes]]:
    """``(out/name.<format>, its bytes)`` per format, rendered in memory: matplotlib draws a figure only
    when saving it, and drawing can fail, so a caller can render every file before writing any."""
    files = []
    for f in check_formats(formats):
        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, format=f, metadata=None if f != "png" else {"Software": "taca-probe"})
        files.append((Path(out) / f"{name}.{f}", buf.getvalue()))
    return files


def write_files(files: list[tuple[Path, bytes]]) -> list[Path]:
    """Write each ``(path, bytes)``, creating folders; returns the paths."""
    for path, data in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return [path for path, _ in files]
