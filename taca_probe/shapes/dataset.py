"""The procedural shapes dataset: images, captions, the prompt grammar and the held-out split.

Every image is 64x64 RGB: one or two flat-coloured objects (circle, square, triangle) on a light-grey
background, captioned ``"a red circle"`` or ``"a red circle to the left of a blue square"``. The two
objects of a scene always have different colours, so an object is identified by its colour alone
(which makes :mod:`taca_probe.shapes.evaluator` exact). A scene is a pure function of a seed; nothing
is stored. Held out of training: :data:`HELD_OUT_OBJECTS` and both layouts of every
:func:`held_out_pair_axes` entry (holding out one layout let a model place the objects from the
memorised other one without reading the relation word: README, "The dataset").
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import TacaProbeError

__all__ = [
    "BACKGROUND", "COLOURS", "HELD_OUT_OBJECTS", "IMAGE_SIZE", "RELATIONS", "SHAPES", "DatasetError", "ObjectSpec",
    "PromptSpec", "Scene", "all_objects", "held_out_pair_axes", "held_out_prompts", "held_out_scene_types",
    "parse_prompt", "render", "sample_batch", "sample_scene", "scene_for_prompt", "seen_objects", "training_prompts",
]


class DatasetError(TacaProbeError, ValueError):
    """A prompt outside the shapes grammar, or an impossible dataset request."""


IMAGE_SIZE = 64
#: Light grey: low saturation, so that the evaluator separates it from every object colour.
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
#: Saturated colours with well-separated hues (red 0, yellow ~50, green 120, blue ~230 degrees).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20), "green": (20, 160, 20), "blue": (30, 50, 220), "yellow": (240, 200, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Relation words as they appear in captions; "A <relation> B" relates object A to object B.
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
#: Axis of each relation and the sign of (A - B) along it (image y grows downwards).
_RELATION_AXIS: dict[str, tuple[int, int]] = {
    "to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1),
}

#: Object side length in pixels (bounding square of circle, square and triangle), inclusive range.
SIZE_RANGE: tuple[int, int] = (16, 22)
#: Two-object scenes: centre of the first object along the relation axis (the second mirrors it
#: around the image centre), and the cross-axis range of both centres. Main-axis offsets are
#: >= 20 px and cross-axis offsets <= 16 px, so the stated relation is always the dominant one.
PAIR_NEAR_RANGE: tuple[float, float] = (13.0, 22.0)
PAIR_CROSS_RANGE: tuple[float, float] = (24.0, 40.0)
#: Probability that a training scene has one object (else two).
P_ONE_OBJECT = 0.3

#: Colour-shape pairs that never appear in training (one per colour; every colour and shape is
#: still seen with other partners).
HELD_OUT_OBJECTS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle"),
)
#: Fraction of the two-object scene types (from seen objects) that are held out, and the seed of
#: the permutation that picks them.
HELD_OUT_FRACTION = 0.2
HELD_OUT_SEED = 20250607


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene: attributes, centre (x, y) in pixels, and side length."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class PromptSpec:
    """What a caption states: one or two (colour, shape) objects and, for two, the relation."""

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        """The caption in the dataset's grammar."""
        phrases = [f"a {c} {s}" for c, s in self.objects]
        return phrases[0] if self.relation is None else f"{phrases[0]} {self.relation} {phrases[1]}"


@dataclass(frozen=True)
class Scene:
    """A renderable scene and the prompt that describes it."""

    objects: tuple[ObjectSpec, ...]
    prompt: PromptSpec

    @property
    def caption(self) -> str:
        return self.prompt.text


_PROMPT_RE = re.compile(
    r"^a (?P<c1>\w+) (?P<s1>\w+)(?: (?P<rel>to the left of|to the right of|above|below) a (?P<c2>\w+) (?P<s2>\w+))?$"
)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a caption of the shapes grammar.

    Parameters
    ----------
    text : str
        ``"a <colour> <shape>"`` or ``"a <colour> <shape> <relation> a <colour> <shape>"``, with a
        relation from :data:`RELATIONS`; case, extra spaces and a final full stop are ignored.

    Raises
    ------
    DatasetError
        Outside the grammar, an unknown colour or shape, or two objects of one colour.
    """
    norm = " ".join(str(text).lower().split()).rstrip(".")
    m = _PROMPT_RE.match(norm)
    if not m:
        raise DatasetError(f"prompt {text!r} is not in the shapes grammar; expected 'a <colour> <shape>' or "
                           "'a <colour> <shape> <relation> a <colour> <shape>'")
    objects = [(m["c1"], m["s1"])] + ([(m["c2"], m["s2"])] if m["rel"] else [])
    for colour, shape in objects:
        if colour not in COLOURS:
            raise DatasetError(f"prompt {text!r}: unknown colour {colour!r}; colours: {', '.join(COLOURS)}")
        if shape not in SHAPES:
            raise DatasetError(f"prompt {text!r}: unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    if len(objects) == 2 and objects[0][0] == objects[1][0]:
        raise DatasetError(f"prompt {text!r}: the two objects must have different colours")
    return PromptSpec(tuple(objects), m["rel"])


def all_objects() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, in a fixed order."""
    return list(itertools.product(COLOURS, SHAPES))


def seen_objects() -> list[tuple[str, str]]:
    """The (colour, shape) pairs that appear in training."""
    return [o for o in all_objects() if o not in HELD_OUT_OBJECTS]


def _scene_types() -> list[tuple[tuple[str, str], tuple[str, str], int]]:
    """Two-object scene types from seen objects: (left or upper object, the other, axis), each layout once."""
    seen = seen_objects()
    return [(a, b, axis) for axis in (0, 1) for a in seen for b in seen if a[0] != b[0]]


def held_out_pair_axes() -> list[tuple[tuple[str, str], tuple[str, str], int]]:
    """The (unordered object pair, axis) combinations never shown in training.

    Fixed by :data:`HELD_OUT_SEED`: a fraction :data:`HELD_OUT_FRACTION` of the pairs on each axis
    (so horizontal and vertical relations are balanced), and no pair on both axes (a held-out
    pair is seen on the other axis).

    Returns
    -------
    list of ((colour, shape), (colour, shape), axis)
        The pair in :func:`all_objects` order; ``axis`` 0 horizontal, 1 vertical.
    """
    pairs = [(a, b) for a, b in itertools.combinations(seen_objects(), 2) if a[0] != b[0]]
    rng = np.random.default_rng(HELD_OUT_SEED)
    held: list[tuple[tuple[str, str], tuple[str, str], int]] = []
    k = round(HELD_OUT_FRACTION * len(pairs))
    for axis in (0, 1):
        candidates = [(a, b) for a, b in pairs if (a, b, 0) not in held]  # no pair on both axes
        held += [(*candidates[i], axis) for i in sorted(rng.permutation(len(candidates))[:k])]
    return held


def held_out_scene_types() -> list[tuple[tuple[str, str], tuple[str, str], int]]:
    """The two-object scene types never shown in training: both layouts of every held-out pair-axis.

    Returns
    -------
    list of ((colour, shape), (colour, shape), axis)
        ``axis`` 0: the first object is left of the second; 1: above it.
    """
    return [t for a, b, axis in held_out_pair_axes() for t in ((a, b, axis), (b, a, axis))]


def _captions_of_type(scene_type: tuple[tuple[str, str], tuple[str, str], int]) -> list[PromptSpec]:
    first, second, axis = scene_type
    forward, backward = RELATIONS[2 * axis : 2 * axis + 2]  # left of / right of, or above / below
    return [PromptSpec((first, second), forward), PromptSpec((second, first), backward)]


def held_out_prompts(kind: str = "all") -> list[PromptSpec]:
    """The evaluation prompts: compositions never seen in training.

    Parameters
    ----------
    kind : {"all", "one", "two"}
        One-object prompts (the :data:`HELD_OUT_OBJECTS`), two-object prompts (both captions of
        both layouts of every :func:`held_out_pair_axes` entry), or both (one-object first).
    """
    if kind not in ("all", "one", "two"):
        raise DatasetError(f"unknown prompt kind {kind!r}; choose all, one or two")
    one = [PromptSpec((o,)) for o in HELD_OUT_OBJECTS]
    two = [p for t in held_out_scene_types() for p in _captions_of_type(t)]
    return {"one": one, "two": two, "all": one + two}[kind]


def training_prompts() -> list[PromptSpec]:
    """Every caption that training can show (one-object and two-object)."""
    held = set(held_out_scene_types())
    one = [PromptSpec((o,)) for o in seen_objects()]
    two = [p for t in _scene_types() if t not in held for p in _captions_of_type(t)]
    return one + two


def _place_one(rng: np.random.Generator, colour: str, shape: str) -> ObjectSpec:
    size = float(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    lo, hi = size / 2 + 2, IMAGE_SIZE - size / 2 - 2
    return ObjectSpec(colour, shape, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), size)


def _place_pair(rng: np.random.Generator, prompt: PromptSpec) -> tuple[ObjectSpec, ObjectSpec]:
    axis, sign = _RELATION_AXIS[prompt.relation or ""]
    near = rng.uniform(*PAIR_NEAR_RANGE)  # the lower-coordinate object along the axis
    far = IMAGE_SIZE - rng.uniform(*PAIR_NEAR_RANGE)
    main = (far, near) if sign > 0 else (near, far)  # sign > 0: A has the larger coordinate
    out = []
    for (colour, shape), m in zip(prompt.objects, main):
        size = float(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        cross = float(rng.uniform(*PAIR_CROSS_RANGE))
        cx, cy = (m, cross) if axis == 0 else (cross, m)
        out.append(ObjectSpec(colour, shape, float(cx), float(cy), size))
    return out[0], out[1]


def scene_for_prompt(prompt: PromptSpec | str, rng: np.random.Generator) -> Scene:
    """A random scene that ``prompt`` describes correctly (the ground truth for a prompt).

    Parameters
    ----------
    prompt : PromptSpec or str
        A prompt of the grammar (see :func:`parse_prompt`).
    rng : numpy.random.Generator
    """
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return Scene((_place_one(rng, *spec.objects[0]),) if spec.relation is None else _place_pair(rng, spec), spec)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw one scene.

    Parameters
    ----------
    rng : numpy.random.Generator
    split : {"train", "held_out"}
        ``"train"``: a caption from :func:`training_prompts`, one object with probability
        :data:`P_ONE_OBJECT`; ``"held_out"``: a prompt from :func:`held_out_prompts`.
    """
    if split == "train":
        prompts = _TRAIN_ONE if rng.random() < P_ONE_OBJECT else _TRAIN_TWO
    elif split == "held_out":
        prompts = held_out_prompts()
    else:
        raise DatasetError(f"unknown split {split!r}; choose train or held_out")
    return scene_for_prompt(prompts[int(rng.integers(len(prompts)))], rng)


def _object_mask(obj: ObjectSpec, size: int = IMAGE_SIZE) -> np.ndarray:
    # Pixel centres; hard edges (no anti-aliasing) so ground-truth colours are exact.
    y, x = np.mgrid[0:size, 0:size] + 0.5
    half = obj.size / 2
    if obj.shape == "circle":
        return (x - obj.cx) ** 2 + (y - obj.cy) ** 2 <= half**2
    if obj.shape == "square":
        return (np.abs(x - obj.cx) <= half) & (np.abs(y - obj.cy) <= half)
    if obj.shape == "triangle":  # upright isosceles: apex at the top, base at the bottom
        top, bottom = obj.cy - half, obj.cy + half
        return (y >= top) & (y <= bottom) & (np.abs(x - obj.cx) <= (y - top) / 2)
    raise DatasetError(f"unknown shape {obj.shape!r}; shapes: {', '.join(SHAPES)}")


def render(scene: Scene | Sequence[ObjectSpec]) -> np.ndarray:
    """Render a scene.

    Parameters
    ----------
    scene : Scene or sequence of ObjectSpec
        Objects are painted in order (later ones on top).

    Returns
    -------
    numpy.ndarray
        ``(64, 64, 3)`` uint8 RGB image.
    """
    objects = scene.objects if isinstance(scene, Scene) else scene
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, np.uint8)
    for obj in objects:
        image[_object_mask(obj)] = COLOURS[obj.colour]
    return image


def sample_batch(seed: int | Sequence[int], n: int, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """A batch of images and captions, a pure function of ``seed``.

    Parameters
    ----------
    seed : int or sequence of int
        Seeds a :class:`numpy.random.Generator` (e.g. ``(run_seed, step)`` for a training step).
    n : int
    split : {"train", "held_out"}
        See :func:`sample_scene`.

    Returns
    -------
    images : numpy.ndarray
        ``(n, 64, 64, 3)`` uint8.
    captions : list of str
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), [s.caption for s in scenes]


_TRAIN_ALL = training_prompts()
_TRAIN_ONE = [p for p in _TRAIN_ALL if p.relation is None]
_TRAIN_TWO = [p for p in _TRAIN_ALL if p.relation is not None]
