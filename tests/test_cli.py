"""The command line: outputs that a researcher can reproduce from, and one-line errors."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from taca_probe import open_run
from taca_probe.cli.record import _mass_lines
from taca_probe.models import load_pipeline
from tests.clitools import run_cli
from tests.test_analysis import make_run

pytestmark = pytest.mark.slow  # runs the CLI end to end on embedded models


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_generate_writes_png_and_sidecar(tmp_path, capsys, model):
    rc, out, err = run_cli(
        ["generate", "--model", model, "--prompt", "a red cube", "--prompt", "a blue ball", "--seeds", "3,4",
         "--steps", "3", "--height", "64", "--width", "96", "--schedule", "first:1.3@1", "--out", str(tmp_path)],
        capsys,
    )
    assert rc == 0, err
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["0000-seed3.png", "0001-seed4.png", "0002-seed3.png", "0003-seed4.png"]
    meta = json.loads((tmp_path / "0003-seed4.json").read_text())
    assert meta["prompt"] == "a blue ball" and meta["seed"] == 4 and meta["steps"] == 3
    assert meta["schedule"] == "first:1.3@1" and meta["steps_with_gamma"] == [0]
    assert (meta["height"], meta["width"]) == (64, 96)
    # no --guidance and no model default: the scale the pipeline ran at is its __call__ default
    assert meta["guidance"] == inspect.signature(getattr(diffusers, meta["pipeline"]).__call__).parameters[
        "guidance_scale"].default
    assert Image.open(tmp_path / "0003-seed4.png").size == (96, 64)


def test_generate_none_equals_library_stock(tmp_path, capsys):


    rc, _, err = run_cli(["generate", "--model", "tiny-sd3", "--prompt", "a cat", "--seeds", "7", "--steps", "2", "--height", "64",
                       "--width", "64", "--schedule", "none", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    pipe = load_pipeline("tiny-sd3", device="cpu", dtype="fp32")
    ref = pipe("a cat", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "0000-seed7.png")), np.asarray(ref))


def test_prompts_file_text_and_jsonl(tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "a red cube", "seed": 11}\n# a comment\n\nplain line prompt\n')
    rc, _, err = run_cli(["generate", "--prompts", str(f), "--seeds", "1", "--steps", "1", "--height", "32",
                       "--width", "32", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "o").glob("*.json"))]
    assert [(m["prompt"], m["seed"]) for m in metas] == [("a red cube", 11), ("plain line prompt", 1)]


def test_record_and_generate_sample_each_prompt_and_seed_once(tmp_path, capsys):
    """Audit: a (prompt, seed) given twice (a repeated --prompt, a JSONL line twice) was recorded twice, so
    it counted double in every mean and interval; a sweep of the same input recorded it once."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a red cube", "seed": 1}\n{"prompt": "a red cube", "seed": 1}\n')
    argv = ["--model", "tiny-sd3", "--prompt", "a red cube", "--prompt", "a red cube", "--prompts", f, "--seeds", "1",
            "--steps", "1", "--height", "64", "--width", "64"]
    rc, _, err = run_cli(["record", *argv, "--out", tmp_path / "r.zarr"], capsys)
    assert rc == 0, err
    assert open_run(tmp_path / "r.zarr").sizes["sample"] == 1
    rc, _, err = run_cli(["generate", *argv, "--out", tmp_path / "g"], capsys)
    assert rc == 0, err
    assert len(list((tmp_path / "g").glob("*.png"))) == 1


def test_generate_replaces_images_of_an_earlier_run_only_when_asked(tmp_path, capsys):
    argv = ["generate", "--model", "tiny-sd3", "--seeds", "0", "--steps", "1", "--height", "64", "--width", "64",
            "--out", tmp_path / "g"]
    assert run_cli([*argv, "--prompt", "a red cube"], capsys)[0] == 0
    first = (tmp_path / "g" / "0000-seed0.png").read_bytes()
    rc, _, err = run_cli([*argv, "--prompt", "a blue ball"], capsys)
    assert rc == 2 and "--overwrite" in err and (tmp_path / "g" / "0000-seed0.png").read_bytes() == first
    assert run_cli([*argv, "--prompt", "a blue ball", "--overwrite"], capsys)[0] == 0
    assert json.loads((tmp_path / "g" / "0000-seed0.json").read_text())["prompt"] == "a blue ball"


BAD = [
    (["generate", "--prompt", "x", "--model", "no/such-model"], "not in the local Hugging Face cache"),
    (["generate", "--prompt", "x", "--schedule", "step:0@970"], "valid forms"),
    (["generate", "--prompt", "x", "--schedule", "wobble:2"], "valid forms"),
    (["generate", "--prompt", "x", "--model", "tiny-sd3", "--height", "100"], "multiple of 16"),
    (["generate", "--prompt", "x", "--model", "shapes", "--height", "128"], "larger than this model supports (64"),
    (["generate", "--prompt", "x", "--steps", "0"], "1..1000"),
    (["generate", "--prompt", "x", "--seeds", "a,b"], "bad seeds"),
    (["generate", "--prompt", "x", "--dtype", "fp8"], "fp32"),
    (["generate", "--prompt", "x", "--device", "gpu7"], "cpu"),
    (["generate"], "no prompt given"),
    (["generate", "--prompts", "/nonexistent/prompts.txt"], "does not exist"),
    (["generate", "--prompt", "x", "--lora", "/nonexistent/lora"], "neither a file/folder"),
    (["generate", "--bogus"], "unrecognized arguments"),
    (["bench", "attention", "--shape", "1,2,3"], "B,H,NTXT,NVIS,D"),
    (["bench", "attention", "--shape", "1,2,3,4,5,diagonal"], "--shape '1,2,3,4,5,diagonal'"),
    (["bench", "attention", "--shape", "1,1,4,8,8", "--variants", "sdpa,fast"], "choose from"),
    (["bench", "attention", "--shape", "1,1,4,8,8", "--variants", ","], "--variants"),
    (["bench", "e2e", "--preset", "sd99"], "--preset 'sd99'"),
    (["bench"], "choose a benchmark"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:4]) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    if argv[0] == "generate" and "--out" not in argv:
        argv = argv + ["--out", str(tmp_path / "o")]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("taca-probe: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bench_attention_json(capsys):
    rc, out, err = run_cli(["bench", "attention", "--device", "cpu", "--shape", "1,2,16,48,16", "--shape",
                         "1,2,20,40,8,img-first", "--repeats", "2", "--json", "-"], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    rows = doc["rows"]
    assert [r["variant"] for r in rows[:5]] == ["sdpa", "taca", "taca+masses", "naive", "flex"] and len(rows) == 10
    sdpa = rows[0]
    assert sdpa["ratio_to_sdpa"] == 1.0 and len(sdpa["times_ms"]) == 2
    assert rows[5]["shape"]["txt_first"] is False
    assert all(r["peak_extra_mib"] is not None for r in rows if not r["error"])
    assert doc["meta"]["torch"]


def test_bench_attention_table_without_sdpa(capsys):
    """Audit: --variants without sdpa failed formatting the 'x sdpa' column of None (exit 1)."""
    rc, out, err = run_cli(["bench", "attention", "--device", "cpu", "--shape", "1,2,16,48,16", "--repeats", "1",
                            "--variants", "taca,naive"], capsys)
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines() if " taca " in line or " naive " in line]
    assert len(rows) == 2 and all(float(r[-4]) > 0 and r[-3] == "-" for r in rows), out


def test_console_script_runs_without_traceback(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "taca_probe", "generate", "--prompt", "x", "--model",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("steps", [1, 3])
def test_summary_has_a_column_for_the_first_and_the_last_step(steps):

    vis = np.random.default_rng(0).uniform(0.1, 0.9, (2, steps, 3, 2))
    ds = make_run(steps=steps, vis=vis)
    header, *rows = _mass_lines(ds, 18, by_schedule=False)[1:]
    columns = sorted({0, steps - 1})
    assert header.count("step ") == len(columns)
    got = {row.split()[0]: [float(v) for v in row.split()[2:]] for row in rows}
    for bt in sorted(set(ds["block_type"].values.tolist())):
        in_bt = (ds["block_type"] == bt).values
        assert got[bt] == pytest.approx([vis[:, s][:, in_bt].mean() for s in columns], abs=5e-5)


def test_a_warning_is_one_line(tmp_path):
    """Audit: a warning (here: a sweep store not recorded yet) printed Python's 'FILE:LINE: UserWarning: ...'
    and the source line after it, on every figures, report and export-images of the sweep."""
    sweep = tmp_path / "sw"
    shutil.copytree(Path(__file__).parent / "data" / "store-v0.1.0.zarr", sweep / "stores" / "1.zarr")
    schedules = [{"spec": spec, "store": f"stores/{i}.zarr", "images": f"images/{i}"}
                 for i, spec in enumerate(["none", "step:1.3@970"])]  # stores/0.zarr was never recorded
    (sweep / "sweep.json").write_text(json.dumps({"taca_probe_sweep": 1, "schedules": schedules}))
    argv = [sys.executable, "-m", "taca_probe", "export-images", str(sweep), "--out", str(tmp_path / "e")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("taca-probe: warning:") and "not recorded" in lines[0], proc.stderr


TINY_RUN = ["--model", "tiny-sd3", "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64", "--prompt", "a cat"]


def _bar_count(err: str, total: int) -> int:
    """The number of samples the last progress bar on stderr showed as done."""
    return int(re.findall(rf"(\d+)/{total} ", err)[-1])


def test_an_interrupted_record_shows_only_finished_samples_and_resumes(tmp_path, capsys, monkeypatch):
    """Audit: the bar counted the sample under way when Ctrl-C (or a failure) stopped it: 2/3 over a store
    with one complete sample."""
    import taca_probe.runner as runner

    argv = ["record", *TINY_RUN, "--seeds", "0-2", "--out", tmp_path / "r.zarr"]
    sample, calls = runner.Run.sample, []

    def interrupted_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(runner.Run, "sample", interrupted_second)
    rc, _, err = run_cli(argv, capsys)
    assert rc == 130 and err.rstrip().endswith("taca-probe: interrupted") and "Traceback" not in err
    first = open_run(tmp_path / "r.zarr")
    assert first.sizes["sample"] == 1 and _bar_count(err, 3) == 1
    monkeypatch.undo()
    rc, out, err = run_cli([*argv, "--resume"], capsys)
    assert rc == 0 and "1 already complete" in out, err
    ds = open_run(tmp_path / "r.zarr")
    assert ds.sizes["sample"] == 3 and ds["vis_txt_mass"].isel(sample=0).equals(first["vis_txt_mass"].isel(sample=0))


@pytest.mark.parametrize("command", ["record", "sweep"])
def test_ctrl_c_leaves_a_store_that_resume_completes(tmp_path, capsys, command):
    """SIGINT in a real process: exit status 130, one line, nothing complete lost, --resume finishes it."""
    out = tmp_path / ("r.zarr" if command == "record" else "sw")
    grid = ["--no-grid", "--schedule", "none", "--schedule", "const:1.2"] if command == "sweep" else []
    argv = [command, *TINY_RUN, *grid, "--seeds", "0-3", "--out", str(out)]
    err_file = tmp_path / "err.txt"
    with err_file.open("w") as err_stream:
        # SIGINT as a terminal sends it, even when the tests run where it is ignored (a background job)
        proc = subprocess.Popen([sys.executable, "-m", "taca_probe", *argv], stdout=subprocess.DEVNULL,
                                stderr=err_stream, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 300
            while not re.search(r"\| [1-9]\d*/", err_file.read_text()) and time.monotonic() < deadline:
                time.sleep(0.05)  # until a sample is complete
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
    err = err_file.read_text()
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "sample" not in line]
    assert rc == 130 and lines == ["taca-probe: interrupted"], err  # only the bar beside the one line
    stores = sorted(out.glob("stores/*.zarr")) if command == "sweep" else [out]
    before = {s: open_run(s) for s in stores}
    assert sum(ds.sizes["sample"] for ds in before.values()) >= 1
    rc, _, err = run_cli([*argv, "--resume"], capsys)
    assert rc == 0, err
    for store in (sorted(out.glob("stores/*.zarr")) if command == "sweep" else [out]):
        ds = open_run(store)
        assert ds.sizes["sample"] == 4
        if store in before:  # the samples complete at the interrupt are kept as they were
            kept = before[store]
            assert ds["image"].sel(sample=kept["sample"]).equals(kept["image"])


def test_figures_asked_for_by_name_write_nothing_when_one_cannot_be_drawn(tmp_path, capsys):
    """Audit: `figures STORE --figures fig2,fig3` without maps wrote every Fig. 2 file, then exited 2 on Fig. 3."""
    store = Path(__file__).parent / "data" / "store-v0.1.0.zarr"
    rc, _, err = run_cli(["figures", store, "--figures", "fig2,fig3", "--format", "png", "--dpi", "10",
                          "--n-resamples", "100", "--out", tmp_path / "f"], capsys)
    assert rc == 2 and "fig3" in err, err
    assert not (tmp_path / "f").exists()


def test_record_stores_the_guidance_the_pipeline_used_as_probe_does(tmp_path, capsys):
    """`record` without --guidance stored guidance None, probe() the pipeline's default it ran at."""
    from taca_probe import probe
    from taca_probe.models import model_call_defaults
    from taca_probe.store import read_attrs

    rc, _, err = run_cli(["record", *TINY_RUN, "--steps", "1", "--seeds", "0", "--out", tmp_path / "cli.zarr"], capsys)
    assert rc == 0, err
    pipe = load_pipeline("tiny-sd3", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    with probe(pipe, tmp_path / "py.zarr") as run:
        run.sample("a cat", seed=0, num_inference_steps=1, height=64, width=64)
    cli, py = read_attrs(tmp_path / "cli.zarr"), read_attrs(tmp_path / "py.zarr")
    assert "guidance_scale" not in model_call_defaults("tiny-sd3")  # so the pipeline's own default applies
    default = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    assert isinstance(default, float) and cli["guidance"] == py["guidance"] == default
    assert cli["pipeline_kwargs"] == py["pipeline_kwargs"]  # the arguments passed, in both
    np.testing.assert_array_equal(open_run(tmp_path / "cli.zarr")["image"].values,
                                  open_run(tmp_path / "py.zarr")["image"].values)  # the same call ran


def _interrupted_after_one_of_two(command: str, tmp_path, capsys, monkeypatch) -> tuple[list, Path]:
    """A tiny-sd3 `record` or `sweep` of two seeds stopped by Ctrl-C after its first sample: its argv and store."""
    import taca_probe.runner as runner

    out = tmp_path / ("r.zarr" if command == "record" else "sw")
    grid = ["--no-grid", "--schedule", "none"] if command == "sweep" else []
    argv = [command, *TINY_RUN, *grid, "--steps", "1", "--seeds", "0-1", "--out", out]
    sample = runner.Run.sample

    def first_only(self, *args, slot=None, **kwargs):
        if slot == 1:
            raise KeyboardInterrupt
        return sample(self, *args, slot=slot, **kwargs)

    monkeypatch.setattr(runner.Run, "sample", first_only)
    assert run_cli(argv, capsys)[0] == 130
    monkeypatch.undo()
    return argv, next(out.glob("stores/*.zarr")) if command == "sweep" else out


@pytest.mark.parametrize("command", ["record", "sweep"])
def test_a_store_with_guidance_none_from_older_versions_still_resumes(tmp_path, capsys, monkeypatch, command):
    """Stores recorded before guidance was resolved hold None for the pipeline's default: the same command
    resumes them, an explicit other --guidance is refused, one equal to the default is the same run."""
    import zarr

    argv, store = _interrupted_after_one_of_two(command, tmp_path, capsys, monkeypatch)
    default = open_run(store).attrs["guidance"]
    assert isinstance(default, float)
    zarr.open_group(store, mode="r+").attrs["guidance"] = None  # as older versions wrote it
    rc, _, err = run_cli([*argv, "--resume", "--guidance", "5"], capsys)
    assert rc == 2 and "guidance" in err
    assert open_run(store).sizes["sample"] == 1
    rc, _, err = run_cli([*argv, "--resume"], capsys)
    assert rc == 0, err
    ds = open_run(store)
    assert ds.sizes["sample"] == 2 and ds.attrs["guidance"] is None  # resuming rewrites no attribute
    rc, _, err = run_cli([*argv, "--resume", "--guidance", default], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("command", ["record", "sweep"])
def test_a_store_recorded_without_max_sequence_length_resumes_with_the_default_given(tmp_path, capsys, monkeypatch,
                                                                                     command):
    """Audit: `--resume --max-sequence-length 256` of an SD3 store recorded without the flag (so at the
    pipeline's 256) was refused ('store has unset (the pipeline's default), now 256'), though the same run."""
    argv, store = _interrupted_after_one_of_two(command, tmp_path, capsys, monkeypatch)
    attrs = open_run(store).attrs
    assert "max_sequence_length" not in attrs["pipeline_kwargs"]
    default = inspect.signature(getattr(diffusers, attrs["pipeline_class"]).__call__).parameters[
        "max_sequence_length"].default
    rc, _, err = run_cli([*argv, "--resume", "--max-sequence-length", str(default // 2)], capsys)
    assert rc == 2 and "max_sequence_length" in err
    assert open_run(store).sizes["sample"] == 1
    rc, _, err = run_cli([*argv, "--resume", "--max-sequence-length", str(default)], capsys)
    assert rc == 0, err
    ds = open_run(store)
    assert ds.sizes["sample"] == 2 and ds.attrs["pipeline_kwargs"] == attrs["pipeline_kwargs"]
