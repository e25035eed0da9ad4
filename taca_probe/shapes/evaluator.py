"""An exact, learning-free evaluator for images of the shapes dataset (README: "The evaluator").

:func:`detect_objects`: HSV colour segmentation, the largest connected component of each dataset
colour, its shape by IoU with an ideal circle, square and upright triangle of the component's own
area and centroid ("irregular" below :data:`MIN_TEMPLATE_IOU`), and its centroid. Area and centroid
are moments, so stray pixels on a ragged edge barely move the templates (a bounding-box fit would let
one protruding pixel stretch the square template and call a ragged square a circle).
:func:`score_prompt` scores colour, shape, binding and spatial relation (T2I-CompBench's rule);
:func:`aggregate` adds bootstrap intervals that resample whole prompts (their seeds are not independent).
"""

from __future__ import annotations

import colorsys
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ..stats import bootstrap_ci
from . import dataset as ds

__all__ = [
    "CATEGORIES", "CategoryScore", "DetectedObject", "PromptScore", "aggregate", "chance_levels", "detect_objects",
    "evaluate_images", "object_masks", "paired_difference", "score_prompt",
]

#: Pixels less saturated / darker than this are background (or shadow-free blur towards it).
MIN_SATURATION = 0.35
MIN_VALUE = 0.25
#: A pixel's hue must be within this many degrees of a dataset colour's hue (half the smallest
#: gap between dataset hues is ~25 degrees, red-yellow).
MAX_HUE_DISTANCE_DEG = 25.0
#: Components smaller than this fraction of the smallest dataset object's area are noise.
MIN_AREA_FRACTION = 0.3
#: Below this IoU with its best template a component is "irregular" (a 2:1 rectangle scores
#: 0.55 against the square of the same area).
MIN_TEMPLATE_IOU = 0.6

#: Aggregate categories: (prompt kind, score name).
CATEGORIES: tuple[str, ...] = (
    "one.colour", "one.shape", "one.binding", "two.colour", "two.shape", "two.binding", "two.spatial",
)


_HUES = {name: 360.0 * colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in ds.COLOURS.items()}
# Smallest dataset object: a triangle of the smallest size has half its bounding square's area.
_MIN_AREA = MIN_AREA_FRACTION * 0.5 * ds.SIZE_RANGE[0] ** 2


@dataclass(frozen=True)
class DetectedObject:
    """One detected object."""

    colour: str
    shape: str  # circle, square, triangle or irregular
    cx: float
    cy: float
    area: int
    iou: float  # IoU with the winning template


def _to_array(image: Any) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3 or not arr.size:
        raise ds.DatasetError(f"expected an RGB image (H, W, 3), got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        # Float images in [0, 1] (e.g. a pipeline with output_type="np"); other pixels (0-255 as int64 or
        # float) would be read as [0, 1] and clipped to white: a silent score of 0.
        if arr.dtype.kind != "f" or not (arr.min() >= 0 and arr.max() <= 1):
            raise ds.DatasetError(f"expected uint8 pixels or floats in [0, 1], got {arr.dtype} in "
                                  f"{arr.min()}..{arr.max()}")
        arr = np.round(np.asarray(arr, np.float64) * 255).astype(np.uint8)
    return arr


def _hsv(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = arr.astype(np.float64) / 255
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-12), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-12)
    hue = np.select([mx == r, mx == g], [((g - b) / d) % 6, (b - r) / d + 2], (r - g) / d + 4) * 60.0
    return hue, sat, mx


def _templates(shape: tuple[int, int], area: float, cx: float, cy: float) -> dict[str, np.ndarray]:
    """The dataset's shapes with the given area and centroid (same rasterization as dataset.render)."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    side = math.sqrt(area)  # square
    radius = math.sqrt(area / math.pi)  # circle
    h = math.sqrt(2 * area)  # upright triangle, base = height = h; centroid 2/3 of h below the apex
    top = cy - 2 * h / 3
    return {
        "circle": (x - cx) ** 2 + (y - cy) ** 2 <= radius**2,
        "square": (np.abs(x - cx) <= side / 2) & (np.abs(y - cy) <= side / 2),
        "triangle": (y >= top) & (y <= top + h) & (np.abs(x - cx) <= (y - top) / 2),
    }


def object_masks(image: Any) -> dict[str, np.ndarray]:
    """Each dataset colour's object in an image: its largest connected component, holes filled.

    Parameters
    ----------
    image : PIL.Image.Image or numpy.ndarray
        RGB image; ``uint8`` or float in ``[0, 1]``.

    Returns
    -------
    dict
        Colour name -> boolean ``(H, W)`` mask, for the colours present (components smaller than
        ``MIN_AREA_FRACTION`` of the smallest dataset object are noise, not objects).
    """
    arr = _to_array(image)
    hue, sat, val = _hsv(arr)
    coloured = (sat >= MIN_SATURATION) & (val >= MIN_VALUE)
    names = list(_HUES)
    dist = np.stack([np.abs((hue - _HUES[n] + 180.0) % 360.0 - 180.0) for n in names])
    nearest = dist.argmin(0)
    close = dist.min(0) <= MAX_HUE_DISTANCE_DEG
    masks: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        mask = coloured & close & (nearest == i)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        if n and areas.max() >= _MIN_AREA:
            masks[name] = ndimage.binary_fill_holes(labels == int(np.argmax(areas)) + 1)
    return masks


def detect_objects(image: Any) -> list[DetectedObject]:
    """Find the objects in an image (the masks of :func:`object_masks`, same ``image``): colour, shape, centroid.

    Returns
    -------
    list of DetectedObject
        At most one per dataset colour (its largest component), largest first.
    """
    found: list[DetectedObject] = []
    for name, comp in object_masks(image).items():
        cy, cx = ndimage.center_of_mass(comp)
        # Centroids in the same pixel-centre coordinates as dataset.ObjectSpec.
        cx, cy = float(cx) + 0.5, float(cy) + 0.5
        ious = {shape: float((comp & t).sum() / (comp | t).sum())
                for shape, t in _templates(comp.shape, float(comp.sum()), cx, cy).items()}
        best = max(ious, key=ious.__getitem__)
        shape = best if ious[best] >= MIN_TEMPLATE_IOU else "irregular"
        found.append(DetectedObject(name, shape, cx, cy, int(comp.sum()), round(ious[best], 4)))
    return sorted(found, key=lambda o: -o.area)


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    axis, sign = ds._RELATION_AXIS[relation]
    d = (a.cx - b.cx, a.cy - b.cy)
    return sign * d[axis] > 0 and abs(d[axis]) > abs(d[1 - axis])


@dataclass
class PromptScore:
    """Scores of one image against its prompt."""

    prompt: str
    kind: str  # "one" or "two" objects
    scores: dict[str, float]
    objects: list[DetectedObject] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def score_prompt(prompt: str | ds.PromptSpec, image: Any) -> PromptScore:
    """Score one image against its prompt.

    Parameters
    ----------
    prompt : str or PromptSpec
        A prompt of the shapes grammar.
    image : PIL.Image.Image or numpy.ndarray
        The generated image.

    Returns
    -------
    PromptScore
        ``scores``: ``colour`` (fraction of the named colours present), ``shape`` (fraction of the
        named shapes present, any colour), ``binding`` (1 if every named object is present with its
        colour and shape, else 0) and, for two objects, ``spatial`` (1 if A's centroid is in the stated
        direction from B's, the stated axis dominating: ``|dx| > |dy|`` for left/right; else 0).

    Raises
    ------
    DatasetError
        If the prompt is not in the grammar or the image is not RGB.
    """
    spec = ds.parse_prompt(prompt) if isinstance(prompt, str) else prompt
    objects = detect_objects(image)
    by_colour = {o.colour: o for o in objects}
    named = spec.objects
    colour = sum(c in by_colour for c, _ in named) / len(named)
    shape = _shape_hits([s for _, s in named], [o.shape for o in objects]) / len(named)
    binding = float(all(c in by_colour and by_colour[c].shape == s for c, s in named))
    scores = {"colour": colour, "shape": shape, "binding": binding}
    if spec.relation is not None:
        (ca, _), (cb, _) = named
        ok = ca in by_colour and cb in by_colour and _relation_holds(by_colour[ca], by_colour[cb], spec.relation)
        scores["spatial"] = float(ok)
    return PromptScore(spec.text, "one" if spec.relation is None else "two", scores, objects)


def evaluate_images(prompts: Sequence[str | ds.PromptSpec], images: Sequence[Any]) -> list[PromptScore]:
    """Score images against their prompts (:func:`score_prompt`), one image per prompt entry.

    Parameters
    ----------
    prompts : sequence of str or PromptSpec
        Prompt of each image (repeat a prompt for several seeds).
    images : sequence of PIL.Image.Image or numpy.ndarray
        Aligned with ``prompts``.

    Raises
    ------
    DatasetError
        If the lengths differ or a prompt is outside the grammar.
    """
    if len(prompts) != len(images):
        raise ds.DatasetError(f"got {len(prompts)} prompts but {len(images)} images")
    return [score_prompt(p, im) for p, im in zip(prompts, images)]


@dataclass(frozen=True)
class CategoryScore:
    """Mean of one category with a bootstrap 95% interval."""

    mean: float
    low: float
    high: float
    n_images: int
    n_prompts: int


def aggregate(results: Sequence[PromptScore], *, n_boot: int = 2000, seed: int = 0) -> dict[str, CategoryScore]:
    """Per-category means with percentile-bootstrap 95% intervals (prompts resampled as clusters).

    Parameters
    ----------
    results : sequence of PromptScore
        From :func:`evaluate_images`.
    n_boot, seed : int
        Bootstrap resamples and seed (the intervals are reproducible).

    Returns
    -------
    dict of str to CategoryScore
        Keys from :data:`CATEGORIES` that have at least one image.
    """
    out: dict[str, CategoryScore] = {}
    for cat in CATEGORIES:
        kind, name = cat.split(".")
        rows = [(r.prompt, r.scores[name]) for r in results if r.kind == kind and name in r.scores]
        if not rows:
            continue
        prompts, values = zip(*rows)
        mean, lo, hi = bootstrap_ci(values, clusters=prompts, n_resamples=n_boot, seed=seed, method="percentile")
        if not np.isfinite(lo):  # one prompt: no spread to resample
            lo = hi = mean
        out[cat] = CategoryScore(round(mean, 4), round(lo, 4), round(hi, 4), len(values), len(set(prompts)))
    return out


def paired_difference(
    base: Sequence[PromptScore], other: Sequence[PromptScore], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, CategoryScore]:
    """Mean of ``other - base`` per category, image by image, with a prompt-cluster bootstrap 95% interval.

    Both runs score the same prompts and seeds in the same order, so each difference compares one starting
    noise under two settings, free of the seed-to-seed variation that separate intervals carry.

    Parameters
    ----------
    base, other : sequence of PromptScore
        Aligned results (from :func:`evaluate_images`).
    n_boot, seed : int
        Bootstrap resamples and seed.

    Returns
    -------
    dict of str to CategoryScore
        ``mean`` is the mean difference; ``low``/``high`` its interval.

    Raises
    ------
    DatasetError
        If the two runs are not aligned.
    """
    if len(base) != len(other) or any(a.prompt != b.prompt for a, b in zip(base, other)):
        raise ds.DatasetError("paired_difference needs two runs over the same prompts in the same order")
    diffs = [PromptScore(a.prompt, a.kind, {k: b.scores[k] - a.scores[k] for k in a.scores})
             for a, b in zip(base, other)]
    return aggregate(diffs, n_boot=n_boot, seed=seed)


def _shape_hits(named: Sequence[str], drawn: Sequence[str]) -> int:
    """Named shapes found among the drawn ones, as multisets ("a red circle ... a blue circle" needs two circles)."""
    return sum((Counter(named) & Counter(drawn)).values())


def chance_levels() -> dict[str, float]:
    """Scores of reference guessers, for reading the aggregates.

    ``one.shape``/``two.shape``/``one.binding``: uniform random shapes with the right colours
    (1/3 per object; binding of two objects 1/9); ``two.spatial``: the two objects placed in a
    uniformly random one of the four relations (1/4).
    """
    k = len(ds.SHAPES)
    pairs = list(itertools.product(ds.SHAPES, repeat=2))
    two_shape = sum(_shape_hits(named, drawn) / 2 for named in pairs for drawn in pairs) / len(pairs) ** 2
    return {"one.shape": 1 / k, "one.binding": 1 / k, "two.shape": two_shape, "two.binding": 1 / k**2,
            "two.spatial": 1 / len(ds.RELATIONS)}
