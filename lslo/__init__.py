"""lslo: Language-Specific LoRA (LSLo) for multilingual NMT, on a grouped mixed-language kernel."""

from __future__ import annotations

from .context import current_route, route
from .layer import LSLoLinear

__version__ = "0.1.0"

__all__ = ["LSLoLinear", "current_route", "route", "__version__"]
