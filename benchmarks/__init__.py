"""Benchmarks of the grouped language-specific LoRA op against its baselines.

``python -m benchmarks [--quick]`` (or ``lslo bench``) runs the suite: :mod:`benchmarks.providers`
(the implementations), :mod:`benchmarks.suite` (cases, timing, memory, CSV),
:mod:`benchmarks.plots` and :mod:`benchmarks.report` (figures and the README table, drawn from
the CSV only), :mod:`benchmarks.e2e` (whole-model throughput, full mode).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks`` / ``lslo bench``; see ``benchmarks/__main__.py``."""
    # Imported here, not at package import, so that `python -m benchmarks` runs __main__ only once.
    from .__main__ import main as _main

    return _main(argv)
