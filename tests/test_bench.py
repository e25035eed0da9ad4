"""The benchmarks run and report what they measured (their figures are read by people, not asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict, replace

import pytest

from taca_probe.bench import FULL_DEPTH, WIDTHS, bench_attention, format_rows, parse_shape, realistic_sd3_pipeline
from taca_probe.cli import main
from tests.clitools import one_line_error


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


@pytest.mark.slow  # a subprocess: diffusers' log handler writes to the stderr it found at import
def test_bench_e2e_prints_no_library_chatter():
    """Audit: casting the benchmark's own pipeline printed diffusers' 'should be kept in float32' advice twice,
    before a refusal too."""
    proc = subprocess.run([sys.executable, "-m", "taca_probe", "bench", "e2e", "--device", "cpu", "--layers", "1",
                           "--image-tokens", "16", "--steps", "2", "--maps", "steps=5"],
                          capture_output=True, text=True, timeout=300)
    one_line_error(proc.returncode, proc.stderr, "step 5")


@pytest.mark.parametrize("width", ["flux-dev", pytest.param("sd35-large", marks=pytest.mark.slow)])
def test_full_depth_builds_the_published_architecture(width):
    # Built on the meta device: the shapes and block counts of the real model, no 12 B weights.
    pipe = realistic_sd3_pipeline(width=width, layers=None, device="meta")
    cfg = pipe.transformer.config
    assert (cfg.num_layers, getattr(cfg, "num_single_layers", 0)) == FULL_DEPTH[width]
    assert cfg.num_attention_heads == WIDTHS[width]["num_attention_heads"]
    billions = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    assert billions == pytest.approx({"flux-dev": 11.9, "sd35-large": 8.1}[width], abs=0.15)


def test_attention_table_stays_aligned_with_long_variant_names():
    """Audit: a variant name over 11 characters (taca+masses:fused) pushed its row's numbers out of their columns."""
    shape = {"name": "flux-1024", "batch": 1, "heads": 24, "n_txt": 512, "n_vis": 4096, "head_dim": 128}
    rows = [{"shape": shape, "variant": name, "error": None, "median_ms": ms, "ratio_to_sdpa": ms / 2.0,
             "peak_extra_mib": 10.0} for name, ms in (("sdpa", 2.0), ("taca+masses:fused", 3.5), ("naive", 40.0))]
    header, *lines = format_rows(rows).splitlines()
    end = header.index("median ms") + len("median ms")
    assert [line[:end].split()[-1] for line in lines] == ["2.00", "3.50", "40.00"]
    assert all(line[end] == " " for line in lines)


def test_custom_shapes_are_labelled_once_and_compared_with_their_own_naive_row():
    """Audit: a custom shape's label spelled its dimensions twice ('B1H2-16+48-D16 B1H2 16+48 D16'), kept the old head
    count after --heads, and shapes that differ only in order or heads shared one name, so every '% naive' was taken
    against the last one's naive peak."""
    shapes = [parse_shape("1,2,16,48,16"), parse_shape("1,2,16,48,16,img-first"),
              replace(parse_shape("1,2,16,48,16"), heads=4)]  # what --heads 4 does
    rows = [{"shape": asdict(s), "variant": name, "error": None, "median_ms": 1.0, "ratio_to_sdpa": 1.0,
             "peak_extra_mib": peak} for s, naive in zip(shapes, (10.0, 20.0, 40.0))
            for name, peak in (("taca", 5.0), ("naive", naive))]
    lines = format_rows(rows).splitlines()[1:]
    taca = [line for line in lines if " taca " in line]
    assert [float(line.split()[-1].rstrip("%")) for line in taca] == [50.0, 25.0, 12.5]
    for line, order, heads in zip(taca, ("txt-first", "img-first", "txt-first"), ("2", "2", "4")):
        assert line.count("16+48") == 1 and order in line and re.findall(r"H(\d+)", line) == [heads]


def test_a_variant_given_twice_is_timed_and_listed_once():
    """Audit: --variants sdpa,sdpa printed (and wrote to --json) the same row twice."""
    rows = bench_attention([parse_shape("1,1,4,8,8")], variants=("sdpa", "taca", "sdpa"), repeats=2, memory=False)
    assert [r["variant"] for r in rows] == ["sdpa", "taca"] and all(len(r["times_ms"]) == 2 for r in rows)
