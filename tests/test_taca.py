"""The TACA path on the embedded tiny models: every attention site type against the explicit
reference, stock equality at gamma = 1, schedules firing at the right steps, restoration, refusal
of double installation, and LoRA switching."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline
from diffusers.models import attention_processor
from diffusers.models.transformers import transformer_flux

from taca_probe import intervention
from taca_probe.errors import TacaProbeError
from taca_probe.intervention import apply_taca, taca
from taca_probe.models import load_pipeline
from tests.reference import ExplicitTacaSDPA

MODELS = ["tiny-sd3", "tiny-sd35", "tiny-flux"]


@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(name, device="cpu", dtype="fp32") for name in MODELS}


def _transformer_inputs(transformer, *, n_txt=7, grid=(8, 6), t=0.6, seed=0):
    """Random inputs of the right shapes for one transformer forward (t as a sigma in 0..1)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    h, w = grid
    if type(transformer).__name__ == "FluxTransformer2DModel":
        return {
            "hidden_states": torch.randn(1, h * w, cfg.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([t]),  # FLUX takes t / 1000
            "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1)
            .reshape(-1, 3)
            .float(),
            "txt_ids": torch.zeros(n_txt, 3),
            "guidance": torch.tensor([3.5]) if cfg.guidance_embeds else None,
            "return_dict": False,
        }
    p = cfg.patch_size
    return {
        "hidden_states": torch.randn(1, cfg.in_channels, h * p, w * p, generator=g),
        "encoder_hidden_states": torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([t * 1000]),
        "return_dict": False,
    }


def _capture(transformer, names):
    """Forward hooks that keep each named module's inputs and outputs of its last call."""
    seen, handles = {}, []
    for name in names:
        module = transformer.get_submodule(name)

        def hook(mod, args, kwargs, out, name=name):
            seen[name] = (args, dict(kwargs), out)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("gamma", [1.0, 1.2, 2.0])
def test_every_site_matches_explicit_softmax(pipes, model, gamma):
    transformer = pipes[model].transformer
    n_txt = 7
    all_attn = [k.removesuffix(".processor") for k in transformer.attn_processors]
    stock = dict(transformer.attn_processors)
    seen, handles = _capture(transformer, all_attn)
    try:
        with torch.no_grad(), taca(transformer, f"const:{gamma}") as handle:
            transformer(**_transformer_inputs(transformer, n_txt=n_txt))
    finally:
        for h in handles:
            h.remove()
    sites = {s.name: s for s in handle.sites}
    kinds = set()
    for name in all_attn:
        module = transformer.get_submodule(name)
        args, kwargs, out = seen[name]
        if name not in sites:  # image-only attention (SD3.5 attn2) must be the stock output
            assert name.endswith("attn2")
            kinds.add("dual attn2")
            with torch.no_grad():
                ref = module.processor(module, *args, **kwargs)
            assert torch.equal(_as_tuple(ref)[0], _as_tuple(out)[0])
            continue
        site = sites[name]
        assert module.processor is stock[f"{name}.processor"]  # restored after the block
        mode = ExplicitTacaSDPA(n_txt=n_txt, txt_first=site.txt_first, gamma=gamma)
        with torch.no_grad(), mode:
            ref = module.processor(module, *args, **kwargs)
        assert mode.calls == 1
        for r, o in zip(_as_tuple(ref), _as_tuple(out)):
            assert (r.double() - o.double()).abs().max().item() <= 1e-5, name
        kind = site.block_type
        if getattr(transformer.get_submodule(name.rsplit(".", 1)[0]), "attn2", None) is not None:
            kind = "dual"
        if getattr(module, "context_pre_only", False):
            kind = "context_pre_only"
        kinds.add(kind)
    expected = {
        "tiny-sd3": {"joint", "context_pre_only"},
        "tiny-sd35": {"dual", "dual attn2", "context_pre_only"},
        "tiny-flux": {"joint", "single"},
    }[model]
    assert expected <= kinds


def test_sites_are_named_by_module_path(pipes):
    flux = apply_taca(pipes["tiny-flux"].transformer)
    sd35 = apply_taca(pipes["tiny-sd35"].transformer)
    try:
        assert [s.name for s in flux.sites] == [
            "transformer_blocks.0.attn",
            "transformer_blocks.1.attn",
            "single_transformer_blocks.0.attn",
            "single_transformer_blocks.1.attn",
        ]
        assert [s.block_type for s in flux.sites] == ["joint", "joint", "single", "single"]
        assert all(s.txt_first for s in flux.sites)
        assert all(not s.name.endswith("attn2") and not s.txt_first for s in sd35.sites)
    finally:
        flux.remove()
        sd35.remove()


def _image(pipe, seed=0, steps=3, **kw):
    out = pipe("a red cube on a blue table", num_inference_steps=steps, height=64, width=96,
               generator=torch.Generator().manual_seed(seed), output_type="np", **kw)
    return out.images[0]


# The fast lane samples one family; the other two run in the full suite.
@pytest.mark.parametrize("model", [MODELS[0], *(pytest.param(m, marks=pytest.mark.slow) for m in MODELS[1:])])
def test_gamma_one_pipeline_images_equal_stock(pipes, model):
    pipe = pipes[model]
    stock = _image(pipe)
    for spec in ("none", "const:1", "step:1@970"):
        with taca(pipe, spec):
            assert np.array_equal(_image(pipe), stock), spec
    with taca(pipe, "const:2"):
        changed = _image(pipe)
    assert not np.array_equal(changed, stock)  # the intervention is real
    assert np.array_equal(_image(pipe), stock)  # and leaves nothing behind


class _SiteWatch:
    """Tells, per call of one site, whether its output differs from the stock processor's on the
    same inputs, i.e. whether TACA acted, independently of the handle's own bookkeeping."""

    def __init__(self, transformer, name, stock_proc):
        self.module = transformer.get_submodule(name)
        self.stock = stock_proc
        self.changed: list[bool] = []
        self.handle = self.module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs, out):
        ref = self.stock(mod, *args, **kwargs)
        self.changed.append(not all(torch.equal(a, b) for a, b in zip(_as_tuple(ref), _as_tuple(out))))


_FIRES = [
    ("first:1.5@3", 8, {0, 1, 2}),
    ("frac:1.5@0.1", 30, {0, 1, 2}),  # the official code's first 3 of 30
    ("step:1.5@970", 28, None),  # expected from the timesteps the pipeline reports
    ("none", 5, set()),
]


# Of the long (28-30 step) runs the fast lane keeps one per family; the full suite runs them all.
_SLOW_FIRES = {("tiny-sd3", "frac:1.5@0.1"), ("tiny-flux", "step:1.5@970")}


@pytest.mark.parametrize("model,spec,steps,expected", [
    pytest.param(model, *case, marks=pytest.mark.slow if (model, case[0]) in _SLOW_FIRES else ())
    for model in ("tiny-sd3", "tiny-flux") for case in _FIRES
])
def test_schedule_fires_at_exactly_the_expected_steps(pipes, model, spec, steps, expected):
    pipe = pipes[model]
    transformer = pipe.transformer
    site = "transformer_blocks.0.attn"
    stock = transformer.attn_processors[f"{site}.processor"]
    reported: list[float] = []

    def on_step_end(p, i, t, kwargs):
        reported.append(float(t))
        return kwargs

    with taca(pipe, spec) as handle:
        watch = _SiteWatch(transformer, site, stock)
        try:
            _image(pipe, steps=steps, callback_on_step_end=on_step_end)
        finally:
            watch.handle.remove()
    assert len(reported) == steps
    if expected is None:
        expected = {i for i, t in enumerate(reported) if t >= 970 - 1e-3}
        assert 0 < len(expected) < steps
    # one transformer call per step here; the watch saw TACA act at exactly those calls
    assert [c.step for c in handle.calls] == list(range(steps))
    assert {i for i, ch in enumerate(watch.changed) if ch} == expected
    assert set(handle.steps_active) == expected
    # and the schedule saw t on the 0..1000 scale, as the pipeline reports it (FLUX passes t/1000)
    assert [c.t for c in handle.calls] == pytest.approx(reported, abs=1e-3)


def test_flux_true_cfg_two_calls_per_step_share_the_step(pipes):
    pipe = pipes["tiny-flux"]
    with taca(pipe, "first:1.5@2") as handle:
        _image(pipe, steps=4, true_cfg_scale=2.0, negative_prompt="blurry")
    steps = [c.step for c in handle.calls]
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c.active for c in handle.calls] == [True] * 4 + [False] * 4


def test_bare_transformer_reads_the_timestep_of_each_call(pipes):
    transformer = pipes["tiny-flux"].transformer
    with torch.no_grad(), taca(transformer, "step:1.5@970") as handle:
        for t in (1.0, 1.0, 0.98, 0.97, 0.5, 1.0, 0.2):  # two runs; the first step twice (CFG)
            transformer(**_transformer_inputs(transformer, t=t))
    assert [c.step for c in handle.calls] == [0, 0, 1, 2, 3, 0, 1]
    assert [c.active for c in handle.calls] == [True, True, True, True, False, True, False]
    assert [c.t for c in handle.calls] == pytest.approx([1000, 1000, 980, 970, 500, 1000, 200], abs=1e-3)
    assert [dict(c.gammas) for c in handle.calls] == [{s.name: 1.5 if c.active else 1.0 for s in handle.sites}
                                                      for c in handle.calls]
    # one read-only mapping per distinct setting, however many calls a long loop records
    assert len({id(c.gammas) for c in handle.calls}) == 2
    with pytest.raises(TypeError):
        handle.calls[0].gammas[handle.sites[0].name] = 2.0


def test_frac_on_bare_transformer_needs_the_step_count(pipes):
    with pytest.raises(TacaProbeError, match="num_inference_steps"):
        with taca(pipes["tiny-sd3"].transformer, "frac:1.2@0.1"):
            pass


@pytest.mark.parametrize("model", MODELS)
def test_processors_restored_by_identity_after_an_exception(pipes, model):
    transformer = pipes[model].transformer
    before = dict(transformer.attn_processors)
    hooks_before = dict(transformer._forward_pre_hooks)
    post_hooks_before = dict(transformer._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with taca(pipes[model], "const:1.3"):
            assert any(transformer.attn_processors[k] is not v for k, v in before.items())
            raise RuntimeError("boom")
    after = transformer.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert dict(transformer._forward_pre_hooks) == hooks_before
    assert dict(transformer._forward_hooks) == post_hooks_before
    if model == "tiny-sd35":  # attn and attn2 shared one processor instance, and do again
        block = transformer.transformer_blocks[0]
        assert block.attn.processor is block.attn2.processor


def test_double_installation_is_refused(pipes):
    pipe = pipes["tiny-sd3"]
    with taca(pipe, "const:1.2"):
        with pytest.raises(TacaProbeError, match="already installed"):
            with taca(pipe, "const:1.5"):
                pass
        with pytest.raises(TacaProbeError, match="already installed"):
            apply_taca(pipe.transformer)
    # after leaving, installing again works
    with taca(pipe.transformer, "none"):
        pass


def test_a_taca_object_entered_again_installs_afresh_and_restores_each_time(pipes):
    """Audit: a taca() object kept in a notebook and entered a second time raised contextlib's
    AttributeError ('_GeneratorContextManager' object has no attribute 'args')."""
    pipe = pipes["tiny-sd3"]
    transformer = pipe.transformer
    before = dict(transformer.attn_processors)
    hooks_before = (dict(transformer._forward_pre_hooks), dict(transformer._forward_hooks))
    t = taca(pipe, "step:1.5@970")
    handles = []
    for _ in range(3):
        with torch.no_grad(), t as handle:
            assert isinstance(handle, intervention.TacaHandle) and not handle.removed
            assert any(transformer.attn_processors[k] is not v for k, v in before.items())
            transformer(**_transformer_inputs(transformer, n_txt=2, grid=(2, 2), t=0.99))
        handles.append(handle)
        after = transformer.attn_processors
        assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
        assert (dict(transformer._forward_pre_hooks), dict(transformer._forward_hooks)) == hooks_before
    assert len({id(h) for h in handles}) == 3  # a new handle each time, holding that block's call only
    assert all(h.removed and len(h.calls) == 1 and h.calls[0].active for h in handles)


def test_a_taca_object_entered_inside_itself_is_refused_and_stays_usable_after_an_exception(pipes):
    pipe = pipes["tiny-sd3"]
    transformer = pipe.transformer
    before = dict(transformer.attn_processors)
    t = taca(pipe, "const:1.2")
    with t as outer:
        with pytest.raises(TacaProbeError, match="already installed"):
            with t:
                pass
        assert not outer.removed  # the refused entry undid nothing of the outer one
        assert any(transformer.attn_processors[k] is not v for k, v in before.items())
    assert outer.removed and all(transformer.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with t as failed:
            raise RuntimeError("boom")
    assert failed.removed and all(transformer.attn_processors[k] is v for k, v in before.items())
    with t as again:
        assert not again.removed and any(transformer.attn_processors[k] is not v for k, v in before.items())
    assert again.removed and all(transformer.attn_processors[k] is v for k, v in before.items())


def test_unsupported_model_is_refused_with_the_supported_classes():
    with pytest.raises(TacaProbeError, match="SD3Transformer2DModel"):
        with taca(torch.nn.Linear(2, 2), "const:1.2"):
            pass


def test_non_native_attention_backend_is_refused(pipes):
    transformer = pipes["tiny-flux"].transformer
    proc = transformer.transformer_blocks[0].attn.processor
    proc._attention_backend = "flash"
    try:
        with pytest.raises(TacaProbeError, match="native attention backend"):
            with taca(transformer, "const:1.2"):
                pass
    finally:
        proc._attention_backend = None
    assert getattr(transformer, intervention._HANDLE_ATTR, None) is None


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_a_custom_processor_is_refused_kept_and_the_advised_call_works(pipes, model):
    """Audit: the refusal advised set_default_attn_processor(), which these transformers lack."""
    transformer = pipes[model].transformer
    stock = dict(transformer.attn_processors)
    custom = type("MyProcessor", (type(transformer.transformer_blocks[1].attn.processor),), {})()
    transformer.transformer_blocks[1].attn.set_processor(custom)
    before = dict(transformer.attn_processors)
    try:
        with pytest.raises(TacaProbeError, match=r"set_attn_processor\(\w+\(\)\)") as err:
            with taca(transformer, "const:1.2"):
                pass
        assert all(transformer.attn_processors[k] is v for k, v in before.items())  # the user's stays
        advised = re.search(r"set_attn_processor\((\w+)\(\)\)", str(err.value)).group(1)
        transformer.set_attn_processor((getattr(attention_processor, advised, None)
                                        or getattr(transformer_flux, advised))())
        with taca(transformer, "const:1.2") as handle:
            assert len(handle.sites) == len(stock)
    finally:
        transformer.set_attn_processor(stock)


@pytest.mark.parametrize("model,replace", [
    ("tiny-sd3", lambda t: t.fuse_qkv_projections()),  # swaps in FusedJointAttnProcessor2_0
    ("tiny-flux", lambda t: t.set_attn_processor(transformer_flux.FluxAttnProcessor())),
])
def test_processors_replaced_inside_the_block_are_refused_and_the_originals_come_back(pipes, model, replace):
    """Audit: the pipeline ran stock attention while handle.steps_active reported TACA, and SD3's
    unfuse_qkv_projections() after the block put back the wrappers that fusing had saved."""
    pipe = pipes[model]
    transformer = pipe.transformer
    before = dict(transformer.attn_processors)
    try:
        with pytest.raises(TacaProbeError, match="transformer_blocks.0.attn"):
            with taca(pipe, "const:1.5") as handle:
                replace(transformer)
                with torch.no_grad():
                    transformer(**_transformer_inputs(transformer))
        assert handle.calls == []  # refused before the first call ran
        if model == "tiny-sd3":
            transformer.unfuse_qkv_projections()
        assert all(transformer.attn_processors[k] is v for k, v in before.items())
    finally:
        transformer.set_attn_processor(dict(before))


def test_caching_hooks_are_refused_and_a_removed_cache_is_accepted(pipes):
    """Audit: under a first-block cache the pipeline skipped the later blocks at most steps, where
    taca() reported gamma and probe() failed counting sites."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_group_offloading

    transformer = pipes["tiny-flux"].transformer
    before = dict(transformer.attn_processors)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.9))
    try:
        with pytest.raises(TacaProbeError, match="fbc_leader_block_hook"):
            with taca(transformer, "const:1.2"):
                pass
        assert all(transformer.attn_processors[k] is v for k, v in before.items())
        assert getattr(transformer, intervention._HANDLE_ATTR, None) is None
    finally:
        transformer.disable_cache()
    cpu = torch.device("cpu")  # offloading keeps every call: accepted
    apply_group_offloading(transformer, onload_device=cpu, offload_device=cpu, offload_type="block_level",
                           num_blocks_per_group=1)
    try:
        with taca(transformer, "const:1.2"):
            pass
    finally:
        transformer._diffusers_hook.remove_hook("group_offloading", recurse=True)
    assert not {h for m in transformer.modules() for h in getattr(getattr(m, "_diffusers_hook", None), "hooks", ())}


def test_registry_backend_refuses_flux_only_and_the_advised_call_works(pipes):
    """Audit: SD3, whose processors call SDPA directly, was refused while diffusers' registry held
    another backend, and the advised reset_attention_backend() left FLUX refused (it keeps the
    registry's backend that set_attention_backend set)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    flux, sd3 = pipes["tiny-flux"].transformer, pipes["tiny-sd3"].transformer
    previous = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        flux.set_attention_backend("_native_math")
        flux.reset_attention_backend()  # the processors' backends only
        with pytest.raises(TacaProbeError, match=r"\bset_attention_backend"):
            with taca(flux, "const:1.2"):
                pass
        inputs = _transformer_inputs(sd3)
        with torch.no_grad():
            with ExplicitTacaSDPA(7, False, 1.2):
                ref = sd3(**inputs)[0]
            with taca(sd3, "const:1.2"):
                got = sd3(**inputs)[0]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        flux.set_attention_backend("native")  # what the message advises
        with taca(flux, "const:1.2"):
            pass
    finally:
        flux.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(previous)


def test_bad_schedule_is_refused_before_anything_is_installed(pipes):
    transformer = pipes["tiny-sd3"].transformer
    before = dict(transformer.attn_processors)
    with pytest.raises(ValueError, match="valid forms"):
        with taca(transformer, "step:-1@970"):
            pass
    assert all(transformer.attn_processors[k] is v for k, v in before.items())


_SELECTS_NOTHING = [
    ("tiny-sd3", "step:1.2@970;blocks=single", "blocks=single"),  # SD3 has joint blocks only
    ("tiny-sd3", "first:1.5@2;layers=transformer_blocks.9*", "transformer_blocks.9*"),  # beyond its depth
    ("tiny-flux", "const:2;layers=single_transformer_blocks.0.attn|nope*", "nope*"),  # one glob of two matches
]


@pytest.mark.parametrize("model,spec,piece", _SELECTS_NOTHING)
def test_a_schedule_selecting_no_layer_is_refused_by_taca(pipes, model, spec, piece):
    """Audit: probe() and record refused these, but taca() (so generate and eval) ran the stock model in silence
    while the schedule, the sidecar and describe() said TACA."""
    transformer = pipes[model].transformer
    before = dict(transformer.attn_processors)
    with pytest.raises(TacaProbeError) as e:
        with taca(pipes[model], spec):
            pass
    assert "\n" not in str(e.value) and spec in str(e.value) and piece in str(e.value)
    assert all(transformer.attn_processors[k] is v for k, v in before.items())
    with taca(pipes[model], "const:1;" + spec.split(";", 1)[1]):  # the stock model, however restricted: no claim
        pass


@pytest.mark.slow
def test_generate_refuses_a_schedule_selecting_no_layer(tmp_path, capsys):
    from tests.clitools import one_line_error, run_cli

    model, spec, piece = _SELECTS_NOTHING[1]
    rc, _, err = run_cli(["generate", "--model", model, "--prompt", "a cat", "--steps", "1", "--height", "32",
                          "--width", "32", "--device", "cpu", "--schedule", spec, "--out", tmp_path / "g"], capsys)
    one_line_error(rc, err, spec, "transformer_blocks.0.attn")  # the pattern and the layers it could match
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("kwargs,word", [
    ({"lora_scale": "0.5"}, "lora_scale"), ({"lora_scale": float("nan")}, "lora_scale"),
    ({"num_inference_steps": 0}, "num_inference_steps"), ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"lora": 3}, "lora"),
])
def test_bad_config_values_are_refused_before_anything_is_installed(pipes, kwargs, word):
    """Audit: these were accepted, to fail at the first transformer call or inside diffusers' adapter API."""
    transformer = pipes["tiny-sd3"].transformer
    before = dict(transformer.attn_processors)
    with pytest.raises(TacaProbeError, match=word):
        with taca(transformer, "const:1.2", **kwargs):
            pass
    assert all(transformer.attn_processors[k] is v for k, v in before.items())
    assert intervention.TacaConfig(num_inference_steps=np.int64(3), lora_scale=np.float32(0.5)).num_inference_steps == 3


def test_apply_taca_refuses_a_config_that_is_not_a_tacaconfig(pipes):
    """Audit: apply_taca(pipe, "step:1.2@970") was an AttributeError ('str' object has no attribute 'schedule')."""
    transformer = pipes["tiny-sd3"].transformer
    with pytest.raises(TacaProbeError, match="TacaConfig"):
        apply_taca(transformer, "step:1.2@970")
    assert getattr(transformer, intervention._HANDLE_ATTR, None) is None


# ------------------------------------------------------------------------------------------------
# LoRA switching
# ------------------------------------------------------------------------------------------------


peft = pytest.importorskip("peft")


def _lora_state(module) -> bool:
    return (not module.disable_adapters) and bool(module.active_adapters)


@pytest.fixture
def lora_pipe():
    """A fresh tiny SD3 pipeline with a random, non-zero LoRA named 'style' on q/k/v."""
    from peft import LoraConfig

    pipe = load_pipeline("tiny-sd3", device="cpu", dtype="fp32")
    torch.manual_seed(0)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False),
        adapter_name="style",
    )
    return pipe


def _lora_watch(pipe):
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    states: list[bool] = []
    handle = layer.register_forward_pre_hook(lambda mod, args: states.append(_lora_state(mod)))
    return states, handle


def test_lora_is_on_exactly_at_the_gamma_steps_and_reversible(lora_pipe):
    pipe = lora_pipe
    states, hook = _lora_watch(pipe)
    try:
        with taca(pipe, "first:1.2@2", lora="style") as handle:
            first = _image(pipe, steps=5)
            calls_first = list(handle.calls)
            second = _image(pipe, steps=5)
    finally:
        hook.remove()
    assert states == [True, True, False, False, False] * 2
    assert [c.lora_active for c in calls_first] == [True, True, False, False, False]
    assert np.array_equal(first, second)  # the second generation behaves like the first
    # the adapter the user loaded is active again, as before
    assert _lora_state(pipe.transformer.transformer_blocks[0].attn.to_q)
    # and the LoRA matters: without it (gamma alone) the image differs
    pipe.transformer.disable_lora()
    with taca(pipe, "first:1.2@2"):
        no_lora = _image(pipe, steps=5)
    assert not np.array_equal(first, no_lora)


def test_lora_from_a_path_is_loaded_switched_and_removed(lora_pipe, tmp_path):
    from peft.utils import get_peft_model_state_dict

    pipe = lora_pipe
    layers = get_peft_model_state_dict(pipe.transformer, adapter_name="style")
    type(pipe).save_lora_weights(tmp_path, transformer_lora_layers=layers)
    pipe.transformer.delete_adapters("style")
    assert not getattr(pipe.transformer, "peft_config", None)
    stock = _image(pipe, steps=4)
    states, hook = _lora_watch(pipe)
    try:
        with taca(pipe, "first:1.2@1", lora=tmp_path):
            _image(pipe, steps=4)
    finally:
        hook.remove()
    assert states == [True, False, False, False]
    assert not getattr(pipe.transformer, "peft_config", None)  # unloaded on exit
    assert np.array_equal(_image(pipe, steps=4), stock)


def test_unknown_lora_is_refused(lora_pipe):
    with pytest.raises(TacaProbeError, match="neither a file/folder nor a loaded adapter.*style"):
        with taca(lora_pipe, "const:1.2", lora="nope"):
            pass


def test_a_lora_file_without_transformer_weights_is_refused(lora_pipe, tmp_path):
    """Audit: diffusers only logged that no key matched, and TACA ran without the LoRA it was given."""
    from safetensors.torch import save_file

    save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 4)},
              tmp_path / "text_only.safetensors")
    transformer = lora_pipe.transformer
    before = dict(transformer.attn_processors)
    with pytest.raises(TacaProbeError, match="no weights for the transformer"):
        with taca(lora_pipe, "const:1.2", lora=tmp_path / "text_only.safetensors"):
            pass
    assert all(transformer.attn_processors[k] is v for k, v in before.items())
    assert set(transformer.peft_config) == {"style"}


def test_a_loaded_but_disabled_lora_stays_disabled_after_taca(lora_pipe):
    # the user loaded "style" and switched LoRA off; TACA turns it on at its gamma steps only, and
    # must leave it off afterwards, as it found it
    pipe = lora_pipe
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    pipe.transformer.disable_lora()
    assert not _lora_state(layer)
    states, hook = _lora_watch(pipe)
    try:
        with taca(pipe, "first:1.2@1", lora="style"):
            _image(pipe, steps=2)
    finally:
        hook.remove()
    assert states == [True, False]
    assert not _lora_state(layer)
    assert list(pipe.transformer.active_adapters()) == ["style"]  # still loaded, by its name


def test_the_users_other_adapters_stay_on_at_their_weights(lora_pipe):
    """Audit: TACA's own LoRA switched the user's active 'style' adapter off at every step, and on
    exit set it back at weight 1 instead of the user's 0.7."""
    from peft import LoraConfig

    pipe = lora_pipe
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False),
        adapter_name="taca_lora",
    )
    pipe.transformer.set_adapters(["style"], [0.7])
    stock = _image(pipe, steps=3)
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    seen: list[tuple] = []
    hook = layer.register_forward_pre_hook(
        lambda mod, args: seen.append((sorted(mod.active_adapters) if _lora_state(mod) else [],
                                       round(mod.scaling["style"], 6), round(mod.scaling["taca_lora"], 6))))
    try:
        with taca(pipe, "first:1.2@1", lora="taca_lora", lora_scale=0.5):
            _image(pipe, steps=3)
    finally:
        hook.remove()
    assert seen == [(["style", "taca_lora"], 0.7, 0.5), (["style"], 0.7, 0.5), (["style"], 0.7, 0.5)]
    assert np.array_equal(_image(pipe, steps=3), stock)  # style back at 0.7, taca_lora off


def test_a_fused_lora_is_refused_and_stays_fused(lora_pipe):
    """Audit: switching adapters unfused a LoRA fused into the weights, which stayed unfused after."""
    pipe = lora_pipe
    pipe.fuse_lora(components=["transformer"], adapter_names=["style"])
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.clone()
    stock = _image(pipe, steps=2)
    with pytest.raises(TacaProbeError, match="unfuse"):
        with taca(pipe, "first:1.2@1", lora="style"):
            _image(pipe, steps=2)
    assert torch.equal(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight, weight)
    assert np.array_equal(_image(pipe, steps=2), stock)


def test_img2img_starts_at_the_schedulers_begin_index(pipes):
    # img2img at strength 0.5 of 4 steps skips the first two: its calls are steps 2 and 3 at their
    # timesteps, so a schedule that acts only at t >= 970 (step 0) must not act at all

    pipe = StableDiffusion3Img2ImgPipeline(**pipes["tiny-sd3"].components)
    pipe.set_progress_bar_config(disable=True)
    image = np.full((64, 64, 3), 0.5, np.float32)
    with taca(pipe, "step:1.5@970") as handle:
        pipe("a red cube", image=image, strength=0.5, num_inference_steps=4, output_type="np",
             generator=torch.Generator().manual_seed(0))
        timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert [c.step for c in handle.calls] == [2, 3]
    assert [c.t for c in handle.calls] == pytest.approx(timesteps[2:], abs=1e-3)
    assert timesteps[0] >= 970 > timesteps[2] and handle.steps_active == []


def test_bare_transformer_calls_within_rounding_of_one_timestep_share_the_step(pipes):
    # CFG halves of one step may carry t rounded differently (bf16 t/1000): 5e-4 apart on the
    # 0..1000 scale is the same step; 2e-3 apart is the next one
    transformer = pipes["tiny-flux"].transformer
    with torch.no_grad(), taca(transformer, "none") as handle:
        for t in (0.5, 0.5 - 5e-7, 0.5 - 2.5e-6):
            transformer(**_transformer_inputs(transformer, t=t))
    assert [c.step for c in handle.calls] == [0, 0, 1]



def test_a_handle_shows_its_schedule_sites_and_steps_in_a_notebook(pipes):
    transformer = pipes["tiny-sd3"].transformer
    with torch.no_grad(), taca(transformer, "step:1.5@970") as handle:
        for t in (0.99, 0.5):  # t = 990 (gamma 1.5), then 500
            transformer(**_transformer_inputs(transformer, n_txt=2, grid=(2, 2), t=t))
        shown = repr(handle)
    assert "object at 0x" not in shown and "\n" not in shown
    assert all(s in shown for s in ("step:1.5@970", f"{len(handle.sites)} ", str(handle.steps_active), "active"))
    assert handle.steps_active == [0] and "removed" in repr(handle)


def test_a_taca_or_probe_object_not_yet_entered_shows_what_it_would_install(pipes, tmp_path):
    """Audit: the object taca(...)/probe(...) returns showed as <..._Reusable object at 0x...>."""
    from taca_probe.runner import probe

    pipe = pipes["tiny-flux"]
    t = taca(pipe, "step:1.5@970", lora_scale=0.5)
    with t:
        active = repr(t)
    objects = [(repr(t), ("taca(", "FluxPipeline", "step:1.5@970", "lora_scale=0.5", "num_inference_steps=None")),
               (repr(probe(pipe, tmp_path / "r.zarr", maps="steps=0")),
                ("probe(", "FluxPipeline", str(tmp_path / "r.zarr"), "schedule='none'", "steps=0", "mode='create'"))]
    for shown, needles in objects:
        assert "object at 0x" not in shown and "\n" not in shown and all(n in shown for n in needles), shown
    assert "active" in active and "active" not in repr(t)
    with pytest.raises(TypeError, match="taca.*gamma"):
        taca(pipe, gamma=1.2)  # refused where written, not at the with


@pytest.mark.parametrize("kwargs,needle", [({"path": 3}, "got int"), ({"attrs": {"lr": np.float32(1e-4)}}, "float32"),
                                           ({"attrs": {3: "x"}}, "[3]"), ({"attrs": ["x"]}, "got list"),
                                           ({"attrs": {"note": 1, "schedule": "none", "dtype": "x"}}, "dtype, schedule")])
def test_probe_refuses_a_path_or_attrs_a_store_cannot_hold_before_anything_runs(pipes, tmp_path, kwargs, needle):
    """Audit: probe(pipe, 3) raised os.fspath's TypeError; attrs={'lr': np.float32(...)} a TypeError from zarr's
    JSON encoder only after the first sample had run."""
    from taca_probe.runner import probe

    pipe = pipes["tiny-sd3"]
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(TacaProbeError) as e:
        with probe(pipe, **{"path": tmp_path / "r.zarr", **kwargs}) as run:
            run.sample("a red cube", num_inference_steps=1, height=32, width=32)
    assert needle in str(e.value) and "\n" not in str(e.value) and not (tmp_path / "r.zarr").exists()
    assert all(pipe.transformer.attn_processors[k] is v for k, v in before.items())


@pytest.mark.slow  # records one sample
def test_run_sample_refuses_an_argument_the_pipeline_does_not_take_naming_the_one_it_does(pipes, tmp_path):
    """Audit: run.sample(..., num_steps=2) raised the pipeline's TypeError on the first sample and, on a later
    one, 'other settings than this store's first sample: num_steps=2 (the first sample's: None)'."""
    from taca_probe.runner import probe

    tiny = {"num_inference_steps": 1, "height": 32, "width": 32}
    with probe(pipes["tiny-sd3"], tmp_path / "r.zarr") as run:
        for done in (0, 1):
            with pytest.raises(TacaProbeError, match="'num_steps'.*'num_inference_steps'"):
                run.sample("a red cube", seed=done, num_steps=2, **tiny)
            with pytest.raises(TacaProbeError, match="'bogus'.*guidance_scale") as e:
                run.sample("a red cube", seed=done, bogus=1, **tiny)
            assert "first sample" not in str(e.value) and (tmp_path / "r.zarr").exists() == bool(done)
            if not done:
                run.sample("a red cube", **tiny)


def test_a_run_shows_its_store_schedule_and_branch_in_a_notebook(pipes, tmp_path):
    from taca_probe.runner import probe

    with probe(pipes["tiny-flux"], tmp_path / "r.zarr", schedule="first:1.2@2", branch="cond") as run:
        shown = repr(run)
    assert "object at 0x" not in shown and "\n" not in shown
    assert all(s in shown for s in (str(tmp_path / "r.zarr"), "first:1.2@2", "cond", "active")) and "ended" in repr(run)
