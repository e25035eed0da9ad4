"""taca_probe.sweep's pure parts: the schedules of a grid and the coordinates a sweep labels them with."""

from __future__ import annotations

from taca_probe.sweep import sweep_schedules


def test_sweep_schedules_put_the_one_identity_schedule_first_whatever_the_order_given():
    # gamma0 = 1 at every threshold, and const:1, are all the stock model: one "none", listed first
    specs = sweep_schedules(gamma0=[1.2, 1.0], t_thresh=[970, 900], extra=["const:1", "const:1.3"])
    assert specs == ["none", "step:1.2@970", "step:1.2@900", "const:1.3"]
