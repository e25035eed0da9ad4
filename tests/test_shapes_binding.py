"""The binding analysis of analysis/shapes_study.py: object masks and own-vs-other word attention."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from taca_probe.shapes import dataset as ds
from taca_probe.shapes.evaluator import object_masks

ROOT = Path(__file__).resolve().parent.parent
A = ds.ObjectSpec("red", "circle", 19.3, 29.4, 19.0)
B = ds.ObjectSpec("blue", "triangle", 45.3, 33.6, 21.0)


def test_object_masks_are_the_rendered_objects() -> None:
    image = ds.render([A, B])
    masks = object_masks(image)
    assert set(masks) == {"red", "blue"}
    for obj in (A, B):
        painted = (image == np.array(ds.COLOURS[obj.colour], np.uint8)).all(-1)
        np.testing.assert_array_equal(masks[obj.colour], painted)
    assert object_masks(np.full((64, 64, 3), ds.BACKGROUND, np.uint8)) == {}


def _sweep(maps: np.ndarray, tokens: list[str], prompt: str, image: np.ndarray) -> xr.Dataset:
    steps, layers = maps.shape[:2]
    return xr.Dataset(
        {"maps": (("schedule", "sample", "step", "layer", "token", "y", "x"), maps[None, None]),
         "image": (("schedule", "sample", "image_y", "image_x", "channel"), image[None, None])},
        coords={"schedule": ["none"], "step": np.arange(steps), "layer": [f"l{i}" for i in range(layers)],
                "prompt": ("sample", [prompt]), "token_text": (("sample", "token"), [tokens])},
    )


def test_word_attention_against_a_loop() -> None:
    word_attention = runpy.run_path(str(ROOT / "analysis" / "shapes_study.py"), run_name="not_main")["word_attention"]
    prompt = "a red circle to the left of a blue triangle"
    # CLIP-style and T5-style copies of the prompt: every word appears at two positions.
    words = prompt.split()
    tokens = [f"{w}</w>" for w in words] + [f"\u2581{w}" for w in words]
    rng = np.random.default_rng(0)
    maps = rng.uniform(size=(3, 2, len(tokens), 16, 16))
    image = ds.render([A, B])
    rows = word_attention(_sweep(maps, tokens, prompt, image))
    assert [(r["object"], r["named"], r["drawn"], r["other_named"]) for r in rows] == [
        (0, "circle", "circle", "triangle"), (1, "triangle", "triangle", "circle")]
    for r, obj, other in zip(rows, (A, B), (B, A)):
        painted = (image == np.array(ds.COLOURS[obj.colour], np.uint8)).all(-1)
        cells = [(y, x) for y in range(16) for x in range(16) if painted[4 * y:4 * y + 4, 4 * x:4 * x + 4].sum() >= 8]
        assert cells
        for name, word in (("shape_own", obj.shape), ("shape_other", other.shape),
                           ("colour_own", obj.colour), ("colour_other", other.colour)):
            pos = [k for k, t in enumerate(tokens) if t.strip("\u2581").replace("</w>", "") == word]
            assert len(pos) == 2
            want = np.array([[np.mean([sum(maps[s, l, p, y, x] for p in pos) for y, x in cells]) for l in range(2)]
                             for s in range(3)])
            np.testing.assert_allclose(r[name], want, rtol=1e-12)


def test_word_attention_same_shapes_and_missing_objects() -> None:
    word_attention = runpy.run_path(str(ROOT / "analysis" / "shapes_study.py"), run_name="not_main")["word_attention"]
    prompt = "a red circle above a blue circle"
    tokens = [f"{w}</w>" for w in prompt.split()]
    maps = np.ones((1, 1, len(tokens), 16, 16))
    # only the red object is drawn: the blue one has no region and is left out
    rows = word_attention(_sweep(maps, tokens, prompt, ds.render([A])))
    assert len(rows) == 1 and rows[0]["object"] == 0
    assert np.isnan(rows[0]["shape_other"]).all()
    np.testing.assert_allclose(rows[0]["shape_own"], 2.0)  # "circle" twice in the prompt, map 1 everywhere
    np.testing.assert_allclose(rows[0]["colour_own"], 1.0)


def test_shape_errors_counts_by_hand() -> None:
    shape_errors = runpy.run_path(str(ROOT / "analysis" / "shapes_study.py"), run_name="not_main")["shape_errors"]

    def rec(prompt: str, *drawn: tuple[str, str]) -> dict:
        return {"prompt": prompt, "objects": [{"colour": c, "shape": s} for c, s in drawn]}

    p = "a red circle to the left of a blue square"
    records = [
        rec(p, ("red", "circle"), ("blue", "square")),      # both right
        rec(p, ("red", "square"), ("blue", "circle")),      # swapped: two "other"
        rec(p, ("red", "circle"), ("blue", "circle")),      # both circles: one right, one "other"
        rec(p, ("red", "triangle")),                         # third shape; blue missing
        rec(p, ("red", "irregular"), ("blue", "square")),   # none; right
        rec("a red circle above a blue circle", ("red", "square"), ("blue", "circle")),  # same shapes: skipped
        rec("a green circle", ("green", "circle")),
        rec("a green circle", ("green", "square")),
        rec("a green circle"),
    ]
    got = shape_errors(records)
    assert got["objects"] == 10 and got["images"] == 5
    assert got["object_fractions"] == {"own": 0.4, "other": 0.3, "third": 0.1, "none": 0.2}
    assert got["image_fractions"] == {"swapped": 0.2, "both_one_named_shape": 0.2}
    assert got["one_object_drawn"] == {"a green circle": {"circle": 1, "square": 1, "missing": 1}}


def test_binding_refuses_bad_seeds_and_steps_in_one_line(tmp_path, capsys) -> None:
    main = runpy.run_path(str(ROOT / "analysis" / "shapes_study.py"), run_name="not_main")["main"]
    for flag, value in (("--seeds", "0-x"), ("--steps", "3-1")):
        with pytest.raises(SystemExit) as exc:
            main(["--results", str(tmp_path), "binding", flag, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert flag in err[-1] and value in err[-1] and "Traceback" not in "".join(err)
    assert not any(tmp_path.iterdir())  # nothing recorded
