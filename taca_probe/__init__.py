"""taca-probe: TACA and attention probes for MM-DiT diffusion transformers (SD3, SD3.5, FLUX.1).

The public API, imported lazily so that ``taca-probe --help`` does not pay for diffusers:

- :func:`taca` / :func:`apply_taca` / :class:`TacaConfig`: the TACA intervention;
- :mod:`taca_probe.schedules`: gamma schedules and their one-line string forms;
- :mod:`taca_probe.analysis` / :mod:`taca_probe.plotting`: the paper's quantities and their figures;
- :func:`probe` / :func:`open_run`: record attention statistics into zarr stores, open them
  as labeled xarray Datasets;
- :func:`load_pipeline`: embedded tiny models, local folders, cached hub models;
- :class:`TacaProbeError`: what bad input raises.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    name: module
    for module, names in {
        "intervention": ("taca", "apply_taca", "TacaConfig", "TacaHandle"),
        "models": ("load_pipeline", "EMBEDDED_MODELS", "DEFAULT_MODEL"),
        "errors": ("TacaProbeError",),
        "attention": ("taca_attention",),
        "runner": ("probe",),
        "selection": ("MapSelection",),
        "store": ("open_run",),
        "sweep": ("run_sweep", "open_sweep", "sweep_schedules"),
        "analysis": ("suppression", "amplification", "compare_runs", "timestep_awareness", "map_difference",
                     "token_ranking", "mass_vs_gamma", "gamma_image_grid"),
        "stats": ("bootstrap_mean",),
        "rendering": ("render_figures", "report"),
    }.items()
    for name in names
}

#: Public modules, reachable as ``taca_probe.analysis`` etc. without importing them first.
_MODULES = ("analysis", "plotting", "schedules")

__all__ = sorted(_EXPORTS) + [*_MODULES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'taca_probe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
