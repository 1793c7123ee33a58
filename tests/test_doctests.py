"""The examples in the package's docstrings run, and none disappears unnoticed.

Every module under ``robusttrain/`` is found by walking the package (a new module is covered
without being listed here), imported, and its docstring examples (Google-style ``Example:``
sections written with ``>>>``) are run as doctests with ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``.
A separate test counts the examples, so deleting one (rather than fixing it) is noticed.
"""

import doctest
import importlib
import pkgutil

import pytest

import robusttrain

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# modules not imported, with the reason
SKIPPED = {"robusttrain.__main__": "importing it runs the command line (sys.exit(main()))"}

# the examples in the package when this test was written; raise it when you add examples, and
# lower it only when an example is removed on purpose
MIN_EXAMPLES = 41


def _module_names() -> list[str]:
    found = pkgutil.walk_packages(robusttrain.__path__, prefix="robusttrain.")
    return sorted(info.name for info in found if info.name not in SKIPPED)


MODULES = ["robusttrain", *_module_names()]


def _doctests(name: str) -> list[doctest.DocTest]:
    # the finder keeps only objects defined in the module, so a re-export is not run twice
    return doctest.DocTestFinder().find(importlib.import_module(name))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report: list[str] = []
    for test in _doctests(name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples failed in {name}:\n" + (
        "".join(report))


def test_walk_finds_the_package():
    # a broken walk (an import error swallowed, a renamed package) would make the tests above vacuous
    assert {"robusttrain.models", "robusttrain.zo.estimators", "robusttrain.commands.main"} <= set(
        MODULES)
    assert len(MODULES) >= 40


def test_the_examples_are_still_there():
    per_module = {name: sum(len(t.examples) for t in _doctests(name)) for name in MODULES}
    total = sum(per_module.values())
    with_examples = {name: n for name, n in per_module.items() if n}
    assert total >= MIN_EXAMPLES, (
        f"{total} docstring examples, fewer than the {MIN_EXAMPLES} there were ({with_examples}); "
        "fix a failing example instead of deleting it, or lower MIN_EXAMPLES if one was removed "
        "on purpose"
    )
