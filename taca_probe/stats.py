"""Statistics over samples: seeded bootstrap intervals (scipy's BCa), sample keys and pairing, paired tests."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import xarray as xr

from .errors import TacaProbeError
from .selection import MAX_INT, is_seed, positive_int

__all__ = ["AnalysisError", "BOOTSTRAP_METHODS", "PAIRED_TESTS", "bootstrap_mean", "bootstrap_ci",
           "sample_keys", "pair_samples", "paired", "paired_test"]

#: Bootstrap interval methods of :func:`scipy.stats.bootstrap`.
BOOTSTRAP_METHODS = ("BCa", "percentile", "basic")
#: Paired tests: :func:`scipy.stats.wilcoxon` (signed-rank) or :func:`scipy.stats.ttest_rel`.
PAIRED_TESTS = ("wilcoxon", "ttest")
# scipy renamed random_state to rng (1.15); pass the seeded Generator under the name it takes
_RNG_ARG = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


class AnalysisError(TacaProbeError, ValueError):
    """Bad input to an analysis function: a missing variable, an unknown option, unpaired stores."""


def choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise AnalysisError(f"unknown {what} {value!r}; choose from {', '.join(map(str, choices))}")
    return value


def check_stats_options(ci: float, n_resamples: int, method: str, seed: Any = 0) -> None:
    if not is_seed(seed):
        raise AnalysisError(f"seed must be an integer in 0..{MAX_INT}, got {seed!r}")
    if not isinstance(ci, (int, float)) or not 0.0 < float(ci) < 1.0:
        raise AnalysisError(f"ci must be a confidence level between 0 and 1 (e.g. 0.95), got {ci!r}")
    positive_int(n_resamples, "n_resamples", error=AnalysisError)
    choice(method, BOOTSTRAP_METHODS, "bootstrap method")


def _scipy_ci(data: tuple[np.ndarray, ...], statistic: Any, *, ci: float, n_resamples: int, seed: Any,
              method: str) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap CI of ``statistic`` along axis 0 of the (n, m) arrays ``data`` (resampled together)."""
    n, m = data[0].shape
    batch = max(1, int(2e7 // max(1, n * m)))  # bound the resample array to ~160 MB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = scipy.stats.bootstrap(
            data, statistic, axis=0, vectorized=True, paired=len(data) > 1, n_resamples=int(n_resamples),
            batch=batch, confidence_level=float(ci), method=method, **{_RNG_ARG: np.random.default_rng(seed)},
        )
    low = np.atleast_1d(np.asarray(res.confidence_interval.low, dtype=float))
    high = np.atleast_1d(np.asarray(res.confidence_interval.high, dtype=float))
    bad = ~(np.isfinite(low) & np.isfinite(high))
    if bad.any() and method != "percentile":  # BCa degenerates on tied resamples: percentile there
        lo2, hi2 = _scipy_ci(tuple(d[:, bad] for d in data), statistic, ci=ci, n_resamples=n_resamples, seed=seed,
                             method="percentile")
        low[bad], high[bad] = lo2, hi2
    return low, high


def bootstrap_mean(da: xr.DataArray, *, dim: str = "sample", ci: float = 0.95, n_resamples: int = 2000,
                   seed: int = 0, method: str = "BCa") -> xr.Dataset:
    """Mean along ``dim`` with a seeded bootstrap confidence interval, for every other position.

    ``da`` is computed here (reduce a dask-backed array to per-sample values first); ``method`` is one of
    :data:`BOOTSTRAP_METHODS`. Returns ``mean``, ``ci_low``, ``ci_high`` and ``n`` (finite observations)
    over the other dims: NaNs are left out position by position; fewer than 2 finite observations give
    a NaN interval, observations all equal ``[value, value]``.
    """
    check_stats_options(ci, n_resamples, method, seed)
    if not isinstance(da, xr.DataArray):
        raise AnalysisError(f"bootstrap_mean takes one xarray.DataArray (e.g. ds['vis_txt_mass']), "
                            f"got {type(da).__name__}")
    if dim not in da.dims:
        raise AnalysisError(f"dimension {dim!r} not in the data; dims are {', '.join(map(str, da.dims))}")
    if da.sizes[dim] == 0:  # e.g. a store with no complete sample: nothing to average (or to reshape)
        raise AnalysisError(f"no data to average: 0 {dim}s along {dim!r} (a store with no complete sample?); "
                            f"record or select at least one")
    da = da.transpose(dim, ...)
    flat = np.asarray(da.values, dtype=float).reshape(da.sizes[dim], -1)
    n, m = flat.shape
    finite = np.isfinite(flat)
    count = finite.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo_all, hi_all = (f(flat, axis=0) for f in (np.nanmean, np.nanmin, np.nanmax))
    low, high = np.full(m, np.nan), np.full(m, np.nan)
    const = (count >= 2) & (lo_all == hi_all)
    low[const] = high[const] = mean[const]
    kw = {"ci": ci, "n_resamples": n_resamples, "method": method}
    full = (count == n) & (n >= 2) & ~const
    if full.any():
        low[full], high[full] = _scipy_ci((flat[:, full],), np.mean, seed=seed, **kw)
    for j in np.flatnonzero((count < n) & (count >= 2) & ~const):
        lo, hi = _scipy_ci((flat[finite[:, j], j][:, None],), np.mean, seed=[int(seed), int(j)], **kw)
        low[j], high[j] = lo[0], hi[0]
    template = da.isel({dim: 0}, drop=True)
    template.attrs = {}
    out = xr.Dataset({name: template.copy(data=v.reshape(template.shape)) for name, v in
                      (("mean", mean), ("ci_low", low), ("ci_high", high), ("n", count.astype(np.int64)))})
    out.attrs.update({"ci": float(ci), "method": method, "n_resamples": int(n_resamples), "seed": int(seed),
                      "statistic": "mean", "over": dim, f"n_{dim}s": int(n)})
    return out


def bootstrap_ci(values: Any, *, clusters: Sequence[Any] | None = None, ci: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0, method: str = "BCa") -> tuple[float, float, float]:
    """``(mean, low, high)`` of a 1-D array with a seeded bootstrap interval.

    With ``clusters`` (one label per value), whole clusters are resampled and the statistic is the mean
    of every value drawn (e.g. prompts with several seeds). Fewer than 2 values (clusters): NaN interval;
    all equal: ``[v, v]``.
    """
    check_stats_options(ci, n_resamples, method, seed)
    x = np.asarray(values, dtype=float).ravel()
    labels = np.arange(len(x)) if clusters is None else np.asarray(list(clusters), dtype=object)
    if len(labels) != len(x):
        raise AnalysisError(f"clusters has {len(labels)} labels for {len(x)} values; give one label per value")
    codes, _ = pd.factorize(labels)
    sums, counts = np.bincount(codes, weights=x), np.bincount(codes).astype(float)
    mean = float(x.mean()) if len(x) else float("nan")
    if len(sums) < 2:
        return mean, float("nan"), float("nan")
    if np.all(x == x[0]):
        return mean, mean, mean

    def ratio(s: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        return s.sum(axis=axis) / c.sum(axis=axis)

    data, statistic = ((x[:, None],), np.mean) if clusters is None else ((sums[:, None], counts[:, None]), ratio)
    low, high = _scipy_ci(data, statistic, ci=ci, n_resamples=n_resamples, seed=seed, method=method)
    return mean, float(low[0]), float(high[0])


def sample_keys(ds: xr.Dataset) -> list[tuple[str, int, int]]:
    """``(prompt, seed, batch_index)`` of every sample, in order (batch_index 0 when not stored)."""
    for name in ("prompt", "seed"):
        if name not in ds.variables:
            raise AnalysisError(f"the dataset has no {name!r} variable, which pairing samples needs: "
                                "record with `taca-probe record` (every schema-1 store holds it)")
    prompts, seeds = (np.asarray(ds[name].values) for name in ("prompt", "seed"))
    batch = np.asarray(ds["batch_index"].values) if "batch_index" in ds.variables else [0] * len(seeds)
    return [(str(p), int(s), int(b)) for p, s, b in zip(prompts, seeds, batch)]


def _fmt_key(key: tuple[str, int, int]) -> str:
    p, s, b = key
    return f"({p!r}, seed {s}" + (f", image {b})" if b else ")")


def pair_samples(treated: xr.Dataset, baseline: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(ti, bi)`` along ``sample`` pairing the two datasets by (prompt, seed, batch_index).

    Raises :class:`AnalysisError` if either repeats a key or the two do not hold the same keys.
    """
    kt, kb = sample_keys(treated), sample_keys(baseline)
    it, ib = pd.Index(kt, tupleize_cols=False), pd.Index(kb, tupleize_cols=False)
    for keys, index, which in ((kt, it, "treated"), (kb, ib, "baseline")):
        if index.has_duplicates:
            raise AnalysisError(f"the {which} dataset holds sample {_fmt_key(keys[np.argmax(index.duplicated())])} "
                                "twice; cannot pair")
    if not kt:
        raise AnalysisError("the treated dataset holds no sample")
    only_t, only_b = it[~it.isin(ib)], ib[~ib.isin(it)]
    if len(only_t) or len(only_b):
        parts = [f"{len(keys)} only in {which} (first {_fmt_key(keys[0])})"
                 for keys, which in ((only_t, "the treated one"), (only_b, "the baseline")) if len(keys)]
        raise AnalysisError("the two datasets' samples do not pair by (prompt, seed): " + "; ".join(parts)
                            + "; record both with the same prompts and seeds")
    return np.arange(len(kt)), ib.get_indexer(it).astype(np.int64)


def paired(treated: xr.Dataset, baseline: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    """Both datasets in pairing order under the treated ``sample`` labels: xarray aligns them pair by pair."""
    ti, bi = pair_samples(treated, baseline)
    t = treated.isel(sample=ti)
    return t, baseline.isel(sample=bi).assign_coords(sample=t["sample"].values)


def paired_test(a: np.ndarray, b: np.ndarray, *, test: str, alternative: str) -> tuple[np.ndarray, np.ndarray]:
    """Statistic and p-value of ``test`` along axis 0 of two paired (n, ...) arrays.

    Fewer than 2 pairs: NaN; positions where every difference is 0: p = 1.
    """
    choice(test, PAIRED_TESTS, "paired test")
    choice(alternative, ("two-sided", "greater", "less"), "alternative")
    if len(a) < 2:
        return np.full(a.shape[1:], np.nan), np.full(a.shape[1:], np.nan)
    fn = scipy.stats.wilcoxon if test == "wilcoxon" else scipy.stats.ttest_rel
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        r = fn(a, b, axis=0, alternative=alternative)
    p = np.where(np.all(a == b, axis=0), 1.0, np.asarray(r.pvalue, float))
    return np.asarray(r.statistic, float), p
