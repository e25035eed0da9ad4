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
                                     {"steps": [True]}, {"layers": [3]}, {"tokens": "some"}])
def test_a_damaged_selection_attribute_is_one_error(damaged):
    with pytest.raises(TacaProbeError, match="map_selection attribute .* is damaged"):
        MapSelection.from_attrs({"map_selection": damaged})


def test_a_selection_built_in_code_is_normalized_and_stores_as_json():
    sel = MapSelection(steps=[np.int64(0), 2], layers=["a*"], tokens=range(3))
    assert sel == MapSelection(steps=(0, 2), layers=("a*",), tokens=(0, 1, 2))
    assert MapSelection.from_attrs(json.loads(json.dumps({"map_selection": sel.to_attrs()}))) == sel
    with pytest.raises(TacaProbeError, match="bad maps selection"):
        MapSelection(tokens="some")
