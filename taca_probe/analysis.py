"""The quantities of a run store or sweep: pure functions from xarray Datasets to labeled results.

They reduce with xarray first (dask-backed Datasets stay lazy until the small results), put bootstrap
intervals on means across samples, and raise :class:`AnalysisError` listing the valid choices.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from .schedules import RestrictedSchedule, parse
from .selection import MapSelection, index_list, positive_int
from .stats import (
    BOOTSTRAP_METHODS,
    PAIRED_TESTS,
    AnalysisError,
    bootstrap_mean,
    check_stats_options,
    choice,
    pair_samples,
    paired,
    paired_test,
    sample_keys,
)

__all__ = [
    "AnalysisError", "MASS_VARIABLES", "GROUP_BY", "BOOTSTRAP_METHODS", "PAIRED_TESTS", "require",
    "uniform_reference", "layer_groups", "bootstrap_mean", "pair_samples", "suppression", "amplification",
    "compare_runs", "timestep_awareness", "map_difference", "token_ranking", "mass_vs_gamma",
    "gamma_image_grid", "on_grid", "schedule_of", "branch_of", "recorded_map_steps", "recorded_map_layers",
    "readable_token",
]

#: The per-head mass variables of a store.
MASS_VARIABLES = ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass")
#: How layers are grouped: by block type (joint/single), one group per layer, ``n_groups``
#: contiguous depth groups, or all layers together (the group dimension is reduced away).
GROUP_BY = ("block_type", "layer", "depth", "all")

#: The dimensions of a store that the analyses reduce over or align on.
_STORE_DIMS = ("sample", "step", "layer", "head", "token", "y", "x")
#: How to get a variable that a store lacks (the ``record`` flag that produces it).
_HOW_TO_GET = {
    "maps": "record the stores with `taca-probe record --maps steps=0-4` (or `taca-probe sweep --maps "
    "steps=0-4`; Python: probe(..., maps='steps=0-4'))",
    "schedule": "record a sweep with `taca-probe sweep` and open its folder with taca_probe.open_sweep",
    "image": "record with `taca-probe record` (every schema-1 store holds the images)",
}
_HOW_TO_GET_DEFAULT = "record with `taca-probe record` (every schema-1 store holds it)"


def _takes_datasets(fn: Callable) -> Callable:
    """Decorates a public analysis, whose positional parameters are all Datasets: anything else (a store
    path, most often) is one :class:`AnalysisError` naming what was expected, not an AttributeError."""
    params = [n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name, value in [*zip(params, args), *((n, kwargs[n]) for n in params[len(args):] if n in kwargs)]:
            if not isinstance(value, xr.Dataset):
                opener = "open_sweep" if name == "sweep" else "open_run"
                how = (f"; open the store with taca_probe.{opener}({os.fspath(value)!r}) first"
                       if isinstance(value, (str, os.PathLike)) else "")
                raise AnalysisError(f"{fn.__name__} needs an xarray.Dataset from taca_probe.{opener} as {name!r}, "
                                    f"got {type(value).__name__}{how}")
            # ds.isel(layer=0) leaves a scalar coordinate where the analyses reduce over a dimension
            dropped = [d for d in _STORE_DIMS if d in value.coords and value[d].ndim == 0 and d not in value.dims]
            if dropped:
                raise AnalysisError(f"{fn.__name__}: {name!r} has a scalar {dropped[0]!r} coordinate, not a "
                                    f"{dropped[0]!r} dimension; select with a list to keep it, e.g. "
                                    f"ds.isel({dropped[0]}=[0]) instead of ds.isel({dropped[0]}=0)")
        return fn(*args, **kwargs)

    return checked


pair_samples = _takes_datasets(pair_samples)  # stats' helper, public here: checked like the analyses


@_takes_datasets
def require(ds: xr.Dataset, *names: str, needed_for: str | None = None, label: str | None = None) -> None:
    """Raise :class:`AnalysisError` naming the first of ``names`` (``"schedule"``: a dimension) that ``ds`` lacks."""
    for name in names:
        if name not in ds.dims if name == "schedule" else name not in ds.variables:
            what = f"{label}: the dataset" if label else "the dataset"
            kind = "dimension" if name == "schedule" else "variable"
            purpose = f", which {needed_for} needs" if needed_for else ""
            raise AnalysisError(f"{what} has no {name!r} {kind}{purpose}: {_HOW_TO_GET.get(name, _HOW_TO_GET_DEFAULT)}")


def _strings(values: Any) -> np.ndarray:
    """Any string array (numpy StringDType included) as an object array of ``str``."""
    arr = np.asarray(values)
    return np.array([str(v) for v in arr.ravel().tolist()], dtype=object).reshape(arr.shape)


def _select_branch(ds: xr.Dataset, branch: str | None) -> xr.Dataset:
    """One CFG branch: ``None`` means ``cond`` when the store holds both, else what it holds."""
    if "branch" in ds.dims:
        held = [str(v) for v in ds["branch"].values]
        return ds.sel(branch=choice(("cond" if "cond" in held else held[0]) if branch is None else branch, held,
                                    "branch"))
    stored = branch_of(ds) if "branch" in ds.coords else ds.attrs.get("branch")  # ds.sel(branch=...) leaves a scalar
    if branch is not None and stored is not None and stored != branch:
        raise AnalysisError(f"this store recorded the {stored!r} branch only, not {branch!r}; "
                            f"choose {stored!r} or leave the branch unset")  # branch= or --branch
    return ds


def schedule_of(ds: xr.Dataset) -> str:
    """The scalar ``schedule`` coordinate ``sweep.sel(schedule=...)`` leaves, else the attribute."""
    if "schedule" in ds.coords and ds["schedule"].ndim == 0:
        return str(ds["schedule"].values)
    return str(ds.attrs.get("schedule", ""))


def branch_of(ds: xr.Dataset) -> str:
    """The CFG branch the data is from: the scalar ``branch`` coordinate a selection leaves, else the attribute."""
    if "branch" in ds.coords and ds["branch"].ndim == 0:
        return str(ds["branch"].values)
    return str(ds.attrs.get("branch", "cond"))


def _result_attrs(quantity: str, variable: str, ds: xr.Dataset, baseline: xr.Dataset | None = None,
                  **extra: Any) -> dict[str, Any]:
    """The attrs every result carries (figure titles read them): what it is, the store variable, model and
    CFG branch it came from, and its ``schedule`` (one run; a sweep's are its dim) or, for a pair,
    ``treated_schedule``/``baseline_schedule``; then ``extra``. None is left out: netCDF refuses it."""
    runs = ({"treated_schedule": schedule_of(ds), "baseline_schedule": schedule_of(baseline)} if baseline is not None
            else {} if "schedule" in ds.dims else {"schedule": schedule_of(ds)})
    out = {"quantity": quantity, "variable": variable, "model": str(ds.attrs.get("model", "")),
           "branch": branch_of(ds), **runs, **extra}
    return {k: v for k, v in out.items() if v is not None}


def _one_run(ds: xr.Dataset, what: str) -> None:
    extra = [d for d in ("schedule", "branch") if d in ds.dims]
    if extra:
        raise AnalysisError(
            f"{what} works on one run; select first, e.g. ds.sel({extra[0]}=...) "
            f"(the {extra[0]} dimension holds {', '.join(map(str, ds[extra[0]].values[:6]))})"
        )


def _check_same_structure(a: xr.Dataset, b: xr.Dataset, dims: Sequence[str]) -> None:
    diffs = []
    for d in (d for d in dims if d in a.dims or d in b.dims):
        if a.sizes.get(d) != b.sizes.get(d):
            diffs.append(f"{d}: {a.sizes.get(d)} vs {b.sizes.get(d)}")
        elif d == "layer" and list(map(str, a["layer"].values)) != list(map(str, b["layer"].values)):
            diffs.append("layer names differ")
        elif d == "step" and d in a.coords and d in b.coords and not np.array_equal(a["step"], b["step"]):
            diffs.append(f"steps {a['step'].values.tolist()} vs {b['step'].values.tolist()}")  # e.g. isel(step=...)
    if branch_of(a) != branch_of(b):  # e.g. a store recorded with --branch uncond against a cond one
        diffs.append(f"CFG branch {branch_of(a)} vs {branch_of(b)}")
    if diffs:
        raise AnalysisError("the two datasets do not have the same structure (different model or settings): "
                            + "; ".join(diffs))


def _pick_steps(steps: int | Sequence[int], valid: Sequence[int], where: str) -> list[int]:
    sel = index_list(steps, "steps", f"steps in {where}: {valid[0]}..{valid[-1]}", AnalysisError)
    bad = [s for s in sel if s not in valid]
    if bad:
        raise AnalysisError(f"step(s) {bad} not in {where}; steps: {valid[0]}..{valid[-1]}")
    return sel


def _match_layers(ds: xr.Dataset, layers: str | Sequence[str]) -> list[str]:
    """Layer names matching a block type, an fnmatch glob on the module path, or a list of them."""
    names = [str(v) for v in np.asarray(ds["layer"].values)]
    bts = [str(v) for v in np.asarray(ds["block_type"].values)] if "block_type" in ds.variables else [None] * len(names)
    patterns = [layers] if isinstance(layers, str) else layers
    if isinstance(patterns, (np.ndarray, xr.DataArray)):  # e.g. ds.layer.values[:2]
        patterns = np.asarray(patterns).tolist()
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise AnalysisError(f"layers must be a block type, a glob on the module path or a list of them, "
                            f"got {layers!r}; layers: {', '.join(names)}")
    out = [n for n, bt in zip(names, bts) if any(fnmatch.fnmatchcase(n, p) or bt == p for p in patterns)]
    if not out:
        raise AnalysisError(f"layers {layers!r} match no layer; layers: {', '.join(names)}")
    return out


@_takes_datasets
def uniform_reference(ds: xr.Dataset) -> float:
    """``N_txt / (N_txt + N_vis)``: the visual->text mass under uniform attention over all keys.

    From the ``n_txt``/``n_vis`` attributes (padding counts as text), else the ``token`` and ``y`` x ``x`` sizes.
    """
    n_txt = ds.attrs.get("n_txt", ds.sizes.get("token"))
    n_vis = ds.attrs.get("n_vis")
    if n_vis is None and "y" in ds.sizes and "x" in ds.sizes:
        n_vis = ds.sizes["y"] * ds.sizes["x"]
    if n_txt is None or n_vis is None:
        raise AnalysisError("cannot tell N_txt and N_vis: the dataset has neither n_txt/n_vis attributes "
                            "nor token/y/x dims")
    return float(n_txt) / (float(n_txt) + float(n_vis))


@_takes_datasets
def layer_groups(ds: xr.Dataset, *, by: str = "block_type", n_groups: int = 3) -> dict[str, list[int]]:
    """Label -> layer positions, in model order.

    ``by``: ``"block_type"`` (``joint``, ``single``, in order of appearance), ``"layer"`` (one group per
    module path), ``"depth"`` (``n_groups`` contiguous groups, labelled ``"layers 0-3"``) or ``"all"``.
    """
    choice(by, GROUP_BY, "grouping 'by'")
    layers = [str(v) for v in np.asarray(ds["layer"].values)]
    if not layers:  # e.g. ds.sel(layer=ds.block_type == "single") of SD3, which has joint blocks only
        raise AnalysisError("no layer to group: the 'layer' dimension is empty; select at least one layer")
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
    positive_int(n_groups, "n_groups", error=AnalysisError)
    parts = np.array_split(np.arange(len(layers)), min(int(n_groups), len(layers)))
    return {(f"layer {p[0]}" if p[0] == p[-1] else f"layers {p[0]}-{p[-1]}"): p.tolist() for p in parts}


def _group_layers(da: xr.DataArray, ds: xr.Dataset, by: str, n_groups: int) -> xr.DataArray:
    """Mean over the layers of each group: the ``layer`` dim becomes ``by`` (reduced for ``all``)."""
    groups = layer_groups(ds, by=by, n_groups=n_groups)
    if by in ("all", "layer"):
        return da.mean("layer") if by == "all" else da
    out = xr.concat([da.isel(layer=idx).mean("layer") for idx in groups.values()], dim=by)
    return out.assign_coords({by: np.array(list(groups), dtype=object),
                              "n_layers": (by, [len(v) for v in groups.values()])})


def _per_sample(ds: xr.Dataset, variable: str, *, by: str, n_groups: int, steps: list[int] | None = None,
                ) -> xr.DataArray:
    """Mean of ``variable`` over heads (and ``steps``) and the layers of each group, still lazy.

    Dims: (sample, [schedule,] group, step): groups as rows, steps as columns.
    """
    require(ds, variable)
    da = ds[variable].reset_coords(drop=True)
    if steps is not None:
        da = da.sel(step=steps)
    dims = [d for d in ("step", "head") if d in da.dims and (steps is not None or d == "head")]
    da = da.mean(dims) if dims else da
    da = _group_layers(da, ds, by, n_groups)
    return da.transpose(*[d for d in ("sample",) if d in da.dims], ..., *[d for d in (by, "step") if d in da.dims])


def _step_coords(ds: xr.Dataset) -> dict[str, Any]:
    """``timestep`` and ``sigma`` along ``step``: the mean over samples (and schedules)."""
    out: dict[str, Any] = {}
    for name in ("timestep", "sigma"):
        if name in ds.variables and "step" in ds[name].dims:
            da = ds[name].reset_coords(drop=True)
            other = [d for d in da.dims if d != "step"]
            out[name] = ("step", np.asarray(da.mean(other).values if other else da.values, dtype=float))
    return out


@_takes_datasets
def suppression(ds: xr.Dataset, *, by: str = "block_type", variable: str = "vis_txt_mass", ci: float = 0.95,
                n_resamples: int = 2000, seed: int = 0, method: str = "BCa", branch: str | None = None,
                n_groups: int = 3) -> xr.Dataset:
    """Relative magnitude of full MM-DiT attention against cross-attention (the paper's Fig. 2).

    For a visual query it *is* the visual->text mass (``variable``: as applied, or ``vis_txt_mass_ref``
    at gamma = 1), averaged per sample over heads and the layers of each group (``by``, one of
    :data:`GROUP_BY`), with a bootstrap CI across samples. A sweep's ``schedule`` dim is kept.

    Returns ``mean``, ``ci_low``, ``ci_high``, ``n`` over (``by``, ``step``) with ``timestep`` and
    ``sigma`` along ``step``; scalars ``uniform_reference`` and ``cross_attention_reference`` (1).
    """
    choice(variable, ("vis_txt_mass", "vis_txt_mass_ref"), "variable")
    ds = _select_branch(ds, branch)
    x = _per_sample(ds, variable, by=by, n_groups=n_groups)
    res = bootstrap_mean(x, ci=ci, n_resamples=n_resamples, seed=seed, method=method).assign_coords(_step_coords(ds))
    uniform = uniform_reference(ds)
    res["uniform_reference"] = xr.DataArray(uniform, attrs={"long_name": "uniform attention N_txt / (N_txt + N_vis)"})
    res["cross_attention_reference"] = xr.DataArray(1.0, attrs={"long_name": "cross-attention (text keys only)"})
    res["mean"].attrs = {"long_name": "relative magnitude of visual->text attention (full / cross)", "units": "1"}
    res.attrs.update(_result_attrs("suppression", variable, ds, by=by, uniform_reference=uniform,
                                   cross_attention_reference=1.0, n_samples=int(ds.sizes["sample"]),
                                   n_txt=ds.attrs.get("n_txt"), n_vis=ds.attrs.get("n_vis")))
    return res


@_takes_datasets
def amplification(ds: xr.Dataset, *, by: str = "block_type", ci: float = 0.95, n_resamples: int = 2000,
                  seed: int = 0, method: str = "BCa", branch: str | None = None, n_groups: int = 3) -> xr.Dataset:
    """What TACA does to the visual->text mass: per sample, ``vis_txt_mass`` over ``vis_txt_mass_ref``.

    Returns ``mean``, ``ci_low``, ``ci_high``, ``n`` over (``by``, ``step``) with the coordinates
    ``timestep`` and ``gamma`` (mean gamma applied in the group).
    """
    ds = _select_branch(ds, branch)
    require(ds, "vis_txt_mass_ref")
    num, den = (_per_sample(ds, v, by=by, n_groups=n_groups) for v in ("vis_txt_mass", "vis_txt_mass_ref"))
    res = bootstrap_mean(num / den, ci=ci, n_resamples=n_resamples, seed=seed, method=method)
    coords = _step_coords(ds)
    if "gamma" in ds.variables:
        g = _per_sample(ds, "gamma", by=by, n_groups=n_groups)
        coords["gamma"] = (g.mean("sample") if "sample" in g.dims else g).compute()
    res = res.assign_coords(coords)
    res["mean"].attrs = {"long_name": "visual->text mass, applied / gamma=1", "units": "1"}
    res.attrs.update(_result_attrs("amplification", "vis_txt_mass / vis_txt_mass_ref", ds, by=by,
                                   n_samples=int(ds.sizes["sample"])))
    return res


@_takes_datasets
def compare_runs(treated: xr.Dataset, baseline: xr.Dataset, *, variable: str = "vis_txt_mass",
                 by: str = "block_type", test: str = "wilcoxon", alternative: str = "two-sided", ci: float = 0.95,
                 n_resamples: int = 2000, seed: int = 0, method: str = "BCa", branch: str | None = None,
                 n_groups: int = 3) -> xr.Dataset:
    """Paired comparison of a TACA store against a baseline store, samples paired by (prompt, seed, batch_index).

    Per-sample group means of ``variable``; their differences get a bootstrap CI and a paired ``test``
    (:data:`PAIRED_TESTS`; ``alternative="greater"``: treated > baseline). Refuses stores whose samples
    do not pair or that differ in steps, layers or heads.

    Returns ``treated``, ``baseline`` (means), ``diff`` with ``diff_ci_low``/``diff_ci_high``, ``ratio``,
    ``statistic`` and ``pvalue`` (1 where every difference is 0) over (``by``, ``step``).
    """
    choice(variable, MASS_VARIABLES, "variable")
    choice(test, PAIRED_TESTS, "paired test")
    choice(alternative, ("two-sided", "greater", "less"), "alternative")
    check_stats_options(ci, n_resamples, method, seed)
    treated, baseline = _select_branch(treated, branch), _select_branch(baseline, branch)  # before the one-run check
    for d in (treated, baseline):
        _one_run(d, "compare_runs")
    _check_same_structure(treated, baseline, ("step", "layer", "head"))
    t, b = paired(treated, baseline)
    xt, xb = (_per_sample(d, variable, by=by, n_groups=n_groups).compute() for d in (t, b))
    boot = bootstrap_mean(xt - xb, ci=ci, n_resamples=n_resamples, seed=seed, method=method)
    stat, p = paired_test(*(x.transpose("sample", ...).values.astype(float) for x in (xt, xb)),
                          test=test, alternative=alternative)
    template = boot["mean"]
    mt, mb = xt.mean("sample"), xb.mean("sample")
    res = xr.Dataset({
        "treated": mt, "baseline": mb,
        "diff": boot["mean"], "diff_ci_low": boot["ci_low"], "diff_ci_high": boot["ci_high"], "ratio": mt / mb,
        "statistic": template.copy(data=stat.reshape(template.shape)),
        "pvalue": template.copy(data=p.reshape(template.shape)),
    }).assign_coords(_step_coords(treated))
    res.attrs.update(_result_attrs("paired comparison", variable, treated, baseline, by=by, test=test,
                                   alternative=alternative, n_pairs=int(xt.sizes["sample"]), ci=float(ci),
                                   method=method, n_resamples=int(n_resamples), seed=int(seed)))
    return res


@_takes_datasets
def timestep_awareness(ds: xr.Dataset, *, by: str = "layer", variable: str = "vis_txt_mass", split: float = 500.0,
                       ci: float = 0.95, n_resamples: int = 2000, seed: int = 0, method: str = "BCa",
                       branch: str | None = None, n_groups: int = 3) -> xr.Dataset:
    """How the visual->text mass changes with the timestep, per layer (the paper's second problem).

    Returns, per group (``by``), ``slope`` (least squares against ``t / 1000``; > 0: more text attention
    at high noise), ``early_mass`` / ``late_mass`` (steps with ``t >= split`` / ``t < split``),
    ``early_late_ratio`` (the mean of each sample's early / late, not the ratio of the two means) and
    ``mass`` (``by``, ``step``), each with ``*_ci_low`` / ``*_ci_high`` across samples.
    """
    choice(variable, MASS_VARIABLES, "variable")
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 <= split <= 1000:
        raise AnalysisError(f"split must be a timestep in 0..1000, got {split!r}")
    ds = _select_branch(ds, branch)
    require(ds, "timestep")
    kw = {"ci": ci, "n_resamples": n_resamples, "seed": seed, "method": method}
    check_stats_options(ci, n_resamples, method, seed)
    x = _per_sample(ds, variable, by=by, n_groups=n_groups).compute()
    t = ds["timestep"].reset_coords(drop=True).astype(float).compute()
    u = t / 1000.0
    uc, xc = u - u.mean("step"), x - x.mean("step")
    with np.errstate(all="ignore"):
        slope = (uc * xc).sum("step") / (uc**2).sum("step")
        early = x.where(t >= split).mean("step")
        late = x.where(t < split).mean("step")
        ratio = early / late
    out: dict[str, xr.DataArray] = {}
    for name, da in (("mass", x), ("slope", slope), ("early_mass", early), ("late_mass", late),
                     ("early_late_ratio", ratio)):
        b = bootstrap_mean(da, **kw)
        out.update({name: b["mean"], f"{name}_ci_low": b["ci_low"], f"{name}_ci_high": b["ci_high"]})
    res = xr.Dataset(out).assign_coords(_step_coords(ds))
    res["slope"].attrs = {"long_name": "d(mass) / d(t/1000)", "units": "mass per 1000 timesteps"}
    res.attrs.update(_result_attrs("timestep awareness", variable, ds, by=by, split=float(split),
                                   n_samples=int(ds.sizes["sample"]), uniform_reference=uniform_reference(ds), **kw))
    return res


@_takes_datasets
def recorded_map_steps(ds: xr.Dataset) -> list[int]:
    """The steps at which ``ds`` holds maps (from its map selection; all steps if unknown)."""
    require(ds, "maps")
    sel = MapSelection.from_attrs(ds.attrs)
    return [s for s in map(int, ds["step"].values) if sel is None or sel.steps is None or s in sel.steps]


@_takes_datasets
def recorded_map_layers(ds: xr.Dataset) -> list[str]:
    """The layers for which ``ds`` holds maps (from its map selection; all layers if unknown)."""
    globs = getattr(MapSelection.from_attrs(ds.attrs), "layers", None)
    return [n for n in map(str, np.asarray(ds["layer"].values))
            if globs is None or any(fnmatch.fnmatchcase(n, g) for g in globs)]


def readable_token(text: str) -> str:
    """A token as a person reads it: tokenizer markers removed (``red</w>`` -> ``red``, ``▁a`` -> ``a``)."""
    t = str(text)
    for marker in ("</w>", "Ġ", "▁"):
        t = t.replace(marker, "")
    return t.strip() or repr(str(text))


def _first_few(values: list, n: int = 5) -> str:
    """A long list as its first few and the count: a refusal stays one readable line."""
    return str(values) if len(values) <= n else f"{str(values[:n])[:-1]}, ...] ({len(values)} in all)"


@_takes_datasets
def map_difference(treated: xr.Dataset, baseline: xr.Dataset, *, steps: int | Sequence[int] | None = None,
                   layers: str | Sequence[str] | None = None, tokens: str | Sequence[int] = "prompt",
                   branch: str | None = None) -> xr.Dataset:
    """TACA minus baseline visual->text attention maps per text token (the paper's Fig. 3).

    Samples pair by (prompt, seed, batch_index); a map is the head- and layer-mean probability each image token
    (latent ``y`` x ``x`` grid) puts on a text token. ``steps``: default every step with maps in both
    stores; ``layers``: default every layer with maps, else a block type, a glob on the module path or
    a list; ``tokens``: ``"prompt"`` (not padding in some sample), ``"all"`` or positions.

    Returns ``treated``, ``baseline``, ``diff`` (sample, step, token, y, x; NaN where not recorded);
    ``token_change``, ``token_abs_change`` (mean (absolute) diff over the grid) and
    ``token_relative_change`` (over the baseline mean) over (sample, step, token);
    ``treated_image`` / ``baseline_image``; token and sample coordinates.
    """
    treated, baseline = _select_branch(treated, branch), _select_branch(baseline, branch)  # before the one-run check
    for d, which in ((treated, "treated"), (baseline, "baseline")):
        require(d, "maps", needed_for="the attention-map difference (Fig. 3)", label=f"the {which} store")
        _one_run(d, "map_difference")
    _check_same_structure(treated, baseline, ("step", "layer", "token", "y", "x"))
    treated, baseline = paired(treated, baseline)

    available = [s for s in recorded_map_steps(treated) if s in set(recorded_map_steps(baseline))]
    if not available:
        raise AnalysisError("the two stores have no step with maps in common; record both with the same --maps")
    if steps is None:
        steps_sel = available
    else:
        steps_sel = index_list(steps, "steps", f"steps with maps: {available}", AnalysisError)
        bad = [s for s in steps_sel if s not in available]
        if bad:
            raise AnalysisError(f"no maps at step(s) {_first_few(bad)} in both stores; steps with maps: {available}")
    recorded = [n for n in recorded_map_layers(treated) if n in set(recorded_map_layers(baseline))]
    layer_sel = recorded if layers is None else _match_layers(treated, layers)
    missing = [n for n in layer_sel if n not in recorded]
    if missing:
        raise AnalysisError(f"no maps for layer(s) {', '.join(missing)}; layers with maps: {', '.join(recorded)}")
    if not layer_sel:
        raise AnalysisError("the two stores have no layer with maps in common; record both with the same --maps")

    n_tok = treated.sizes["token"]
    if isinstance(tokens, str):
        choice(tokens, ("prompt", "all"), "tokens")
        pad = np.asarray(treated["token_is_padding"].values, dtype=bool)
        tok_idx = np.flatnonzero(~pad.all(axis=0)) if tokens == "prompt" else np.arange(n_tok)
    else:
        valid = f"'prompt', 'all' or positions 0..{n_tok - 1}"
        tok_idx = np.array(sorted(set(index_list(tokens, "tokens", valid, AnalysisError))), dtype=np.int64)
        bad = [int(t) for t in tok_idx if not 0 <= t < n_tok]
        if bad:
            raise AnalysisError(f"token positions {_first_few(bad)} out of range 0..{n_tok - 1}")

    t, b = (d["maps"].reset_coords(drop=True).isel(token=tok_idx).sel(step=steps_sel, layer=layer_sel)
            .astype("float32").mean("layer").transpose("sample", "step", "token", "y", "x").compute()
            for d in (treated, baseline))
    diff = t - b
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        change = diff.mean(("y", "x"))
        res = xr.Dataset({
            "treated": t, "baseline": b, "diff": diff, "token_change": change,
            "token_abs_change": abs(diff).mean(("y", "x")), "token_relative_change": change / b.mean(("y", "x")),
        })
    tsub = treated.isel(token=tok_idx)
    res = res.assign_coords({**{name: tsub[name].reset_coords(drop=True).compute().variable for name in
                                ("prompt", "seed", "batch_index", "token_text", "token_is_padding", "token_source")
                                if name in tsub.variables}, **_step_coords(treated.sel(step=steps_sel))})
    for name, d in (("treated_image", treated), ("baseline_image", baseline)):
        if "image" in d.variables:
            res[name] = d["image"].reset_coords(drop=True).compute()
    res["diff"].attrs = {"long_name": "attention probability, treated - baseline", "units": "1"}
    res.attrs.update(_result_attrs("attention-map difference", "maps", treated, baseline, layers=list(layer_sel),
                                   n_layers=len(layer_sel), n_pairs=int(t.sizes["sample"])))
    return res


@_takes_datasets
def token_ranking(ds: xr.Dataset, *, steps: int | Sequence[int] | None = None,
                  layers: str | Sequence[str] | None = None, top: int | None = 10,
                  branch: str | None = None) -> xr.Dataset:
    """Which text tokens receive the most visual attention, per prompt (mean over its seeds).

    ``token_mass`` is averaged over ``steps`` and ``layers`` (as in :func:`map_difference`) and each
    prompt's samples, then ranked keeping ``top`` tokens (``None``: all); padding tokens (the same in
    every prompt, often soaking up much of the mass) are ranked separately.

    Returns along (``prompt``, ``rank``): ``token`` (-1 past the end), ``token_text``, ``token_source``,
    ``mass``, ``share``; the same as ``padding_*`` along ``padding_rank``; per prompt the masses,
    ``padding_share`` and counts.
    """
    require(ds, "token_mass", "token_text", "token_is_padding", "prompt")
    positive_int(top, "top", none_ok=True, error=AnalysisError)
    ds = _select_branch(ds, branch)  # before the one-run check: branch= is how a two-branch store is ranked
    _one_run(ds, "token_ranking")
    da = ds["token_mass"].reset_coords(drop=True)
    if steps is not None:
        da = da.sel(step=_pick_steps(steps, [int(s) for s in ds["step"].values], "the store"))
    if layers is not None:
        da = da.sel(layer=_match_layers(ds, layers))
    prompts = [str(p) for p in np.asarray(ds["prompt"].values)]
    order = list(dict.fromkeys(prompts))
    if not order:
        raise AnalysisError("the dataset holds no sample")
    per_sample = da.mean(("step", "layer")).transpose("sample", "token").astype(float).compute()
    # mean over each prompt's samples; groupby sorts the prompts, the table keeps their order of appearance
    by_prompt = per_sample.groupby(xr.DataArray(prompts, dims="sample", name="prompt"))
    mass = by_prompt.mean("sample", skipna=False).sel(prompt=order).values
    first = [prompts.index(p) for p in order]  # the token texts and padding of a prompt's first sample
    texts = _strings(ds["token_text"].values)[first]
    padding = np.asarray(ds["token_is_padding"].values, dtype=bool)[first]
    sources = _strings(ds["token_source"].values) if "token_source" in ds.variables else None
    totals = {name: np.array([float(np.nansum(m[sel])) for m, sel in zip(mass, mask)]) for name, mask in
              (("prompt_token_mass", ~padding), ("padding_token_mass", padding), ("total_mass", np.ones_like(padding)))}
    total = totals["total_mass"][:, None]
    data: dict[str, Any] = {}
    with np.errstate(all="ignore"):
        for prefix, dim, mask in (("", "rank", ~padding), ("padding_", "padding_rank", padding)):
            count = int(mask.sum(axis=1).max())
            k = max(count if top is None else min(int(top), max(count, 1)), 1)
            pos = np.lexsort((-mass, ~mask), axis=-1)[:, :k]  # this group's tokens first, by falling mass
            ok = np.take_along_axis(mask, pos, axis=1)
            top_mass = np.where(ok, np.take_along_axis(mass, pos, axis=1), np.nan)
            table = {"token": np.where(ok, pos, -1), "token_text": np.where(ok, np.take_along_axis(texts, pos, 1), ""),
                     "token_source": np.where(ok, sources[pos], "") if sources is not None else np.full(pos.shape, ""),
                     "mass": top_mass, "share": np.where(total > 0, top_mass / total, np.nan)}
            data.update({f"{prefix}{name}": (("prompt", dim), v.astype(str) if v.dtype.kind in "OU" else v)
                         for name, v in table.items()})
        totals["padding_share"] = np.where(total[:, 0] > 0, totals["padding_token_mass"] / total[:, 0], np.nan)
    data.update({name: (("prompt",), v) for name, v in totals.items()})
    data.update({name: (("prompt",), np.asarray(v, np.int64)) for name, v in (
        ("n_prompt_tokens", (~padding).sum(axis=1)), ("n_padding_tokens", padding.sum(axis=1)),
        ("n_samples", [prompts.count(p) for p in order]))})
    res = xr.Dataset(data, coords={"prompt": order, "rank": np.arange(1, data["token"][1].shape[1] + 1),
                                   "padding_rank": np.arange(1, data["padding_token"][1].shape[1] + 1)})
    res.attrs.update(_result_attrs("token ranking", "token_mass", ds, n_samples=int(ds.sizes["sample"]),
                                   n_tokens=int(da.sizes["token"]), steps="all" if steps is None else str(steps),
                                   layers="all" if layers is None else str(layers)))
    return res


def _active_steps(ds: xr.Dataset) -> list[int]:
    """Steps where some schedule applied gamma != 1 in some layer."""
    if "gamma" not in ds.variables:
        return []
    g = ds["gamma"].reset_coords(drop=True)
    active = (abs(g - 1.0) > 1e-6).any([d for d in g.dims if d != "step"])
    return [int(s) for s, a in zip(ds["step"].values, np.asarray(active.values)) if a]


@_takes_datasets
def mass_vs_gamma(sweep: xr.Dataset, *, variable: str = "vis_txt_mass", by: str = "all",
                  steps: str | int | Sequence[int] = "active", ci: float = 0.95, n_resamples: int = 2000,
                  seed: int = 0, method: str = "BCa", branch: str | None = None, n_groups: int = 3) -> xr.Dataset:
    """Visual->text mass against the sweep's schedules (the curve of the paper's Fig. 4).

    Per sample and schedule, ``variable`` is averaged over heads, the layers of each group and ``steps``:
    ``"active"`` (the steps where some schedule applied gamma != 1, the same for every schedule; step 0
    if none), ``"all"``, or step indices; the mean across samples gets a bootstrap CI.

    Returns ``mean``, ``ci_low``, ``ci_high``, ``n`` over (``schedule``[, ``by``]) with the
    coordinates ``gamma0`` and ``t_thresh``; ``uniform_reference``; the steps in ``attrs["steps"]``.
    """
    require(sweep, "schedule", needed_for="the gamma sweep (Fig. 4)")
    choice(variable, MASS_VARIABLES, "variable")
    ds = _select_branch(sweep, branch)
    valid = [int(s) for s in ds["step"].values]
    if isinstance(steps, str):
        choice(steps, ("active", "all"), "steps")
        sel = (_active_steps(ds) or valid[:1]) if steps == "active" else valid
    else:
        sel = _pick_steps(steps, valid, "the sweep")
    x = _per_sample(ds, variable, by=by, n_groups=n_groups, steps=sel)
    res = bootstrap_mean(x, ci=ci, n_resamples=n_resamples, seed=seed, method=method)
    per_schedule = [name for name in ("gamma0", "t_thresh") if name in ds.variables and ds[name].dims == ("schedule",)]
    res = res.assign_coords({name: ("schedule", np.asarray(ds[name].values, dtype=float)) for name in per_schedule})
    t = _step_coords(ds.sel(step=sel)).get("timestep")
    res["uniform_reference"] = xr.DataArray(uniform_reference(ds))
    res["mean"].attrs = {"long_name": f"{variable} (mean over steps {sel})", "units": "1"}
    res.attrs.update(_result_attrs("mass vs gamma", variable, ds, by=by, steps=sel,
                                   timesteps=[] if t is None else [round(float(v), 3) for v in t[1]],
                                   n_samples=int(ds.sizes["sample"])))
    return res


def on_grid(specs: Sequence[Any]) -> np.ndarray:
    """Per schedule spec, whether its ``gamma0`` and ``t_thresh`` place it on the sweep's grid: a schedule
    restricted to some blocks or layers keeps its base's numbers but is another intervention."""
    return np.array([not isinstance(parse(str(s)), RestrictedSchedule) for s in specs], dtype=bool)


@_takes_datasets
def gamma_image_grid(sweep: xr.Dataset, *, t_thresh: float | None = None, seed: int | None = None) -> xr.DataArray:
    """Images across the gamma sweep: (prompt, schedule, image_y, image_x, channel) uint8.

    Columns are the schedules with threshold ``t_thresh`` (default 970 if the sweep has it, else
    its most common threshold) plus the gamma0 = 1 baseline, ordered by ``gamma0``; rows are the
    prompts, each with sample ``seed`` (default: the sweep's first seed).
    """
    require(sweep, "schedule", "image", needed_for="the gamma-sweep image grid (Fig. 4)")
    n_sched = sweep.sizes["schedule"]
    g0, tt = (np.asarray(sweep[n].values, float) if n in sweep.variables else np.full(n_sched, np.nan)
              for n in ("gamma0", "t_thresh"))
    tt = np.where(on_grid(sweep["schedule"].values), tt, np.nan)  # a restricted schedule is no column of a threshold
    finite = [float(v) for v in tt if np.isfinite(v)]
    if t_thresh is None and finite:
        values, counts = np.unique(finite, return_counts=True)
        t_thresh = 970.0 if 970.0 in finite else float(values[np.argmax(counts)])
    if t_thresh is not None and finite and float(t_thresh) not in finite:
        raise AnalysisError(f"no schedule with t_thresh {t_thresh:g}; thresholds in the sweep: "
                            f"{', '.join(f'{v:g}' for v in sorted(set(finite)))}")
    if t_thresh is None or not finite:
        cols = list(range(n_sched))
    else:
        cols = [i for i in range(n_sched) if (np.isfinite(tt[i]) and tt[i] == float(t_thresh))
                or (not np.isfinite(tt[i]) and g0[i] == 1.0)]
    cols.sort(key=lambda i: (g0[i] if np.isfinite(g0[i]) else math.inf, i))
    keys = sample_keys(sweep)
    if seed is None:
        if not keys:
            raise AnalysisError("the sweep holds no sample")
        seed = keys[0][1]
    rows: dict[str, int] = {}
    for i, (p, s, b) in enumerate(keys):
        if s == int(seed) and b == 0:
            rows.setdefault(p, i)
    if not rows:
        raise AnalysisError(f"no sample with seed {seed}; seeds in the sweep: {sorted({k[1] for k in keys})}")
    img = sweep["image"].reset_coords(drop=True).isel(schedule=cols, sample=list(rows.values()))
    img = img.rename(sample="prompt").assign_coords(prompt=list(rows))
    img = img.transpose("prompt", "schedule", "image_y", "image_x", "channel").compute()
    img = img.assign_coords(gamma0=("schedule", g0[cols]), t_thresh=("schedule", tt[cols]))
    img.attrs.update(_result_attrs("gamma image grid", "image", sweep, branch=None, seed=int(seed),
                                   t_thresh=float("nan") if t_thresh is None else float(t_thresh)))
    return img
