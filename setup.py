"""Builds the optional C++ CPU backend ``lslo_kernels._C``; metadata lives in pyproject.toml.

The extension is compiled against the torch already installed in the environment, so install
with build isolation off (torch first, see README):

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    pip install --no-build-isolation -e .          # editable: _C lands next to lslo_kernels/*.py
    python setup.py build_ext --inplace            # rebuild _C alone while developing

The package installs and imports without the extension: when torch is missing at build time, when
``LSLO_SKIP_CPP=1``, or when the compiler fails, a warning is printed (pip shows it with ``-v``)
and ``lslo_kernels`` falls back to its pure-PyTorch ``reference`` backend, saying why when the
``cpp`` backend is asked for. ``LSLO_REQUIRE_CPP=1`` (CI) turns a failed build into an error.
"""

from __future__ import annotations

import os
import sys
import traceback

from setuptools import setup

_SOURCES = ["csrc/grouped_lora.cpp"]
_DEPENDS = ["csrc/kernels.h", "csrc/simd.h", "csrc/transpose.h"]
# No -march=native: the machine that builds is not necessarily the one that runs. -O3 vectorises
# the kernels for the baseline ISA, and grouped_lora.cpp compiles a second, AVX2+FMA variant through
# function target attributes, chosen at run time by CPU detection (see csrc/simd.h).
_CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
_LINK_FLAGS = ["-fopenmp"]


def _warn(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (lslo): {message}\n"
          "lslo will install without its C++ backend and fall back to the slow 'reference' backend.\n"
          f"{bar}\n", file=sys.stderr)


def _required() -> bool:
    return os.environ.get("LSLO_REQUIRE_CPP", "0") == "1"


def _extension_setup() -> dict:
    if os.environ.get("LSLO_SKIP_CPP", "0") == "1":
        _warn("LSLO_SKIP_CPP=1: not building lslo_kernels._C.")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        if _required():
            raise
        _warn(f"torch is not importable at build time ({exc}); install torch first and build with "
              "`pip install --no-build-isolation -e .`.")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Build ``_C`` when possible; a failed build leaves a pure-Python install behind."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # no/unusable compiler, bad flags, compile or link error
                if _required():
                    raise
                traceback.print_exc()
                _warn(f"building lslo_kernels._C failed: {exc}")

    ext = CppExtension(
        name="lslo_kernels._C",
        sources=_SOURCES,
        depends=_DEPENDS,
        extra_compile_args={"cxx": _CXX_FLAGS},
        extra_link_args=_LINK_FLAGS,
    )
    # optional: setuptools then skips copying a missing _C*.so into the tree (editable / --inplace).
    ext.optional = not _required()
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_extension_setup())
