"""The ``robusttrain`` command through its entry point: every config in configs/ runs a tiny fit
(checkpoints and configs are written), ``--help`` lists every subcommand, bad input ends in one
line, and ``test`` of a run's checkpoint logs beside that run."""

import gzip
import importlib.util
from pathlib import Path

import pytest
import yaml

from robusttrain.commands.main import SUBCOMMANDS, main
from robusttrain.training import load_checkpoint, make_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]


def _needs(dataset_class: str, require_data) -> Path:
    key = {"MNISTDataModule": "mnist", "FashionMNISTDataModule": "fashion_mnist",
           "CIFAR10DataModule": "cifar10"}[dataset_class.rsplit(".", 1)[-1]]
    return require_data(key)


def test_there_are_configs_for_every_dataset_and_method():
    names = {c.stem for c in CONFIGS}
    for required in ["fashion_mlp_sgd", "mnist_mlp_sgd", "fashion_cnn_sgd", "cifar10_resnet20_sgd",
                     "fashion_mlp_zo_momentum", "fashion_mlp_zo_nesterov", "fashion_cnn_zo_nesterov",
                     "mnist_mlp_zo_nesterov", "cifar10_resnet20_zo_nesterov", "fashion_mlp_zo_lowrank",
                     "mnist_mlp_zo_lowrank", "fashion_cnn_zo_lowrank", "mnist_cnn_zo_lowrank",
                     "cifar10_resnet20_zo_lowrank"]:
        assert required in names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_a_tiny_fit(config, tmp_path, monkeypatch, require_data):
    raw = yaml.safe_load(config.read_text())
    if (raw["model"]["class_path"].endswith("HardwareAwareClassifier")
            and importlib.util.find_spec("aihwkit_lightning") is None):
        pytest.skip("hwa needs the analog extra: pip install 'robusttrain[analog]'")
    root = _needs(raw["data"]["class_path"], require_data)
    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--config", str(config),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "64",
        "--data.init_args.data_dir", str(root),
    ]
    if "num_pairs" in raw["model"]["init_args"]:
        args += ["--model.init_args.num_pairs", "2"]
    main(args)
    run = tmp_path / "runs" / config.stem / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["class_path"] == raw["model"]["class_path"]
    metrics = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in metrics and "val/acc" in metrics
    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert loaded.meta["backbone"]["class_path"] == raw["model"]["init_args"]["backbone"][
        "class_path"]
    assert (run / "checkpoints" / "best.ckpt").is_file()


def test_test_subcommand_reports_test_accuracy(tmp_path, monkeypatch, fashion_dir):
    root = fashion_dir
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "fashion_mlp_sgd.yaml"
    common = ["--config", str(config), "--data.init_args.data_dir", str(root),
              "--trainer.enable_progress_bar", "false"]
    main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "20",
          "--trainer.limit_val_batches", "1"])
    ckpt = tmp_path / "runs" / "fashion_mlp_sgd" / "version_0" / "checkpoints" / "last.ckpt"
    cli = make_cli(["test", *common, "--ckpt_path", str(ckpt)], run=True)
    acc = float(cli.trainer.callback_metrics["test/acc"])
    # 20 SGD steps already lift a 10-class problem far above chance (0.1)
    assert 0.4 < acc <= 1.0


def test_bad_config_value_is_a_clear_error(tmp_path, monkeypatch, capsys):
    # more in tests/test_cli_errors.py
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "fashion_mlp_zo_nesterov.yaml"
    line = _fails_in_one_line(capsys, ["fit", "--config", str(config),
                                       "--model.init_args.num_pairs", "many"])
    assert line == ("robusttrain fit: error: option --model.init_args.num_pairs expects int, got "
                    "'many'")


def test_environment_does_not_leak_shared_paths():
    # the package must not know where the test data lives
    package = ROOT / "robusttrain"
    for source in package.rglob("*.py"):
        assert "shared/data" not in source.read_text(), source


# ----- robusttrain --help ----------------------------------------------------------------------
def test_help_lists_every_subcommand_with_its_description(capsys):
    assert main(["--help"]) == 0
    rows = {line.split(None, 1)[0]: line.split(None, 1)[1]
            for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert list(SUBCOMMANDS) == ["fit", "validate", "test", "predict", "robustness", "compare",
                                "attack", "meta-train"]
    for name, text in SUBCOMMANDS.items():
        assert rows[name] == text, name


def test_unknown_subcommand_is_one_line(capsys):
    line = _fails_in_one_line(capsys, ["tset"])
    assert "'tset'" in line and "robustness, compare" in line


# ----- bad input ends in one line, exit code 2, no traceback ------------------------------------
def _fails_in_one_line(capsys, argv: list[str]) -> str:
    """Run ``robusttrain *argv``; it must exit with 2 after one error line and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def _tiny_mnist_args(data_dir: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "mnist_mlp_sgd.yaml"), *TINY,
            "--data.init_args.data_dir", str(data_dir), "--data.init_args.val_size", "16",
            "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "16"]


@pytest.mark.parametrize("option, value, section, message", [
    ("model.init_args.sigma", "-1", "model.init_args (ZerothOrderClassifier)",
     "sigma must be a positive number, got -1.0"),
    ("model.init_args.num_pairs", "0", "model.init_args (ZerothOrderClassifier)",
     "num_pairs must be an integer >= 1, got 0"),
    ("model.init_args.level", "0.05", "model.init_args (ZerothOrderClassifier)",
     "level=0.05 needs a noise model: set noise to one of"),
    ("model.init_args.backbone.init_args.dropout", "1.5", "model.init_args.backbone.init_args (MLP)",
     "dropout must be in [0, 1), got 1.5"),
    ("data.init_args.batch_size", "0", "data.init_args (FashionMNISTDataModule)",
     "batch_size must be an integer >= 1, got 0"),
])
def test_bad_argument_names_its_section_and_parameter(option, value, section, message, tmp_path,
                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "fashion_mlp_zo_nesterov.yaml"
    line = _fails_in_one_line(capsys, ["fit", "--config", str(config), f"--{option}", value])
    assert line.startswith(f"robusttrain fit: error: {section}: ")
    assert message in line


def test_a_data_setting_checked_against_the_files_is_one_line(tiny_mnist, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.chdir(tmp_path)
    args = [*_tiny_mnist_args(tiny_mnist), "--data.init_args.val_size", "100000"]
    line = _fails_in_one_line(capsys, ["fit", *args])
    assert line.startswith("robusttrain fit: error: data.init_args (MNISTDataModule): ")
    assert "val_size=100000 leaves no training images" in line


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_dataset_file_is_named(damage, tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if damage == "missing":
        named = tiny_mnist / "t10k-labels-idx1-ubyte"
        named.unlink()
    else:
        named = tiny_mnist / "train-images-idx3-ubyte.gz"
        raw = tiny_mnist / "train-images-idx3-ubyte"
        named.write_bytes(gzip.compress(raw.read_bytes())[:100])
        raw.unlink()
    line = _fails_in_one_line(capsys, ["fit", *_tiny_mnist_args(tiny_mnist)])
    assert line.startswith("robusttrain fit: error: ")
    assert (named.name if damage == "missing" else str(named)) in line
    assert ("data_dir" if damage == "missing" else "get it again") in line


def test_missing_checkpoint_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "runs" / "x" / "version_0" / "checkpoints" / "last.ckpt"
    line = _fails_in_one_line(capsys, ["test", "--config", str(ROOT / "configs" / "mnist_mlp_sgd.yaml"),
                                       "--ckpt_path", str(missing)])
    assert line.startswith(f"robusttrain test: error: --ckpt_path {missing} is not a file; ")


def test_diverging_training_says_what_to_lower(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # without the divergence guard's limits (tests/test_divergence.py), the loss's own check
    line = _fails_in_one_line(capsys, ["fit", *_tiny_mnist_args(tiny_mnist),
                                       "--model.init_args.optimizer.init_args.lr", "1e30",
                                       "--divergence.weight_factor", "null",
                                       "--divergence.loss_factor", "null"])
    assert line.startswith("robusttrain fit: error: training loss became ")
    assert "lower the learning rate" in line


def test_bad_comparison_config_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    line = _fails_in_one_line(capsys, ["compare", "--config", str(missing)])
    assert line == f"robusttrain compare: error: comparison config {missing} does not exist"


def test_other_errors_keep_their_traceback(tiny_mnist, tmp_path, monkeypatch):
    # a ValueError that robusttrain's own argument checks did not raise is not anticipated input
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        main(["fit", *_tiny_mnist_args(tiny_mnist), "--model.init_args.optimizer.init_args.lr", "-1"])


# ----- test and validate log beside the fit run ------------------------------------------------
def test_test_and_validate_of_a_runs_checkpoint_log_into_that_run(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _tiny_mnist_args(tiny_mnist)
    assert main(["fit", *args]) == 0
    run = tmp_path / "runs" / "mnist_mlp_sgd" / "version_0"
    fit_files = {name: (run / name).read_bytes() for name in ["config.yaml", "metrics.csv"]}
    assert main(["test", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert main(["validate", *args, "--ckpt_path", str(run / "checkpoints" / "best.ckpt")]) == 0

    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # no version of their own
    assert {name: (run / name).read_bytes() for name in fit_files} == fit_files
    for folder, metric in [("test_last", "test/acc"), ("validate_best", "val/acc")]:
        assert metric in (run / folder / "metrics.csv").read_text().splitlines()[0].split(",")
        saved = yaml.safe_load((run / folder / "config.yaml").read_text())
        assert saved["ckpt_path"].endswith(f"{folder.split('_')[1]}.ckpt")
