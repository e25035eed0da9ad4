"""Shared pytest fixtures."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Without CUDA, Triton kernels run through Triton's interpreter. It must be chosen before anything
# imports triton.language (diffusers' import of torch._dynamo can), so here, once for the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Importing torch, diffusers, transformers, scipy and matplotlib leaves millions of objects that
# every full collection walks; at the default thresholds (700, 10, 10) the fast lane spent about a
# tenth of its time in ~14 such walks. Rarer collections free the same cycles, a little later.
gc.set_threshold(10_000, 20, 100)


@pytest.fixture(scope="session", autouse=True)
def taca_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``TACA_PROBE_CACHE`` at a folder private to this test session.

    Tests then never read or write the user's real cache, and the embedded tiny models are built
    once per session (subprocesses started by tests inherit the variable, so they share them).
    """
    path = tmp_path_factory.mktemp("taca-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TACA_PROBE_CACHE", str(path))
        yield path


@pytest.fixture
def pipes() -> Callable[..., Any]:
    """Loader of embedded tiny pipelines on the CPU: ``pipes("tiny-flux")``.

    Every call returns a fresh pipeline (loading from the session cache takes ~0.1 s), so a test
    may change it (processors, hooks, LoRA) without affecting other tests. Progress bars are off.
    """
    from taca_probe.models import load_pipeline

    def load(name: str = "tiny-sd3", **kwargs: Any) -> Any:
        kwargs.setdefault("device", "cpu")
        pipe = load_pipeline(name, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``-m "not slow"``, do not even import a module whose every test is slow (module-level
    ``pytestmark = pytest.mark.slow``): importing them costs the fast lane seconds for nothing."""
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    if config.getoption("markexpr", "").replace(" ", "") != "notslow":
        return None
    text = collection_path.read_text(encoding="utf-8")
    return "\npytestmark = pytest.mark.slow" in text or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where CUDA is not available (they run in analysis/gpu_check.sh)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
