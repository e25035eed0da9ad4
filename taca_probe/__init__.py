"""taca-probe: TACA and attention probes for MM-DiT diffusion transformers (SD3, SD3.5, FLUX.1).

The public API, imported lazily so that ``taca-probe --help`` does not pay for diffusers:

- :func:`taca` / :func:`apply_taca` / :class:`TacaConfig`: the TACA intervention;
- :mod:`taca_probe.schedules`: gamma schedules and their one-line string forms;
- :func:`probe` / :func:`open_run`: record attention statistics into zarr stores, open them
  as labeled xarray Datasets;
- :func:`load_pipeline`: embedded tiny models, local folders, cached hub models;
- :class:`TacaProbeError`: what bad input raises.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "taca": "intervention",
    "apply_taca": "intervention",
    "TacaConfig": "intervention",
    "TacaHandle": "intervention",
    "load_pipeline": "models",
    "EMBEDDED_MODELS": "models",
    "DEFAULT_MODEL": "models",
    "TacaProbeError": "errors",
    "taca_attention": "attention",
    "probe": "runner",
    "MapSelection": "selection",
    "open_run": "store",
    "run_sweep": "sweep",
    "open_sweep": "sweep",
    "sweep_schedules": "sweep",
    "suppression": "analysis",
    "amplification": "analysis",
    "compare_runs": "analysis",
    "timestep_awareness": "analysis",
    "map_difference": "analysis",
    "token_ranking": "analysis",
    "mass_vs_gamma": "analysis",
    "gamma_image_grid": "analysis",
    "bootstrap_mean": "stats",
    "render_figures": "rendering",
    "report": "rendering",
}

__all__ = sorted(_EXPORTS) + ["schedules", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name == "schedules":
        return importlib.import_module(".schedules", __name__)
    raise AttributeError(f"module 'taca_probe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
