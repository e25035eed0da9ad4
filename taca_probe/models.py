"""Models: the embedded tiny pipelines, loading, devices and dtypes, and the supported-model check.

taca-probe works on MM-DiT diffusion transformers in diffusers: Stable Diffusion 3 / 3.5
(``SD3Transformer2DModel``) and FLUX.1 (``FluxTransformer2DModel``). So that everything can be
exercised without downloading multi-gigabyte checkpoints, three tiny pipelines are embedded as
*recipes*: they are built offline from configs with random (but seeded, hence reproducible)
weights, saved once into a cache folder, and loaded from there with ``from_pretrained`` like any
other diffusers folder. They exercise the machinery (hooks, processors, schedules, pipelines), not
the science: their images are noise.

One embedded model is *trained*: ``shapes``, a tiny Stable Diffusion 3 pipeline trained on the
procedural shapes dataset of :mod:`taca_probe.shapes`, whose weights ship inside the package (no
build, no cache). It follows colour / shape / spatial-relation prompts, so its attention means
something, and :mod:`taca_probe.shapes.evaluator` scores its images exactly. It is the default.

Heavy libraries (diffusers, transformers) are imported inside the functions that need them, so
that importing this module (e.g. for ``taca-probe --help``) stays fast.
"""

from __future__ import annotations

import contextlib
import difflib
import heapq
import io
import os
import re
import shutil
import tempfile
import time
import warnings
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "RANDOM_MODELS",
    "RECIPE_VERSION",
    "SHIPPED_MODELS",
    "check_supported",
    "embedded_model_path",
    "load_pipeline",
    "model_call_defaults",
    "model_family",
    "resolve_device",
    "resolve_dtype",
]

#: Bump whenever a recipe changes (configs, seeds, tokenizer corpus): the cache folder name
#: carries it, so old builds are never silently reused for a new recipe.
RECIPE_VERSION = 1

_RANDOM = "random weights: exercises the machinery, not the science"

#: Trained embedded models whose weights ship inside the package: name -> (package, folder).
SHIPPED_MODELS: dict[str, tuple[str, str]] = {"shapes": ("taca_probe.shapes", "weights")}

#: The random-weight recipes (built into the cache on first use), for tests that need a
#: particular architecture.
RANDOM_MODELS: tuple[str, ...] = ("tiny-sd3", "tiny-sd35", "tiny-flux")

#: Name of the file, next to a pipeline's model_index.json, that holds its recommended
#: ``pipe(...)`` arguments (written by ``python -m taca_probe.shapes.train``).
CALL_DEFAULTS_FILE = "call_defaults.json"

#: Embedded tiny pipelines, name -> one-line description.
EMBEDDED_MODELS: dict[str, str] = {
    "shapes": (
        "tiny Stable Diffusion 3 pipeline (6 joint blocks, 256 image + 32 text tokens, 64x64 px) TRAINED on "
        "procedural coloured shapes: follows prompts like 'a red circle to the left of a blue square'"
    ),
    "tiny-sd3": (
        "tiny Stable Diffusion 3 pipeline (3 joint blocks, the last context_pre_only; CLIP-L/G + T5); "
        + _RANDOM
    ),
    "tiny-sd35": (
        "tiny Stable Diffusion 3.5-style pipeline (3 joint blocks, dual attention in blocks 0-1, "
        "RMSNorm q/k; CLIP-L/G + T5); " + _RANDOM
    ),
    "tiny-flux": (
        "tiny FLUX.1-dev-style pipeline (2 joint + 2 single-stream blocks, guidance embedding; "
        "CLIP-L + T5); " + _RANDOM
    ),
}

#: The model used when none is named: the trained one, whose attention means something.
DEFAULT_MODEL = "shapes"


# --------------------------------------------------------------------------------------------
# Devices and dtypes
# --------------------------------------------------------------------------------------------

_DEVICE_FORMS = "cpu, cuda, cuda:N (N = GPU index), mps"
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn a device name into a :class:`torch.device` that exists on this machine.

    Parameters
    ----------
    device : str, torch.device or None
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (case-insensitive). ``None`` picks
        ``"cuda"`` when CUDA is available, else ``"cpu"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ModelError
        If the name is malformed, or names a device this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    if not _DEVICE_RE.match(text):
        raise ModelError(f"invalid device {str(device)!r}; valid forms: {_DEVICE_FORMS}")
    resolved = torch.device(text)
    # Fail here, with a message naming what exists, rather than deep inside the first .to().
    available = _available_devices()
    if resolved.type == "cuda":
        index = resolved.index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ModelError(
                f"device {text!r} is not available on this machine; available: {', '.join(available)}"
                f" (valid forms: {_DEVICE_FORMS})"
            )
    elif resolved.type == "mps" and "mps" not in available:
        raise ModelError(
            f"device 'mps' is not available on this machine; available: {', '.join(available)}"
            f" (valid forms: {_DEVICE_FORMS})"
        )
    return resolved


_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_DTYPE_CHOICES = "fp32 (float32), bf16 (bfloat16), fp16 (float16)"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Turn a dtype name into a :class:`torch.dtype`, with a per-device default.

    Parameters
    ----------
    dtype : str, torch.dtype or None
        One of ``"fp32"``/``"float32"``, ``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``
        (case-insensitive, an optional ``"torch."`` prefix is allowed), the matching
        :class:`torch.dtype`, or ``None`` for the default: bfloat16 on CUDA (float16 on GPUs
        without bfloat16 support), float32 elsewhere.
    device : torch.device
        The device the model will run on (decides the default).

    Returns
    -------
    torch.dtype

    Raises
    ------
    ModelError
        If ``dtype`` is not one of the choices above.
    """
    if dtype is None:
        if torch.device(device).type == "cuda":
            # Pre-Ampere GPUs emulate bf16 slowly; fp16 is their native half type.
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ModelError(f"unsupported dtype {dtype}; choose one of: {_DTYPE_CHOICES}")
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"invalid dtype {str(dtype)!r}; choose one of: {_DTYPE_CHOICES}")
    return _DTYPES[key]


# --------------------------------------------------------------------------------------------
# Supported models
# --------------------------------------------------------------------------------------------

_SUPPORTED = "SD3Transformer2DModel (SD3, SD3.5) or FluxTransformer2DModel (FLUX.1)"


def check_supported(pipe_or_transformer: Any) -> str:
    """Say which MM-DiT family a pipeline or transformer belongs to.

    Parameters
    ----------
    pipe_or_transformer : DiffusionPipeline or torch.nn.Module
        A pipeline (its ``.transformer`` is checked) or a bare transformer module. Subclasses of the
        supported classes pass, and a ``torch.compile`` wrapper is looked through.

    Returns
    -------
    str
        ``"sd3"`` for ``SD3Transformer2DModel`` (SD3 and SD3.5), ``"flux"`` for
        ``FluxTransformer2DModel`` (FLUX.1).

    Raises
    ------
    ModelError
        If there is no transformer, or its class is not supported.
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    obj = pipe_or_transformer
    if isinstance(obj, torch.nn.Module):
        transformer = obj
    else:
        transformer = getattr(obj, "transformer", None)
        if transformer is None:
            raise ModelError(
                f"unsupported model: {type(obj).__name__} has no MM-DiT transformer; "
                f"taca-probe supports pipelines whose transformer is {_SUPPORTED}"
            )
    # torch.compile returns an OptimizedModule that keeps the real module in _orig_mod.
    transformer = getattr(transformer, "_orig_mod", transformer)
    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    raise ModelError(
        f"unsupported model: transformer class {type(transformer).__name__} is not supported; "
        f"supported transformer classes: {_SUPPORTED}"
    )


#: Alias of :func:`check_supported`, for code that reads better asking for the family.
model_family = check_supported


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return f"{type(exc).__name__}: {line.strip()}"
    return type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers/transformers info, warnings and progress bars, restoring them after.

    Used around building and loading the embedded models, whose loading chatter ("Loading pipeline
    components...", torchvision fallbacks of unused image processors) says nothing useful.
    """
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = (
        dlog.get_verbosity(),
        dlog.is_progress_bar_enabled(),
        tlog.get_verbosity(),
        tlog.is_progress_bar_enabled(),
    )
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(saved[0])
        (dlog.enable_progress_bar if saved[1] else dlog.disable_progress_bar)()
        tlog.set_verbosity(saved[2])
        (tlog.enable_progress_bar if saved[3] else tlog.disable_progress_bar)()


def _hub_cached(model: str) -> bool | None:
    """Whether ``model`` is a Hugging Face repo id with a model_index.json in the local HF cache.

    Returns None when ``model`` is not even a valid repo id.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return None
    try:
        found = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # noqa: BLE001 - a cache we cannot read counts as "not cached"
        return False
    return isinstance(found, str)


def load_pipeline(
    model: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> DiffusionPipeline:
    """Load a diffusers pipeline, without touching the network.

    Parameters
    ----------
    model : str or os.PathLike
        One of :data:`EMBEDDED_MODELS` (built into the cache on first use), a local diffusers folder
        (a directory containing ``model_index.json``), or a Hugging Face hub id that is already in
        the local Hugging Face cache (e.g. fetched with ``hf download <id>``), tried in that order
        (write ``./tiny-sd3`` for a folder that shares an embedded model's name).
    device : str, torch.device or None
        See :func:`resolve_device`.
    dtype : str, torch.dtype or None
        See :func:`resolve_dtype`.

    Returns
    -------
    diffusers.DiffusionPipeline
        The pipeline, moved to ``device``. It is not checked for support: call
        :func:`check_supported` for that.

    Raises
    ------
    ModelError
        If the model cannot be found locally, or loading it fails.
    """
    model = os.fspath(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    quiet = False
    if model in EMBEDDED_MODELS:
        source: str | Path = embedded_model_path(model)
        what = f"embedded model {model!r} from {source}"
        hint = "; reinstall taca-probe" if model in SHIPPED_MODELS else f"; delete {source} to rebuild it"
        quiet = True
    elif os.path.exists(os.path.expanduser(model)):
        folder = Path(os.path.expanduser(model))
        if not folder.is_dir():
            raise ModelError(
                f"model {model!r} is a file, not a diffusers folder; pass a folder containing "
                f"model_index.json (single-file checkpoints are not supported), a hub id, or one of "
                f"the embedded models: {', '.join(EMBEDDED_MODELS)}"
            )
        if not (folder / "model_index.json").is_file():
            raise ModelError(
                f"folder {model!r} is not a diffusers pipeline folder (it has no model_index.json); "
                f"pass a folder saved with save_pretrained, a hub id, or one of the embedded models: "
                f"{', '.join(EMBEDDED_MODELS)}"
            )
        source, what, hint = folder, f"folder {model!r}", ""
    else:
        cached = _hub_cached(model)
        if not cached:
            why = (
                "not in the local Hugging Face cache; fetch it with `hf download "
                f"{model}` and retry, or pass a local folder"
                if cached is False
                else "not a valid Hugging Face model id"
            )
            close = difflib.get_close_matches(model, list(EMBEDDED_MODELS), n=1, cutoff=0.6)
            if close:  # a misspelled embedded name is likelier than an uncached hub id
                raise ModelError(f"unknown model {model!r}: did you mean {close[0]!r}? (embedded models: "
                                 f"{', '.join(EMBEDDED_MODELS)}; it is also no local folder, and {why})")
            raise ModelError(
                f"model {model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor an "
                f"existing local folder, and is {why}"
            )
        source, what = model, f"hub model {model!r} from the local Hugging Face cache"
        hint = f"; it may be incomplete: run `hf download {model}` and retry"

    from diffusers import DiffusionPipeline

    with _quiet() if quiet else contextlib.nullcontext():
        try:
            # dtype= (not the deprecated torch_dtype=); local_files_only so nothing is downloaded.
            pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one readable line
            raise ModelError(f"cannot load {what}: {_first_line(exc)}{hint}") from exc
        # Inside _quiet for the embedded models: diffusers' "fp16 cannot run on the CPU" warning
        # is stale (torch 2.13 runs the tiny models in fp16 on the CPU).
        pipe = pipe.to(torch_device)
    # The name as the user gave it ("shapes", not the package folder): stores record it, as the CLI does.
    pipe._taca_probe_model = model
    return pipe


def model_name(pipe: Any) -> str:
    """The name a pipeline was loaded by (:func:`load_pipeline`), else its ``name_or_path``."""
    return str(getattr(pipe, "_taca_probe_model", None) or getattr(pipe, "name_or_path", None)
               or getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")


# --------------------------------------------------------------------------------------------
# Embedded tiny models: tokenizers
# --------------------------------------------------------------------------------------------

# Fixed English corpus the tiny tokenizers are trained on: prompt-like sentences plus a word list,
# so that ordinary prompts mostly become whole-word tokens instead of single characters (which
# would overflow CLIP's 77-token window after ~75 characters). The last lines hold every printable
# ASCII character so that the T5 tokenizer (no byte fallback) maps none of them to <unk>.
_CORPUS = r"""
a photo of a cat sitting on a wooden table next to a cup of coffee
a red apple and a green pear on a white plate
an astronaut riding a horse on the moon, digital art
a watercolor painting of a small village by the sea at sunset
a portrait of an old man with a long white beard, dramatic lighting
a dog playing with a ball in the park on a sunny day
a bowl of soup with bread on the side, top view
a futuristic city skyline at night with neon lights and flying cars
two children reading a book under a large oak tree
a blue car parked in front of a yellow house
a mountain lake surrounded by pine trees, reflection in the water
a close-up photograph of a butterfly on a purple flower
an oil painting of a ship in a storm with huge waves
a cozy living room with a fireplace, a sofa and a sleeping cat
a robot holding a sign that says "hello world"
a teddy bear wearing a hat and glasses, studio photo
three birds sitting on a power line against a gray sky
a woman in a black dress walking down a rainy street in Paris
a plate of pasta with tomato sauce and fresh basil
a snowy forest with a wooden cabin and smoke from the chimney
the word "TACA" written in large letters on a brick wall
a fox standing in tall grass during the golden hour
an isometric illustration of a tiny island with a lighthouse
a glass of orange juice on a kitchen counter, morning light
a black and white photo of a busy train station in 1950
a giraffe and a zebra eating leaves from a tall tree in Africa
a pixel art castle on a hill under a starry sky
a bicycle leaning against a fence in a field of sunflowers
a chef cooking in a restaurant kitchen, motion blur
a cartoon drawing of a happy frog on a lily pad
a hot air balloon floating over green hills and a river
an elephant walking across a dusty road, wide angle
a pair of red shoes on a blue carpet
a girl with an umbrella standing in the snow
a large stone bridge over a river in an old European town
a basket full of fruits: bananas, grapes, oranges and strawberries
a modern kitchen with marble countertops and a window
a yellow taxi driving through New York City traffic
a cup of tea and a slice of chocolate cake on a small round table
a sculpture of a horse made of glass, museum lighting
a lion resting on a rock, national geographic style
a medieval knight in shining armor holding a sword and a shield
a soccer player kicking a ball in a stadium full of people
a vase with roses, tulips and daisies, still life
a beach with palm trees, white sand and clear turquoise water
a cute baby panda eating bamboo, 4k, highly detailed
a spaceship landing on a red desert planet with two suns
a colorful street market with fruit, vegetables and spices
a man riding a motorcycle on a country road in the evening
a dragon flying over a burning castle, fantasy concept art
a small boat on a calm lake at dawn, mist over the water
an owl perched on a branch at night under a full moon
a map of an imaginary kingdom drawn with ink on old paper
a laptop, a notebook and a pen on a desk, flat lay
a white horse running on the beach, cinematic, 35mm film
a group of friends having a picnic in a meadow
a penguin wearing a scarf, 3d render, soft shadows
a steaming cup of cappuccino with latte art shaped like a heart
a tall waterfall in a tropical jungle with green plants
a young boy flying a kite on a windy hill
an abstract painting with circles, squares and triangles in bright colors
a city street after rain, wet asphalt reflecting the lights
a wooden chair and a table in an empty room with a large window
a sheep, a cow and a pig standing near a red barn on a farm
a girl in a green sweater holding a puppy, bokeh background
a desert landscape with cactus plants and a rocky canyon
a poster of a rock concert with a guitar and a microphone
a close-up of a human eye with a blue iris, macro photography
a pizza with cheese, mushrooms and olives on a wooden board
a train crossing a bridge in the mountains in autumn
an anime style illustration of a girl with short pink hair
a clock tower in the center of a town square, blue hour
a jellyfish glowing in the deep dark ocean
a brown bear catching a fish in a river
a bedroom with a bed, a lamp and plants on the shelves
a photo taken from above of a crowded swimming pool in summer
a knitted sweater with a pattern of stars and stripes
a tiger hiding behind green leaves, eyes looking at the camera
an empty road through a field of wheat under a cloudy sky
a small robot and a big robot shaking hands
a logo for a coffee shop with a bean and a cup, vector design
three apples on the left of a bowl and two lemons on the right
a cat to the left of a dog, and a bird above them
a green cube on top of a red sphere next to a blue cylinder
a person wearing a winter coat, a wool hat and gloves
a sailboat on the ocean, impressionist painting in the style of Monet
the a an and or of in on at to for with from by over under above below between behind beside
near next into onto through across around inside outside before after during while is are was
were be been has have had do does did can will would should could may might this that these
those it its he she they them his her their my your our we you I me us one two three four five
six seven eight nine ten hundred thousand first second third last red orange yellow green blue
purple pink brown black white gray grey gold silver golden cyan magenta violet beige cream dark
light bright pale deep vivid colorful man woman boy girl child children baby people person
friend family crowd king queen cat cats dog dogs bird birds horse horses fish cow pig sheep goat
rabbit mouse bear lion tiger wolf fox deer monkey elephant giraffe zebra panda owl eagle duck
chicken frog snake turtle whale shark dolphin octopus butterfly bee spider insect dragon unicorn
dinosaur tree trees flower flowers grass leaf leaves forest garden park field meadow plant
plants mountain mountains hill hills river lake sea ocean beach island desert valley canyon cave
sky cloud clouds sun moon star stars rain snow wind storm fog mist rainbow lightning ice fire
water stone rock sand wood metal glass paper plastic gold steel cloth leather city town village
street road bridge building house home castle tower church temple room kitchen bedroom bathroom
office school library museum shop store restaurant cafe door window wall floor roof stairs table
chair bed sofa lamp shelf desk mirror clock car cars bus truck train plane airplane boat ship
bicycle bike motorcycle rocket spaceship food bread cake pizza pasta soup salad rice apple
banana orange grape lemon cherry coffee tea milk juice wine beer chocolate cheese egg meat
sandwich burger cookie shirt dress hat coat shoes boots glasses jacket scarf gloves bag umbrella
necklace ring head face eye eyes hair hand hands arm leg foot body smile mouth nose ear big
small large tiny huge tall short long wide narrow old young new ancient modern happy sad angry
calm quiet loud beautiful ugly cute scary strange funny serious hot cold warm cool wet dry soft
hard smooth rough clean dirty empty full heavy round square flat sharp thin thick fat fast slow
high low open closed sitting standing walking running flying swimming eating drinking reading
writing playing holding wearing looking smiling sleeping dancing singing jumping riding painting
drawing photo photograph picture image illustration sketch render poster art artist style
realistic photorealistic abstract surreal minimalist vintage retro cinematic dramatic detailed
highly sharp focus blur bokeh lighting shadow shadows portrait landscape close-up closeup macro
wide angle view top side front back morning afternoon evening night dawn dusk sunrise sunset day
summer winter spring autumn camera lens film digital oil watercolor pencil ink charcoal acrylic
canvas 3d 4k 8k hd unreal engine octane trending artstation concept fantasy science fiction left
right up down middle center corner edge background foreground very quite too more most less
least much many some all every each no not what where when who how why which there here
a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
! " # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \ ] ^ _ ` { | } ~
"""

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_MAX_LENGTH = 77  # CLIP's context; the SD3/FLUX pipelines read it from model_max_length
_T5_MAX_LENGTH = 512  # pipelines pass max_sequence_length (SD3 256, FLUX 512), at most 512
_T5_VOCAB_SIZE = 2000  # a soft limit (hard_vocab_limit=False): the corpus yields ~1500


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 bytes onto printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _learn_bpe(words: dict[tuple[str, ...], int]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol, deterministically.

    ``tokenizers``' BpeTrainer breaks ties between equally frequent pairs differently from one
    process to the next (hash-map order), which would make the "fixed" tokenizer vary between
    builds; here ties go to the lexicographically smallest pair. Pair counts are updated
    incrementally (a max-heap with lazy deletion), so the ~1500 merges take milliseconds.
    """
    symbols = [list(w) for w in words]
    freqs = list(words.values())
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:
            continue  # stale heap entry: the count changed since it was pushed
        merges.append(pair)
        joined = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            old = symbols[i]
            new: list[str] = []
            j = 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == pair[0] and old[j + 1] == pair[1]:
                    new.append(joined)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            if new == old:
                continue
            for p in zip(old, old[1:]):
                counts[p] -= freqs[i]
                touched.add(p)
            for p in zip(new, new[1:]):
                counts[p] += freqs[i]
                where[p].add(i)
                touched.add(p)
            symbols[i] = new
        for p in sorted(touched):
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
    return merges


def _build_clip_tokenizer() -> Any:
    """A real byte-level BPE CLIPTokenizer: CLIP's vocabulary layout with merges from the corpus.

    Layout as in OpenAI's CLIP: the 256 byte symbols, the same with the end-of-word marker
    ``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` last (so the EOS
    token has the highest id, which CLIPTextModel's pooling relies on for legacy configs). Any
    text tokenizes without <unk>: unseen words fall back to byte symbols.
    """
    from transformers import CLIPTokenizer

    # Reuse CLIPTokenizer's own normalizer and pre-tokenizer, so training sees exactly the words
    # (lower-cased, byte-mapped) that tokenization will see.
    backend = CLIPTokenizer().backend_tokenizer
    word_counts: dict[tuple[str, ...], int] = defaultdict(int)
    for line in _CORPUS.splitlines():
        normalized = backend.normalizer.normalize_str(line)
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
            word_counts[(*piece[:-1], piece[-1] + "</w>")] += 1
    merges = _learn_bpe(dict(sorted(word_counts.items())))

    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += [a + b for a, b in merges]
    tokens += [_CLIP_BOS, _CLIP_EOS]
    vocab: dict[str, int] = {}
    for token in tokens:  # a merge can recreate a byte+</w> symbol; keep the first id
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LENGTH)


def _build_t5_tokenizer() -> Any:
    """A real unigram T5Tokenizer from a sentencepiece model trained in-process on the corpus.

    Ids follow T5: <pad>=0, </s>=1, <unk>=2. No sentinel tokens (``extra_ids=0``): the text
    encoder never sees them. Passing the (piece, score) list as ``vocab=`` is the way that works
    in transformers 5 (``vocab_file=`` is silently ignored there).
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    # Unigram training on the sentences alone keeps few whole words (each is seen only a few
    # times); repeating every corpus word (and its capitalised form) as a sentence of its own makes
    # most of them single pieces, as in the real T5 vocabulary.
    words = sorted({w for word in re.findall(r"[A-Za-z0-9'-]+", _CORPUS) for w in (word, word.capitalize())})
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() + words * 4),
        model_writer=model,
        model_type="unigram",
        vocab_size=_T5_VOCAB_SIZE,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",  # T5Tokenizer(vocab=...) applies no normalizer
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # single-threaded EM: the same pieces and scores every time
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


# --------------------------------------------------------------------------------------------
# Embedded tiny models: networks
# --------------------------------------------------------------------------------------------

# Size rules that tie the components together (see the diffusers MM-DiT notes):
# SD3: caption_projection_dim = heads * head_dim; pooled_projection_dim = sum of the two CLIP
# projection dims; 2 * CLIP hidden <= T5 d_model (the CLIP pair is zero-padded to T5's width).
# FLUX: sum(axes_dims_rope) = head_dim; in_channels = 4 * VAE latent channels (2x2 packing);
# pooled_projection_dim = CLIP hidden size.
_CLIP_HIDDEN = 32
_T5_DIM = 64
_LATENT_CHANNELS = 16


def _seeded(key: str) -> None:
    # One seed per component, derived from a stable name: a component's weights do not depend
    # on what was built before it. The two SD3 variants share text encoders and VAE.
    torch.manual_seed(zlib.crc32(key.encode()))


def _clip_text_encoder(key: str, vocab_size: int, hidden_act: str, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=2 * _CLIP_HIDDEN,
        projection_dim=_CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        # The pooled output is taken at the first EOS token: its id must match the tokenizer's.
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    _seeded(key)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5_encoder(vocab_size: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(  # T5 v1.1 style, like the T5-XXL encoder of SD3 and FLUX
        vocab_size=vocab_size,
        d_model=_T5_DIM,
        d_kv=16,
        d_ff=2 * _T5_DIM,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    _seeded("t5")
    return T5EncoderModel(config).eval()


def _vae(key: str, scaling_factor: float, shift_factor: float) -> Any:
    from diffusers import AutoencoderKL

    _seeded(key)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four levels: three downsamplings, so the VAE scale factor is 8 as in the real models.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=_LATENT_CHANNELS,
        sample_size=64,
        # The real SD3 / FLUX VAEs have no quant convs and these latent normalisations.
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def _build_sd3(name: str) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tokenizer = _build_clip_tokenizer()
    t5_tokenizer = _build_t5_tokenizer()
    sd35 = name == "tiny-sd35"
    _seeded(f"{name}/transformer")
    transformer = SD3Transformer2DModel(
        sample_size=32,  # default image size 32 * 8 = 256 px
        patch_size=2,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        num_layers=3,  # diffusers makes the last block context_pre_only by itself
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=2 * 16,
        pooled_projection_dim=2 * _CLIP_HIDDEN,
        # The positional table is cropped to the latent grid: 64 patches = 1024 px at most.
        pos_embed_max_size=64,
        dual_attention_layers=(0, 1) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        # SD3 and SD3.5 ship shift 3.0 without dynamic shifting.
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae("sd3/vae", scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text_encoder("sd3/clip_l", len(clip_tokenizer), "quick_gelu", True),
        tokenizer=clip_tokenizer,
        text_encoder_2=_clip_text_encoder("sd3/clip_g", len(clip_tokenizer), "gelu", True),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=_t5_encoder(len(t5_tokenizer)),
        tokenizer_3=t5_tokenizer,
    )


def _build_flux(name: str) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tokenizer = _build_clip_tokenizer()
    t5_tokenizer = _build_t5_tokenizer()
    _seeded(f"{name}/transformer")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,  # latents are packed 2x2
        num_layers=2,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_CLIP_HIDDEN,
        guidance_embeds=True,  # FLUX.1-dev (guidance-distilled)
        axes_dims_rope=(4, 6, 6),
    ).eval()
    return FluxPipeline(
        transformer=transformer,
        # FLUX.1-dev's scheduler: resolution-dependent shift between 0.5 and 1.15.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae("flux/vae", scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_encoder("flux/clip_l", len(clip_tokenizer), "quick_gelu", False),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5_encoder(len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
    )


def _build_into(name: str, folder: Path) -> None:
    """Build embedded model ``name`` and save it (safetensors) into the existing ``folder``."""
    with _quiet(), torch.random.fork_rng(devices=[]):
        # fork_rng: seeding for the build must not disturb the caller's global RNG stream.
        saved_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            pipe = _build_flux(name) if name == "tiny-flux" else _build_sd3(name)
        finally:
            torch.set_default_dtype(saved_dtype)
        pipe.save_pretrained(folder, safe_serialization=True)


# --------------------------------------------------------------------------------------------
# Shipped (trained) models and recommended call settings
# --------------------------------------------------------------------------------------------


def _shipped_path(name: str) -> Path:
    """The folder of a shipped model inside the installed package, checked to be complete."""
    import importlib.resources

    package, folder = SHIPPED_MODELS[name]
    path = Path(str(importlib.resources.files(package) / folder))
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"embedded model {name!r} has no weights at {path} (incomplete installation); reinstall "
            f"taca-probe, or train them with `python -m {package}.train --out DIR` and pass DIR/pipeline as the model"
        )
    return path


def _pipeline_folder(pipe: Any) -> Path | None:
    source = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not source:
        return None
    path = Path(os.path.expanduser(str(source)))
    return path if path.is_dir() else None


def model_call_defaults(model: str | os.PathLike[str] | Any) -> dict[str, Any]:
    """The recommended ``pipe(...)`` arguments of a model (size, steps, guidance, text length).

    Trained models need them: the shapes model was trained with 16 T5 tokens, and the SD3
    pipeline's default ``max_sequence_length=256`` would append 240 padding tokens it never saw.

    Parameters
    ----------
    model : str, os.PathLike or DiffusionPipeline
        An embedded model name, a local pipeline folder, or a loaded pipeline (its source folder is
        looked up). The settings come from ``call_defaults.json`` next to ``model_index.json``
        (written by ``python -m taca_probe.shapes.train``).

    Returns
    -------
    dict
        E.g. ``{"height": 64, "width": 64, "num_inference_steps": 25, "guidance_scale": 5.0,
        "max_sequence_length": 16}``; empty for models without such a file (the random tiny models,
        hub models, other folders). A new dict each call: the caller may change it.

    Raises
    ------
    ModelError
        If a shipped model's weights are missing, or its call_defaults.json is unreadable.
    """
    import json

    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        if name in SHIPPED_MODELS:
            folder: Path | None = _shipped_path(name)
        elif name in EMBEDDED_MODELS:
            return {}
        else:
            path = Path(os.path.expanduser(name))
            folder = path if path.is_dir() else None
    else:
        folder = _pipeline_folder(model)
    if folder is None or not (folder / CALL_DEFAULTS_FILE).is_file():
        return {}
    try:
        data = json.loads((folder / CALL_DEFAULTS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {folder / CALL_DEFAULTS_FILE}: {_first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{folder / CALL_DEFAULTS_FILE} must hold a JSON object of pipe(...) arguments")
    return data


def call_settings(pipe: Any, model: str | os.PathLike[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """The ``pipe(...)`` arguments of a run: ``overrides`` that are not None, else the model's
    recommended ones (:func:`model_call_defaults` of ``model``, else of ``pipe``), else 28 steps at
    the pipeline's default size. Always holds ``num_inference_steps``, ``height`` and ``width``."""
    call = model_call_defaults(model if model is not None else pipe)
    call.update({k: v for k, v in overrides.items() if v is not None})
    size = int(getattr(pipe, "default_sample_size", 128)) * int(getattr(pipe, "vae_scale_factor", 8))
    call.setdefault("num_inference_steps", 28)
    call.setdefault("height", size)
    call.setdefault("width", size)
    return call


# --------------------------------------------------------------------------------------------
# Embedded tiny models: cache
# --------------------------------------------------------------------------------------------

_STALE_BUILD_S = 3600.0  # a build takes seconds; a temporary folder this old was abandoned


def _cache_root() -> Path:
    env = os.environ.get("TACA_PROBE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "taca-probe"


def _remove_stale_builds(models_dir: Path) -> None:
    now = time.time()
    for leftover in models_dir.glob(".*.building-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _STALE_BUILD_S:
                shutil.rmtree(leftover, ignore_errors=True)


def embedded_model_path(name: str) -> Path:
    """The cache folder of an embedded model, building it first if needed.

    The folder is ``<cache>/models/<name>-v<RECIPE_VERSION>``, where ``<cache>`` is
    ``$TACA_PROBE_CACHE`` if set, else ``$XDG_CACHE_HOME/taca-probe``, else
    ``~/.cache/taca-probe``. A build goes into a temporary sibling folder that is renamed into
    place when complete, so an interrupted build never leaves a half-written model, and when two
    processes build at once the first to finish wins and the other discards its copy.

    A trained model (:data:`SHIPPED_MODELS`) is not built: its folder inside the installed
    package is returned as is.

    Parameters
    ----------
    name : str
        One of :data:`EMBEDDED_MODELS`.

    Returns
    -------
    pathlib.Path
        A diffusers pipeline folder (``DiffusionPipeline.from_pretrained`` loads it).

    Raises
    ------
    ModelError
        If ``name`` is not an embedded model, the cache folder cannot be written, or a shipped
        model's weights are missing from the installation.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    if name in SHIPPED_MODELS:
        return _shipped_path(name)
    models_dir = _cache_root() / "models"
    target = models_dir / f"{name}-v{RECIPE_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(models_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=models_dir))
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache in {models_dir}: {_first_line(exc)}; "
            "set TACA_PROBE_CACHE to a writable folder"
        ) from exc
    try:
        _build_into(name, tmp)
        # mkdtemp and the safetensors writer make owner-only folders/files; a cache is ordinary data.
        for path in (tmp, *tmp.rglob("*")):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        try:
            # Atomic on POSIX; fails when the target is a non-empty folder (another build won).
            os.rename(tmp, target)
        except OSError as exc:
            if not (target / "model_index.json").is_file():
                raise ModelError(
                    f"cannot put the built model {name!r} in place at {target}: {_first_line(exc)}; "
                    "delete that folder and retry"
                ) from exc
    except OSError as exc:
        raise ModelError(
            f"cannot write embedded model {name!r} into {models_dir}: {_first_line(exc)}; "
            "set TACA_PROBE_CACHE to a writable folder"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename
    return target
