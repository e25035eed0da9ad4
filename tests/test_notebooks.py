"""Every notebook executes top to bottom (nbclient) on a tiny model with small parameters.

The notebooks read ``TACA_PROBE_NOTEBOOK_FAST=1`` in their parameter cell and then use
``TACA_PROBE_NOTEBOOK_MODEL`` (here the random-weight ``tiny-sd3``, which needs no trained
weights), 2 steps at 64 px; they write under ``TACA_PROBE_NOTEBOOK_OUT``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from taca_probe.store import is_store, open_run

pytestmark = pytest.mark.slow  # executes every notebook in a Jupyter kernel

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist_with_cleared_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_suppression.ipynb", "03_attention_maps.ipynb",
                                           "04_gamma_sweep.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path.name} has outputs"
        params = code[0]
        assert "parameters" in params.metadata.get("tags", []), f"{path.name}: first code cell is not the parameters"
        assert "DEFAULT_MODEL" in params.source and "TACA_PROBE_NOTEBOOK_FAST" in params.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TACA_PROBE_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("TACA_PROBE_NOTEBOOK_MODEL", "tiny-sd3")
    monkeypatch.setenv("TACA_PROBE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"
    # what it recorded went where it was told, and opens with complete samples
    stores = [p for p in tmp_path.rglob("*.zarr") if is_store(p)]
    assert stores and all(open_run(p).sizes["sample"] > 0 for p in stores), f"{path.name} recorded nothing"


def test_quickstart_notebook_shows_progress_and_the_report_inline(tmp_path, monkeypatch):
    monkeypatch.setenv("TACA_PROBE_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("TACA_PROBE_NOTEBOOK_MODEL", "tiny-sd3")
    monkeypatch.setenv("TACA_PROBE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = NOTEBOOKS[0]
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    record = next(c for c in nb.cells if c.cell_type == "code" and "run.sample(" in c.source)
    # a progress bar over the samples: tqdm's widget, or its text form on stderr
    bars = [o for o in record.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
            or (o.get("name") == "stderr" and "sample" in o.get("text", ""))]
    assert bars, record.outputs
    last = [o for o in nb.cells[-1].outputs if "text/html" in o.get("data", {})]
    assert last and last[0]["data"]["text/html"].startswith("<iframe srcdoc=")
    assert (tmp_path / "01_quickstart" / "report" / "index.html").is_file()
