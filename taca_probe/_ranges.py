"""One parser for the integer lists every command takes: ``0,1,2``, ``0-7`` or a mix."""

from __future__ import annotations

__all__ = ["int_ranges", "MAX_VALUES", "MAX_INT"]

#: At most this many values in one list: a longer list is a typo (``0-10000000``), not a plan.
MAX_VALUES = 100_000
#: The largest value a list may hold (stores keep seeds and indices as int64).
MAX_INT = 2**63 - 1


def int_ranges(text: str, *, maximum: int = MAX_INT, max_values: int = MAX_VALUES) -> list[int]:
    """``"0,2-4,7"`` -> ``[0, 2, 3, 4, 7]``, in the order written, each value once.

    Linear in the number of values; a range is checked against ``maximum`` and ``max_values``
    before it is expanded, so ``0-99999999`` is refused at once.

    Raises
    ------
    ValueError
        For an empty list, a part that is not an integer in ``0..maximum``, an inverted range, or
        more than ``max_values`` values; the message names the part and the valid range.
    """
    out: dict[int, None] = {}  # ordered and O(1) membership
    for part in text.split(","):
        part = part.strip()
        a, dash, b = part.partition("-")
        if dash and not a.strip() and b.strip():
            raise ValueError(f"{part!r} is negative; values are 0..{maximum}")
        try:
            lo = int(a)
            hi = int(b) if dash else lo
        except ValueError:
            raise ValueError(f"{part!r} is not an integer or a range like 0-7") from None
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
