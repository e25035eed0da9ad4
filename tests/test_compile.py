"""taca() and probe() on a compiled transformer (inductor on the CPU), the way FLUX users run it.

Compiled and eager runs must give the same images and statistics within float tolerance, and the
probe must not multiply graphs: every block and step shares the compiled graph, because the TACA
call is one opaque op that reads the site, its gamma and the probe's buffers at run time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from taca_probe.intervention import taca
from taca_probe.models import load_pipeline
from taca_probe.runner import probe
from taca_probe.store import open_run

pytestmark = pytest.mark.slow  # each case compiles a model with inductor (20-40 s on 2 cores)

KW = {"num_inference_steps": 3, "height": 64, "width": 64}
SCHEDULE = "first:1.5@1"  # gamma 1.5 at step 0, 1 after: both kinds of call in one run


def _compile(pipe, how: str) -> None:
    if how == "whole":
        pipe.transformer = torch.compile(pipe.transformer)
    else:  # diffusers' regional compilation of the repeated blocks, full graphs
        pipe.transformer.compile_repeated_blocks(fullgraph=True)


@pytest.mark.parametrize("model,how", [("tiny-sd3", "whole"), ("tiny-flux", "whole"), ("tiny-flux", "regional")])
def test_compiled_taca_and_probe_match_eager(tmp_path, model, how):
    torch._dynamo.reset()
    pipe = load_pipeline(model, device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    with taca(pipe, SCHEDULE):
        eager = pipe("a red cube", generator=torch.Generator().manual_seed(0), output_type="np", **KW).images
    with probe(pipe, tmp_path / "eager.zarr", schedule=SCHEDULE, maps="steps=0") as run:
        run.sample("a red cube", seed=0, **KW)
    stock_eager = pipe("a red cube", generator=torch.Generator().manual_seed(0), output_type="np", **KW).images

    _compile(pipe, how)
    counters.clear()
    with taca(pipe, SCHEDULE) as handle:
        compiled = pipe("a red cube", generator=torch.Generator().manual_seed(0), output_type="np", **KW).images
    assert handle.steps_active == [0]
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
    assert np.abs(compiled - stock_eager).max() > 1e-3  # gamma 1.5 did act under compile
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]

    with probe(pipe, tmp_path / "compiled.zarr", schedule=SCHEDULE, maps="steps=0") as run:
        run.sample("a red cube", seed=0, **KW)
    assert counters["stats"]["unique_graphs"] == graphs  # recording reuses the same graphs
    a, b = open_run(tmp_path / "eager.zarr"), open_run(tmp_path / "compiled.zarr")
    for name in ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass", "token_mass"):
        np.testing.assert_allclose(b[name].values, a[name].values, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(b["maps"].isel(step=0).values.astype(np.float64),
                               a["maps"].isel(step=0).values.astype(np.float64), atol=2e-3)
    np.testing.assert_array_equal(b["gamma"].values, a["gamma"].values)
    assert np.abs(b["image"].values.astype(int) - a["image"].values.astype(int)).max() <= 1

    # after leaving, the compiled model is the stock model again
    stock = pipe("a red cube", generator=torch.Generator().manual_seed(0), output_type="np", **KW).images
    np.testing.assert_allclose(stock, stock_eager, atol=1e-4)


def test_graphs_do_not_grow_with_steps(tmp_path):
    # One graph for every step: a per-step or per-block value read into the graph would recompile
    # (and past torch's recompile limit fall back to eager).
    torch._dynamo.reset()
    pipe = load_pipeline("tiny-flux", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    _compile(pipe, "whole")
    counters.clear()
    with probe(pipe, tmp_path / "a.zarr", schedule="none") as run:
        run.sample("a red cube", seed=0, num_inference_steps=2, height=64, width=64)
    two = counters["stats"]["unique_graphs"]
    with probe(pipe, tmp_path / "b.zarr", schedule="first:1.3@4") as run:
        run.sample("a red cube", seed=0, num_inference_steps=9, height=64, width=64)
    assert counters["stats"]["unique_graphs"] == two
    assert open_run(tmp_path / "b.zarr").sizes["step"] == 9
