"""Stores and sweeps: nothing silently wrong, nothing deleted outside the output (issue #14)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from taca_probe.cli import main
from taca_probe.store import ChunkChecksumError, StoreError, open_run, store_info, verify_store
from taca_probe.sweep import open_sweep
from tests.clitools import one_line_error, run_cli

pytestmark = pytest.mark.slow  # records stores, damages and repairs them, kills processes

TINY = ["--model", "tiny-sd3", "--steps", "1", "--height", "64", "--width", "64"]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_sweep_overwrite_deletes_nothing_outside_its_folder(tmp_path, capsys):
    other = tmp_path / "other.zarr"
    assert run_cli(["record", *TINY, "--prompt", "keep me", "--out", str(other)], capsys)[0] == 0
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "precious.txt").write_text("do not delete")
    sweep = tmp_path / "sw1"
    argv = ["sweep", *TINY, "--prompt", "x", "--no-grid", "--schedule", "none", "--schedule", "const:1.1", "--out", str(sweep)]
    assert run_cli(argv, capsys)[0] == 0
    honest = (sweep / "sweep.json").read_bytes()
    doc = json.loads(honest)
    assert len(doc["schedules"]) == 2
    doc["schedules"][0]["images"] = "../decoy"
    doc["schedules"][1]["store"] = str(other.resolve())
    (sweep / "sweep.json").write_text(json.dumps(doc))
    before_sweep, before_other, before_decoy = _tree(sweep), _tree(other), _tree(decoy)
    rc, _, err = run_cli(argv + ["--overwrite"], capsys)
    assert rc == 2 and "outside the sweep folder" in err
    assert _tree(sweep) == before_sweep and _tree(other) == before_other and _tree(decoy) == before_decoy
    # a path inside the folder that is no store of ours is refused too
    doc["schedules"][0]["images"] = "images/00_none"
    doc["schedules"][1]["store"] = "images/00_none"
    (sweep / "sweep.json").write_text(json.dumps(doc))
    rc, _, err = run_cli(argv + ["--overwrite"], capsys)
    assert rc == 2 and "not a taca-probe store" in err and _tree(other) == before_other
    # an honest manifest: overwrite works, and files the tool did not make stay
    (sweep / "sweep.json").write_bytes(honest)
    (sweep / "images" / "00_none" / "notes.txt").write_text("mine")
    rc, _, err = run_cli(argv + ["--overwrite"], capsys)
    assert rc == 0, err
    assert (sweep / "images" / "00_none" / "notes.txt").read_text() == "mine"
    assert open_run(sweep / "stores" / "01_const_1.1.zarr").sizes["sample"] == 1


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """One small store (2 prompts x seeds 1,2, maps at step 0), recorded once; tests damage copies."""
    store = tmp_path_factory.mktemp("rec") / "s.zarr"
    assert main(["record", *TINY, "--prompt", "a red cube", "--prompt", "a blue ball", "--seeds", "1,2",
                 "--maps", "steps=0", "--out", str(store)]) == 0
    return store


@pytest.fixture
def store(recorded, tmp_path) -> Path:
    copy = tmp_path / "s.zarr"
    shutil.copytree(recorded, copy)
    return copy


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


# (damage, the key a reader must name); every one read back as plausible data before (defect 2)
DAMAGE = {
    "rm image chunk": (lambda s: (s / "image/c/1/0/0/0").unlink(), "image/c/1/0/0/0"),
    "rm seed chunk": (lambda s: (s / "seed/c/1").unlink(), "seed/c/1"),
    "rm prompt chunk": (lambda s: (s / "prompt/c/3").unlink(), "prompt/c/3"),
    "rm mass chunk": (lambda s: (s / "vis_txt_mass/c/1/0/0/0").unlink(), "vis_txt_mass/c/1/0/0/0"),
    "swap seed chunks": (lambda s: _swap(s / "seed/c/0", s / "seed/c/1"), "seed/c/"),  # same size
    "swap mass chunks": (lambda s: _swap(s / "token_mass/c/0/0/0/0", s / "token_mass/c/2/0/0/0"), "token_mass/c/"),
    "swap maps shards": (lambda s: _swap(s / "maps/c/0/0/0/0/0/0", s / "maps/c/3/0/0/0/0/0"), "maps/c/"),
}
WHOLE = {
    "rm -r image": (lambda s: shutil.rmtree(s / "image"), "'image'"),
    "rm -r maps": (lambda s: shutil.rmtree(s / "maps"), "'maps'"),
}


@pytest.mark.parametrize("name", list(DAMAGE) + list(WHOLE))
def test_missing_or_swapped_chunks_are_found_everywhere(store, tmp_path, capsys, name):
    damage, key = {**DAMAGE, **WHOLE}[name]
    assert verify_store(store) == []
    damage(store)
    assert any(key.strip("'") in k for k in verify_store(store))
    with pytest.raises(StoreError, match=key):
        open_run(store).load()
    if name in DAMAGE:
        info = store_info(store)
        assert info["samples_damaged"] and info["samples_complete"] < 4
        assert any(key in p for problems in info["samples_damaged"].values() for p in problems)
        rc, out, _ = run_cli(["info", str(store)], capsys)
        assert rc == 0 and key in out
    if name != "swap seed chunks":  # equal sizes: found when read (test_reads_are_bound...), not at open
        rc, _, err = run_cli(["figures", str(store), "--out", str(tmp_path / "f"), "--figures", "fig2"], capsys)
        assert rc == 2 and key in err and err.count("\n") == 1


@pytest.mark.parametrize("manifest", ["[1, 2]", "{not json", "corrupt chunk"])
def test_a_damaged_chunk_manifest_is_named(store, manifest):
    """A sample's manifest that is not a JSON object (written with a valid checksum) or whose chunk is
    corrupt: that sample is reported damaged, the others are not."""
    if manifest == "corrupt chunk":
        chunk = store / "chunk_manifest/c/1"
        chunk.write_bytes(b"x" * len(chunk.read_bytes()))
    else:
        zarr.open_group(str(store), mode="r+")["chunk_manifest"][1] = manifest
    assert verify_store(store) == ["chunk_manifest/c/1"]
    assert store_info(store)["samples_damaged"] == {1: ["chunk_manifest/c/1: the sample's chunk manifest is damaged"]}
    with pytest.raises(StoreError, match=r"slot\(s\) 1; first: chunk_manifest/c/1.*--resume"):
        open_run(store)


def test_a_corrupt_complete_flag_costs_its_sample_only(store, capsys):
    """The flag's chunk fails its checksum: that slot reads as not complete (resume records it again);
    the store still opens with the other samples."""
    chunk = store / "complete/c/1"
    chunk.write_bytes(b"x" * len(chunk.read_bytes()))
    assert verify_store(store) == ["complete/c/1"]
    info = store_info(store)
    assert (info["samples_complete"], info["samples_incomplete"], info["samples_damaged"]) == (3, 1, {})
    assert open_run(store).sizes["sample"] == 3
    rc, _, err = run_cli(["record", *TINY, "--prompt", "a red cube", "--prompt", "a blue ball", "--seeds", "1,2",
                          "--maps", "steps=0", "--out", str(store), "--resume"], capsys)
    assert rc == 0, err
    assert open_run(store).sizes["sample"] == 4 and verify_store(store) == []


def test_reads_are_bound_to_the_recorded_file(store):
    """Chunk files swapped (equal sizes, or after opening): the read itself fails, naming the chunk."""
    _swap(store / "seed/c/0", store / "seed/c/1")
    ds = open_run(store)
    with pytest.raises(ChunkChecksumError, match="seed/c/"):
        ds["seed"].values
    _swap(store / "image/c/0/0/0/0", store / "image/c/2/0/0/0")
    with pytest.raises(ChunkChecksumError, match="image/c/"):
        ds["image"].values
    ds["vis_txt_mass"].values  # the other chunks still read


@pytest.mark.parametrize("name", list(DAMAGE))
def test_resume_rerecords_damaged_samples(recorded, store, capsys, name):
    damage, key = DAMAGE[name]
    damage(store)
    rc, _, err = run_cli(["record", *TINY, "--prompt", "a red cube", "--prompt", "a blue ball", "--seeds", "1,2",
                       "--maps", "steps=0", "--out", str(store), "--resume"], capsys)
    assert rc == 0, err
    assert "repairing" in err and key in err
    assert verify_store(store) == []
    a, b = open_run(recorded).load(), open_run(store).load()
    for k in ("command", "created"):
        a.attrs.pop(k, None)
        b.attrs.pop(k, None)
    xr.testing.assert_identical(a, b)  # the repaired store equals the undamaged one


def _resume(store: Path, capsys, *extra: str):
    return run_cli(["record", *TINY, "--prompt", "a red cube", "--prompt", "a blue ball", "--seeds", "1,2",
                 "--maps", "steps=0", *extra, "--out", str(store), "--resume"], capsys)


def _drop_codec(store: Path) -> None:
    meta = json.loads((store / "vis_txt_mass/zarr.json").read_text())
    meta["codecs"] = [c for c in meta["codecs"] if c["name"] != "crc32c"]
    (store / "vis_txt_mass/zarr.json").write_text(json.dumps(meta))


def _drop_layout(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["layout"]
    (store / "zarr.json").write_text(json.dumps(meta))


METADATA = {
    "array zarr.json not JSON": lambda s: (s / "seed/zarr.json").write_text("{not json"),
    "array zarr.json wrong type": lambda s: (s / "seed/zarr.json").write_text("[1, 2]"),
    "layout attribute removed": _drop_layout,
    "crc32c codec removed": _drop_codec,  # used to turn checking off and fail in zstd
    "group zarr.json not JSON": lambda s: (s / "zarr.json").write_text("{"),
}


@pytest.mark.parametrize("name", list(METADATA))
def test_damaged_metadata_is_one_line_everywhere(store, capsys, name):
    METADATA[name](store)
    before = _tree(store)
    for argv in (["info", str(store)], ["info", str(store), "--json"]):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and err.count("\n") == 1 and str(store) in err and "internal error" not in err, err
    rc, _, err = _resume(store, capsys)
    assert rc == 2 and err.count("\n") == 1 and "internal error" not in err, err
    with pytest.raises(StoreError):
        open_run(store)
    assert _tree(store) == before  # nothing written while refusing


@pytest.mark.parametrize("value", ["abc", 0, 2.5, True])
def test_a_hand_edited_count_attribute_is_named_on_open(tmp_path, capsys, value):
    """Audit: n_txt edited to "abc" made `figures` exit 1 with an internal ValueError (float('abc'))."""
    store = tmp_path / "s.zarr"
    shutil.copytree(Path(__file__).parent / "data" / "store-v0.1.0.zarr", store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["n_txt"] = value
    (store / "zarr.json").write_text(json.dumps(meta))
    before = _tree(store)
    for argv in (["figures", store, "--out", tmp_path / "f"], ["info", store],
                 ["export-images", store, "--out", tmp_path / "e"]):
        rc, _, err = run_cli(argv, capsys)
        one_line_error(rc, err, "'n_txt'", repr(value))
    with pytest.raises(StoreError, match="'n_txt'"):
        open_run(store)
    assert _tree(store) == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_stores_without_manifests_still_open(store):
    """A store recorded before chunk manifests: opens, verify_store says absence is not checkable."""
    from taca_probe.store import StoreIntegrityWarning

    shutil.rmtree(store / "chunk_manifest")
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["chunk_manifest"]
    (store / "zarr.json").write_text(json.dumps(meta))
    assert open_run(store).sizes["sample"] == 4 and store_info(store)["samples_damaged"] == {}
    with pytest.warns(StoreIntegrityWarning, match="before chunk manifests"):
        assert verify_store(store) == []
    raw = bytearray((store / "token_mass/c/2/0/0/0").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (store / "token_mass/c/2/0/0/0").write_bytes(bytes(raw))
    with pytest.warns(StoreIntegrityWarning):
        assert verify_store(store) == ["token_mass/c/2/0/0/0"]


def test_store_creation_is_atomic(pipes, tmp_path, monkeypatch, capsys):
    import socket

    import taca_probe.store as store_module

    pipes("tiny-sd3")  # the model cache is built (and renamed into place) before os.rename fails below
    target = tmp_path / "r.zarr"
    stale = tmp_path / f".creating.r.zarr.{socket.gethostname()}.999999999.deadbeef"  # a killed creator's
    stale.mkdir()

    def killed(src, dst):
        raise KeyboardInterrupt  # as if the process died just before the store would appear

    monkeypatch.setattr(store_module.os, "rename", killed)
    rc, _, err = run_cli(["record", *TINY, "--prompt", "x", "--out", str(target)], capsys)
    assert rc == 130 and not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # neither the half-built store nor the stale one
    monkeypatch.undo()
    rc, _, err = run_cli(["record", *TINY, "--prompt", "x", "--out", str(target)], capsys)  # no --overwrite needed
    assert rc == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["r.zarr"]


def test_a_half_created_store_of_an_older_version_is_named_and_overwritable(tmp_path, capsys):
    import zarr

    target = tmp_path / "r.zarr"
    group = zarr.open_group(str(target), mode="w-", zarr_format=3)
    group.attrs["taca_probe_schema"] = 1  # killed right after this: no layout, no arrays
    rc, _, err = run_cli(["record", *TINY, "--prompt", "x", "--out", str(target), "--resume"], capsys)
    assert rc == 2 and "layout" in err and "internal error" not in err
    rc, _, err = run_cli(["record", *TINY, "--prompt", "x", "--out", str(target), "--overwrite"], capsys)
    assert rc == 0, err
    assert open_run(target).sizes["sample"] == 1


def test_sampling_reads_nothing_of_the_slot_table(pipes, tmp_path, monkeypatch):
    """Per-sample work must not grow with the store: after opening, a sample reads no slot-table chunk."""
    import taca_probe.store as store_module
    from taca_probe.runner import probe

    reads: list[str] = []
    get = store_module.ChecksumStore.get

    async def counting(self, key, *args, **kwargs):
        reads.append(key)
        return await get(self, key, *args, **kwargs)

    pipe = pipes("tiny-sd3")
    call = {"num_inference_steps": 1, "height": 64, "width": 64}
    plan = [(f"p{i}", 0) for i in range(6)]
    with probe(pipe, tmp_path / "s.zarr") as run:
        run.create_planned(plan, call)
        monkeypatch.setattr(store_module.ChecksumStore, "get", counting)
        for slot, (prompt, seed) in enumerate(plan):
            run.sample(prompt, seed=seed, slot=slot, **call)
    table = [k for k in reads if k.split("/")[0] in ("prompt", "seed", "batch_index", "complete")]
    assert table == []
    assert open_run(tmp_path / "s.zarr").sizes["sample"] == 6


def test_resume_names_the_setting_that_differs(recorded, store, capsys):
    before = _tree(store)
    rc, _, err = run_cli(["record", *TINY, "--prompt", "a red cube", "--prompt", "a blue ball", "--seeds", "1,2,3",
                       "--maps", "steps=0", "--out", str(store), "--resume"], capsys)
    assert rc == 2 and "--seeds" in err and "[1,2]" in err and "[1,2,3]" in err
    rc, _, err = run_cli(["record", *TINY, "--prompt", "a red cube", "--prompt", "a green ball", "--seeds", "1,2",
                       "--maps", "steps=0", "--out", str(store), "--resume"], capsys)
    assert rc == 2 and "prompts" in err and "a green ball" in err
    rc, _, err = _resume(store, capsys, "--guidance", "3")
    assert rc == 2 and "guidance" in err
    assert _tree(store) == before


def test_a_refused_resume_of_a_damaged_store_writes_nothing(store, capsys):
    """Audit: the damaged sample was marked for repair (its completion flag deleted) before the plan was
    checked, so a --resume refused for other seeds still changed the store."""
    (store / "image/c/1/0/0/0").unlink()
    before = _tree(store)
    rc, _, err = run_cli(["record", *TINY, "--prompt", "a red cube", "--prompt", "a blue ball", "--seeds", "1,2,3",
                       "--maps", "steps=0", "--out", str(store), "--resume"], capsys)
    assert rc == 2 and "--seeds" in err and "repairing" not in err and "Traceback" not in err
    assert _tree(store) == before


@pytest.mark.parametrize("extra,key", [(["--max-sequence-length", "100"], "max_sequence_length"),
                                       (["--lora-scale", "0.5"], "lora_scale")])
def test_resume_compares_text_length_and_lora(store, capsys, extra, key):
    """Audit: these were not compared; a sample to repair then failed mid-run ("n_txt: store 333 vs now
    177") after the store was changed, or was recorded with another LoRA scale than the rest."""
    (store / "image/c/1/0/0/0").unlink()
    before = _tree(store)
    rc, _, err = _resume(store, capsys, *extra)
    assert rc == 2 and key in err and "repairing" not in err and "Traceback" not in err, err
    assert _tree(store) == before


SELECTIONS = [
    (["--steps", "2", "--maps", "steps=5-9"], "0..1"),
    (["--steps", "2", "--maps", "steps=0-99"], "0..1"),  # issue #12 (a)
    (["--maps", "tokens=400,500"], "0..332"),
    (["--maps", "layers=nomatch"], "nomatch"),
    (["--schedule", "step:1.2@970;layers=nomatch*"], "nomatch*"),
]


@pytest.mark.parametrize("extra,key", SELECTIONS, ids=[" ".join(a) for a, _ in SELECTIONS])
def test_selections_that_match_nothing_are_refused(tmp_path, capsys, extra, key):
    out = tmp_path / "r.zarr"
    rc, _, err = run_cli(["record", *TINY, "--prompt", "x", *extra, "--out", str(out)], capsys)
    assert rc == 2 and key in err and err.count("\n") == 1
    assert not out.exists()


def test_a_long_maps_selection_is_not_written_out_in_full_in_its_refusal(tmp_path, capsys):
    """Audit: the refusal spelled out every index of --maps tokens=0-99999: one line of 600,000 characters."""
    rc, _, err = run_cli(["record", *TINY, "--prompt", "x", "--maps", "tokens=0-99999", "--out", tmp_path / "r.zarr"],
                         capsys)
    one_line_error(rc, err, "token 99999", "0..332")
    assert len(err) < 300 and not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("command", ["record", "generate"])
def test_bad_input_found_while_sampling_leaves_no_store(tmp_path, capsys, recwarn, command):
    """gamma 3e38 is a float32, but the scaled text keys overflow: NaN statistics and a NaN image.
    Audit: generate wrote a black PNG and exited 0; record warned twice (numpy casts) before its error."""
    out = tmp_path / "r.zarr"
    rc, _, err = run_cli([command, *TINY, "--prompt", "x", "--schedule", "const:3e38", "--out", str(out)], capsys)
    lines = [line for line in err.split("\n") if line.strip() and not line.startswith("\r")]  # not the bar
    assert rc == 2 and len(lines) == 1 and "non-finite" in lines[0], err
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # checked before any cast
    assert not out.exists()  # so the corrected rerun needs no --overwrite
    assert run_cli([command, *TINY, "--prompt", "x", "--out", str(out)], capsys)[0] == 0


def test_a_failed_record_overwrite_keeps_the_store_it_was_to_replace(tmp_path, capsys):
    """Audit: --overwrite deleted the old store before sampling; a first sample that failed then lost both."""
    out = tmp_path / "r.zarr"
    assert run_cli(["record", *TINY, "--prompt", "x", "--out", out], capsys)[0] == 0
    before = _tree(out)
    rc, _, err = run_cli(["record", *TINY, "--prompt", "y", "--schedule", "const:3e38", "--overwrite", "--out", out],
                         capsys)
    assert rc == 2 and "non-finite" in err
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]
    assert run_cli(["record", *TINY, "--prompt", "y", "--overwrite", "--out", out], capsys)[0] == 0
    assert list(open_run(out)["prompt"].values) == ["y"] and sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]


def test_a_failed_sweep_overwrite_keeps_the_sweep_it_was_to_replace(tmp_path, capsys):
    """Audit: sweep --overwrite deleted the old stores and PNGs before sampling; a failed first sample lost both."""
    sw = tmp_path / "sw"
    argv = ["sweep", *TINY, "--prompt", "x", "--no-grid", "--out", sw]
    assert run_cli([*argv, "--schedule", "none", "--schedule", "const:1.1"], capsys)[0] == 0
    (sw / "figures").mkdir()
    (sw / "figures" / "mine.txt").write_text("mine")
    before, data = _tree(sw), open_sweep(sw).load()
    # 01_const_1.1.zarr is in both manifests; const:3e38 fails first, so the run records nothing
    rc, _, err = run_cli([*argv, "--schedule", "const:3e38", "--schedule", "const:1.1", "--overwrite"], capsys)
    assert rc == 2 and "non-finite" in err
    assert _tree(sw) == before
    xr.testing.assert_identical(open_sweep(sw).load(), data)
    # a sample recorded: the old sweep goes, hidden copies too, the user's files stay
    rc, _, err = run_cli([*argv, "--schedule", "none", "--schedule", "const:3e38", "--overwrite"], capsys)
    assert rc == 2 and "non-finite" in err
    left = {str(p.relative_to(sw)) for p in sw.rglob("*") if p.is_file() and "00_none.zarr" not in p.parts}
    assert left == {"figures/mine.txt", "images/00_none/p00_seed0.png", "sweep.json"}
    assert [p.name for p in (sw / "stores").iterdir()] == ["00_none.zarr"]
    assert "3e+38" in (sw / "sweep.json").read_text()


def test_a_sweep_overwrite_stopped_after_a_sample_before_its_png_keeps_the_new_sample(tmp_path, capsys, monkeypatch):
    """Review: f4347da put the old sweep back when no PNG was saved yet, also onto a new store holding a sample."""
    from taca_probe import runner

    sw = tmp_path / "sw"
    argv = ["sweep", *TINY, "--no-grid", "--schedule", "none", "--out", sw]
    assert run_cli([*argv, "--prompt", "x"], capsys)[0] == 0
    sample = runner.Run.sample

    def stopped(self, *args, **kwargs):
        sample(self, *args, **kwargs)
        raise KeyboardInterrupt  # the sample is in the store; its PNG is not saved yet

    monkeypatch.setattr(runner.Run, "sample", stopped)
    rc, _, err = run_cli([*argv, "--prompt", "y", "--overwrite"], capsys)
    assert rc == 130, err  # the interrupt, not an error putting the old store back onto the new one
    assert list(open_run(sw / "stores" / "00_none.zarr")["prompt"].values) == ["y"]
    assert not [p for p in sw.rglob("*") if p.name.startswith(".")]  # no hidden copy of the old sweep left


def test_a_store_set_aside_by_a_killed_overwrite_is_never_deleted(tmp_path, capsys):
    """Review: a store set aside by a `record --overwrite` that was then killed was deleted, as a stale build
    folder, by the next record at its path."""
    out = tmp_path / "r.zarr"
    assert run_cli(["record", *TINY, "--prompt", "x", "--out", out], capsys)[0] == 0
    before = _tree(out)
    subprocess.run([sys.executable, "-c", f"from taca_probe.store import set_aside; set_aside({str(out)!r})"],
                   check=True)  # the overwrite's process is gone, its store set aside
    for flags in ([], ["--overwrite"]):
        rc, _, err = run_cli(["record", *TINY, "--prompt", "y", *flags, "--out", out], capsys)
        (kept,) = tmp_path.iterdir()
        one_line_error(rc, err, str(kept))
        assert _tree(kept) == before


def test_interrupt_while_starting_and_os_errors_are_one_line(monkeypatch, capsys, tmp_path):
    import errno

    import taca_probe.cli as cli

    def interrupted():
        raise KeyboardInterrupt  # Ctrl-C while the parser imports torch

    monkeypatch.setattr(cli, "build_parser", interrupted)
    rc, _, err = run_cli(["info", "x"], capsys)
    assert rc == 130 and err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.undo()

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r.zarr" / "image"))

    monkeypatch.setattr(cli.record, "cmd_info", disk_full)
    rc, _, err = run_cli(["info", str(tmp_path)], capsys)
    assert rc == 2 and str(tmp_path / "r.zarr" / "image") in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_failed_read_leaves_no_asyncio_noise(store):
    """Defect 17: after a checksum error, zarr's other reads used to print asyncio tracebacks at exit."""
    code = (
        "import os, sys\n"
        "from taca_probe.store import open_run\n"
        "import taca_probe.cli as cli\n"
        f"ds = open_run({str(store)!r})\n"
        f"a, b = {str(store / 'image/c/0/0/0/0')!r}, {str(store / 'image/c/2/0/0/0')!r}\n"
        "os.rename(a, a + '.t'); os.rename(b, a); os.rename(a + '.t', b)\n"
        "cli.record.cmd_info = lambda args: ds['image'].values\n"
        "sys.exit(cli.main(['info', 'x']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2 and "image/c/" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_sweep_resume_rerecords_damaged_samples(tmp_path, capsys):
    sweep = tmp_path / "sw"
    argv = ["sweep", *TINY, "--prompt", "x", "--seeds", "1,2", "--no-grid", "--schedule", "none", "--schedule",
            "const:1.1", "--out", str(sweep)]
    assert run_cli(argv, capsys)[0] == 0
    store = sweep / "stores" / "01_const_1.1.zarr"
    before = open_run(store).load()
    (store / "image/c/1/0/0/0").unlink()
    rc, _, err = run_cli(argv + ["--resume"], capsys)
    assert rc == 0 and "repairing 1 damaged sample" in err and "image/c/1/0/0/0" in err
    assert verify_store(store) == []
    after = open_run(store).load()
    np.testing.assert_array_equal(after["image"].values, before["image"].values)


def test_info_json_is_strict_json_for_old_nan_attributes(store, capsys):
    """Defect 12: a store recorded with --guidance nan (before it was refused) made `info --json` print NaN."""
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["guidance"] = float("nan")
    (store / "zarr.json").write_text(json.dumps(meta))
    rc, out, _ = run_cli(["info", str(store), "--json"], capsys)
    assert rc == 0
    json.loads(out, parse_constant=lambda name: pytest.fail(f"invalid JSON constant {name}"))


@pytest.mark.slow
def test_sigkill_while_the_store_is_created_leaves_nothing(tmp_path):
    """Defect 6, for real: kill `record` while it lays out a store with many planned slots."""
    import signal
    import time

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(20000)) + "\n")
    out = tmp_path / "r.zarr"
    argv = [sys.executable, "-m", "taca_probe", "record", *TINY, "--prompts", str(prompts), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".creating.*")):
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before the store was being created"
        time.sleep(0.3)  # well inside the layout of 20,000 slots
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()  # nothing half-made at the output path
    rerun = subprocess.run(argv[:-4] + ["--prompt", "x", "--out", str(out)], env=env, capture_output=True,
                           text=True, timeout=300)  # no --overwrite, no hand clean-up
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt", "r.zarr"]  # the killed one's folder is gone
    assert open_run(out).sizes["sample"] == 1


def test_two_ranks_repair_samples_whose_keys_were_swapped(recorded, store):
    """Rank 0 marked damaged samples for repair in its memory only; rank 1 read the swapped seeds from
    disk and refused its share ("slot 1 ... is not planned for"), so `torchrun ... --resume` failed."""
    _swap(store / "seed/c/0", store / "seed/c/1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "taca_probe",
            "record", *TINY, "--prompt", "a red cube", "--prompt", "a blue ball", "--seeds", "1,2",
            "--maps", "steps=0", "--out", str(store), "--resume"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "repairing 2 damaged sample" in proc.stderr
    assert verify_store(store) == []
    a, b = open_run(recorded).load(), open_run(store).load()
    for k in ("prompt", "seed", "batch_index"):
        np.testing.assert_array_equal(a[k].values, b[k].values)
    np.testing.assert_allclose(a["vis_txt_mass"].values, b["vis_txt_mass"].values, rtol=1e-5)
    # torchrun runs each rank on one thread: an image may differ from the recorded one by a level
    np.testing.assert_allclose(a["image"].values, b["image"].values, atol=1)


def test_a_resumed_probe_never_overwrites_a_complete_sample_after_a_gap(pipes, tmp_path):
    """Slot 1 of 3 unfinished (its rank died): a resumed probe's two-image sample went into slots 1 and 2,
    replacing the complete sample of slot 2."""
    from taca_probe.runner import probe

    pipe = pipes("tiny-sd3")
    call = {"num_inference_steps": 1, "height": 64, "width": 64}
    path = tmp_path / "s.zarr"
    with probe(pipe, path) as run:
        run.create_planned([("a", 1), ("b", 1), ("c", 1)], call)
        for slot in (0, 2):
            run.sample("abc"[slot], seed=1, slot=slot, **call)
    before = open_run(path).load()
    with probe(pipe, path, mode="resume") as run:
        run.sample("z", seed=5, num_images_per_prompt=2, **call)
    after = open_run(path).load()
    kept = after.isel(sample=[int(i) for i, p in enumerate(after["prompt"].values) if p in ("a", "c")])
    assert list(kept["prompt"].values) == ["a", "c"]
    np.testing.assert_array_equal(kept["image"].values, before["image"].values)
    assert sorted(zip(after["prompt"].values.tolist(), after["batch_index"].values.tolist())) == [
        ("a", 0), ("c", 0), ("z", 0), ("z", 1)]


RANK_ENV = [({"WORLD_SIZE": "2"}, "RANK"), ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
            ({"WORLD_SIZE": "two"}, "WORLD_SIZE"), ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK")]


@pytest.mark.parametrize("env,name", RANK_ENV)
@pytest.mark.parametrize("command", ["record", "sweep"])
def test_rank_variables_set_by_hand_are_one_line(tmp_path, capsys, monkeypatch, env, name, command):
    """WORLD_SIZE without RANK was an internal KeyError (exit 1); RANK >= WORLD_SIZE waited at a barrier."""
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    rc, _, err = run_cli([command, *TINY, "--prompt", "x", "--out", tmp_path / "out"], capsys)
    one_line_error(rc, err, name)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_of_a_link_to_a_store_is_refused_and_keeps_the_store(recorded, tmp_path):
    """rmtree refused the link with a bare OSError ('Cannot call rmtree on a symbolic link')."""
    from taca_probe.store import remove_store

    link = tmp_path / "link.zarr"
    link.symlink_to(recorded)
    before = _tree(recorded)
    with pytest.raises(StoreError, match="symbolic link"):
        remove_store(link)
    assert link.is_symlink() and _tree(recorded) == before


def test_a_resumed_probe_sample_goes_where_its_images_are_and_leaves_others_planned_slots(pipes, tmp_path):
    """A two-image sample killed after its first image was stored twice on resume (('z', 5, 0) in slots 3 and 4),
    and a sample without slot= took the first unfinished slot even where record had planned another prompt."""
    from taca_probe.runner import probe
    from taca_probe.store import COMPLETE

    pipe = pipes("tiny-sd3")
    call = {"num_inference_steps": 1, "height": 64, "width": 64}
    path = tmp_path / "s.zarr"
    with probe(pipe, path) as run:
        run.create_planned([("a", 1), ("b", 1)], call)
        run.sample("a", seed=1, slot=0, **call)
        run.sample("c", seed=2, **call)  # not planned: a new slot, not b's
        run.sample("z", seed=5, num_images_per_prompt=2, **call)
    group = zarr.open_group(str(path), mode="r+")
    last = [(p, b) for p, b in zip(group["prompt"][:], group["batch_index"][:])].index(("z", 1))
    group[COMPLETE][last] = False  # killed before z's second image completed
    with probe(pipe, path, mode="resume") as run:
        run.sample("z", seed=5, num_images_per_prompt=2, **call)
        run.sample("b", seed=1, slot=1, **call)  # record --resume would fill b's planned slot
    ds = open_run(path)
    assert list(zip(ds["prompt"].values.tolist(), ds["seed"].values.tolist(), ds["batch_index"].values.tolist())) == [
        ("a", 1, 0), ("b", 1, 0), ("c", 2, 0), ("z", 5, 0), ("z", 5, 1)]
