"""One line for a mistyped option of ``robusttrain fit|validate|test|predict``.

jsonargparse reports an unknown option or config key, or a value of the wrong type, in a block of
nested alternatives ("Does not validate against any of the Union subtypes ... Given value:
NestedArg(key='optimzer.init_args.lr', ...)"). :func:`explain_parse_error` reads that block back
into the one thing that went wrong and says it in one line (:class:`OptionError`):

* an unknown key names the key, where it was given (the command line, or the ``--config`` file
  that holds it) and the closest valid keys at its level (:func:`difflib.get_close_matches` over
  the parser's options, or over the arguments of the class it belongs to: the model's, the
  backbone's, the optimizer's), written out in full;
* a value of the wrong type names the key, the type it expects and the value given.

Anything else jsonargparse reports (a missing ``--config`` file, ...) keeps its own words, made one
line. ``--help`` is untouched.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

__all__ = ["OptionError", "close_matches", "explain_parse_error", "option_keys"]


class OptionError(ValueError):
    """An unknown option or config key, or a value of the wrong type; the message says which."""


_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)')
_CLASS = re.compile(r"Problem with given class_path '(?P<cls>[^']+)':\s*(?P<rest>.*)")
_CALLABLE = re.compile(r"Type .* expects a function or a callable class: (?P<rest>.*)")
_CALLABLE_CLASS = re.compile(r"Got value: Namespace\(class_path='(?P<cls>[^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<args>.*)")
_NOT_ACCEPTED = re.compile(r"Option '(?P<key>[^']+)' is not accepted")
_SUBCOMMAND_KEY = re.compile(r"Subcommand '[^']+' does not accept option '(?P<key>[^']+)'")
_EXPECTED = re.compile(r"Expected a <class '(?P<type>[^']+)'>(?:\. Got value: (?P<value>.*))?")
_SUBTYPES = re.compile(r"Subtypes: \[(?P<types>.*)\]")
_GIVEN = re.compile(r"Given value: (?P<value>.*?)(?:\. Got value: .*)?$")
_NO_CLASS = re.compile(r"module '(?P<module>[^']+)' has no attribute '(?P<name>[^']+)'")


@dataclass
class _Context:
    """Where a line of the message sits: the key so far, and the class whose init_args it is in."""

    indent: int
    path: tuple[str, ...] = ()
    class_path: str | None = None
    callable_: bool = False  # an optimizer or scheduler: its first parameter is supplied


@dataclass
class _Reading:
    """What the message says, gathered line by line."""

    unknown: list[tuple[_Context, tuple[str, ...]]] = field(default_factory=list)
    expected: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    subtypes: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    given: dict[tuple[str, ...], str] = field(default_factory=dict)
    missing_class: tuple[tuple[str, ...], str, str] | None = None  # (key, module, name)


def explain_parse_error(
    message: str, parser: ArgumentParser, argv: Sequence[str] | None = None
) -> str:
    """The one-line explanation of jsonargparse's parse error ``message``.

    Args:
        message: the error jsonargparse raised (``str`` of its ``ArgumentError``).
        parser: the parser of the subcommand that failed; its options are the valid top-level keys.
        argv: the command line it parsed, to tell an option from a config key and name the
            ``--config`` file that holds a key; None when it parsed a dict.

    Returns:
        The explanation, without a trailing period; jsonargparse's own message made one line when
        it does not say one of the things above.
    """
    try:
        return _explain(message, parser, list(argv or []))
    except Exception:  # noqa: BLE001 - a message of a form not foreseen still ends in one line
        return " ".join(message.split())


def _explain(message: str, parser: ArgumentParser, argv: list[str]) -> str:
    reading = _read(message)
    if reading.unknown:
        context, key = reading.unknown[0]
        return _unknown(context, key, parser, argv)
    typed = [path for path, types in reading.expected.items() if set(types) - {"NoneType"}]
    if typed:
        path = max(typed, key=len)
        types = reading.subtypes.get(path) or reading.expected[path]
        value = reading.given.get(path)
        got = "" if value is None else f", got {value!r}"
        return f"{_where(path, argv)} expects {_type_names(types)}{got}"
    if reading.missing_class is not None:
        path, module, name = reading.missing_class
        close = close_matches(name, _module_classes(module))
        hint = f"; did you mean {_either([f'{module}.{c}' for c in close])}?" if close else ""
        return f"{_where(path, argv)}: no class {name} in {module}{hint}"
    single = _PARSER_KEY.fullmatch(message.strip())
    if single and single["rest"]:  # Parser key "config": File does not exist: ...
        return f"{_where(tuple(single['key'].split('.')), argv)}: {single['rest']}"
    return " ".join(message.split())


def option_keys(parser: argparse.ArgumentParser) -> list[str]:
    """The keys a parser accepts (``trainer.max_epochs``, ``model``, ``ckpt_path``, ...)."""
    keys = []
    for action in parser._actions:
        if (isinstance(action, argparse._HelpAction) or action.dest == argparse.SUPPRESS
                or action.dest.startswith("print_")):  # --print_config: an action, not a key
            continue
        keys.append(action.dest)
    return keys


def _read(message: str) -> _Reading:
    reading = _Reading()
    stack = [_Context(indent=-1)]
    lines = message.splitlines()

    def visit(text: str, indent: int, index: int) -> None:
        here = stack[-1]
        if m := _PARSER_KEY.match(text):
            stack.append(_Context(indent, here.path + tuple(m["key"].split("."))))
            if m["rest"]:
                visit(m["rest"], indent + 1, index)
        elif m := _CLASS.match(text):
            stack.append(_Context(indent, here.path + ("init_args",), m["cls"]))
            if m["rest"]:
                visit(m["rest"], indent + 1, index)
        elif m := _CALLABLE.match(text):
            found = _CALLABLE_CLASS.search("\n".join(lines[index:]))
            stack.append(_Context(indent, here.path + ("init_args",),
                                  found["cls"] if found else None, callable_=True))
            visit(m["rest"], indent + 1, index)
        elif m := _UNRECOGNIZED.match(text):
            options = [a for a in m["args"].split() if a.startswith("-")]
            if options:
                option = options[0].lstrip("-").split("=", 1)[0]
                reading.unknown.append((here, tuple(option.split("."))))
        elif m := _NOT_ACCEPTED.match(text):
            reading.unknown.append((here, tuple(m["key"].split("."))))
        elif m := _SUBCOMMAND_KEY.match(text):
            reading.unknown.append((_Context(indent), tuple(m["key"].split("."))))
        elif m := _EXPECTED.match(text):
            reading.expected.setdefault(here.path, []).append(m["type"])
            if m["value"] is not None:
                reading.given.setdefault(here.path, m["value"].strip())
        elif m := _SUBTYPES.match(text):
            reading.subtypes[here.path] = [_type_name(t) for t in _split_top(m["types"])]
        elif m := _GIVEN.match(text):
            reading.given.setdefault(here.path, m["value"].strip())
        elif (m := _NO_CLASS.match(text)) and reading.missing_class is None:
            reading.missing_class = (here.path[:-1], m["module"], m["name"])

    for index, line in enumerate(lines):
        text = line.strip()
        if not text:
            continue
        indent = len(line) - len(line.lstrip())
        if text.startswith("- "):
            text, indent = text[2:], indent + 2
        while stack[-1].indent >= indent:
            stack.pop()
        visit(text, indent, index)
    return reading


def _unknown(
    context: _Context, key: tuple[str, ...], parser: ArgumentParser, argv: list[str]
) -> str:
    """The line for an unknown ``key``, given below ``context``."""
    if context.class_path is not None:
        level = _class_arguments(context.class_path, context.callable_)
        name = context.class_path.rsplit(".", 1)[-1]
        known, owner = 0, f"{name} has no argument {key[0]!r}"
    else:  # keys of the parser itself, dotted: the longest prefix of `key` it knows is fine
        keys = option_keys(parser)
        known = 0
        while known < len(key) - 1 and any(
            k == ".".join(key[: known + 1]) or k.startswith(".".join(key[: known + 1]) + ".")
            for k in keys
        ):
            known += 1
        prefix = ".".join(key[:known])
        level = sorted({k[len(prefix) + 1 if prefix else 0:].split(".")[0] for k in keys
                        if not prefix or k.startswith(prefix + ".")})
        owner = ""
    full = context.path + key
    where = _where(full, argv, unknown=True)
    close = close_matches(key[known], level)
    if close:
        dashes = "--" if where.startswith("unknown option") else ""
        fixes = [dashes + ".".join(context.path + key[:known] + (c,) + key[known + 1:])
                 for c in close]
        hint = f"did you mean {_either(fixes)}?"
    elif level and len(level) <= 25:
        hint = f"the keys there are: {', '.join(level)}"
    else:
        hint = "see --help"
    return f"{where}{f' ({owner})' if owner else ''}; {hint}"


def _where(path: tuple[str, ...], argv: list[str], unknown: bool = False) -> str:
    """``option --a.b`` (given on the command line) or ``key a.b in FILE`` (in a config file)."""
    key = ".".join(path)
    word = "unknown " if unknown else ""
    if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv):
        return f"{word}option --{key}"
    source = next((f for f in reversed(_config_files(argv)) if key in _flat_keys(f)), None)
    return f"{word}key {key}" + (f" in {source}" if source else "")


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _load(path: str) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None


def _flat_keys(path: str) -> set[str]:
    keys: set[str] = set()

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                name = f"{prefix}.{k}" if prefix else str(k)
                keys.add(name)
                walk(v, name)

    walk(_load(path), "")
    return keys


def _class_arguments(class_path: str, callable_: bool) -> list[str]:
    """The init arguments jsonargparse accepts for ``class_path`` (empty if it cannot tell)."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        probe = ArgumentParser(exit_on_error=False)
        probe.add_class_arguments(cls, fail_untyped=False)
    except Exception:  # noqa: BLE001 - suggestions are a courtesy; the line is written anyway
        return []
    names = [k.split(".")[0] for k in option_keys(probe) if k != "config"]
    if callable_:  # Callable[[Iterable], Optimizer]: the parameters are supplied, not configured
        first = next(iter(inspect.signature(cls).parameters), None)
        names = [n for n in names if n != first]
    return list(dict.fromkeys(names))


def _module_classes(module: str) -> list[str]:
    try:
        return [n for n, v in vars(importlib.import_module(module)).items() if inspect.isclass(v)]
    except Exception:  # noqa: BLE001 - suggestions are a courtesy
        return []


def close_matches(word: str, candidates: Sequence[str]) -> list[str]:
    """The candidates closest to ``word`` (:func:`difflib.get_close_matches`, at most three, and
    only those about as close as the best one).

    Example:
        >>> close_matches("max_epoch", ["max_epochs", "min_epochs", "max_steps", "precision"])
        ['max_epochs']
    """
    matcher = difflib.SequenceMatcher(b=word)
    scored = []
    for candidate in dict.fromkeys(candidates):
        matcher.set_seq1(candidate)
        ratio = matcher.ratio()
        if ratio >= 0.6:
            scored.append((ratio, candidate))
    scored.sort(key=lambda rc: -rc[0])
    return [c for r, c in scored[:3] if r >= scored[0][0] - 0.08]


def _either(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _split_top(text: str) -> list[str]:
    """Split ``text`` at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _type_name(text: str) -> str:
    m = re.fullmatch(r"<class '(?P<name>[^']+)'>", text)
    return m["name"] if m else text


def _type_names(types: Sequence[str]) -> str:
    names = [("null" if t == "NoneType" else t.removeprefix("typing.")) for t in types]
    return _either(list(dict.fromkeys(names)))
