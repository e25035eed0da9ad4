"""What a recording stores, checked against quantities computed another way (fast, tiny SD3)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from taca_probe import probe, runner
from taca_probe.errors import TacaProbeError
from taca_probe.store import RunWriter, open_run

pytestmark = pytest.mark.slow  # each test runs the tiny SD3 pipeline two or three times (seconds on a CPU)

SIZE = {"height": 32, "width": 32}


def test_each_image_of_a_batch_stores_its_own_maps(pipes, tmp_path):
    # A map is the head-mean probability of each image token on a text token, so its mean over the
    # latent grid is that token's token_mass (the mean over heads and image tokens), image by image.
    pipe = pipes("tiny-sd3")
    with probe(pipe, tmp_path / "m.zarr", maps="steps=0;tokens=0-5") as run:
        run.sample("a red cube", seed=3, num_inference_steps=1, num_images_per_prompt=2, **SIZE)
    ds = open_run(tmp_path / "m.zarr").isel(step=0)
    grid_mean = ds["maps"].isel(token=slice(0, 6)).astype("float64").mean(("y", "x")).values  # (sample, layer, 6)
    token_mass = ds["token_mass"].isel(token=slice(0, 6)).values
    np.testing.assert_allclose(grid_mean, token_mass, rtol=5e-3, atol=1e-6)  # maps are stored in float16
    assert not np.allclose(token_mass[0], token_mass[1])  # the two images differ


def test_sd3_batched_cfg_rows_are_labelled_cond_and_uncond(pipes, tmp_path):
    # At step 0 both CFG halves see the same latents, so the cond half's statistics equal a run without
    # CFG on the prompt, and the uncond half's those of a run without CFG on the negative prompt ("").
    pipe = pipes("tiny-sd3")
    kw = {"num_inference_steps": 1, **SIZE}
    with probe(pipe, tmp_path / "both.zarr", branch="both", maps="steps=0;tokens=0-5") as run:
        run.sample("a red cube", seed=0, guidance_scale=5.0, **kw)
    for name, prompt in (("cond", "a red cube"), ("uncond", " ")):
        with probe(pipe, tmp_path / f"{name}.zarr", maps="steps=0;tokens=0-5") as run:
            run.sample(prompt, seed=0, guidance_scale=1.0, negative_prompt=None, **kw)
    both = open_run(tmp_path / "both.zarr").isel(step=0)
    for name in ("cond", "uncond"):
        plain = open_run(tmp_path / f"{name}.zarr").isel(step=0)
        for var in ("vis_txt_mass", "token_mass", "maps"):
            np.testing.assert_allclose(both[var].sel(branch=name).astype("float64").values,
                                       plain[var].astype("float64").values, rtol=1e-4, atol=1e-6, err_msg=f"{name} {var}")


def test_sd3_skip_layer_guidance_calls_are_not_recorded(pipes, tmp_path):
    # Skip-layer guidance adds a third transformer call per step (cond rows, some layers skipped); the
    # recorded cond statistics are those of the step's CFG call, the same as without it at step 0.
    pipe = pipes("tiny-sd3")
    kw = {"num_inference_steps": 2, "guidance_scale": 5.0, **SIZE}
    slg = {"skip_guidance_layers": [0], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    for name, extra in (("slg", slg), ("plain", {})):
        with probe(pipe, tmp_path / f"{name}.zarr") as run:
            run.sample("a red cube", seed=0, **kw, **extra)
    with_slg, plain = (open_run(tmp_path / f"{name}.zarr").isel(step=0) for name in ("slg", "plain"))
    for var in ("vis_txt_mass", "txt_vis_mass", "token_mass"):
        np.testing.assert_allclose(with_slg[var].values, plain[var].values, rtol=1e-5, atol=1e-7, err_msg=var)


def test_flux_maps_of_a_wide_image_have_its_rows_and_columns(pipes, tmp_path):
    # FLUX: 8 px per latent pixel, 2 x 2 latent pixels per token, so 16 px per token side: a 32 x 64 image
    # is a 2 x 4 grid of image tokens (rows, columns), not 4 x 2.
    pipe = pipes("tiny-flux")
    with probe(pipe, tmp_path / "f.zarr", maps="steps=0;tokens=0-3") as run:
        run.sample("a red cube", seed=0, num_inference_steps=1, height=32, width=64)
    ds = open_run(tmp_path / "f.zarr")
    assert (ds.sizes["y"], ds.sizes["x"]) == (2, 4)
    assert ds["image"].shape[1:] == (32, 64, 3)


def test_a_resumed_probe_records_a_repaired_slot_again_and_never_gives_it_to_another_sample(pipes, tmp_path):
    pipe = pipes("tiny-sd3")
    kw = {"num_inference_steps": 1, **SIZE}
    path = tmp_path / "r.zarr"
    with probe(pipe, path) as run:
        run.sample("a", seed=0, **kw)
        run.sample("b", seed=0, **kw)
    RunWriter.reopen(path).mark_for_repair({0: ("a", 0, 0)})  # slot 0 is to be recorded again
    assert list(open_run(path)["prompt"].values) == ["b"]
    with probe(pipe, path, mode="resume") as run:
        run.sample("c", seed=0, **kw)
        assert list(open_run(path, include_incomplete=True)["prompt"].values) == ["a", "b", "c"]
        run.sample("a", seed=0, **kw)
    assert list(open_run(path)["prompt"].values) == ["a", "b", "c"]


def test_a_planned_store_of_a_heun_scheduler_has_one_step_per_pass_and_resumes(pipes, tmp_path):
    # A second-order scheduler makes 2N - 1 passes for N steps; the planned store had N steps, so
    # the first sample did not fit it (StoreError), and a resume compared the wrong step count.
    from diffusers import FlowMatchHeunDiscreteScheduler

    from taca_probe.runner import Target, record_plan

    pipe = pipes("tiny-sd3")
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    call, target = {"num_inference_steps": 2, **SIZE}, Target("none", tmp_path / "h.zarr")
    assert record_plan(pipe, [target], [("a red cube", 0)], call, progress=False) == [1]
    passes = len(pipe.scheduler.timesteps)  # what the pipeline's loop ran through
    assert passes == 3
    ds = open_run(target.store)
    assert ds.sizes["step"] == passes and not np.isnan(ds["vis_txt_mass"].values).any()
    assert record_plan(pipe, [target], [("a red cube", 0)], call, mode="resume", progress=False) == [0]


def test_the_store_names_the_device_the_pipeline_runs_on(pipes, tmp_path, monkeypatch):
    """With model CPU offload the transformer sits on the CPU until its forward call, so the store said
    ``device: cpu`` (and the CPU's statistics path) for a run computed on the accelerator."""
    pipe = pipes("tiny-sd3")
    seen = []
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(runner, "describe_stats_backend", lambda device, dtype: seen.append(device) or "stub")
    with probe(pipe, tmp_path / "d.zarr") as run:
        assert run.attrs["device"] == "cuda:0"
    assert seen == [torch.device("cuda", 0)]


@pytest.mark.parametrize("model,key", [("tiny-sd3", "prompt_3"), ("tiny-flux", "prompt_2")])
def test_t5_tokens_are_labelled_with_the_prompt_the_t5_encoder_read(pipes, tmp_path, model, key):
    # SD3's T5 reads prompt_3 and FLUX's prompt_2 where given; the T5 labels were those of prompt.
    pipe, t5_text = pipes(model), "seven green dogs jump"
    with probe(pipe, tmp_path / "t.zarr") as run:
        run.sample("a cat", seed=0, num_inference_steps=1, max_sequence_length=8, **{key: t5_text}, **SIZE)
    ds = open_run(tmp_path / "t.zarr").isel(sample=0)
    t5 = (ds["token_source"] == "t5").values
    tokenizer = pipe.tokenizer_3 if model == "tiny-sd3" else pipe.tokenizer_2
    read = tokenizer(t5_text, padding="max_length", max_length=8, truncation=True)
    assert [str(t) for t in ds["token_text"].values[t5]] == tokenizer.convert_ids_to_tokens(read["input_ids"])
    np.testing.assert_array_equal(ds["token_is_padding"].values[t5], np.array(read["attention_mask"]) == 0)
    if model == "tiny-sd3":  # the CLIP positions stay those of prompt
        assert "cat" in "".join(str(t) for t in ds["token_text"].values[~t5])


def test_a_store_is_labelled_with_the_settings_its_samples_were_recorded_with(pipes, tmp_path):
    # The store took guidance and pipeline_kwargs from the first run.sample call, even one interrupted
    # before anything was written, and later samples at another guidance went in under that label.
    pipe, one = pipes("tiny-sd3"), {"num_inference_steps": 1, **SIZE}

    def stop(p, i, t, kw):
        raise KeyboardInterrupt

    with probe(pipe, tmp_path / "g.zarr") as run:
        with pytest.raises(KeyboardInterrupt):
            run.sample("a cat", seed=0, guidance_scale=9.0, num_inference_steps=2, callback_on_step_end=stop, **SIZE)
        run.sample("a cat", seed=0, guidance_scale=1.0, **one)
        with pytest.raises(TacaProbeError, match="guidance_scale=5.0") as info:
            run.sample("a dog", seed=0, guidance_scale=5.0, **one)
        assert "\n" not in str(info.value)
        run.sample("a dog", seed=0, guidance_scale=1.0, negative_prompt="blurry", **one)  # texts may differ
    ds = open_run(tmp_path / "g.zarr")
    assert list(ds["prompt"].values) == ["a cat", "a dog"]
    assert ds.attrs["guidance"] == 1.0 and ds.attrs["pipeline_kwargs"] == {"guidance_scale": 1.0, **one}
    stock = pipe("a cat", generator=torch.Generator("cpu").manual_seed(0), guidance_scale=1.0, output_type="np", **one)
    np.testing.assert_array_equal(ds["image"].values[0], (stock.images[0] * 255).round().astype(np.uint8))


def test_a_resumed_probe_refuses_other_settings_than_the_store_holds(pipes, tmp_path):
    # Audit: the refusal compared against the first sample of this probe() block only, so a resumed block
    # wrote a guidance_scale=3 sample into a store whose pipeline_kwargs (and guidance) said 7.
    pipe = pipes("tiny-sd3")
    kw = {"num_inference_steps": 1, **SIZE}
    path = tmp_path / "r.zarr"
    with probe(pipe, path) as run:
        run.sample("a", seed=0, guidance_scale=7.0, **kw)
    with probe(pipe, path, mode="resume") as run:
        with pytest.raises(TacaProbeError, match=r"guidance_scale=3.0 \(the first sample's: 7.0\)"):
            run.sample("a", seed=1, guidance_scale=3.0, **kw)
        run.sample("a", seed=1, guidance_scale=7.0, negative_prompt="b", **kw)
    assert list(open_run(path)["seed"].values) == [0, 1]


def test_a_store_recorded_at_the_default_guidance_resumes_with_it_given_explicitly(pipes, tmp_path):
    # Compat audit: a store made without guidance_scale (every record/sweep store without --guidance, and
    # every store of earlier versions) holds pipeline_kwargs without it; resumed with the pipeline's default
    # given (record --resume --guidance 7, which check_resume accepts), run.sample refused 7.0 against None.
    pipe = pipes("tiny-sd3")
    kw = {"num_inference_steps": 1, **SIZE}
    default = runner.call_as_run(pipe, {})["guidance_scale"]
    unset, given = tmp_path / "unset.zarr", tmp_path / "given.zarr"
    with probe(pipe, unset) as run:
        run.sample("a", seed=0, **kw)
        run.sample("a", seed=1, **kw)
    with probe(pipe, given) as run:
        run.sample("a", seed=0, **kw)
    with probe(pipe, given, mode="resume") as run:
        run.sample("a", seed=1, guidance_scale=default, **kw)  # the default the first sample ran at
        with pytest.raises(TacaProbeError):
            run.sample("a", seed=2, guidance_scale=default + 1.0, **kw)
    a, b = open_run(unset), open_run(given)
    assert list(b["seed"].values) == [0, 1]
    for name in ("image", "vis_txt_mass", "txt_vis_mass", "token_mass"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_a_probe_object_entered_again_opens_its_store_afresh_and_restores_each_time(pipes, tmp_path):
    # Audit: a probe() object kept in a notebook and entered a second time raised contextlib's
    # AttributeError ('_GeneratorContextManager' object has no attribute 'args').
    pipe = pipes("tiny-sd3")
    transformer = pipe.transformer
    before = dict(transformer.attn_processors)
    kw = {"num_inference_steps": 1, **SIZE}
    path = tmp_path / "r.zarr"

    def restored() -> bool:
        after = transformer.attn_processors
        return after.keys() == before.keys() and all(after[k] is before[k] for k in before)

    created = probe(pipe, path)
    with created as run:
        run.sample("a", seed=0, **kw)
    assert restored()
    with pytest.raises(TacaProbeError, match="already exists"):  # mode="create", now on the store it made
        with created:
            pass
    assert restored()
    resumed, runs = probe(pipe, path, mode="resume"), []
    for seed in (1, 2):
        with resumed as run:
            assert isinstance(run, runner.Run) and run not in runs
            with pytest.raises(TacaProbeError, match="already installed"):  # inside itself
                with resumed:
                    pass
            run.sample("a", seed=seed, **kw)  # the refused entry undid nothing of this one
        runs.append(run)
        assert restored() and "ended" in repr(run)
    with pytest.raises(RuntimeError, match="boom"):
        with resumed as run:
            run.sample("a", seed=3, **kw)
            raise RuntimeError("boom")
    assert restored()
    assert list(open_run(path)["seed"].values) == [0, 1, 2, 3]


def test_a_store_recorded_without_max_sequence_length_resumes_with_the_default_given(pipes, tmp_path):
    # Audit: record_plan's resume check compared the store's unset text length with the pipeline's default
    # given (FLUX 512) and refused the same run; another length is still refused.
    from taca_probe.runner import Target, record_plan
    from taca_probe.store import StoreError

    pipe = pipes("tiny-flux")
    call, plan, target = {"num_inference_steps": 1, **SIZE}, [("a", 0), ("a", 1)], Target("none", tmp_path / "f.zarr")
    default = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default

    def stop(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the first sample recorded without the setting, the second not yet
        record_plan(pipe, [target], plan, call, on_sample=stop, progress=False)
    with pytest.raises(StoreError, match="max_sequence_length"):
        record_plan(pipe, [target], plan, {**call, "max_sequence_length": default // 2}, mode="resume", progress=False)
    assert record_plan(pipe, [target], plan, {**call, "max_sequence_length": default}, mode="resume",
                       progress=False) == [1]
    ds = open_run(target.store)
    assert list(ds["seed"].values) == [0, 1] and ds.attrs["pipeline_kwargs"] == call
