"""Registers the Triton backend when triton is importable."""

from __future__ import annotations

from .backends import mark_unavailable

mark_unavailable("triton", "not implemented yet")
