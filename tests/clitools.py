"""Running the command line in-process, and what a refusal must look like (shared by the CLI tests)."""

from __future__ import annotations

from taca_probe.cli import main


def run_cli(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``taca-probe ARGV``, run in this process."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *needles):
    """Exit status 2, one line on stderr (no traceback), holding each of ``needles``."""
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("taca-probe: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
