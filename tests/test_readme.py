"""The Python examples of the README and of the documentation run as written (in a private namespace)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NetNS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# Plain ```python blocks and the ones the docs build executes (```python exec="on" ...).
_BLOCK = re.compile(r"^```python(?: [^\n]*)?\n(.*?)^```$", flags=re.S | re.M)
BLOCKS = [block for page in PAGES for block in _BLOCK.findall(page.read_text())]
NAMES = [f"{page.relative_to(ROOT)}-{i}" for page in PAGES for i, _ in enumerate(_BLOCK.findall(page.read_text()))]


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=NAMES)
def test_readme_example_runs(netns: NetNS, code: str, tmp_path: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], check=True)
    subprocess.run(["ip", "route", "add", "239.0.0.0/8", "dev", "lo"], check=True)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_every_public_function_and_command_has_a_page() -> None:
    """The documentation site keeps a page per public function and per CLI command (and mkdocs.yml lists it)."""
    import inspect

    import twfix
    from twfix._cli_args import build_parser

    nav = (ROOT / "mkdocs.yml").read_text()
    functions = [n for n in twfix.__all__ if inspect.isfunction(getattr(twfix, n))]
    commands = list(build_parser().subcommands)  # type: ignore[attr-defined]
    for page in [f"reference/functions/{n}.md" for n in functions] + [f"commands/{c}.md" for c in commands]:
        assert (ROOT / "docs" / page).is_file(), page
        assert page in nav, page
