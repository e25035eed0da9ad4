"""taca_probe.sweep's pure parts: grid schedules, their sweep coordinates, open_sweep's input check."""

from __future__ import annotations

import math

import pytest

from taca_probe.sweep import SweepError, _schedule_coords, open_sweep, sweep_schedules


def test_sweep_schedules_put_the_one_identity_schedule_first_whatever_the_order_given():
    # gamma0 = 1 at every threshold, and const:1, are all the stock model: one "none", listed first
    specs = sweep_schedules(gamma0=[1.2, 1.0], t_thresh=[970, 900], extra=["const:1", "const:1.3"])
    assert specs == ["none", "step:1.2@970", "step:1.2@900", "const:1.3"]


def test_schedule_coordinates_of_each_form():
    assert _schedule_coords("step:1.2@970") == (1.2, 970.0)
    assert _schedule_coords("const:1.3") == (1.3, 0.0)  # const is a step at threshold 0
    assert _schedule_coords("step:1.4@900;blocks=joint") == (1.4, 900.0)  # a restriction keeps its base's numbers
    g0, tt = _schedule_coords("none")
    assert g0 == 1.0 and math.isnan(tt)
    assert all(math.isnan(v) for v in _schedule_coords("linear:1.2..1@970..900"))


@pytest.mark.parametrize("source", [None, 5, [], [1, 2], iter([])])
def test_open_sweep_of_something_not_a_path_is_one_sweep_error(source):
    """Audit: open_sweep(None) raised TypeError ('NoneType' object is not iterable)."""
    with pytest.raises(SweepError) as e:
        open_sweep(source)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # records five tiny stores
def test_open_sweep_refuses_stores_of_different_cfg_branches_maps_or_guidance(pipes, tmp_path):
    """A cond-only store beside a two-branch one was broadcast over the branch dim: its cond data read as
    'uncond' too (mass_vs_gamma(branch="uncond") gave numbers); a store without maps beside one with them
    got all-NaN maps and no map selection (map_difference: all NaN, no error). Stores of two schedules
    recorded at different guidance were one sweep, the guidance attr dropped: mass_vs_gamma then credited
    gamma with guidance's effect. Now the mismatch is named."""
    import zarr

    from taca_probe import probe

    pipe = pipes("tiny-sd3")
    for name, schedule, kw, call in (("a", "none", {"branch": "both"}, {}), ("b", "const:1.2", {}, {}),
                                     ("c", "const:1.3", {"maps": "steps=0"}, {}),
                                     ("d", "const:1.4", {}, {"guidance_scale": 3.0}), ("e", "const:1.5", {}, {})):
        with probe(pipe, tmp_path / f"{name}.zarr", schedule=schedule, **kw) as run:
            run.sample("a red cube", seed=0, num_inference_steps=1, height=32, width=32, **call)
    for other, expected in (("a", "branch cond vs both"), ("c", "maps None vs steps=0"), ("d", "guidance 7.0 vs 3.0")):
        with pytest.raises(SweepError, match=expected) as err:
            open_sweep([tmp_path / "b.zarr", tmp_path / f"{other}.zarr"])
        assert "\n" not in str(err.value)
    # stores before f45725e held guidance None for the default: beside a newer store, the same run
    zarr.open_group(tmp_path / "b.zarr", mode="r+").attrs["guidance"] = None
    assert list(open_sweep([tmp_path / "b.zarr", tmp_path / "e.zarr"])["schedule"].values) == ["const:1.2", "const:1.5"]
    with pytest.raises(SweepError, match="guidance 7.0 vs 3.0"):
        open_sweep([tmp_path / "b.zarr", tmp_path / "d.zarr"])


def test_a_sweep_whose_stores_are_all_gone_is_one_error_without_a_warning(tmp_path):
    """Stores moved away by hand: a warning ('not recorded yet') came before the error, two lines for one fault."""
    import json
    import warnings

    entries = [{"spec": s, "store": f"stores/{i}.zarr", "images": f"images/{i}"} for i, s in enumerate(["none", "const:1.2"])]
    (tmp_path / "sweep.json").write_text(json.dumps({"taca_probe_sweep": 1, "schedules": entries}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SweepError):
            open_sweep(tmp_path)
