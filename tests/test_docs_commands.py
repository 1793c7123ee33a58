"""The commands in the docs parse, so the docs cannot drift from the code.

Every fenced ```bash, ```sh, ```shell or plain ``` block of README.md and docs/guide.md is read as a
shell user would: lines ending in ``\\`` are joined, a leading ``$ `` and the comment (from a ``#``
that starts a word) are dropped, and leading ``NAME=value`` environment settings are skipped. Every
line that then starts with ``robusttrain `` must parse — its subcommand exists and every option
exists and takes the value given — and nothing runs:

* ``fit``, ``validate``, ``test``, ``predict`` (LightningCLI): the line goes to
  :func:`robusttrain.commands.main.main` in-process with ``--print_config`` added; jsonargparse
  parses it (reading the ``--config`` file), prints the resolved config and exits with 0 before any
  class is instantiated; a wrong option or value exits with 2.
* ``robustness``, ``compare``, ``attack``, ``meta-train`` (argparse): the line goes to ``main`` too,
  with ``argparse.ArgumentParser.parse_args`` wrapped so that the command stops right after a
  successful parse, before it opens a checkpoint or a config (the files need not exist).

Markers, written in a line's comment, for lines that cannot be checked today:

* ``# docs-test: skip <reason>`` — not checked (a line with a placeholder such as ``<host>``);
* ``# docs-test: needs <subcommand> <option>`` — skipped while ``robusttrain <subcommand> --help``
  does not list ``<option>`` (a feature being built), and checked once it does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/guide.md")
README_MAX_LINES = 250
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
SHELL_LANGUAGES = ("", "bash", "sh", "shell")

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^\s`]*)")
_ENV_SETTING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_MARKER = re.compile(r"docs-test:\s*(.*)$")


@dataclass(frozen=True)
class DocCommand:
    """One ``robusttrain`` line of the docs: where it is, its arguments, its marker."""

    source: str  # "docs/guide.md:123", the line the command starts on
    argv: tuple[str, ...]  # the arguments after ``robusttrain``
    marker: str | None = None  # the text after "docs-test:" in its comment, if any

    def __str__(self) -> str:
        return f"{self.source}: robusttrain {shlex.join(self.argv)}"


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The fenced shell blocks of a Markdown text: (line number of the first line, its lines)."""
    blocks: list[tuple[int, list[str]]] = []
    fence: str | None = None
    shell = False
    lines: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence, shell = match.group(1), match.group(2) in SHELL_LANGUAGES
                lines, start = [], number + 1
            continue
        if line.strip().startswith(fence) and not line.strip()[len(fence):].strip():
            if shell:
                blocks.append((start, lines))
            fence = None
            continue
        lines.append(line)
    return blocks


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: the comment starts at a ``#`` that begins a word,
    outside quotes, as in bash (``a#b`` is one word, not a comment)."""
    quote: str | None = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:]
    return line, ""


def commands_in(text: str, name: str) -> list[DocCommand]:
    """Every ``robusttrain ...`` command in the shell blocks of ``text`` (a file called ``name``)."""
    commands = []
    for start, lines in shell_blocks(text):
        joined: list[tuple[int, str]] = []  # (line number, the command with its continuations)
        pending: tuple[int, str] | None = None
        for offset, raw in enumerate(lines):
            number = start + offset
            first, text_so_far = pending if pending else (number, "")
            line = text_so_far + raw.strip()
            if line.endswith("\\"):
                pending = (first, line[:-1] + " ")
                continue
            pending = None
            joined.append((first, line))
        if pending:
            joined.append(pending)
        for number, line in joined:
            if line.startswith("$ "):
                line = line[2:]
            code, comment = split_comment(line)
            words = shlex.split(code)
            while words and _ENV_SETTING.match(words[0]):
                words.pop(0)
            if not words or words[0] != "robusttrain":
                continue
            marker = _MARKER.search(comment)
            commands.append(DocCommand(f"{name}:{number}", tuple(words[1:]),
                                       marker.group(1).strip() if marker else None))
    return commands


def doc_commands() -> list[DocCommand]:
    return [c for doc in DOCS for c in commands_in((REPO / doc).read_text(), doc)]


class _Parsed(BaseException):
    """Raised right after a successful argparse parse, so that the command does not run.

    A BaseException, so that no ``except ValueError`` / ``except Exception`` of a command catches it.
    """


@contextlib.contextmanager
def _stop_after_argparse():
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)  # a wrong option raises or exits here, as it would
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args):
        yield


def parse(argv: tuple[str, ...] | list[str]) -> tuple[int, str]:
    """Parse ``robusttrain <argv>`` without running it: (exit code, what it printed).

    0 means it parsed. Must be called from the repository root (config paths are relative to it).
    """
    from robusttrain.commands.main import main

    argv = list(argv)
    subcommand = argv[0] if argv else ""
    lightning = subcommand in LIGHTNING_SUBCOMMANDS
    argparse_command = not lightning and not subcommand.startswith("-")  # "--help" is top-level
    if lightning and "--print_config" not in argv:
        argv.append("--print_config")
    printed = io.StringIO()
    stop = _stop_after_argparse() if argparse_command else contextlib.nullcontext()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed), \
            mock.patch.object(sys, "argv", ["robusttrain", *argv]):
        try:
            with stop:
                code = main(argv)
            if argparse_command and code == 0:
                raise AssertionError(
                    f"robusttrain {subcommand} ran instead of stopping after argparse parsed its "
                    "arguments; tests/test_docs_commands.py needs to learn how it parses now"
                )
        except _Parsed:
            code = 0
        except SystemExit as exit_:  # argparse and jsonargparse exit on --help, --print_config, errors
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, printed.getvalue()


@functools.cache
def help_lists(subcommand: str, option: str) -> bool:
    """Whether ``robusttrain <subcommand> --help`` lists ``option``."""
    code, printed = parse([subcommand, "--help"])
    return code == 0 and re.search(rf"{re.escape(option)}\b", printed) is not None


# ------------------------------------------------------------------------------------------ tests


def test_the_docs_hold_robusttrain_commands():
    # a reader that silently found nothing would pass every test below
    commands = doc_commands()
    for doc in DOCS:
        assert any(c.source.startswith(f"{doc}:") for c in commands), f"no robusttrain line in {doc}"
    subcommands = {c.argv[0] for c in commands if c.argv}
    assert {"fit", "test", "predict", "robustness", "compare", "attack", "meta-train"} <= subcommands


@pytest.mark.parametrize("command", doc_commands(), ids=lambda c: c.source)
def test_doc_command_parses(command: DocCommand, monkeypatch):
    monkeypatch.chdir(REPO)
    if command.marker is not None:
        kind, _, rest = command.marker.partition(" ")
        if kind == "skip":
            pytest.skip(f"{command.source}: marked docs-test: skip ({rest or 'no reason given'})")
        assert kind == "needs", f"{command.source}: unknown marker 'docs-test: {command.marker}'"
        subcommand, option = rest.split()
        if not help_lists(subcommand, option):
            pytest.skip(f"{command.source}: robusttrain {subcommand} has no {option} yet")
    code, printed = parse(command.argv)
    tail = "\n".join(printed.strip().splitlines()[-12:])
    assert code == 0, f"{command} does not parse (exit code {code}):\n{tail}"


def test_a_made_up_option_is_reported(monkeypatch):
    monkeypatch.chdir(REPO)
    code, printed = parse(["fit", "--config", "configs/fashion_mlp_sgd.yaml",
                           "--model.init_args.sigmaa", "1"])
    assert code != 0 and "sigmaa" in printed
    code, printed = parse(["robustness", "--ckpt", "a.ckpt", "--out", "x", "--levelz", "0.1"])
    assert code != 0 and "--levelz" in printed
    code, printed = parse(["compare", "--config", "experiments/quick_fashion.yaml", "--seeds", "3"])
    assert code != 0 and "--seeds" in printed


def test_a_made_up_subcommand_is_reported(monkeypatch):
    monkeypatch.chdir(REPO)
    code, printed = parse(["fitt", "--config", "configs/fashion_mlp_sgd.yaml"])
    assert code != 0 and "unknown subcommand 'fitt'" in printed


def test_a_command_that_parses_is_not_run(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    # no such checkpoint: had the command run, it would have failed on the file
    code, _ = parse(["attack", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "o")])
    assert code == 0
    assert not (tmp_path / "o").exists()


def test_the_reader_finds_commands_as_a_shell_would():
    text = "\n".join([
        "```bash",
        "$ robusttrain fit --config a.yaml   # a comment",
        "robusttrain robustness --ckpt x.ckpt \\",
        "    --levels 0,0.1 \\",
        "    --out 'out dir'  # docs-test: skip a reason",
        "ROBUSTTRAIN_DATA_DIR=/data robusttrain compare --config c.yaml",
        "python experiments/zo_l2l.py",
        "robusttrain predict --x a#b  # docs-test: needs predict --x",
        "```",
        "```python",
        "robusttrain fit --not-shell",
        "```",
        "```",
        "robusttrain/  the package, not a command",
        "robusttrain --help",
        "```",
    ])
    commands = commands_in(text, "doc.md")
    assert [(c.source, c.argv, c.marker) for c in commands] == [
        ("doc.md:2", ("fit", "--config", "a.yaml"), None),
        ("doc.md:3", ("robustness", "--ckpt", "x.ckpt", "--levels", "0,0.1", "--out", "out dir"),
         "skip a reason"),
        ("doc.md:6", ("compare", "--config", "c.yaml"), None),
        ("doc.md:8", ("predict", "--x", "a#b"), "needs predict --x"),
        ("doc.md:15", ("--help",), None),
    ]


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move options to "
        "docs/guide.md and results to docs/results/"
    )
    # CI runs the test command of README.md: a shell block must hold `make test`
    blocks = shell_blocks("\n".join(lines))
    assert any(line.strip().startswith("make test") for _, block in blocks for line in block)
