"""Tests of :mod:`taca_probe.schedules` with hand-computed expectations."""

from __future__ import annotations

import dataclasses
import math

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
VALID_FORMS = (
    "none",
    "const:G",
    "step:G@T",
    "first:G@K",
    "frac:G@F",
    "linear:G0..G1@T0..T1",
    "cosine:G0..G1@T0..T1",
    "table:T1=G1,T2=G2,...",
    ";blocks=joint|single",
    ";layers=GLOB[|GLOB...]",
)


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


def assert_good_message(exc: ScheduleError) -> str:
    msg = str(exc)
    assert "\n" not in msg and "\r" not in msg
    for form in VALID_FORMS:
        assert form in msg, form
    return msg


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


def test_tolerance_constant() -> None:
    assert T_TOLERANCE == 1e-3


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


def test_frac_needs_num_steps() -> None:
    s = parse("frac:1.2@0.1")
    assert s.needs_num_steps
    with pytest.raises(ScheduleError) as info:
        g(s, num_steps=None)
    msg = assert_good_message(info.value)
    assert "num_inference_steps" in msg
    for bad in (0, -3):
        with pytest.raises(ScheduleError, match="num_inference_steps"):
            g(s, num_steps=bad)


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
    for layer, bt in ((JOINT, "joint"), (SINGLE, "single")):
        with pytest.raises(ScheduleError, match="num_inference_steps"):
            g(s, layer=layer, block_type=bt, num_steps=None)


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


@pytest.mark.parametrize("bad_block", ["Joint", "double", ""])
def test_gamma_rejects_bad_block_type(bad_block: str) -> None:
    with pytest.raises(ScheduleError) as info:
        g(parse("step:1.2@970"), block_type=bad_block)
    assert "\n" not in str(info.value)
    assert "'joint' or 'single'" in str(info.value)


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


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", "gamma 1 at every step on all layers (stock model)"),
        ("const:1.2", "gamma 1.2 at every step on all layers"),
        ("step:1.2@970", "gamma 1.2 for t >= 970 on all layers"),
        ("first:1.2@3", "gamma 1.2 for the first 3 steps on all layers"),
        ("first:1.2@1", "gamma 1.2 for the first 1 step on all layers"),
        (
            "frac:1.2@0.1",
            "gamma 1.2 for the first fraction 0.1 of the steps (step < floor(0.1*N + 0.5) of N) "
            "on all layers",
        ),
        (
            "linear:1.3..1@1000..900",
            "gamma 1.3 for t >= 1000, linear ramp to 1 at t <= 900 on all layers",
        ),
        (
            "cosine:1.3..1@1000..900",
            "gamma 1.3 for t >= 1000, cosine ramp to 1 at t <= 900 on all layers",
        ),
        (
            "table:1000=1.3,970=1.2",
            "gamma 1.3 for t >= 1000, 1.2 for 970 <= t < 1000, 1 below on all layers",
        ),
        ("step:1.2@970;blocks=joint", "gamma 1.2 for t >= 970 on joint blocks"),
        ("step:1.2@970;layers=a*|b", "gamma 1.2 for t >= 970 on layers matching a*|b"),
        (
            "step:1.2@970;blocks=single;layers=a*",
            "gamma 1.2 for t >= 970 on single-block layers matching a*",
        ),
    ],
)
def test_describe(spec: str, expected: str) -> None:
    assert parse(spec).describe() == expected


def test_forms_help_text() -> None:
    lines = FORMS.splitlines()
    for form in ("none", "const:G", "step:G@T", "first:G@K", "frac:G@F", "linear:G0..G1@T0..T1",
                 "cosine:G0..G1@T0..T1", "table:T1=G1,T2=G2,...", ";blocks=joint|single",
                 ";layers=GLOB[|GLOB...]"):  # fmt: skip
        assert sum(form in line for line in lines) >= 1, form
    assert sum(line.startswith(("none", "const:", "step:", "first:", "frac:", "linear:",
                                "cosine:", "table:")) for line in lines) == 8  # fmt: skip
    assert "\n" not in FORMS_LINE


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty schedule"),
        ("   ", "empty schedule"),
        (";blocks=joint", "empty schedule"),
        ("foo:1.2", "unknown kind 'foo'"),
        ("paper", "unknown kind 'paper'"),
        ("none:1", "'none' takes no argument"),
        ("const", "'const' needs an argument"),
        ("const:", "'const' needs an argument"),
        ("step:1.2", "expected step:G@T"),
        ("step:1.2@970@1", "expected step:G@T"),
        ("first:1.2", "expected first:G@K"),
        ("frac:1.2", "expected frac:G@F"),
        ("linear:1.3@1000..900", "expected linear:G0..G1@T0..T1"),
        ("cosine:1.3..1@1000", "expected cosine:G0..G1@T0..T1"),
        ("linear:1.3..1..1@1000..900", "expected linear:G0..G1@T0..T1"),
        # gamma <= 0
        ("const:0", "gamma G must be > 0, got 0"),
        ("const:-1.2", "gamma G must be > 0, got -1.2"),
        ("step:-1@970", "gamma G must be > 0, got -1"),
        ("first:0@3", "gamma G must be > 0"),
        ("frac:-0.5@0.1", "gamma G must be > 0"),
        ("linear:0..1@1000..900", "gamma G0 must be > 0"),
        ("cosine:1..-1@1000..900", "gamma G1 must be > 0"),
        ("table:970=0", "table gamma G must be > 0"),
        # NaN / inf
        ("const:nan", "must be finite"),
        ("step:inf@970", "must be finite"),
        ("step:1.2@nan", "must be finite"),
        ("step:1.2@-inf", "must be finite"),
        ("frac:1.2@nan", "must be finite"),
        ("linear:1.3..1@inf..900", "must be finite"),
        ("table:970=infinity", "must be finite"),
        ("const:1e999", "must be finite"),
        # non-numeric
        ("const:abc", "gamma G must be a number, got 'abc'"),
        ("step:1.2@97O", "must be a number, got '97O'"),
        ("step:1_2@970", "must be a number, got '1_2'"),
        ("step:0x1@970", "must be a number"),
        ("table:9a=1.2", "must be a number"),
        ("first:1.2@three", "step count K must be an integer >= 0, got 'three'"),
        ("first:1.2@3.0", "step count K must be an integer >= 0, got '3.0'"),
        # t out of range
        ("step:1.2@1001", "threshold timestep T must be in 0..1000, got 1001"),
        ("step:1.2@-1", "threshold timestep T must be in 0..1000, got -1"),
        ("linear:1.3..1@1200..900", "ramp start T0 must be in 0..1000"),
        ("cosine:1.3..1@1000..-5", "ramp end T1 must be in 0..1000"),
        ("table:1000.5=1.2", "table threshold T must be in 0..1000"),
        # inverted / empty ramp
        ("linear:1.3..1@900..1000", "ramp needs T0 > T1"),
        ("cosine:1.3..1@900..900", "ramp needs T0 > T1"),
        # fraction
        ("frac:1.2@0", "fraction F must satisfy 0 < F <= 1, got 0"),
        ("frac:1.2@1.5", "fraction F must satisfy 0 < F <= 1, got 1.5"),
        ("frac:1.2@-0.1", "fraction F must satisfy 0 < F <= 1"),
        # negative K
        ("first:1.2@-1", "step count K must be an integer >= 0, got -1"),
        # table
        ("table:", "empty table"),
        ("table:  ", "empty table"),
        ("table:970=1.2,", "expected table entries T=G"),
        ("table:970", "expected table entries T=G"),
        ("table:970=1.2=3", "expected table entries T=G"),
        ("table:970=1.2,970.0=1.3", "table thresholds must be distinct, 970 appears twice"),
        # options
        ("step:1.2@970;layers=", "layers pattern must be a non-empty string"),
        ("step:1.2@970;layers=a||b", "layers pattern must be a non-empty string"),
        ("step:1.2@970;layers= | ", "layers pattern must be a non-empty string"),
        ("step:1.2@970;blocks=double", "block type must be 'joint' or 'single', got 'double'"),
        ("step:1.2@970;blocks=", "block type must be 'joint' or 'single', got ''"),
        ("step:1.2@970;blocks=joint|", "block type must be 'joint' or 'single'"),
        ("step:1.2@970;heads=3", "unknown option 'heads' (valid options: blocks, layers)"),
        ("step:1.2@970;blocks", "must be NAME=VALUE (valid options: blocks, layers)"),
        ("step:1.2@970;", "must be NAME=VALUE"),
        ("step:1.2@970;blocks=joint;blocks=single", "option 'blocks' given twice"),
        ("step:1.2@970;layers=a;layers=b", "option 'layers' given twice"),
    ],
)
def test_parse_errors(spec: str, reason: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse(spec)
    msg = assert_good_message(info.value)
    assert reason in msg
    assert repr(spec) in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, TacaProbeError)


def test_newline_in_spec_still_gives_one_line() -> None:
    with pytest.raises(ScheduleError) as info:
        parse("step:1.2@970\n;blocks=joint\nx")
    assert_good_message(info.value)


@pytest.mark.parametrize("spec", [12, None, 1.2, b"step:1.2@970"])
def test_parse_rejects_non_strings(spec: object) -> None:
    with pytest.raises(ScheduleError) as info:
        parse(spec)  # type: ignore
    assert "expected a string or a Schedule" in assert_good_message(info.value)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: StepSchedule(gamma0=-1, t_thresh=970), "gamma G must be > 0, got -1"),
        (lambda: StepSchedule(gamma0=1.2, t_thresh=1001), "must be in 0..1000"),
        (lambda: StepSchedule(gamma0=float("nan"), t_thresh=970), "must be finite"),
        (lambda: StepSchedule(gamma0="1.2", t_thresh=970), "must be a real number"),  # type: ignore
        (lambda: ConstSchedule(0.0), "gamma G must be > 0"),
        (lambda: ConstSchedule(float("inf")), "must be finite"),
        (lambda: FirstSchedule(1.2, -2), "step count K must be an integer >= 0, got -2"),
        (lambda: FirstSchedule(1.2, 3.0), "step count K must be an integer >= 0"),  # type: ignore
        (lambda: FracSchedule(1.2, 0.0), "fraction F must satisfy 0 < F <= 1"),
        (lambda: FracSchedule(1.2, 1.0001), "fraction F must satisfy 0 < F <= 1"),
        (lambda: LinearRampSchedule(1.3, 1.0, 900, 1000), "ramp needs T0 > T1"),
        (lambda: CosineRampSchedule(1.3, -1.0, 1000, 900), "gamma G1 must be > 0"),
        (lambda: TableSchedule(()), "table needs at least one T=G entry"),
        (lambda: TableSchedule(((970, 1.2), (970.0, 1.3))), "table thresholds must be distinct"),
        (lambda: TableSchedule(((970, 1.2, 3),)), "table entries must be (T, G) pairs"),  # type: ignore
        (lambda: RestrictedSchedule(NoneSchedule()), "a restriction needs"),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), blocks=("dual",)), "block type must be"),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), blocks=()), "blocks must name"),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), layers=("",)), "layers pattern must be"),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), layers=()), "layers needs at least one"),
        (lambda: RestrictedSchedule(ConstSchedule(1.2), layers=("a|b",)), "must not contain"),
        (
            lambda: RestrictedSchedule(
                RestrictedSchedule(ConstSchedule(1.2), blocks=("joint",)), layers=("a",)
            ),
            "base must be an unrestricted Schedule",
        ),
        (lambda: RestrictedSchedule("const:1.2", blocks=("joint",)), "base must be"),  # type: ignore
    ],
)
def test_constructor_errors(make, reason: str) -> None:  # noqa: ANN001
    with pytest.raises(ScheduleError) as info:
        make()
    msg = assert_good_message(info.value)
    assert reason in msg
