"""Gamma schedules: when and where TACA scales the visual-query -> text-key attention logits.

TACA (arXiv 2506.07986) multiplies the image-to-text attention logits of an MM-DiT by a
temperature ``gamma > 0`` during part of the denoising trajectory. The paper's rule is
``gamma(t) = gamma0 if t >= t_thresh else 1`` with ``t`` on the 0..1000 timestep scale
(``step:1.2@970``); the official code applies gamma to the first 3 of 30 steps by step index
(``first:1.2@3`` or ``frac:1.2@0.1``). This module turns one-line string specs into immutable
:class:`Schedule` objects that answer "which gamma for this step and this attention layer?".

Grammar (``FORMS`` holds the same text, used in errors and ``--help``)::

    none                        gamma 1 everywhere (the stock model)
    const:G                     G at every step
    step:G@T                    G while t >= T, else 1          (paper: step:1.2@970)
    first:G@K                   G for steps 0..K-1, else 1      (official code: first:1.2@3)
    frac:G@F                    G for the first floor(F*N + 1/2) of N steps, 0 < F <= 1
    linear:G0..G1@T0..T1        G0 for t >= T0, G1 for t <= T1, linear in between (T0 > T1)
    cosine:G0..G1@T0..T1        as linear, with a half-cosine ramp
    table:T1=G1,T2=G2,...       G of the largest Ti with t >= Ti, 1 below every Ti
    any kind + ;blocks=joint|single  and/or  ;layers=GLOB[|GLOB...]  (other layers get 1)

Conventions
-----------
* ``t`` is the diffusers timestep on the 0..1000 scale (1000 = pure noise); ``step`` is the
  0-based index of the denoising step; ``N`` (``num_steps``) the number of steps of the run.
* Every gamma must be finite and > 0; every timestep in ``[0, 1000]``.
* Timestep comparisons are tolerant by :data:`T_TOLERANCE` (``1e-3``): ``t >= T`` is evaluated
  as ``t >= T - 1e-3`` and ``t <= T`` as ``t <= T + 1e-3``, because schedulers produce floats
  such as ``969.99994`` for a timestep meant to be 970.
* ``frac`` rounding: ``K = floor(F * N + 1/2)`` (round half up) computed in exact decimal
  arithmetic on the shortest decimal form of ``F`` (``repr(F)``, i.e. the number as written),
  so ``frac:G@0.1`` gives ``K = 3`` for ``N = 30`` (binary ``0.1 * 30`` is
  ``3.0000000000000004``) and ``frac:G@0.58`` gives ``K = 15`` for ``N = 25`` (exactly 14.5,
  although binary ``0.58 * 25`` is ``14.499999999999998``). The steps that fire are
  ``step < K``.
* Layer globs are matched with :func:`fnmatch.fnmatchcase` against the whole attention module
  path, e.g. ``transformer_blocks.3.attn`` or ``single_transformer_blocks.0.attn``.
* Canonical spec (:attr:`Schedule.spec`): numbers in their shortest round-tripping form
  (``970.0 -> 970``, ``1.0 -> 1``), table entries by decreasing threshold, ``;blocks=`` before
  ``;layers=``, and ``;blocks=joint|single`` (no restriction) dropped. Kind and option names
  are case-insensitive; whitespace around tokens is ignored.

Every malformed spec or invalid constructor argument raises
:class:`~taca_probe.errors.ScheduleError` (a ``ValueError``) whose one-line message ends with
the list of valid forms.
"""

from __future__ import annotations

import abc
import fnmatch
import math
import numbers
import operator
import re
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any, ClassVar

from .errors import ScheduleError

__all__ = [
    "FORMS",
    "FORMS_LINE",
    "T_TOLERANCE",
    "T_MAX",
    "BLOCK_TYPES",
    "Schedule",
    "NoneSchedule",
    "ConstSchedule",
    "StepSchedule",
    "FirstSchedule",
    "FracSchedule",
    "LinearRampSchedule",
    "CosineRampSchedule",
    "TableSchedule",
    "RestrictedSchedule",
    "parse",
]

#: Absolute tolerance of the timestep comparisons (``t >= T`` means ``t >= T - T_TOLERANCE``).
T_TOLERANCE: float = 1e-3

#: Largest valid timestep (timesteps live on ``[0, T_MAX]``).
T_MAX: float = 1000.0

#: The two kinds of MM-DiT attention blocks, in canonical order.
BLOCK_TYPES: tuple[str, str] = ("joint", "single")

#: Help text, one valid form per line (CLI ``--help``).
FORMS: str = "\n".join(
    [
        "none                      stock model: gamma 1 everywhere",
        "const:G                   gamma G at every step",
        "step:G@T                  G while t >= T, else 1 (paper: step:1.2@970)",
        "first:G@K                 G for steps 0..K-1 (step < K), else 1 (official: first:1.2@3)",
        "frac:G@F                  G for the first floor(F*N + 0.5) of N steps, 0 < F <= 1",
        "linear:G0..G1@T0..T1      G0 for t >= T0, G1 for t <= T1, linear in between (T0 > T1)",
        "cosine:G0..G1@T0..T1      as linear, with a half-cosine ramp",
        "table:T1=G1,T2=G2,...     G of the largest Ti with t >= Ti; 1 below every Ti",
        "suffixes, any kind:       ;blocks=joint|single  ;layers=GLOB[|GLOB...] (fnmatch on path)",
        "G > 0 finite, t and T on 0..1000 (compared with 1e-3 tolerance), K integer >= 0",
    ]
)

#: The valid forms on a single line (appended to every :class:`ScheduleError` message).
FORMS_LINE: str = (
    "valid forms: none | const:G | step:G@T | first:G@K | frac:G@F | linear:G0..G1@T0..T1 | "
    "cosine:G0..G1@T0..T1 | table:T1=G1,T2=G2,... ; optional suffixes ;blocks=joint|single "
    "and ;layers=GLOB[|GLOB...] ; G > 0, T in 0..1000, K integer >= 0, 0 < F <= 1"
)

_KINDS = ("none", "const", "step", "first", "frac", "linear", "cosine", "table")
_OPTIONS = ("blocks", "layers")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INT_RE = re.compile(r"[+-]?\d+")


# --------------------------------------------------------------------------------------------
# errors and validation helpers
# --------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """Internal: a validation failure; ``reason`` is one line without the forms list."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def _error(subject: str, reason: str) -> ScheduleError:
    """Build the one-line :class:`ScheduleError` for ``subject`` failing because of ``reason``."""
    return ScheduleError(_one_line(f"invalid gamma schedule {subject}: {reason}; {FORMS_LINE}"))


def _fmt(x: float) -> str:
    """Shortest round-tripping text of a number: ``970.0 -> '970'``, ``1.2 -> '1.2'``."""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def _as_real(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Invalid(f"{what} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise _Invalid(f"{what} must be finite, got {_fmt_any(x)}")
    return x


def _fmt_any(x: float) -> str:
    return repr(x) if not math.isfinite(x) else _fmt(x)


def _check_gamma(value: Any, what: str = "gamma G") -> float:
    g = _as_real(value, what)
    if g <= 0:
        raise _Invalid(f"{what} must be > 0, got {_fmt(g)}")
    return g


def _check_t(value: Any, what: str = "timestep") -> float:
    t = _as_real(value, what)
    if not 0.0 <= t <= T_MAX:
        raise _Invalid(f"{what} must be in 0..1000, got {_fmt(t)}")
    return t + 0.0  # turn -0.0 into 0.0


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise _Invalid(f"{what} must be an integer >= 0, got {value!r}")
    try:
        k = operator.index(value)
    except TypeError:
        raise _Invalid(f"{what} must be an integer >= 0, got {value!r}") from None
    if k < 0:
        raise _Invalid(f"{what} must be an integer >= 0, got {k}")
    return int(k)


def _ge(t: float, threshold: float) -> bool:
    """Tolerant ``t >= threshold``."""
    return t >= threshold - T_TOLERANCE


def _le(t: float, threshold: float) -> bool:
    """Tolerant ``t <= threshold``."""
    return t <= threshold + T_TOLERANCE


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------


class Schedule(abc.ABC):
    """A gamma schedule: the temperature applied to the image-query -> text-key logits.

    Concrete schedules are frozen (immutable, hashable) dataclasses whose constructors validate
    their fields, raising :class:`~taca_probe.errors.ScheduleError`. Build them from strings with
    :func:`parse`; ``str(schedule)`` and :attr:`spec` give the canonical string back.
    """

    #: Kind name as used in the string form (``"step"`` for ``step:G@T``).
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            self._validate()
        except _Invalid as exc:
            args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
            raise _error(f"{type(self).__name__}({args})", exc.reason) from exc

    def _validate(self) -> None:
        """Check and normalise the fields (raise :class:`_Invalid`); default: nothing to do."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    # ---- public interface -------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def spec(self) -> str:
        """Canonical one-line string form; ``parse(s.spec) == s``."""

    @property
    def needs_num_steps(self) -> bool:
        """True if :meth:`gamma` needs the total number of denoising steps (``frac``)."""
        return False

    @property
    def is_identity(self) -> bool:
        """True when gamma is 1 at every step and layer (``none``, ``const:1``, ...)."""
        return False

    def gamma(
        self,
        *,
        t: float,
        step: int,
        num_steps: int | None,
        layer: str,
        block_type: str,
    ) -> float:
        """Gamma for one attention call.

        Parameters
        ----------
        t : float
            Timestep on the 0..1000 scale (1000 = pure noise).
        step : int
            0-based index of the denoising step.
        num_steps : int or None
            Total number of denoising steps of the run, ``None`` when unknown (then a schedule
            with :attr:`needs_num_steps` raises).
        layer : str
            Attention module path, e.g. ``"transformer_blocks.3.attn"``.
        block_type : str
            ``"joint"`` or ``"single"``.

        Returns
        -------
        float
            The temperature; ``1.0`` means the stock model.

        Raises
        ------
        ScheduleError
            If ``block_type`` is invalid, or the schedule needs ``num_steps`` and it is ``None``
            or not a positive integer.
        """
        if block_type not in BLOCK_TYPES:
            raise ScheduleError(
                f"invalid block_type {block_type!r} for gamma schedule {self.spec!r}: "
                f"expected 'joint' or 'single'; {FORMS_LINE}"
            )
        return self._value(t=t, step=step, num_steps=num_steps, layer=layer, block_type=block_type)

    def active(
        self,
        *,
        t: float,
        step: int,
        num_steps: int | None,
        layer: str,
        block_type: str,
    ) -> bool:
        """Whether gamma differs from 1 for this call (see :meth:`gamma` for the parameters)."""
        g = self.gamma(t=t, step=step, num_steps=num_steps, layer=layer, block_type=block_type)
        return g != 1.0

    @abc.abstractmethod
    def describe(self) -> str:
        """One human-readable line, e.g. ``"gamma 1.2 for t >= 970 on all layers"``."""

    def __str__(self) -> str:
        return self.spec

    # ---- for subclasses ---------------------------------------------------------------------

    @abc.abstractmethod
    def _value(
        self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str
    ) -> float:
        """Gamma ignoring layer restrictions (arguments already checked)."""

    def _when(self) -> str:
        """Describe the time-dependence, without the layer part."""
        raise NotImplementedError


class _Unrestricted(Schedule):
    """Base of the schedules that apply to every layer."""

    def describe(self) -> str:
        return f"{self._when()} on all layers"


@dataclass(frozen=True)
class NoneSchedule(_Unrestricted):
    """The stock model: gamma 1 everywhere (``none``)."""

    kind: ClassVar[str] = "none"

    @property
    def spec(self) -> str:
        return "none"

    @property
    def is_identity(self) -> bool:
        return True

    def _value(
        self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str
    ) -> float:
        return 1.0

    def _when(self) -> str:
        return "gamma 1 at every step"

    def describe(self) -> str:
        return "gamma 1 at every step on all layers (stock model)"


@dataclass(frozen=True)
class ConstSchedule(_Unrestricted):
    """Gamma ``gamma0`` at every step (``const:G``).

    Parameters
    ----------
    gamma0 : float
        The temperature, finite and > 0.
    """

    gamma0: float
    kind: ClassVar[str] = "const"

    def _validate(self) -> None:
        self._set("gamma0", _check_gamma(self.gamma0))

    @property
    def spec(self) -> str:
        return f"const:{_fmt(self.gamma0)}"

    @property
    def is_identity(self) -> bool:
        return self.gamma0 == 1.0

    def _value(
        self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str
    ) -> float:
        return self.gamma0

    def _when(self) -> str:
        return f"gamma {_fmt(self.gamma0)} at every step"


@dataclass(frozen=True)
class StepSchedule(_Unrestricted):
    """Gamma ``gamma0`` while ``t >= t_thresh``, else 1 (``step:G@T``; the paper's rule).

    The comparison is tolerant: ``t >= t_thresh - T_TOLERANCE``.

    Parameters
    ----------
    gamma0 : float
        The temperature, finite and > 0.
    t_thresh : float
        Threshold timestep in ``[0, 1000]``.
    """

    gamma0: float
    t_thresh: float
    kind: ClassVar[str] = "step"

    def _validate(self) -> None:
        self._set("gamma0", _check_gamma(self.gamma0))
        self._set("t_thresh", _check_t(self.t_thresh, "threshold timestep T"))

    @property
    def spec(self) -> str:
        return f"step:{_fmt(self.gamma0)}@{_fmt(self.t_thresh)}"

    @property
    def is_identity(self) -> bool:
        return self.gamma0 == 1.0

    def _value(
        self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str
    ) -> float:
        return self.gamma0 if _ge(t, self.t_thresh) else 1.0

    def _when(self) -> str:
        return f"gamma {_fmt(self.gamma0)} for t >= {_fmt(self.t_thresh)}"


@dataclass(frozen=True)
class FirstSchedule(_Unrestricted):
    """Gamma ``gamma0`` for the first ``num_first`` denoising steps (``first:G@K``).

    Fires at ``step < num_first``; the official TACA code is ``first:1.2@3`` (30 steps).

    Parameters
    ----------
    gamma0 : float
        The temperature, finite and > 0.
    num_first : int
        Number of leading steps, an integer >= 0 (0 never fires).
    """

    gamma0: float
    num_first: int
    kind: ClassVar[str] = "first"

    def _validate(self) -> None:
        self._set("gamma0", _check_gamma(self.gamma0))
        self._set("num_first", _check_count(self.num_first, "step count K"))

    @property
    def spec(self) -> str:
        return f"first:{_fmt(self.gamma0)}@{self.num_first}"

    @property
    def is_identity(self) -> bool:
        return self.gamma0 == 1.0 or self.num_first == 0

    def _value(
        self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str
    ) -> float:
        return self.gamma0 if step < self.num_first else 1.0

    def _when(self) -> str:
        s = "step" if self.num_first == 1 else "steps"
        return f"gamma {_fmt(self.gamma0)} for the first {self.num_first} {s}"


@dataclass(frozen=True)
class FracSchedule(_Unrestricted):
    """Gamma ``gamma0`` for the first fraction ``fraction`` of the steps (``frac:G@F``).

    With ``N`` steps it fires at ``step < K``, ``K = floor(F * N + 1/2)`` (round half up),
    computed exactly on the decimal ``repr(F)``; see :meth:`num_active_steps`.

    Parameters
    ----------
    gamma0 : float
        The temperature, finite and > 0.
    fraction : float
        ``F`` with ``0 < F <= 1``.
    """

    gamma0: float
    fraction: float
    kind: ClassVar[str] = "frac"

    def _validate(self) -> None:
        self._set("gamma0", _check_gamma(self.gamma0))
        f = _as_real(self.fraction, "fraction F")
        if not 0.0 < f <= 1.0:
            raise _Invalid(f"fraction F must satisfy 0 < F <= 1, got {_fmt(f)}")
        self._set("fraction", f)

    @property
    def spec(self) -> str:
        return f"frac:{_fmt(self.gamma0)}@{_fmt(self.fraction)}"

    @property
    def needs_num_steps(self) -> bool:
        return True

    @property
    def is_identity(self) -> bool:
        return self.gamma0 == 1.0

    def num_active_steps(self, num_steps: int) -> int:
        """Number ``K`` of leading steps that fire in a run of ``num_steps`` steps.

        ``K = floor(F * num_steps + 1/2)`` in exact decimal arithmetic on ``repr(F)``, so
        ``0.1`` of 30 steps is 3 (not 3.0000000000000004) and 0.5 of 25 steps is 13.

        Parameters
        ----------
        num_steps : int
            Total number of denoising steps, > 0.

        Returns
        -------
        int
            ``K``, between 0 and ``num_steps``.
        """
        n = self._checked_num_steps(num_steps)
        exact = Decimal(repr(self.fraction)) * n + Decimal("0.5")
        return int(math.floor(exact))

    def _checked_num_steps(self, num_steps: int | None) -> int:
        if num_steps is None:
            raise ScheduleError(
                f"gamma schedule {self.spec!r} needs the total number of denoising steps, but "
                f"num_steps is None: pass num_inference_steps; {FORMS_LINE}"
            )
        if (
            isinstance(num_steps, bool)
            or not isinstance(num_steps, numbers.Integral)
            or num_steps <= 0
        ):
            raise ScheduleError(
                f"gamma schedule {self.spec!r} needs a positive integer number of denoising "
                f"steps, got num_steps={num_steps!r}: pass num_inference_steps; {FORMS_LINE}"
            )
        return int(num_steps)

    def _value(
        self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str
    ) -> float:
        return self.gamma0 if step < self.num_active_steps(num_steps) else 1.0

    def _when(self) -> str:
        return (
            f"gamma {_fmt(self.gamma0)} for the first fraction {_fmt(self.fraction)} of the steps "
            f"(step < floor({_fmt(self.fraction)}*N + 0.5) of N)"
        )


@dataclass(frozen=True)
class _RampSchedule(_Unrestricted):
    """Ramp from ``gamma_start`` (for ``t >= t_start``) to ``gamma_end`` (for ``t <= t_end``)."""

    gamma_start: float
    gamma_end: float
    t_start: float
    t_end: float
    kind: ClassVar[str] = ""

    def _validate(self) -> None:
        self._set("gamma_start", _check_gamma(self.gamma_start, "gamma G0"))
        self._set("gamma_end", _check_gamma(self.gamma_end, "gamma G1"))
        self._set("t_start", _check_t(self.t_start, "ramp start T0"))
        self._set("t_end", _check_t(self.t_end, "ramp end T1"))
        if not self.t_start > self.t_end:
            raise _Invalid(
                f"ramp needs T0 > T1 (T0 is the earlier, noisier timestep), got "
                f"T0={_fmt(self.t_start)} and T1={_fmt(self.t_end)}"
            )

    @property
    def spec(self) -> str:
        return (
            f"{self.kind}:{_fmt(self.gamma_start)}..{_fmt(self.gamma_end)}"
            f"@{_fmt(self.t_start)}..{_fmt(self.t_end)}"
        )

    @property
    def is_identity(self) -> bool:
        return self.gamma_start == 1.0 and self.gamma_end == 1.0

    @staticmethod
    def _shape(u: float) -> float:
        """Weight of ``gamma_end`` at progress ``u`` in ``[0, 1]``."""
        raise NotImplementedError

    def _value(
        self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str
    ) -> float:
        if _ge(t, self.t_start):
            return self.gamma_start
        if _le(t, self.t_end):
            return self.gamma_end
        u = (self.t_start - t) / (self.t_start - self.t_end)
        w = self._shape(min(1.0, max(0.0, u)))
        return self.gamma_start + (self.gamma_end - self.gamma_start) * w

    def _when(self) -> str:
        return (
            f"gamma {_fmt(self.gamma_start)} for t >= {_fmt(self.t_start)}, {self.kind} ramp to "
            f"{_fmt(self.gamma_end)} at t <= {_fmt(self.t_end)}"
        )


@dataclass(frozen=True)
class LinearRampSchedule(_RampSchedule):
    """Linear ramp (``linear:G0..G1@T0..T1``).

    ``G0`` for ``t >= T0``, ``G1`` for ``t <= T1`` and
    ``G0 + (G1 - G0) * (T0 - t) / (T0 - T1)`` in between; requires ``T0 > T1``.

    Parameters
    ----------
    gamma_start, gamma_end : float
        ``G0`` and ``G1``, finite and > 0.
    t_start, t_end : float
        ``T0`` and ``T1`` in ``[0, 1000]`` with ``T0 > T1``.
    """

    kind: ClassVar[str] = "linear"

    @staticmethod
    def _shape(u: float) -> float:
        return u


@dataclass(frozen=True)
class CosineRampSchedule(_RampSchedule):
    """Half-cosine ramp (``cosine:G0..G1@T0..T1``).

    As :class:`LinearRampSchedule` with the weight ``(1 - cos(pi * u)) / 2`` of ``G1`` at
    progress ``u = (T0 - t) / (T0 - T1)``: flat at both ends, ``(G0 + G1) / 2`` at the midpoint.

    Parameters
    ----------
    gamma_start, gamma_end : float
        ``G0`` and ``G1``, finite and > 0.
    t_start, t_end : float
        ``T0`` and ``T1`` in ``[0, 1000]`` with ``T0 > T1``.
    """

    kind: ClassVar[str] = "cosine"

    @staticmethod
    def _shape(u: float) -> float:
        return (1.0 - math.cos(math.pi * u)) / 2.0


@dataclass(frozen=True)
class TableSchedule(_Unrestricted):
    """Piecewise-constant gamma on the timestep (``table:T1=G1,T2=G2,...``).

    Gamma is the ``G`` of the entry with the largest threshold ``Ti`` such that ``t >= Ti``
    (tolerant comparison), i.e. ``Gi`` holds on ``[Ti, next larger threshold)`` and the entry
    with the largest threshold holds up to 1000; gamma is 1 when ``t`` is below every
    threshold. ``table:1000=1.3,970=1.2`` gives 1.3 at t = 1000, 1.2 for 970 <= t < 1000 and 1
    below 970; ``table:970=1.2`` equals ``step:1.2@970`` in effect.

    Parameters
    ----------
    entries : tuple of (float, float)
        ``(threshold, gamma)`` pairs, at least one, distinct thresholds in ``[0, 1000]``,
        gammas finite and > 0. Stored sorted by decreasing threshold (canonical order).
    """

    entries: tuple[tuple[float, float], ...]
    kind: ClassVar[str] = "table"

    def _validate(self) -> None:
        try:
            raw = list(self.entries)
        except TypeError:
            raise _Invalid(f"table entries must be (T, G) pairs, got {self.entries!r}") from None
        if not raw:
            raise _Invalid("table needs at least one T=G entry")
        out: list[tuple[float, float]] = []
        for entry in raw:
            try:
                thr, g = entry
            except (TypeError, ValueError):
                raise _Invalid(f"table entries must be (T, G) pairs, got {entry!r}") from None
            out.append((_check_t(thr, "table threshold T"), _check_gamma(g, "table gamma G")))
        seen: set[float] = set()
        for thr, _ in out:
            if thr in seen:
                raise _Invalid(f"table thresholds must be distinct, {_fmt(thr)} appears twice")
            seen.add(thr)
        out.sort(key=lambda e: -e[0])
        self._set("entries", tuple(out))

    @property
    def spec(self) -> str:
        return "table:" + ",".join(f"{_fmt(thr)}={_fmt(g)}" for thr, g in self.entries)

    @property
    def is_identity(self) -> bool:
        return all(g == 1.0 for _, g in self.entries)

    def _value(
        self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str
    ) -> float:
        # entries are sorted by decreasing threshold: the first one that t reaches is the
        # largest threshold Ti <= t, i.e. the piece [Ti, next larger threshold) containing t
        for thr, g in self.entries:
            if _ge(t, thr):
                return g
        return 1.0

    def _when(self) -> str:
        parts = []
        upper: float | None = None
        for thr, g in self.entries:
            if upper is None:
                parts.append(f"{_fmt(g)} for t >= {_fmt(thr)}")
            else:
                parts.append(f"{_fmt(g)} for {_fmt(thr)} <= t < {_fmt(upper)}")
            upper = thr
        return "gamma " + ", ".join(parts) + ", 1 below"


@dataclass(frozen=True)
class RestrictedSchedule(Schedule):
    """A schedule restricted to a subset of the attention layers (``SPEC;blocks=...;layers=...``).

    A layer is selected when its block type is in ``blocks`` (if given) and its module path
    matches one of the ``layers`` globs (if given, :func:`fnmatch.fnmatchcase`); other layers get
    gamma 1.

    Parameters
    ----------
    base : Schedule
        The unrestricted schedule (not itself a :class:`RestrictedSchedule`).
    blocks : tuple of str or None
        Subset of ``("joint", "single")``; ``None`` (or both) for no block restriction.
        Stored deduplicated in canonical order, and ``None`` when it names both.
    layers : tuple of str or None
        Non-empty fnmatch globs on the module path; ``None`` for no layer restriction.

    Notes
    -----
    At least one real restriction is required (``blocks`` naming a single block type, or
    ``layers``); :func:`parse` returns the bare base schedule for ``;blocks=joint|single``.
    """

    base: Schedule
    blocks: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None

    def _validate(self) -> None:
        if not isinstance(self.base, Schedule) or isinstance(self.base, RestrictedSchedule):
            raise _Invalid(f"base must be an unrestricted Schedule, got {self.base!r}")
        blocks = self.blocks
        if blocks is not None:
            blocks = _check_blocks(blocks if not isinstance(blocks, str) else (blocks,))
            if blocks == BLOCK_TYPES:
                blocks = None
        self._set("blocks", blocks)
        layers = self.layers
        if layers is not None:
            layers = _check_layers(layers if not isinstance(layers, str) else (layers,))
        self._set("layers", layers)
        if blocks is None and layers is None:
            raise _Invalid("a restriction needs blocks=joint or blocks=single, or layers=GLOB")

    @property
    def spec(self) -> str:
        out = self.base.spec
        if self.blocks is not None:
            out += ";blocks=" + "|".join(self.blocks)
        if self.layers is not None:
            out += ";layers=" + "|".join(self.layers)
        return out

    @property
    def needs_num_steps(self) -> bool:
        return self.base.needs_num_steps

    @property
    def is_identity(self) -> bool:
        return self.base.is_identity

    def selects(self, *, layer: str, block_type: str) -> bool:
        """Whether the layer is selected (else its gamma is 1).

        Parameters
        ----------
        layer : str
            Attention module path, e.g. ``"transformer_blocks.3.attn"``.
        block_type : str
            ``"joint"`` or ``"single"``.

        Returns
        -------
        bool
        """
        if self.blocks is not None and block_type not in self.blocks:
            return False
        if self.layers is not None and not any(fnmatch.fnmatchcase(layer, p) for p in self.layers):
            return False
        return True

    def _value(
        self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str
    ) -> float:
        if not self.selects(layer=layer, block_type=block_type):
            # still validate num_steps so that a missing value surfaces on every layer
            if isinstance(self.base, FracSchedule):
                self.base._checked_num_steps(num_steps)
            return 1.0
        return self.base._value(
            t=t, step=step, num_steps=num_steps, layer=layer, block_type=block_type
        )

    def describe(self) -> str:
        if self.layers is None:
            where = f"{self.blocks[0]} blocks" if self.blocks else "all layers"
        elif self.blocks is None:
            where = "layers matching " + "|".join(self.layers)
        else:
            where = f"{self.blocks[0]}-block layers matching " + "|".join(self.layers)
        return f"{self.base._when()} on {where}"


def _check_blocks(blocks: Any) -> tuple[str, ...]:
    try:
        items = list(blocks)
    except TypeError:
        raise _Invalid(f"blocks must be 'joint' and/or 'single', got {blocks!r}") from None
    if not items:
        raise _Invalid("blocks must name 'joint' and/or 'single', got nothing")
    for b in items:
        if b not in BLOCK_TYPES:
            raise _Invalid(f"block type must be 'joint' or 'single', got {b!r}")
    return tuple(b for b in BLOCK_TYPES if b in items)


def _check_layers(layers: Any) -> tuple[str, ...]:
    try:
        items = list(layers)
    except TypeError:
        raise _Invalid(f"layers must be fnmatch patterns, got {layers!r}") from None
    if not items:
        raise _Invalid("layers needs at least one pattern")
    out: list[str] = []
    for p in items:
        if not isinstance(p, str) or not p.strip():
            raise _Invalid(f"layers pattern must be a non-empty string, got {p!r}")
        if p != p.strip() or any(c in p for c in ";|\n\r"):
            raise _Invalid(f"layers pattern {p!r} must not contain spaces at its ends, ';' or '|'")
        if p not in out:
            out.append(p)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


def _num(token: str, what: str) -> float:
    tok = token.strip()
    if not _NUMBER_RE.fullmatch(tok):
        try:
            value = float(tok)
        except ValueError:
            value = None
        if value is not None and not math.isfinite(value):
            raise _Invalid(f"{what} must be finite, got {tok!r}")
        raise _Invalid(f"{what} must be a number, got {tok!r}")
    return float(tok)


def _split2(text: str, sep: str, kind_form: str) -> tuple[str, str]:
    parts = text.split(sep)
    if len(parts) != 2:
        raise _Invalid(f"expected {kind_form}, got {text.strip()!r}")
    return parts[0], parts[1]


def _parse_kind(kind: str, arg: str | None) -> Schedule:
    if kind not in _KINDS:
        raise _Invalid(f"unknown kind {kind!r} (valid kinds: {', '.join(_KINDS)})")
    if kind == "none":
        if arg is not None:
            raise _Invalid(f"'none' takes no argument, got {arg.strip()!r}")
        return NoneSchedule()
    if kind == "table" and (arg is None or not arg.strip()):
        raise _Invalid("empty table: table needs at least one T=G entry")
    if arg is None or not arg.strip():
        raise _Invalid(f"{kind!r} needs an argument after ':'")
    if kind == "const":
        return ConstSchedule(_num(arg, "gamma G"))
    if kind == "step":
        g, t = _split2(arg, "@", "step:G@T")
        return StepSchedule(_num(g, "gamma G"), _num(t, "threshold timestep T"))
    if kind == "first":
        g, k = _split2(arg, "@", "first:G@K")
        k = k.strip()
        if not _INT_RE.fullmatch(k):
            raise _Invalid(f"step count K must be an integer >= 0, got {k!r}")
        return FirstSchedule(_num(g, "gamma G"), int(k))
    if kind == "frac":
        g, f = _split2(arg, "@", "frac:G@F")
        return FracSchedule(_num(g, "gamma G"), _num(f, "fraction F"))
    if kind in ("linear", "cosine"):
        form = f"{kind}:G0..G1@T0..T1"
        gs, ts = _split2(arg, "@", form)
        g0, g1 = _split2(gs, "..", form)
        t0, t1 = _split2(ts, "..", form)
        cls = LinearRampSchedule if kind == "linear" else CosineRampSchedule
        return cls(
            _num(g0, "gamma G0"), _num(g1, "gamma G1"),
            _num(t0, "ramp start T0"), _num(t1, "ramp end T1"),
        )  # fmt: skip
    if kind == "table":
        entries = []
        for item in arg.split(","):
            thr, g = _split2(item, "=", "table entries T=G separated by ','")
            entries.append((_num(thr, "table threshold T"), _num(g, "table gamma G")))
        return TableSchedule(tuple(entries))
    raise AssertionError(kind)  # pragma: no cover - all kinds handled above


def _parse(text: str) -> Schedule:
    head, *opts = text.split(";")
    head = head.strip()
    if not head:
        raise _Invalid("empty schedule")
    kind, sep, arg = head.partition(":")
    base = _parse_kind(kind.strip().lower(), arg if sep else None)

    blocks: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    seen: set[str] = set()
    for opt in opts:
        name, sep, value = opt.partition("=")
        name = name.strip().lower()
        if not sep:
            raise _Invalid(
                f"option {opt.strip()!r} must be NAME=VALUE (valid options: blocks, layers)"
            )
        if name not in _OPTIONS:
            raise _Invalid(f"unknown option {name!r} (valid options: blocks, layers)")
        if name in seen:
            raise _Invalid(f"option {name!r} given twice")
        seen.add(name)
        items = [v.strip() for v in value.split("|")]
        if name == "blocks":
            blocks = _check_blocks([v.lower() for v in items])
        else:
            layers = _check_layers(items)
    if blocks == BLOCK_TYPES:
        blocks = None
    if blocks is None and layers is None:
        return base
    return RestrictedSchedule(base, blocks=blocks, layers=layers)


def parse(spec: str | Schedule) -> Schedule:
    """Parse a gamma schedule string (a :class:`Schedule` is returned unchanged).

    Parameters
    ----------
    spec : str or Schedule
        One of the forms listed in :data:`FORMS`, e.g. ``"step:1.2@970"``,
        ``"frac:1.2@0.1;blocks=joint"``. Whitespace around tokens is ignored.

    Returns
    -------
    Schedule
        The schedule; ``parse(s.spec) == s``.

    Raises
    ------
    ScheduleError
        If the spec is malformed or a value is out of range; the one-line message ends with the
        valid forms.
    """
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, str):
        raise _error(repr(spec), f"expected a string or a Schedule, got {type(spec).__name__}")
    try:
        return _parse(spec)
    except _Invalid as exc:
        raise _error(repr(spec), exc.reason) from None
    except ScheduleError as exc:
        cause = exc.__cause__
        reason = cause.reason if isinstance(cause, _Invalid) else str(exc)
        raise _error(repr(spec), reason) from None
