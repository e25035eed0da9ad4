"""Torch-free parsers for what a user selects: integer lists (``0,2-4``) and map selections."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import TacaProbeError

__all__ = ["int_ranges", "index_list", "is_seed", "positive_int", "MapSelection", "MAX_VALUES", "MAX_INT"]

#: At most this many values in one list: a longer list is a typo (``0-10000000``), not a plan.
MAX_VALUES = 100_000
#: The largest value a list may hold (stores keep seeds and indices as int64).
MAX_INT = 2**63 - 1


def is_seed(value: Any) -> bool:
    """Whether ``value`` is a generator seed: an integer in 0..MAX_INT (not a bool, not 1.5)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and 0 <= value <= MAX_INT


def positive_int(value: Any, what: str, *, none_ok: bool = False, error: type[Exception] = TacaProbeError) -> None:
    """Refuse anything but an integer >= 1 (or None with ``none_ok``) as one ``error`` naming ``what``."""
    if none_ok and value is None:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise error(f"{what} must be a positive integer{' or None' if none_ok else ''}, got {value!r}")


def int_ranges(text: str, *, maximum: int = MAX_INT, max_values: int = MAX_VALUES) -> list[int]:
    """``"0,2-4,7"`` -> ``[0, 2, 3, 4, 7]``, in the order written, each value once.

    A range is checked against ``maximum`` and ``max_values`` before it is expanded.

    Raises
    ------
    ValueError
        For an empty list, a part not an integer in ``0..maximum``, an inverted range, or more than
        ``max_values`` values; the message names the part.
    """
    out: dict[int, None] = {}  # ordered, O(1) membership
    for part in text.split(","):
        part = part.strip()
        a, dash, b = part.partition("-")
        if dash and not a.strip() and b.strip():
            raise ValueError(f"{part!r} is negative; values are 0..{maximum}")
        if not a.strip().isdecimal() or (dash and not b.strip().isdecimal()):  # int() also takes +1, -0, 1_000
            raise ValueError(f"{part!r} is not an integer or a range like 0-7")
        lo = int(a)
        hi = int(b) if dash else lo
        if not 0 <= lo <= maximum or not 0 <= hi <= maximum:
            raise ValueError(f"{part!r} is outside 0..{maximum}")
        if hi < lo:
            raise ValueError(f"{part!r} is an inverted range")
        if hi - lo + 1 + len(out) > max_values:
            raise ValueError(f"{part!r} makes more than {max_values} values")
        out.update(dict.fromkeys(range(lo, hi + 1)))
    if not out:
        raise ValueError(f"{text!r} is empty")
    return list(out)


def index_list(value: Any, what: str, valid: str, error: type[Exception] = TacaProbeError) -> list[int]:
    """One index, or a non-empty list (tuple, range, array) of them, as ints; anything else (``1.5``, ``"0"``,
    ``True``, ``[]``) is one ``error`` naming ``what`` and the ``valid`` choices, not a TypeError later."""
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):  # a numpy or xarray index array
        value = np.asarray(value).tolist()
    items = [value] if isinstance(value, (int, np.integer)) else value
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items):
        raise error(f"{what} must be an index or a list of indices, got {value!r}; {valid}")
    if not items:  # would average over nothing: NaN results, not an error
        raise error(f"{what} is an empty list; {valid}")
    return [int(v) for v in items]


#: How each part of a map selection's string form is read.
_PARTS = {  # the keywords in any case, as the rest of the grammar (none, blocks=JOINT)
    "steps": lambda v: None if v.lower() == "all" else int_ranges(v),
    "layers": lambda v: None if v.lower() == "all" else tuple(p.strip() for p in v.split("|") if p.strip()),
    "tokens": lambda v: v.lower() if v.lower() in ("prompt", "all") else int_ranges(v),
}
_MAPS_FORMS = (
    "steps=all|0-4,7 ; layers=all|GLOB[|GLOB] ; tokens=prompt|all|0-10,12 "
    "(parts separated by ';', each optional; e.g. 'steps=0-4;tokens=prompt')"
)


@dataclass(frozen=True)
class MapSelection:
    """Which (step, layer, token) maps to record.

    ``steps``: indices, or None for all; ``layers``: fnmatch globs on the module path, or None for all;
    ``tokens``: ``"prompt"`` (the prompt's own, non-padding tokens), ``"all"``, or explicit indices.
    """

    steps: tuple[int, ...] | None = None
    layers: tuple[str, ...] | None = None
    tokens: str | tuple[int, ...] = "prompt"

    def __post_init__(self) -> None:
        # checked and normalized here (lists, numpy integers), so that a hand-edited store attribute or a
        # user's own selection is one clear error, not a TypeError later in a recording or an analysis
        def index(i: Any) -> bool:
            return isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0

        def each(name: str, ok: Any, norm: Any) -> bool:  # non-empty, each ok; stored as the parsed form
            v = getattr(self, name)
            if not isinstance(v, (tuple, list, range)) or not v or not all(map(ok, v)):
                return False
            object.__setattr__(self, name, norm(v))
            return True

        def ints(v: Any) -> tuple[int, ...]:  # sorted, each once: one selection, one spec (a resume compares it)
            return tuple(sorted({int(i) for i in v}))

        def glob(g: Any) -> bool:  # a pattern that survives the spec string
            return isinstance(g, str) and g == g.strip() != "" and not any(c in g for c in ";|")

        if not ((self.steps is None or each("steps", index, ints))
                and (self.layers is None or each("layers", glob, lambda v: tuple(map(str, v))))
                and ((isinstance(self.tokens, str) and self.tokens in ("prompt", "all")) or each("tokens", index, ints))):
            raise TacaProbeError(f"bad maps selection steps={self.steps!r}, layers={self.layers!r}, "
                                 f"tokens={self.tokens!r}; valid forms: none | {_MAPS_FORMS}")

    @classmethod
    def parse(cls, spec: "str | MapSelection | None") -> "MapSelection | None":
        """``None``/``"none"`` -> no maps; otherwise e.g. ``"steps=0-4;layers=*;tokens=prompt"``."""
        if spec is None or isinstance(spec, MapSelection):
            return spec
        text = spec.strip()
        if text.lower() in ("", "none"):
            return None
        kw: dict[str, Any] = {}
        try:
            for part in text.split(";"):
                if not part.strip():
                    continue
                key, _, value = part.partition("=")
                key, value = key.strip().lower(), value.strip()
                if not value or key in kw or key not in _PARTS:
                    raise ValueError(part)
                kw[key] = _PARTS[key](value)
        except ValueError as e:
            raise TacaProbeError(f"bad maps selection {spec!r} ({e}); valid forms: none | {_MAPS_FORMS}") from None
        return cls(**kw)

    @property
    def spec(self) -> str:
        steps = "all" if self.steps is None else ",".join(map(str, self.steps))
        layers = "all" if self.layers is None else "|".join(self.layers)
        tokens = self.tokens if isinstance(self.tokens, str) else ",".join(map(str, self.tokens))
        return f"steps={steps};layers={layers};tokens={tokens}"

    def to_attrs(self) -> dict[str, Any]:
        """The selection as a JSON-able mapping, stored as the ``map_selection`` attribute."""
        return {k: v if v is None or isinstance(v, str) else list(v) for k, v in vars(self).items()}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "MapSelection | None":
        """The selection a store was recorded with (None: no maps).

        From the ``map_selection`` attribute; older stores have only the ``maps`` string, parsed here.
        """
        structured = attrs.get("map_selection")
        if isinstance(structured, dict):
            try:
                return cls(**{k: v for k, v in structured.items() if k in _PARTS})
            except TacaProbeError:
                raise TacaProbeError(f"the store's map_selection attribute {structured!r} is damaged") from None
        spec = attrs.get("maps")
        return cls.parse(spec) if isinstance(spec, str) else None

    def selects(self, step: int, layer: str) -> bool:
        if self.steps is not None and step not in self.steps:
            return False
        return self.layers is None or any(fnmatch.fnmatchcase(layer, p) for p in self.layers)

    def check(self, layout: Any) -> None:  # a store.RunLayout (steps, n_txt, layers)
        """Refuse a selection that names steps, tokens or layers this run does not have."""
        spec = self.spec  # a long index list is cut: the message names the value that is wrong
        where = f"--maps {spec if len(spec) <= 80 else spec[:76] + ' ...'!r}"
        if self.steps is not None and max(self.steps) >= layout.steps:
            raise TacaProbeError(f"{where}: step {max(self.steps)} does not exist; this run has steps "
                                 f"0..{layout.steps - 1}")
        if not isinstance(self.tokens, str) and max(self.tokens) >= layout.n_txt:
            raise TacaProbeError(f"{where}: token {max(self.tokens)} does not exist; this model has text tokens "
                                 f"0..{layout.n_txt - 1}")
        for pattern in self.layers or ():
            if not any(fnmatch.fnmatchcase(layer, pattern) for layer in layout.layers):
                raise TacaProbeError(f"{where}: layers={pattern} matches none of this model's {len(layout.layers)} "
                                     f"attention layers ({layout.layers[0]} ... {layout.layers[-1]})")

    def token_indices(self, is_padding: np.ndarray) -> np.ndarray:
        n = len(is_padding)
        if self.tokens == "all":
            return np.arange(n)
        if self.tokens == "prompt":
            return np.flatnonzero(~is_padding)
        return np.array([t for t in self.tokens if t < n], dtype=np.int64)
