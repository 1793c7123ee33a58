"""Run ``robusttrain`` and kill it with SIGKILL at one stage of a comparison, for
tests/test_compare_interrupted.py::

    python tests/compare_killer.py STAGE compare --config tiny.yaml --out out

STAGE is

* ``train:<run>:<step>``: during the training of the ``<run>``-th run this call trains (1-based),
  when it is about to take optimizer step ``<step> + 1`` (:class:`resume_killer.KillAtStep`);
* ``evaluate:<n>``: when the comparison starts its ``<n>``-th model evaluation — ``evaluate:1``
  after all training and before any evaluation, ``evaluate:2`` after the first model's evaluation
  was written.

Nothing is flushed or saved: the process ends as it does when a machine dies or a cluster's
scheduler kills the job. robusttrain holds no test hooks; this script wraps the functions at the
stage boundaries, then calls ``robusttrain.commands.main.main``. ``tests/`` must be on PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import sys

from resume_killer import KillAtStep

from robusttrain.commands.main import main
from robusttrain.comparison import runner


def kill_in_training(run: int, step: int) -> None:
    """Make the ``run``-th training of this process kill it before optimizer step ``step + 1``."""
    real_make_cli = runner.make_cli
    calls = 0

    def make_cli(*args, **kwargs):
        nonlocal calls
        calls += 1
        cli = real_make_cli(*args, **kwargs)
        if calls == run:
            cli.trainer.callbacks.append(KillAtStep(step))
        return cli

    runner.make_cli = make_cli


def kill_at_evaluation(call: int) -> None:
    """Kill the process when the comparison calls ``evaluate_models`` for the ``call``-th time."""
    real_evaluate = runner.evaluate_models
    calls = 0

    def evaluate_models(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_evaluate(*args, **kwargs)

    runner.evaluate_models = evaluate_models


STAGES = {"train": kill_in_training, "evaluate": kill_at_evaluation}

if __name__ == "__main__":
    stage, *argv = sys.argv[1:]
    kind, *numbers = stage.split(":")
    STAGES[kind](*(int(n) for n in numbers))
    sys.exit(main(argv))
