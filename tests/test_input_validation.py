"""Bad input is refused in one line, exit 2, before a model loads or a store is created (issue #14)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import zarr

import taca_probe.cli.bench as bench
import taca_probe.cli.eval as eval_cli
import taca_probe.cli.record as record
from taca_probe.cli import build_parser
from taca_probe.cli.args import read_prompts as _read_prompts
from taca_probe.errors import TacaProbeError
from taca_probe.selection import int_ranges
from taca_probe.sweep import sample_plan
from tests.clitools import run_cli


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded for input that should have been refused")


def _refused(rc: int, err: str, key: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("taca-probe: error:"), err
    assert key in lines[0], err
    assert "Traceback" not in err


def test_int_ranges_is_capped_before_expanding():
    assert int_ranges("0-99999") == list(range(100_000))  # the cap itself is fine
    # A range expanded before the check would exhaust memory on the last one, not raise this.
    for text in ("0-10000000", "0-99999999", "5-9223372036854775807"):
        with pytest.raises(ValueError, match="100000"):
            int_ranges(text)
    with pytest.raises(ValueError, match="outside"):
        int_ranges(str(2**63))
    with pytest.raises(ValueError, match="negative"):
        int_ranges("-1")
    assert int_ranges("3,1-3,0") == [3, 1, 2, 0]
    # what int() also takes, but no step, seed or token list is written as
    for text in ("+1", "+1-+3", "0--0", "1_000", "2-+4", " 1 - 2x"):
        with pytest.raises(ValueError, match=re.escape(repr(text.split(",")[0].strip()))):
            int_ranges(text)
    assert int_ranges(" 1 - 3 , 5 ") == [1, 2, 3, 5] and int_ranges("١-٣") == [1, 2, 3]  # spaces; decimal digits


# Every case is refused before a model loads: the --out path must not appear.
CASES = [
    (["--seeds", "-1"], "0..9223372036854775807"),  # issue #12 (b): no doubled prefix, says >= 0
    (["--seeds", "0-10000000"], "100000"),  # defect 5
    (["--seeds", str(2**63)], "outside"),  # defect 11
    (["--guidance", "nan"], "--guidance"),  # defect 12
    (["--guidance", "-5"], "--guidance"),
    (["--guidance", "inf"], "--guidance"),  # defect 13
    (["--height", "100000"], "--height"),  # defect 8: no model has a size limit of its own here
    (["--model", "tiny-flux", "--width", "100000"], "--width"),
    (["--steps", "100000000"], "--steps"),
    (["--maps", "steps=0-99999999"], "100000"),  # defect 5
    (["--lora-scale", "nan"], "--lora-scale"),
]


@pytest.mark.parametrize("extra,key", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_record_refuses_bad_numbers_before_loading(tmp_path, capsys, monkeypatch, extra, key):
    out = tmp_path / "r.zarr"
    monkeypatch.setattr(record, "load_pipeline", _must_not_load)
    rc, _, err = run_cli(["record", "--prompt", "x", *extra, "--out", str(out)], capsys)
    _refused(rc, err, key)
    assert "taca-probe: error: taca-probe" not in err  # the program is named once
    assert not out.exists()


def test_record_resume_without_a_store_says_to_run_without_resume(tmp_path, capsys, monkeypatch):
    """A Ctrl-C before the first sample leaves no store; --resume then must not say only 'no store'."""
    out = tmp_path / "r.zarr"
    monkeypatch.setattr(record, "load_pipeline", _must_not_load)
    rc, _, err = run_cli(["record", "--prompt", "x", "--resume", "--out", str(out)], capsys)
    _refused(rc, err, "without --resume")
    assert not out.exists()


@pytest.mark.parametrize("flag,value,piece", [
    ("--gamma0", "1.2,,1.5", "''"), ("--gamma0", "1.2,", "''"), ("--gamma0", "1.2,abc", "'abc'"),
    ("--t-thresh", "970,", "''"), ("--seeds", "0,", "''"),  # the seeds' rule, which the number lists now share
])
def test_sweep_number_lists_name_an_empty_or_bad_part_before_loading(tmp_path, capsys, monkeypatch, flag, value,
                                                                      piece):
    """Audit: --gamma0 1.2,,1.5 and 1.2, were taken as 1.2,1.5 and 1.2 (--seeds 0, is refused), and a bad part
    was not named."""
    monkeypatch.setattr(record, "load_pipeline", _must_not_load)
    rc, _, err = run_cli(["sweep", "--prompt", "x", flag, value, "--out", str(tmp_path / "s")], capsys)
    _refused(rc, err, f"{value!r}: {piece}")
    assert not (tmp_path / "s").exists()


PROMPT_FILES = [
    ('{"prompt": null}\n', "prompt"),  # would become the prompt "None"
    ('{"prompt": ""}\n', "prompt"),
    ('{"prompt": "\\u0000\\u0007"}\n', ":1"),  # control characters only: no prompt
    ("a red cube\n\x00\x00\x01\n", ":2"),
    ('{"prompt": "a", "seed": 1.7}\n', "1.7"),  # would become seed 1
    ('{"prompt": "a", "seed": true}\n', "True"),
    ('{"prompt": "a", "seed": -5}\n', "-5"),  # --seeds -1 is refused, so is this
    ('{"prompt": "a", "seed": 18446744073709551616}\n', "18446744073709551616"),
]


@pytest.mark.parametrize("text,key", PROMPT_FILES, ids=[t.strip() for t, _ in PROMPT_FILES])
def test_prompts_file_values_are_checked(tmp_path, capsys, text, key):
    f = tmp_path / "p.jsonl"
    f.write_text(text, encoding="utf-8")
    rc, _, err = run_cli(["record", "--prompts", str(f), "--out", str(tmp_path / "r.zarr")], capsys)
    _refused(rc, err, key)
    assert str(f) in err and not (tmp_path / "r.zarr").exists()


def test_prompts_file_line_separator_is_not_a_new_prompt_and_bytes_must_be_utf8(tmp_path, capsys):

    f = tmp_path / "p.txt"
    f.write_text("one\u2028still one\nsecond\r\n", encoding="utf-8")
    args = build_parser().parse_args(["record", "--prompts", str(f)])
    assert [p for p, _ in _read_prompts(args)] == ["one\u2028still one", "second"]
    f.write_bytes(b"caf\xe9\n")
    rc, _, err = run_cli(["record", "--prompts", str(f), "--out", str(tmp_path / "r.zarr")], capsys)
    _refused(rc, err, str(f))
    rc, _, err = run_cli(["record", "--prompt", "", "--out", str(tmp_path / "r.zarr")], capsys)
    _refused(rc, err, "--prompt")


def test_prompts_file_with_a_byte_order_mark(tmp_path):
    """Audit: a BOM made the first JSONL line a literal prompt '\\ufeff{"prompt": ...}' with the default seeds,
    and the first line of a text file a prompt that starts with an invisible character."""
    f = tmp_path / "p.jsonl"
    for text, expected in (('{"prompt": "a red cube", "seed": 3}\n', [("a red cube", [3])]),
                           ("a red cube\nb\n", [("a red cube", [0]), ("b", [0])])):
        f.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert _read_prompts(build_parser().parse_args(["record", "--prompts", str(f)])) == expected


@pytest.mark.parametrize("command", ["generate", "record", "sweep"])
def test_gamma_that_overflows_float32_is_refused_before_loading(tmp_path, capsys, command):
    """Audit: ``generate --schedule const:1e308`` (inf as a float32) exited 0 with a black image."""
    out = tmp_path / "o"
    grid = ["--no-grid"] if command == "sweep" else []
    rc, _, err = run_cli([command, *grid, "--prompt", "x", "--schedule", "const:1e308", "--out", str(out)], capsys)
    _refused(rc, err, "1e+308")
    assert "3.4028234663852886e+38" in err and not out.exists()  # the valid range is stated


def test_out_under_a_file_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for cmd in (["record"], ["generate"], ["sweep", "--no-grid", "--schedule", "const:1.1"]):
        rc, _, err = run_cli([*cmd, "--prompt", "x", "--out", str(blocker / "sub" / "o")], capsys)
        _refused(rc, err, str(blocker))
    assert blocker.read_text() == ""


@pytest.fixture(scope="module")
def old_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the 0.1.0 store for the tests below: each checks that nothing was written into it."""
    store = tmp_path_factory.mktemp("old") / "s.zarr"
    shutil.copytree(Path(__file__).parent / "data" / "store-v0.1.0.zarr", store)
    return store


OUT_COMMANDS = [["record", "--prompt", "x"], ["generate", "--prompt", "x"], ["sweep", "--prompt", "x"],
                ["export-images", "STORE"], ["figures", "STORE"], ["report", "STORE"]]
# record's own --out may be a store (--resume / --overwrite decide), not a folder inside one
OUT_IN_STORE = [(argv, where) for argv in OUT_COMMANDS for where in ("inner", ".")
                if (argv[0], where) != ("record", ".")]


@pytest.mark.parametrize("argv,where", OUT_IN_STORE, ids=[f"{a[0]}-{w}" for a, w in OUT_IN_STORE])
def test_out_inside_a_store_is_refused_before_anything_is_written(old_store, capsys, monkeypatch, argv, where):
    """Audit: ``record --out STORE/inner.zarr`` nested a store in STORE, which every command then called
    damaged (and told to re-record with --overwrite); the other commands wrote their files into it."""
    store = old_store
    before = sorted(store.rglob("*"))
    monkeypatch.setattr(record, "load_pipeline", _must_not_load)
    argv = [store if a == "STORE" else a for a in argv]
    rc, _, err = run_cli([*argv, "--out", store / where], capsys)
    _refused(rc, err, "store")
    assert sorted(store.rglob("*")) == before


@pytest.mark.parametrize("argv", OUT_COMMANDS, ids=[a[0] for a in OUT_COMMANDS])
def test_an_out_folder_that_is_a_file_is_refused_before_any_work(old_store, tmp_path, capsys, monkeypatch, argv):
    """Audit: `generate --out FILE` loaded the model and sampled, then failed with 'File exists'."""
    out = tmp_path / "a-file"
    out.write_text("kept")
    for module in (record, eval_cli):
        monkeypatch.setattr(module, "load_pipeline", _must_not_load)
    rc, _, err = run_cli([old_store if a == "STORE" else a for a in argv] + ["--out", out], capsys)
    _refused(rc, err, str(out))
    assert out.read_text() == "kept"


@pytest.mark.parametrize("argv", [["generate", "--prompt", "x"], ["export-images", "STORE"],
                                  ["record", "--prompt", "x", "--resume"]], ids=["generate", "export-images", "record"])
def test_an_existing_out_folder_that_cannot_be_written_is_refused_before_any_work(old_store, tmp_path, capsys,
                                                                                   monkeypatch, argv):
    """Audit: only the folder above --out was checked, so `generate --out READ_ONLY_FOLDER` sampled every image
    before failing on the first write, and `record --resume` of a read-only store loaded the model."""
    out = tmp_path / "s.zarr"
    if argv[0] == "record":
        shutil.copytree(old_store, out)
    else:
        out.mkdir()
    before = sorted(out.rglob("*"))
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != out and access(p, mode, **kw))  # read-only
    monkeypatch.setattr(record, "load_pipeline", _must_not_load)
    rc, _, err = run_cli([old_store if a == "STORE" else a for a in argv] + ["--out", out], capsys)
    _refused(rc, err, str(out))
    assert sorted(out.rglob("*")) == before


EMPTY_PATHS = [[*argv, "--out"] for argv in OUT_COMMANDS] + [
    ["record", "--prompts"], ["record", "--prompt", "x", "--lora"], ["info"], ["info", "s.zarr", "--json"],
    ["figures"], ["eval", "--save-images"], ["bench", "attention", "--json"]]


@pytest.mark.parametrize("argv", EMPTY_PATHS, ids=[" ".join(a) for a in EMPTY_PATHS])
def test_an_empty_path_is_refused_at_parse_time(tmp_path, capsys, monkeypatch, argv):
    """Audit: --out "" was the current folder: generate and export-images wrote into it."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli([("s.zarr" if a == "STORE" else a) for a in argv] + [""], capsys)
    _refused(rc, err, argv[-1] if argv[-1].startswith("--") else "STORE" if argv[0] == "figures" else "store")
    assert not any(tmp_path.iterdir())


FILE_IN_STORE = [["info", "STORE", "--json"], ["eval", "--json"], ["eval", "--save-images"],
                 ["bench", "attention", "--json"], ["bench", "e2e", "--json"]]


@pytest.mark.parametrize("argv", FILE_IN_STORE, ids=[" ".join(a[:-1] + [a[-1][2:]]) for a in FILE_IN_STORE])
def test_other_outputs_inside_a_store_are_refused_before_any_work(old_store, capsys, monkeypatch, argv):
    """Audit: eval --save-images, and the --json file of info, eval and bench, went into a store's folder."""
    store = old_store
    before = sorted(store.rglob("*"))
    for module, name in ((eval_cli, "load_pipeline"), (bench, "bench_attention"), (bench, "bench_e2e")):
        monkeypatch.setattr(module, name, _must_not_load)
    rc, _, err = run_cli([store if a == "STORE" else a for a in argv] + [store / "inner"], capsys)
    _refused(rc, err, "store")
    assert sorted(store.rglob("*")) == before


def test_eval_runs_a_schedule_given_twice_once(monkeypatch, capsys):
    """Audit: `eval --schedule none --schedule none` generated every image twice and printed 'none - none'."""
    given = []

    def run_benchmark(pipe, schedules, **kwargs):
        given.append(schedules)
        raise TacaProbeError("stop before sampling")

    monkeypatch.setattr(eval_cli, "load_pipeline", lambda *a, **k: None)
    monkeypatch.setattr(eval_cli, "_estimate_seconds", lambda *a, **k: 0.0)
    monkeypatch.setattr(eval_cli, "run_benchmark", run_benchmark)
    argv = ["eval", *[a for spec in ("none", "step:1.2@970") * 2 for a in ("--schedule", spec)]]
    assert run_cli(argv, capsys)[0] == 2 and given == [["none", "step:1.2@970"]]


def test_info_of_a_sweep_folder_names_its_stores(tmp_path, capsys):
    """Audit: `taca-probe info SWEEP` said only "not a taca-probe store (no zarr v3 metadata)"."""
    (tmp_path / "sw").mkdir()
    schedules = [{"spec": "none", "store": "stores/00_none.zarr", "images": "images/00_none"}]
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"taca_probe_sweep": 1, "schedules": schedules}))
    rc, _, err = run_cli(["info", tmp_path / "sw"], capsys)
    _refused(rc, err, "00_none.zarr")


def test_export_images_of_a_sweep_keeps_schedules_whose_names_slug_alike(tmp_path, capsys):
    """Audit: schedules whose specs slug alike (here they differ only in a glob character) shared one
    export folder, so the second schedule's PNGs replaced the first's while the count said both."""
    sweep = tmp_path / "sw"
    specs = ["const:1.1;layers=x*", "const:1.1;layers=x?"]
    for i in range(2):
        shutil.copytree(Path(__file__).parent / "data" / "store-v0.1.0.zarr", sweep / "stores" / f"{i}.zarr")
        meta = json.loads((sweep / "stores" / f"{i}.zarr" / "zarr.json").read_text())  # each store holds its spec
        meta["attributes"]["schedule"] = specs[i]
        (sweep / "stores" / f"{i}.zarr" / "zarr.json").write_text(json.dumps(meta))
    schedules = [{"spec": spec, "store": f"stores/{i}.zarr", "images": f"images/{i}"} for i, spec in enumerate(specs)]
    (sweep / "sweep.json").write_text(json.dumps({"taca_probe_sweep": 1, "schedules": schedules}))
    rc, out, err = run_cli(["export-images", sweep, "--out", tmp_path / "png"], capsys)
    assert rc == 0, err
    written = int(out.split()[1])
    pngs = list((tmp_path / "png").rglob("*.png"))
    assert written > 0 and len(pngs) == written and len({p.parent for p in pngs}) == 2


def test_export_images_refuses_a_store_without_a_complete_sample_and_exports_each_schedule_alone(tmp_path, capsys):
    """Audit: export-images of a store of no complete sample said 'wrote 0 PNG image(s)' and exited 0 (report
    refuses it); of a sweep with such a schedule, no other schedule's image was exported either."""
    sweep = tmp_path / "sw"
    for i, spec in enumerate(["none", "step:1.3@970"]):
        shutil.copytree(Path(__file__).parent / "data" / "store-v0.1.0.zarr", sweep / "stores" / f"{i}.zarr")
        meta = json.loads((sweep / "stores" / f"{i}.zarr" / "zarr.json").read_text())
        meta["attributes"]["schedule"] = spec
        (sweep / "stores" / f"{i}.zarr" / "zarr.json").write_text(json.dumps(meta))
    schedules = [{"spec": spec, "store": f"stores/{i}.zarr", "images": f"images/{i}"}
                 for i, spec in enumerate(["none", "step:1.3@970"])]
    (sweep / "sweep.json").write_text(json.dumps({"taca_probe_sweep": 1, "schedules": schedules}))
    zarr.open_group(str(sweep / "stores" / "0.zarr"), mode="r+")["complete"][:] = False
    rc, _, err = run_cli(["export-images", sweep / "stores" / "0.zarr", "--out", tmp_path / "a"], capsys)
    _refused(rc, err, str(sweep / "stores" / "0.zarr"))
    assert not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match=r"\[none\]"):  # the schedule with none is named, the other exported
        rc, out, err = run_cli(["export-images", sweep, "--out", tmp_path / "b"], capsys)
    assert rc == 0, err
    assert sorted(p.parent.name for p in (tmp_path / "b").rglob("*.png")) == ["01_step-1-3-970"] * 4


@pytest.mark.slow  # exports a store three times
def test_export_images_replaces_an_earlier_export_only_with_overwrite(tmp_path, capsys):
    """Audit: a second export into the same --out silently replaced the first's PNGs (generate refuses)."""
    store = tmp_path / "s.zarr"
    shutil.copytree(Path(__file__).parent / "data" / "store-v0.1.0.zarr", store)
    assert run_cli(["export-images", store, "--out", tmp_path / "png"], capsys)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "png").rglob("*.png")}
    rc, _, err = run_cli(["export-images", store, "--out", tmp_path / "png"], capsys)
    _refused(rc, err, "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "png").rglob("*.png")} == before
    rc, _, err = run_cli(["export-images", store, "--out", tmp_path / "png", "--overwrite"], capsys)
    assert rc == 0, err
    assert len(before) == 4 and all(p.stat().st_mtime_ns != t for p, t in before.items())


def test_figures_caps_and_eval_json_folder(tmp_path, capsys):
    for flag, value in (("--dpi", "100000"), ("--n-resamples", "1")):
        rc, _, err = run_cli(["figures", str(tmp_path), flag, value, "--out", str(tmp_path / "f")], capsys)
        _refused(rc, err, flag)
    rc, _, err = run_cli(["eval", "--json", str(tmp_path), "--out", str(tmp_path / "e")], capsys)
    _refused(rc, err, str(tmp_path))


def test_figures_seed_must_be_a_nonnegative_integer(tmp_path, capsys):
    """Audit: ``figures --seed -1`` passed the parser and failed in numpy as an internal error."""
    for value in ("-1", "1.5", str(2**63)):
        rc, _, err = run_cli(["figures", str(tmp_path), "--seed", value, "--out", str(tmp_path / "f")], capsys)
        _refused(rc, err, "--seed")
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("schedules", [5, [5], [{"spec": "none", "images": "images/00_none"}],
                                       [{"spec": "none", "store": 7, "images": "i"}]])
def test_a_damaged_sweep_manifest_is_one_line_everywhere(tmp_path, capsys, schedules):
    """Audit: a sweep.json whose 'schedules' had the wrong shape was an internal TypeError/KeyError."""

    (tmp_path / "sweep.json").write_text(json.dumps({"taca_probe_sweep": 1, "schedules": schedules}))
    for argv in (["figures", tmp_path, "--out", tmp_path / "f"], ["report", tmp_path, "--out", tmp_path / "r"],
                 ["export-images", tmp_path, "--out", tmp_path / "e"]):
        rc, _, err = run_cli(argv, capsys)
        _refused(rc, err, "sweep.json")
        assert "schedules" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json"]


@pytest.mark.parametrize("seeds", [[1.5], [True], [-1], [2**64]])
def test_run_sweep_refuses_bad_seeds_before_writing(tmp_path, seeds):
    """Audit: run_sweep(seeds=[1.5]) recorded seed 1; seeds=[-1] failed mid-run and left a sweep folder."""
    from taca_probe import run_sweep
    from taca_probe.sweep import SweepError

    with pytest.raises(SweepError, match="seed"):
        run_sweep("tiny-sd3", tmp_path / "sw", prompts=["a", ("b", seeds)], schedules=["none"])
    assert not (tmp_path / "sw").exists()


class _Boom:
    def __reduce__(self):  # what a hostile checkpoint.pt carries: a call made while unpickling
        return (exec, ("open(__import__('os').environ['TACA_BOOM'], 'w').write('ran')",))


def test_a_sweep_plan_holds_each_prompt_and_seed_once():
    """Audit: a seed repeated within one (prompt, seeds) pair was planned twice; the check of repeats scanned
    the plan for every new pair (quadratic: 100,000 JSONL lines took minutes before anything started)."""
    assert sample_plan([("a", [1, 1]), ("b", [2]), ("a", [1, 0])], [0]) == [("a", 1), ("b", 2), ("a", 0)]
    assert sample_plan("x", [3, 3]) == [("x", 3)]


def test_train_resume_never_runs_code_from_a_checkpoint(tmp_path, monkeypatch):
    from taca_probe.shapes.train import TrainConfig, TrainError, train

    marker = tmp_path / "ran"
    monkeypatch.setenv("TACA_BOOM", str(marker))
    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"config": _Boom()}))
    with pytest.raises(TrainError, match="checkpoint"):
        train(TrainConfig(), tmp_path, resume=True)
    assert not marker.exists()
    torch.save({"modules": {}}, tmp_path / "checkpoint.pt")  # malformed: no config
    with pytest.raises(TrainError, match="config"):
        train(TrainConfig(), tmp_path, resume=True)


def test_bench_shape_too_large_is_a_user_error(monkeypatch, capsys):

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.00 GiB")

    monkeypatch.setattr(bench, "bench_attention", out_of_memory)
    rc, _, err = run_cli(["bench", "attention", "--device", "cpu", "--shape", "1,1,4,100000000,8"], capsys)
    _refused(rc, err, "--shape")


@pytest.mark.parametrize("gamma", ["nan", "-1", "0", "inf", "1e39"])
def test_bench_gamma_must_be_a_positive_finite_float32(monkeypatch, capsys, gamma):
    """Audit: ``bench attention --gamma nan`` (or -1) was accepted and timed, each TACA row 'unavailable'."""
    calls = []
    monkeypatch.setattr(bench, "bench_attention", lambda *a, **kw: calls.append(kw) or [])
    rc, _, err = run_cli(["bench", "attention", "--device", "cpu", "--shape", "1,1,4,8,8", f"--gamma={gamma}"], capsys)
    _refused(rc, err, "--gamma")
    assert repr(gamma) in err and "3.40282e+38" in err and not calls  # the range; refused before timing


@pytest.mark.parametrize("command", ["attention", "e2e"])
def test_bench_threads_are_at_most_the_cores(monkeypatch, capsys, command):
    """Audit: `bench attention --threads 100000` went to torch.set_num_threads: an internal error, or a crash."""
    for module, name in ((bench, "bench_attention"), (bench, "bench_e2e"), (torch, "set_num_threads")):
        monkeypatch.setattr(module, name, _must_not_load)
    rc, _, err = run_cli(["bench", command, "--device", "cpu", "--threads", str(os.cpu_count() + 1)], capsys)
    _refused(rc, err, "--threads")
    assert f"1..{os.cpu_count()}" in err


def test_bench_e2e_steps_has_the_bounds_of_every_other_steps(monkeypatch, capsys):
    """Audit: `--steps` is 1..1000 denoising steps everywhere but `bench e2e`, which took any positive integer."""
    monkeypatch.setattr(bench, "bench_e2e", _must_not_load)
    rc, _, err = run_cli(["bench", "e2e", "--device", "cpu", "--steps", "1001"], capsys)
    _refused(rc, err, "--steps")
    assert "1..1000" in err


def test_flags_with_two_meanings_keep_their_old_spelling_with_a_deprecation(capsys):
    """``--steps`` means denoising steps and ``--width`` image width in every command; ``figures --steps``
    (Fig. 3 steps) and ``bench e2e --width`` (a width preset) still work, saying the new name."""
    from taca_probe.cli import build_parser

    parser = build_parser()
    old = parser.parse_args(["figures", "s.zarr", "--steps", "0-2"])
    new = parser.parse_args(["figures", "s.zarr", "--map-steps", "0-2"])
    assert old.map_steps == new.map_steps == [0, 1, 2]
    assert capsys.readouterr().err.count("--map-steps") == 1  # said for the old spelling only
    old = parser.parse_args(["bench", "e2e", "--width", "flux-dev"])
    assert old.preset == parser.parse_args(["bench", "e2e", "--preset", "flux-dev"]).preset == "flux-dev"
    assert "--preset" in capsys.readouterr().err
    assert parser.parse_args(["bench", "e2e"]).preset == "sd35-medium"
    # one name for one setting: eval's bootstrap resamples are --n-resamples, as in figures and report
    old = parser.parse_args(["eval", "--bootstrap", "50"])
    assert old.n_resamples == 50 and "--n-resamples" in capsys.readouterr().err
    assert parser.parse_args(["eval", "--n-resamples", "300"]).n_resamples == 300
    assert parser.parse_args(["eval"]).n_resamples == 2000


def test_figures_max_tokens_and_tokens_are_one_or_the_other(tmp_path, capsys, monkeypatch):
    """Audit: `figures --max-tokens 3 --tokens red,circle` drew the named tokens and dropped --max-tokens unsaid."""
    import taca_probe.cli.figures as figures

    monkeypatch.setattr(figures, "render_figures", _must_not_load)
    rc, _, err = run_cli(["figures", tmp_path, "--max-tokens", "3", "--tokens", "red", "--out", tmp_path / "f"], capsys)
    _refused(rc, err, "--max-tokens")
    assert "--tokens" in err


def test_main_leaves_the_warning_format_as_it_found_it(capsys):
    """main prints warnings as one line; a notebook or test that calls it keeps Python's own format after."""
    before = warnings.formatwarning
    run_cli(["record", "--prompt", "x", "--seeds", "-1"], capsys)
    assert warnings.formatwarning is before


def test_generate_refuses_to_replace_an_earlier_runs_files_before_loading(tmp_path, capsys, monkeypatch):
    """Audit: a second generate into the same --out replaced the first run's images of the same names."""
    monkeypatch.setattr(record, "load_pipeline", _must_not_load)
    (tmp_path / "0001-seed0.json").write_text("{}")
    rc, _, err = run_cli(["generate", "--prompt", "a", "--prompt", "b", "--seeds", "0", "--out", tmp_path], capsys)
    _refused(rc, err, "0001-seed0.json")
    assert (tmp_path / "0001-seed0.json").read_text() == "{}" and len(list(tmp_path.iterdir())) == 1


def test_prompts_file_that_is_a_folder_is_named_as_such(tmp_path, capsys):
    rc, _, err = run_cli(["record", "--prompts", tmp_path, "--out", tmp_path / "r.zarr"], capsys)
    _refused(rc, err, "is not a file")


def test_record_overwrite_of_a_link_to_a_store_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """--overwrite through a symbolic link loaded the model, then failed with rmtree's bare OSError."""
    monkeypatch.setattr(record, "load_pipeline", _must_not_load)
    store = tmp_path / "real.zarr"
    store.mkdir()
    (store / "zarr.json").write_text(json.dumps({"attributes": {"taca_probe_schema": 1}}))
    (tmp_path / "link.zarr").symlink_to(store)
    rc, _, err = run_cli(["record", "--prompt", "x", "--overwrite", "--out", tmp_path / "link.zarr"], capsys)
    _refused(rc, err, "symbolic link")
    assert (tmp_path / "link.zarr").is_symlink() and sorted(p.name for p in store.iterdir()) == ["zarr.json"]


@pytest.mark.parametrize("command", ["figures", "report"])
def test_a_store_given_twice_is_refused(tmp_path, capsys, command):
    """Audit: `report STORE STORE` listed one run twice, and the sweep it made counted it as two schedules."""
    rc, _, err = run_cli([command, tmp_path / "a.zarr", f"{tmp_path}/./a.zarr", "--out", tmp_path / "out"], capsys)
    _refused(rc, err, "is given twice")  # the test's folder name holds "twice" too
    assert not (tmp_path / "out").exists()
