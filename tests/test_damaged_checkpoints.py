"""A damaged checkpoint ends every command that reads one in one line, exit code 2, no traceback.

One real checkpoint is trained once (a tiny fit on fake MNIST); each test damages a copy of it —
cut short, emptied, replaced by a text file, by a plain ``torch.save`` dict, by a Lightning
checkpoint of another program or by one that pickles Python objects — and hands it to a command,
in process: ``fit/validate/test/predict --ckpt_path``, ``fit`` with ``init_from``, ``robustness``,
``attack``, ``meta-train`` and ``compare`` (which resumes a run from its ``last.ckpt``). The line
must name the file, say what is wrong with it, and point at the whole ``best.ckpt`` beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from robusttrain.commands.main import main
from robusttrain.training import check_checkpoint_file
from robusttrain.training.checkpoints import checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")


def _fit_args(data_dir: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "mnist_mlp_sgd.yaml"),
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--data.init_args.data_dir", str(data_dir), "--data.init_args.val_size", "16",
            "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "16"]


@pytest.fixture(scope="module")
def whole(tiny_mnist_module, tmp_path_factory) -> Path:
    """A whole ``last.ckpt`` of a real (tiny) fit."""
    folder = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert main(["fit", *_fit_args(tiny_mnist_module)]) == 0
    return folder / "runs" / "mnist_mlp_sgd" / "version_0" / "checkpoints" / "last.ckpt"


# ----- the damage ---------------------------------------------------------------------------------
def _truncated(whole: Path, target: Path) -> None:
    data = whole.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def _other_lightning(whole: Path, target: Path) -> None:
    checkpoint = torch.load(whole, map_location="cpu", weights_only=True)
    del checkpoint["robusttrain"]
    torch.save(checkpoint, target)


DAMAGES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "truncated": (_truncated, "is cut short"),
    "empty": (lambda whole, target: target.write_bytes(b""), "is empty"),
    "text": (lambda whole, target: target.write_text("epoch 3: val/acc 0.91\n"),
             "is a text file, not a checkpoint"),
    "plain_dict": (lambda whole, target: torch.save({"a": 1}, target),
                   "is not a robusttrain checkpoint (no 'robusttrain' entry"),
    "other_lightning": (_other_lightning, "is not a robusttrain checkpoint (a Lightning checkpoint "
                                          "of another program"),
    "pickled_objects": (lambda whole, target: torch.save(
        {"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=0.1)}, target),
        "is not a robusttrain checkpoint (it holds Python objects"),
}


# ----- the commands -------------------------------------------------------------------------------
def _compare_argv(data_dir: Path, tmp_path: Path) -> list[str]:
    config = {
        "name": "tiny", "seeds": [0], "trainer": {"max_epochs": 1},
        "data": {"class_path": "robusttrain.data.MNISTDataModule",
                 "init_args": {"data_dir": str(data_dir), "batch_size": 16, "val_size": 16}},
        "backbone": {"class_path": "robusttrain.models.MLP",
                     "init_args": {"in_features": 784, "hidden": [8], "num_classes": 10}},
        "methods": {"sgd": {"model": {"class_path": "robusttrain.training.Classifier"},
                            "optimizer": {"class_path": "torch.optim.SGD",
                                          "init_args": {"lr": 0.05}}}},
        "robustness": {"noise": "relative", "levels": [0, 0.1], "draws": 2, "seed": 0},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    return ["compare", "--config", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out")]


RUN = Path("run") / "checkpoints"  # where the damaged last.ckpt and the whole best.ckpt lie

# command -> (folder of the damaged last.ckpt, argv given it, what the line tells to do with best)
COMMANDS: dict[str, tuple[Path, Callable[[Path, Path, Path], list[str]], str]] = {
    "fit": (RUN, lambda ckpt, data, tmp: ["fit", *_fit_args(data), "--ckpt_path", str(ckpt)],
            "best.ckpt in the same folder is whole: resume from it with --ckpt_path {best}"),
    "validate": (RUN, lambda ckpt, data, tmp: ["validate", *_fit_args(data), "--ckpt_path", str(ckpt)],
                 "best.ckpt in the same folder is whole: use it with --ckpt_path {best}"),
    "test": (RUN, lambda ckpt, data, tmp: ["test", *_fit_args(data), "--ckpt_path", str(ckpt)],
             "best.ckpt in the same folder is whole: use it with --ckpt_path {best}"),
    "predict": (RUN, lambda ckpt, data, tmp: ["predict", *_fit_args(data), "--ckpt_path", str(ckpt)],
                "best.ckpt in the same folder is whole: use it with --ckpt_path {best}"),
    "init_from": (RUN, lambda ckpt, data, tmp: ["fit", *_fit_args(data),
                                                "--model.init_args.init_from", str(ckpt)],
                  "best.ckpt in the same folder is whole: set init_from to {best}"),
    "robustness": (RUN, lambda ckpt, data, tmp: ["robustness", "--ckpt", str(ckpt), "--out",
                                                 str(tmp / "o"), "--no-progress"],
                   "best.ckpt in the same folder is whole: pass --ckpt {best}"),
    "attack": (RUN, lambda ckpt, data, tmp: ["attack", "--ckpt", str(ckpt), "--out", str(tmp / "o"),
                                             "--images", "2", "--max-queries", "10"],
               "best.ckpt in the same folder is whole: pass --ckpt {best}"),
    "meta-train": (RUN, lambda ckpt, data, tmp: ["meta-train", "--ckpt", str(ckpt),
                                                 "--out", str(tmp / "o.pt")],
                   "best.ckpt in the same folder is whole: pass --ckpt {best}"),
    "compare": (Path("out") / "runs" / "sgd" / "seed0" / "checkpoints",
                lambda ckpt, data, tmp: _compare_argv(data, tmp),
                "delete it and run compare again to train that run from the start, or copy "
                "best.ckpt beside it over it to resume from the step it holds"),
}


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run ``robusttrain *argv``: exit code 2, one ``error:`` line ending stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_damaged_checkpoint_is_one_line_naming_it_and_the_whole_one(
    command, damage, whole, tiny_mnist_module, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    where, argv, advice = COMMANDS[command]
    folder = tmp_path / where
    folder.mkdir(parents=True)
    damaged, best = folder / "last.ckpt", folder / "best.ckpt"
    shutil.copy(whole, best)
    make, problem = DAMAGES[damage]
    make(whole, damaged)

    line = _one_error_line(capsys, argv(damaged, tiny_mnist_module, tmp_path))
    name = "robusttrain fit" if command == "init_from" else f"robusttrain {command}"
    assert line.startswith(f"{name}: error: ")
    assert f"{damaged} {problem}" in line
    assert advice.format(best=best) in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command, advice", [
    ("fit", "no other checkpoint in its folder is whole: start the run again without --ckpt_path"),
    ("test", "pass a checkpoint written by `robusttrain fit`"),
    ("robustness", "pass a checkpoint written by `robusttrain fit`"),
])
def test_without_a_whole_checkpoint_beside_it_the_line_says_what_else_to_do(
    command, advice, whole, tiny_mnist_module, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / RUN
    folder.mkdir(parents=True)
    damaged = folder / "last.ckpt"
    _truncated(whole, damaged)
    _truncated(whole, folder / "best.ckpt")  # damaged too: not suggested
    line = _one_error_line(capsys, COMMANDS[command][1](damaged, tiny_mnist_module, tmp_path))
    assert (f"{damaged} is cut short ({damaged.stat().st_size} bytes, its end missing: a write or "
            f"a copy that stopped early leaves such a file); {advice}") in line


def test_an_unfinished_write_beside_it_is_named(whole, tiny_mnist_module, tmp_path, monkeypatch,
                                                capsys):
    # a SIGKILL inside AtomicCheckpointIO's write leaves .last.ckpt.<random>.part beside last.ckpt
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / RUN
    folder.mkdir(parents=True)
    shutil.copy(whole, folder / "best.ckpt")
    _truncated(whole, folder / "last.ckpt")
    part = folder / ".last.ckpt.x7_k2q.part"
    _truncated(whole, part)
    args = _fit_args(tiny_mnist_module)
    line = _one_error_line(capsys, ["fit", *args, "--ckpt_path", str(folder / "last.ckpt")])
    assert line.endswith("(.last.ckpt.x7_k2q.part beside it is an unfinished write of last.ckpt "
                         "left by a run stopped while saving, not a checkpoint: delete it)")
    # and passed itself, it is called what it is
    line = _one_error_line(capsys, ["fit", *args, "--ckpt_path", str(part)])
    assert f"--ckpt_path {part} is an unfinished write of last.ckpt" in line
    assert f"resume from it with --ckpt_path {folder / 'best.ckpt'}" in line


def test_a_finished_comparison_run_with_a_damaged_checkpoint_says_to_retrain_it(
    whole, tiny_mnist_module, tmp_path, capsys
):
    argv = _compare_argv(tiny_mnist_module, tmp_path)
    run = tmp_path / "out" / "runs" / "sgd" / "seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "result.json").write_text(json.dumps(
        {"method": "sgd", "sigma": None, "seed": 0, "wall_time_s": 1.0, "steps": 3,
         "forward_equivalents": 9, "checkpoint": "runs/sgd/seed0/checkpoints/last.ckpt"}))
    line = _one_error_line(capsys, argv)
    assert line == (f"robusttrain compare: error: checkpoint {run / 'checkpoints' / 'last.ckpt'} is "
                    f"empty (0 bytes); delete the run folder {run} and run compare again to train "
                    "that run again")


def test_a_whole_checkpoint_passes_the_check(whole):
    assert checkpoint_problem(whole) is None
    check_checkpoint_file(whole, option="--ckpt_path")
