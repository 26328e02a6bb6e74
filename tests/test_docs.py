"""The README stays a short user guide that agrees with the code and CI."""

import re
from pathlib import Path

from come.methods import available_methods

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_short():
    assert len(README.encode()) <= 15_000


def test_readme_lists_every_method():
    listed = set(re.findall(r"^\| `([^`]+)`", README, flags=re.MULTILINE))
    missing = set(available_methods()) - listed
    assert not missing, sorted(missing)


def test_readme_states_the_ci_test_command_and_install_steps():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python -m pytest"))
    assert command in README
    install = (ROOT / "scripts" / "install.sh").read_text()
    for line in install.splitlines():
        if line.startswith("python -m pip install"):
            assert line.split("#")[0].strip() in README, line


def test_linked_docs_exist():
    for target in re.findall(r"\]\(([^)#]+)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
