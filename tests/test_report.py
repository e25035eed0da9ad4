"""`taca-probe report`: the page's data against the stores, and the page itself in headless Chromium.

One sweep (tiny-sd3, 64 px, 2 steps, 2 prompts x 2 seeds, schedules none and step:1.5@970, maps at
steps 0-1) is recorded once per module. The browser test drives Debian's chromium through
Playwright (no downloaded browser); where Chromium is missing it fails and says so.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from taca_probe import analysis as A
from taca_probe import load_pipeline, open_sweep, probe, rendering, report, run_sweep
from taca_probe.cli import main
from taca_probe.errors import TacaProbeError
from taca_probe.rendering import Run, _heatmap_figure, _suppression_figure, choose_runs, open_inputs
from taca_probe.store import open_run

pytestmark = pytest.mark.slow  # records sweeps, renders the page, drives a browser

OLD_STORE = Path(__file__).parent / "data" / "store-v0.1.0.zarr"  # tiny-sd3, 4 samples, 2 steps, 3 layers
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report") / "sweep"
    run_sweep("tiny-sd3", folder, prompts=["a red cube", "a blue ball"], seeds=[0, 1], schedules=["none", "step:1.5@970"],
              maps="steps=0-1;tokens=all", device="cpu", progress=False,
              call={"num_inference_steps": 2, "height": 64, "width": 64, "max_sequence_length": 8})
    return folder


@pytest.fixture(scope="module")
def page(sweep_dir, tmp_path_factory):
    return report(sweep_dir, tmp_path_factory.mktemp("page"), n_resamples=200)


def _page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    m = re.search(r"<script type='application/json' id='taca-data'>(.*?)</script>", text, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def _png(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_page_is_self_contained_and_holds_the_stored_maps_and_images(page, sweep_dir):
    text = page.path.read_text(encoding="utf-8")
    assert page.path.name == "index.html" and page.size_bytes == page.path.stat().st_size
    # nothing fetched from elsewhere: no external scripts, stylesheets or images
    assert not re.search(r"""<(script|img|link)[^>]+(src|href)=["']?(https?:)?//""", text)
    data = _page_data(page.path)
    sweep = open_sweep(sweep_dir)
    specs = [r["spec"] for r in data["runs"]]
    assert specs == ["none", "step:1.5@970"]
    assert specs[data["baseline"]] == "none" and specs[data["treated"]] == "step:1.5@970"
    assert [s["step"] for s in data["steps"]] == [0, 1]
    n_s, n_st, n_l, n_t, ny, nx = data["shape"]
    assert (n_s, n_st, n_l, n_t, ny, nx) == (4, 2, sweep.sizes["layer"], sweep.sizes["token"], sweep.sizes["y"], sweep.sizes["x"])
    for run in data["runs"]:
        maps = np.frombuffer(base64.b64decode(data["maps"][str(run["index"])]), "<f2").reshape(data["shape"])
        ref = sweep["maps"].sel(schedule=run["spec"]).isel(step=[0, 1]).transpose("sample", "step", "layer", "token", "y", "x")
        np.testing.assert_array_equal(maps, ref.values)
        for i in range(4):
            np.testing.assert_array_equal(_png(data["images"][str(run["index"])][i]),
                                          sweep["image"].sel(schedule=run["spec"]).isel(sample=i).values)
    pad = sweep["token_is_padding"].values
    for i, s in enumerate(data["samples"]):
        assert (s["prompt"], s["seed"]) == (str(sweep["prompt"].values[i]), int(sweep["seed"].values[i]))
        assert [t["padding"] for t in s["tokens"]] == pad[i].tolist()


def test_report_of_one_store_has_a_viewer_without_a_baseline(sweep_dir, tmp_path):
    store = sweep_dir / "stores" / "01_step_1.5@970.zarr"
    res = report(store, tmp_path, n_resamples=100)
    data = _page_data(res.path)
    assert res.runs == ["step:1.5@970"] and data["baseline"] is None and len(data["runs"]) == 1
    text = res.path.read_text(encoding="utf-8")
    # the viewer has one panel (no baseline, no difference)
    assert text.count('"type":"heatmap"') >= 1 and "selected − baseline" not in text


def test_figures_and_page_open_inputs_and_choose_runs_the_same_way(sweep_dir, tmp_path):
    import taca_probe
    import taca_probe.rendering  # noqa: F401 - importing the module must not hide the function

    runs, sweep, _ = open_inputs(sweep_dir)
    assert [r.spec for r in runs] == ["none", "step:1.5@970"] and sweep.sizes["schedule"] == 2
    assert [(b.spec, t.spec) for b, t in [choose_runs(runs)]] == [("none", "step:1.5@970")]
    swapped = choose_runs(runs, baseline="step:1.5@970", treated=runs[0].label)
    assert [r.spec for r in swapped] == ["step:1.5@970", "none"]
    with pytest.raises(TacaProbeError, match="matches no input"):
        choose_runs(runs, baseline="step:9@1")
    stores = sorted((sweep_dir / "stores").iterdir())
    runs, sweep, _ = open_inputs(stores)  # stores of several schedules open together as a sweep
    assert [r.label for r in runs] == [str(p) for p in stores] and list(sweep["schedule"].values) == ["none", "step:1.5@970"]
    # the package's report is the function (no module is called report), and it writes the page
    assert taca_probe.report(stores[0], tmp_path, n_resamples=50).runs == ["none"]


def test_report_shows_inline_in_jupyter(page):
    frame = page._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "taca-data" in frame and "<script" not in frame.split('"')[0]


def _chromium(candidates=None) -> str:
    """Debian's chromium binary; a missing browser is a failure that says how to install it."""
    if candidates is None:
        candidates = (os.environ.get("TACA_PROBE_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"))
    for cand in candidates:
        if cand and Path(cand).is_file():
            return cand
    pytest.fail("Chromium is not installed, so the report cannot be tested in a browser: install it "
                "(`apt-get install -y chromium`, as .ci/run does) or set TACA_PROBE_CHROMIUM to its binary")


def test_a_missing_chromium_fails_and_says_how_to_install_it():
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        _chromium([None, "/nonexistent/chromium"])


@pytest.mark.slow
def test_report_in_headless_chromium_shows_the_selected_image_and_maps(page, sweep_dir):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs playwright (pip install -e '.[dev]')")
    chromium = _chromium()
    sweep = open_sweep(sweep_dir)
    errors: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="chromium-"), executable_path=chromium,
                                                    headless=True, args=CHROMIUM_ARGS,
                                                    viewport={"width": 1400, "height": 1000})
        try:
            tab = ctx.new_page()
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(page.path.resolve().as_uri(), wait_until="load")
            tab.wait_for_function("window.tacaReport !== undefined")  # fails after Playwright's 30 s
            # padding hidden by default: the token list holds prompt tokens only
            tokens = [int(v) for v in tab.eval_on_selector_all("#sel-token option", "os => os.map(o => o.value)")]
            sample = 3
            pad = sweep["token_is_padding"].values
            tab.select_option("#sel-sample", str(sample))
            tokens = [int(v) for v in tab.eval_on_selector_all("#sel-token option", "os => os.map(o => o.value)")]
            assert tokens and not pad[sample, tokens].any()
            tab.check("#show-padding")
            with_pad = [int(v) for v in tab.eval_on_selector_all("#sel-token option", "os => os.map(o => o.value)")]
            assert set(with_pad) > set(tokens) and pad[sample, sorted(set(with_pad) - set(tokens))].all()
            tab.uncheck("#show-padding")
            token, layer = tokens[-1], sweep.sizes["layer"] - 1
            tab.select_option("#sel-step", "1")
            tab.select_option("#sel-layer", str(layer))
            tab.select_option("#sel-token", str(token))
            treated_index = tab.evaluate("window.tacaReport.data.treated")
            tab.select_option("#sel-run", str(treated_index))
            z = tab.evaluate("document.getElementById('map-view').data.map(t => t.z)")
            zmax = tab.evaluate("document.getElementById('map-view').data.map(t => t.zmax)")
            src = tab.get_attribute("#view-image", "src")
            caption = tab.text_content("#view-caption")
            tab.locator("#map-view").screenshot(path=str(page.path.parent / "viewer.png"))
            charts = tab.evaluate("""['suppression', 'difference'].map(id => {
                const el = document.getElementById(id);
                return {y: el._fullData.map(t => Array.from(t.y)), name: el._fullData.map(t => t.name || null),
                        range: el._fullLayout.yaxis.range};
            })""")
        finally:
            ctx.close()
    assert not errors, errors
    sel = {"sample": sample, "step": 1, "token": token}
    treated = sweep["maps"].sel(schedule="step:1.5@970").isel(layer=layer)[sel].values.astype(np.float32)
    base = sweep["maps"].sel(schedule="none").isel(layer=layer)[sel].values.astype(np.float32)
    got = [np.array([[np.nan if v is None else v for v in row] for row in m], dtype=np.float64) for m in z]
    assert len(got) == 3
    np.testing.assert_array_equal(got[0], treated)
    np.testing.assert_array_equal(got[1], base)
    np.testing.assert_allclose(got[2], treated - base, rtol=0, atol=1e-7)
    assert zmax[0] == zmax[1] == pytest.approx(max(np.nanmax(treated), np.nanmax(base)))  # one shared colour scale
    assert np.nanmax(np.abs(got[2])) > 0  # TACA (gamma 1.5 at step 0) changed it: the comparison is not vacuous
    np.testing.assert_array_equal(_png(src), sweep["image"].sel(schedule="step:1.5@970").isel(sample=sample).values)
    assert str(sweep["prompt"].values[sample]) in caption
    # the suppression chart draws the stored means, on an axis that holds them and the uniform reference
    supp, diff = charts
    base = A.suppression(sweep.sel(schedule="none"), n_resamples=200)
    line = supp["y"][supp["name"].index("none · joint")]
    np.testing.assert_allclose(line, base["mean"].sel(block_type="joint").values, rtol=1e-6)
    lo, hi = supp["range"]
    shown = np.concatenate([np.ravel(y) for y in supp["y"]] + [[float(base["uniform_reference"])]])
    assert lo <= np.nanmin(shown) and hi >= np.nanmax(shown) and hi < 1.0  # fitted, not 0-1
    # the paired difference: TACA minus baseline per sample, averaged
    paired = A.compare_runs(sweep.sel(schedule="step:1.5@970"), sweep.sel(schedule="none"), n_resamples=200)
    np.testing.assert_allclose(diff["y"][diff["name"].index("joint")],
                               paired["diff"].sel(block_type="joint").values, rtol=1e-6, atol=1e-9)


def test_report_command(sweep_dir, tmp_path, capsys):
    rc = main(["report", str(sweep_dir), "--out", str(tmp_path / "r"), "--n-resamples", "100"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (tmp_path / "r" / "index.html").is_file() and "index.html" in out
    rc = main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_each_heat_map_panel_shows_every_step_of_its_own_run():
    """Audit: every heat-map panel was labelled with the first run's timesteps (a run of other steps lost columns and
    got wrong timesteps), and a timestep passed twice (a Heun scheduler) merged two steps into one column."""
    ds = open_run(OLD_STORE)
    heun = ds.assign_coords(timestep=ds["timestep"] * 0 + 500.0)  # every step at one timestep
    runs = [Run("a", "none", ds), Run("b", "const:1.1", ds.isel(step=[1])), Run("c", "const:1.2", heun)]
    for trace, run in zip(_heatmap_figure(runs, None, None).data, runs):
        mass = run.ds["vis_txt_mass"].sel(branch="cond").transpose("sample", "step", "layer", "head").values
        np.testing.assert_allclose(trace.z, np.nanmean(mass, axis=(0, 3)).T, rtol=1e-6)
        assert len(set(trace.x)) == len(trace.x) == run.ds.sizes["step"]  # one category per column
        shown = [float(label.split()[0]) for label in trace.x]
        np.testing.assert_allclose(shown, np.round(run.ds["timestep"].values[0]))


def test_a_prompt_with_a_comment_and_script_tags_leaves_the_viewer_working(tmp_path):
    """Audit: '<!--<script>' in a prompt put the HTML parser in a state where the data block's '</script>' did not end
    it, so the viewer's data and code became one unparsable element and the viewer never started (no error shown)."""
    prompt = 'a <!--<script> "cat" & </script> dog'
    with probe(load_pipeline("tiny-sd3", device="cpu"), tmp_path / "s.zarr", maps="steps=0;tokens=0-3") as rec:
        rec.sample(prompt, num_inference_steps=1, height=64, width=64, max_sequence_length=8)
    page = report(tmp_path / "s.zarr", tmp_path / "page", n_resamples=100)
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "chromium"), executable_path=_chromium(),
                                                    headless=True, args=CHROMIUM_ARGS)
        try:
            tab = ctx.new_page()
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(page.path.resolve().as_uri(), wait_until="load")
            tab.wait_for_function("window.tacaReport !== undefined")
            shown = tab.evaluate("window.tacaReport.data.samples[0].prompt")
        finally:
            ctx.close()
    assert not errors and shown == prompt


def test_a_failed_write_leaves_the_earlier_page_whole(tmp_path):
    """Audit: the page was written in place, so a write that failed (disk full; here a 1 MiB file-size limit) left a
    half-written index.html where the earlier page had been."""
    (tmp_path / "index.html").write_text("earlier page")
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))
    try:
        with pytest.raises(OSError):
            report(OLD_STORE, tmp_path, n_resamples=100)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]
    assert (tmp_path / "index.html").read_text() == "earlier page"


def test_a_store_path_that_is_not_utf8_gets_its_page(tmp_path, capsys):
    """Audit: a store folder named in Latin-1 (a path Python holds with surrogates) failed the page's UTF-8 encoding
    half-way: 'internal error' and an empty index.html in place of the earlier page."""
    store = tmp_path / os.fsdecode(b"caf\xe9.zarr")
    shutil.copytree(OLD_STORE, store)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "index.html").write_text("earlier page")
    assert main(["report", str(store), "--out", str(tmp_path / "r"), "--n-resamples", "100"]) == 0, capsys.readouterr()
    text = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert "caf?.zarr" in text and text.endswith("</html>")


def test_runs_whose_maps_differ_in_size_get_a_viewer_of_one_layout(sweep_dir, tmp_path):
    """Audit: a store of 333 tokens (max_sequence_length 256) next to stores of 85 crashed the report ('internal error:
    operands could not be broadcast'): the viewer decodes every run's maps with one layout."""
    old = open_run(OLD_STORE).sel(branch="cond")
    data = _page_data(report([OLD_STORE, sweep_dir], tmp_path, n_resamples=100).path)
    assert [r["label"] for r in data["runs"]] == [str(OLD_STORE)] and data["shape"][3:] == [333, 4, 4]
    assert [s["prompt"] for s in data["samples"]] == [str(p) for p in old["prompt"].values]  # all its samples
    shown = np.frombuffer(base64.b64decode(data["maps"]["0"]), "<f2").reshape(data["shape"])
    stored = old["maps"].isel(step=[0]).transpose("sample", "step", "layer", "token", "y", "x").values  # step 0 only
    np.testing.assert_array_equal(shown, stored.astype("<f2"))


def test_the_suppression_chart_draws_each_runs_uniform_reference(sweep_dir):
    """Audit: runs of different token counts (333 and 85 text tokens) got one uniform-attention line, the last run's."""
    runs = [Run("old", "step:1.3@970", open_run(OLD_STORE)),
            Run("new", "none", open_sweep(sweep_dir).sel(schedule="none"))]
    fig = _suppression_figure(runs, {"n_resamples": 100, "seed": 0, "branch": None})
    expected = sorted(r.ds.attrs["n_txt"] / (r.ds.attrs["n_txt"] + r.ds.attrs["n_vis"]) for r in runs)
    np.testing.assert_allclose(sorted(shape.y0 for shape in fig.layout.shapes), expected, rtol=1e-6)


def test_a_report_of_stores_does_not_open_them_as_a_sweep(sweep_dir, tmp_path, monkeypatch):
    """Audit: a report of stores that do not pair warned that samples 'were left out; resume the sweep', though
    the page never uses a sweep and shows every sample: opening the stores as one only served fig4."""
    monkeypatch.setattr(rendering, "join_schedules", lambda *a, **k: pytest.fail("opened the stores as a sweep"))
    stores = sorted((sweep_dir / "stores").iterdir())
    data = _page_data(report(stores, tmp_path, n_resamples=100).path)
    assert [r["label"] for r in data["runs"]] == [str(p) for p in stores]


def test_a_store_without_a_complete_sample_is_named_not_dropped_silently(sweep_dir, tmp_path):
    """Audit: a store whose samples were all unfinished vanished from the page without a word."""
    good, empty = sorted((sweep_dir / "stores").iterdir())[0], tmp_path / "empty.zarr"
    shutil.copytree(good, empty)
    zarr.open_group(str(empty), mode="r+")["complete"][:] = False
    assert open_run(empty).sizes["sample"] == 0
    with pytest.warns(UserWarning, match="empty.zarr: no complete sample"):
        data = _page_data(report([good, empty], tmp_path / "page", n_resamples=100).path)
    assert [r["label"] for r in data["runs"]] == [str(good)]


def test_a_report_of_a_sweep_stopped_midway_shows_each_schedules_own_samples(sweep_dir, tmp_path):
    """Audit: a report of a sweep whose second schedule had no complete sample yet (recording, or stopped) was
    refused, naming every schedule: each run was the samples complete in all of them, so none."""
    folder = tmp_path / "sw"
    shutil.copytree(sweep_dir, folder)
    first, second = (folder / e["store"] for e in json.loads((folder / "sweep.json").read_text())["schedules"])
    zarr.open_group(str(second), mode="r+")["complete"][:] = False
    with pytest.warns(UserWarning, match=re.escape("[step:1.5@970]: no complete sample")) as caught:
        res = report(folder, tmp_path / "page", n_resamples=100)
    assert all("[step:1.5@970]" in str(w.message) for w in caught)  # no other sample is left out
    data = _page_data(res.path)
    assert res.runs == ["none"] and len(data["samples"]) == 4
    np.testing.assert_array_equal(_png(data["images"]["0"][3]), open_run(first)["image"].isel(sample=3).values)
    # half recorded: each schedule shows its own samples, compared on those both hold
    zarr.open_group(str(second), mode="r+")["complete"][:] = [True, False, True, True]
    with pytest.warns(UserWarning, match=re.escape("[none]")):
        res = report(folder, tmp_path / "page2", n_resamples=100)
    text = res.path.read_text(encoding="utf-8")
    assert res.runs == ["none", "step:1.5@970"] and text.count("<figcaption>") == 4 + 3
    assert 'id="difference"' in text and len(_page_data(res.path)["samples"]) == 3
