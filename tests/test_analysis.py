"""taca_probe.analysis against hand computations on small synthetic Datasets with known masses."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import xarray as xr

import taca_probe
from taca_probe import analysis as A
from taca_probe.errors import TacaProbeError

LAYERS = ("transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn")
BLOCKS = ("joint", "joint", "single")


def make_run(
    *,
    prompts=("a cat",),
    seeds=(0, 1),
    steps=2,
    heads=2,
    n_txt=4,
    grid=(2, 3),
    timesteps=None,
    vis=None,
    ref=None,
    gamma=None,
    token_mass=None,
    maps=None,
    padding=(3,),
    schedule="none",
    maps_spec="steps=0,1;layers=all;tokens=prompt",
    image=None,
) -> xr.Dataset:
    """A Dataset shaped like ``open_run``'s: samples = prompts x seeds (prompt-major)."""
    keys = [(p, s) for p in prompts for s in seeds]
    n = len(keys)
    L = len(LAYERS)
    shape = (n, steps, L, heads)
    vis = np.full(shape, 0.3) if vis is None else np.asarray(vis, float)
    ref = vis.copy() if ref is None else np.asarray(ref, float)
    t = np.linspace(1000, 0, steps, endpoint=False) if timesteps is None else np.asarray(timesteps, float)
    gamma = np.ones((n, steps, L)) if gamma is None else np.broadcast_to(gamma, (n, steps, L))
    token_mass = np.full((n, steps, L, n_txt), 0.3 / n_txt) if token_mass is None else np.asarray(token_mass, float)
    pad = np.zeros((n, n_txt), bool)
    pad[:, list(padding)] = True
    texts = np.array([[f"{p.split()[-1]}{k}</w>" if not pad[i, k] else "<pad>" for k in range(n_txt)]
                      for i, (p, _) in enumerate(keys)], dtype=object)
    data = {
        "vis_txt_mass": (("sample", "step", "layer", "head"), vis.astype(np.float32)),
        "vis_txt_mass_ref": (("sample", "step", "layer", "head"), ref.astype(np.float32)),
        "txt_vis_mass": (("sample", "step", "layer", "head"), (1 - vis).astype(np.float32)),
        "token_mass": (("sample", "step", "layer", "token"), token_mass.astype(np.float32)),
        "image": (("sample", "image_y", "image_x", "channel"),
                  np.zeros((n, 8, 8, 3), np.uint8) if image is None else image),
    }
    if maps is not None:
        data["maps"] = (("sample", "step", "layer", "token", "y", "x"), np.asarray(maps).astype(np.float16))
    coords = {
        "sample": np.arange(n), "prompt": ("sample", [p for p, _ in keys]), "seed": ("sample", [s for _, s in keys]),
        "batch_index": ("sample", np.zeros(n, np.int64)), "step": np.arange(steps),
        "timestep": (("sample", "step"), np.tile(t, (n, 1)).astype(np.float32)),
        "sigma": (("sample", "step"), np.tile(t / 1000, (n, 1)).astype(np.float32)),
        "gamma": (("sample", "step", "layer"), np.asarray(gamma, np.float32)),
        "layer": list(LAYERS), "block_type": ("layer", list(BLOCKS)), "head": np.arange(heads),
        "token": np.arange(n_txt), "token_text": (("sample", "token"), texts),
        "token_source": ("token", ["clip"] * (n_txt // 2) + ["t5"] * (n_txt - n_txt // 2)),
        "token_is_padding": (("sample", "token"), pad), "y": np.arange(grid[0]), "x": np.arange(grid[1]),
    }
    attrs = {"schedule": schedule, "model": "synthetic", "n_txt": n_txt, "n_vis": grid[0] * grid[1],
             "branch": "cond", "steps": steps}
    if maps is not None:
        attrs["maps"] = maps_spec
    return xr.Dataset(data, coords=coords, attrs=attrs)


# ------------------------------------------------------------------------------------------------
# suppression
# ------------------------------------------------------------------------------------------------


def _fig2_run():
    vis = np.zeros((2, 2, 3, 2))
    vis[0, 0] = [[0.1, 0.3], [0.2, 0.2], [0.5, 0.7]]
    vis[1, 0] = [[0.3, 0.5], [0.4, 0.4], [0.7, 0.9]]
    vis[0, 1], vis[1, 1] = 0.4, 0.6
    return make_run(vis=vis, timesteps=[1000, 500])


def test_suppression_by_block_type_matches_hand_computation():
    res = A.suppression(_fig2_run(), n_resamples=500)
    assert res["mean"].dims == ("block_type", "step")
    assert list(res["block_type"].values) == ["joint", "single"]
    # joint, step 0: sample 0 (0.1+0.3+0.2+0.2)/4 = 0.2, sample 1 (0.3+0.5+0.4+0.4)/4 = 0.4 -> 0.3
    np.testing.assert_allclose(res["mean"].sel(block_type="joint").values, [0.3, 0.5], rtol=1e-6)
    np.testing.assert_allclose(res["mean"].sel(block_type="single").values, [0.7, 0.5], rtol=1e-6)
    assert res["uniform_reference"].item() == pytest.approx(4 / (4 + 6))  # N_txt / (N_txt + N_vis)
    assert res.attrs["uniform_reference"] == pytest.approx(0.4) and res["cross_attention_reference"].item() == 1.0
    np.testing.assert_array_equal(res["timestep"].values, [1000, 500])
    assert res.attrs["n_samples"] == 2 and (res["n"] == 2).all()
    # two observations 0.2 and 0.4: the interval lies between them and holds the mean
    lo, hi = res["ci_low"].sel(block_type="joint", step=0).item(), res["ci_high"].sel(block_type="joint", step=0).item()
    assert 0.2 - 1e-6 <= lo <= 0.3 <= hi <= 0.4 + 1e-6
    # step 1: every value equal within a sample; across samples 0.4 and 0.6
    assert res["ci_low"].sel(block_type="single", step=1).item() >= 0.4 - 1e-6


@pytest.mark.parametrize("by,expected", [
    ("layer", {"transformer_blocks.0.attn": 0.3, "transformer_blocks.1.attn": 0.3, "single_transformer_blocks.0.attn": 0.7}),
    ("all", {None: (2.0 / 6 + 3.2 / 6) / 2}),
    ("depth", {"layers 0-1": 0.3, "layer 2": 0.7}),
])
def test_suppression_groupings(by, expected):
    res = A.suppression(_fig2_run(), by=by, n_groups=2, n_resamples=200)
    for label, value in expected.items():
        sel = res["mean"].sel(step=0)
        sel = sel if label is None else sel.sel({by: label})
        assert sel.item() == pytest.approx(value, rel=1e-6)
    if by == "all":
        assert res["mean"].dims == ("step",)


def test_bootstrap_interval_covers_true_mean_in_seeded_simulation():
    """100 independent experiments (one per step), 30 samples each: the 95% CI covers the true mean >= 90 times."""
    rng = np.random.default_rng(1234)
    true = 0.3
    vis = rng.normal(true, 0.05, size=(30, 100, 3, 1))
    ds = make_run(prompts=[f"p{i}" for i in range(30)], seeds=(0,), steps=100, heads=1, vis=vis)
    res = A.suppression(ds, by="layer", n_resamples=1000, seed=7).sel(layer=LAYERS[0])
    covered = int(((res["ci_low"] <= true) & (true <= res["ci_high"])).sum())
    assert 90 <= covered <= 100, covered
    # the interval is about 2 x 1.96 x sigma / sqrt(n) wide
    width = float((res["ci_high"] - res["ci_low"]).mean())
    assert width == pytest.approx(2 * 1.96 * 0.05 / np.sqrt(30), rel=0.2)
    again = A.suppression(ds, by="layer", n_resamples=1000, seed=7).sel(layer=LAYERS[0])
    xr.testing.assert_identical(res, again)  # seeded: reproducible
    other = A.suppression(ds, by="layer", n_resamples=1000, seed=8).sel(layer=LAYERS[0])
    assert not np.array_equal(res["ci_low"].values, other["ci_low"].values)


@pytest.mark.parametrize("method", A.BOOTSTRAP_METHODS)
def test_bootstrap_mean_edge_cases(method):
    data = np.array([[0.5, 1.0, np.nan, 2.0],
                     [0.5, 2.0, 3.0, np.nan],
                     [0.5, 3.0, 5.0, np.nan],
                     [0.5, 4.0, 7.0, np.nan]])
    da = xr.DataArray(data, dims=("sample", "col"), coords={"col": list("abcd")})
    res = A.bootstrap_mean(da, n_resamples=300, method=method)
    assert (res["ci_low"].sel(col="a").item(), res["ci_high"].sel(col="a").item()) == (0.5, 0.5)  # constant
    assert res["mean"].sel(col="b").item() == 2.5 and res["ci_low"].sel(col="b") <= 2.5 <= res["ci_high"].sel(col="b")
    assert res["mean"].sel(col="c").item() == 5.0 and res["n"].sel(col="c").item() == 3  # NaN left out
    assert res["mean"].sel(col="d").item() == 2.0 and np.isnan(res["ci_low"].sel(col="d").item())  # one value
    assert res.attrs["method"] == method


def test_amplification_is_applied_over_gamma1_mass():
    ref = np.full((2, 2, 3, 2), 0.2)
    vis = ref.copy()
    vis[:, 0] *= 1.25
    gamma = np.array([[1.4, 1.4, 1.4], [1.0, 1.0, 1.0]])
    res = A.amplification(make_run(vis=vis, ref=ref, gamma=gamma, schedule="step:1.4@970"), n_resamples=200)
    np.testing.assert_allclose(res["mean"].sel(block_type="joint").values, [1.25, 1.0], rtol=1e-6)
    np.testing.assert_allclose(res["gamma"].sel(block_type="single").values, [1.4, 1.0], rtol=1e-6)
    assert res.attrs["schedule"] == "step:1.4@970"


# ------------------------------------------------------------------------------------------------
# paired comparisons
# ------------------------------------------------------------------------------------------------


def _pair(shifts, order):
    prompts, seeds = ("a cat", "a dog", "a cow"), (0, 1)
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, size=(6, 2, 3, 2))
    baseline = make_run(prompts=prompts, seeds=seeds, vis=base)
    treated = make_run(prompts=prompts, seeds=seeds, vis=base + np.asarray(shifts)[:, None, None, None],
                       schedule="step:1.2@970")
    return treated.isel(sample=order).assign_coords(sample=np.arange(6)), baseline


def test_compare_runs_pairs_by_prompt_and_seed():
    shifts = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    treated, baseline = _pair(shifts, [5, 3, 1, 0, 2, 4])  # treated samples in another order
    res = A.compare_runs(treated, baseline, n_resamples=500)
    np.testing.assert_allclose(res["diff"].values, shifts.mean(), atol=2e-7)
    assert res.attrs["n_pairs"] == 6 and res.attrs["test"] == "wilcoxon"
    # every paired difference positive: exact two-sided signed-rank p = 2 / 2**6
    np.testing.assert_allclose(res["pvalue"].values, 2 / 64)
    assert (res["diff_ci_low"] > 0).all() and (res["diff_ci_low"] <= res["diff"]).all()
    np.testing.assert_allclose(res["ratio"].values, (res["treated"] / res["baseline"]).values)
    t = A.compare_runs(treated, baseline, test="ttest", n_resamples=100)
    a = treated.isel(sample=np.argsort([5, 3, 1, 0, 2, 4]))["vis_txt_mass"].sel(step=0).isel(layer=[0, 1]).mean(("layer", "head"))
    b = baseline["vis_txt_mass"].sel(step=0).isel(layer=[0, 1]).mean(("layer", "head"))
    expected = scipy.stats.ttest_rel(a.values, b.values)
    assert t["pvalue"].sel(block_type="joint", step=0).item() == pytest.approx(expected.pvalue, rel=1e-4)
    same = A.compare_runs(baseline, baseline, n_resamples=100)
    assert (same["pvalue"] == 1.0).all() and (same["diff"] == 0).all()


def test_compare_runs_refuses_unpaired_samples():
    baseline = make_run(seeds=(0, 1))
    treated = make_run(seeds=(0, 2))
    with pytest.raises(A.AnalysisError, match=r"do not pair by \(prompt, seed\).*'a cat', seed 2") as e:
        A.compare_runs(treated, baseline)
    assert "\n" not in str(e.value) and isinstance(e.value, TacaProbeError)
    with pytest.raises(A.AnalysisError, match="same structure"):
        A.compare_runs(make_run(steps=3), make_run(steps=2))
    # as many steps but other ones: the paired test compared step 1 with step 0 (or crashed reshaping)
    with pytest.raises(A.AnalysisError, match=r"same structure.*steps \[1\] vs \[0\]"):
        A.compare_runs(make_run(steps=2).isel(step=[1]), make_run(steps=2).isel(step=[0]))


def test_timestep_awareness_slope_and_early_late():
    t = np.array([1000.0, 600.0, 200.0])
    a = np.array([0.2, 0.4])
    vis = a[:, None, None, None] + 0.1 * (t / 1000)[None, :, None, None] + np.zeros((2, 3, 3, 2))
    res = A.timestep_awareness(make_run(vis=vis, steps=3, timesteps=t), n_resamples=200)
    assert res["slope"].dims == ("layer",)
    np.testing.assert_allclose(res["slope"].values, 0.1, rtol=1e-5)
    early, late = a + 0.1 * 0.8, a + 0.1 * 0.2  # t >= 500: steps 0, 1; t < 500: step 2
    np.testing.assert_allclose(res["early_mass"].values, early.mean(), rtol=1e-5)
    np.testing.assert_allclose(res["early_late_ratio"].values, (early / late).mean(), rtol=1e-5)
    assert res["mass"].dims == ("layer", "step")


# ------------------------------------------------------------------------------------------------
# attention maps and tokens
# ------------------------------------------------------------------------------------------------


def _maps_pair():
    n, steps, L, T, Y, X = 2, 3, 3, 4, 2, 3
    base = np.zeros((n, steps, L, T, Y, X))
    for layer in range(L):
        base[:, :, layer] = 0.1 * (layer + 1)  # mean over the 3 layers: 0.2
    base[:, 2] = np.nan  # step 2 not recorded
    base[:, :, :, 3] = np.nan  # token 3 is padding: not recorded
    treated = base.copy()
    treated[:, 0, :, 1] += 0.01
    treated[:, 0, :, 2, 1, 2] -= 0.02
    return (make_run(maps=treated, steps=steps, schedule="step:1.2@970"), make_run(maps=base, steps=steps))


def test_map_difference_hand_computed():
    treated, baseline = _maps_pair()
    md = A.map_difference(treated, baseline)
    assert list(md["step"].values) == [0, 1]  # from the maps selection of the stores
    assert list(md["token"].values) == [0, 1, 2]  # prompt tokens, padding left out
    assert md["diff"].dims == ("sample", "step", "token", "y", "x")
    np.testing.assert_allclose(md["baseline"].values, 0.2, rtol=1e-3)
    d = md["diff"].sel(step=0)
    np.testing.assert_allclose(d.sel(token=1).values, 0.01, atol=1e-4)
    np.testing.assert_allclose(d.sel(token=0).values, 0.0, atol=1e-6)
    np.testing.assert_allclose(md["token_change"].sel(step=0, token=2).values, -0.02 / 6, atol=1e-4)
    np.testing.assert_allclose(md["token_relative_change"].sel(step=0, token=1).values, 0.01 / 0.2, rtol=2e-2)
    np.testing.assert_allclose(md["token_abs_change"].sel(step=1).values, 0.0, atol=1e-6)
    assert md["token_text"].dims == ("sample", "token") and md.attrs["n_layers"] == 3
    assert md.attrs["treated_schedule"] == "step:1.2@970" and md["treated_image"].dims[0] == "sample"
    one = A.map_difference(treated, baseline, steps=0, layers="single")
    assert one.sizes["step"] == 1 and one.attrs["layers"] == [LAYERS[2]]
    with pytest.raises(A.AnalysisError, match=r"no maps at step\(s\) \[2\].*steps with maps: \[0, 1\]"):
        A.map_difference(treated, baseline, steps=[2])
    for key, n_bad in (("steps", 100_000 - 2), ("tokens", 100_000 - treated.sizes["token"])):
        with pytest.raises(A.AnalysisError) as e:  # every missing one was listed: a 600,000-character line
            A.map_difference(treated, baseline, **{key: list(range(100_000))})
        assert str(n_bad) in str(e.value) and len(str(e.value)) < 200
    with pytest.raises(A.AnalysisError, match="match no layer"):
        A.map_difference(treated, baseline, layers="nothing*")


def test_missing_maps_names_the_variable_and_the_record_flag():
    treated, _ = _maps_pair()
    with pytest.raises(A.AnalysisError) as e:
        A.map_difference(treated, make_run(steps=3))
    msg = str(e.value)
    assert "'maps'" in msg and "--maps" in msg and "baseline" in msg and "\n" not in msg


def test_token_ranking_separates_padding():
    tm = np.zeros((2, 2, 3, 4))
    tm[...] = [0.05, 0.20, 0.10, 0.30]  # token 3 is padding
    res = A.token_ranking(make_run(token_mass=tm), top=2)
    row = res.sel(prompt="a cat")
    assert list(row["token"].values) == [1, 2]
    assert list(row["token_text"].values) == ["cat1</w>", "cat2</w>"]
    np.testing.assert_allclose(row["share"].values, [0.20 / 0.65, 0.10 / 0.65], rtol=1e-6)
    assert row["padding_share"].item() == pytest.approx(0.30 / 0.65, rel=1e-6)
    assert list(row["padding_token"].values) == [3]  # one padding token: a ranking of one
    assert (row["n_prompt_tokens"].item(), row["n_padding_tokens"].item(), row["n_samples"].item()) == (3, 1, 2)


def test_readable_token():
    assert [A.readable_token(t) for t in ("red</w>", "▁blue", "<pad>", "</w>")] == ["red", "blue", "<pad>", "'</w>'"]


# ------------------------------------------------------------------------------------------------
# sweeps
# ------------------------------------------------------------------------------------------------


def _sweep():
    specs = ["none", "step:1.2@970", "step:1.5@970", "step:1.2@900"]
    g0 = [1.0, 1.2, 1.5, 1.2]
    tt = [np.nan, 970, 970, 900]
    runs = []
    for i, g in enumerate(g0):
        vis = np.full((4, 2, 3, 2), 0.3)
        vis[:, 0] = 0.3 * g  # mass rises with gamma at step 0 only
        vis[1::2, 0] += 0.02  # seed 1 a little higher
        gamma = np.array([[g] * 3, [1.0] * 3])
        img = np.full((4, 8, 8, 3), 10 * i, np.uint8)
        img[2:] += 1  # second prompt
        runs.append(make_run(prompts=("a cat", "a dog"), seeds=(0, 1), vis=vis, gamma=gamma, image=img))
    sweep = xr.concat(runs, dim=pd.Index(specs, name="schedule"), coords=["gamma"], compat="override")
    return sweep.assign_coords(gamma0=("schedule", g0), t_thresh=("schedule", tt))


def test_mass_vs_gamma_hand_computed():
    res = A.mass_vs_gamma(_sweep(), n_resamples=300)
    assert res.attrs["steps"] == [0]  # where some schedule applied gamma != 1
    np.testing.assert_allclose(res["mean"].values, 0.3 * np.array([1.0, 1.2, 1.5, 1.2]) + 0.01, rtol=1e-5)
    np.testing.assert_allclose(res["gamma0"].values, [1.0, 1.2, 1.5, 1.2])
    assert (res["ci_low"] < res["mean"]).all() and (res["mean"] < res["ci_high"]).all()
    both = A.mass_vs_gamma(_sweep(), steps="all", by="block_type", n_resamples=100)
    assert both["mean"].dims == ("schedule", "block_type")
    np.testing.assert_allclose(both["mean"].sel(block_type="joint").values,
                               (0.3 * np.array([1.0, 1.2, 1.5, 1.2]) + 0.01 + 0.3) / 2, rtol=1e-5)
    with pytest.raises(A.AnalysisError, match="'schedule' dimension.*taca-probe sweep"):
        A.mass_vs_gamma(make_run())


def test_gamma_image_grid_orders_columns_by_gamma0():
    grid = A.gamma_image_grid(_sweep())
    assert grid.dims == ("prompt", "schedule", "image_y", "image_x", "channel")
    assert list(grid["schedule"].values) == ["none", "step:1.2@970", "step:1.5@970"]  # t_thresh 970 + baseline
    assert list(grid["prompt"].values) == ["a cat", "a dog"]
    assert grid[:, :, 0, 0, 0].values.tolist() == [[0, 10, 20], [1, 11, 21]]
    other = A.gamma_image_grid(_sweep(), t_thresh=900, seed=1)
    assert list(other["schedule"].values) == ["none", "step:1.2@900"] and other.attrs["seed"] == 1
    with pytest.raises(A.AnalysisError, match="thresholds in the sweep: 900, 970"):
        A.gamma_image_grid(_sweep(), t_thresh=500)


def _sweep_with_restricted():
    """_sweep() plus step:1.2@970 on the joint blocks only: the same gamma0 and t_thresh as step:1.2@970."""
    sw = _sweep().isel(schedule=[0, 1, 2, 3, 1])
    sw["image"][4] += 5
    return sw.assign_coords(schedule=[*sw["schedule"].values[:4], "step:1.2@970;blocks=joint"])


def test_gamma_image_grid_leaves_out_a_schedule_restricted_to_some_layers():
    grid = A.gamma_image_grid(_sweep_with_restricted())
    assert list(grid["schedule"].values) == ["none", "step:1.2@970", "step:1.5@970"]
    assert grid[:, :, 0, 0, 0].values.tolist() == [[0, 10, 20], [1, 11, 21]]
    np.testing.assert_array_equal(A.on_grid(["none", "step:1.2@970", "step:1.2@970;blocks=joint"]), [True, True, False])


# ------------------------------------------------------------------------------------------------
# dask, branches, bad options
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # starts a dask cluster
def test_dask_backed_input_gives_the_same_numbers():
    pytest.importorskip("dask")
    ds = _fig2_run()
    lazy = ds.chunk({"sample": 1})
    assert lazy["vis_txt_mass"].chunks is not None
    for fn in (lambda d: A.suppression(d, n_resamples=300), lambda d: A.timestep_awareness(d, n_resamples=300),
               lambda d: A.token_ranking(d)):
        xr.testing.assert_allclose(fn(ds), fn(lazy))
    treated, baseline = _maps_pair()
    eager = A.map_difference(treated, baseline)
    dasky = A.map_difference(treated.chunk({"sample": 1, "step": 1}), baseline.chunk({"sample": 1}))
    xr.testing.assert_allclose(eager, dasky)
    sw = _sweep()
    xr.testing.assert_allclose(A.mass_vs_gamma(sw, n_resamples=200), A.mass_vs_gamma(sw.chunk({"sample": 1}), n_resamples=200))


def test_branch_dimension():
    a, b = _fig2_run(), _fig2_run()
    b["vis_txt_mass"] = b["vis_txt_mass"] * 0 + 0.9
    both = xr.concat([a, b], dim="branch").assign_coords(branch=["cond", "uncond"])
    np.testing.assert_allclose(A.suppression(both, n_resamples=100)["mean"].sel(block_type="joint", step=0), 0.3)
    np.testing.assert_allclose(A.suppression(both, branch="uncond", n_resamples=100)["mean"], 0.9, rtol=1e-6)
    with pytest.raises(A.AnalysisError, match="unknown branch 'both'; choose from cond, uncond"):
        A.suppression(both, branch="both")
    with pytest.raises(A.AnalysisError, match="recorded the 'cond' branch only"):
        A.suppression(a, branch="uncond")


def test_paired_analyses_take_a_branch_of_two_branch_stores():
    """compare_runs and map_difference select the branch (default cond) before refusing extra dims."""
    def two_branch(run, uncond_shift):
        other = run.copy()
        other["vis_txt_mass"] = run["vis_txt_mass"] + uncond_shift
        other["maps"] = run["maps"] + np.float16(uncond_shift)
        return xr.concat([run, other], dim="branch", coords="minimal").assign_coords(branch=["cond", "uncond"])

    treated, baseline = _maps_pair()
    t2, b2 = two_branch(treated, 0.05), two_branch(baseline, 0.01)
    for branch, t, b in ((None, treated, baseline), ("uncond", t2.sel(branch="uncond"), b2.sel(branch="uncond"))):
        res = A.compare_runs(t2, b2, branch=branch, n_resamples=100)
        expected = (t["vis_txt_mass"] - b["vis_txt_mass"]).sel(layer=list(LAYERS[:2])).mean(("layer", "head", "sample"))
        np.testing.assert_allclose(res["diff"].sel(block_type="joint").values, expected.values, atol=1e-6)
        md = A.map_difference(t2, b2, branch=branch)
        expected = (t["maps"].astype(float) - b["maps"].astype(float)).sel(step=[0, 1]).mean("layer").isel(token=[0, 1, 2])
        np.testing.assert_allclose(md["diff"].values, expected.transpose(*md["diff"].dims).values, atol=1e-3)


@pytest.mark.parametrize("kwargs,message", [
    ({"by": "blocks"}, "unknown grouping 'by' 'blocks'; choose from block_type, layer, depth, all"),
    ({"ci": 1.5}, "ci must be a confidence level between 0 and 1"),
    ({"method": "bca"}, "unknown bootstrap method 'bca'; choose from BCa, percentile, basic"),
    ({"variable": "maps"}, "unknown variable 'maps'; choose from vis_txt_mass, vis_txt_mass_ref"),
    ({"n_resamples": 0}, "n_resamples must be a positive integer"),
    ({"by": "depth", "n_groups": 0}, "n_groups must be a positive integer"),
])
def test_bad_options_are_one_line_with_choices(kwargs, message):
    with pytest.raises(A.AnalysisError) as e:
        A.suppression(_fig2_run(), **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("seed", [-1, 1.5, True, 2**64])
def test_bad_bootstrap_seed_is_an_analysis_error(seed):
    """Audit: seed=-1 was numpy's bare ValueError ('expected non-negative integer'), seed=1.5 a TypeError."""
    for call in (lambda: A.suppression(_fig2_run(), seed=seed), lambda: A.compare_runs(_fig2_run(), _fig2_run(), seed=seed)):
        with pytest.raises(A.AnalysisError, match="seed"):
            call()


def test_other_bad_inputs():
    with pytest.raises(A.AnalysisError, match="unknown paired test 'sign'; choose from wilcoxon, ttest"):
        A.compare_runs(_fig2_run(), _fig2_run(), test="sign")
    with pytest.raises(A.AnalysisError, match="token_ranking works on one run; select first"):
        A.token_ranking(_sweep())
    with pytest.raises(A.AnalysisError, match="top must be a positive integer"):
        A.token_ranking(_fig2_run(), top=0)
    for split in (2000, True):  # True is not the timestep 1
        with pytest.raises(A.AnalysisError, match="split must be a timestep"):
            A.timestep_awareness(_fig2_run(), split=split)
    with pytest.raises(A.AnalysisError, match="DataArray"):
        A.bootstrap_mean(_fig2_run()[["vis_txt_mass"]])
    with pytest.raises(A.AnalysisError, match="no 'vis_txt_mass' variable"):
        A.suppression(_fig2_run().drop_vars("vis_txt_mass"))


@pytest.mark.parametrize("kwargs,word", [
    ({"steps": 1.5}, "steps"), ({"steps": "0"}, "steps"), ({"steps": True}, "steps"), ({"steps": []}, "steps"),
    ({"layers": 3}, "layers"), ({"layers": [0]}, "layers"), ({"tokens": 1.5}, "tokens"),
    ({"tokens": ["red"]}, "tokens"), ({"tokens": []}, "tokens"),
])
def test_map_selection_arguments_of_a_wrong_type_are_analysis_errors(kwargs, word):
    """Audit: steps=1.5 / layers=3 / tokens=["red"] were a TypeError or ValueError from inside (steps="01" read as
    [0, 1]), and steps=[] gave all-NaN results."""
    treated, baseline = _maps_pair()
    calls = [lambda: A.map_difference(treated, baseline, **kwargs)]
    if "tokens" not in kwargs:
        calls.append(lambda: A.token_ranking(treated, **kwargs))
    for call in calls:
        with pytest.raises(A.AnalysisError, match=word) as e:
            call()
        assert "\n" not in str(e.value)


def test_map_selection_arguments_take_one_index_a_range_or_an_array():
    treated, baseline = _maps_pair()
    md = A.map_difference(treated, baseline, steps=np.int64(1), layers=treated["layer"].values[:2], tokens=range(2))
    assert md.sizes["step"] == 1 and md.sizes["token"] == 2 and md.attrs["n_layers"] == 2
    assert A.token_ranking(treated, steps=treated["step"].values[:1]).attrs["steps"] == "[0]"


# every public analysis that takes Datasets, with its number of Dataset arguments
DATASET_ANALYSES = [(A.require, 1), (A.uniform_reference, 1), (A.layer_groups, 1), (A.suppression, 1),
                    (A.amplification, 1), (A.timestep_awareness, 1), (A.token_ranking, 1), (A.recorded_map_steps, 1),
                    (A.recorded_map_layers, 1), (A.mass_vs_gamma, 1), (A.gamma_image_grid, 1), (A.compare_runs, 2),
                    (A.map_difference, 2), (A.pair_samples, 2)]


@pytest.mark.parametrize("fn,n", DATASET_ANALYSES, ids=[f.__name__ for f, _ in DATASET_ANALYSES])
@pytest.mark.parametrize("bad", ["path/to/store", None])
def test_a_path_instead_of_a_dataset_is_an_analysis_error(fn, n, bad):
    """Audit: suppression("path/to/store") raised AttributeError ('str' object has no attribute 'dims')."""
    with pytest.raises(A.AnalysisError) as e:
        fn(*[_fig2_run()] * (n - 1), bad)
    msg = str(e.value)
    assert fn.__name__ in msg and type(bad).__name__ in msg and "\n" not in msg
    assert (f"({bad!r}) first" in msg) == isinstance(bad, str)  # a path: how to open it


@pytest.mark.parametrize("dim", ["sample", "step", "layer"])
def test_a_dimension_selected_away_to_a_scalar_is_an_analysis_error(dim):
    """Audit: suppression(ds.isel(layer=0)) was a TypeError (iteration over a 0-d array), token_ranking(
    ds.isel(step=0)) a ValueError ('step' not found in array dimensions)."""
    treated, baseline = _maps_pair()
    for call in (lambda: A.suppression(treated.isel({dim: 0}), n_resamples=10),
                 lambda: A.token_ranking(treated.isel({dim: 0})),
                 lambda: A.map_difference(treated, baseline.isel({dim: 0})),
                 lambda: A.pair_samples(treated.isel({dim: 0}), baseline)):
        with pytest.raises(A.AnalysisError, match=f"isel\\({dim}=\\[0\\]\\)") as e:
            call()
        assert "\n" not in str(e.value)
    assert A.suppression(treated.isel({dim: [0]}), n_resamples=10).attrs["n_samples"] >= 1  # a list keeps it


@pytest.mark.parametrize("fn", [A.suppression, A.amplification, A.timestep_awareness])
def test_a_dataset_with_no_sample_is_an_analysis_error(fn):
    """Audit: suppression of a zero-sample Dataset raised numpy's 'cannot reshape array of size 0'."""
    with pytest.raises(A.AnalysisError, match="0 samples") as e:
        fn(_fig2_run().isel(sample=[]))
    assert "\n" not in str(e.value)


def _no_layer(ds):
    return ds.sel(layer=ds["block_type"] == "cross")


@pytest.mark.parametrize("call", [lambda: A.suppression(_no_layer(_fig2_run()), n_resamples=10),
                                  lambda: A.suppression(_no_layer(_fig2_run()), by="all", n_resamples=10),
                                  lambda: A.amplification(_no_layer(_fig2_run()), n_resamples=10),
                                  lambda: A.compare_runs(_no_layer(_fig2_run()), _no_layer(_fig2_run())),
                                  lambda: A.mass_vs_gamma(_no_layer(_sweep()), by="block_type"),
                                  lambda: A.layer_groups(_no_layer(_fig2_run()), by="depth")])
def test_no_layer_selected_is_an_analysis_error(call):
    """Audit: ds.sel(layer=ds.block_type == "single") of SD3 (no single blocks) gave xarray's 'must supply at
    least one object to concatenate', numpy's 'number sections must be larger than 0', or NaN means (by='all')."""
    with pytest.raises(A.AnalysisError, match="'layer'") as e:
        call()
    assert "\n" not in str(e.value)


def test_timestep_awareness_split_is_inclusive_for_early():
    # a step exactly at the split is early (t >= split), by the docstring
    t = np.array([1000.0, 500.0, 0.0])
    vis = np.zeros((2, 3, 3, 2))
    vis[:, 0], vis[:, 1], vis[:, 2] = 0.6, 0.4, 0.1
    res = A.timestep_awareness(make_run(vis=vis, steps=3, timesteps=t), split=500.0, n_resamples=100)
    np.testing.assert_allclose(res["early_mass"].values, (0.6 + 0.4) / 2, rtol=1e-6)
    np.testing.assert_allclose(res["late_mass"].values, 0.1, rtol=1e-6)


def test_mass_vs_gamma_active_steps_are_those_of_any_schedule():
    # "none" never applies gamma; the step schedule does at steps 1 and 2 of 4 (not step 0):
    # the active steps are 1 and 2, not the step-0 fallback for "no schedule active anywhere"
    runs = []
    for g in (1.0, 1.5):
        vis = np.full((2, 4, 3, 2), 0.1)
        vis[:, 1], vis[:, 2] = 0.2 * g, 0.4 * g
        gamma = np.array([[1.0] * 3, [g] * 3, [g] * 3, [1.0] * 3])
        runs.append(make_run(vis=vis, steps=4, gamma=gamma))
    sweep = xr.concat(runs, dim=pd.Index(["none", "step:1.5@900"], name="schedule"), coords=["gamma"],
                      compat="override").assign_coords(gamma0=("schedule", [1.0, 1.5]), t_thresh=("schedule", [np.nan, 900]))
    res = A.mass_vs_gamma(sweep, n_resamples=100)
    assert res.attrs["steps"] == [1, 2]
    np.testing.assert_allclose(res["mean"].values, [(0.2 + 0.4) / 2, 1.5 * (0.2 + 0.4) / 2], rtol=1e-5)


def test_bootstrap_mean_interval_of_a_column_with_a_nan_comes_from_its_finite_values():
    data = np.array([[1.0, 1.0], [2.0, 2.0], [4.0, np.nan], [7.0, 4.0], [3.0, 7.0]])
    res = A.bootstrap_mean(xr.DataArray(data, dims=("sample", "col")), n_resamples=500, method="percentile")
    low, high = res["ci_low"].values, res["ci_high"].values
    assert np.isfinite(low).all() and np.isfinite(high).all()
    # column 1 holds the finite values 1, 2, 4, 7: its resample means lie in [1, 7] around 3.5
    assert res["n"].values[1] == 4 and res["mean"].values[1] == pytest.approx(3.5)
    assert 1.0 <= low[1] < 3.5 < high[1] <= 7.0


def test_map_difference_prompt_tokens_are_those_not_padding_in_some_sample():
    # sample 1's prompt is a token longer: token 2 is padding in sample 0 only, token 3 in both
    treated, baseline = _maps_pair()
    pad = np.array([[False, False, True, True], [False, False, False, True]])
    treated, baseline = (d.assign_coords(token_is_padding=(("sample", "token"), pad)) for d in (treated, baseline))
    md = A.map_difference(treated, baseline)
    assert list(md["token"].values) == [0, 1, 2]


def test_uniform_reference_counts_every_text_position_even_of_a_token_subset():
    ds = make_run(n_txt=4, grid=(2, 3))  # N_txt = 4 (padding included), N_vis = 6
    assert A.uniform_reference(ds) == pytest.approx(4 / 10)
    assert A.uniform_reference(ds.isel(token=[0, 1])) == pytest.approx(4 / 10)  # the model still saw 4
    bare = ds.copy()
    bare.attrs = {}
    assert A.uniform_reference(bare) == pytest.approx(4 / 10)  # from the token and y x x sizes


@pytest.mark.parametrize("name", ["analysis", "plotting", "schedules"])
def test_public_modules_are_attributes_of_the_package_without_an_import(monkeypatch, name):
    """A notebook's ``import taca_probe as tp; tp.analysis.suppression(...)`` was an AttributeError
    unless something had imported ``taca_probe.analysis`` first."""
    module = importlib.import_module(f"taca_probe.{name}")
    monkeypatch.delattr(taca_probe, name)  # as in a fresh interpreter: imported, not yet an attribute
    assert getattr(taca_probe, name) is module is sys.modules[f"taca_probe.{name}"]
    assert name in dir(taca_probe)


@pytest.mark.slow  # opens a store twice and imports dask
def test_open_run_chunks_auto_gives_dask_data_with_the_eager_numbers():
    """README: ``open_run(path, chunks="auto")`` returns dask-backed variables; it raised a StoreError
    (dask cannot size the string coordinates for "auto")."""
    pytest.importorskip("dask")
    store = Path(__file__).parent / "data" / "store-v0.1.0.zarr"
    lazy, eager = taca_probe.open_run(store, chunks="auto"), taca_probe.open_run(store)
    assert lazy["vis_txt_mass"].chunks is not None and lazy["maps"].chunks is not None
    xr.testing.assert_identical(lazy.load(), eager.load())


def test_a_branch_selected_by_hand_is_the_branch_the_analyses_see():
    """``ds.sel(branch="uncond")`` of a two-branch store, then ``branch="uncond"``, was refused as "recorded the
    'both' branch only" (and ``branch="cond"`` named 'both' too); a branch dim holding only uncond refused the
    default instead of using what it holds."""
    a, b = _fig2_run(), _fig2_run()
    b["vis_txt_mass"] = b["vis_txt_mass"] * 0 + 0.9
    both = xr.concat([a, b], dim="branch").assign_coords(branch=["cond", "uncond"]).assign_attrs(branch="both")
    for ds in (both.sel(branch="uncond"), both.isel(branch=[1])):
        for branch in (None, "uncond"):
            res = A.suppression(ds, branch=branch, n_resamples=50)
            np.testing.assert_allclose(res["mean"], 0.9, rtol=1e-6)
            assert res.attrs["branch"] == "uncond"
    with pytest.raises(A.AnalysisError, match="'uncond'") as err:
        A.suppression(both.sel(branch="uncond"), branch="cond")
    assert "both" not in str(err.value) and "\n" not in str(err.value)


def test_paired_analyses_refuse_runs_of_different_cfg_branches():
    """A store recorded with --branch uncond against a cond one was compared silently (cond - uncond)."""
    treated, baseline = _maps_pair()
    uncond = baseline.assign_attrs(branch="uncond")
    for fn in (lambda t, b: A.compare_runs(t, b, n_resamples=50), A.map_difference):
        with pytest.raises(A.AnalysisError, match="cond vs uncond") as err:
            fn(treated, uncond)
        assert "\n" not in str(err.value)
        fn(treated, baseline)  # the same branch pairs


def _of(ds):
    """``ds`` recorded from model "tiny-x" on the uncond branch; a sweep without a schedule attr, as open_sweep's."""
    ds = ds.assign_attrs(model="tiny-x", branch="uncond")
    return ds.drop_attrs(deep=False).assign_attrs({k: v for k, v in ds.attrs.items() if k != "schedule"}) \
        if "schedule" in ds.dims else ds


RESULTS = {  # each analysis on inputs of model "tiny-x", branch "uncond": (result, its input, the baseline)
    "suppression": lambda: (lambda d: (A.suppression(d, n_resamples=20), d, None))(_of(_fig2_run())),
    "amplification": lambda: (lambda d: (A.amplification(d, n_resamples=20), d, None))(_of(_fig2_run())),
    "timestep_awareness": lambda: (lambda d: (A.timestep_awareness(d, n_resamples=20), d, None))(_of(_fig2_run())),
    "token_ranking": lambda: (lambda d: (A.token_ranking(d), d, None))(_of(_fig2_run())),
    "compare_runs": lambda: (lambda t, b: (A.compare_runs(t, b, n_resamples=20), t, b))(
        *(_of(d) for d in _pair(np.zeros(6), list(range(6))))),
    "map_difference": lambda: (lambda t, b: (A.map_difference(t, b), t, b))(*(_of(d) for d in _maps_pair())),
    "mass_vs_gamma": lambda: (lambda d: (A.mass_vs_gamma(d, n_resamples=20), d, None))(_of(_sweep())),
    "gamma_image_grid": lambda: (lambda d: (A.gamma_image_grid(d), d, None))(_of(_sweep())),
}


@pytest.mark.parametrize("name", RESULTS)
def test_every_result_names_the_model_branch_variable_and_runs_of_its_inputs(name, tmp_path):
    """QA: compare_runs results had no ``model``, amplification results no ``variable``."""
    res, ds, baseline = RESULTS[name]()
    assert res.attrs["model"] == ds.attrs["model"] and isinstance(res.attrs["quantity"], str)
    assert res.attrs["variable"].split(" / ")[0] in ds.variables
    if name != "gamma_image_grid":  # images are not of a CFG branch
        assert res.attrs["branch"] == ds.attrs["branch"]
    if baseline is not None:
        assert (res.attrs["treated_schedule"], res.attrs["baseline_schedule"]) == (
            ds.attrs["schedule"], baseline.attrs["schedule"])
    assert res.attrs.get("schedule") == ds.attrs.get("schedule") if baseline is None else "schedule" not in res.attrs
    if name == "map_difference":  # netCDF3 holds no uint8 images nor a list of strings (its layers)
        res = res.drop_vars(["treated_image", "baseline_image"]).drop_attrs(deep=False).assign_attrs(
            {k: v for k, v in res.attrs.items() if k != "layers"})
    res.to_netcdf(tmp_path / "res.nc", engine="scipy")
    with (xr.open_dataarray if isinstance(res, xr.DataArray) else xr.open_dataset)(tmp_path / "res.nc",
                                                                                   engine="scipy") as back:
        assert back.attrs["model"] == ds.attrs["model"]


def test_attrs_the_input_lacks_are_left_out_not_none(tmp_path):
    """suppression of a store without n_txt/n_vis attrs stored None, which to_netcdf refuses."""
    ds = _fig2_run()
    del ds.attrs["n_txt"], ds.attrs["n_vis"]
    res = A.suppression(ds, n_resamples=20)
    assert None not in res.attrs.values() and "n_txt" not in res.attrs
    res.to_netcdf(tmp_path / "res.nc", engine="scipy")
