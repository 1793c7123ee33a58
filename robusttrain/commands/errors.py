"""Which errors a command reports in one line instead of a traceback, and that line.

Bad input that robusttrain anticipates ends a command with one line on stderr that names the file
or the parameter and the fix, and exit code :data:`USAGE_ERROR`:

* :class:`~robusttrain.data.DatasetError` — a dataset file missing, truncated or corrupt;
* :class:`~robusttrain.training.CheckpointError` — a checkpoint path that is not a usable file
  (missing, empty, cut short, foreign; the line names a whole checkpoint beside it);
* :class:`~robusttrain.training.OptionError` — an unknown option or config key of ``fit``,
  ``validate``, ``test``, ``predict`` (the line names the closest valid ones) or a value of the
  wrong type; :class:`OneLineParser` does the same for the other subcommands' options;
* :class:`~robusttrain.zo.NonFiniteLossError` and :class:`~robusttrain.training.DivergenceError` —
  training diverged (the message names the step and the setting to lower);
* a ``ValueError`` raised by the argument checks in the ``__init__`` of a robusttrain class (a
  training method, backbone or data module that jsonargparse was building from the config), or in
  a robusttrain data module's ``setup``/``prepare_data`` (settings checked against the files).

jsonargparse and Lightning wrap these (``raise ... from err``), so the chain of causes is searched.
Anything else — a ``ValueError`` from torch, an ``AttributeError`` in our own code — is not bad
input but a bug or an environment problem, and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

from robusttrain.data import DatasetError
from robusttrain.training import CheckpointError, DivergenceError, OptionError
from robusttrain.training.option_errors import close_matches
from robusttrain.zo import NonFiniteLossError

__all__ = ["USAGE_ERROR", "OneLineParser", "UsageError", "one_line_error", "run_in_one_line"]

USAGE_ERROR = 2  # exit code of a command stopped by bad input, as argparse's



class UsageError(ValueError):
    """A command-line mistake; reported in one line with exit code :data:`USAGE_ERROR`."""


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` that raises :class:`UsageError` (one line) instead of printing usage.

    An unknown option is named with the closest options the command has, and options are not
    abbreviated (``--lev`` is not read as ``--levels``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            unknown = next((a for a in message.split()[2:] if a.startswith("-")), None)
            if unknown is not None:
                name = unknown.split("=", 1)[0]
                options = [o for o in self._option_string_actions
                           if o.startswith("--") and o != "--help"]
                close = close_matches(name, options)
                hint = (f"did you mean {' or '.join(close)}?" if close
                        else f"the options are {', '.join(options)}")
                raise UsageError(f"unknown option {name}; {hint} (see --help)")
        raise UsageError(f"{message} (see --help)")


def run_in_one_line(prog: str, parser: argparse.ArgumentParser,
                    run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """Parse ``argv`` and ``run`` it; a ValueError (bad options, CheckpointError, DatasetError)
    ends it with one line ``<prog>: error: ...`` on stderr and :data:`USAGE_ERROR`."""
    try:
        return run(parser.parse_args(argv))
    except ValueError as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return USAGE_ERROR


_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_OWN_ERRORS = (DatasetError, CheckpointError, OptionError, NonFiniteLossError, DivergenceError)


def one_line_error(err: BaseException) -> str | None:
    """The one-line message for anticipated bad input behind ``err``; ``None`` for anything else.

    Args:
        err: the exception that ended the command.

    Returns:
        The message of the anticipated error in ``err``'s chain of causes (``err`` itself, its
        ``__cause__``, ...), whitespace collapsed to one line and, for an argument check, prefixed
        with the config section it belongs to (``model.init_args (ZerothOrderClassifier): sigma
        must be ...``); ``None`` when the chain holds none.
    """
    for cause in _causes(err):
        if isinstance(cause, _OWN_ERRORS):
            return _one_line(str(cause))
        if isinstance(cause, ValueError):
            owner = _checking_init(cause)
            if owner is not None:
                return f"{_section(owner)} ({type(owner).__name__}): {_one_line(str(cause))}"
    return None


def _causes(err: BaseException) -> Iterator[BaseException]:
    # only explicit causes (`raise ... from err`): an error raised while handling another one
    # (`__context__`) is a new problem, not a report of the first
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__


def _checking_init(err: BaseException) -> object | None:
    """The robusttrain object whose ``__init__`` raised ``err``, directly or through a helper.

    The raise must be in robusttrain's own code, and every frame between it and that ``__init__``
    too: an ``__init__`` that called into torch which raised is not an argument check of ours.
    """
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
    for frame in reversed(frames):  # innermost (the raise) first
        if not _is_own(frame):
            return None
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            return frame.f_locals["self"]
        # a data module checks the settings that need the files (val_size against the training
        # set) when it reads them
        if frame.f_code.co_name in ("setup", "prepare_data") and isinstance(
            frame.f_locals.get("self"), LightningDataModule
        ):
            return frame.f_locals["self"]
    return None


def _is_own(frame: FrameType) -> bool:
    return Path(frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def _section(owner: object) -> str:
    """Where ``owner``'s arguments sit in a config (``--model.init_args.sigma`` on the command line)."""
    if isinstance(owner, LightningModule):
        return "model.init_args"
    if isinstance(owner, LightningDataModule):
        return "data.init_args"
    if isinstance(owner, nn.Module):
        return "model.init_args.backbone.init_args"
    return "config"


def _one_line(message: str) -> str:
    return " ".join(message.split())
