"""The README's quick start (minus the install) gives every figure and the report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from taca_probe import open_sweep, plotting

pytestmark = pytest.mark.slow  # the README quick start and CI script, end to end

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_the_first_installing():
    commands = _quick_start_commands()
    assert len(commands) == 2 and commands[0].startswith("python -m pip install")


@pytest.mark.slow
def test_quick_start_recording_gives_every_figure_and_the_report(tmp_path):
    first = _quick_start_commands()[0]
    steps = [c.strip() for c in first.split(" && ") if not c.strip().startswith("python -m pip")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(" && ".join(steps), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = {p.stem for p in (tmp_path / "run" / "figures").glob("*.png")}
    assert written == {n for names in plotting.FIGURES.values() for n in names}
    assert "skipped" not in proc.stdout
    sweep = open_sweep(tmp_path / "run")
    assert list(sweep["schedule"].values) == ["none", "step:1.2@970"] and "maps" in sweep
    assert (tmp_path / "run" / "report" / "index.html").stat().st_size > 0
