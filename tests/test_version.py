"""One version number: the package, pyproject.toml and the newest CHANGELOG entry agree."""

import re
from pathlib import Path

import robusttrain

ROOT = Path(__file__).resolve().parents[1]


def test_package_pyproject_and_changelog_name_the_same_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert declared is not None, "pyproject.toml has no version line"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    newest = re.search(r"^## \[(\d[^\]]*)\]", changelog, re.MULTILINE)
    assert newest is not None, "CHANGELOG.md has no version heading"
    assert robusttrain.__version__ == declared.group(1) == newest.group(1)
