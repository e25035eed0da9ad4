"""An exact, learning-free evaluator for images of the shapes dataset.

Detection (:func:`detect_objects`), by plain image analysis:

1. **Colour segmentation.** A pixel belongs to an object when its HSV saturation and value are
   high enough (the light-grey background has saturation ~0); it takes the dataset colour with
   the nearest hue (hues computed from :data:`~taca_probe.shapes.dataset.COLOURS`), provided the
   hue is close enough to one.
2. **Connected components** per colour (8-connectivity, holes filled); components smaller than a
   fraction of the smallest dataset object are noise. The largest component of a colour is *the*
   object of that colour (the dataset never gives two objects one colour).
3. **Shape by template matching.** The component is compared with an ideal circle, square and
   upright triangle of the *same area and centroid* (intersection over union); the best template
   wins, and a component far from every template (low IoU, e.g. elongated) is ``"irregular"``.
   Area and centroid are moments, so stray pixels on a ragged edge barely move the templates
   (a bounding-box fit would let one protruding pixel stretch the square template and call a
   ragged square a circle).
4. **Position**: the component's centroid.

Scoring (:func:`score_prompt`), on the T2I-CompBench categories that apply to this grammar:

- ``colour``: fraction of the named colours present as an object;
- ``shape``: fraction of the named shapes present among the detected objects (any colour);
- ``binding``: 1 if *every* named object is present with both its colour and its shape (the object
  of that colour has that shape), else 0;
- ``spatial`` (two-object prompts): 1 if both objects are present and object A's centroid lies in
  the stated direction from B's, the stated axis dominating (``|dx| > |dy|`` for left/right),
  as in T2I-CompBench's spatial rule; else 0.

Aggregates (:func:`aggregate`) split by prompt kind (``one.*``, ``two.*``) and carry percentile
bootstrap 95% intervals that resample *prompts* (all seeds of a prompt together), because images of
one prompt are not independent.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ..stats import bootstrap_ci
from . import dataset as ds

__all__ = [
    "CATEGORIES",
    "CategoryScore",
    "DetectedObject",
    "PromptScore",
    "aggregate",
    "chance_levels",
    "detect_objects",
    "evaluate_images",
    "paired_difference",
    "score_prompt",
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
    "one.colour",
    "one.shape",
    "one.binding",
    "two.colour",
    "two.shape",
    "two.binding",
    "two.spatial",
)


def _hue_deg(rgb: tuple[int, int, int]) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


_HUES = {name: _hue_deg(rgb) for name, rgb in ds.COLOURS.items()}
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
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ds.DatasetError(f"expected an RGB image (H, W, 3), got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        # Float images in [0, 1] (e.g. a pipeline with output_type="np").
        arr = np.clip(np.round(np.asarray(arr, np.float64) * 255), 0, 255).astype(np.uint8)
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


def _classify(mask: np.ndarray, cx: float, cy: float) -> tuple[str, float]:
    best, best_iou = "irregular", 0.0
    for name, tmpl in _templates(mask.shape, float(mask.sum()), cx, cy).items():
        iou = float((mask & tmpl).sum() / (mask | tmpl).sum())
        if iou > best_iou:
            best, best_iou = name, iou
    return (best if best_iou >= MIN_TEMPLATE_IOU else "irregular"), best_iou


def detect_objects(image: Any) -> list[DetectedObject]:
    """Find the objects in an image: colour, shape, centroid.

    Parameters
    ----------
    image : PIL.Image.Image or numpy.ndarray
        RGB image; ``uint8`` or float in ``[0, 1]``.

    Returns
    -------
    list of DetectedObject
        At most one per dataset colour (its largest component), largest first.
    """
    arr = _to_array(image)
    hue, sat, val = _hsv(arr)
    coloured = (sat >= MIN_SATURATION) & (val >= MIN_VALUE)
    names = list(_HUES)
    dist = np.stack([np.abs((hue - _HUES[n] + 180.0) % 360.0 - 180.0) for n in names])
    nearest = dist.argmin(0)
    close = dist.min(0) <= MAX_HUE_DISTANCE_DEG
    found: list[DetectedObject] = []
    for i, name in enumerate(names):
        mask = coloured & close & (nearest == i)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        k = int(np.argmax(areas)) + 1
        if areas[k - 1] < _MIN_AREA:
            continue
        comp = ndimage.binary_fill_holes(labels == k)
        cy, cx = ndimage.center_of_mass(comp)
        # Centroids in the same pixel-centre coordinates as dataset.ObjectSpec.
        cx, cy = float(cx) + 0.5, float(cy) + 0.5
        shape, iou = _classify(comp, cx, cy)
        found.append(DetectedObject(name, shape, cx, cy, int(comp.sum()), round(iou, 4)))
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
        return {"prompt": self.prompt, "kind": self.kind, "scores": self.scores,
                "objects": [asdict(o) for o in self.objects]}


def score_prompt(prompt: str | ds.PromptSpec, image: Any) -> PromptScore:
    """Score one image against its prompt (see the module docstring for the categories).

    Parameters
    ----------
    prompt : str or PromptSpec
        A prompt of the shapes grammar.
    image : PIL.Image.Image or numpy.ndarray
        The generated image.

    Returns
    -------
    PromptScore
        ``scores`` has ``colour``, ``shape``, ``binding`` and, for two objects, ``spatial``.

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
    # Shapes as a multiset: "a red circle ... a blue circle" needs two circles.
    pool = [o.shape for o in objects]
    hits = 0
    for _, s in named:
        if s in pool:
            pool.remove(s)
            hits += 1
    shape = hits / len(named)
    binding = float(all(c in by_colour and by_colour[c].shape == s for c, s in named))
    scores = {"colour": colour, "shape": shape, "binding": binding}
    if spec.relation is not None:
        (ca, _), (cb, _) = named
        ok = ca in by_colour and cb in by_colour and _relation_holds(by_colour[ca], by_colour[cb], spec.relation)
        scores["spatial"] = float(ok)
    return PromptScore(spec.text, "one" if spec.relation is None else "two", scores, objects)


def evaluate_images(prompts: Sequence[str | ds.PromptSpec], images: Sequence[Any]) -> list[PromptScore]:
    """Score images against their prompts, one image per prompt entry.

    Parameters
    ----------
    prompts : sequence of str or PromptSpec
        Prompt of each image (repeat a prompt for several seeds).
    images : sequence of PIL.Image.Image or numpy.ndarray
        The images, aligned with ``prompts``.

    Returns
    -------
    list of PromptScore

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
    n_boot : int
        Bootstrap resamples.
    seed : int
        Seed of the bootstrap (the intervals are reproducible).

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
        # the package's one bootstrap: whole prompts resampled (all seeds of a prompt together)
        mean, lo, hi = bootstrap_ci(values, clusters=prompts, n_resamples=n_boot, seed=seed, method="percentile")
        if not np.isfinite(lo):  # one prompt: no spread to resample
            lo = hi = mean
        out[cat] = CategoryScore(round(mean, 4), round(lo, 4), round(hi, 4), len(values), len(set(prompts)))
    return out


def paired_difference(
    base: Sequence[PromptScore], other: Sequence[PromptScore], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, CategoryScore]:
    """Mean of ``other - base`` per category, image by image, with a prompt-cluster bootstrap 95% interval.

    Both runs must score the same images in the same order (same prompts and seeds, e.g. one
    schedule against another), so that each difference compares one starting noise under two
    settings; this removes the seed-to-seed variation that separate intervals carry.

    Parameters
    ----------
    base, other : sequence of PromptScore
        Aligned results (from :func:`evaluate_images`).
    n_boot : int
        Bootstrap resamples.
    seed : int
        Seed of the bootstrap.

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
    diffs = [
        PromptScore(a.prompt, a.kind, {k: b.scores[k] - a.scores[k] for k in a.scores}) for a, b in zip(base, other)
    ]
    return aggregate(diffs, n_boot=n_boot, seed=seed)


def chance_levels() -> dict[str, float]:
    """Scores of reference guessers, for reading the aggregates.

    ``one.shape``/``two.shape``/``one.binding``: uniform random shapes with the right colours
    (1/3 per object; binding of two objects 1/9); ``two.spatial``: the two objects placed in a
    uniformly random one of the four relations (1/4).
    """
    k = len(ds.SHAPES)
    return {
        "one.shape": 1 / k,
        "one.binding": 1 / k,
        "two.shape": _two_shape_chance(),
        "two.binding": 1 / k**2,
        "two.spatial": 1 / len(ds.RELATIONS),
    }


def _two_shape_chance() -> float:
    # Expected multiset-match fraction when both drawn shapes are uniform and independent.
    shapes = ds.SHAPES
    total = 0.0
    pairs = [(a, b) for a in shapes for b in shapes]
    for named in pairs:
        for drawn in pairs:
            pool = list(drawn)
            hits = 0
            for s in named:
                if s in pool:
                    pool.remove(s)
                    hits += 1
            total += hits / 2
    return total / len(pairs) ** 2
