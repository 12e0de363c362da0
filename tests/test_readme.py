"""The README's Python snippets run as pasted (a user's first contact with lslo must not raise).

Every ```python block of README.md is executed, in order, in one namespace (a later block may use
an earlier one's names, as a reader pasting them into one session would), with the working directory
a fresh temporary folder. A block that needs a download or a GPU is marked by the line
``<!-- no-test -->`` right before it and is only compiled (a syntax error still fails).
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?P<marker><!--\s*no-test\s*-->\s*\n)?```python[^\n]*\n(?P<code>.*?)^```", re.DOTALL | re.MULTILINE)


def readme_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, runnable) of each ```python block of ``text``."""
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("marker") is None)
            for m in _BLOCK.finditer(text)]


def test_block_parser_sees_markers():
    text = "a\n```python\nx = 1\n```\n<!-- no-test -->\n```python\nimport hub\n```\n```bash\nls\n```\n"
    assert readme_blocks(text) == [(3, "x = 1\n", True), (7, "import hub\n", False)]


def test_readme_has_python_blocks():
    assert any(runnable for _, _, runnable in readme_blocks(README.read_text(encoding="utf-8")))


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for line, code, runnable in readme_blocks(README.read_text(encoding="utf-8")):
        # Compiled under the name "README.md:<line>": a traceback names the block's line in the README.
        compiled = compile(code, f"README.md:{line}", "exec")
        if runnable:
            exec(compiled, namespace)  # noqa: S102 - running the README is the point
