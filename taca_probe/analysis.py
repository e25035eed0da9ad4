"""Analysis of run stores: pure functions over :class:`xarray.Dataset`\\s (no zarr, no plotting).

Every function takes the Dataset that :func:`taca_probe.open_run` (one store) or
:func:`taca_probe.open_sweep` (a sweep, with a ``schedule`` dimension) returns, reduces it with
xarray operations first (so a dask-backed Dataset, ``open_run(path, chunks={})``, is read lazily
and only the small reduced arrays are computed), and returns a labeled Dataset or DataArray.

The quantities (see ``shared/notes/taca-method.md``):

- **suppression** (Fig. 2): for a visual query ``i``, full MM-DiT attention on a text key is the
  cross-attention probability times ``m_i``, the query's visual->text mass, so the *relative
  magnitude* of full against cross attention is exactly ``vis_txt_mass``. References: classic
  cross-attention gives 1; uniform attention gives ``N_txt / (N_txt + N_vis)``.
- **amplification**: ``vis_txt_mass / vis_txt_mass_ref``, the applied mass against the gamma = 1
  mass on the same activations; and paired comparisons of a TACA store against a baseline store.
- **timestep awareness**: how the mass changes with the timestep, per layer.
- **attention-map differences** (Fig. 3): TACA minus baseline per-token maps at early steps.
- **token ranking**: which prompt tokens receive the most visual attention; padding separately.
- **gamma sweep** (Fig. 4): mass against gamma0 with confidence intervals; the image grid.

Statistics: means across samples with bootstrap confidence intervals
(:func:`scipy.stats.bootstrap`, seeded), paired tests (:func:`scipy.stats.wilcoxon` or
:func:`scipy.stats.ttest_rel`) with samples paired by (prompt, seed, batch_index).
Every option is keyword-only; bad options raise :class:`AnalysisError` listing the valid choices.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .errors import TacaProbeError

__all__ = [
    "AnalysisError",
    "MASS_VARIABLES",
    "GROUP_BY",
    "BOOTSTRAP_METHODS",
    "PAIRED_TESTS",
    "require",
    "uniform_reference",
    "layer_groups",
    "bootstrap_mean",
    "pair_samples",
    "suppression",
    "amplification",
    "compare_runs",
    "timestep_awareness",
    "map_difference",
    "token_ranking",
    "mass_vs_gamma",
    "gamma_image_grid",
    "recorded_map_steps",
    "readable_token",
]

#: The per-head mass variables of a store.
MASS_VARIABLES = ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass")
#: How layers are grouped: by block type (joint/single), one group per layer, ``n_groups``
#: contiguous depth groups, or all layers together (the group dimension is reduced away).
GROUP_BY = ("block_type", "layer", "depth", "all")
#: Bootstrap interval methods of :func:`scipy.stats.bootstrap`.
BOOTSTRAP_METHODS = ("BCa", "percentile", "basic")
#: Paired tests: ``wilcoxon`` (signed-rank, :func:`scipy.stats.wilcoxon`) or ``ttest``
#: (:func:`scipy.stats.ttest_rel`).
PAIRED_TESTS = ("wilcoxon", "ttest")

#: How to get a variable that a store lacks (the ``record`` flag that produces it).
_HOW_TO_GET = {
    "maps": "record the stores with `taca-probe record --maps steps=0-4` (or `taca-probe sweep --maps "
    "steps=0-4`; Python: probe(..., maps='steps=0-4'))",
    "schedule": "record a sweep with `taca-probe sweep` and open its folder with taca_probe.open_sweep",
    "image": "record with `taca-probe record` (every schema-1 store holds the images)",
}
_HOW_TO_GET_DEFAULT = "record with `taca-probe record` (every schema-1 store holds it)"


class AnalysisError(TacaProbeError, ValueError):
    """Bad input to an analysis function: a missing variable, an unknown option, unpaired stores."""


# ------------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------------


def require(ds: xr.Dataset, *names: str, needed_for: str | None = None, label: str | None = None) -> None:
    """Raise :class:`AnalysisError` naming the first of ``names`` that ``ds`` lacks and how to record it.

    ``"schedule"`` is checked as a dimension (a sweep); anything else as a variable or coordinate.
    """
    for name in names:
        missing = name not in ds.dims if name == "schedule" else name not in ds.variables
        if missing:
            what = f"{label}: the dataset" if label else "the dataset"
            kind = "dimension" if name == "schedule" else "variable"
            purpose = f", which {needed_for} needs" if needed_for else ""
            raise AnalysisError(
                f"{what} has no {name!r} {kind}{purpose}: {_HOW_TO_GET.get(name, _HOW_TO_GET_DEFAULT)}"
            )


def _strings(values: Any) -> np.ndarray:
    """Any string array (numpy StringDType included) as an object array of ``str``."""
    arr = np.asarray(values)
    return np.array([str(v) for v in arr.ravel().tolist()], dtype=object).reshape(arr.shape)


def _choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise AnalysisError(f"unknown {what} {value!r}; choose from {', '.join(map(str, choices))}")
    return value


def _check_stats_options(ci: float, n_resamples: int, method: str) -> None:
    if not isinstance(ci, (int, float)) or not 0.0 < float(ci) < 1.0:
        raise AnalysisError(f"ci must be a confidence level between 0 and 1 (e.g. 0.95), got {ci!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise AnalysisError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    _choice(method, BOOTSTRAP_METHODS, "bootstrap method")


def _select_branch(ds: xr.Dataset, branch: str | None) -> xr.Dataset:
    """Select one CFG branch: ``None`` means ``cond`` when the store holds both, else what it holds."""
    if "branch" in ds.dims:
        choices = [str(b) for b in ds["branch"].values]
        b = "cond" if branch is None else branch
        _choice(b, choices, "branch")
        return ds.sel(branch=b)
    if branch is not None:
        stored = ds.attrs.get("branch")
        if stored is not None and stored != branch:
            raise AnalysisError(
                f"this store recorded the {stored!r} branch only, not {branch!r}; pass branch={stored!r} or None"
            )
    return ds


def _schedule_of(ds: xr.Dataset) -> str:
    """The schedule spec of one run: its ``schedule`` attribute, or the scalar ``schedule`` coordinate
    left by ``sweep.sel(schedule=...)``."""
    if "schedule" in ds.coords and ds["schedule"].ndim == 0:
        return str(ds["schedule"].values)
    return str(ds.attrs.get("schedule", ""))


def _no_extra_dims(ds: xr.Dataset, allowed: Sequence[str], what: str) -> None:
    extra = [d for d in ("schedule", "branch") if d in ds.dims and d not in allowed]
    if extra:
        raise AnalysisError(
            f"{what} works on one run; select first, e.g. ds.sel({extra[0]}=...) "
            f"(the {extra[0]} dimension holds {', '.join(map(str, ds[extra[0]].values[:6]))})"
        )


def uniform_reference(ds: xr.Dataset) -> float:
    """``N_txt / (N_txt + N_vis)``: the visual->text mass under uniform attention over all keys.

    ``N_txt`` counts every text position the transformer saw (padding included), ``N_vis`` the
    latent image tokens; read from the store's ``n_txt``/``n_vis`` attributes, else the sizes of
    the ``token`` and ``y`` x ``x`` dimensions.
    """
    n_txt = ds.attrs.get("n_txt", ds.sizes.get("token"))
    n_vis = ds.attrs.get("n_vis")
    if n_vis is None and "y" in ds.sizes and "x" in ds.sizes:
        n_vis = ds.sizes["y"] * ds.sizes["x"]
    if n_txt is None or n_vis is None:
        raise AnalysisError("cannot tell N_txt and N_vis: the dataset has neither n_txt/n_vis attributes nor token/y/x dims")
    return float(n_txt) / (float(n_txt) + float(n_vis))


# ------------------------------------------------------------------------------------------------
# layer groups
# ------------------------------------------------------------------------------------------------


def layer_groups(ds: xr.Dataset, *, by: str = "block_type", n_groups: int = 3) -> dict[str, list[int]]:
    """Label -> layer positions, in model order.

    Parameters
    ----------
    by
        ``"block_type"`` (``joint``, ``single``, in order of appearance), ``"layer"`` (one group per
        attention module path), ``"depth"`` (``n_groups`` contiguous groups of layers, labelled
        ``"layers 0-3"``) or ``"all"``.
    """
    _choice(by, GROUP_BY, "grouping 'by'")
    layers = [str(v) for v in np.asarray(ds["layer"].values)]
    if by == "layer":
        return {name: [i] for i, name in enumerate(layers)}
    if by == "all":
        return {"all layers": list(range(len(layers)))}
    if by == "block_type":
        if "block_type" not in ds.variables:
            raise AnalysisError("the dataset has no 'block_type' coordinate; use by='layer', 'depth' or 'all'")
        out: dict[str, list[int]] = {}
        for i, bt in enumerate(np.asarray(ds["block_type"].values)):
            out.setdefault(str(bt), []).append(i)
        return out
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or n_groups < 1:
        raise AnalysisError(f"n_groups must be a positive integer, got {n_groups!r}")
    out = {}
    for part in np.array_split(np.arange(len(layers)), min(int(n_groups), len(layers))):
        a, b = int(part[0]), int(part[-1])
        out[f"layer {a}" if a == b else f"layers {a}-{b}"] = part.tolist()
    return out


def _group_layers(da: xr.DataArray, ds: xr.Dataset, by: str, n_groups: int) -> xr.DataArray:
    """Mean over the layers of each group: the ``layer`` dim becomes ``by`` (reduced for ``all``)."""
    groups = layer_groups(ds, by=by, n_groups=n_groups)
    if by == "all":
        return da.mean("layer")
    if by == "layer":
        return da
    parts = [da.isel(layer=idx).mean("layer") for idx in groups.values()]
    out = xr.concat(parts, dim=pd.Index(list(groups), name=by), coords="minimal", compat="override")
    return out.assign_coords(n_layers=(by, [len(v) for v in groups.values()]))


def _per_sample(ds: xr.Dataset, variable: str, *, by: str, n_groups: int) -> xr.DataArray:
    """Head- and group-mean of ``variable``: (sample, [schedule,] group, step), still lazy."""
    require(ds, variable)
    da = ds[variable].reset_coords(drop=True)
    if "head" in da.dims:
        da = da.mean("head")
    return _canonical_order(_group_layers(da, ds, by, n_groups), by)


def _canonical_order(da: xr.DataArray, by: str) -> xr.DataArray:
    """(sample, other dims..., group, step): groups as rows, steps as columns."""
    last = [d for d in (by, "step") if d in da.dims]
    first = [d for d in ("sample",) if d in da.dims]
    return da.transpose(*first, ..., *last)


def _step_coords(ds: xr.Dataset) -> dict[str, Any]:
    """``timestep`` and ``sigma`` along ``step``: the mean over samples (and schedules)."""
    out: dict[str, Any] = {}
    for name in ("timestep", "sigma"):
        if name in ds.variables and "step" in ds[name].dims:
            da = ds[name].reset_coords(drop=True)
            other = [d for d in da.dims if d != "step"]
            out[name] = ("step", np.asarray(da.mean(other).values, dtype=float) if other else np.asarray(da.values, float))
    return out


# ------------------------------------------------------------------------------------------------
# the bootstrap
# ------------------------------------------------------------------------------------------------


def _rng_kw(seed: Any) -> dict[str, Any]:
    import scipy.stats

    params = inspect.signature(scipy.stats.bootstrap).parameters
    rng = np.random.default_rng(seed)
    return {"rng": rng} if "rng" in params else {"random_state": rng}


def _scipy_ci(data: np.ndarray, *, ci: float, n_resamples: int, seed: Any, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap CI of the mean along axis 0 of ``data`` (n, m), every column finite, n >= 2."""
    import scipy.stats

    n, m = data.shape
    batch = max(1, int(2e7 // max(1, n * m)))  # bound the resample array to ~160 MB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = scipy.stats.bootstrap(
            (data,), np.mean, axis=0, vectorized=True, n_resamples=int(n_resamples), batch=batch,
            confidence_level=float(ci), method=method, **_rng_kw(seed),
        )
    low = np.atleast_1d(np.asarray(res.confidence_interval.low, dtype=float))
    high = np.atleast_1d(np.asarray(res.confidence_interval.high, dtype=float))
    bad = ~(np.isfinite(low) & np.isfinite(high))
    if bad.any() and method != "percentile":  # BCa degenerates on tied resamples: percentile there
        lo2, hi2 = _scipy_ci(data[:, bad], ci=ci, n_resamples=n_resamples, seed=seed, method="percentile")
        low[bad], high[bad] = lo2, hi2
    return low, high


def bootstrap_mean(
    da: xr.DataArray,
    *,
    dim: str = "sample",
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "BCa",
) -> xr.Dataset:
    """Mean along ``dim`` with a bootstrap confidence interval, for every other position.

    Parameters
    ----------
    da
        Any DataArray with dimension ``dim`` (dask-backed is fine: it is computed here, so reduce
        it to per-sample values first).
    dim
        The dimension of independent observations.
    ci
        Confidence level.
    n_resamples, seed, method
        Passed to :func:`scipy.stats.bootstrap` (``method`` one of :data:`BOOTSTRAP_METHODS`);
        the resampling is seeded, so the interval is reproducible.

    Returns
    -------
    xarray.Dataset
        ``mean``, ``ci_low``, ``ci_high`` and ``n`` (finite observations) over the other dims.
        Positions with fewer than 2 finite observations get a NaN interval; positions whose
        observations are all equal get the degenerate interval ``[value, value]``; NaN
        observations are left out position by position.
    """
    _check_stats_options(ci, n_resamples, method)
    if dim not in da.dims:
        raise AnalysisError(f"dimension {dim!r} not in the data; dims are {', '.join(map(str, da.dims))}")
    da = da.transpose(dim, ...)
    values = np.asarray(da.values, dtype=float)
    n = values.shape[0]
    rest = values.shape[1:]
    flat = values.reshape(n, -1)
    m = flat.shape[1]
    finite = np.isfinite(flat)
    count = finite.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(flat, axis=0) if n else np.full(m, np.nan)
        lo_all = np.nanmin(flat, axis=0) if n else np.full(m, np.nan)
        hi_all = np.nanmax(flat, axis=0) if n else np.full(m, np.nan)
    low = np.full(m, np.nan)
    high = np.full(m, np.nan)
    const = (count >= 2) & (lo_all == hi_all)
    low[const] = high[const] = mean[const]
    full = (count == n) & (n >= 2) & ~const
    if full.any():
        low[full], high[full] = _scipy_ci(flat[:, full], ci=ci, n_resamples=n_resamples, seed=seed, method=method)
    for j in np.flatnonzero((count < n) & (count >= 2) & ~const):
        col = flat[finite[:, j], j][:, None]
        lo, hi = _scipy_ci(col, ci=ci, n_resamples=n_resamples, seed=[int(seed), int(j)], method=method)
        low[j], high[j] = lo[0], hi[0]
    template = da.isel({dim: 0}, drop=True)
    out = xr.Dataset(
        {
            "mean": template.copy(data=mean.reshape(rest)),
            "ci_low": template.copy(data=low.reshape(rest)),
            "ci_high": template.copy(data=high.reshape(rest)),
            "n": template.copy(data=count.reshape(rest).astype(np.int64)),
        }
    )
    for v in out.data_vars.values():
        v.attrs = {}
    out.attrs.update({"ci": float(ci), "method": method, "n_resamples": int(n_resamples), "seed": int(seed),
                      "statistic": "mean", "over": dim, f"n_{dim}s": int(n)})
    return out


def _boot_vars(da: xr.DataArray, name: str, **kw: Any) -> dict[str, xr.DataArray]:
    b = bootstrap_mean(da, **kw)
    return {name: b["mean"], f"{name}_ci_low": b["ci_low"], f"{name}_ci_high": b["ci_high"]}


# ------------------------------------------------------------------------------------------------
# pairing two stores
# ------------------------------------------------------------------------------------------------


def _sample_keys(ds: xr.Dataset) -> list[tuple[str, int, int]]:
    for name in ("prompt", "seed"):
        require(ds, name)
    prompts = [str(p) for p in np.asarray(ds["prompt"].values)]
    seeds = [int(s) for s in np.asarray(ds["seed"].values)]
    batch = [int(b) for b in np.asarray(ds["batch_index"].values)] if "batch_index" in ds.variables else [0] * len(seeds)
    return list(zip(prompts, seeds, batch))


def _fmt_key(key: tuple[str, int, int]) -> str:
    p, s, b = key
    return f"({p!r}, seed {s}" + (f", image {b})" if b else ")")


def pair_samples(treated: xr.Dataset, baseline: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(ti, bi)`` along ``sample`` pairing the two datasets by (prompt, seed, batch_index).

    Raises
    ------
    AnalysisError
        If either dataset repeats a (prompt, seed) or the two do not hold the same set.
    """
    kt, kb = _sample_keys(treated), _sample_keys(baseline)
    for keys, which in ((kt, "treated"), (kb, "baseline")):
        seen: set = set()
        dup = [k for k in keys if k in seen or seen.add(k)]
        if dup:
            raise AnalysisError(f"the {which} dataset holds sample {_fmt_key(dup[0])} twice; cannot pair")
    if not kt:
        raise AnalysisError("the treated dataset holds no sample")
    sb = set(kb)
    st = set(kt)
    only_t = [k for k in kt if k not in sb]
    only_b = [k for k in kb if k not in st]
    if only_t or only_b:
        parts = []
        if only_t:
            parts.append(f"{len(only_t)} only in the treated one (first {_fmt_key(only_t[0])})")
        if only_b:
            parts.append(f"{len(only_b)} only in the baseline (first {_fmt_key(only_b[0])})")
        raise AnalysisError(
            "the two datasets' samples do not pair by (prompt, seed): " + "; ".join(parts)
            + "; record both with the same prompts and seeds"
        )
    index_b = {k: i for i, k in enumerate(kb)}
    return np.arange(len(kt)), np.array([index_b[k] for k in kt], dtype=np.int64)


def _check_same_structure(a: xr.Dataset, b: xr.Dataset, dims: Sequence[str]) -> None:
    diffs = []
    for d in dims:
        if d in a.dims or d in b.dims:
            if a.sizes.get(d) != b.sizes.get(d):
                diffs.append(f"{d}: {a.sizes.get(d)} vs {b.sizes.get(d)}")
            elif d == "layer" and list(map(str, a["layer"].values)) != list(map(str, b["layer"].values)):
                diffs.append("layer names differ")
    if diffs:
        raise AnalysisError("the two datasets do not have the same structure (different model or settings): " + "; ".join(diffs))


# ------------------------------------------------------------------------------------------------
# Fig. 2: suppression, amplification, timestep awareness
# ------------------------------------------------------------------------------------------------


def suppression(
    ds: xr.Dataset,
    *,
    by: str = "block_type",
    variable: str = "vis_txt_mass",
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "BCa",
    branch: str | None = None,
    n_groups: int = 3,
) -> xr.Dataset:
    """Relative magnitude of full MM-DiT attention against cross-attention (the paper's Fig. 2).

    For a visual query, full attention on a text key equals cross-attention times the query's
    visual->text mass, so the relative magnitude *is* the mass. Per sample it is averaged over
    heads and over the layers of each group; the mean across samples gets a bootstrap CI.

    Parameters
    ----------
    ds
        A store (:func:`taca_probe.open_run`) or a sweep (extra dims such as ``schedule`` are kept).
    by
        Layer grouping, one of :data:`GROUP_BY`.
    variable
        ``vis_txt_mass`` (as applied; default) or ``vis_txt_mass_ref`` (at gamma = 1 on the same
        activations; equal to the former in a baseline store).
    ci, n_resamples, seed, method
        Bootstrap options (:func:`bootstrap_mean`).
    branch
        CFG branch when the store holds both (default ``cond``).
    n_groups
        Number of depth groups for ``by="depth"``.

    Returns
    -------
    xarray.Dataset
        ``mean``, ``ci_low``, ``ci_high``, ``n`` over (``by``, ``step``) with ``timestep`` and
        ``sigma`` coordinates along ``step``; scalar variables ``uniform_reference``
        (``N_txt / (N_txt + N_vis)``) and ``cross_attention_reference`` (1).
    """
    _choice(variable, ("vis_txt_mass", "vis_txt_mass_ref"), "variable")
    ds = _select_branch(ds, branch)
    x = _per_sample(ds, variable, by=by, n_groups=n_groups)
    res = bootstrap_mean(x, ci=ci, n_resamples=n_resamples, seed=seed, method=method)
    res = res.assign_coords(_step_coords(ds))
    uniform = uniform_reference(ds)
    res["uniform_reference"] = xr.DataArray(uniform, attrs={"long_name": "uniform attention N_txt / (N_txt + N_vis)"})
    res["cross_attention_reference"] = xr.DataArray(1.0, attrs={"long_name": "cross-attention (text keys only)"})
    res["mean"].attrs = {"long_name": "relative magnitude of visual->text attention (full / cross)", "units": "1"}
    res.attrs.update({
        "quantity": "suppression", "variable": variable, "by": by, "uniform_reference": uniform,
        "cross_attention_reference": 1.0, "n_samples": int(ds.sizes["sample"]),
        "schedule": _schedule_of(ds), "model": str(ds.attrs.get("model", "")),
        "n_txt": ds.attrs.get("n_txt"), "n_vis": ds.attrs.get("n_vis"),
    })
    return res


def amplification(
    ds: xr.Dataset,
    *,
    by: str = "block_type",
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "BCa",
    branch: str | None = None,
    n_groups: int = 3,
) -> xr.Dataset:
    """What TACA does to the visual->text mass: applied over gamma = 1 mass, per group and step.

    Per sample, the ratio of the head- and group-mean of ``vis_txt_mass`` to that of
    ``vis_txt_mass_ref`` (the mass at gamma = 1 on the same activations); 1 where gamma = 1.

    Returns
    -------
    xarray.Dataset
        ``mean``, ``ci_low``, ``ci_high``, ``n`` over (``by``, ``step``); coordinates ``timestep``
        and ``gamma`` (``by``, ``step``: the mean gamma applied in the group).
    """
    ds = _select_branch(ds, branch)
    require(ds, "vis_txt_mass_ref")
    num = _per_sample(ds, "vis_txt_mass", by=by, n_groups=n_groups)
    den = _per_sample(ds, "vis_txt_mass_ref", by=by, n_groups=n_groups)
    res = bootstrap_mean(num / den, ci=ci, n_resamples=n_resamples, seed=seed, method=method)
    coords = _step_coords(ds)
    if "gamma" in ds.variables:
        g = _group_layers(ds["gamma"].reset_coords(drop=True), ds, by, n_groups)
        g = g.mean([d for d in ("sample",) if d in g.dims])
        coords["gamma"] = _canonical_order(g, by).compute()
    res = res.assign_coords(coords)
    res["mean"].attrs = {"long_name": "visual->text mass, applied / gamma=1", "units": "1"}
    res.attrs.update({"quantity": "amplification", "by": by, "n_samples": int(ds.sizes["sample"]),
                      "schedule": _schedule_of(ds), "model": str(ds.attrs.get("model", ""))})
    return res


def compare_runs(
    treated: xr.Dataset,
    baseline: xr.Dataset,
    *,
    variable: str = "vis_txt_mass",
    by: str = "block_type",
    test: str = "wilcoxon",
    alternative: str = "two-sided",
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "BCa",
    branch: str | None = None,
    n_groups: int = 3,
) -> xr.Dataset:
    """Paired comparison of a TACA store against a baseline store (same prompts and seeds).

    Samples are paired by (prompt, seed, batch_index); per sample the variable is averaged over
    heads and the layers of each group, then the paired differences get a bootstrap CI and a
    paired test across samples at every (group, step).

    Parameters
    ----------
    variable
        One of :data:`MASS_VARIABLES`.
    test
        ``"wilcoxon"`` (signed-rank) or ``"ttest"`` (paired t-test); see :data:`PAIRED_TESTS`.
    alternative
        ``"two-sided"``, ``"greater"`` (treated > baseline) or ``"less"``.

    Returns
    -------
    xarray.Dataset
        ``treated``, ``baseline`` (means), ``diff`` (mean paired difference treated - baseline)
        with ``diff_ci_low``/``diff_ci_high``, ``ratio`` (treated / baseline means),
        ``statistic`` and ``pvalue`` over (``by``, ``step``). Positions where every paired
        difference is 0 get p = 1.

    Raises
    ------
    AnalysisError
        If the samples do not pair, or the stores differ in steps, layers or heads.
    """
    import scipy.stats

    _choice(variable, MASS_VARIABLES, "variable")
    _choice(test, PAIRED_TESTS, "paired test")
    _choice(alternative, ("two-sided", "greater", "less"), "alternative")
    _check_stats_options(ci, n_resamples, method)
    for d in (treated, baseline):
        _no_extra_dims(d, (), "compare_runs")
    treated, baseline = _select_branch(treated, branch), _select_branch(baseline, branch)
    _check_same_structure(treated, baseline, ("step", "layer", "head"))
    ti, bi = pair_samples(treated, baseline)
    xt = _per_sample(treated, variable, by=by, n_groups=n_groups).isel(sample=ti).compute()
    xb = _per_sample(baseline, variable, by=by, n_groups=n_groups).isel(sample=bi).compute()
    xb = xb.assign_coords(sample=xt["sample"].values)
    diff = xt - xb
    boot = bootstrap_mean(diff, ci=ci, n_resamples=n_resamples, seed=seed, method=method)
    a = xt.transpose("sample", ...).values.astype(float)
    b = xb.transpose("sample", ...).values.astype(float)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if len(ti) < 2:
            stat = np.full(a.shape[1:], np.nan)
            p = np.full(a.shape[1:], np.nan)
        elif test == "wilcoxon":
            r = scipy.stats.wilcoxon(a, b, axis=0, alternative=alternative)
            stat, p = np.asarray(r.statistic, float), np.asarray(r.pvalue, float)
        else:
            r = scipy.stats.ttest_rel(a, b, axis=0, alternative=alternative)
            stat, p = np.asarray(r.statistic, float), np.asarray(r.pvalue, float)
    zero = np.all(a == b, axis=0)
    p = np.where(zero & (len(ti) >= 2), 1.0, p)
    template = boot["mean"]
    mt, mb = xt.mean("sample"), xb.mean("sample")
    res = xr.Dataset({
        "treated": mt, "baseline": mb,
        "diff": boot["mean"], "diff_ci_low": boot["ci_low"], "diff_ci_high": boot["ci_high"],
        "ratio": mt / mb,
        "statistic": template.copy(data=np.asarray(stat).reshape(template.shape)),
        "pvalue": template.copy(data=np.asarray(p).reshape(template.shape)),
    })
    res = res.assign_coords(_step_coords(treated))
    res.attrs.update({
        "quantity": "paired comparison", "variable": variable, "by": by, "test": test,
        "alternative": alternative, "n_pairs": int(len(ti)), "ci": float(ci), "method": method,
        "n_resamples": int(n_resamples), "seed": int(seed),
        "treated_schedule": _schedule_of(treated),
        "baseline_schedule": _schedule_of(baseline),
    })
    return res


def timestep_awareness(
    ds: xr.Dataset,
    *,
    by: str = "layer",
    variable: str = "vis_txt_mass",
    split: float = 500.0,
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "BCa",
    branch: str | None = None,
    n_groups: int = 3,
) -> xr.Dataset:
    """How the visual->text mass changes with the timestep, per layer (the paper's second problem).

    Per sample and group (head- and layer-mean of ``variable``):

    - ``slope``: least-squares slope of the mass against ``t / 1000`` over the steps, i.e. the
      change in mass from t = 0 to t = 1000 (positive: more text attention at high noise);
    - ``early_mass`` / ``late_mass``: mean mass over the steps with ``t >= split`` / ``t < split``,
      and their ratio ``early_late_ratio`` (NaN when one side has no step).

    Returns
    -------
    xarray.Dataset
        ``mass`` (``by``, ``step``) and each quantity above (``by``), each with ``*_ci_low`` /
        ``*_ci_high`` bootstrap bounds across samples; ``timestep`` along ``step``.
    """
    _choice(variable, MASS_VARIABLES, "variable")
    if not isinstance(split, (int, float)) or not 0 <= split <= 1000:
        raise AnalysisError(f"split must be a timestep in 0..1000, got {split!r}")
    ds = _select_branch(ds, branch)
    require(ds, "timestep")
    kw = {"ci": ci, "n_resamples": n_resamples, "seed": seed, "method": method}
    _check_stats_options(ci, n_resamples, method)
    x = _per_sample(ds, variable, by=by, n_groups=n_groups).compute()
    t = ds["timestep"].reset_coords(drop=True).astype(float).compute()
    u = t / 1000.0
    uc = u - u.mean("step")
    xc = x - x.mean("step")
    with np.errstate(all="ignore"):
        slope = (uc * xc).sum("step") / (uc**2).sum("step")
        early = x.where(t >= split).mean("step")
        late = x.where(t < split).mean("step")
        ratio = early / late
    out: dict[str, xr.DataArray] = {}
    for name, da in (("mass", x), ("slope", slope), ("early_mass", early), ("late_mass", late),
                     ("early_late_ratio", ratio)):
        out.update(_boot_vars(da, name, **kw))
    res = xr.Dataset(out).assign_coords(_step_coords(ds))
    res["slope"].attrs = {"long_name": "d(mass) / d(t/1000)", "units": "mass per 1000 timesteps"}
    res.attrs.update({"quantity": "timestep awareness", "variable": variable, "by": by, "split": float(split),
                      "n_samples": int(ds.sizes["sample"]), "uniform_reference": uniform_reference(ds),
                      **{k: v for k, v in kw.items()}})
    return res


# ------------------------------------------------------------------------------------------------
# Fig. 3: attention-map differences
# ------------------------------------------------------------------------------------------------


def _parse_int_set(text: str) -> list[int]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return sorted(out)


def _maps_spec(ds: xr.Dataset) -> dict[str, Any]:
    """The store's map selection (its ``maps`` attribute), as steps / layer globs / tokens."""
    spec = ds.attrs.get("maps")
    out: dict[str, Any] = {"steps": None, "layers": None, "tokens": "prompt"}
    if not isinstance(spec, str) or not spec or spec == "none":
        return out
    for part in spec.split(";"):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        try:
            if key == "steps" and value != "all":
                out["steps"] = _parse_int_set(value)
            elif key == "layers" and value != "all":
                out["layers"] = [p for p in value.split("|") if p]
            elif key == "tokens":
                out["tokens"] = value if value in ("prompt", "all") else _parse_int_set(value)
        except ValueError:
            continue
    return out


def recorded_map_steps(ds: xr.Dataset) -> list[int]:
    """The steps at which ``ds`` holds maps (from its ``maps`` attribute; all steps if unknown)."""
    require(ds, "maps")
    steps = [int(s) for s in np.asarray(ds["step"].values)]
    wanted = _maps_spec(ds)["steps"]
    return steps if wanted is None else [s for s in steps if s in set(wanted)]


def _recorded_map_layers(ds: xr.Dataset) -> list[str]:
    layers = [str(v) for v in np.asarray(ds["layer"].values)]
    globs = _maps_spec(ds)["layers"]
    if globs is None:
        return layers
    return [name for name in layers if any(fnmatch.fnmatchcase(name, g) for g in globs)]


def readable_token(text: str) -> str:
    """A token as a person reads it: tokenizer markers removed (``red</w>`` -> ``red``, ``▁a`` -> ``a``)."""
    t = str(text)
    for marker in ("</w>", "Ġ", "▁"):
        t = t.replace(marker, "")
    return t.strip() or repr(str(text))


def map_difference(
    treated: xr.Dataset,
    baseline: xr.Dataset,
    *,
    steps: int | Sequence[int] | None = None,
    layers: str | Sequence[str] | None = None,
    tokens: str | Sequence[int] = "prompt",
    branch: str | None = None,
) -> xr.Dataset:
    """TACA minus baseline visual->text attention maps per text token (the paper's Fig. 3).

    Samples are paired by (prompt, seed); each map is the head-mean probability that each image
    token (query, on the latent ``y`` x ``x`` grid) puts on a text token, averaged over the
    selected layers.

    Parameters
    ----------
    steps
        Step indices (default: every step with maps in both stores).
    layers
        ``None`` (every layer with maps), a block type (``"joint"``/``"single"``), an fnmatch glob
        on the module path, or a list of paths/globs.
    tokens
        ``"prompt"`` (positions that are prompt tokens, not padding, in some sample), ``"all"``,
        or explicit token positions.

    Returns
    -------
    xarray.Dataset
        ``treated``, ``baseline``, ``diff`` (sample, step, token, y, x); per-token summaries
        ``token_change`` (mean of diff over the grid: the change of the token's mean attention),
        ``token_abs_change`` (mean absolute diff), ``token_relative_change`` (``token_change`` over
        the baseline mean) over (sample, step, token); ``treated_image`` / ``baseline_image`` when
        the stores hold images; coordinates ``prompt``, ``seed``, ``token_text``,
        ``token_is_padding``, ``token_source``, ``timestep``. NaN where a map was not recorded.
    """
    for d, which in ((treated, "treated"), (baseline, "baseline")):
        require(d, "maps", needed_for="the attention-map difference (Fig. 3)", label=f"the {which} store")
        _no_extra_dims(d, (), "map_difference")
    treated, baseline = _select_branch(treated, branch), _select_branch(baseline, branch)
    _check_same_structure(treated, baseline, ("step", "layer", "token", "y", "x"))
    ti, bi = pair_samples(treated, baseline)

    available = [s for s in recorded_map_steps(treated) if s in set(recorded_map_steps(baseline))]
    if steps is None:
        steps_sel = available
    else:
        steps_sel = [int(steps)] if isinstance(steps, (int, np.integer)) else [int(s) for s in steps]
        bad = [s for s in steps_sel if s not in available]
        if bad:
            raise AnalysisError(f"no maps at step(s) {bad} in both stores; steps with maps: {available}")
    if not steps_sel:
        raise AnalysisError("the two stores have no step with maps in common; record both with the same --maps")

    recorded = [n for n in _recorded_map_layers(treated) if n in set(_recorded_map_layers(baseline))]
    all_layers = [str(v) for v in np.asarray(treated["layer"].values)]
    if layers is None:
        layer_sel = recorded
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        bts = [str(v) for v in np.asarray(treated["block_type"].values)] if "block_type" in treated.variables else []
        layer_sel = [n for i, n in enumerate(all_layers)
                     if any(fnmatch.fnmatchcase(n, p) or (bts and bts[i] == p) for p in patterns)]
        if not layer_sel:
            raise AnalysisError(f"layers {layers!r} match no layer; layers: {', '.join(all_layers)}")
        missing = [n for n in layer_sel if n not in recorded]
        if missing:
            raise AnalysisError(f"no maps for layer(s) {', '.join(missing)}; layers with maps: {', '.join(recorded)}")
    if not layer_sel:
        raise AnalysisError("the two stores have no layer with maps in common; record both with the same --maps")

    if isinstance(tokens, str):
        _choice(tokens, ("prompt", "all"), "tokens")
        if tokens == "prompt":
            pad = np.asarray(treated["token_is_padding"].isel(sample=ti).values, dtype=bool)
            tok_idx = np.flatnonzero(~pad.all(axis=0))
        else:
            tok_idx = np.arange(treated.sizes["token"])
    else:
        tok_idx = np.array(sorted({int(t) for t in tokens}), dtype=np.int64)
        bad = [int(t) for t in tok_idx if not 0 <= t < treated.sizes["token"]]
        if bad:
            raise AnalysisError(f"token positions {bad} out of range 0..{treated.sizes['token'] - 1}")

    def pick(ds: xr.Dataset, idx: np.ndarray) -> xr.DataArray:
        m = ds["maps"].reset_coords(drop=True).isel(sample=idx, token=tok_idx).sel(step=steps_sel, layer=layer_sel)
        return m.astype("float32").mean("layer").transpose("sample", "step", "token", "y", "x")

    t = pick(treated, ti).compute()
    b = pick(baseline, bi).compute().assign_coords(sample=t["sample"].values)
    diff = t - b
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        change = diff.mean(("y", "x"))
        res = xr.Dataset({
            "treated": t, "baseline": b, "diff": diff,
            "token_change": change,
            "token_abs_change": abs(diff).mean(("y", "x")),
            "token_relative_change": change / b.mean(("y", "x")),
        })
    tsub = treated.isel(sample=ti, token=tok_idx)
    coords: dict[str, Any] = {}
    for name in ("prompt", "seed", "batch_index", "token_text", "token_is_padding", "token_source"):
        if name in tsub.variables:
            coords[name] = tsub[name].reset_coords(drop=True).compute().variable
    coords.update({k: v for k, v in _step_coords(treated.sel(step=steps_sel)).items()})
    res = res.assign_coords(coords)
    for name, d, idx in (("treated_image", treated, ti), ("baseline_image", baseline, bi)):
        if "image" in d.variables:
            res[name] = d["image"].reset_coords(drop=True).isel(sample=idx).compute().assign_coords(
                sample=t["sample"].values)
    res["diff"].attrs = {"long_name": "attention probability, treated - baseline", "units": "1"}
    res.attrs.update({
        "quantity": "attention-map difference", "layers": list(layer_sel), "n_layers": len(layer_sel),
        "n_pairs": int(len(ti)), "treated_schedule": _schedule_of(treated),
        "baseline_schedule": _schedule_of(baseline), "model": str(treated.attrs.get("model", "")),
    })
    return res


# ------------------------------------------------------------------------------------------------
# token ranking
# ------------------------------------------------------------------------------------------------


def token_ranking(
    ds: xr.Dataset,
    *,
    steps: int | Sequence[int] | None = None,
    layers: str | Sequence[str] | None = None,
    top: int | None = 10,
    branch: str | None = None,
) -> xr.Dataset:
    """Which text tokens receive the most visual attention, per prompt (mean over its seeds).

    ``token_mass`` (head- and visual-query-mean probability on each text token) is averaged over
    the selected steps and layers and over the samples of each prompt, then ranked. Prompt tokens
    (the tokenizers' attention mask: the prompt's tokens with their start/end markers) and padding
    tokens are ranked separately, because padding positions are identical across prompts and can
    soak up much of the mass.

    Parameters
    ----------
    steps
        Step indices (default all).
    layers
        ``None`` (all), a block type, a glob, or a list of paths/globs.
    top
        How many tokens to keep in each ranking (``None``: all prompt tokens).

    Returns
    -------
    xarray.Dataset
        Along (``prompt``, ``rank``): ``token`` (position, -1 past the end), ``token_text``,
        ``token_source``, ``mass`` and ``share`` (of the prompt's total visual->text mass);
        along (``prompt``, ``padding_rank``): the same for padding tokens (``padding_*``);
        along ``prompt``: ``prompt_token_mass``, ``padding_token_mass``, ``total_mass``,
        ``padding_share``, ``n_prompt_tokens``, ``n_padding_tokens``, ``n_samples``.
    """
    require(ds, "token_mass", "token_text", "token_is_padding", "prompt")
    _no_extra_dims(ds, (), "token_ranking")
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1):
        raise AnalysisError(f"top must be a positive integer or None, got {top!r}")
    ds = _select_branch(ds, branch)
    da = ds["token_mass"].reset_coords(drop=True)
    if steps is not None:
        sel = [int(steps)] if isinstance(steps, (int, np.integer)) else [int(s) for s in steps]
        valid = [int(s) for s in ds["step"].values]
        bad = [s for s in sel if s not in valid]
        if bad:
            raise AnalysisError(f"step(s) {bad} not in the store; steps: {valid[0]}..{valid[-1]}")
        da = da.sel(step=sel)
    if layers is not None:
        all_layers = [str(v) for v in ds["layer"].values]
        bts = [str(v) for v in ds["block_type"].values] if "block_type" in ds.variables else []
        patterns = [layers] if isinstance(layers, str) else list(layers)
        idx = [i for i, n in enumerate(all_layers) if any(fnmatch.fnmatchcase(n, p) or (bts and bts[i] == p) for p in patterns)]
        if not idx:
            raise AnalysisError(f"layers {layers!r} match no layer; layers: {', '.join(all_layers)}")
        da = da.isel(layer=idx)
    per_sample = np.asarray(da.mean(("step", "layer")).transpose("sample", "token").values, dtype=float)
    prompts = [str(p) for p in np.asarray(ds["prompt"].values)]
    texts = _strings(ds["token_text"].values)
    padding = np.asarray(ds["token_is_padding"].values, dtype=bool)
    sources = _strings(ds["token_source"].values) if "token_source" in ds.variables else None
    order = list(dict.fromkeys(prompts))
    if not order:
        raise AnalysisError("the dataset holds no sample")
    n_tok = per_sample.shape[1]

    groups = {p: [i for i, q in enumerate(prompts) if q == p] for p in order}
    n_prompt_max = max(int((~padding[idx[0]]).sum()) for idx in groups.values())
    n_pad_max = max(int(padding[idx[0]].sum()) for idx in groups.values())
    k_prompt = n_prompt_max if top is None else min(int(top), max(n_prompt_max, 1))
    k_pad = n_pad_max if top is None else min(int(top), max(n_pad_max, 1))
    k_prompt, k_pad = max(k_prompt, 1), max(k_pad, 1)

    def table(k: int) -> dict[str, np.ndarray]:
        return {"token": np.full((len(order), k), -1, np.int64), "token_text": np.full((len(order), k), "", object),
                "token_source": np.full((len(order), k), "", object), "mass": np.full((len(order), k), np.nan),
                "share": np.full((len(order), k), np.nan)}

    ranked, pad_ranked = table(k_prompt), table(k_pad)
    scalars = {name: np.zeros(len(order)) for name in
               ("prompt_token_mass", "padding_token_mass", "total_mass", "padding_share")}
    counts = {name: np.zeros(len(order), np.int64) for name in ("n_prompt_tokens", "n_padding_tokens", "n_samples")}
    for r, p in enumerate(order):
        idx = groups[p]
        mass = per_sample[idx].mean(axis=0)
        pad = padding[idx[0]]
        total = float(np.nansum(mass))
        for tab, mask, k in ((ranked, ~pad, k_prompt), (pad_ranked, pad, k_pad)):
            pos = np.flatnonzero(mask)
            pos = pos[np.argsort(-mass[pos], kind="stable")][:k]
            tab["token"][r, : len(pos)] = pos
            tab["token_text"][r, : len(pos)] = texts[idx[0], pos]
            if sources is not None:
                tab["token_source"][r, : len(pos)] = sources[pos]
            tab["mass"][r, : len(pos)] = mass[pos]
            tab["share"][r, : len(pos)] = mass[pos] / total if total > 0 else np.nan
        scalars["prompt_token_mass"][r] = float(np.nansum(mass[~pad]))
        scalars["padding_token_mass"][r] = float(np.nansum(mass[pad]))
        scalars["total_mass"][r] = total
        scalars["padding_share"][r] = scalars["padding_token_mass"][r] / total if total > 0 else np.nan
        counts["n_prompt_tokens"][r] = int((~pad).sum())
        counts["n_padding_tokens"][r] = int(pad.sum())
        counts["n_samples"][r] = len(idx)
    data: dict[str, Any] = {}
    for name, v in ranked.items():
        data[name] = (("prompt", "rank"), v.astype(str) if v.dtype == object else v)
    for name, v in pad_ranked.items():
        data[f"padding_{name}"] = (("prompt", "padding_rank"), v.astype(str) if v.dtype == object else v)
    for name, v in {**scalars, **counts}.items():
        data[name] = (("prompt",), v)
    res = xr.Dataset(data, coords={"prompt": order, "rank": np.arange(1, k_prompt + 1),
                                   "padding_rank": np.arange(1, k_pad + 1)})
    res.attrs.update({"quantity": "token ranking", "n_samples": int(ds.sizes["sample"]), "n_tokens": int(n_tok),
                      "steps": "all" if steps is None else str(steps), "layers": "all" if layers is None else str(layers),
                      "schedule": _schedule_of(ds), "model": str(ds.attrs.get("model", ""))})
    return res


# ------------------------------------------------------------------------------------------------
# Fig. 4: the gamma sweep
# ------------------------------------------------------------------------------------------------


def _active_steps(ds: xr.Dataset) -> list[int]:
    """Steps where some schedule applied gamma != 1 in some layer."""
    if "gamma" not in ds.variables:
        return []
    g = ds["gamma"].reset_coords(drop=True)
    active = (abs(g - 1.0) > 1e-6).any([d for d in g.dims if d != "step"])
    return [int(s) for s, a in zip(ds["step"].values, np.asarray(active.values)) if a]


def mass_vs_gamma(
    sweep: xr.Dataset,
    *,
    variable: str = "vis_txt_mass",
    by: str = "all",
    steps: str | int | Sequence[int] = "active",
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "BCa",
    branch: str | None = None,
    n_groups: int = 3,
) -> xr.Dataset:
    """Visual->text mass against the sweep's schedules (the curve of the paper's Fig. 4).

    Per sample and schedule, ``variable`` is averaged over heads, the layers of each group and
    the chosen steps; the mean across samples gets a bootstrap CI.

    Parameters
    ----------
    sweep
        A Dataset with a ``schedule`` dimension (:func:`taca_probe.open_sweep`), with ``gamma0``
        and ``t_thresh`` coordinates along it.
    steps
        ``"active"`` (default: the steps where some schedule of the sweep applied gamma != 1, so
        every schedule is compared over the same window; step 0 if none), ``"all"``, a step
        index or a list of them.

    Returns
    -------
    xarray.Dataset
        ``mean``, ``ci_low``, ``ci_high``, ``n`` over (``schedule``[, ``by``]) with the coordinates
        ``gamma0`` and ``t_thresh``; ``uniform_reference``; the steps used in ``attrs["steps"]``.
    """
    require(sweep, "schedule", needed_for="the gamma sweep (Fig. 4)")
    _choice(variable, MASS_VARIABLES, "variable")
    ds = _select_branch(sweep, branch)
    valid = [int(s) for s in ds["step"].values]
    if isinstance(steps, str):
        _choice(steps, ("active", "all"), "steps")
        sel = (_active_steps(ds) or valid[:1]) if steps == "active" else valid
    else:
        sel = [int(steps)] if isinstance(steps, (int, np.integer)) else [int(s) for s in steps]
        bad = [s for s in sel if s not in valid]
        if bad:
            raise AnalysisError(f"step(s) {bad} not in the sweep; steps: {valid[0]}..{valid[-1]}")
    require(ds, variable)
    da = ds[variable].reset_coords(drop=True).sel(step=sel)
    da = da.mean([d for d in ("step", "head") if d in da.dims])
    x = _canonical_order(_group_layers(da, ds, by, n_groups), by)
    res = bootstrap_mean(x, ci=ci, n_resamples=n_resamples, seed=seed, method=method)
    for name in ("gamma0", "t_thresh"):
        if name in ds.variables and ds[name].dims == ("schedule",):
            res = res.assign_coords({name: ("schedule", np.asarray(ds[name].values, dtype=float))})
    t = _step_coords(ds.sel(step=sel)).get("timestep")
    res["uniform_reference"] = xr.DataArray(uniform_reference(ds))
    res["mean"].attrs = {"long_name": f"{variable} (mean over steps {sel})", "units": "1"}
    res.attrs.update({"quantity": "mass vs gamma", "variable": variable, "by": by, "steps": sel,
                      "timesteps": [] if t is None else [round(float(v), 3) for v in t[1]],
                      "n_samples": int(ds.sizes["sample"]), "model": str(ds.attrs.get("model", ""))})
    return res


def gamma_image_grid(
    sweep: xr.Dataset,
    *,
    t_thresh: float | None = None,
    seed: int | None = None,
) -> xr.DataArray:
    """Images across the gamma sweep: (prompt, schedule, image_y, image_x, channel) uint8.

    Columns are the schedules with threshold ``t_thresh`` (default 970 if the sweep has it, else
    its most common threshold) plus the gamma0 = 1 baseline, ordered by ``gamma0``; rows are the
    prompts, each with sample ``seed`` (default: the sweep's first seed).
    """
    require(sweep, "schedule", needed_for="the gamma-sweep image grid (Fig. 4)")
    require(sweep, "image", needed_for="the gamma-sweep image grid (Fig. 4)")
    n_sched = sweep.sizes["schedule"]
    g0 = np.asarray(sweep["gamma0"].values, float) if "gamma0" in sweep.variables else np.full(n_sched, np.nan)
    tt = np.asarray(sweep["t_thresh"].values, float) if "t_thresh" in sweep.variables else np.full(n_sched, np.nan)
    finite = [float(v) for v in tt if np.isfinite(v)]
    if t_thresh is None:
        if 970.0 in finite:
            t_thresh = 970.0
        elif finite:
            values, counts = np.unique(finite, return_counts=True)
            t_thresh = float(values[np.argmax(counts)])
    if t_thresh is not None and finite and float(t_thresh) not in finite:
        raise AnalysisError(f"no schedule with t_thresh {t_thresh:g}; thresholds in the sweep: "
                            f"{', '.join(f'{v:g}' for v in sorted(set(finite)))}")
    if t_thresh is None or not finite:
        cols = list(range(sweep.sizes["schedule"]))
    else:
        cols = [i for i in range(len(g0)) if (np.isfinite(tt[i]) and tt[i] == float(t_thresh))
                or (not np.isfinite(tt[i]) and g0[i] == 1.0)]
    cols.sort(key=lambda i: (g0[i] if np.isfinite(g0[i]) else math.inf, i))
    seeds = [int(s) for s in np.asarray(sweep["seed"].values)]
    prompts = [str(p) for p in np.asarray(sweep["prompt"].values)]
    batch = [int(b) for b in np.asarray(sweep["batch_index"].values)] if "batch_index" in sweep.variables else [0] * len(seeds)
    if seed is None:
        if not seeds:
            raise AnalysisError("the sweep holds no sample")
        seed = seeds[0]
    rows: dict[str, int] = {}
    for i, (p, s, b) in enumerate(zip(prompts, seeds, batch)):
        if s == int(seed) and b == 0 and p not in rows:
            rows[p] = i
    if not rows:
        raise AnalysisError(f"no sample with seed {seed}; seeds in the sweep: {sorted(set(seeds))}")
    img = sweep["image"].reset_coords(drop=True).isel(schedule=cols, sample=list(rows.values()))
    img = img.rename(sample="prompt").assign_coords(prompt=list(rows))
    img = img.transpose("prompt", "schedule", "image_y", "image_x", "channel").compute()
    img = img.assign_coords(gamma0=("schedule", g0[cols]), t_thresh=("schedule", tt[cols]))
    img.attrs.update({"seed": int(seed), "t_thresh": float("nan") if t_thresh is None else float(t_thresh)})
    return img
