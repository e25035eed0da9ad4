"""`taca-probe sweep` then `taca-probe figures` on a tiny model; the figure scripts; one-line errors.

One sweep (tiny-sd3, 64 px, 2 steps, 2 prompts x 2 seeds, 3 schedules, maps at steps 0-1) is
recorded once per module and shared.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from taca_probe import analysis as A
from taca_probe import open_sweep, plotting, render_figures
from taca_probe.cli import main
from taca_probe.errors import TacaProbeError
from taca_probe.rendering import Run, _suppression_figure, choose_runs, open_inputs
from tests.clitools import one_line_error, run_cli
from tests.test_analysis import _sweep_with_restricted, make_run

pytestmark = pytest.mark.slow  # records sweeps and renders every figure

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny-sd3", "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64",
        "--max-sequence-length", "8"]
SWEEP = ["sweep", *TINY, "--prompt", "a red cube", "--prompt", "a blue ball", "--seeds", "0,1",
         "--gamma0", "1.0,1.2,1.5", "--t-thresh", "970", "--maps", "steps=0-1"]
FIGURE_NAMES = [name for names in plotting.FIGURES.values() for name in names]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep") / "sweep"
    rc = main([*SWEEP, "--out", str(folder)])
    assert rc == 0
    return folder


@pytest.fixture(scope="module")
def figures_dir(sweep_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    rc = main(["figures", str(sweep_dir), "--out", str(out), "--n-resamples", "300"])
    assert rc == 0
    return out


def test_sweep_layout_manifest_and_images(sweep_dir):
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert [s["spec"] for s in doc["schedules"]] == ["none", "step:1.2@970", "step:1.5@970"]
    assert doc["plan"] == [["a red cube", 0], ["a red cube", 1], ["a blue ball", 0], ["a blue ball", 1]]
    assert doc["call"]["num_inference_steps"] == 2 and doc["status"] == "complete"
    assert all(s["samples_complete"] == 4 for s in doc["schedules"])
    pngs = sorted(sweep_dir.glob("images/*/*.png"))
    assert len(pngs) == 12 and all(Image.open(p).size == (64, 64) for p in pngs)
    sweep = open_sweep(sweep_dir)
    assert dict(sweep.sizes)["schedule"] == 3 and sweep.sizes["sample"] == 4
    np.testing.assert_array_equal(sweep["gamma0"].values, [1.0, 1.2, 1.5])
    np.testing.assert_array_equal(sweep["t_thresh"].values[1:], [970, 970])
    png = np.asarray(Image.open(sweep_dir / "images" / "02_step_1.5@970" / "p01_seed1.png"))
    np.testing.assert_array_equal(sweep["image"].sel(schedule="step:1.5@970").isel(sample=3).values, png)
    # TACA at step 0 only (t = 1000 >= 970); the curve averages exactly that step
    gamma = sweep["gamma"].sel(schedule="step:1.5@970").isel(sample=0)
    assert (gamma.sel(step=0) == 1.5).all() and (gamma.sel(step=1) == 1.0).all()
    curve = A.mass_vs_gamma(sweep, n_resamples=200)
    assert curve.attrs["steps"] == [0]
    direct = sweep["vis_txt_mass"].isel(step=0).mean(("sample", "layer", "head"))
    np.testing.assert_allclose(curve["mean"].values, direct.values, rtol=1e-5)


def test_figures_writes_every_figure_as_png_and_pdf(figures_dir):
    for name in FIGURE_NAMES:
        png, pdf = figures_dir / f"{name}.png", figures_dir / f"{name}.pdf"
        assert png.is_file() and pdf.is_file(), name
        assert pdf.read_bytes()[:5] == b"%PDF-"
        with Image.open(png) as im:
            im.load()
            w, h = im.size
            assert 400 <= w <= 6000 and 300 <= h <= 6000, (name, im.size)
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
        assert rgb.std() > 10, f"{name} looks blank"
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        assert len(np.unique(packed)) > 50, f"{name} has too few colours"


def test_dask_backed_sweep_gives_the_same_numbers(sweep_dir):
    pytest.importorskip("dask")
    eager, lazy = open_sweep(sweep_dir), open_sweep(sweep_dir, chunks={})
    assert lazy["vis_txt_mass"].chunks is not None
    import xarray as xr

    kw = {"n_resamples": 300}
    xr.testing.assert_allclose(A.mass_vs_gamma(eager, **kw), A.mass_vs_gamma(lazy, **kw))
    xr.testing.assert_allclose(A.suppression(eager, **kw), A.suppression(lazy, **kw))
    t, b = "step:1.2@970", "none"
    xr.testing.assert_allclose(A.map_difference(eager.sel(schedule=t), eager.sel(schedule=b)),
                               A.map_difference(lazy.sel(schedule=t), lazy.sel(schedule=b)))
    xr.testing.assert_allclose(A.compare_runs(eager.sel(schedule=t), eager.sel(schedule=b), **kw),
                               A.compare_runs(lazy.sel(schedule=t), lazy.sel(schedule=b), **kw))


def test_figures_from_single_stores_and_lazy(sweep_dir, tmp_path, capsys):
    stores = sorted(str(p) for p in (sweep_dir / "stores").glob("*.zarr"))
    rc, out, err = run_cli(["figures", *stores, "--out", tmp_path, "--figures", "fig3,fig4", "--format", "png",
                         "--lazy", "--treated", "step:1.5@970", "--n-resamples", "100"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.png" for n in plotting.FIGURES["fig3"] + plotting.FIGURES["fig4"])
    assert "TACA (step:1.5@970)" not in out  # titles are in the images, the listing names the files
    line = next(x for x in out.splitlines() if "fig3_attention_map_diff" in x)
    assert stores[2] in line and stores[0] in line  # the runs it was drawn from


def test_figures_lists_each_figure_once_with_its_run(sweep_dir, tmp_path, capsys):
    rc, out, err = run_cli(["figures", sweep_dir, "--out", tmp_path, "--format", "png", "--n-resamples", "100"], capsys)
    assert rc == 0, err
    lines = (out + err).splitlines()
    for name in FIGURE_NAMES:
        assert sum(name in x.split() for x in lines) == 1, (name, lines)
    res = render_figures(sweep_dir, tmp_path / "again", formats="png", n_resamples=100)
    assert res["sources"]["fig2_suppression"].endswith("[none]")  # Fig. 2 from the baseline
    assert res["sources"]["fig5_token_ranking"].endswith("[none]")
    assert res["sources"]["fig2_amplification"].endswith("[step:1.2@970]")
    assert "[step:1.2@970]" in res["sources"]["fig3_attention_map_diff"] and "[none]" in res["sources"]["fig3_attention_map_diff"]


def test_suppression_axis_fits_the_data_and_the_uniform_reference(sweep_dir):
    res = A.suppression(open_sweep(sweep_dir).sel(schedule="none"), n_resamples=200)
    ax = plotting.plot_suppression(res).axes[0]
    lo, hi = ax.get_ylim()
    values = np.concatenate([res[v].values.ravel() for v in ("mean", "ci_low", "ci_high")]
                            + [[float(res["uniform_reference"])]])
    values = values[np.isfinite(values)]
    assert lo <= values.min() and hi >= values.max()  # nothing clipped, the reference visible
    assert (values.max() - values.min()) / (hi - lo) > 0.75  # the data fill the axis
    if values.max() * 1.1 < 1.0:
        assert hi < 1.0


def test_token_ranking_titles_stay_inside_the_figure():
    import xarray as xr

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    prompts = ["a red circle to the left of a blue square and a very long tail of words that goes on", "x"]
    k = 3
    rank = xr.Dataset(
        {"token": (("prompt", "rank"), np.arange(6).reshape(2, 3)), "token_text": (("prompt", "rank"), np.full((2, 3), "red")),
         "token_source": (("prompt", "rank"), np.full((2, 3), "t5")), "share": (("prompt", "rank"), np.full((2, 3), 0.2)),
         "padding_share": ("prompt", [0.25, 0.1]), "n_prompt_tokens": ("prompt", [23, 5]),
         "n_padding_tokens": ("prompt", [9, 27])},
        coords={"prompt": prompts, "rank": np.arange(k)})
    fig = plotting.plot_token_ranking(rank)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    width = fig.bbox.width
    for ax in fig.axes:
        box = ax.title.get_window_extent(canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= width + 1, (ax.title.get_text(), box, width)


def test_a_prompt_with_dollar_signs_is_drawn_as_text_not_a_formula(tmp_path):
    """Audit: matplotlib read '$...$' in a prompt as mathtext: '$5 and $6' lost its signs, '$\\frac x$' failed at
    savefig (`figures`: internal error, after writing the figures before it)."""
    from matplotlib.text import Text

    prompts = ("a $5 and $6 cube", "a $\\frac x$ ball")
    fig = plotting.plot_token_ranking(A.token_ranking(make_run(prompts=prompts, seeds=(0,))))
    assert plotting.save_figure(fig, tmp_path, "rank", formats=("png", "pdf"))
    texts = [t for t in fig.findobj(Text) if t.get_visible() and "$" in t.get_text()]
    assert all(any(p in t.get_text() for t in texts) for p in prompts) and not any(t.get_parse_math() for t in texts)


def _row_labels(fig):
    return [t.get_text() for ax in fig.axes if not ax.axison for t in ax.texts]


def test_fig3_rows_are_the_most_changed_tokens_or_the_named_ones(sweep_dir):
    sweep = open_sweep(sweep_dir)
    md = A.map_difference(sweep.sel(schedule="step:1.5@970"), sweep.sel(schedule="none"))
    sub = md.isel(sample=0)
    score = np.nanmean(np.abs(sub["token_abs_change"].values), axis=0)
    ok = np.isfinite(score) & ~sub["token_is_padding"].values
    top = sorted(np.flatnonzero(ok)[np.argsort(-score[ok], kind="stable")[:3]])
    labels = _row_labels(plotting.plot_map_difference(md, max_tokens=3))
    texts = [A.readable_token(sub["token_text"].values[k]) for k in top]
    assert len(labels) == 3 and [x.split()[0] for x in labels] == texts
    # named by word: every recorded occurrence of 'red'
    red = [k for k in np.flatnonzero(ok) if A.readable_token(sub["token_text"].values[k]) == "red"]
    labels = _row_labels(plotting.plot_map_difference(md, tokens=["red"]))
    assert len(labels) == len(red) >= 1 and all(x.startswith("red") for x in labels)
    with pytest.raises(TacaProbeError, match="zebra"):
        plotting.plot_map_difference(md, tokens=["zebra"])


def test_plots_refuse_another_analysis_result_and_bad_options(sweep_dir):
    """Audit: plot_suppression(compare_runs(...)) was a KeyError ('mean'), plot_gamma_grid(suppression(...)) a
    KeyError ('prompt'), plot_map_difference(steps=1.5) a TypeError, plot_token_ranking(max_prompts=0) matplotlib's
    ValueError."""
    sweep = open_sweep(sweep_dir)
    treated, base = sweep.sel(schedule="step:1.5@970"), sweep.sel(schedule="none")
    supp = A.suppression(base, n_resamples=10)
    wrong = [(plotting.plot_suppression, A.compare_runs(treated, base, n_resamples=10), "suppression"),
             (plotting.plot_amplification, A.token_ranking(base), "amplification"),
             (plotting.plot_timestep_slope, supp, "timestep_awareness"),
             (plotting.plot_mass_vs_gamma, supp, "mass_vs_gamma"), (plotting.plot_gamma_grid, supp, "gamma_image_grid"),
             (plotting.plot_map_difference, supp, "map_difference"),
             (plotting.plot_token_change, base, "map_difference"),
             (plotting.plot_token_ranking, supp, "token_ranking")]
    for plot, res, made_by in wrong:
        with pytest.raises(plotting.FigureError, match=made_by) as e:
            plot(res)
        assert "\n" not in str(e.value)
    md = A.map_difference(treated, base)
    for kwargs in ({"steps": 1.5}, {"steps": "0"}, {"steps": []}):
        with pytest.raises(plotting.FigureError, match="steps"):
            plotting.plot_map_difference(md, **kwargs)
    with pytest.raises(plotting.FigureError, match="max_prompts"):
        plotting.plot_token_ranking(A.token_ranking(base), max_prompts=0)
    for plot in (plotting.plot_map_difference, plotting.plot_token_change):
        with pytest.raises(plotting.FigureError, match="max_tokens"):
            plot(md, max_tokens=0)
    assert len(plotting.plot_map_difference(md, steps=np.int64(0)).axes) >= 1  # one step index stays fine


def test_sweep_resume_records_only_what_is_missing(sweep_dir, tmp_path, capsys):
    folder = tmp_path / "sweep"
    shutil.copytree(sweep_dir, folder)
    first_png = folder / "images" / "00_none" / "p00_seed0.png"
    before = first_png.stat().st_mtime_ns
    shutil.rmtree(folder / "stores" / "02_step_1.5@970.zarr")
    shutil.rmtree(folder / "images" / "02_step_1.5@970")
    (folder / "images" / "01_step_1.2@970" / "p01_seed1.png").unlink()  # a PNG lost: rewritten from the store
    rc, out, err = run_cli([*SWEEP, "--out", folder, "--resume"], capsys)
    assert rc == 0, err
    assert len(list(folder.glob("images/*/*.png"))) == 12
    assert first_png.stat().st_mtime_ns == before  # complete samples are not redone
    sweep = open_sweep(folder)
    assert sweep.sizes["sample"] == 4
    np.testing.assert_array_equal(sweep["image"].sel(schedule="step:1.5@970").values,
                                  open_sweep(sweep_dir)["image"].sel(schedule="step:1.5@970").values)
    rc, _, err = run_cli([*SWEEP, "--out", folder, "--resume", "--seeds", "0"], capsys)
    one_line_error(rc, err, "cannot resume", "plan")
    rc, _, err = run_cli([*SWEEP, "--out", folder], capsys)
    one_line_error(rc, err, "already exists", "--resume")


def test_figure_without_maps_names_the_variable_and_the_flag(pipes, tmp_path, capsys):
    from taca_probe import run_sweep

    folder = run_sweep(pipes("tiny-sd3"), tmp_path / "nomaps", prompts=["a cat"], seeds=[0],
                       schedules=["none", "step:1.2@970"], call={"num_inference_steps": 1, "height": 32, "width": 32,
                                                                 "max_sequence_length": 8},
                       progress=False)
    rc, _, err = run_cli(["figures", folder, "--figures", "fig3", "--out", tmp_path / "f"], capsys)
    one_line_error(rc, err, "'maps'", "--maps", "Fig. 3")
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())


def test_a_figure_that_fails_to_render_leaves_no_others_behind(sweep_dir, tmp_path, monkeypatch):
    """Audit: matplotlib draws when saving, and figures were saved one by one: a failure in the last one (here a
    formula that does not parse) left every Fig. 2 file written before it."""
    from matplotlib.figure import Figure

    def bad(*args, **kwargs):
        fig = Figure()
        fig.text(0, 0, "$\\frac x$", parse_math=True)
        return fig

    monkeypatch.setattr(plotting, "plot_token_ranking", bad)
    with pytest.raises(ValueError):
        render_figures(sweep_dir, tmp_path / "f", figures="fig2,fig5", formats=("png",), n_resamples=100)
    assert not (tmp_path / "f").exists()


BAD = [
    (["figures", "/nonexistent/store.zarr"], "no store or sweep at"),
    (["figures", "{sweep}", "--figures", "fig9"], "unknown figure(s) fig9; choose from all, fig2, fig3, fig4, fig5"),
    (["figures", "{sweep}", "--format", "gif"], "unknown figure format(s) gif; choose from png, pdf, svg"),
    (["figures", "{sweep}", "--by", "blocks"], "invalid choice: 'blocks'"),
    (["figures", "{sweep}", "--baseline", "step:9@1"], "matches no input"),
    (["figures", "{tmp}"], "neither a taca-probe store nor a sweep folder"),
    (["sweep", "--prompt", "x", "--t-thresh", "2000"], "not a timestep in 0..1000"),
    (["sweep", "--prompt", "x", "--gamma0", "a,b"], "bad number list"),
    (["sweep", "--prompt", "x", "--gamma0", "0"], "valid forms"),
    (["sweep", "--prompt", "x", "--no-grid"], "--no-grid needs at least one --schedule"),
    (["sweep", "--prompt", "x", "--schedule", "wobble:2"], "valid forms"),
    (["sweep", "--prompt", "x", "--maps", "steps=x"], "bad maps selection"),
    (["sweep", "--prompt", "x", "--out", "{tmp}"], "already exists"),
    (["sweep", "--prompt", "x", "--out", "{tmp}", "--overwrite"], "not a sweep folder"),
    (["sweep", "--prompt", "x", "--out", "{tmp}/new", "--resume"], "no sweep at"),
    (["sweep"], "no prompt given"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(argv, message, sweep_dir, tmp_path, capsys):
    (tmp_path / "something.txt").write_text("not a store")
    argv = [a.replace("{sweep}", str(sweep_dir)).replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "figures" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "figs")]
    rc, _, err = run_cli(argv, capsys)
    one_line_error(rc, err, message)


def test_cli_choice_lists_match_the_library():
    import argparse

    from taca_probe.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["figures"]
    by = next(a for a in sub._actions if a.dest == "by")
    assert tuple(by.choices) == A.GROUP_BY
    assert set(plotting.FIGURES) == {"fig2", "fig3", "fig4", "fig5"} and plotting.FORMATS == ("png", "pdf", "svg")


# ------------------------------------------------------------------------------------------------
# the figure scripts (run in-process: the same code as `python analysis/figN_*.py ...`)
# ------------------------------------------------------------------------------------------------


def _script(name):
    return runpy.run_path(str(ROOT / "analysis" / name), run_name="not_main")["main"]


def test_figure_scripts_on_given_stores(sweep_dir, tmp_path, capsys):
    sys.modules.pop("_common", None)
    store = sweep_dir / "stores" / "00_none.zarr"
    assert _script("fig2_suppression.py")([str(store), "--out", str(tmp_path), "--format", "png"]) == 0
    assert _script("fig4_gamma_sweep.py")([str(sweep_dir), "--out", str(tmp_path), "--format", "png"]) == 0
    assert _script("fig5_token_ranking.py")([str(sweep_dir), "--out", str(tmp_path), "--format", "png"]) == 0
    taca = sweep_dir / "stores" / "01_step_1.2@970.zarr"
    assert _script("fig3_attention_map_diff.py")([str(taca), str(store), "--out", str(tmp_path), "--format", "png"]) == 0
    names = {p.stem for p in tmp_path.glob("*.png")}
    assert names == set(FIGURE_NAMES) - {"fig2_amplification"}


def test_figure_scripts_refuse_a_missing_schedule_and_a_bad_number_as_usage_errors(sweep_dir, tmp_path, capsys):
    """Audit: fig3 on a sweep without its --schedule ended in a KeyError traceback, fig4 --gamma0 abc in a
    ValueError one; fig2 and fig5 drew the first of two stores and ignored the second without a word; fig3
    drew BASELINE TACA as "TACA (none) - baseline (step:...)"."""
    sys.modules.pop("_common", None)
    two = [str(sweep_dir / "stores" / "01_step_1.2@970.zarr"), str(sweep_dir / "stores" / "00_none.zarr")]
    for name, argv in (("fig3_attention_map_diff.py", [str(sweep_dir), "--schedule", "step:1.7@970"]),
                       ("fig4_gamma_sweep.py", ["--gamma0", "1.2,abc", "--record-dir", str(tmp_path / "rec")]),
                       ("fig2_suppression.py", two), ("fig5_token_ranking.py", two),
                       ("fig3_attention_map_diff.py", two[::-1])):  # was drawn as "TACA (none) - baseline (...)"
        with pytest.raises(SystemExit) as e:
            _script(name)([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "error:" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "rec").exists() and not (tmp_path / "out").exists()


def test_figure_script_records_when_given_no_store(tmp_path, capsys):
    sys.modules.pop("_common", None)
    main3 = _script("fig3_attention_map_diff.py")
    rc = main3(["--model", "tiny-sd3", "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64",
                "--max-sequence-length", "8", "--prompt", "a red cube", "--seeds", "0",
                "--record-dir", str(tmp_path / "rec"), "--out", str(tmp_path / "out"), "--format", "png"])
    assert rc == 0
    assert (tmp_path / "rec" / "sweep.json").is_file()
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"fig3_attention_map_diff.png", "fig3_token_change.png"}
    # other settings into the same --record-dir: refused, the recording kept, and the way out named
    manifest = (tmp_path / "rec" / "sweep.json").read_bytes()
    with pytest.raises(TacaProbeError, match="--record-dir"):
        main3(["--model", "tiny-sd3", "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64",
               "--max-sequence-length", "8", "--prompt", "a red cube", "--seeds", "1",
               "--record-dir", str(tmp_path / "rec"), "--out", str(tmp_path / "out"), "--format", "png"])
    assert (tmp_path / "rec" / "sweep.json").read_bytes() == manifest


def test_plots_refuse_results_with_extra_dimensions(sweep_dir):
    res = A.suppression(open_sweep(sweep_dir), n_resamples=50)
    with pytest.raises(TacaProbeError, match=r"extra dimension\(s\) schedule; select one first"):
        plotting.plot_suppression(res)
    fig = plotting.plot_suppression(res.sel(schedule="none"))
    assert fig.axes and "n = 4 samples" in fig.axes[0].get_title()


def test_figures_tokens_option_names_fig3_rows(sweep_dir, tmp_path, capsys):
    rc, _, err = run_cli(["figures", sweep_dir, "--figures", "fig3", "--tokens", "red,cube", "--format", "png",
                       "--out", tmp_path / "ok"], capsys)
    assert rc == 0, err
    assert (tmp_path / "ok" / "fig3_attention_map_diff.png").is_file()
    rc, _, err = run_cli(["figures", sweep_dir, "--figures", "fig3", "--tokens", "zebra", "--out", tmp_path / "no"], capsys)
    one_line_error(rc, err, "'zebra'")


def test_open_sweep_of_a_generator_of_store_paths_is_the_sweep_folder(sweep_dir):
    """A list or generator of stores (e.g. Path.glob) opens as the sweep folder does."""
    stores = sorted((sweep_dir / "stores").glob("*.zarr"))
    from_folder, from_paths = open_sweep(sweep_dir), open_sweep(p for p in stores)
    assert list(from_paths["schedule"].values) == list(from_folder["schedule"].values)
    np.testing.assert_array_equal(from_paths["vis_txt_mass"].values, from_folder["vis_txt_mass"].values)


def test_mass_vs_gamma_plot_draws_a_restricted_schedule_as_its_own_point():
    """step:1.2@970;blocks=joint shares gamma0 1.2 and t_thresh 970 with step:1.2@970 but is not on its line."""
    res = A.mass_vs_gamma(_sweep_with_restricted(), n_resamples=100)
    handles, labels = plotting.plot_mass_vs_gamma(res).axes[0].get_legend_handles_labels()
    drawn = dict(zip(labels, handles))
    line = drawn["t_thresh = 970"]
    np.testing.assert_allclose(line.get_xdata(), [1.0, 1.2, 1.5])
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float),
                               res["mean"].sel(schedule=["none", "step:1.2@970", "step:1.5@970"]).values)
    point = drawn["step:1.2@970;blocks=joint"].lines[0]  # an errorbar marker
    np.testing.assert_allclose(np.asarray(point.get_ydata(), float),
                               res["mean"].sel(schedule=["step:1.2@970;blocks=joint"]).values)


@pytest.mark.parametrize("analyse,plot", [(A.suppression, plotting.plot_suppression),
                                          (A.suppression, plotting.plot_suppression_heatmap),
                                          (A.amplification, plotting.plot_amplification)])
def test_a_schedule_selected_from_a_sweep_result_is_named_in_the_title(analyse, plot):
    """suppression(sweep).isel(schedule=i) keeps the schedule in a scalar coordinate; the title said 'none'."""
    from_sweep = analyse(_sweep_with_restricted(), by="layer" if plot is plotting.plot_suppression_heatmap
                         else "block_type", n_resamples=100)
    title = plot(from_sweep.sel(schedule="step:1.5@970")).axes[0].get_title()
    assert "step:1.5@970" in title.replace("\n", "")


def test_report_suppression_title_gives_each_runs_number_of_samples():
    """Runs of 2 and 4 samples: the title said 'n = 4 per run' (the first run's count)."""
    full, half = make_run(seeds=(0, 1, 2, 3)), make_run(seeds=(0, 1), schedule="step:1.2@970")
    title = _suppression_figure([Run("a", "none", full), Run("b", "step:1.2@970", half)],
                                {"n_resamples": 50, "seed": 0, "branch": None}).layout.title.text
    assert re.search(r"\b4\b", title) and re.search(r"\b2\b", title)


def _two_branch_run():
    import xarray as xr

    cond, uncond = make_run(vis=np.full((2, 2, 3, 2), 0.3)), make_run(vis=np.full((2, 2, 3, 2), 0.1))
    return xr.concat([cond, uncond], dim="branch").assign_coords(branch=["cond", "uncond"])


@pytest.mark.parametrize("branch", ["cond", "uncond"])
@pytest.mark.parametrize("analyse,plot", [(A.suppression, plotting.plot_suppression),
                                          (A.amplification, plotting.plot_amplification),
                                          (A.timestep_awareness, plotting.plot_timestep_slope)])
def test_titles_name_the_uncond_branch(analyse, plot, branch):
    """A result of the unconditional CFG branch was titled as the conditional one."""
    res = analyse(_two_branch_run(), branch=branch, n_resamples=100)
    assert res.attrs["branch"] == branch
    if analyse is A.suppression:  # and the numbers are the branch's own
        np.testing.assert_allclose(res["mean"].values, 0.3 if branch == "cond" else 0.1, rtol=1e-6)
    title = plot(res).axes[0].get_title().replace("\n", " ")
    assert ("uncond" in title) == (branch == "uncond")


def test_suppression_by_layer_title_does_not_claim_a_mean_over_layers():
    res = A.suppression(make_run(), by="layer", n_resamples=100)
    assert "and layers" not in plotting.plot_suppression(res).axes[0].get_title().replace("\n", " ")
    assert "and layers" in plotting.plot_suppression(A.suppression(make_run(), n_resamples=100)).axes[0].get_title()


def test_baseline_and_treated_must_be_two_runs():
    """Audit: figures --baseline S --treated S drew a run against itself (every difference zero)."""
    from taca_probe.rendering import choose_runs

    runs = [Run("a.zarr", "none", make_run()), Run("b.zarr", "step:1.2@970", make_run(schedule="step:1.2@970"))]
    assert choose_runs(runs, baseline="none", treated="step:1.2@970") == (runs[0], runs[1])
    with pytest.raises(TacaProbeError, match="same run"):
        choose_runs(runs, baseline="b.zarr", treated="step:1.2@970")


def test_fig3_overlay_draws_each_map_over_the_taca_image(sweep_dir):
    sweep = open_sweep(sweep_dir)
    md = A.map_difference(sweep.sel(schedule="step:1.5@970"), sweep.sel(schedule="none"))
    grey = np.asarray(md["treated_image"].isel(sample=1).values, float).mean(axis=-1)
    panels = [ax for ax in plotting.plot_map_difference(md, sample=1, max_tokens=2, overlay=True).axes if ax.images]
    assert panels and all(len(ax.images) == 2 for ax in panels)
    assert all(np.array_equal(np.asarray(ax.images[0].get_array(), float), grey) for ax in panels)
    with pytest.raises(plotting.FigureError, match="overlay"):  # stores recorded without images
        plotting.plot_map_difference(md.drop_vars("treated_image"), overlay=True)


@pytest.fixture(scope="module")
def more_seeds(sweep_dir, pipes_module, tmp_path_factory):
    """A second sweep of sweep_dir's schedules on a new seed, and a store of another gamma0 on that seed."""
    from taca_probe import probe, run_sweep

    tmp = tmp_path_factory.mktemp("more")
    call = {"num_inference_steps": 2, "height": 64, "width": 64, "max_sequence_length": 8}
    folder = run_sweep(pipes_module, tmp / "s2", prompts=["a red cube"], seeds=[2], maps="steps=0-1",
                       schedules=["none", "step:1.2@970", "step:1.5@970"], call=call, progress=False)
    with probe(pipes_module, tmp / "x.zarr", schedule="step:1.3@970", maps="steps=0-1") as run:
        run.sample("a red cube", seed=2, **call)
    return folder, tmp / "x.zarr"


@pytest.fixture(scope="module")
def pipes_module():
    from taca_probe import load_pipeline

    pipe = load_pipeline("tiny-sd3", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_second_sweep_of_more_seeds_opens_and_draws_with_the_first(sweep_dir, more_seeds):
    """open_sweep([A, B]) refused a sweep folder in the list ('not a taca-probe store'), and two sweeps of one
    schedule could not be joined; `figures A B` drew Fig. 4 from A alone, leaving B out without a word."""
    from taca_probe import open_run
    from taca_probe.rendering import open_inputs
    from taca_probe.stats import sample_keys

    s2, _ = more_seeds
    ds = open_sweep([sweep_dir, s2])
    keys = sample_keys(ds)
    assert sorted(keys) == sorted(sample_keys(open_sweep(sweep_dir)) + [("a red cube", 2, 0)])
    for entry in json.loads((sweep_dir / "sweep.json").read_text())["schedules"]:
        spec, stem = entry["spec"], entry["store"]
        for folder in (sweep_dir, s2):  # every sample is the one its own store holds under that key
            store = open_run(folder / stem)
            for i, key in enumerate(sample_keys(store)):
                np.testing.assert_array_equal(ds["vis_txt_mass"].sel(schedule=spec).isel(sample=keys.index(key)),
                                              store["vis_txt_mass"].isel(sample=i))
    runs, sweep, _ = open_inputs([sweep_dir, s2])
    assert sweep.sizes["sample"] == 5 and sorted(r.spec for r in runs) == sorted(ds["schedule"].values)
    assert all(r.ds.sizes["sample"] == 5 for r in runs)


def test_report_of_a_sweep_grown_by_a_second_folder_shows_each_schedule_once_with_every_sample(sweep_dir, more_seeds,
                                                                                                tmp_path):
    """Audit: `report A B` over two sweeps of one schedule showed it as two runs, while `figures A B` joined them."""
    from taca_probe import open_run, report
    from taca_probe.rendering import open_inputs

    s2, _ = more_seeds
    specs = ["none", "step:1.2@970", "step:1.5@970"]
    assert report([sweep_dir, s2], tmp_path, n_resamples=100).runs == specs
    runs = open_inputs([sweep_dir, s2], as_sweep=False)[0]
    assert [r.spec for r in runs] == specs and all(r.ds.sizes["sample"] == 5 for r in runs)
    fig = _suppression_figure(runs, {"n_resamples": 100, "seed": 0, "branch": None})
    for entry in json.loads((sweep_dir / "sweep.json").read_text())["schedules"]:
        # the suppression ratio of every sample of both folders, from the stores themselves
        stores = [open_run(folder / entry["store"]) for folder in (sweep_dir, s2)]
        mass = np.concatenate([st["vis_txt_mass"].mean(("layer", "head")).values for st in stores])
        uniform = stores[0].attrs["n_txt"] / (stores[0].attrs["n_txt"] + stores[0].attrs["n_vis"])
        line = next(t for t in fig.data if t.name == f"{entry['spec']} · joint")
        np.testing.assert_allclose(np.asarray(line.y) / uniform, mass.mean(0) / uniform, rtol=1e-5)


def test_inputs_of_one_schedule_that_do_not_join_are_drawn_apart_not_as_the_first(sweep_dir, tmp_path):
    """Audit: `figures A COPY_OF_A` (one sample twice: refused by open_sweep) drew A alone, labelled 'A, COPY [none]',
    and Fig. 4 from A alone without a word."""
    from taca_probe.rendering import open_inputs

    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    runs, sweep, _ = open_inputs([sweep_dir, copy])
    specs = ["none", "step:1.2@970", "step:1.5@970"]
    assert sweep is None and [r.label for r in runs] == [f"{f} [{s}]" for f in (sweep_dir, copy) for s in specs]
    with pytest.raises(TacaProbeError):
        render_figures([sweep_dir, copy], tmp_path / "f", figures="fig4", formats=("png",), n_resamples=100)
    assert not (tmp_path / "f").exists()


def test_a_sweep_plus_a_store_of_another_gamma_draws_fig4_from_both(more_seeds, tmp_path):
    s2, extra = more_seeds
    out = render_figures([s2, extra], tmp_path, figures="fig4", formats=("png",), n_resamples=100)
    assert "step:1.3@970" in out["sources"]["fig4_mass_vs_gamma"]
    ds = open_sweep([s2, extra])
    assert list(ds["schedule"].values) == ["none", "step:1.2@970", "step:1.5@970", "step:1.3@970"]
    with pytest.raises(TacaProbeError):  # one sample of a schedule twice: refused, not doubled
        open_sweep([s2, s2 / "stores" / "00_none.zarr"])


def test_a_hand_edited_manifest_cannot_relabel_a_schedule(sweep_dir, tmp_path, capsys):
    """Audit: swapping two stores in sweep.json made open_sweep label the gamma 1.2 data 'none', silently."""
    folder = tmp_path / "sw"
    shutil.copytree(sweep_dir, folder)
    doc = json.loads((folder / "sweep.json").read_text())
    first, second = doc["schedules"][:2]
    first["store"], second["store"] = second["store"], first["store"]
    (folder / "sweep.json").write_text(json.dumps(doc))
    with pytest.raises(TacaProbeError):
        open_sweep(folder)
    rc, _, err = run_cli(["figures", folder, "--out", tmp_path / "f"], capsys)
    one_line_error(rc, err)


def test_a_store_of_a_given_sweep_names_that_schedules_run(sweep_dir, tmp_path):
    """Audit: figures SWEEP --baseline SWEEP/stores/00_none.zarr said the store 'matches no input', though it is the
    sweep's run of that schedule (the manifest says so); only the schedule spec worked, in report too."""
    store = {e["spec"]: str(sweep_dir / e["store"]) for e in json.loads((sweep_dir / "sweep.json").read_text())["schedules"]}
    res = render_figures(sweep_dir, tmp_path / "f", figures="fig2", formats="png", n_resamples=100,
                         baseline=store["step:1.2@970"], treated=store["step:1.5@970"])
    assert res["sources"]["fig2_suppression"].endswith("[step:1.2@970]")
    assert res["sources"]["fig2_amplification"].endswith("[step:1.5@970]")
    runs = open_inputs(sweep_dir, as_sweep=False)[0]  # as report opens them
    assert [r.spec for r in choose_runs(runs, baseline=store["none"], treated=store["step:1.5@970"])] == [
        "none", "step:1.5@970"]
    copy = tmp_path / "copy"  # the same schedule's store in a sweep that is not an input
    shutil.copytree(sweep_dir, copy)
    with pytest.raises(TacaProbeError, match="matches no input"):
        choose_runs(runs, baseline=str(copy / Path(store["none"]).relative_to(sweep_dir)))


def test_figures_of_a_store_without_a_complete_sample_names_it(tmp_path, capsys):
    """Audit: figures STORE of no complete sample failed with 'no data to average ...', naming no store; beside
    another store it failed all figures for fig4 ('the sweep holds no sample')."""
    empty, other = tmp_path / "empty.zarr", tmp_path / "none.zarr"
    for store in (empty, other):
        shutil.copytree(ROOT / "tests" / "data" / "store-v0.1.0.zarr", store)
    zarr.open_group(str(empty), mode="r+")["complete"][:] = False
    meta = json.loads((other / "zarr.json").read_text())  # another schedule, so the two open as a sweep
    meta["attributes"]["schedule"] = "none"
    (other / "zarr.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(["figures", empty, "--out", tmp_path / "f"], capsys)
    one_line_error(rc, err, str(empty), "no complete sample")
    with pytest.warns(UserWarning, match="empty.zarr: no complete sample"):
        res = render_figures([other, empty], tmp_path / "g", formats="png", n_resamples=100)
    assert "fig2_suppression" in res["written"] and "fig4" in res["skipped"]


def test_figures_of_a_sweep_stopped_midway_draw_each_schedule_from_its_own_store(sweep_dir, tmp_path, monkeypatch):
    """Audit: a sweep whose last schedule had no complete sample yet (recording, or stopped) drew no figure at all:
    every schedule's run was the samples complete in all of them, so none. Fig. 3 pairs the samples both hold."""
    from taca_probe import open_run
    from taca_probe.stats import sample_keys

    folder = tmp_path / "sw"
    shutil.copytree(sweep_dir, folder)
    store = {e["spec"]: folder / e["store"] for e in json.loads((folder / "sweep.json").read_text())["schedules"]}
    zarr.open_group(str(store["step:1.5@970"]), mode="r+")["complete"][:] = False
    zarr.open_group(str(store["step:1.2@970"]), mode="r+")["complete"][1] = False
    seen = {}
    for name in ("plot_suppression", "plot_map_difference"):
        draw = getattr(plotting, name)
        monkeypatch.setattr(plotting, name, lambda res, *a, _draw=draw, _name=name, **k: (
            seen.setdefault(_name, res), _draw(res, *a, **k))[1])
    with pytest.warns(UserWarning, match=re.escape("[step:1.5@970]: no complete sample")) as caught:
        res = render_figures(folder, tmp_path / "f", formats="png", n_resamples=100)
    assert res["sources"]["fig2_suppression"].endswith("[none]") and "fig4" in res["skipped"]
    assert any("[step:1.2@970]" in str(w.message) and "[none]" in str(w.message) for w in caught)  # Fig. 3's pairs
    joined = [str(w.message) for w in caught if "resume the sweep" in str(w.message)]  # Fig. 4's join
    assert joined and all("Fig. 4" in m for m in joined)  # not Figs. 2, 3 and 5, which use every sample
    base = open_run(store["none"])
    assert seen["plot_suppression"].attrs["n_samples"] == 4
    for bt in seen["plot_suppression"]["block_type"].values:  # the mean of all 4 of the store's samples
        mass = base["vis_txt_mass"].where(base["block_type"] == bt).mean(("layer", "head")).mean("sample")
        np.testing.assert_allclose(seen["plot_suppression"]["mean"].sel(block_type=bt).values, mass.values, rtol=1e-5)
    assert len(sample_keys(seen["plot_map_difference"])) == 3  # the treated schedule's 3 complete samples
    assert set(sample_keys(seen["plot_map_difference"])) == set(sample_keys(open_run(store["step:1.2@970"])))
