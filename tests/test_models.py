"""Tests of taca_probe.models and taca_probe.tiny_models: embedded tiny pipelines, cache, loading,
devices/dtypes, support check, call settings."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from taca_probe import models, tiny_models
from taca_probe.errors import ModelError, TacaProbeError

# The random-weight recipes; the trained, shipped model has its own tests (tests/test_shapes.py).
NAMES = list(models.RANDOM_MODELS)
PROMPT = "A photo of a small red fox sitting in the snow at sunset, highly detailed"
T5_TOKENIZER = {"tiny-sd3": "tokenizer_3", "tiny-sd35": "tokenizer_3", "tiny-flux": "tokenizer_2"}


def one_line_error(excinfo: pytest.ExceptionInfo[ModelError], *expected: str) -> str:
    """The error message, after checking it is one line containing every expected fragment."""
    message = str(excinfo.value)
    assert isinstance(excinfo.value, TacaProbeError)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def loaded() -> dict[str, object]:
    """The three embedded pipelines, shared by the read-only tests of this module."""
    loaded = {name: models.load_pipeline(name, device="cpu") for name in NAMES}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------


def test_embedded_models_are_described_in_one_line() -> None:
    assert NAMES == ["tiny-sd3", "tiny-sd35", "tiny-flux"]
    assert models.DEFAULT_MODEL in models.EMBEDDED_MODELS
    assert set(NAMES) <= set(models.EMBEDDED_MODELS)
    for name, description in models.EMBEDDED_MODELS.items():
        assert "\n" not in description
        if name in NAMES:
            assert "random weights: exercises the machinery, not the science" in description
        else:
            assert "TRAINED" in description


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------


def test_sd3_structure(loaded: dict) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = loaded["tiny-sd3"]
    assert type(pipe) is StableDiffusion3Pipeline
    blocks = pipe.transformer.transformer_blocks
    assert len(blocks) == 3
    assert [b.context_pre_only for b in blocks] == [False, False, True]
    assert blocks[-1].attn.to_add_out is None  # the text output of the last block is discarded
    assert all(getattr(b, "attn2", None) is None for b in blocks)
    assert blocks[0].attn.norm_q is None  # SD3 (not 3.5) has no q/k norm


def test_sd35_structure(loaded: dict) -> None:
    blocks = loaded["tiny-sd35"].transformer.transformer_blocks
    assert len(blocks) == 3
    assert [b.context_pre_only for b in blocks] == [False, False, True]
    assert [getattr(b, "attn2", None) is not None for b in blocks] == [True, True, False]
    assert type(blocks[0].attn.norm_q).__name__ == "RMSNorm"
    assert loaded["tiny-sd35"].transformer.config.qk_norm == "rms_norm"


def test_flux_structure(loaded: dict) -> None:
    from diffusers import FluxPipeline

    pipe = loaded["tiny-flux"]
    assert type(pipe) is FluxPipeline
    assert len(pipe.transformer.transformer_blocks) == 2
    assert len(pipe.transformer.single_transformer_blocks) == 2
    assert pipe.transformer.config.guidance_embeds is True
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels


@pytest.mark.parametrize("name", NAMES)
def test_components(loaded: dict, name: str) -> None:
    from transformers import CLIPTokenizer, T5EncoderModel, T5Tokenizer

    pipe = loaded[name]
    assert type(pipe.tokenizer) is CLIPTokenizer
    assert type(getattr(pipe, T5_TOKENIZER[name])) is T5Tokenizer
    t5 = pipe.text_encoder_2 if name == "tiny-flux" else pipe.text_encoder_3
    assert type(t5) is T5EncoderModel
    # The CLIP pooling looks for the EOS id: text config and tokenizer must agree.
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.vae.config.latent_channels == 16
    scheduler = pipe.scheduler.config
    assert scheduler.shift == 3.0
    assert scheduler.use_dynamic_shifting == (name == "tiny-flux")
    n_params = sum(
        p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()
    )
    assert 200_000 < n_params < 1_500_000


@pytest.mark.parametrize("name", NAMES)
def test_tokenizers_cover_english(loaded: dict, name: str) -> None:
    pipe = loaded[name]
    clip = pipe.tokenizer
    ids = clip(PROMPT).input_ids
    tokens = clip.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert {"photo</w>", "fox</w>", "snow</w>", "sunset</w>"} <= set(tokens)  # whole words
    assert clip.decode(ids, skip_special_tokens=True) == PROMPT.lower().replace(",", " ,")
    assert clip.model_max_length == 77

    t5 = getattr(pipe, T5_TOKENIZER[name])
    assert t5.model_max_length >= 512  # SD3 passes max_sequence_length 256, FLUX 512
    ascii_text = PROMPT + " 0123456789 !?#$%&'()*+-./:;<=>@[]^_`{|}~ \\ \" ZEBRA"
    ids = t5(ascii_text).input_ids
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id
    assert {"▁photo", "▁fox", "▁snow"} <= set(t5.convert_ids_to_tokens(ids))


def test_check_supported(loaded: dict) -> None:
    from diffusers import SD3Transformer2DModel

    assert [models.check_supported(loaded[n]) for n in NAMES] == ["sd3", "sd3", "flux"]
    assert [models.check_supported(loaded[n].transformer) for n in NAMES] == ["sd3", "sd3", "flux"]

    class MySD3(SD3Transformer2DModel):
        pass

    sub = MySD3.from_config(loaded["tiny-sd3"].transformer.config)
    assert models.check_supported(sub) == "sd3"
    assert models.check_supported(types.SimpleNamespace(transformer=sub)) == "sd3"


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(64, 96), (128, 128)])
def test_two_step_generation(loaded: dict, name: str, size: tuple[int, int]) -> None:
    height, width = size

    def generate() -> np.ndarray:
        return loaded[name](
            PROMPT,
            num_inference_steps=2,
            height=height,
            width=width,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    image = generate()
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0  # not a constant image: the random networks do produce something
    np.testing.assert_array_equal(generate(), image)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_cache_layout(taca_cache: Path) -> None:
    path = models.embedded_model_path("tiny-sd3")
    assert path == taca_cache / "models" / f"tiny-sd3-v{tiny_models.RECIPE_VERSION}"
    assert (path / "model_index.json").is_file()
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert not list(path.parent.glob(".*building*"))  # no temporary folders left behind


def test_cache_location_falls_back_to_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TACA_PROBE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = models.embedded_model_path("tiny-flux")
    assert path == tmp_path / "xdg" / "taca-probe" / "models" / f"tiny-flux-v{tiny_models.RECIPE_VERSION}"
    assert (path / "model_index.json").is_file()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny_models._cache_root() == tmp_path / "home" / ".cache" / "taca-probe"


@pytest.mark.slow  # builds and loads a model twice
def test_second_use_loads_from_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    path = models.embedded_model_path("tiny-sd35")
    before = {f: f.stat().st_mtime_ns for f in path.rglob("*")}

    def no_rebuild(name: str, folder: Path) -> None:
        raise AssertionError(f"rebuilt {name} although it is cached")

    monkeypatch.setattr(tiny_models, "_build_into", no_rebuild)
    assert models.embedded_model_path("tiny-sd35") == path
    pipe = models.load_pipeline("tiny-sd35", device="cpu")
    assert models.check_supported(pipe) == "sd3"
    assert {f: f.stat().st_mtime_ns for f in path.rglob("*")} == before


def test_interrupted_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TACA_PROBE_CACHE", str(tmp_path))
    real_build = tiny_models._build_into

    def killed(name: str, folder: Path) -> None:
        (folder / "model_index.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_models, "_build_into", killed)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_path("tiny-flux")
    assert list((tmp_path / "models").iterdir()) == []

    monkeypatch.setattr(tiny_models, "_build_into", real_build)
    assert (models.embedded_model_path("tiny-flux") / "transformer").is_dir()


def test_concurrent_build_keeps_the_first_finished(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TACA_PROBE_CACHE", str(tmp_path))
    target = tmp_path / "models" / f"tiny-flux-v{tiny_models.RECIPE_VERSION}"
    real_build = tiny_models._build_into

    def racing(name: str, folder: Path) -> None:
        real_build(name, folder)
        # Meanwhile another process finished its build and renamed it into place.
        real_build(name, target)
        (target / "winner").write_text("other process")

    monkeypatch.setattr(tiny_models, "_build_into", racing)
    assert models.embedded_model_path("tiny-flux") == target
    assert (target / "winner").read_text() == "other process"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [target.name]


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_builds_are_identical(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    from transformers import CLIPTokenizer, T5Tokenizer

    first = models.embedded_model_path(name)
    monkeypatch.setenv("TACA_PROBE_CACHE", str(tmp_path))
    torch.manual_seed(12345)  # the build must not depend on (or disturb) the global RNG
    state = torch.random.get_rng_state()
    second = models.embedded_model_path(name)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert second != first

    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(first / weights), load_file(second / weights)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for sub, cls in [("tokenizer", CLIPTokenizer), (T5_TOKENIZER[name], T5Tokenizer)]:
        ids_a = cls.from_pretrained(first / sub)(PROMPT).input_ids
        assert cls.from_pretrained(second / sub)(PROMPT).input_ids == ids_a
    assert file_digests(first) == file_digests(second)  # byte for byte, every file


#: sha256 of each tiny model's weights (weights_digest below), computed over the folders built by
#: the recipes of commit e5d3205, the last one that trained the tokenizers at build time. A
#: mismatch means the built models changed (a recipe, or torch's / diffusers' initialisation):
#: bump tiny_models.RECIPE_VERSION, so that caches holding the old builds are not reused.
WEIGHT_DIGESTS = {
    "tiny-sd3": "03b71951c50dc15cedb2aabbe36261bd48b7a52fe7207ed32dc4bd62e65b9cbb",
    "tiny-sd35": "5583f9dcff0f047938cfb227d96dc90f6b807248101ead38f250d15f690daad3",
    "tiny-flux": "af57a0ad9b7334e783bf742394fe1d74e151bd12e2adeb2c84705c4b0b0b0196",
}


def weights_digest(folder: Path) -> str:
    """sha256 over every tensor (component/name, dtype, shape, raw bytes) of a pipeline folder."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*/*.safetensors")):
        tensors = load_file(file)
        for key in sorted(tensors):
            t = tensors[key].contiguous()
            digest.update(f"{file.parent.name}/{key}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_weights_match_the_recipe_version(name: str) -> None:
    assert weights_digest(models.embedded_model_path(name)) == WEIGHT_DIGESTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_built_tokenizers_are_the_shipped_files(name: str) -> None:
    """The shipped tokenizer files are what transformers saves for the tokenizers built from them
    (a fixed point: nothing is lost reading them), and every built model carries them unchanged."""
    data = Path(str(importlib.resources.files("taca_probe") / "tiny_models_data"))
    built = models.embedded_model_path(name)
    for sub, shipped in [("tokenizer", "clip"), (T5_TOKENIZER[name], "t5")]:
        assert file_digests(built / sub) == file_digests(data / shipped)


def _clip_reference_ids(text: str, vocab: dict[str, int], merges: list[list[str]]) -> list[int]:
    """OpenAI CLIP's BPE (simple_tokenizer.py), written out for ASCII text: lower-case, split into
    words, digits and punctuation runs, map bytes to GPT-2's printable characters, then merge the
    lowest-ranked adjacent pair until none applies; BOS first, EOS last."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    byte_map = {b: chr(b) if b in printable else chr(256 + [c for c in range(256) if c not in printable].index(b))
                for b in range(256)}
    rank = {tuple(m): i for i, m in enumerate(merges)}
    ids = [vocab["<|startoftext|>"]]
    for word in re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", " ".join(text.lower().split())):
        symbols = [byte_map[b] for b in word.encode()]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: rank.get(p, len(rank)))
            if pair not in rank:
                break
            i = next(i for i in range(len(symbols) - 1) if (symbols[i], symbols[i + 1]) == pair)
            symbols[i : i + 2] = [pair[0] + pair[1]]
        ids += [vocab[s] for s in symbols]
    return ids + [vocab["<|endoftext|>"]]


def _t5_reference_ids(text: str, pieces: list[list]) -> list[int]:
    """Unigram tokenization by Viterbi: each whitespace-separated word, prefixed with "▁", is cut
    into the pieces whose log-probabilities (scores) sum highest; </s> (id 1) last."""
    score = {p: (i, s) for i, (p, s) in enumerate(pieces) if i > 2}  # not <pad>, </s>, <unk>
    ids: list[int] = []
    for word in text.split():
        word = "▁" + word
        best: list[tuple[float, list[int]]] = [(0.0, [])] + [(-math.inf, [])] * len(word)
        for end in range(1, len(word) + 1):
            for start in range(end):
                if word[start:end] in score and best[start][0] > -math.inf:
                    i, s = score[word[start:end]]
                    if best[start][0] + s > best[end][0]:
                        best[end] = (best[start][0] + s, best[start][1] + [i])
        ids += best[-1][1]
    return ids + [1]


REFERENCE_PROMPTS = [PROMPT, "a red circle to the left of a blue square", "Two ZEBRAS, 3 dogs & a cat's toy!",
                     "antidisestablishmentarianism rocks"]


@pytest.mark.parametrize("name", NAMES)
def test_tokenization_matches_independent_references(loaded: dict, name: str) -> None:
    data = importlib.resources.files("taca_probe") / "tiny_models_data"
    clip = json.loads((data / "clip" / "tokenizer.json").read_text())["model"]
    t5 = json.loads((data / "t5" / "tokenizer.json").read_text())["model"]["vocab"]
    pipe = loaded[name]
    for text in REFERENCE_PROMPTS:
        assert pipe.tokenizer(text).input_ids == _clip_reference_ids(text, clip["vocab"], clip["merges"])
        assert getattr(pipe, T5_TOKENIZER[name])(text).input_ids == _t5_reference_ids(text, t5)


# ---------------------------------------------------------------------------------------------
# Devices and dtypes
# ---------------------------------------------------------------------------------------------


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device(None) == torch.device(expected)
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device(" CPU ") == torch.device("cpu")
    assert models.resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "", "cpu:0:1", "tpu", "cuda:01", "cuda:128", "cuda:999999999", "cuda:99999999999999999999"])
def test_bad_device(bad: str) -> None:
    with pytest.raises(ModelError) as excinfo:
        models.resolve_device(bad)
    one_line_error(excinfo, repr(bad), "cpu", "cuda", "cuda:N", "mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda() -> None:
    with pytest.raises(ModelError) as excinfo:
        models.resolve_device("cuda:0")
    one_line_error(excinfo, "'cuda:0'", "not available", "available: cpu")


def test_cuda_index_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (simulated) 2-GPU machine: ``cuda``, ``cuda:0`` and ``cuda:1`` resolve, ``cuda:2`` is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, index in [("cuda", None), ("CUDA:0", 0), ("cuda:1", 1)]:
        assert models.resolve_device(name) == torch.device("cuda", index)
    with pytest.raises(ModelError) as excinfo:
        models.resolve_device("cuda:2")
    one_line_error(excinfo, "'cuda:2'", "not available", "available: cpu, cuda, cuda:0, cuda:1")


def test_resolve_dtype() -> None:
    cpu = torch.device("cpu")
    assert models.resolve_dtype(None, cpu) is torch.float32
    if torch.cuda.is_available():
        assert models.resolve_dtype(None, torch.device("cuda")) in (torch.bfloat16, torch.float16)
    for names, dtype in [
        (("fp32", "float32", "FP32", "torch.float32"), torch.float32),
        (("bf16", "bfloat16"), torch.bfloat16),
        (("fp16", "float16"), torch.float16),
    ]:
        for name in names:
            assert models.resolve_dtype(name, cpu) is dtype
        assert models.resolve_dtype(dtype, cpu) is dtype


@pytest.mark.parametrize("bad", ["int8", "half", "", torch.int8, torch.float64])
def test_bad_dtype(bad: object) -> None:
    with pytest.raises(ModelError) as excinfo:
        models.resolve_dtype(bad, torch.device("cpu"))  # type: ignore[arg-type]
    one_line_error(excinfo, "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def test_load_with_dtype() -> None:
    pipe = models.load_pipeline("tiny-flux", device="cpu", dtype="bf16")
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_load_hub_id_from_local_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A hub id already in the local Hugging Face cache loads without the network."""
    import huggingface_hub.constants

    # A fake hub cache holding one snapshot of the tiny FLUX model as "taca-test/tiny-flux".
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--taca-test--tiny-flux"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(models.embedded_model_path("tiny-flux"), repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    pipe = models.load_pipeline("taca-test/tiny-flux", device="cpu", dtype="bf16")
    assert models.check_supported(pipe) == "flux"
    assert pipe.transformer.dtype == torch.bfloat16

    with pytest.raises(ModelError) as excinfo:
        models.load_pipeline("taca-test/not-downloaded", device="cpu")
    one_line_error(excinfo, "hf download taca-test/not-downloaded", *NAMES)


def test_unknown_model() -> None:
    with pytest.raises(ModelError) as excinfo:
        models.load_pipeline("no-such-org/no-such-model-for-taca-probe", device="cpu")
    one_line_error(excinfo, *NAMES, "local folder", "Hugging Face cache", "hf download")


def test_not_a_model_id_nor_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as excinfo:
        models.load_pipeline(str(tmp_path / "missing" / "deeper" / "folder"), device="cpu")
    one_line_error(excinfo, *NAMES, "local folder")


def test_unknown_embedded_name() -> None:
    with pytest.raises(ModelError) as excinfo:
        models.embedded_model_path("tiny-sdxl")
    one_line_error(excinfo, "'tiny-sdxl'", *NAMES)


def test_folder_without_model_index(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError) as excinfo:
        models.load_pipeline(str(tmp_path), device="cpu")
    one_line_error(excinfo, "model_index.json", *NAMES)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0")
    with pytest.raises(ModelError) as excinfo:
        models.load_pipeline(checkpoint, device="cpu")
    one_line_error(excinfo, "not a diffusers folder", "model_index.json")


def test_broken_folder(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models.embedded_model_path("tiny-flux"), broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError) as excinfo:
        models.load_pipeline(broken, device="cpu")
    assert excinfo.value.__cause__ is not None
    one_line_error(excinfo, "cannot load", str(broken))


def test_unwritable_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("TACA_PROBE_CACHE", str(not_a_folder))
    with pytest.raises(ModelError) as excinfo:
        models.load_pipeline("tiny-sd3", device="cpu")
    one_line_error(excinfo, "TACA_PROBE_CACHE")


def test_unsupported_transformer() -> None:
    with pytest.raises(ModelError) as excinfo:
        models.check_supported(torch.nn.Linear(2, 2))
    one_line_error(excinfo, "Linear", "SD3Transformer2DModel", "FluxTransformer2DModel")

    with pytest.raises(ModelError) as excinfo:
        models.check_supported(types.SimpleNamespace(transformer=torch.nn.Conv2d(1, 1, 1)))
    one_line_error(excinfo, "Conv2d", "SD3Transformer2DModel", "FluxTransformer2DModel")


def test_pipeline_without_transformer() -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ModelError) as excinfo:
        models.check_supported(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
    one_line_error(excinfo, "DDPMPipeline", "SD3Transformer2DModel", "FluxTransformer2DModel")


# ---------------------------------------------------------------------------------------------
# Call settings
# ---------------------------------------------------------------------------------------------


def test_call_settings_fall_back_to_the_pipeline_size_and_28_steps(loaded: dict) -> None:
    pipe = loaded["tiny-sd3"]  # no recommended settings; default_sample_size 32 x VAE factor 8
    assert models.call_settings(pipe) == {"num_inference_steps": 28, "height": 256, "width": 256}
    assert models.call_settings(pipe, {"height": 64, "guidance_scale": None}, model="tiny-sd3") == {
        "height": 64, "num_inference_steps": 28, "width": 256}  # None means "not given"
    assert models.call_settings(pipe, {"width": 128}, default_steps=None, default_size=64) == {
        "width": 128, "height": 64}
    assert models.call_settings(types.SimpleNamespace(), default_steps=5) == {
        "num_inference_steps": 5, "height": 1024, "width": 1024}  # diffusers' 128 x 8


def test_call_settings_put_the_user_over_the_model_over_the_fallbacks() -> None:
    pipe = types.SimpleNamespace(default_sample_size=8, vae_scale_factor=8)  # no folder to read
    recommended = models.model_call_defaults("shapes")
    assert {"height", "width", "num_inference_steps", "max_sequence_length"} <= recommended.keys()
    assert models.call_settings(pipe, model="shapes") == recommended
    assert models.call_settings(pipe, model="shapes", default_steps=None, default_size=1) == recommended
    got = models.call_settings(pipe, {"num_inference_steps": 3, "max_sequence_length": None}, model="shapes")
    assert got == {**recommended, "num_inference_steps": 3}
    assert models.call_settings(pipe, model=pipe) == {"num_inference_steps": 28, "height": 64, "width": 64}

