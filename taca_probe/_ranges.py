"""One parser for the integer lists every command takes: ``0,1,2``, ``0-7`` or a mix."""

from __future__ import annotations

__all__ = ["int_ranges"]


def int_ranges(text: str) -> list[int]:
    """``"0,2-4,7"`` -> ``[0, 2, 3, 4, 7]``, in the order written, each value once.

    Raises
    ------
    ValueError
        For an empty list, a part that is not a non-negative integer, or an inverted range.
    """
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            lo, hi = int(a), int(b)
            if lo < 0 or hi < lo:
                raise ValueError(part)
            values = range(lo, hi + 1)
        else:
            value = int(part)
            if value < 0:
                raise ValueError(part)
            values = (value,)
        out.extend(v for v in values if v not in out)
    if not out:
        raise ValueError(text)
    return out
