"""The shapes testbed: dataset, exact evaluator, shipped trained model, training script, eval CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import types
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from taca_probe import models
from taca_probe.errors import ModelError, ScheduleError, TacaProbeError
from taca_probe.shapes import dataset as ds
from taca_probe.shapes import evaluator as ev


def one_line(exc: BaseException, *fragments: str) -> None:
    text = str(exc)
    assert isinstance(exc, TacaProbeError)
    assert text and "\n" not in text, repr(text)
    for f in fragments:
        assert f in text, f"{f!r} not in {text!r}"


def ground_truth(prompts: list[ds.PromptSpec], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [ds.render(ds.scene_for_prompt(p, rng)) for p in prompts]


ALL_PROMPTS = ds.held_out_prompts() + ds.training_prompts()


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_the_seed() -> None:
    a_img, a_cap = ds.sample_batch((3, 7), 16)
    b_img, b_cap = ds.sample_batch((3, 7), 16)
    c_img, _ = ds.sample_batch((3, 8), 16)
    assert a_img.shape == (16, 64, 64, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)
    # Captions are in the grammar and describe what was drawn.
    for img, cap in zip(a_img, a_cap):
        assert ev.score_prompt(cap, img).scores["colour"] == 1.0


def test_held_out_split_is_fixed_and_never_trained() -> None:
    held = ds.held_out_prompts()
    assert held == ds.held_out_prompts()  # deterministic
    train = {p.text for p in ds.training_prompts()}
    assert not train & {p.text for p in held}
    assert len(ds.held_out_prompts("one")) == len(ds.HELD_OUT_OBJECTS)
    two = ds.held_out_prompts("two")
    assert {p.relation for p in two} == set(ds.RELATIONS)
    # Held-out objects appear in no training caption at all, but each colour and shape does.
    trained_objects = {o for p in ds.training_prompts() for o in p.objects}
    assert not trained_objects & set(ds.HELD_OUT_OBJECTS)
    assert {c for c, _ in trained_objects} == set(ds.COLOURS)
    assert {s for _, s in trained_objects} == set(ds.SHAPES)
    # No layout of a held-out pair on its axis is trained (no memorised layout to fall back on),
    # but the pair is seen on the other axis.
    axis_of = {"to the left of": 0, "to the right of": 0, "above": 1, "below": 1}
    trained_pairs = {(frozenset(p.objects), axis_of[p.relation]) for p in ds.training_prompts() if p.relation}
    for p in two:
        assert (frozenset(p.objects), axis_of[p.relation]) not in trained_pairs
        assert (frozenset(p.objects), 1 - axis_of[p.relation]) in trained_pairs
    # Many training batches never show a held-out caption.
    _, captions = ds.sample_batch(0, 512)
    assert not set(captions) & {p.text for p in held}


def test_prompt_grammar() -> None:
    spec = ds.parse_prompt("  A Red circle to the left of a blue   square ")
    assert spec.objects == (("red", "circle"), ("blue", "square")) and spec.relation == "to the left of"
    assert spec.text == "a red circle to the left of a blue square"
    assert ds.parse_prompt("a yellow triangle").relation is None
    for bad, fragment in [
        ("a purple circle", "unknown colour"),
        ("a red hexagon", "unknown shape"),
        ("a red circle near a blue square", "grammar"),
        ("a red circle above a red square", "different colours"),
    ]:
        with pytest.raises(ds.DatasetError) as excinfo:
            ds.parse_prompt(bad)
        one_line(excinfo.value, fragment)


# ---------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    out = np.stack([ndimage.gaussian_filter(img[..., c].astype(float), sigma) for c in range(3)], -1)
    return np.clip(out, 0, 255).astype(np.uint8)


def _ragged(img: np.ndarray, rng: np.random.Generator, p: float = 0.4) -> np.ndarray:
    """Flip a fraction p of the pixels in a 2-px band around every object edge (generated edges are ragged)."""
    inside = np.any(img != np.array(ds.BACKGROUND, np.uint8), axis=-1)
    band = ndimage.binary_dilation(inside, iterations=1) ^ ndimage.binary_erosion(inside, iterations=1)
    flip = band & (rng.random(inside.shape) < p)
    # Outside pixels take the colour of the nearest object pixel; inside pixels become background.
    _, (iy, ix) = ndimage.distance_transform_edt(~inside, return_indices=True)
    out = img.copy()
    out[flip & ~inside] = img[iy, ix][flip & ~inside]
    out[flip & inside] = ds.BACKGROUND
    return out


# one perturbation in the fast lane; the others run in the full suite
@pytest.mark.parametrize("perturb", ["none", *(pytest.param(p, marks=pytest.mark.slow) for p in ("blur", "noise", "ragged"))])
def test_evaluator_scores_ground_truth_perfectly(perturb: str) -> None:
    images = ground_truth(ALL_PROMPTS, seed=1)
    if perturb == "blur":  # generated images are soft-edged
        images = [_blur(im, 1.0) for im in images]
    elif perturb == "ragged":
        rng = np.random.default_rng(0)
        images = [_blur(_ragged(im, rng), 0.7) for im in images]
    elif perturb == "noise":
        rng = np.random.default_rng(0)
        images = [np.clip(im + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8) for im in images]
    agg = ev.aggregate(ev.evaluate_images(ALL_PROMPTS, images), n_boot=200)
    assert set(agg) == set(ev.CATEGORIES)
    for cat, score in agg.items():
        assert score.mean >= 0.98, (cat, score)


def _wrong(prompt: ds.PromptSpec, rng: np.random.Generator, how: str) -> np.ndarray:
    scene = ds.scene_for_prompt(prompt, rng)
    objs = list(scene.objects)
    if how == "colour":  # every object gets a colour the prompt does not name
        unused = [c for c in ds.COLOURS if c not in {c for c, _ in prompt.objects}]
        objs = [ds.ObjectSpec(unused[i], o.shape, o.cx, o.cy, o.size) for i, o in enumerate(objs)]
    elif how == "shape":  # every object gets a shape the prompt does not name
        unused = [s for s in ds.SHAPES if s not in {s for _, s in prompt.objects}]
        objs = [ds.ObjectSpec(o.colour, unused[i % len(unused)], o.cx, o.cy, o.size) for i, o in enumerate(objs)]
    elif how == "swap":  # the two objects trade places: the relation is reversed
        a, b = objs
        objs = [ds.ObjectSpec(a.colour, a.shape, b.cx, b.cy, a.size), ds.ObjectSpec(b.colour, b.shape, a.cx, a.cy, b.size)]
    elif how == "bind":  # the two objects trade shapes: colours and shapes present, binding wrong
        a, b = objs
        objs = [ds.ObjectSpec(a.colour, b.shape, a.cx, a.cy, a.size), ds.ObjectSpec(b.colour, a.shape, b.cx, b.cy, b.size)]
    return ds.render(objs)


@pytest.mark.parametrize(
    ("how", "low", "high"),
    [
        # the subtlest error (binding) in the fast lane, the others in the full suite
        pytest.param("colour", ["one.colour", "two.colour", "one.binding", "two.binding", "two.spatial"],
                     ["one.shape", "two.shape"], marks=pytest.mark.slow),
        pytest.param("shape", ["one.shape", "two.shape", "one.binding", "two.binding"],
                     ["one.colour", "two.colour", "two.spatial"], marks=pytest.mark.slow),
        pytest.param("swap", ["two.spatial"], ["two.colour", "two.shape", "two.binding"], marks=pytest.mark.slow),
        ("bind", ["two.binding"], ["two.colour", "two.shape", "two.spatial"]),
    ],
)
def test_evaluator_scores_wrong_images_low(how: str, low: list[str], high: list[str]) -> None:
    rng = np.random.default_rng(2)
    prompts = ALL_PROMPTS if how in ("colour", "shape") else [p for p in ALL_PROMPTS if p.relation]
    if how == "bind":  # only pairs with two different shapes can be mis-bound
        prompts = [p for p in prompts if p.objects[0][1] != p.objects[1][1]]
    images = [_wrong(p, rng, how) for p in prompts]
    agg = ev.aggregate(ev.evaluate_images(prompts, images), n_boot=200)
    for cat in low:
        assert agg[cat].mean <= 0.02, (cat, agg[cat])
    for cat in high:
        assert agg[cat].mean >= 0.98, (cat, agg[cat])


def test_evaluator_blank_and_bad_inputs() -> None:
    blank = np.full((64, 64, 3), ds.BACKGROUND, np.uint8)
    s = ev.score_prompt("a red circle above a blue square", blank)
    assert s.objects == [] and s.scores == {"colour": 0.0, "shape": 0.0, "binding": 0.0, "spatial": 0.0}
    # Float images in [0, 1] are accepted (pipelines with output_type="np").
    img = ground_truth([ds.parse_prompt("a blue circle")])[0]
    assert ev.score_prompt("a blue circle", img / 255.0).scores["binding"] == 1.0
    with pytest.raises(ds.DatasetError) as excinfo:
        ev.evaluate_images(["a red circle"], [])
    one_line(excinfo.value, "1 prompts but 0 images")
    with pytest.raises(ds.DatasetError):
        ev.score_prompt("a red circle", np.zeros((64, 64)))


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.float64])
def test_evaluator_refuses_pixels_it_would_misread(dtype) -> None:
    """0-255 pixels as another dtype were read as [0, 1] floats and scored 0 in silence: now one line naming them."""
    img = ground_truth([ds.parse_prompt("a blue circle")])[0]
    assert ev.score_prompt("a blue circle", img).scores["binding"] == 1.0
    with pytest.raises(ds.DatasetError) as excinfo:
        ev.score_prompt("a blue circle", img.astype(dtype))
    one_line(excinfo.value, np.dtype(dtype).name)
    with pytest.raises(ds.DatasetError):
        ev.score_prompt("a blue circle", np.zeros((0, 0, 3), np.uint8))


def test_aggregate_intervals_are_seeded_and_bracket_the_mean() -> None:
    rng = np.random.default_rng(3)
    prompts = ds.held_out_prompts("two")
    images = [_wrong(p, rng, "swap") if i % 3 == 0 else ground_truth([p], i)[0] for i, p in enumerate(prompts)]
    res = ev.evaluate_images(prompts, images)
    a, b = ev.aggregate(res, seed=5), ev.aggregate(res, seed=5)
    assert a == b
    sp = a["two.spatial"]
    assert sp.low < sp.mean < sp.high and sp.n_images == len(prompts)
    assert 0.0 < ev.chance_levels()["two.binding"] < ev.chance_levels()["two.spatial"] < 0.5


def test_paired_difference() -> None:
    rng = np.random.default_rng(4)
    prompts = ds.held_out_prompts("two")
    good = ev.evaluate_images(prompts, ground_truth(prompts, 1))
    swapped = ev.evaluate_images(prompts, [_wrong(p, rng, "swap") for p in prompts])
    d = ev.paired_difference(good, swapped, n_boot=100)
    assert d["two.spatial"].mean == -1.0 and d["two.colour"].mean == 0.0
    assert ev.paired_difference(good, good)["two.binding"].high == 0.0
    with pytest.raises(ds.DatasetError):
        ev.paired_difference(good, swapped[::-1])


# ---------------------------------------------------------------------------------------------
# The shipped model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_pipe():
    pipe = models.load_pipeline("shapes", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_is_registered_and_offline(monkeypatch: pytest.MonkeyPatch, shapes_pipe) -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.DEFAULT_MODEL == "shapes" and "shapes" in models.EMBEDDED_MODELS
    path = models.embedded_model_path("shapes")
    assert (path / "model_index.json").is_file() and (path / "manifest.json").is_file()
    # Shipped inside the package, not built into the cache.
    assert Path(ds.__file__).parent in path.parents
    assert type(shapes_pipe) is StableDiffusion3Pipeline
    assert isinstance(shapes_pipe.transformer, SD3Transformer2DModel)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tokens"]["image"] >= 4 * manifest["tokens"]["text"]  # the paper's imbalance
    assert manifest["scores"], "the manifest records the evaluator scores"


def test_call_defaults() -> None:
    d = models.model_call_defaults("shapes")
    assert d["height"] == d["width"] == 64 and d["max_sequence_length"] == 16
    assert d["num_inference_steps"] > 0 and d["guidance_scale"] > 1
    assert models.model_call_defaults("tiny-sd3") == {}
    assert models.model_call_defaults("no/such-model") == {}
    d["height"] = 1  # a copy
    assert models.model_call_defaults("shapes")["height"] == 64


def test_call_defaults_of_a_loaded_pipeline(shapes_pipe) -> None:
    assert models.model_call_defaults(shapes_pipe) == models.model_call_defaults("shapes")


def test_missing_weights_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.SHIPPED_MODELS, "shapes", ("taca_probe.shapes", "no-such-weights"))
    for call in (lambda: models.load_pipeline("shapes", device="cpu"), lambda: models.model_call_defaults("shapes")):
        with pytest.raises(ModelError) as excinfo:
            call()
        one_line(excinfo.value, "'shapes'", "no weights", "taca_probe.shapes.train")


@pytest.mark.slow  # samples or trains the shapes model
def test_shipped_model_generates_and_taca_applies(shapes_pipe) -> None:
    import torch

    from taca_probe import taca

    call = dict(models.model_call_defaults("shapes"), num_inference_steps=3)
    prompt = "a red circle to the left of a blue square"

    def run(schedule: str) -> np.ndarray:
        with taca(shapes_pipe, schedule) as handle:
            img = shapes_pipe(prompt, generator=torch.Generator("cpu").manual_seed(0), output_type="np", **call).images[0]
        assert handle.calls[0].n_txt == 32
        return img

    base, again, boosted = run("none"), run("none"), run("step:1.2@970")
    assert base.shape == (64, 64, 3)
    assert np.array_equal(base, again)
    assert not np.allclose(base, boosted)  # the first step (t = 1000) is scaled


@pytest.mark.slow  # samples or trains the shapes model
def test_shipped_model_follows_seen_prompts(shapes_pipe) -> None:
    """A quality floor on training (seen) one-object prompts at the model's own settings."""
    from taca_probe.shapes.benchmark import generate_images

    prompts = [p.text for p in ds.training_prompts() if p.relation is None][:4]
    p_list, _, images = generate_images(shapes_pipe, prompts, [0, 1])
    agg = ev.aggregate(ev.evaluate_images(p_list, images), n_boot=50)
    assert agg["one.colour"].mean >= 0.75


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

TINY = {
    "steps": 30, "batch_size": 4, "num_layers": 1, "num_heads": 1, "head_dim": 16, "clip_hidden": 8, "t5_dim": 32, "t5_layers": 1,
    "clip_layers": 1, "vae_channels": 8, "vae_steps": 2, "vae_batch_size": 2, "warmup_steps": 5, "lr": 3e-3, "bf16": False,
    "log_every": 10, "num_inference_steps": 2,
}


@pytest.mark.slow  # samples or trains the shapes model
def test_training_smoke_lowers_the_loss_resumes_and_exports(tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusion3Pipeline

    from taca_probe.shapes.train import TrainConfig, TrainError, train

    lines: list[str] = []
    with torch.random.fork_rng(devices=[]):
        first = train(TrainConfig(**TINY), tmp_path, export=False, log=lines.append)
    losses = first["losses"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    assert any(line.startswith("step 30/30") for line in lines)
    # Seeded: a second run in another folder sees the same batches and gets the same losses, also
    # when worker processes make the batches ahead.
    again = train(TrainConfig(**TINY), tmp_path / "again", export=False, workers=2, log=lambda _: None)
    assert again["losses"] == losses

    with pytest.raises(TrainError) as excinfo:  # refuses to overwrite a run
        train(TrainConfig(**TINY), tmp_path)
    one_line(excinfo.value, "--resume")
    with pytest.raises(TrainError) as excinfo:
        train(TrainConfig(**TINY), tmp_path / "nothing", resume=True)
    one_line(excinfo.value, "no checkpoint")

    more = train(TrainConfig(**dict(TINY, steps=34)), tmp_path, resume=True, log=lines.append)
    assert more["step"] == 34 and len(more["losses"]) == 4
    folder = more["pipeline"]
    assert (folder / "call_defaults.json").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["steps_done"] == 34 and manifest["training"]["num_layers"] == 1
    assert models.model_call_defaults(folder)["max_sequence_length"] == TINY.get("t5_length", 16)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)  # weights are stored in fp16
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, output_type="np", **{
        k: v for k, v in models.model_call_defaults(folder).items() if k != "num_inference_steps"
    })
    assert out.images.shape == (1, 64, 64, 3)


@pytest.mark.slow  # trains three times
def test_training_warm_start_and_shortened_schedule(tmp_path: Path) -> None:
    """--init-from starts from an export's weights; --resume --steps may shorten the schedule."""
    from taca_probe.shapes.train import TrainConfig, TrainError, _lr_factor, train

    first = train(TrainConfig(**TINY), tmp_path / "a", log=lambda _: None)
    # Exporting the checkpoint afterwards gives the trainer's own export (the EMA weights).
    from safetensors.torch import load_file

    from taca_probe.shapes.train import export_checkpoint

    again = export_checkpoint(tmp_path / "a", tmp_path / "x")
    for name in ("transformer", "text_encoder_3"):
        (f1,), (f2,) = sorted((first["pipeline"] / name).glob("*.safetensors")), sorted((again / name).glob("*.safetensors"))
        w1, w2 = load_file(f1), load_file(f2)
        assert w1.keys() == w2.keys() and all(np.array_equal(w1[k].numpy(), w2[k].numpy()) for k in w1)
    fresh_start = np.mean(first["losses"][:4])
    end = np.mean(first["losses"][-8:])
    # A warm start at a tiny learning rate continues from the trained weights: its first losses are
    # those of the end of the first run, not of a fresh initialisation.
    warm_cfg = TrainConfig(**dict(TINY, steps=6, lr=1e-7, init_from=str(first["pipeline"])))
    warm = train(warm_cfg, tmp_path / "b", log=lambda _: None)
    assert np.mean(warm["losses"][:4]) < 0.5 * (fresh_start + end)
    assert abs(np.mean(warm["losses"]) - end) < 0.5 * (fresh_start - end)
    assert warm["vae_step"] == TINY["vae_steps"]  # the VAE came with the weights
    manifest = json.loads((warm["pipeline"] / "manifest.json").read_text())
    assert manifest["init"]["steps_done"] == 30 and manifest["steps_done"] == 6
    assert manifest["total_steps"] == 36
    assert manifest["total_wall_s"] >= manifest["train_wall_s"]

    # The architecture must match.
    with pytest.raises(TrainError) as excinfo:
        train(TrainConfig(**dict(TINY, num_layers=2, init_from=str(first["pipeline"]))), tmp_path / "c",
              log=lambda _: None)
    one_line(excinfo.value, "does not fit")
    with pytest.raises(TrainError) as excinfo:
        train(TrainConfig(**dict(TINY, init_from=str(tmp_path))), tmp_path / "d", log=lambda _: None)
    one_line(excinfo.value, "not a pipeline folder")

    # Resuming with a shorter schedule: the learning rate follows the new length from the current
    # step and the run stops there.
    more = train(TrainConfig(**TINY), tmp_path / "a", resume=True, steps=32, export=False, log=lambda _: None)
    assert more["step"] == 32 and len(more["losses"]) == 2
    cfg = TrainConfig(**dict(TINY, steps=32))
    assert _lr_factor(31, cfg) == pytest.approx(cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (
        1 + np.cos(np.pi * (31 - cfg.warmup_steps) / (32 - cfg.warmup_steps))))


@pytest.mark.slow  # trains a few steps
def test_training_cli_resume_keeps_the_checkpoints_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--resume`` without ``--steps`` keeps the checkpoint's schedule (help, README): a finished run stays finished."""
    import torch

    from taca_probe.shapes.train import TrainConfig, main, train

    train(TrainConfig(**dict(TINY, steps=3)), tmp_path, export=False, log=lambda _: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert main(["--out", str(tmp_path), "--resume", "--minutes", "0.5"]) == 0
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert payload["state"]["step"] == 3 and payload["config"]["steps"] == 3


@pytest.mark.slow  # trains for a few seconds
def test_training_fits_the_schedule_to_the_time_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--fit-steps: the cosine is set from the measured rate so that it ends within --minutes."""
    import torch

    from taca_probe.shapes import train as train_module
    from taca_probe.shapes.train import TrainConfig, TrainError, train

    with pytest.raises(TrainError) as excinfo:
        train(TrainConfig(**TINY), tmp_path / "a", fit_steps=True, log=lambda _: None)
    one_line(excinfo.value, "--minutes")
    # A clock that advances 0.07 s per reading (the loop reads it twice a step): the budget, the
    # measured rate and so the fitted length are then the same on any machine and under any load
    # (with the real clock, a loaded CPU did not reach step 100 within the 18 s budget).
    ticks = itertools.count()
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: 0.07 * next(ticks)))
    lines: list[str] = []
    run = train(TrainConfig(**dict(TINY, steps=10**6, log_every=1000)), tmp_path / "b", minutes=0.3, fit_steps=True,
                export=False, log=lines.append)
    fitted = [line for line in lines if "schedule fitted" in line]
    assert len(fitted) == 1
    steps = int(fitted[0].split(", ")[-1].split()[0])
    assert 100 < steps < 10**6
    # At a steady rate the fitted cosine ends with the budget (the fit keeps 3 % of what is left in hand),
    # and the checkpoint holds the fitted length (a resume continues the same cosine).
    assert run["step"] == steps
    assert run["elapsed"] == pytest.approx(18, abs=0.5)
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert saved["config"]["steps"] == steps


@pytest.mark.parametrize(("argv", "flag"), [
    (["--lr", "inf"], "--lr"), (["--guidance-scale", "inf"], "--guidance-scale"), (["--minutes", "nan"], "--minutes"),
    (["--minutes", "inf", "--fit-steps"], "--minutes"), (["--checkpoint-minutes", "nan"], "--checkpoint-minutes"),
    (["--seed", "-1"], "--seed"), (["--workers", "-1"], "--workers"), (["--clip-hidden", "3"], "clip_hidden"),
    (["--head-dim", "2"], "head_dim"), (["--t5-dim", "8", "--clip-hidden", "4"], "t5_dim"),
])
def test_training_refuses_bad_configs_in_one_line(argv, flag, tmp_path, monkeypatch, capsys) -> None:
    """Refused before the first batch with exit 2 and one line naming the setting (not a traceback, not a run)."""
    import torch

    from taca_probe.shapes import train as tr

    def no_training(*args, **kwargs):
        raise AssertionError("the bad config reached training")

    monkeypatch.setattr(tr, "_Batches", no_training)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert tr.main(["--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and flag in err, err


@pytest.mark.parametrize("content", [b"junk", "missing keys"])
def test_training_export_only_refuses_a_bad_checkpoint_in_one_line(content, tmp_path, monkeypatch, capsys) -> None:
    """--export-only reads the checkpoint as --resume does: a bad one is one line naming it, not a traceback."""
    import torch

    from taca_probe.shapes import train as tr

    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(content) if isinstance(content, bytes) else torch.save({"config": {}}, ckpt)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert tr.main(["--out", str(tmp_path), "--export-only", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(ckpt) in err, err


def test_training_tokenizers_are_the_shipped_ones() -> None:
    """train.py builds (without the package's model registry) exactly the shipped tokenizers."""
    from transformers import CLIPTokenizer, T5Tokenizer

    from taca_probe.shapes.tokenizers import clip_tokenizer as _clip_tokenizer, t5_tokenizer as _t5_tokenizer

    weights = models.embedded_model_path("shapes")
    shipped_clip = CLIPTokenizer.from_pretrained(weights / "tokenizer")
    shipped_t5 = T5Tokenizer.from_pretrained(weights / "tokenizer_3")
    clip, t5 = _clip_tokenizer(16), _t5_tokenizer(16)
    assert clip.get_vocab() == shipped_clip.get_vocab()
    for p in ALL_PROMPTS[:: max(1, len(ALL_PROMPTS) // 50)]:
        ids = clip(p.text).input_ids
        assert ids == shipped_clip(p.text).input_ids
        assert len(ids) == len(p.text.split()) + 2  # one token per caption word, plus BOS/EOS
        assert t5(p.text).input_ids == shipped_t5(p.text).input_ids
        assert len(t5(p.text).input_ids) == len(p.text.split()) + 1


# ---------------------------------------------------------------------------------------------
# taca-probe eval
# ---------------------------------------------------------------------------------------------


def _eval_args(*argv: str) -> argparse.Namespace:
    from taca_probe.cli.args import _Parser
    from taca_probe.cli.eval import add_parser as add_eval_parser

    parser = _Parser(prog="taca-probe")
    add_eval_parser(parser.add_subparsers(dest="command", parser_class=_Parser))
    return parser.parse_args(["eval", *argv])


@pytest.mark.slow  # samples or trains the shapes model
def test_eval_cli_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    args = _eval_args("--prompt", "a red triangle", "--prompt", "a green square below a red circle", "--seeds", "0-1",
                      "--steps", "2", "--schedule", "none", "--schedule", "step:1.2@970", "--device", "cpu",
                      "--n-resamples", "100", "--json", str(out))
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "two.spatial" in table and "step:1.2@970" in table and "chance" in table
    result = json.loads(out.read_text())
    assert set(result["schedules"]) == {"none", "step:1.2@970"}
    agg = result["schedules"]["none"]["aggregate"]
    assert agg["one.colour"]["n_images"] == 2 and agg["two.spatial"]["n_prompts"] == 1
    assert result["call"]["max_sequence_length"] == 16 and result["call"]["num_inference_steps"] == 2
    assert result["schedules"]["step:1.2@970"]["difference"]["versus"] == "none"
    assert "step:1.2@970 - none" in table


@pytest.mark.parametrize(
    ("argv", "error", "fragment"),
    [
        (["--schedule", "step:1.2@97O"], ScheduleError, "97O"),
        (["--prompt", "a purple circle"], ds.DatasetError, "unknown colour"),
        (["--model", "/no/such/folder"], ModelError, "/no/such/folder"),
        (["--json", "/no/such/dir/x.json"], TacaProbeError, "does not exist"),
    ],
)
def test_eval_cli_bad_input(argv: list[str], error: type, fragment: str) -> None:
    args = _eval_args(*argv, "--seeds", "0", "--steps", "1", "--device", "cpu")
    with pytest.raises(error) as excinfo:
        args.func(args)
    one_line(excinfo.value, fragment)


def test_eval_cli_bad_arguments() -> None:
    for argv in (["--seeds", "x"], ["--prompt-set", "three"], ["--batch-size", "0"]):
        with pytest.raises(TacaProbeError) as excinfo:
            _eval_args(*argv)
        one_line(excinfo.value)


def _fake_eval(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], list[int]]]:
    """Make ``cmd_eval`` score ground-truth images instead of loading and sampling the model; returns its calls."""
    from taca_probe.cli import eval as cli_eval

    calls: list[tuple[list[str], list[int]]] = []

    def run(pipe, schedules, *, prompts, seeds, **kwargs):
        calls.append((list(prompts), list(seeds)))
        plist = [p for p in prompts for _ in seeds]
        scores = ev.evaluate_images(plist, ground_truth([ds.parse_prompt(p) for p in plist]))
        return {"call": {}, "seeds": list(seeds), "prompts": list(prompts), "chance": ev.chance_levels(),
                "schedules": {s: {"aggregate": {k: vars(v) for k, v in ev.aggregate(scores, n_boot=20).items()}}
                              for s in schedules}}

    monkeypatch.setattr(cli_eval, "load_pipeline", lambda *a, **k: None)
    monkeypatch.setattr(cli_eval, "_estimate_seconds", lambda *a, **k: 1.0)
    monkeypatch.setattr(cli_eval, "run_benchmark", run)
    return calls


def test_eval_cli_json_to_stdout_is_the_json_alone(monkeypatch, capsys) -> None:
    """``--json`` without a path (or '-') writes only the JSON to stdout, as json_args documents: it parses."""
    _fake_eval(monkeypatch)
    args = _eval_args("--prompt", "a red square", "--json")
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == ["a red square"]


def test_eval_cli_samples_a_repeated_prompt_once(monkeypatch) -> None:
    """A prompt given twice (in any spelling the grammar accepts) is sampled once, as the README says."""
    calls = _fake_eval(monkeypatch)
    args = _eval_args("--prompt", "a red square", "--prompt", "A red  square.", "--prompt", "a blue circle",
                      "--seeds", "1,0,1")
    assert args.func(args) == 0
    assert calls == [(["a red square", "a blue circle"], [1, 0])]


def test_eval_cli_takes_prompt_or_prompt_set_not_both(monkeypatch) -> None:
    """--prompt-set two with --prompt ran the --prompt list alone, silently; the default set is every held-out prompt."""
    calls = _fake_eval(monkeypatch)
    args = _eval_args("--prompt", "a red square", "--prompt-set", "two")
    with pytest.raises(TacaProbeError) as excinfo:
        args.func(args)
    one_line(excinfo.value, "--prompt-set", "--prompt")
    args = _eval_args("--seeds", "0")
    assert args.func(args) == 0
    assert calls == [([p.text for p in ds.held_out_prompts("all")], [0])]


def test_eval_cli_refuses_save_images_into_a_file_before_loading(tmp_path, monkeypatch) -> None:
    from taca_probe.cli import eval as cli_eval

    _fake_eval(monkeypatch)
    monkeypatch.setattr(cli_eval, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "f").write_text("x")
    args = _eval_args("--prompt", "a red square", "--save-images", str(tmp_path / "f"))
    with pytest.raises(TacaProbeError) as excinfo:
        args.func(args)
    one_line(excinfo.value, "--save-images")


def test_benchmark_saves_long_and_slug_alike_schedules_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--save-images: a long table spec (a folder name past 255 bytes) failed after sampling; specs that slug
    alike shared a folder. Every schedule now has its own folder with all of its images."""
    from PIL import Image

    from taca_probe.shapes import benchmark as bm

    def generate(pipe, prompts, seeds, **kwargs):
        plan = [(p, s) for p in prompts for s in seeds]
        images = [Image.fromarray(im) for im in ground_truth([ds.parse_prompt(p) for p, _ in plan])]
        return [p for p, _ in plan], [s for _, s in plan], images

    monkeypatch.setattr(bm, "generate_images", generate)
    monkeypatch.setattr(bm, "_call_settings", lambda pipe, call: {})
    specs = ["table:" + ",".join(f"{t}=1.1" for t in range(1000, 400, -10)), "const:1.1;layers=x*", "const:1.1;layers=x?"]
    bm.run_benchmark(None, specs, prompts=["a red square"], seeds=[0, 1], n_boot=10, save_images=tmp_path)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 3 and all(len(list(f.glob("*.png"))) == 2 for f in folders)


def test_eval_eta_times_batches_as_large_as_the_run(monkeypatch) -> None:
    """The ETA times a batch of min(batch size, images) images: 1 prompt x 40 seeds runs as 3 batches of 16."""
    from taca_probe.cli import eval as cli_eval

    clock = [0.0]
    cost = {"fixed": 0.5, "image_step": 0.01}  # seconds a call, and per image and step

    class Pipe:
        def set_progress_bar_config(self, **kwargs):
            pass

        def __call__(self, prompts, num_inference_steps, **kwargs):
            clock[0] += cost["fixed"] + cost["image_step"] * len(prompts) * num_inference_steps

    monkeypatch.setattr(cli_eval, "_call_settings", lambda pipe, call: {"num_inference_steps": 25})
    monkeypatch.setattr(cli_eval.time, "perf_counter", lambda: clock[0])
    eta = cli_eval._estimate_seconds(Pipe(), ["a red circle"], 40, {}, 16)
    assert eta == pytest.approx(3 * (cost["fixed"] + cost["image_step"] * 16 * 25))


@pytest.mark.parametrize(("seeds", "label"), [([0, 1, 2], "0..2"), ([3, 1, 2], "3,1,2"), ([0, 39], "0,39")])
def test_eval_table_names_the_seeds_it_ran(seeds: list[int], label: str) -> None:
    from taca_probe.shapes.benchmark import format_table

    scores = ev.evaluate_images(["a red square"], ground_truth([ds.parse_prompt("a red square")]))
    result = {"call": {}, "seeds": seeds, "prompts": ["a red square"], "chance": ev.chance_levels(),
              "schedules": {"none": {"aggregate": {k: vars(v) for k, v in ev.aggregate(scores).items()}}}}
    assert format_table(result).split("seeds ")[-1].replace("\n", "").replace(" ", "") == label


def test_aggregate_interval_is_a_prompt_cluster_bootstrap():
    """The interval resamples whole prompts: checked against an independent numpy cluster bootstrap."""
    rng = np.random.default_rng(3)
    p_true = rng.uniform(0.1, 0.9, size=20)  # prompts differ: clustering widens the interval
    results = [ev.PromptScore(f"p{i}", "two", {"binding": float(rng.random() < p)})
               for i, p in enumerate(p_true) for _ in range(6)]
    got = ev.aggregate(results, n_boot=4000, seed=0)["two.binding"]
    sums = np.array([sum(r.scores["binding"] for r in results if r.prompt == f"p{i}") for i in range(20)])
    idx = np.random.default_rng(1).integers(0, 20, size=(20000, 20))
    boot = sums[idx].sum(1) / (6 * 20)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert got.mean == pytest.approx(sums.sum() / 120, abs=1e-4)
    assert got.low == pytest.approx(lo, abs=0.015) and got.high == pytest.approx(hi, abs=0.015)
    assert got.n_images == 120 and got.n_prompts == 20
