"""Every config in configs/ runs a tiny fit through the real CLI; checkpoints and configs are written."""

from pathlib import Path

import pytest
import yaml

from robusttrain.commands.main import main
from robusttrain.training import load_checkpoint, make_cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _needs(dataset_class: str, data_roots: dict[str, Path | None]) -> Path | None:
    key = {"MNISTDataModule": "mnist", "FashionMNISTDataModule": "fashion_mnist",
           "CIFAR10DataModule": "cifar10"}[dataset_class.rsplit(".", 1)[-1]]
    root = data_roots[key]
    if root is None:
        pytest.skip(f"{key} files not found (set ROBUSTTRAIN_TEST_DATA or install "
                    "dataset-fashion-mnist)")
    return root


def test_there_are_configs_for_every_dataset_and_method():
    names = {c.stem for c in CONFIGS}
    for required in ["fashion_mlp_sgd", "mnist_mlp_sgd", "fashion_cnn_sgd", "cifar10_resnet20_sgd",
                     "fashion_mlp_zo_momentum", "fashion_mlp_zo_nesterov", "fashion_cnn_zo_nesterov",
                     "mnist_mlp_zo_nesterov", "cifar10_resnet20_zo_nesterov", "fashion_mlp_zo_lowrank",
                     "mnist_mlp_zo_lowrank", "fashion_cnn_zo_lowrank", "mnist_cnn_zo_lowrank",
                     "cifar10_resnet20_zo_lowrank"]:
        assert required in names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_a_tiny_fit(config, tmp_path, monkeypatch, data_roots):
    raw = yaml.safe_load(config.read_text())
    root = _needs(raw["data"]["class_path"], data_roots)
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


def test_test_subcommand_reports_test_accuracy(tmp_path, monkeypatch, data_roots):
    root = _needs("FashionMNISTDataModule", data_roots)
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "fashion_mlp_sgd.yaml"
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
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "fashion_mlp_zo_nesterov.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.init_args.num_pairs", "many"])
    assert "num_pairs" in capsys.readouterr().err


def test_environment_does_not_leak_shared_paths():
    # the package must not know where the test data lives
    package = Path(__file__).resolve().parents[1] / "robusttrain"
    for source in package.rglob("*.py"):
        assert "shared/data" not in source.read_text(), source
