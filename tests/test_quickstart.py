"""The README's quick start is what CI runs and what a newcomer reads."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    quick = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1]
    line = next(line for line in quick.splitlines() if "pytest" in line)
    return re.sub(r" *#.*$", "", line).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    command = readme_test_command()
    assert command.startswith("python3 -m venv .venv")  # nothing assumed on PATH but python3
    assert command in ROOT.joinpath(".ci", "run").read_text()


def test_the_demo_says_whose_copy_shows_redacted():
    script = ROOT.joinpath("deploy", "demo", "quickstart.sh").read_text()
    assert "upstream saw" not in script  # read as if the upstream got [REDACTED]
    assert "caller's copy of the echoed answer" in script and "the real API key" in script
