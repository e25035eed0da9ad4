"""Tests of :mod:`taca_probe.schedules` with hand-computed expectations.

Error messages are checked for what they do (one line, a ScheduleError, the offending token and the
valid choices named, the same reason from parse() and from the constructors), not for their prose.
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

import numpy as np
import pytest

from taca_probe.errors import ScheduleError, TacaProbeError
from taca_probe.schedules import (
    FORMS,
    FORMS_LINE,
    T_TOLERANCE,
    ConstSchedule,
    CosineRampSchedule,
    FirstSchedule,
    FracSchedule,
    LinearRampSchedule,
    NoneSchedule,
    RestrictedSchedule,
    Schedule,
    StepSchedule,
    TableSchedule,
    parse,
)

JOINT = "transformer_blocks.3.attn"
SINGLE = "single_transformer_blocks.0.attn"
# written out here, not read from the module: the kinds of the README's table
KINDS = ("none", "const", "step", "first", "frac", "linear", "cosine", "table")


def g(
    sched: Schedule,
    *,
    t: float = 500.0,
    step: int = 0,
    num_steps: int | None = 30,
    layer: str = JOINT,
    block_type: str = "joint",
) -> float:
    return sched.gamma(t=t, step=step, num_steps=num_steps, layer=layer, block_type=block_type)


def firing_steps(sched: Schedule, num_steps: int) -> list[int]:
    return [
        s
        for s in range(num_steps)
        if sched.gamma(t=500.0, step=s, num_steps=num_steps, layer=JOINT, block_type="joint") != 1.0
    ]


def reason_of(exc: BaseException, subject: str = "") -> str:
    """Check a schedule error and return its reason.

    The error is a ScheduleError (so a TacaProbeError and a ValueError) with a one-line message that
    names ``subject`` (the quoted spec) and ends with the valid forms; the reason is what lies between.
    """
    assert isinstance(exc, ScheduleError) and isinstance(exc, TacaProbeError) and isinstance(exc, ValueError)
    msg = str(exc)
    assert "\n" not in msg and "\r" not in msg
    assert msg.endswith(FORMS_LINE)
    head = msg[: -len(FORMS_LINE)]
    assert subject in head
    return head.split(subject, 1)[1] if subject else head


def names(text: str, word: str) -> bool:
    """``word`` occurs in ``text`` as a whole token (``T`` is not found in ``T0``, ``0`` not in ``10``)."""
    return re.search(rf"(?<![\w.]){re.escape(word)}(?![\w.])", text) is not None


# ---------------------------------------------------------------------------------------------
# kinds
# ---------------------------------------------------------------------------------------------


def test_none_is_one_everywhere() -> None:
    s = parse("none")
    assert s == NoneSchedule()
    assert s.is_identity and not s.needs_num_steps
    for t in (0.0, 500.0, 1000.0):
        for step in (0, 5, 29):
            for layer, bt in ((JOINT, "joint"), (SINGLE, "single")):
                assert g(s, t=t, step=step, layer=layer, block_type=bt) == 1.0


@pytest.mark.parametrize("t", [0.0, 123.4, 969.0, 1000.0])
@pytest.mark.parametrize("step", [0, 17])
def test_const(t: float, step: int) -> None:
    s = parse("const:1.2")
    assert s == ConstSchedule(1.2)
    assert g(s, t=t, step=step) == 1.2
    assert g(s, t=t, step=step, layer=SINGLE, block_type="single") == 1.2
    assert not s.is_identity


def test_const_one_is_identity() -> None:
    assert parse("const:1").is_identity
    assert parse("const:1.0").is_identity


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (1000.0, 1.2),
        (985.0, 1.2),
        (970.0, 1.2),
        (969.99994, 1.2),  # float32 SD3 timestep meant to be 970
        (970.0 - 0.9e-3, 1.2),  # within the 1e-3 tolerance
        (969.99, 1.0),  # 1e-2 below: not >= 970
        (969.0, 1.0),
        (500.0, 1.0),
        (0.0, 1.0),
    ],
)
def test_step_paper_rule(t: float, expected: float) -> None:
    s = parse("step:1.2@970")
    assert s == StepSchedule(gamma0=1.2, t_thresh=970)
    assert g(s, t=t, step=99) == expected


def test_step_ignores_step_index_and_layer() -> None:
    s = parse("step:1.5@900")
    for step in (0, 3, 27):
        assert g(s, t=950.0, step=step, layer=SINGLE, block_type="single") == 1.5
        assert g(s, t=850.0, step=step) == 1.0


def test_step_zero_threshold_fires_everywhere() -> None:
    s = parse("step:1.1@0")
    assert g(s, t=0.0) == 1.1
    assert g(s, t=1000.0) == 1.1


# side -1: ``t >= edge`` still holds at edge - 0.9 T_TOLERANCE, not at edge - 1.1 T_TOLERANCE;
# side +1: ``t <= edge`` (the ramp end) likewise above the edge
@pytest.mark.parametrize(
    ("spec", "edge", "side"),
    [
        ("step:1.2@970", 970.0, -1),
        ("table:970=1.2", 970.0, -1),
        ("table:1000=1.3,970=1.2", 1000.0, -1),
        ("linear:1.2..1@970..900", 970.0, -1),
        ("linear:1.2..1@970..900", 900.0, +1),
    ],
)
def test_timestep_comparisons_allow_exactly_t_tolerance_of_slack(spec: str, edge: float, side: int) -> None:
    s = parse(spec)
    at_edge = g(s, t=edge)
    assert g(s, t=edge + side * 0.9 * T_TOLERANCE) == at_edge
    assert g(s, t=edge + side * 1.1 * T_TOLERANCE) != at_edge


@pytest.mark.parametrize(
    ("spec", "num_steps", "expected"),
    [
        ("first:1.2@3", 30, [0, 1, 2]),  # the official TACA code
        ("first:1.2@3", 28, [0, 1, 2]),
        ("first:1.2@1", 28, [0]),
        ("first:1.2@0", 30, []),
        ("first:1.2@40", 28, list(range(28))),
    ],
)
def test_first_steps(spec: str, num_steps: int, expected: list[int]) -> None:
    s = parse(spec)
    assert firing_steps(s, num_steps) == expected
    assert not s.needs_num_steps
    # first:G@K does not need num_steps
    assert g(s, step=0, num_steps=None) == (1.2 if expected else 1.0)


def test_first_value_and_identity() -> None:
    s = parse("first:1.25@3")
    assert s == FirstSchedule(gamma0=1.25, num_first=3)
    assert g(s, step=2, t=0.0) == 1.25
    assert g(s, step=3, t=1000.0) == 1.0
    assert parse("first:1.2@0").is_identity
    assert parse("first:1@3").is_identity
    assert not s.is_identity


@pytest.mark.parametrize(
    ("spec", "num_steps", "k"),
    [
        # K = floor(F*N + 0.5), exact decimal arithmetic on F as written
        ("frac:1.2@0.1", 30, 3),  # 3.0 (binary 0.1*30 = 3.0000000000000004)
        ("frac:1.2@0.1", 28, 3),  # 2.8 -> 3
        ("frac:1.2@0.25", 28, 7),  # 7.0
        ("frac:1.2@0.25", 30, 8),  # 7.5 -> 8 (half up)
        ("frac:1.2@0.05", 30, 2),  # 1.5 -> 2
        ("frac:1.2@0.05", 28, 1),  # 1.4 -> 1
        ("frac:1.2@0.01", 28, 0),  # 0.28 -> 0: never fires
        ("frac:1.2@1", 28, 28),
        ("frac:1.2@1", 30, 30),
        ("frac:1.2@0.58", 25, 15),  # exactly 14.5 -> 15 (binary 0.58*25 = 14.499999999999998)
        ("frac:1.2@0.5", 1, 1),  # 0.5 -> 1
    ],
)
def test_frac_steps(spec: str, num_steps: int, k: int) -> None:
    s = parse(spec)
    assert isinstance(s, FracSchedule)
    assert s.num_active_steps(num_steps) == k
    assert firing_steps(s, num_steps) == list(range(k))


def test_frac_matches_official_code() -> None:
    official = firing_steps(parse("first:1.2@3"), 30)
    assert firing_steps(parse("frac:1.2@0.1"), 30) == official == [0, 1, 2]


@pytest.mark.parametrize("bad", [None, 0, -3, 2.0, True])
def test_frac_needs_a_positive_integer_step_count(bad: object) -> None:
    s = parse("frac:1.2@0.1")
    assert s.needs_num_steps
    with pytest.raises(ScheduleError) as info:
        g(s, num_steps=bad)  # type: ignore[arg-type]
    reason = reason_of(info.value, repr(s.spec))
    assert "num_inference_steps" in reason  # the argument that fixes it
    assert names(reason, repr(bad))


@pytest.mark.parametrize("fraction", ["0.1", "0.25", "0.05", "0.01", "0.58", "0.5", "1", "0.333", "0.7", "0.15"])
def test_frac_step_count_is_exact_round_half_up_of_the_decimal(fraction: str) -> None:
    # independent oracle: rational arithmetic on the fraction as written, for every N up to 60
    s = parse(f"frac:1.2@{fraction}")
    for n in range(1, 61):
        k = math.floor(Fraction(fraction) * n + Fraction(1, 2))
        assert s.num_active_steps(n) == k, n
        assert firing_steps(s, n) == list(range(k))


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (1000.0, 1.3),
        (999.9995, 1.3),  # within tolerance of T0
        (975.0, 1.225),  # 1.3 - 0.3 * 0.25
        (950.0, 1.15),  # midpoint: (1.3 + 1.0) / 2
        (925.0, 1.075),  # 1.3 - 0.3 * 0.75
        (900.0, 1.0),
        (850.0, 1.0),
        (0.0, 1.0),
    ],
)
def test_linear_ramp(t: float, expected: float) -> None:
    s = parse("linear:1.3..1.0@1000..900")
    assert s == LinearRampSchedule(1.3, 1.0, 1000, 900)
    assert g(s, t=t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (1000.0, 1.3),
        (975.0, 1.3 - 0.3 * (1 - math.sqrt(0.5)) / 2),  # u = 1/4: w = (1 - cos(pi/4)) / 2
        (950.0, 1.15),  # midpoint: w = (1 - cos(pi/2)) / 2 = 1/2
        (925.0, 1.3 - 0.3 * (1 + math.sqrt(0.5)) / 2),  # u = 3/4: w = (1 + cos(pi/4)) / 2
        (900.0, 1.0),
        (899.0, 1.0),
    ],
)
def test_cosine_ramp(t: float, expected: float) -> None:
    s = parse("cosine:1.3..1.0@1000..900")
    assert s == CosineRampSchedule(1.3, 1.0, 1000, 900)
    assert g(s, t=t) == pytest.approx(expected, abs=1e-12)


def test_cosine_quarter_value_by_hand() -> None:
    # (1 - 0.70710678) / 2 = 0.14644661; 1.3 - 0.3 * 0.14644661 = 1.25606602
    assert g(parse("cosine:1.3..1@1000..900"), t=975.0) == pytest.approx(1.25606602, abs=1e-8)


def test_increasing_ramp() -> None:
    s = parse("linear:1..2@800..600")
    assert g(s, t=900.0) == 1.0
    assert g(s, t=750.0) == pytest.approx(1.25)
    assert g(s, t=700.0) == pytest.approx(1.5)
    assert g(s, t=500.0) == 2.0


def test_ramp_identity() -> None:
    assert parse("linear:1..1@1000..900").is_identity
    assert not parse("cosine:1..1.1@1000..900").is_identity


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (1000.0, 1.3),
        (999.0, 1.2),
        (970.0, 1.2),
        (969.99994, 1.2),
        (969.0, 1.1),
        (900.0, 1.1),
        (899.0, 1.0),
        (0.0, 1.0),
    ],
)
def test_table_lookup(t: float, expected: float) -> None:
    s = parse("table:900=1.1,1000=1.3,970=1.2")  # any input order
    assert s == TableSchedule(((1000, 1.3), (970, 1.2), (900, 1.1)))
    assert g(s, t=t) == expected


@pytest.mark.parametrize("t", [1000.0, 985.5, 970.0, 969.99994, 969.99, 969.0, 500.0, 0.0])
def test_single_entry_table_equals_step(t: float) -> None:
    assert g(parse("table:970=1.2"), t=t) == g(parse("step:1.2@970"), t=t)


def test_table_identity() -> None:
    assert parse("table:970=1,900=1").is_identity
    assert not parse("table:970=1,900=1.1").is_identity


def test_a_long_table_looks_up_like_brute_force() -> None:
    # (its parse was quadratic once, 100,000 entries ~8 min; speed is the benchmarks' business, not a timed test)
    rng = np.random.default_rng(0)
    thresholds = rng.permutation(8_000) / 8  # 0.0 .. 999.875, shuffled
    gammas = np.round(rng.uniform(0.5, 2.0, thresholds.size), 3)
    spec = "table:" + ",".join(f"{t:g}={x:g}" for t, x in zip(thresholds, gammas))
    s = parse(spec)
    for t in (1000.0, 999.95, 512.34, 0.05, 0.0):
        reached = thresholds <= t + T_TOLERANCE  # brute force: the G of the largest Ti with t >= Ti
        want = float(gammas[reached][np.argmax(thresholds[reached])]) if reached.any() else 1.0
        assert g(s, t=t) == want


# ---------------------------------------------------------------------------------------------
# layer / block restriction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "block_type", "expected"),
    [
        ("transformer_blocks.0.attn", "joint", 1.2),
        ("transformer_blocks.23.attn", "joint", 1.2),
        ("single_transformer_blocks.0.attn", "single", 1.0),
        ("single_transformer_blocks.37.attn", "single", 1.0),
    ],
)
def test_blocks_joint(layer: str, block_type: str, expected: float) -> None:
    s = parse("step:1.2@970;blocks=joint")
    assert g(s, t=1000.0, layer=layer, block_type=block_type) == expected
    assert g(s, t=900.0, layer=layer, block_type=block_type) == 1.0


def test_blocks_single() -> None:
    s = parse("const:1.4;blocks=single")
    assert g(s, layer=SINGLE, block_type="single") == 1.4
    assert g(s, layer=JOINT, block_type="joint") == 1.0


def test_blocks_both_is_unrestricted() -> None:
    s = parse("step:1.2@970;blocks=joint|single")
    assert s == StepSchedule(1.2, 970)
    assert parse("step:1.2@970;blocks=single|joint") == s


@pytest.mark.parametrize(
    ("layer", "block_type", "expected"),
    [
        ("transformer_blocks.1.attn", "joint", 1.2),
        ("transformer_blocks.12.attn", "joint", 1.2),
        ("transformer_blocks.2.attn", "joint", 1.0),
        ("transformer_blocks.21.attn", "joint", 1.0),
        ("single_transformer_blocks.0.attn", "single", 1.2),
        ("single_transformer_blocks.1.attn", "single", 1.0),  # glob must match the whole path
        ("single_transformer_blocks.10.attn", "single", 1.0),
    ],
)
def test_layers_globs(layer: str, block_type: str, expected: float) -> None:
    s = parse("step:1.2@970;layers=transformer_blocks.1*|single_transformer_blocks.0.attn")
    assert isinstance(s, RestrictedSchedule)
    assert g(s, t=1000.0, layer=layer, block_type=block_type) == expected


@pytest.mark.parametrize(
    ("layer", "block_type", "expected"),
    [
        ("transformer_blocks.1.attn", "joint", 1.0),  # right pattern, wrong block type
        ("single_transformer_blocks.1.attn", "single", 1.0),  # right block type, no pattern
        ("single_transformer_blocks.0.attn", "single", 1.2),
        ("single_transformer_blocks.5.attn", "single", 1.2),
    ],
)
def test_blocks_and_layers_combined(layer: str, block_type: str, expected: float) -> None:
    s = parse("first:1.2@3;blocks=single;layers=transformer_blocks.1*|*blocks.0.attn|*.5.attn")
    assert g(s, step=0, layer=layer, block_type=block_type) == expected
    assert g(s, step=3, layer=layer, block_type=block_type) == 1.0


def test_restricted_frac_needs_num_steps_on_every_layer() -> None:
    s = parse("frac:1.2@0.1;blocks=joint")
    assert s.needs_num_steps
    assert firing_steps(s, 30) == [0, 1, 2]
    for layer, bt in ((JOINT, "joint"), (SINGLE, "single")):  # selected or not
        with pytest.raises(ScheduleError) as info:
            g(s, layer=layer, block_type=bt, num_steps=None)
        assert "num_inference_steps" in reason_of(info.value)


def test_restricted_properties() -> None:
    assert parse("none;blocks=joint").is_identity
    assert not parse("step:1.2@970;blocks=joint").is_identity
    assert not parse("step:1.2@970;blocks=joint").needs_num_steps


def test_restricted_constructor() -> None:
    both = ["single", "joint", "joint"]
    s = RestrictedSchedule(StepSchedule(1.2, 970), blocks=both, layers=["a*"])  # type: ignore
    assert s.blocks is None  # both block types: no block restriction
    assert s.layers == ("a*",)
    assert s.spec == "step:1.2@970;layers=a*"
    r = RestrictedSchedule(StepSchedule(1.2, 970), blocks="joint")
    assert r.blocks == ("joint",) and r.layers is None


@pytest.mark.parametrize("spec", ["step:1.2@970", "const:1.2;layers=x*"])
@pytest.mark.parametrize("bad_block", ["Joint", "double", ""])
def test_gamma_rejects_bad_block_type(spec: str, bad_block: str) -> None:
    with pytest.raises(ScheduleError) as info:
        g(parse(spec), block_type=bad_block)
    reason = reason_of(info.value)
    assert repr(spec) in reason and repr(bad_block) in reason
    assert names(reason, "joint") and names(reason, "single")  # the valid choices


# ---------------------------------------------------------------------------------------------
# spec strings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("none", "none"),
        ("const:1.2", "const:1.2"),
        ("const:1", "const:1"),
        ("const:1.0", "const:1"),
        ("step:1.2@970", "step:1.2@970"),
        ("step:1.2@969.5", "step:1.2@969.5"),
        ("step:1.2@970.0", "step:1.2@970"),
        ("first:1.2@3", "first:1.2@3"),
        ("first:1.2@0", "first:1.2@0"),
        ("frac:1.2@0.1", "frac:1.2@0.1"),
        ("frac:1.2@1", "frac:1.2@1"),
        ("linear:1.3..1.0@1000..900", "linear:1.3..1@1000..900"),
        ("cosine:1.3..1.0@1000..900", "cosine:1.3..1@1000..900"),
        ("table:970=1.2", "table:970=1.2"),
        ("table:900=1.1,1000=1.3,970=1.2", "table:1000=1.3,970=1.2,900=1.1"),
        ("step:1.2@970;blocks=joint", "step:1.2@970;blocks=joint"),
        ("step:1.2@970;layers=joint|single", "step:1.2@970;layers=joint|single"),  # globs, not block types
        ("frac:1.2@0.1;blocks=single", "frac:1.2@0.1;blocks=single"),
        (
            "step:1.2@970;layers=transformer_blocks.1*|single_transformer_blocks.0.attn",
            "step:1.2@970;layers=transformer_blocks.1*|single_transformer_blocks.0.attn",
        ),
        (
            "table:970=1.2;layers=x*;blocks=joint",
            "table:970=1.2;blocks=joint;layers=x*",
        ),
        ("const:1e-05", "const:1e-05"),
        ("const:2.5e20", "const:2.5e+20"),
        ("step:+1.2@.5e3", "step:1.2@500"),
        (
            "  linear : 1.3 .. 1 @ 1000 .. 900 ; blocks = joint ; layers = a* | b ",
            "linear:1.3..1@1000..900;blocks=joint;layers=a*|b",
        ),
        (" table: 970 = 1.2 , 1000=1.3 ", "table:1000=1.3,970=1.2"),
        (" first : 1.2 @ 3 ", "first:1.2@3"),
    ],
)
def test_spec_canonical_and_round_trip(text: str, canonical: str) -> None:
    s = parse(text)
    assert s.spec == canonical
    assert str(s) == canonical
    again = parse(s.spec)
    assert again == s
    assert hash(again) == hash(s)
    assert again.spec == canonical


@pytest.mark.parametrize(
    "sched",
    [
        NoneSchedule(),
        ConstSchedule(0.7),
        StepSchedule(1.2, 970),
        StepSchedule(1.0 / 3.0, 123.456),
        FirstSchedule(1.2, 3),
        FracSchedule(1.2, 0.1),
        FracSchedule(1.2, 1.0 / 3.0),
        LinearRampSchedule(1.3, 1.0, 1000, 900),
        CosineRampSchedule(0.9, 1.1, 700.5, 600),
        TableSchedule(((970, 1.2), (1000, 1.3))),
        RestrictedSchedule(StepSchedule(1.2, 970), blocks=("joint",)),
        RestrictedSchedule(FracSchedule(1.2, 0.1), layers=("transformer_blocks.1*", "single_*")),
        RestrictedSchedule(ConstSchedule(1.1), blocks=("single",), layers=("*.0.attn",)),
    ],
)
def test_constructor_round_trip(sched: Schedule) -> None:
    assert parse(sched.spec) == sched
    assert "\n" not in sched.spec


def test_parse_passes_schedule_through() -> None:
    s = StepSchedule(1.2, 970)
    assert parse(s) is s


def test_constructor_equals_parsed_and_normalises_numbers() -> None:
    s = StepSchedule(gamma0=1.2, t_thresh=970)
    assert s == parse("step:1.2@970")
    assert isinstance(s.t_thresh, float)
    assert TableSchedule([(970, 1.2)]).entries == ((970.0, 1.2),)


def test_schedules_are_frozen_and_hashable() -> None:
    s = parse("step:1.2@970;blocks=joint")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.blocks = ("single",)  # type: ignore[misc]
    assert len({parse("step:1.2@970"), StepSchedule(1.2, 970.0), parse("const:1.2")}) == 2


def test_kind_name_is_case_insensitive() -> None:
    assert parse("STEP:1.2@970;Blocks=JOINT") == parse("step:1.2@970;blocks=joint")


DESCRIBED = [
    "none",
    "const:1.2",
    "step:1.2@970",
    "first:1.2@3",
    "first:1.2@1",
    "frac:1.2@0.1",
    "linear:1.3..1@1000..900",
    "cosine:1.3..1@1000..900",
    "table:1000=1.3,970=1.2",
    "step:1.2@970;blocks=joint",
    "step:1.2@970;blocks=single",
    "step:1.2@970;layers=a*|b",
    "step:1.2@970;blocks=single;layers=a*",
    "none;blocks=joint",
]


@pytest.mark.parametrize("spec", DESCRIBED)
def test_describe_is_one_line_naming_every_number_and_restriction(spec: str) -> None:
    s = parse(spec)
    text = s.describe()
    assert text and text == text.strip() and "\n" not in text
    for number in re.findall(r"\d+(?:\.\d+)?", spec.split(";")[0]):
        assert names(text, number), number
    for block in getattr(s, "blocks", None) or ():
        assert names(text, block)
    for glob in getattr(s, "layers", None) or ():
        assert glob in text


def test_describe_tells_every_schedule_apart() -> None:
    texts = [parse(spec).describe() for spec in DESCRIBED]
    assert len(set(texts)) == len(texts)
    assert parse("linear:1.3..1@1000..900").describe() != parse("cosine:1.3..1@1000..900").describe()


def test_forms_are_the_kinds_parse_accepts() -> None:
    # FORMS (the --help text) lists exactly the kinds of the README, and each form, with numbers put in
    # for its placeholders, parses into a schedule of that kind
    forms = [line.split()[0] for line in FORMS.splitlines() if re.match(r"[a-z]+(:\S*)?\s", line)]
    assert tuple(f.partition(":")[0] for f in forms) == KINDS
    numbers = {"G0": "1.3", "G1": "1", "T0": "1000", "T1": "900", "G": "1.2", "T": "970", "K": "3", "F": "0.1"}
    for form in forms:
        kind = form.partition(":")[0]
        spec = "table:1000=1.3,970=1.2" if kind == "table" else re.sub(r"[GTKF][01]?", lambda m: numbers[m[0]], form)
        assert type(parse(spec)).kind == kind, form
        assert type(parse(spec + ";blocks=joint;layers=*")).kind == "", form  # the suffixes apply to every kind
        assert form in FORMS_LINE  # every error lists the same forms
    assert "\n" not in FORMS_LINE


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


OPTIONS = ("blocks", "layers")
BLOCKS = ("joint", "single")


# (bad spec, the offending token the reason must name or None, words the reason must name: the
# placeholder of the form that is wrong, or the valid choices)
@pytest.mark.parametrize(
    ("spec", "token", "words"),
    [
        ("", None, ()),
        ("   ", None, ()),
        (";blocks=joint", None, ()),
        ("foo:1.2", "'foo'", KINDS),
        ("paper", "'paper'", KINDS),
        ("none:1", "'1'", ("none",)),
        ("const", "'const'", ()),
        ("const:", "'const'", ()),
        ("step:1.2", "'1.2'", ("step:G@T",)),
        ("step:1.2@970@1", "'1.2@970@1'", ("step:G@T",)),
        ("first:1.2", "'1.2'", ("first:G@K",)),
        ("frac:1.2", "'1.2'", ("frac:G@F",)),
        ("linear:1.3@1000..900", "'1.3'", ("linear:G0..G1@T0..T1",)),
        ("cosine:1.3..1@1000", "'1000'", ("cosine:G0..G1@T0..T1",)),
        ("linear:1.3..1..1@1000..900", "'1.3..1..1'", ("linear:G0..G1@T0..T1",)),
        # gamma <= 0
        ("const:0", "0", ("G",)),
        ("const:-1.2", "-1.2", ("G",)),
        ("step:-1@970", "-1", ("G",)),
        ("first:0@3", "0", ("G",)),
        ("frac:-0.5@0.1", "-0.5", ("G",)),
        ("linear:0..1@1000..900", "0", ("G0",)),
        ("cosine:1..-1@1000..900", "-1", ("G1",)),
        ("table:970=0", "0", ("G",)),
        # NaN / inf
        ("const:nan", "nan", ("G",)),
        ("step:inf@970", "inf", ("G",)),
        ("step:1.2@nan", "nan", ("T",)),
        ("step:1.2@-inf", "-inf", ("T",)),
        ("frac:1.2@nan", "nan", ("F",)),
        ("linear:1.3..1@inf..900", "inf", ("T0",)),
        ("table:970=infinity", "infinity", ("G",)),
        ("const:1e999", "inf", ("G",)),
        # finite as a float64, not as a positive float32 (the keys are scaled in the model's dtype)
        ("const:1e308", "1e+308", ("G",)),
        ("table:970=1e39", "1e+39", ("G",)),
        ("step:1e-50@970", "1e-50", ("G",)),
        ("cosine:1..1e300@1000..900", "1e+300", ("G1",)),
        # not a number
        ("const:abc", "'abc'", ("G",)),
        ("step:1.2@97O", "'97O'", ("T",)),
        ("step:1_2@970", "'1_2'", ("G",)),
        ("step:0x1@970", "'0x1'", ("G",)),
        ("table:9a=1.2", "'9a'", ("T",)),
        ("first:1.2@three", "'three'", ("K",)),
        ("first:1.2@3.0", "'3.0'", ("K",)),
        # t out of range
        ("step:1.2@1001", "1001", ("T",)),
        ("step:1.2@-1", "-1", ("T",)),
        ("linear:1.3..1@1200..900", "1200", ("T0",)),
        ("cosine:1.3..1@1000..-5", "-5", ("T1",)),
        ("table:1000.5=1.2", "1000.5", ("T",)),
        # inverted / empty ramp
        ("linear:1.3..1@900..1000", "900", ("T0", "T1")),
        ("cosine:1.3..1@900..900", "900", ("T0", "T1")),
        # fraction
        ("frac:1.2@0", "0", ("F",)),
        ("frac:1.2@1.5", "1.5", ("F",)),
        ("frac:1.2@-0.1", "-0.1", ("F",)),
        # negative K
        ("first:1.2@-1", "-1", ("K",)),
        # table
        ("table:", None, ("T", "G")),
        ("table:  ", None, ("T", "G")),
        ("table:970=1.2,", "''", ("T", "G")),
        ("table:970", "'970'", ("T", "G")),
        ("table:970=1.2=3", "'970=1.2=3'", ("T", "G")),
        ("table:970=1.2,970.0=1.3", "970", ()),
        # options
        ("step:1.2@970;layers=", "''", ("layers",)),
        ("step:1.2@970;layers=a||b", "''", ("layers",)),
        ("step:1.2@970;layers= | ", "''", ("layers",)),
        ("step:1.2@970;blocks=double", "'double'", BLOCKS),
        ("step:1.2@970;blocks=", "''", BLOCKS),
        ("step:1.2@970;blocks=joint|", "''", BLOCKS),
        ("step:1.2@970;heads=3", "'heads'", OPTIONS),
        ("step:1.2@970;blocks", "'blocks'", OPTIONS),
        ("step:1.2@970;", "''", OPTIONS),
        ("step:1.2@970;blocks=joint;blocks=single", "'blocks'", ()),
        ("step:1.2@970;layers=a;layers=b", "'layers'", ()),
    ],
)
def test_parse_errors(spec: str, token: str | None, words: tuple[str, ...]) -> None:
    with pytest.raises(ScheduleError) as info:
        parse(spec)
    reason = reason_of(info.value, repr(spec))  # the reason, without the spec it quotes
    if token is not None:
        assert names(reason, token), token
    for word in words:
        assert names(reason, word), word


def test_gamma_range_is_the_positive_finite_float32s() -> None:
    f32 = np.finfo(np.float32)
    for gamma in (float(f32.tiny), float(f32.max)):  # both ends are accepted, and round-trip
        assert parse(str(ConstSchedule(gamma))).gamma0 == gamma
    for gamma in (math.nextafter(float(f32.tiny), 0.0), math.nextafter(float(f32.max), math.inf)):  # just outside
        with pytest.raises(ScheduleError) as info:
            ConstSchedule(gamma)
        assert repr(float(f32.tiny)) in str(info.value) and repr(float(f32.max)) in str(info.value)  # the range


def test_newline_in_spec_still_gives_one_line() -> None:
    spec = "step:1.2@970\n;blocks=joint\nx"
    with pytest.raises(ScheduleError) as info:
        parse(spec)
    assert repr("joint\nx") in reason_of(info.value, repr(spec))  # the newline quoted, not written


    class Sneaky(str):  # a spec whose quoted form has a line break: the message still has none
        def __repr__(self) -> str:
            return "'foo\n:1'"

    with pytest.raises(ScheduleError) as info:
        parse(Sneaky("foo:1"))
    assert names(reason_of(info.value), "'foo'")


@pytest.mark.parametrize("spec", [12, None, 1.2, b"step:1.2@970"])
def test_parse_rejects_non_strings(spec: object) -> None:
    with pytest.raises(ScheduleError) as info:
        parse(spec)  # type: ignore
    assert names(reason_of(info.value, repr(spec)), type(spec).__name__)


def test_every_error_lists_every_kind_and_option() -> None:
    for word in KINDS + OPTIONS + BLOCKS:
        assert names(FORMS_LINE, word), word


# constructors that have a spec: parse(spec) must fail for the same reason, worded the same
@pytest.mark.parametrize(
    ("make", "spec"),
    [
        (lambda: StepSchedule(gamma0=-1, t_thresh=970), "step:-1@970"),
        (lambda: StepSchedule(gamma0=1.2, t_thresh=1001), "step:1.2@1001"),
        (lambda: ConstSchedule(0.0), "const:0"),
        (lambda: ConstSchedule(float("inf")), "const:1e999"),
        (lambda: ConstSchedule(1e308), "const:1e308"),
        (lambda: FirstSchedule(1.2, -2), "first:1.2@-2"),
        (lambda: FracSchedule(1.2, 0.0), "frac:1.2@0"),
        (lambda: FracSchedule(1.2, 1.0001), "frac:1.2@1.0001"),
        (lambda: LinearRampSchedule(1.3, 1.0, 900, 1000), "linear:1.3..1@900..1000"),
        (lambda: CosineRampSchedule(1.3, -1.0, 1000, 900), "cosine:1.3..-1@1000..900"),
        (lambda: TableSchedule(((970, 1.2), (970.0, 1.3))), "table:970=1.2,970.0=1.3"),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), blocks=("dual",)), "const:1.2;blocks=dual"),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), layers=("",)), "const:1.2;layers="),
    ],
)
def test_constructor_errors_match_parse_errors(make, spec: str) -> None:  # noqa: ANN001
    with pytest.raises(ScheduleError) as made:
        make()
    with pytest.raises(ScheduleError) as parsed:
        parse(spec)
    assert reason_of(made.value).endswith(reason_of(parsed.value, repr(spec)))


# constructors with no spec equivalent: the reason names the bad argument (so its text appears twice:
# in the call the message quotes, and in the reason) or the valid choices
@pytest.mark.parametrize(
    ("make", "token", "words"),
    [
        (lambda: StepSchedule(gamma0=float("nan"), t_thresh=970), "nan", ()),
        (lambda: StepSchedule(gamma0="1.2", t_thresh=970), "'1.2'", ()),  # type: ignore
        (lambda: FirstSchedule(1.2, 3.0), "3.0", ()),  # type: ignore
        (lambda: TableSchedule(()), None, ("T", "G")),
        (lambda: TableSchedule(((970, 1.2, 3),)), "(970, 1.2, 3)", ()),  # type: ignore
        (lambda: RestrictedSchedule(NoneSchedule()), None, BLOCKS),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), blocks=()), None, BLOCKS),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), layers=()), None, ()),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), layers=("a|b",)), "'a|b'", ()),
        (
            lambda: RestrictedSchedule(RestrictedSchedule(ConstSchedule(1.2), blocks=("joint",)), layers=("a",)),
            "RestrictedSchedule(base=ConstSchedule(gamma0=1.2), blocks=('joint',), layers=None)",
            (),
        ),
        (lambda: RestrictedSchedule("const:1.2", blocks=("joint",)), "'const:1.2'", ()),  # type: ignore
    ],
)
def test_constructor_errors(make, token: str | None, words: tuple[str, ...]) -> None:  # noqa: ANN001
    with pytest.raises(ScheduleError) as info:
        make()
    reason = reason_of(info.value)
    if token is not None:
        assert reason.count(token) >= 2, token
    for word in words:
        assert names(reason, word), word


def test_a_long_bad_table_is_refused_in_one_short_line() -> None:
    spec = "table:" + ",".join(f"{t}=1.1" for t in range(1000)) + ",5=1.2"  # 5 twice, at the end
    with pytest.raises(ScheduleError) as info:
        parse(spec)
    text = str(info.value)
    assert "\n" not in text and len(text) < 1000 and spec[:200] in text
