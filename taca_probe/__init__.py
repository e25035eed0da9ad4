"""taca-probe: TACA and attention probes for MM-DiT diffusion transformers."""

from __future__ import annotations

__version__ = "0.1.0"
