"""Stores and sweeps: nothing silently wrong, nothing deleted outside the output (issue #14)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from taca_probe.cli import main
from taca_probe.store import StoreError, open_run, store_info, verify_store

TINY = ["--model", "tiny-sd3", "--steps", "1", "--height", "64", "--width", "64"]


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_sweep_overwrite_deletes_nothing_outside_its_folder(tmp_path, capsys):
    other = tmp_path / "other.zarr"
    assert _run(["record", *TINY, "--prompt", "keep me", "--out", str(other)], capsys)[0] == 0
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "precious.txt").write_text("do not delete")
    sweep = tmp_path / "sw1"
    argv = ["sweep", *TINY, "--prompt", "x", "--no-grid", "--schedule", "none", "--schedule", "const:1.1", "--out", str(sweep)]
    assert _run(argv, capsys)[0] == 0
    honest = (sweep / "sweep.json").read_bytes()
    doc = json.loads(honest)
    assert len(doc["schedules"]) == 2
    doc["schedules"][0]["images"] = "../decoy"
    doc["schedules"][1]["store"] = str(other.resolve())
    (sweep / "sweep.json").write_text(json.dumps(doc))
    before_sweep, before_other, before_decoy = _tree(sweep), _tree(other), _tree(decoy)
    rc, _, err = _run(argv + ["--overwrite"], capsys)
    assert rc == 2 and "outside the sweep folder" in err
    assert _tree(sweep) == before_sweep and _tree(other) == before_other and _tree(decoy) == before_decoy
    # a path inside the folder that is no store of ours is refused too
    doc["schedules"][0]["images"] = "images/00_none"
    doc["schedules"][1]["store"] = "images/00_none"
    (sweep / "sweep.json").write_text(json.dumps(doc))
    rc, _, err = _run(argv + ["--overwrite"], capsys)
    assert rc == 2 and "not a taca-probe store" in err and _tree(other) == before_other
    # an honest manifest: overwrite works, and files the tool did not make stay
    (sweep / "sweep.json").write_bytes(honest)
    (sweep / "images" / "00_none" / "notes.txt").write_text("mine")
    rc, _, err = _run(argv + ["--overwrite"], capsys)
    assert rc == 0, err
    assert (sweep / "images" / "00_none" / "notes.txt").read_text() == "mine"
    assert open_run(sweep / "stores" / "01_const_1.1.zarr").sizes["sample"] == 1
