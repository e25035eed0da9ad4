"""Gamma schedules: when and where TACA scales the visual-query -> text-key attention logits.

:func:`parse` turns a spec (:data:`FORMS`; the paper's ``step:1.2@970``, the official code's
``first:1.2@3``) into an immutable :class:`Schedule`, and ``parse(str(s)) == s``. Bad specs raise
a one-line :class:`~taca_probe.errors.ScheduleError` ending with :data:`FORMS_LINE`.
"""

import abc
import fnmatch
import functools
import math
import numbers
import operator
import re
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, Callable, ClassVar

from .errors import ScheduleError

__all__ = ["FORMS", "FORMS_LINE", "T_TOLERANCE", "T_MAX", "GAMMA_MIN", "GAMMA_MAX", "BLOCK_TYPES", "Schedule",
           "NoneSchedule", "ConstSchedule", "StepSchedule", "FirstSchedule", "FracSchedule", "LinearRampSchedule",
           "CosineRampSchedule", "TableSchedule", "RestrictedSchedule", "parse"]  # fmt: skip

T_TOLERANCE: float = 1e-3  #: slack of the timestep comparisons: ``t >= T`` is ``t >= T - T_TOLERANCE``
T_MAX: float = 1000.0  #: timesteps live on ``[0, T_MAX]``
BLOCK_TYPES: tuple[str, str] = ("joint", "single")  #: the MM-DiT attention block types, canonical order

#: The grammar, one form a line (CLI help); the kinds, their forms and FORMS_LINE are read from it.
FORMS: str = """\
none                      stock model: gamma 1 everywhere
const:G                   gamma G at every step
step:G@T                  G while t >= T, else 1 (paper: step:1.2@970)
first:G@K                 G for steps 0..K-1 (step < K), else 1 (official: first:1.2@3)
frac:G@F                  G for the first floor(F*N + 0.5) of N steps, 0 < F <= 1
linear:G0..G1@T0..T1      G0 for t >= T0, G1 for t <= T1, linear in between (T0 > T1)
cosine:G0..G1@T0..T1      as linear, with a half-cosine ramp
table:T1=G1,T2=G2,...     G of the largest Ti with t >= Ti; 1 below every Ti
suffixes, any kind:       ;blocks=joint|single  ;layers=GLOB[|GLOB...] (fnmatch on path)
G > 0 finite, t and T on 0..1000 (compared with 1e-3 tolerance), K integer >= 0"""
_FORM = {line.split()[0].partition(":")[0]: line.split()[0] for line in FORMS.splitlines()[:8]}  # kind -> form
#: The valid forms on a single line (appended to every :class:`ScheduleError` message).
FORMS_LINE: str = (f"valid forms: {' | '.join(_FORM.values())} ; optional suffixes ;blocks=joint|single and "
                   ";layers=GLOB[|GLOB...] ; G > 0, T in 0..1000, K integer >= 0, 0 < F <= 1")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")  # float() minus nan, 0x1, 1_2
_INT_RE = re.compile(r"[+-]?\d+")


class _Invalid(Exception):
    """A failed check (the reason); the constructor or parse() names what was built in the ScheduleError."""

    def error(self, subject: str) -> ScheduleError:
        subject = subject if len(subject) <= 300 else f"{subject[:280]}...{subject[-12:]}"  # a long table: not 1 MB of error
        text = f"invalid gamma schedule {subject}: {self.args[0]}; {FORMS_LINE}"
        return ScheduleError(text.replace("\r", " ").replace("\n", " "))  # the message is one line


def _fmt(x: float) -> str:
    """Shortest round-tripping text of a number: ``970.0 -> '970'``, ``1.2 -> '1.2'``; ints as such."""
    return str(int(x)) if isinstance(x, int) or (float(x).is_integer() and abs(x) < 1e15) else repr(float(x))


def _real(value: Any, what: str, *, must: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Invalid(f"{what} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise _Invalid(f"{what} must be finite, got {x!r}")
    if not ok(x):
        raise _Invalid(f"{what} must {must}, got {_fmt(x)}")
    return x + 0.0  # -0.0 -> 0.0, so that a spec never reads "-0"


#: The gammas a float32 holds as a positive, finite, normal number: the keys are scaled in the model's
#: dtype, where 1e308 is inf (a NaN image) and 1e-50 is 0.
GAMMA_MIN: float = 2.0**-126  # 1.1754944e-38, numpy.finfo(numpy.float32).tiny
GAMMA_MAX: float = (2.0 - 2.0**-23) * 2.0**127  # 3.4028235e38, numpy.finfo(numpy.float32).max


def _gamma(value: Any, what: str) -> float:
    x = _real(value, what, must="be > 0", ok=lambda x: x > 0)
    if not GAMMA_MIN <= x <= GAMMA_MAX:
        raise _Invalid(f"{what} must be in {_fmt(GAMMA_MIN)}..{_fmt(GAMMA_MAX)} (positive and finite as a "
                       f"float32), got {_fmt(x)}")
    return x


_timestep = functools.partial(_real, must="be in 0..1000", ok=lambda x: 0.0 <= x <= T_MAX)
_fraction = functools.partial(_real, must="satisfy 0 < F <= 1", ok=lambda x: 0.0 < x <= 1.0)


def _count(value: Any, what: str) -> int:
    try:
        k = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        k = None
    if k is None or k < 0:
        raise _Invalid(f"{what} must be an integer >= 0, got {repr(value) if k is None else k}")
    return int(k)


def _option(name: str, value: Any) -> tuple[str, ...]:
    """A checked restriction: ``blocks`` in canonical order, or ``layers`` deduplicated (a str is one item)."""
    blocks = name == "blocks"
    try:
        items = list((value,) if isinstance(value, str) else value)
    except TypeError:
        must = "be 'joint' and/or 'single'" if blocks else "be fnmatch patterns"
        raise _Invalid(f"{name} must {must}, got {value!r}") from None
    if not items:
        raise _Invalid("blocks must name 'joint' and/or 'single', got nothing" if blocks
                       else "layers needs at least one pattern")  # fmt: skip
    for p in items:
        if blocks and p not in BLOCK_TYPES:
            raise _Invalid(f"block type must be 'joint' or 'single', got {p!r}")
        if not blocks and (not isinstance(p, str) or not p.strip()):
            raise _Invalid(f"layers pattern must be a non-empty string, got {p!r}")
        if not blocks and (p != p.strip() or any(c in p for c in ";|\n\r")):  # it would not survive the spec
            raise _Invalid(f"layers pattern {p!r} must not contain spaces at its ends, ';' or '|'")
    return tuple(b for b in BLOCK_TYPES if b in items) if blocks else tuple(dict.fromkeys(items))


def _field(check: Callable[[Any, str], Any], what: str) -> Any:
    """A schedule field: the constructor normalises it with ``check``; messages call it ``what``."""
    return field(metadata={"check": check, "what": what})


class Schedule(abc.ABC):
    """A gamma schedule: a frozen dataclass whose constructor checks and normalises its fields."""

    kind: ClassVar[str] = ""  #: kind name of the string form ("step" for ``step:G@T``)
    needs_num_steps: ClassVar[bool] = False  #: whether :meth:`gamma` needs ``num_steps`` (frac)
    _spec: ClassVar[str]  # str.format templates over _formatted(): the spec, and the timing in words
    _words: ClassVar[str]

    def __post_init__(self) -> None:
        try:
            for f in fields(self):
                if "check" in f.metadata:
                    object.__setattr__(self, f.name, f.metadata["check"](getattr(self, f.name), f.metadata["what"]))
            self._validate()
        except _Invalid as exc:
            args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
            raise exc.error(f"{type(self).__name__}({args})") from exc

    def _validate(self) -> None:
        """Checks across fields, after the per-field ones (raise :class:`_Invalid`)."""

    def _formatted(self) -> dict[str, str]:
        return {"kind": self.kind, **{f.name: _fmt(getattr(self, f.name)) for f in fields(self)}}

    @property
    def spec(self) -> str:
        """Canonical one-line form (shortest numbers, table by decreasing T); ``parse(s.spec) == s``."""
        return self._spec.format(**self._formatted())

    @property
    def is_identity(self) -> bool:
        """True when gamma is 1 at every step and layer (``none``, ``const:1``, ...)."""
        return all(getattr(self, f.name) == 1.0 for f in fields(self) if f.metadata.get("check") is _gamma)

    def gamma(self, *, t: float, step: int, num_steps: int | None, layer: str, block_type: str) -> float:
        """Gamma (1: stock) at timestep t (0..1000) of step ``step`` of ``num_steps`` (None: unknown),
        in attention module ``layer`` (a path) of type ``block_type`` ("joint" or "single")."""
        if block_type not in BLOCK_TYPES:
            raise ScheduleError(f"invalid block_type {block_type!r} for gamma schedule {self.spec!r}: "
                                f"expected 'joint' or 'single'; {FORMS_LINE}")  # fmt: skip
        return self._value(t, step, num_steps, layer, block_type)

    @abc.abstractmethod
    def _value(self, t: float, step: int, num_steps: int | None, *where: str) -> float:
        """:meth:`gamma` after its check; ``where`` (layer, block type) matters only to restrictions."""

    def _when(self) -> str:
        return self._words.format(**self._formatted())

    def describe(self) -> str:
        """One human-readable line, e.g. ``"gamma 1.2 for t >= 970 on all layers"``."""
        return f"{self._when()} on all layers"

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class NoneSchedule(Schedule):
    """The stock model: gamma 1 everywhere (``none``)."""

    kind, _spec, _words = "none", "none", "gamma 1 at every step"

    def _value(self, t: float, step: int, num_steps: int | None, *where: str) -> float:
        return 1.0

    def describe(self) -> str:
        return "gamma 1 at every step on all layers (stock model)"


@dataclass(frozen=True)
class ConstSchedule(Schedule):
    """Gamma ``gamma0`` at every step (``const:G``)."""

    gamma0: float = _field(_gamma, "gamma G")
    kind, _spec, _words = "const", "const:{gamma0}", "gamma {gamma0} at every step"

    def _value(self, t: float, step: int, num_steps: int | None, *where: str) -> float:
        return self.gamma0


@dataclass(frozen=True)
class StepSchedule(Schedule):
    """Gamma ``gamma0`` while ``t >= t_thresh`` (tolerant), else 1 (``step:G@T``; the paper's rule)."""

    gamma0: float = _field(_gamma, "gamma G")
    t_thresh: float = _field(_timestep, "threshold timestep T")
    kind, _spec, _words = "step", "step:{gamma0}@{t_thresh}", "gamma {gamma0} for t >= {t_thresh}"

    def _value(self, t: float, step: int, num_steps: int | None, *where: str) -> float:
        return self.gamma0 if t >= self.t_thresh - T_TOLERANCE else 1.0


@dataclass(frozen=True)
class FirstSchedule(Schedule):
    """Gamma ``gamma0`` at ``step < num_first``, else 1 (``first:G@K``; the official code's rule)."""

    gamma0: float = _field(_gamma, "gamma G")
    num_first: int = _field(_count, "step count K")
    kind, _spec = "first", "first:{gamma0}@{num_first}"
    is_identity = property(lambda self: self.gamma0 == 1.0 or self.num_first == 0)

    def _value(self, t: float, step: int, num_steps: int | None, *where: str) -> float:
        return self.gamma0 if step < self.num_first else 1.0

    def _when(self) -> str:
        return f"gamma {_fmt(self.gamma0)} for the first {self.num_first} step{'' if self.num_first == 1 else 's'}"


@dataclass(frozen=True)
class FracSchedule(Schedule):
    """Gamma ``gamma0`` for the first fraction ``0 < fraction <= 1`` of the steps (``frac:G@F``)."""

    gamma0: float = _field(_gamma, "gamma G")
    fraction: float = _field(_fraction, "fraction F")
    kind, _spec, needs_num_steps = "frac", "frac:{gamma0}@{fraction}", True
    _words = "gamma {gamma0} for the first fraction {fraction} of the steps (step < floor({fraction}*N + 0.5) of N)"

    def num_active_steps(self, num_steps: int) -> int:
        """``K = floor(F * num_steps + 1/2)``, exact on the decimal ``repr(F)`` (not 0.1 * 30 = 3.0000000000000004)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps <= 0:
            need = ("the total number of denoising steps, but num_steps is None" if num_steps is None else
                    f"a positive integer number of denoising steps, got num_steps={num_steps!r}")  # fmt: skip
            raise ScheduleError(f"gamma schedule {self.spec!r} needs {need}: pass num_inference_steps; {FORMS_LINE}")
        return math.floor(Decimal(repr(self.fraction)) * int(num_steps) + Decimal("0.5"))

    def _value(self, t: float, step: int, num_steps: int | None, *where: str) -> float:
        return self.gamma0 if step < self.num_active_steps(num_steps) else 1.0


@dataclass(frozen=True)
class _Ramp(Schedule):
    """``gamma_start`` for ``t >= t_start``, ``gamma_end`` for ``t <= t_end``, weight ``_shape(u)`` of
    ``gamma_end`` at progress ``u = (T0 - t) / (T0 - T1)`` in between."""

    gamma_start: float = _field(_gamma, "gamma G0")
    gamma_end: float = _field(_gamma, "gamma G1")
    t_start: float = _field(_timestep, "ramp start T0")
    t_end: float = _field(_timestep, "ramp end T1")
    _spec = "{kind}:{gamma_start}..{gamma_end}@{t_start}..{t_end}"
    _words = "gamma {gamma_start} for t >= {t_start}, {kind} ramp to {gamma_end} at t <= {t_end}"
    _shape: ClassVar[Callable[[float], float]]  # weight of gamma_end at progress u, set by each ramp

    def _validate(self) -> None:
        if not self.t_start > self.t_end:
            raise _Invalid(f"ramp needs T0 > T1 (T0 is the earlier, noisier timestep), got "
                           f"T0={_fmt(self.t_start)} and T1={_fmt(self.t_end)}")  # fmt: skip

    def _value(self, t: float, step: int, num_steps: int | None, *where: str) -> float:
        if t >= self.t_start - T_TOLERANCE:
            return self.gamma_start
        if t <= self.t_end + T_TOLERANCE:
            return self.gamma_end
        u = (self.t_start - t) / (self.t_start - self.t_end)
        return self.gamma_start + (self.gamma_end - self.gamma_start) * self._shape(min(1.0, max(0.0, u)))


@dataclass(frozen=True)
class LinearRampSchedule(_Ramp):
    """Linear ramp from ``gamma_start`` to ``gamma_end`` (``linear:G0..G1@T0..T1``)."""

    kind, _shape = "linear", staticmethod(lambda u: u)


@dataclass(frozen=True)
class CosineRampSchedule(_Ramp):
    """Half-cosine ramp, weight ``(1 - cos(pi * u)) / 2``, flat at both ends (``cosine:G0..G1@T0..T1``)."""

    kind, _shape = "cosine", staticmethod(lambda u: (1.0 - math.cos(math.pi * u)) / 2.0)


@dataclass(frozen=True)
class TableSchedule(Schedule):
    """Piecewise-constant gamma (``table:T1=G1,T2=G2,...``): the ``G`` of the largest ``Ti`` with
    ``t >= Ti``, 1 below every ``Ti``. ``entries``: distinct ``(Ti, Gi)``, by decreasing ``Ti``."""

    entries: tuple[tuple[float, float], ...]
    kind = "table"
    spec = property(lambda self: "table:" + ",".join(f"{_fmt(t)}={_fmt(g)}" for t, g in self.entries))
    is_identity = property(lambda self: all(g == 1.0 for _, g in self.entries))

    def _validate(self) -> None:
        try:
            raw = list(self.entries)
        except TypeError:
            raise _Invalid(f"table entries must be (T, G) pairs, got {self.entries!r}") from None
        if not raw:
            raise _Invalid("table needs at least one T=G entry")
        out = []
        for entry in raw:
            try:
                thr, g = entry
            except (TypeError, ValueError):
                raise _Invalid(f"table entries must be (T, G) pairs, got {entry!r}") from None
            out.append((_timestep(thr, "table threshold T"), _gamma(g, "table gamma G")))
        seen: set[float] = set()
        for thr, _ in out:  # after every entry is checked; a set: a long table is not quadratic
            if thr in seen:
                raise _Invalid(f"table thresholds must be distinct, {_fmt(thr)} appears twice")
            seen.add(thr)
        object.__setattr__(self, "entries", tuple(sorted(out, key=lambda e: -e[0])))

    def _value(self, t: float, step: int, num_steps: int | None, *where: str) -> float:
        # by decreasing threshold: the first one that t reaches is the largest Ti <= t
        return next((g for thr, g in self.entries if t >= thr - T_TOLERANCE), 1.0)

    def _when(self) -> str:
        thr = [_fmt(t) for t, _ in self.entries]
        where = [f"t >= {thr[0]}"] + [f"{thr[i]} <= t < {thr[i - 1]}" for i in range(1, len(thr))]
        return "gamma " + ", ".join(f"{_fmt(g)} for {w}" for (_, g), w in zip(self.entries, where)) + ", 1 below"


@dataclass(frozen=True)
class RestrictedSchedule(Schedule):
    """``base`` where the block type is in ``blocks`` and the module path matches a ``layers`` glob (each
    if given), 1 elsewhere (``SPEC;blocks=...;layers=...``); ``blocks`` naming both types is None."""

    base: Schedule
    blocks: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    needs_num_steps = property(lambda self: self.base.needs_num_steps)
    is_identity = property(lambda self: self.base.is_identity)

    def _validate(self) -> None:
        if not isinstance(self.base, Schedule) or isinstance(self.base, RestrictedSchedule):
            raise _Invalid(f"base must be an unrestricted Schedule, got {self.base!r}")
        if self.blocks is not None:
            blocks = _option("blocks", self.blocks)
            object.__setattr__(self, "blocks", None if blocks == BLOCK_TYPES else blocks)
        if self.layers is not None:
            object.__setattr__(self, "layers", _option("layers", self.layers))
        if self.blocks is None and self.layers is None:
            raise _Invalid("a restriction needs blocks=joint or blocks=single, or layers=GLOB")

    @property
    def spec(self) -> str:
        blocks = "" if self.blocks is None else ";blocks=" + "|".join(self.blocks)
        return self.base.spec + blocks + ("" if self.layers is None else ";layers=" + "|".join(self.layers))

    def selects(self, *, layer: str, block_type: str) -> bool:
        """Whether the layer is selected (else its gamma is 1)."""
        if self.blocks is not None and block_type not in self.blocks:
            return False
        return self.layers is None or any(fnmatch.fnmatchcase(layer, p) for p in self.layers)

    def _value(self, t: float, step: int, num_steps: int | None, *where: str) -> float:
        if self.selects(layer=where[0], block_type=where[1]):
            return self.base._value(t, step, num_steps)
        if isinstance(self.base, FracSchedule):  # a missing step count fails on every layer
            self.base.num_active_steps(num_steps)
        return 1.0

    def describe(self) -> str:
        where = "layers" if self.blocks is None else f"{self.blocks[0]}-block layers"
        where = f"{self.blocks[0]} blocks" if self.layers is None else f"{where} matching {'|'.join(self.layers)}"
        return f"{self.base._when()} on {where}"


_CLASSES = {c.kind: c for c in (NoneSchedule, ConstSchedule, StepSchedule, FirstSchedule, FracSchedule,
                                LinearRampSchedule, CosineRampSchedule, TableSchedule)}  # fmt: skip


def _num(token: str, what: str) -> float:
    tok = token.strip()
    if _NUMBER_RE.fullmatch(tok):
        return float(tok)
    try:
        finite = math.isfinite(float(tok))
    except ValueError:
        finite = True
    raise _Invalid(f"{what} must be {'a number' if finite else 'finite'}, got {tok!r}")


def _split(text: str, sep: str, form: str) -> list[str]:
    parts = text.split(sep)
    if len(parts) != 2:
        raise _Invalid(f"expected {form}, got {text.strip()!r}")
    return parts


def _parse_kind(kind: str, arg: str | None) -> Schedule:
    if kind not in _FORM:
        raise _Invalid(f"unknown kind {kind!r} (valid kinds: {', '.join(_FORM)})")
    if kind == "none":
        if arg is not None:
            raise _Invalid(f"'none' takes no argument, got {arg.strip()!r}")
        return NoneSchedule()
    if arg is None or not arg.strip():
        raise _Invalid("empty table: table needs at least one T=G entry" if kind == "table"
                       else f"{kind!r} needs an argument after ':'")  # fmt: skip
    form, cls = _FORM[kind], _CLASSES[kind]
    if kind == "table":  # lazily: each entry is split and read before the next one is looked at
        pairs = (_split(item, "=", "table entries T=G separated by ','") for item in arg.split(","))
        return cls(tuple((_num(thr, "table threshold T"), _num(g, "table gamma G")) for thr, g in pairs))
    tokens = [arg] if kind == "const" else _split(arg, "@", form)
    if kind == "first":
        if not _INT_RE.fullmatch(tokens[1].strip()):  # K's syntax is checked before G's value
            raise _Invalid(f"step count K must be an integer >= 0, got {tokens[1].strip()!r}")
        return cls(_num(tokens[0], "gamma G"), int(tokens[1]))
    if kind in ("linear", "cosine"):
        tokens = _split(tokens[0], "..", form) + _split(tokens[1], "..", form)
    # each number is named as the constructor names its field: "gamma G0", "ramp start T0", ...
    return cls(*(_num(tok, f.metadata["what"]) for tok, f in zip(tokens, fields(cls))))


def parse(spec: str | Schedule) -> Schedule:
    """The :class:`Schedule` of a spec, one of :data:`FORMS` (a Schedule is returned as is); else a
    one-line :class:`ScheduleError` ending with the valid forms."""
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, str):
        raise _Invalid(f"expected a string or a Schedule, got {type(spec).__name__}").error(repr(spec))
    try:
        head, *opts = spec.split(";")
        if not head.strip():
            raise _Invalid("empty schedule")
        kind, sep, arg = head.strip().partition(":")
        base = _parse_kind(kind.strip().lower(), arg if sep else None)
        options: dict[str, tuple[str, ...]] = {}
        for opt in opts:
            name, sep, value = opt.partition("=")
            name = name.strip().lower()
            if not sep:
                raise _Invalid(f"option {opt.strip()!r} must be NAME=VALUE (valid options: blocks, layers)")
            if name not in ("blocks", "layers"):
                raise _Invalid(f"unknown option {name!r} (valid options: blocks, layers)")
            if name in options:
                raise _Invalid(f"option {name!r} given twice")
            options[name] = _option(name, [v.strip().lower() if name == "blocks" else v.strip()
                                           for v in value.split("|")])  # fmt: skip
        options = {n: v for n, v in options.items() if (n, v) != ("blocks", BLOCK_TYPES)}  # both: no restriction
        return RestrictedSchedule(base, **options) if options else base
    except _Invalid as exc:
        raise exc.error(repr(spec)) from None
    except ScheduleError as exc:  # a constructor's check: name the spec, not the constructor call
        raise (exc.__cause__ if isinstance(exc.__cause__, _Invalid) else _Invalid(str(exc))).error(repr(spec)) from None
