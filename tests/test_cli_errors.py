"""A mistyped option is one line that names it and the closest valid ones; ``--help`` stays whole.

In process, through :func:`robusttrain.commands.main.main`: a misspelled option of ``fit`` (at the
top, in a group such as ``trainer``, in the model's, backbone's or optimizer's arguments), a
misspelled key in a ``--config`` file, a value of the wrong type, a class path that does not
exist, and a misspelled option of the argparse commands (``robustness``, ``attack``,
``meta-train``, ``compare``) each end with exit code 2 and one ``error:`` line. Nothing is built:
every one fails while the arguments are parsed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from robusttrain.commands.main import main

ROOT = Path(__file__).resolve().parents[1]
SGD = str(ROOT / "configs" / "fashion_mlp_sgd.yaml")
ZO = str(ROOT / "configs" / "fashion_mlp_zo_nesterov.yaml")


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run ``robusttrain *argv``: exit code 2, one ``error:`` line ending stderr, no traceback."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "usage:" not in captured.err
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and captured.err.rstrip().endswith(errors[0]), captured.err
    return errors[0]


@pytest.mark.parametrize("config, option, value, line", [
    (SGD, "--model.init_args.optimzer.init_args.lr", "0.1",
     "unknown option --model.init_args.optimzer.init_args.lr (Classifier has no argument "
     "'optimzer'); did you mean --model.init_args.optimizer.init_args.lr?"),
    # argparse would expand the prefix to --trainer.max_epochs and train 3 epochs
    (SGD, "--trainer.max_epoch", "3",
     "unknown option --trainer.max_epoch; did you mean --trainer.max_epochs?"),
    (SGD, "--trainr.max_epochs", "3",
     "unknown option --trainr.max_epochs; did you mean --trainer.max_epochs?"),
    (SGD, "--checkpoint.monitr", "val/loss",
     "unknown option --checkpoint.monitr; did you mean --checkpoint.monitor?"),
    (SGD, "--ckpt_pth", "last.ckpt", "unknown option --ckpt_pth; did you mean --ckpt_path?"),
    (ZO, "--model.init_args.sigmaa", "0.1",
     "unknown option --model.init_args.sigmaa (ZerothOrderClassifier has no argument 'sigmaa'); "
     "did you mean --model.init_args.sigma?"),
    (ZO, "--model.init_args.num_pair", "2",  # not abbreviated inside a class either
     "unknown option --model.init_args.num_pair (ZerothOrderClassifier has no argument "
     "'num_pair'); did you mean --model.init_args.num_pairs?"),
    (SGD, "--model.init_args.backbone.init_args.hiden", "[8]",
     "unknown option --model.init_args.backbone.init_args.hiden (MLP has no argument 'hiden'); "
     "did you mean --model.init_args.backbone.init_args.hidden?"),
    (SGD, "--model.init_args.optimizer.init_args.lrr", "0.1",
     "unknown option --model.init_args.optimizer.init_args.lrr (SGD has no argument 'lrr'); "
     "did you mean --model.init_args.optimizer.init_args.lr?"),
    (SGD, "--model.init_args.sigma", "0.1",  # an argument of another method: the valid ones
     "unknown option --model.init_args.sigma (Classifier has no argument 'sigma'); the keys there "
     "are: backbone, optimizer, scheduler, num_classes, seed, deployment, init_from"),
])
def test_a_misspelled_option_is_named_with_the_closest_valid_ones(config, option, value, line,
                                                                  tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _one_error_line(capsys, ["fit", "--config", config, option, value]) == (
        f"robusttrain fit: error: {line}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config, settings, line", [
    (SGD, {"trainer": {"max_epoch": 3}},
     "unknown key trainer.max_epoch in {file}; did you mean trainer.max_epochs?"),
    (SGD, {"trainr": {"max_epochs": 3}},
     "unknown key trainr.max_epochs in {file}; did you mean trainer.max_epochs?"),
    (ZO, {"model": {"init_args": {"sigmaa": 0.1}}},
     "unknown key model.init_args.sigmaa in {file} (ZerothOrderClassifier has no argument "
     "'sigmaa'); did you mean model.init_args.sigma?"),
    (SGD, {"model": {"init_args": {"backbone": {"init_args": {"hiden": [8]}}}}},
     "unknown key model.init_args.backbone.init_args.hiden in {file} (MLP has no argument "
     "'hiden'); did you mean model.init_args.backbone.init_args.hidden?"),
])
def test_a_misspelled_config_key_names_the_file(config, settings, line, tmp_path, monkeypatch,
                                                capsys):
    monkeypatch.chdir(tmp_path)
    extra = tmp_path / "mine.yaml"
    extra.write_text(yaml.safe_dump(settings))
    got = _one_error_line(capsys, ["fit", "--config", config, "--config", str(extra)])
    assert got == f"robusttrain fit: error: {line.format(file=extra)}"


@pytest.mark.parametrize("config, option, value, line", [
    (SGD, "--trainer.max_epochs", "three",
     "option --trainer.max_epochs expects int or null, got 'three'"),
    (ZO, "--model.init_args.num_pairs", "2.5",
     "option --model.init_args.num_pairs expects int, got '2.5'"),
    (ZO, "--model.init_args.sigma", "small",
     "option --model.init_args.sigma expects float, got 'small'"),
    (SGD, "--trainer.enable_progress_bar", "maybe",
     "option --trainer.enable_progress_bar expects bool or null, got 'maybe'"),
    (SGD, "--model", "robusttrain.training.ZerothOrderClasifier",
     "option --model: no class ZerothOrderClasifier in robusttrain.training; did you mean "
     "robusttrain.training.ZerothOrderClassifier"),
])
def test_a_value_of_the_wrong_type_names_the_option_and_the_type(config, option, value, line,
                                                                 tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    got = _one_error_line(capsys, ["fit", "--config", config, option, value])
    assert got.startswith(f"robusttrain fit: error: {line}")


def test_a_value_of_the_wrong_type_in_a_config_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    extra = tmp_path / "mine.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"max_epochs": "three"}}))
    assert _one_error_line(capsys, ["fit", "--config", SGD, "--config", str(extra)]) == (
        f"robusttrain fit: error: key trainer.max_epochs in {extra} expects int or null, got 'three'")


def test_help_is_still_the_full_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ["--trainer.max_epochs", "--checkpoint.monitor", "--divergence.loss_factor",
                   "--ckpt_path", "--model.help"]:
        assert option in out, option
    assert len(out.splitlines()) > 200
    with pytest.raises(SystemExit) as exit_:  # a class's own arguments
        main(["fit", "--model.help", "robusttrain.training.ZerothOrderClassifier"])
    assert exit_.value.code == 0
    assert "--model.num_pairs" in capsys.readouterr().out


@pytest.mark.parametrize("argv, line", [
    (["robustness", "--ckpt", "a.ckpt", "--out", "o", "--levls", "0.1"],
     "robusttrain robustness: error: unknown option --levls; did you mean --levels? (see --help)"),
    (["robustness", "--ckpt", "a.ckpt", "--out", "o", "--lev", "0.1"],  # not abbreviated
     "robusttrain robustness: error: unknown option --lev; did you mean --levels? (see --help)"),
    (["attack", "--ckpt", "a.ckpt", "--out", "o", "--max-querys", "10"],
     "robusttrain attack: error: unknown option --max-querys; did you mean --max-queries? "
     "(see --help)"),
    (["meta-train", "--ckpt", "a.ckpt", "--out", "o.pt", "--episode", "3"],
     "robusttrain meta-train: error: unknown option --episode; did you mean --episodes? "
     "(see --help)"),
    (["compare", "--config", "c.yaml", "--ouput", "o"],
     "robusttrain compare: error: unknown option --ouput; did you mean --out? (see --help)"),
    (["compare", "--config", "c.yaml", "--seeds", "3"],
     "robusttrain compare: error: unknown option --seeds; the options are --config, --out, "
     "--device (see --help)"),
])
def test_the_other_commands_name_a_misspelled_option_too(argv, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _one_error_line(capsys, argv) == line
