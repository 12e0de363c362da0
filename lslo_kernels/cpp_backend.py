"""Registers the C++ CPU backend when the extension ``lslo_kernels._C`` is built."""

from __future__ import annotations

from .backends import mark_unavailable

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # the package works without it, on the reference backend
    mark_unavailable("cpp", f"C++ extension lslo_kernels._C not built ({exc}); run `pip install -e .`")
