"""A store recorded by taca-probe 0.1.0 before the restructure (tests/data/store-v0.1.0.zarr) opens,
verifies and analyses as before, and the current code records the same store from the same command.

The store was written by commit a9cb6a9 with::

    taca-probe record --model tiny-sd3 --device cpu --steps 2 --height 64 --width 64 \
        --prompt "a red cube" --prompt "a blue ball left of a cube" --seeds 0,1 \
        --schedule step:1.3@970 --maps "steps=0;tokens=0-3" --branch both --out store-v0.1.0.zarr

``tests/data/analyses-v0.1.0/*.nc`` are that commit's analyses of that store (``QUANTITIES`` below, run
with a9cb6a9's ``taca_probe.analysis``; its ``token_ranking`` took ``ds.sel(branch="cond")``), written
with ``Dataset.to_netcdf(engine="scipy")``.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from diffusers import StableDiffusion3Pipeline

from taca_probe import analysis as A
from taca_probe.selection import MapSelection
from taca_probe.store import open_run, verify_store
from taca_probe.cli import main

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
OLD = DATA / "store-v0.1.0.zarr"
ARGV = ["record", "--model", "tiny-sd3", "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64",
        "--prompt", "a red cube", "--prompt", "a blue ball left of a cube", "--seeds", "0,1",
        "--schedule", "step:1.3@970", "--maps", "steps=0;tokens=0-3", "--branch", "both"]
#: Provenance that differs between any two recordings (versions, time, command line).
PROVENANCE = {"created", "command", "taca_probe_version", "torch_version", "diffusers_version"}
#: Attributes added since 0.1.0: compared where both sides have them.
ADDED_SINCE = {"map_selection", "branch", "model", "schedule", "variable"}  # variable: every result has had one since 90f7c2b
QUANTITIES = {"suppression": (A.suppression, {"branch": "cond", "n_resamples": 200}),
              "timestep_awareness": (A.timestep_awareness, {"branch": "uncond", "n_resamples": 200}),
              "token_ranking": (A.token_ranking, {"branch": "cond"})}
#: Bootstrap interval bounds. With 4 samples, about 1 resample in 10 is a permutation of the sample, whose
#: mean ties with the estimate up to rounding; a 1-ulp difference between two recordings flips those ties
#: and moves BCa's bias correction (seen: 2 % on a bound between two CPUs).
BOUNDS = ("ci_low", "ci_high")


def _ties(ranking: xr.Dataset, prefix: str) -> np.ndarray:
    """Ranks whose mass equals a neighbouring rank's within the tolerance of :func:`_close`."""
    m = ranking[f"{prefix}mass"].values
    tie = np.isclose(m[..., 1:], m[..., :-1], rtol=1e-5, atol=1e-6)
    out = np.zeros(m.shape, bool)
    out[..., 1:] |= tie
    out[..., :-1] |= tie
    return out


def _untie(a: xr.Dataset, b: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    """Token rankings with the token at tied ranks blanked in both: equal masses (padding tokens) are
    ordered by rounding, so another CPU may list them in another order."""
    a, b = a.copy(), b.copy()
    for prefix in ("", "padding_"):
        tied = _ties(a, prefix) | _ties(b, prefix)
        for name in (f"{prefix}token", f"{prefix}token_text", f"{prefix}token_source"):
            a[name] = a[name].where(~tied, -1 if a[name].dtype.kind == "i" else "")
            b[name] = b[name].where(~tied, -1 if b[name].dtype.kind == "i" else "")
    return a, b


@pytest.fixture(scope="module")
def new_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("compat") / "new.zarr"
    assert main([*ARGV, "--out", str(out)]) == 0
    return out


def _close(a: xr.Dataset, b: xr.Dataset, skip: tuple[str, ...] = ()) -> None:
    """Same variables, coordinates and attributes; floats within what another CPU's kernels may change;
    variables whose name ends with one of ``skip`` are not compared."""
    assert set(a.variables) == set(b.variables) and a.sizes == b.sizes
    for name in a.variables:
        x, y = a[name].values, b[name].values
        if str(name).endswith(skip):
            continue
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
        elif name == "image":
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1, name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    skipped = PROVENANCE | (ADDED_SINCE - (a.attrs.keys() & b.attrs.keys()))
    keep = lambda attrs: {k: v for k, v in attrs.items() if k not in skipped}  # noqa: E731
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
    # 0.1.0 wrote guidance None for the pipeline's default; now the scale it ran at
    default = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["guidance_scale"].default
    assert old.attrs["guidance"] is None and new.attrs["guidance"] == default
    old.attrs["guidance"] = default
    _close(old, new)
    assert MapSelection.from_attrs(new.attrs) == MapSelection.from_attrs(old.attrs)


def test_the_old_store_resumes_with_its_command_and_refuses_another_guidance(tmp_path, capsys):
    copy = tmp_path / "old.zarr"
    shutil.copytree(OLD, copy)
    assert main([*ARGV, "--out", str(copy), "--resume", "--guidance", "5"]) == 2
    assert "guidance" in capsys.readouterr().err
    assert main([*ARGV, "--out", str(copy), "--resume"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("quantity", sorted(QUANTITIES))
def test_old_store_analyses_as_the_old_code_analysed_it(quantity):
    fn, kw = QUANTITIES[quantity]
    then = xr.open_dataset(DATA / "analyses-v0.1.0" / f"{quantity}.nc", engine="scipy").load()
    _close(fn(open_run(OLD), **kw).load(), then)


@pytest.mark.parametrize("quantity", sorted(QUANTITIES))
def test_old_and_new_stores_analyse_alike(new_store, quantity):
    fn, kw = QUANTITIES[quantity]
    old, new = fn(open_run(OLD), **kw).load(), fn(open_run(new_store), **kw).load()
    if quantity == "token_ranking":
        assert _ties(old, "padding_").any()  # the case _untie is for
        old, new = _untie(old, new)
    _close(old, new, skip=BOUNDS)
