"""A store recorded by taca-probe 0.1.0 before the restructure (tests/data/store-v0.1.0.zarr) opens,
verifies and analyses as before, and the current code records the same store from the same command.

The store was written by commit a9cb6a9 with::

    taca-probe record --model tiny-sd3 --device cpu --steps 2 --height 64 --width 64 \
        --prompt "a red cube" --prompt "a blue ball left of a cube" --seeds 0,1 \
        --schedule step:1.3@970 --maps "steps=0;tokens=0-3" --branch both --out store-v0.1.0.zarr
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from taca_probe import analysis as A
from taca_probe.selection import MapSelection
from taca_probe.store import open_run, verify_store
from taca_probe.cli import main

pytestmark = pytest.mark.slow

OLD = Path(__file__).parent / "data" / "store-v0.1.0.zarr"
ARGV = ["record", "--model", "tiny-sd3", "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64",
        "--prompt", "a red cube", "--prompt", "a blue ball left of a cube", "--seeds", "0,1",
        "--schedule", "step:1.3@970", "--maps", "steps=0;tokens=0-3", "--branch", "both"]
#: Provenance that differs between any two recordings (versions, time, command line), and attributes added since.
PROVENANCE = {"created", "command", "taca_probe_version", "torch_version", "diffusers_version", "map_selection"}


@pytest.fixture(scope="module")
def new_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("compat") / "new.zarr"
    assert main([*ARGV, "--out", str(out)]) == 0
    return out


def _close(a: xr.Dataset, b: xr.Dataset) -> None:
    """Same variables, coordinates and attributes; floats within what another CPU's kernels may change."""
    assert set(a.variables) == set(b.variables) and a.sizes == b.sizes
    for name in a.variables:
        x, y = a[name].values, b[name].values
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
        elif name == "image":
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1, name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    keep = lambda attrs: {k: v for k, v in attrs.items() if k not in PROVENANCE}  # noqa: E731
    assert keep(a.attrs) == keep(b.attrs)


def test_old_store_opens_verifies_and_reads_its_map_selection(tmp_path):
    copy = tmp_path / "old.zarr"
    shutil.copytree(OLD, copy)  # verification reads only; the copy keeps the fixture untouched anyway
    assert verify_store(copy) == []
    ds = open_run(copy)
    assert ds.sizes["sample"] == 4 and list(ds["branch"].values) == ["cond", "uncond"]
    assert "map_selection" not in ds.attrs  # written before structured selections: parsed from "maps"
    assert MapSelection.from_attrs(ds.attrs) == MapSelection(steps=(0,), tokens=(0, 1, 2, 3))
    assert A.recorded_map_steps(ds) == [0]


def test_current_code_records_the_old_store_again(new_store):
    old, new = open_run(OLD).load(), open_run(new_store).load()
    _close(old, new)
    assert MapSelection.from_attrs(new.attrs) == MapSelection.from_attrs(old.attrs)


def test_old_and_new_stores_analyse_alike(new_store):
    old, new = open_run(OLD), open_run(new_store)
    for fn, kw in ((A.suppression, {"branch": "cond", "n_resamples": 200}),
                   (A.timestep_awareness, {"branch": "uncond", "n_resamples": 200}),
                   (A.token_ranking, {"branch": "cond"})):
        _close(fn(old, **kw), fn(new, **kw))
