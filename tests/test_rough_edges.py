"""What a new user hits first: help texts, progress, eval's preset and table, info, export-images,
did-you-mean, open_run's order. Each test feeds the case and checks the behaviour, not the prose."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import numpy as np
import pytest
import xarray as xr
from PIL import Image

import taca_probe.cli.record as rec
from taca_probe.cli import build_parser, main
from taca_probe.errors import TacaProbeError
from taca_probe.store import COORD_ORDER, VARIABLE_ORDER, open_run, store_info
from tests.clitools import one_line_error, run_cli

pytestmark = pytest.mark.slow  # runs the CLI end to end on embedded models

LONG = "a red cube on a blue table next to a green sphere under a yellow lamp in a quiet room"
TINY = ["--model", "tiny-sd3", "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("edges") / "run.zarr"
    rc = main(["record", *TINY, "--prompt", "a red cube", "--prompt", LONG, "--seeds", "0,3",
               "--max-sequence-length", "8", "--maps", "steps=0", "--out", str(path)])
    assert rc == 0
    return path


def _help(*argv) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return (sub.choices[argv[0]] if argv else parser).format_help()


# --- help -------------------------------------------------------------------------------------


def test_help_states_each_schedule_default_once_and_the_notes_once():
    top = _help()
    assert "shapes" in top and top.count("RANDOM") == 1
    rec, sweep, gen = _help("record"), _help("sweep"), _help("generate")
    squash = lambda text: " ".join(text.split())  # noqa: E731 - argparse wraps lines anywhere
    assert "default none" in squash(rec) and "default step:1.2@970" not in squash(rec)
    assert "default step:1.2@970" in squash(gen) and "default none" not in squash(gen)
    assert "default step:1.2@970" not in squash(sweep) and "default none" not in squash(sweep)
    for text in (rec, sweep, gen):
        assert squash(text).count("RANDOM") == 1
    assert "--max-sequence-length" in rec and "--max-sequence-length" in gen


def test_no_grid_help_says_what_sweep_records(tmp_path, monkeypatch, capsys):
    """Audit: --no-grid's help said "(and 'none')", but only the --schedule specs are recorded."""

    recorded = []

    def run_sweep(pipe, out, *, schedules, **kwargs):
        recorded.append(schedules)
        raise TacaProbeError("stop before sampling")

    monkeypatch.setattr(rec, "_load", lambda args: (None, {}))  # no model
    monkeypatch.setattr(rec, "run_sweep", run_sweep)
    argv = ["sweep", "--no-grid", "--schedule", "const:1.1", "--prompt", "x", "--out", tmp_path / "sw"]
    assert run_cli(argv, capsys)[0] == 2 and recorded == [["const:1.1"]]  # no 'none' added
    sweep = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["sweep"]
    no_grid = next(a.help for a in sweep._actions if "--no-grid" in a.option_strings)
    assert "--schedule none" in no_grid  # how to get the baseline, since it is not added


def test_record_takes_max_sequence_length(store):
    ds = open_run(store)
    assert ds.attrs["pipeline_kwargs"]["max_sequence_length"] == 8
    n_clip = int((ds["token_source"] == "clip").sum())
    assert ds.attrs["n_txt"] == n_clip + 8 and int((ds["token_source"] == "t5").sum()) == 8


# --- progress ---------------------------------------------------------------------------------


def test_record_shows_one_bar_over_samples_and_cuts_prompts_at_words(tmp_path, capsys):
    rc, _, err = run_cli(["record", *TINY, "--prompt", LONG, "--seeds", "0", "--out", tmp_path / "r.zarr"], capsys)
    assert rc == 0, err
    frames = [f for f in re.split(r"[\r\n]", err) if "|" in f]
    assert frames and all("sample" in f for f in frames)  # no pipeline bar (it/s over steps) inside it
    assert not any("it/s" in f or "s/it" in f for f in frames)
    shown = re.search(r"seed 0: (.*?)\]?$", frames[-1]).group(1).replace("…", "").split()
    words = LONG.split()
    assert shown and shown == words[: len(shown)] and len(" ".join(shown)) < len(LONG)


def test_generate_shows_one_bar_over_images(tmp_path, capsys):
    rc, _, err = run_cli(["generate", *TINY, "--prompt", LONG, "--seeds", "0,1", "--out", tmp_path / "g"], capsys)
    assert rc == 0, err
    frames = [f for f in re.split(r"[\r\n]", err) if "|" in f]
    assert frames and all("image" in f for f in frames) and "2/2" in frames[-1]
    assert not any("it/s" in f or "s/it" in f for f in frames)


# --- eval -------------------------------------------------------------------------------------


def _eval(argv, capsys):
    parser = build_parser()
    args = parser.parse_args(["eval", *argv])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_quick_default_eta_up_front_and_a_table_within_100_columns(tmp_path, capsys):
    out_json = tmp_path / "e.json"
    rc, out, err = _eval(["--prompt", "a red triangle", "--prompt", "a green square below a red circle", "--steps", "2",
                          "--schedule", "none", "--schedule", "step:1.2@970", "--device", "cpu", "--n-resamples", "100",
                          "--json", str(out_json)], capsys)
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["seeds"] == [0]  # the quick preset
    first = err.strip().splitlines()[0]
    assert "= 4 images" in first and re.search(r"about \d+ (s|min)", first)  # count and ETA before any image
    assert "image/s" in err or "s/image" in err  # one bar over images, with rate and ETA
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100
    # every aggregate is printed in its schedule's block
    for spec, r in result["schedules"].items():
        block = lines[lines.index(spec) + 1:]
        block = "\n".join(block[: next((i for i, x in enumerate(block) if not x.startswith("  ")), len(block))])
        for cat, a in r["aggregate"].items():
            assert f"{cat} {a['mean']:.3f}" in block


def test_eval_full_and_seeds_are_one_or_the_other(capsys):

    parser = build_parser()
    args = parser.parse_args(["eval", "--full", "--seeds", "0-1", "--device", "cpu"])
    with pytest.raises(TacaProbeError, match="--full"):
        args.func(args)
    assert parser.parse_args(["eval", "--full"]).full


# --- info and export-images ---------------------------------------------------------------------


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            out[current] = []
        elif current and line.startswith("  "):
            out[current].append(line)
    return out


def test_info_groups_variables_coordinates_and_the_internal_flag_aligned(store, capsys):
    rc, out, err = run_cli(["info", store], capsys)
    assert rc == 0, err
    sec = _sections(out)
    names = {k: [x.split()[0] for x in v] for k, v in sec.items()}
    assert names["data variables"] == [v for v in VARIABLE_ORDER if v in names["data variables"]]
    assert {"vis_txt_mass", "maps", "image"} <= set(names["data variables"])
    assert {"prompt", "token_text", "layer", "seed"} <= set(names["coordinates"])
    assert not set(names["coordinates"]) & set(VARIABLE_ORDER) and "complete" not in names["coordinates"]
    internal = next(k for k in sec if k.startswith("internal"))
    assert names[internal] == ["complete", "chunk_manifest"]
    rows = [x for k in ("data variables", "coordinates", internal) for x in sec[k]]
    # aligned: the dtype, dims and chunks columns start at the same offset on every row, strings included
    for col in (1, 2):
        starts = {m.start() for m in (list(re.finditer(r"\S+", r))[col] for r in rows)}
        assert len(starts) == 1, starts
    assert any(re.search(r"\bstring\b", r) for r in rows)


def test_info_leaves_unfinished_partial_writes_out_of_the_size(store, tmp_path, capsys):
    """A process killed mid-write leaves zarr's NAME.<uuid>.partial file; info counted it in the size on disk."""
    copy = tmp_path / "run.zarr"
    shutil.copytree(store, copy)
    before = store_info(copy)
    (copy / "image" / "c" / "0.5f0e1c2a.partial").write_bytes(b"x" * 100_000)
    after = store_info(copy)
    assert after["stored_bytes"] == before["stored_bytes"]
    assert after["arrays"]["image"]["stored_bytes"] == before["arrays"]["image"]["stored_bytes"]
    assert before["unfinished_writes"] == [] and len(after["unfinished_writes"]) == 1
    rc, out, err = run_cli(["info", copy], capsys)
    assert rc == 0 and "0.5f0e1c2a.partial" in out, err


def test_sweep_summary_stays_aligned_with_a_long_schedule_name(tmp_path, capsys):
    """A spec longer than 24 characters pushed its row's columns right of the others'."""
    long = "linear:1.3..1.0@1000..900;layers=transformer_blocks.0*|transformer_blocks.1*"
    rc, out, err = run_cli(["sweep", *TINY, "--prompt", "a red cube", "--no-grid", "--schedule", "none",
                            "--schedule", long, "--out", tmp_path / "sw"], capsys)
    assert rc == 0, err
    listing = [line for line in out.splitlines() if " samples  stores/" in line]
    masses = [line for line in out.splitlines() if line.lstrip().startswith(("none ", "linear:"))
              and " samples " not in line]
    for rows in (listing, masses):
        assert len(rows) == 2 and len({len(r.split("  stores/")[0]) for r in rows}) == 1
        assert len({m.start() for m in (list(re.finditer(r"\S+", r))[1] for r in rows)}) == 1, rows


def test_sweep_of_a_very_long_schedule_spec_records_and_resumes(tmp_path, capsys):
    """A 494-character table spec made a store name past the file-name limit: "File name too long" after the
    model loaded, with a sweep.json left behind. A resume keeps the paths its manifest names."""
    long = "table:" + ",".join(f"{t}=1.2" for t in range(1000, 695, -5))
    argv = ["sweep", *TINY, "--prompt", "a red cube", "--no-grid", "--schedule", long, "--out", tmp_path / "sw"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert open_run(tmp_path / "sw" / doc["schedules"][0]["store"]).sizes["sample"] == 1
    # a sweep an older version named otherwise (uncut): --resume finds its store, records nothing again
    (tmp_path / "sw" / "stores" / "old.zarr").mkdir()
    (tmp_path / "sw" / doc["schedules"][0]["store"]).rename(tmp_path / "sw" / "stores" / "old.zarr" / "s.zarr")
    doc["schedules"][0]["store"] = "stores/old.zarr/s.zarr"
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(doc))
    rc, out, err = run_cli(argv + ["--seeds", "0", "--resume"], capsys)
    assert rc == 0, err
    assert [p.name for p in (tmp_path / "sw" / "stores").iterdir()] == ["old.zarr"]
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["schedules"][0]["samples_complete"] == 1


def test_export_images_writes_each_sample_as_png_named_by_prompt_and_seed(store, tmp_path, capsys):
    rc, _, err = run_cli(["export-images", store, "--out", tmp_path / "png"], capsys)
    assert rc == 0, err
    ds = open_run(store)
    files = sorted((tmp_path / "png").glob("*.png"))
    assert len(files) == ds.sizes["sample"] == 4
    for i, f in enumerate(files):
        prompt, seed = str(ds["prompt"].values[i]), int(ds["seed"].values[i])
        assert f.name.endswith(f"_seed{seed}.png") and "-".join(prompt.split()[:3]) in f.name
        np.testing.assert_array_equal(np.asarray(Image.open(f)), ds["image"].isel(sample=i).values)
    rc, _, err = run_cli(["export-images", tmp_path / "nothing", "--out", tmp_path / "x"], capsys)
    one_line_error(rc, err)


# --- did you mean, open_run order ----------------------------------------------------------------


def test_misspelled_command_choice_and_model_get_a_suggestion(capsys, tmp_path):
    rc, _, err = run_cli(["recrod", "--prompt", "x"], capsys)
    one_line_error(rc, err, "'record'")
    rc, _, err = run_cli(["record", "--branch", "cnd", "--prompt", "x"], capsys)
    one_line_error(rc, err, "'cond'")
    rc, _, err = run_cli(["record", "--model", "shapez", "--prompt", "a red circle", "--out", tmp_path / "s.zarr"], capsys)
    one_line_error(rc, err, "'shapes'")
    rc, _, err = run_cli(["record", "--model", "zzzzzz-unrelated", "--prompt", "x", "--out", tmp_path / "t.zarr"], capsys)
    assert rc == 2 and "did you mean" not in err


def test_open_run_has_a_stable_order(store):
    ds = open_run(store)
    assert list(ds.data_vars) == [v for v in VARIABLE_ORDER if v in ds.data_vars]
    assert list(ds.coords) == [c for c in COORD_ORDER if c in ds.coords]
    assert list(open_run(store, chunks={}).data_vars) == list(ds.data_vars)


def test_sweep_overwrite_killed_after_removing_the_outputs_can_be_overwritten_again(tmp_path, capsys, monkeypatch):
    """Audit: a kill between deleting sweep.json and writing the new one left a folder that every later
    --overwrite refused as 'not a sweep folder'."""
    import taca_probe.sweep as sweep_module

    argv = ["sweep", *TINY, "--prompt", "a red cube", "--no-grid", "--schedule", "none", "--out", tmp_path / "sw",
            "--overwrite"]
    assert run_cli(argv, capsys)[0] == 0

    def killed(folder, doc):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sweep_module, "_write_manifest", killed)
        assert run_cli(argv, capsys)[0] == 130  # interrupted after the outputs were removed
    assert [p.name for p in (tmp_path / "sw" / "stores").iterdir()] == ["00_none.zarr"]  # put back: nothing recorded
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert open_run(tmp_path / "sw" / "stores" / "00_none.zarr").sizes["sample"] == 1


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_an_opened_store_exports_with_to_zarr_also_from_dask_and_as_zarr_v2(store, tmp_path, zarr_format):
    lazy = open_run(store, chunks={}).isel(sample=[1], step=[0])
    lazy.to_zarr(tmp_path / "export.zarr", zarr_format=zarr_format, consolidated=False)
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "export.zarr", consolidated=False).load(),
                                open_run(store).isel(sample=[1], step=[0]).load())


@pytest.mark.parametrize("chunks", [{"bogus": 1}, {"sample": 0}, "bogus", 1.5])
def test_open_run_refuses_bad_chunks_in_one_line_naming_the_dimensions(store, chunks):
    """Audit: xarray's ValueError (or dask's ZeroDivisionError for a size 0) from deep inside Dataset.chunk."""
    with pytest.raises(TacaProbeError) as e:
        open_run(store, chunks=chunks)
    assert repr(chunks) in str(e.value) and "'sample'" in str(e.value) and "\n" not in str(e.value)
