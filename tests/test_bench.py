"""The benchmarks run and report what they measured (their figures are read by people, not asserted)."""

from __future__ import annotations

import json

import pytest

from taca_probe.bench import FULL_DEPTH, WIDTHS, realistic_sd3_pipeline
from taca_probe.cli import main


@pytest.mark.slow  # times whole sampling runs
def test_bench_e2e_reports_every_variant(capsys):
    rc = main(["bench", "e2e", "--device", "cpu", "--layers", "1", "--image-tokens", "64", "--steps", "2",
               "--repeats", "1", "--maps", "steps=0;tokens=0-3", "--json", "-"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["variants"]) == {"plain", "probe", "probe+maps"}
    for v in res["variants"].values():
        assert len(v["times_s"]) == 1 and v["median_s"] > 0
        assert v["per_step_s"] == pytest.approx(v["median_s"] / 2)
    assert res["variants"]["plain"]["ratio"] == 1.0
    assert res["stats_backend"].startswith("block")
    assert (res["depth"], res["joint_blocks"], res["batch"]) == ("reduced", 1, 2)


@pytest.mark.parametrize("width", ["flux-dev", pytest.param("sd35-large", marks=pytest.mark.slow)])
def test_full_depth_builds_the_published_architecture(width):
    # Built on the meta device: the shapes and block counts of the real model, no 12 B weights.
    pipe = realistic_sd3_pipeline(width=width, layers=None, device="meta")
    cfg = pipe.transformer.config
    assert (cfg.num_layers, getattr(cfg, "num_single_layers", 0)) == FULL_DEPTH[width]
    assert cfg.num_attention_heads == WIDTHS[width]["num_attention_heads"]
    billions = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    assert billions == pytest.approx({"flux-dev": 11.9, "sd35-large": 8.1}[width], abs=0.15)
