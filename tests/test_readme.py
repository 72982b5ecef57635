"""The README opens with the two commands, and CI runs the README's test command."""

from __future__ import annotations

import re

from .conftest import REPO


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, re.S)[:2]


def test_readme_opens_with_demo_and_test_commands() -> None:
    demo, tests = _commands()
    assert "snakemake" in demo and "make-demo-slides" in demo and "torch==" in demo
    assert "pytest" in tests and "torch==" in tests


def test_ci_runs_the_readme_test_command() -> None:
    _, tests = _commands()
    assert tests.strip() in (REPO / ".ci" / "run").read_text()
