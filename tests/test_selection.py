"""taca_probe.selection: map selections against the run they are checked against."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from taca_probe.errors import TacaProbeError
from taca_probe.selection import MapSelection

LAYOUT = SimpleNamespace(steps=4, n_txt=10, layers=("transformer_blocks.0.attn", "transformer_blocks.1.attn"))


def test_check_accepts_the_last_step_and_token_and_refuses_one_past_them():
    # steps are 0..3 and tokens 0..9: index 3 / 9 exists, index 4 / 10 does not
    MapSelection.parse("steps=0-3;tokens=0,9").check(LAYOUT)
    with pytest.raises(TacaProbeError, match="step 4 does not exist"):
        MapSelection.parse("steps=4").check(LAYOUT)
    with pytest.raises(TacaProbeError, match="token 10 does not exist"):
        MapSelection.parse("tokens=10").check(LAYOUT)


def test_token_indices_keep_only_positions_of_this_text():
    pad = np.array([False, False, True, True])
    assert MapSelection.parse("tokens=prompt").token_indices(pad).tolist() == [0, 1]
    assert MapSelection.parse("tokens=all").token_indices(pad).tolist() == [0, 1, 2, 3]
    assert MapSelection.parse("tokens=1,3-5").token_indices(pad).tolist() == [1, 3]


def test_selection_round_trips_through_store_attributes():
    for spec in ("steps=0-2,5;layers=*.attn|a.b;tokens=prompt", "tokens=all", "steps=3;tokens=1,4"):
        sel = MapSelection.parse(spec)
        assert MapSelection.from_attrs({"map_selection": sel.to_attrs()}) == sel
    # stores older than the structured attribute keep only the string
    assert MapSelection.from_attrs({"maps": "steps=1"}) == MapSelection(steps=(1,))
    assert MapSelection.from_attrs({}) is None


@pytest.mark.parametrize("damaged", [{"tokens": None}, {"steps": "0-3"}, {"steps": [-1]}, {"steps": [1.5]},
                                     {"steps": [True]}, {"layers": [3]}, {"tokens": "some"}, {"steps": []},
                                     {"tokens": []}, {"layers": []}, {"layers": [""]}])
def test_a_damaged_selection_attribute_is_one_error(damaged):
    with pytest.raises(TacaProbeError, match="map_selection attribute .* is damaged"):
        MapSelection.from_attrs({"map_selection": damaged})


def test_a_selection_built_in_code_is_normalized_and_stores_as_json():
    sel = MapSelection(steps=[np.int64(0), 2], layers=["a*"], tokens=range(3))
    assert sel == MapSelection(steps=(0, 2), layers=("a*",), tokens=(0, 1, 2))
    assert MapSelection.from_attrs(json.loads(json.dumps({"map_selection": sel.to_attrs()}))) == sel
    with pytest.raises(TacaProbeError, match="bad maps selection"):
        MapSelection(tokens="some")


def _brute_force(steps, layers, tokens, n_steps=12, names=("transformer_blocks.0.attn", "single_transformer_blocks.1.attn")):
    """What a selection records, from its parts written out by hand: (step, layer) pairs, and tokens of 10."""
    import fnmatch
    pairs = {(i, n) for i in range(n_steps) for n in names
             if (steps is None or i in steps) and (layers is None or any(fnmatch.fnmatchcase(n, p) for p in layers))}
    return pairs, tokens


@pytest.mark.parametrize("text,steps,layers,tokens", [
    ("STEPS=ALL;Layers=All;TOKENS=Prompt", None, None, "prompt"),  # keywords in any case, as NONE and blocks=JOINT
    ("steps=7,0-2,1;tokens=9,3,3", {0, 1, 2, 7}, None, (3, 9)),
    ("steps=0-4,2-6;layers=single*|*blocks.0*;tokens=ALL", set(range(7)), ("single*", "*blocks.0*"), "all"),
])
def test_a_selection_records_what_its_parts_say_however_spelled(text, steps, layers, tokens):
    sel = MapSelection.parse(text)
    names = ("transformer_blocks.0.attn", "single_transformer_blocks.1.attn")
    got = {(i, n) for i in range(12) for n in names if sel.selects(i, n)}
    assert (got, sel.tokens if isinstance(sel.tokens, str) else tuple(sel.tokens)) == _brute_force(steps, layers, tokens)
    assert MapSelection.parse(sel.spec) == sel


def test_one_selection_built_in_code_or_parsed_has_one_spec():
    """Audit: MapSelection(steps=[2, 0, 2]) kept its order and repeats, so its spec (which a resume compares)
    differed from that of the same selection parsed from 'steps=0,2'; an empty list recorded nothing, or
    failed later with max()'s ValueError instead of one TacaProbeError."""
    assert MapSelection(steps=[2, 0, 2], tokens=(5, 1)) == MapSelection.parse("steps=0,2;tokens=1,5")
    assert MapSelection(steps=[2, 0, 2]).spec == MapSelection.parse("steps=0,2").spec
    for bad in ({"steps": []}, {"tokens": ()}, {"layers": []}, {"layers": ["a|b"]}, {"layers": [" a"]},
                {"tokens": np.array([1, 2])}):
        with pytest.raises(TacaProbeError) as e:
            MapSelection(**bad).check(LAYOUT)
        assert "\n" not in str(e.value) and "valid forms" in str(e.value)
    with pytest.raises(TacaProbeError, match="valid forms"):
        MapSelection.parse("layers=|")  # no pattern: refused, as steps= and tokens= are
