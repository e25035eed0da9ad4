"""The probe: recorded statistics against an explicit-softmax recomputation on the same
activations, the store's contract, and robustness (refusal, resume after SIGKILL, schema checks)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from taca_probe.attention import JointLayout, attention_statistics, taca_attention
from taca_probe.cli import main
from taca_probe.errors import TacaProbeError
from taca_probe.intervention import taca
from taca_probe.models import load_pipeline
from taca_probe.runner import probe
from taca_probe.selection import MapSelection
from taca_probe.store import StoreError, open_run, store_info, verify_store
from tests.reference import ExplicitTacaSDPA, taca_probabilities, text_mask

pytestmark = pytest.mark.slow  # records through every embedded pipeline and statistics path

SIZE = {"height": 64, "width": 96}


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for name in ("tiny-sd3", "tiny-sd35", "tiny-flux"):
        pipe = load_pipeline(name, device="cpu", dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


def _reference_stats(p: torch.Tensor, n_txt: int, txt_first: bool):
    """Statistics from a full (B, H, S, S) probability matrix, float64."""
    is_txt = text_mask(p.shape[-1], n_txt, txt_first)
    p_vt = p[:, :, ~is_txt][..., is_txt]  # (B, H, N_vis, N_txt)
    return {
        "vis_txt_mass": p_vt.sum(-1).mean(-1),
        "vis_vis_mass": p[:, :, ~is_txt][..., ~is_txt].sum(-1).mean(-1),
        "txt_vis_mass": p[:, :, is_txt][..., ~is_txt].sum(-1).mean(-1),
        "token_mass": p_vt.mean(dim=(1, 2)),
        "maps": p_vt.mean(1),  # (B, N_vis, N_txt)
    }


@pytest.mark.parametrize("backend", ["fused", "block", "triton"])
def test_attention_statistics_match_the_reference(backend):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 60, 16, generator=g) * 2 for _ in range(2))
    v = torch.randn(2, 3, 60, 16, generator=g)
    for txt_first in (True, False):
        for gamma in (1.0, 1.3):
            layout = JointLayout(11, txt_first)
            _, parts = taca_attention(q, k, v, layout, gamma, with_parts=True)
            tokens = torch.tensor([0, 3, 10])
            stats = attention_statistics(q, k, layout, gamma, parts, map_tokens=tokens, block_bytes=1,  # 1 head a block
                                         backend=backend)
            ref = _reference_stats(taca_probabilities(q, k, 11, txt_first, gamma), 11, txt_first)
            ref1 = _reference_stats(taca_probabilities(q, k, 11, txt_first, 1.0), 11, txt_first)
            for name in ("vis_txt_mass", "txt_vis_mass", "token_mass"):
                assert (stats[name].double() - ref[name]).abs().max() <= 1e-5, name
            assert (stats["vis_txt_mass_ref"].double() - ref1["vis_txt_mass"]).abs().max() <= 1e-5
            assert (stats["maps"].double() - ref["maps"][..., tokens]).abs().max() <= 1e-5
            assert torch.allclose(stats["vis_txt_mass"].double() + ref["vis_vis_mass"], torch.ones(2, 3, dtype=torch.float64))


class _Inputs:
    """Keeps the inputs of every call of each site module (for the recomputation)."""

    def __init__(self, transformer, names):
        self.calls = {n: [] for n in names}
        self.handles = [
            transformer.get_submodule(n).register_forward_pre_hook(
                lambda mod, args, kwargs, n=n: self.calls[n].append((args, dict(kwargs))), with_kwargs=True)
            for n in names
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-sd35", "tiny-flux"])
@pytest.mark.parametrize("schedule,gammas", [("none", [1.0, 1.0, 1.0]), ("first:1.5@2", [1.5, 1.5, 1.0])])
@pytest.mark.parametrize("backend", ["block", "fused", "triton"])
def test_recorded_statistics_equal_explicit_recomputation(pipes, tmp_path, model, schedule, gammas, backend,
                                                          monkeypatch):
    monkeypatch.setenv("TACA_PROBE_STATS", backend)  # triton: through its interpreter (conftest)
    pipe = pipes[model]
    transformer = pipe.transformer
    stock = dict(transformer.attn_processors)
    store = tmp_path / "run.zarr"
    with probe(pipe, store, schedule=schedule, maps="steps=0,2;layers=all;tokens=all") as run:
        names = [s.name for s in run.sites]
        txt_first = run.sites[0].txt_first
        inputs = _Inputs(transformer, names)
        try:
            images = run.sample("a red cube on a blue table", seed=3, num_inference_steps=3, **SIZE)
        finally:
            inputs.remove()
    ds = open_run(store).isel(sample=0)
    assert ds.attrs["stats_backend"].split()[0] == backend  # the store names the path that computed it
    n_txt = ds.attrs["n_txt"]
    assert ds.sizes == {**ds.sizes, "step": 3, "layer": len(names)}
    assert list(ds["layer"].values) == names
    if model == "tiny-flux":
        assert set(ds["block_type"].values) == {"joint", "single"}
    np.testing.assert_array_equal(ds["gamma"].values, np.array(gammas)[:, None] * np.ones((1, len(names))))
    for li, name in enumerate(names):
        module = transformer.get_submodule(name)
        assert len(inputs.calls[name]) == 3  # one call per step here
        for step, (args, kwargs) in enumerate(inputs.calls[name]):
            gamma = gammas[step]
            probs = {}
            for g in {gamma, 1.0}:
                mode = ExplicitTacaSDPA(n_txt, txt_first, g)
                with torch.no_grad(), mode:
                    stock[f"{name}.processor"](module, *args, **kwargs)
                probs[g] = mode.probabilities[0]
            rows = slice(probs[gamma].shape[0] // 2, None) if probs[gamma].shape[0] == 2 else slice(None)  # SD3 CFG: cond half
            ref = _reference_stats(probs[gamma][rows], n_txt, txt_first)
            ref1 = _reference_stats(probs[1.0][rows], n_txt, txt_first)
            at = ds.isel(step=step, layer=li)
            np.testing.assert_allclose(at["vis_txt_mass"].values, ref["vis_txt_mass"][0].numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(at["txt_vis_mass"].values, ref["txt_vis_mass"][0].numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(at["vis_txt_mass_ref"].values, ref1["vis_txt_mass"][0].numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(at["token_mass"].values, ref["token_mass"][0].numpy(), atol=1e-5, rtol=0)
            # identities on the recorded values themselves
            np.testing.assert_allclose(at["vis_txt_mass"].values + ref["vis_vis_mass"][0].numpy(), 1.0, atol=1e-5)
            np.testing.assert_allclose(at["token_mass"].sum("token"), at["vis_txt_mass"].mean("head"), atol=1e-5)
            if step in (0, 2):  # maps recorded: head-mean probability per image token, on the latent grid
                m = at["maps"].values.astype(np.float64)  # (token, y, x)
                np.testing.assert_allclose(m.reshape(n_txt, -1).T, ref["maps"][0].numpy(), atol=2e-3, rtol=2e-3)
                np.testing.assert_allclose(m.mean(axis=(1, 2)), at["token_mass"].values, atol=1e-4, rtol=1e-2)
            else:
                assert np.isnan(at["maps"].values).all()
    # recording does not change the image
    with taca(pipe, schedule):
        plain = pipe("a red cube on a blue table", num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                     output_type="np", **SIZE).images[0]
    np.testing.assert_array_equal(ds["image"].values, (plain * 255).round().astype(np.uint8))
    assert np.asarray(images[0]).shape == (64, 96, 3)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_timestep_sigma_and_gamma_coordinates_follow_scheduler_and_schedule(pipes, tmp_path, model):
    pipe = pipes[model]
    seen = []

    def cb(p, i, t, kw):
        seen.append((float(t), float(p.scheduler.sigmas[i])))
        return kw

    with probe(pipe, tmp_path / "s.zarr", schedule="step:1.3@970;blocks=joint") as run:
        run.sample("a cat", seed=0, num_inference_steps=6, callback_on_step_end=cb, **SIZE)
    ds = open_run(tmp_path / "s.zarr").isel(sample=0)
    t = np.array([a for a, _ in seen])
    np.testing.assert_allclose(ds["timestep"].values, t, atol=1e-3)
    np.testing.assert_allclose(ds["sigma"].values, [b for _, b in seen], atol=1e-6)
    joint = (ds["block_type"] == "joint").values
    expected = np.where(t[:, None] >= 970 - 1e-3, np.where(joint[None, :], 1.3, 1.0), 1.0)
    np.testing.assert_array_equal(ds["gamma"].values, expected.astype(np.float32))
    assert 0 < (t >= 970).sum() < 6


def test_branches_sd3_batched_cfg(pipes, tmp_path):
    pipe = pipes["tiny-sd3"]
    for branch in ("cond", "uncond", "both"):
        with probe(pipe, tmp_path / f"{branch}.zarr", branch=branch) as run:
            run.sample("a cat", seed=0, num_inference_steps=2, guidance_scale=5.0, **SIZE)
    both = open_run(tmp_path / "both.zarr")
    assert list(both["branch"].values) == ["cond", "uncond"]
    for branch in ("cond", "uncond"):
        single = open_run(tmp_path / f"{branch}.zarr")
        np.testing.assert_array_equal(both["vis_txt_mass"].sel(branch=branch).values, single["vis_txt_mass"].values)
    assert not np.array_equal(both["vis_txt_mass"].sel(branch="cond").values,
                              both["vis_txt_mass"].sel(branch="uncond").values)


def test_uncond_branch_without_cfg_names_cfg_not_a_missing_call(pipes, tmp_path):
    """Audit: branch="uncond"/"both" without CFG said "the pipeline never called the transformer"; then
    branch="both" said no call was recorded for ('cond', 'uncond'), though the cond calls ran."""
    for model, no_cfg in (("tiny-sd3", {"guidance_scale": 1.0}), ("tiny-flux", {})):
        for branch in ("uncond", "both"):
            with pytest.raises(TacaProbeError, match="CFG") as info:
                with probe(pipes[model], tmp_path / "u.zarr", branch=branch) as run:
                    run.sample("a cat", seed=0, num_inference_steps=1, **no_cfg, **SIZE)
            msg = str(info.value)
            assert "never called" not in msg and not (tmp_path / "u.zarr").exists()
            assert "\n" not in msg and "uncond" in msg and "'cond', 'uncond'" not in msg  # uncond is what is missing


def test_a_partial_run_names_the_steps_it_ran_not_cfg(pipes, tmp_path):
    """Audit: img2img (strength < 1) under CFG with branch="uncond" was told that uncond needs CFG."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    i2i = StableDiffusion3Img2ImgPipeline(**pipes["tiny-sd3"].components)
    image = np.full((64, 96, 3), 0.5, np.float32)
    with pytest.raises(TacaProbeError, match=r"\b2-3\b") as info:  # 4 steps at strength 0.5: the last two ran
        with probe(i2i, tmp_path / "i.zarr", branch="uncond") as run:
            run.sample("a cat", seed=0, image=image, strength=0.5, num_inference_steps=4, guidance_scale=5.0, **SIZE)
    assert "CFG" not in str(info.value) and not (tmp_path / "i.zarr").exists()


def test_flux_true_cfg_knows_which_call_is_which(pipes, tmp_path):
    pipe = pipes["tiny-flux"]
    kw = {"num_inference_steps": 2, "true_cfg_scale": 3.0, "negative_prompt": "blurry", **SIZE}
    with probe(pipe, tmp_path / "both.zarr", branch="both") as run:
        run.sample("a cat", seed=0, **kw)
    with probe(pipe, tmp_path / "neg.zarr", branch="cond") as run:  # the cond call of a plain run
        run.sample("blurry", seed=0, num_inference_steps=2, **SIZE)
    both = open_run(tmp_path / "both.zarr")
    assert both.sizes["branch"] == 2
    # at step 0 the latents are identical, so the uncond call's statistics are those of "blurry"'s cond call
    np.testing.assert_allclose(both["vis_txt_mass"].sel(branch="uncond").isel(step=0).values,
                               open_run(tmp_path / "neg.zarr")["vis_txt_mass"].isel(step=0).values, atol=1e-6)


def test_num_images_per_prompt_appends_one_sample_each(pipes, tmp_path):
    pipe = pipes["tiny-sd3"]
    with probe(pipe, tmp_path / "n.zarr") as run:
        run.sample("a", seed=1, num_inference_steps=2, num_images_per_prompt=2, **SIZE)
        run.sample("b", seed=2, num_inference_steps=2, **SIZE)
    ds = open_run(tmp_path / "n.zarr")
    assert list(ds["prompt"].values) == ["a", "a", "b"]
    assert list(ds["seed"].values) == [1, 1, 2] and list(ds["batch_index"].values) == [0, 1, 0]
    assert not np.array_equal(ds["image"].values[0], ds["image"].values[1])


def test_sample_refuses_a_seed_the_cli_refuses(pipes, tmp_path):
    """Audit: seed=1.5 and seed=True were recorded as seed 1, seed=-1 as -1 (``--seeds`` refuses all three)."""
    pipe = pipes["tiny-sd3"]
    for seed in (1.5, True, -1, 2**64):
        with pytest.raises(TacaProbeError, match="seed"):
            with probe(pipe, tmp_path / "s.zarr") as run:
                run.sample("a", seed=seed, num_inference_steps=1, **SIZE)
        assert not (tmp_path / "s.zarr").exists()
    with probe(pipe, tmp_path / "s.zarr") as run:  # a numpy integer, e.g. from ds.seed.values, is fine
        run.sample("a", seed=np.int64(3), num_inference_steps=1, **SIZE)
    assert list(open_run(tmp_path / "s.zarr")["seed"].values) == [3]


def test_sample_refuses_what_it_sets_itself_and_a_closed_run(pipes, tmp_path):
    """Audit: generator= and output_type= were a TypeError printing the pipeline's config, num_images_per_prompt=0
    recorded nothing and returned [], and a Run used after its probe() block ran the stock pipeline, then
    blamed it for never calling the transformer."""
    pipe, kw = pipes["tiny-sd3"], {"num_inference_steps": 1, **SIZE}
    bad = [({"generator": torch.Generator().manual_seed(1)}, "generator"), ({"output_type": "pil"}, "output_type"),
           ({"num_images_per_prompt": 0}, "num_images_per_prompt"), ({"num_images_per_prompt": 1.0}, "num_images"),
           ({"return_dict": False}, "return_dict")]  # was an AttributeError: 'tuple' object has no attribute 'images'
    for extra, word in bad:
        with pytest.raises(TacaProbeError, match=word):
            with probe(pipe, tmp_path / "r.zarr") as run:
                run.sample("a", seed=0, **extra, **kw)
        assert not (tmp_path / "r.zarr").exists()
    with probe(pipe, tmp_path / "r.zarr") as run:
        run.sample("a", seed=0, **kw)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))  # the pipes are shared
    try:
        with pytest.raises(TacaProbeError, match="ended"):
            run.sample("a", seed=1, **kw)
    finally:
        hook.remove()
    assert not calls and open_run(tmp_path / "r.zarr").sizes["sample"] == 1


def test_a_dtype_change_inside_the_block_is_refused_not_mislabeled(tmp_path):
    """Audit: after pipe.to(bfloat16) inside probe() a bf16 sample went into a store labeled float32."""
    pipe = load_pipeline("tiny-sd3", device="cpu", dtype="fp32")  # its own: the cast is not undone exactly
    pipe.set_progress_bar_config(disable=True)
    with probe(pipe, tmp_path / "d.zarr") as run:
        run.sample("a cat", seed=0, num_inference_steps=1, **SIZE)
        pipe.to(torch.bfloat16)
        with pytest.raises(TacaProbeError, match="bfloat16"):
            run.sample("a cat", seed=1, num_inference_steps=1, **SIZE)
    ds = open_run(tmp_path / "d.zarr")
    assert ds.attrs["dtype"] == "float32" and ds["seed"].values.tolist() == [0]


def test_tokens_are_labeled(pipes, tmp_path):
    for model in ("tiny-sd3", "tiny-flux"):
        with probe(pipes[model], tmp_path / f"{model}.zarr") as run:
            run.sample("a red cube", seed=0, num_inference_steps=1, **SIZE)
        ds = open_run(tmp_path / f"{model}.zarr").isel(sample=0)
        texts = [str(t) for t in ds["token_text"].values]
        pad = ds["token_is_padding"].values
        src = list(ds["token_source"].values)
        if model == "tiny-sd3":
            assert src[:77] == ["clip"] * 77 and set(src[77:]) == {"t5"}
        else:
            assert set(src) == {"t5"}
        prompt_tokens = [t for t, p in zip(texts, pad) if not p]
        assert any("red" in t for t in prompt_tokens) and any("cube" in t for t in prompt_tokens)
        assert pad.sum() > len(pad) / 2  # most positions are padding


def test_maps_selection_parse_and_errors():
    sel = MapSelection.parse("steps=0-2,5;layers=transformer_blocks.*;tokens=prompt")
    assert sel.steps == (0, 1, 2, 5) and sel.layers == ("transformer_blocks.*",)
    assert sel.selects(1, "transformer_blocks.0.attn") and not sel.selects(3, "transformer_blocks.0.attn")
    assert not sel.selects(0, "single_transformer_blocks.0.attn")
    assert MapSelection.parse(sel.spec) == sel
    assert MapSelection.parse("none") is None
    for bad in ("steps=", "steps=3-1", "colour=red", "tokens=x", "steps=1;steps=2"):
        with pytest.raises(TacaProbeError, match="valid forms"):
            MapSelection.parse(bad)


def test_non_finite_statistic_is_reported_and_nothing_finished_is_lost(pipes, tmp_path):
    pipe = pipes["tiny-sd3"]
    store = tmp_path / "nan.zarr"
    with probe(pipe, store) as run:
        run.sample("good", seed=0, num_inference_steps=2, **SIZE)
        module = pipe.transformer.transformer_blocks[1].attn
        calls = []

        def poison(mod, args, kwargs):
            calls.append(1)
            if len(calls) == 2:  # the second step
                kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"] * float("nan")}
            return args, kwargs

        h = module.register_forward_pre_hook(poison, with_kwargs=True)
        try:
            with pytest.raises(TacaProbeError, match=r"non-finite vis_txt_mass .*'bad'.*step 1, layer transformer_blocks\.1\.attn"):
                run.sample("bad", seed=0, num_inference_steps=2, **SIZE)
        finally:
            h.remove()
    ds = open_run(store)
    assert list(ds["prompt"].values) == ["good"]


def test_non_finite_image_is_refused_before_the_cast(pipes, tmp_path, monkeypatch, recwarn):
    """Finite statistics but NaN pixels (the VAE overflowed): was a black image in the store, after a
    numpy cast warning; now refused, with no warning and no store."""
    pipe, store = pipes["tiny-sd3"], tmp_path / "nan.zarr"
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **kw: (decode(*a, **kw)[0] * float("nan"),))
    with probe(pipe, store) as run:
        with pytest.raises(TacaProbeError, match=r"non-finite image at sample 'bad' \(seed 0\)"):
            run.sample("bad", seed=0, num_inference_steps=1, **SIZE)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert not store.exists()


@pytest.mark.parametrize("bad", [None, 3, ["a.zarr"]])
def test_store_readers_refuse_what_is_not_a_path(bad):
    """Audit: open_run(None) raised TypeError ('expected str, bytes or os.PathLike object')."""

    for fn in (open_run, store_info, verify_store):
        with pytest.raises(StoreError, match=rf"{fn.__name__} needs the path .* got {type(bad).__name__}$"):
            fn(bad)


def test_open_run_rejects_foreign_and_newer_stores(tmp_path):
    import zarr

    with pytest.raises(StoreError, match="no store"):
        open_run(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a taca-probe store"):
        open_run(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(StoreError, match="not a taca-probe store"):
        open_run(tmp_path / "other.zarr")
    zarr.open_group(str(tmp_path / "new.zarr"), mode="w", zarr_format=3).attrs["taca_probe_schema"] = 99
    with pytest.raises(StoreError, match="schema 99"):
        open_run(tmp_path / "new.zarr")
    with pytest.raises(StoreError, match="schema 99"):
        store_info(tmp_path / "new.zarr")


# ------------------------------------------------------------------------------------------------
# CLI end to end
# ------------------------------------------------------------------------------------------------


def _cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd35"])
def test_cli_record_with_maps_then_open_and_info(tmp_path, capsys, model):
    store = tmp_path / "r.zarr"
    rc, out, err = _cli(["record", "--model", model, "--prompt", "a red cube", "--prompt", "a blue ball",
                         "--seeds", "0,1", "--steps", "3", "--height", "64", "--width", "64",
                         "--schedule", "step:1.2@970", "--maps", "steps=0-1;tokens=prompt", "--out", str(store)], capsys)
    assert rc == 0, err
    assert "mean visual->text attention mass" in out and "joint" in out
    ds = open_run(store)
    assert ds.sizes["sample"] == 4 and ds.sizes["step"] == 3
    assert [(str(p), int(s)) for p, s in zip(ds["prompt"].values, ds["seed"].values)] == [
        ("a red cube", 0), ("a red cube", 1), ("a blue ball", 0), ("a blue ball", 1)]
    assert ds.attrs["schedule"] == "step:1.2@970" and ds.attrs["model"] == model
    for key in ("taca_probe_version", "torch_version", "diffusers_version", "model_class", "dtype", "device", "height",
                "width", "n_txt", "n_vis", "latent_grid", "steps", "guidance", "branch", "command", "created"):
        assert key in ds.attrs, key
    assert np.isnan(ds["maps"].isel(step=2).values).all()
    assert np.isfinite(ds["maps"].isel(step=0).where(~ds["token_is_padding"], drop=True).values).all()
    # maps of unselected steps were never written: one shard file per (sample, selected step)
    shards = [p for p in (store / "maps").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(shards) == 4 * 2
    rc, out, err = _cli(["info", str(store)], capsys)
    assert rc == 0 and "schema 1" in out and "vis_txt_mass" in out and "4 complete" in out
    rc, out, _ = _cli(["info", str(store), "--json"], capsys)
    assert json.loads(out)["samples_complete"] == 4


def _tree_state(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def test_cli_refuses_existing_store_and_touches_nothing(tmp_path, capsys):
    store = tmp_path / "r.zarr"
    base = ["record", "--model", "tiny-sd3", "--prompt", "x", "--steps", "2", "--height", "32", "--width", "32",
            "--out", str(store)]
    assert _cli(base, capsys)[0] == 0
    before = _tree_state(store)
    rc, _, err = _cli(base, capsys)
    assert rc == 2 and "already exists" in err and err.count("\n") == 1
    rc, _, err = _cli(base[:-2] + ["--steps", "3", "--schedule", "const:1.1", "--out", str(store), "--resume"], capsys)
    assert rc == 2 and "different settings" in err and "schedule" in err and "steps" in err
    rc, _, err = _cli(base[:-2] + ["--guidance", "5", "--out", str(store), "--resume"], capsys)
    # the store holds the guidance it ran at: tiny-sd3 has no call default, so the pipeline's own
    default = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["guidance_scale"].default
    assert rc == 2 and f"guidance: store has {float(default)}, now 5.0" in err and "None" not in err
    assert _tree_state(store) == before
    (tmp_path / "notastore").mkdir()
    rc, _, err = _cli(base[:-1] + [str(tmp_path / "notastore"), "--overwrite"], capsys)
    assert rc == 2 and "not a taca-probe store" in err
    rc, _, err = _cli(["record", "--prompt", "x", "--maps", "steps=9-1", "--out", str(tmp_path / "m.zarr")], capsys)
    assert rc == 2 and "valid forms" in err and not (tmp_path / "m.zarr").exists()
    rc, _, err = _cli(["info", str(tmp_path / "notastore")], capsys)
    assert rc == 2 and "not a taca-probe store" in err


def test_cli_overwrite_replaces(tmp_path, capsys):
    store = tmp_path / "r.zarr"
    base = ["record", "--model", "tiny-sd3", "--steps", "2", "--height", "32", "--width", "32", "--out", str(store)]
    assert _cli(base + ["--prompt", "first"], capsys)[0] == 0
    assert _cli(base + ["--prompt", "second", "--overwrite"], capsys)[0] == 0
    assert list(open_run(store)["prompt"].values) == ["second"]


def test_resume_after_sigkill_completes_the_store(tmp_path):
    store = tmp_path / "k.zarr"
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(6)) + "\n")
    argv = [sys.executable, "-m", "taca_probe", "record", "--model", "tiny-flux", "--prompts", str(prompts),
            "--seeds", "0", "--steps", "8", "--height", "128", "--width", "128", "--out", str(store)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    done_before = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if (store / "complete").exists():
                try:
                    import zarr

                    done_before = int(np.asarray(zarr.open_array(str(store / "complete"), mode="r")[:]).sum())
                except Exception:
                    done_before = 0
                if done_before >= 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = open_run(store, include_incomplete=False)
    n_before = killed.sizes["sample"]
    assert 2 <= n_before < 6
    snapshot = {v: killed[v].values.copy() for v in ("vis_txt_mass", "token_mass", "image")}
    prompts_before = [str(p) for p in killed["prompt"].values]
    rerun = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{6 - n_before} recorded now by 1 process(es), {n_before} already complete" in rerun.stdout
    ds = open_run(store)
    got = [str(p) for p in ds["prompt"].values]
    assert got == [f"prompt number {i}" for i in range(6)]  # none lost, none duplicated, in order
    assert got[:n_before] == prompts_before
    for v, before in snapshot.items():
        np.testing.assert_array_equal(ds[v].values[:n_before], before)
    assert store_info(store)["samples_incomplete"] == 0


def test_probe_applies_the_model_call_defaults_and_records_what_the_cli_records(tmp_path, capsys):
    """The README's probe() example on the shapes model: 16 T5 tokens (not 256), and the same attributes
    as `taca-probe record` (model named as given, pipeline_kwargs, guidance, lora, lora_scale)."""
    from taca_probe.models import model_call_defaults

    defaults = model_call_defaults("shapes")
    rc = main(["record", "--model", "shapes", "--prompt", "a red circle", "--seeds", "0", "--steps", "2",
               "--schedule", "step:1.2@970", "--out", str(tmp_path / "cli.zarr")])
    assert rc == 0, capsys.readouterr().err
    pipe = load_pipeline("shapes", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    with probe(pipe, tmp_path / "py.zarr", schedule="step:1.2@970") as run:
        run.sample("a red circle", seed=0, num_inference_steps=2)
    cli, py = open_run(tmp_path / "cli.zarr"), open_run(tmp_path / "py.zarr")
    assert set(py.attrs) == set(cli.attrs)
    assert py.attrs["model"] == cli.attrs["model"] == "shapes"
    # the trained text length: CLIP 16 + T5 16 tokens, not the pipeline's 256 T5 tokens
    assert py.attrs["n_txt"] == cli.attrs["n_txt"] == 16 + defaults["max_sequence_length"]
    assert py.attrs["pipeline_kwargs"]["max_sequence_length"] == defaults["max_sequence_length"]
    assert py.attrs["pipeline_kwargs"]["num_inference_steps"] == 2
    for key in ("guidance", "lora", "lora_scale", "height", "width", "steps"):
        assert py.attrs[key] == cli.attrs[key], key
    assert py.attrs["guidance"] == defaults["guidance_scale"]
    # same images: the same call settings reached the pipeline
    np.testing.assert_array_equal(py["image"].values, cli["image"].values)
