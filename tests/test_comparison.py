"""The comparison driver on a tiny budget: a complete report that matches the CSV, and resuming."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from robusttrain.commands.compare import main
from robusttrain.comparison import CompareConfigError, load_config, run_comparison, runner

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, data_dir: Path) -> Path:
    cfg = {
        "name": "tiny",
        "seeds": [0],
        "trainer": {"max_epochs": 1, "limit_train_batches": 20, "limit_val_batches": 2},
        "data": {
            "class_path": "robusttrain.data.FashionMNISTDataModule",
            "init_args": {"data_dir": str(data_dir), "batch_size": 64, "train_subset": 2000},
        },
        "backbone": {"class_path": "robusttrain.models.MLP",
                     "init_args": {"in_features": 784, "hidden": [32], "num_classes": 10}},
        "methods": {
            "sgd": {"model": {"class_path": "robusttrain.training.Classifier"},
                    "optimizer": {"class_path": "torch.optim.SGD",
                                  "init_args": {"lr": 0.05, "momentum": 0.9}}},
            "zo": {"model": {"class_path": "robusttrain.training.ZerothOrderClassifier",
                             "init_args": {"num_pairs": 4}},
                   "optimizer": {"class_path": "torch.optim.SGD",
                                 "init_args": {"lr": 0.001, "momentum": 0.9, "nesterov": True}},
                   "sigmas": [0.01]},
        },
        "robustness": {"noise": "relative", "levels": [0, 0.1, 0.5], "draws": 3, "seed": 0,
                       "max_images": 2000},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def fashion_dir(data_roots):
    if data_roots["fashion_mnist"] is None:
        pytest.skip("Fashion-MNIST not found: apt-get install dataset-fashion-mnist")
    return data_roots["fashion_mnist"]


@pytest.mark.slow
def test_tiny_comparison_report_matches_csv_and_resumes(tmp_path, fashion_dir, monkeypatch):
    cfg = load_config(tiny_config(tmp_path, fashion_dir))
    out = tmp_path / "out"
    report = run_comparison(cfg, out).read_text()
    for name in ["report.md", "robustness.csv", "summary.json", "robustness.png", "frontier.png",
                 "comparison.json"]:
        assert (out / name).is_file(), name
    with (out / "robustness.csv").open() as f:
        rows = list(csv.DictReader(f))
    # 2 models x (level 0 once + 2 levels x 3 draws)
    assert len(rows) == 2 * (1 + 2 * 3)
    for label, method in [("sgd seed0", "sgd"), ("zo σ=0.01 seed0", "zo")]:
        for level in ["0.1", "0.5"]:
            accs = [float(r["accuracy"]) for r in rows
                    if r["model"] == label and float(r["level"]) == float(level)]
            assert len(accs) == 3
            line = next(ln for ln in report.splitlines() if ln.startswith(f"| {method} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            column = {"0.1": 3, "0.5": 4}[level]
            assert float(cells[column]) == pytest.approx(100 * np.mean(accs), abs=0.006)
    assert re.search(r"Reproduce: `robusttrain compare", report)

    # a second call trains nothing: every run has its result.json
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("robusttrain.comparison.runner.make_cli", no_training)
    again = run_comparison(cfg, out).read_text()
    assert again.split("## Units")[0].count("|") == report.split("## Units")[0].count("|")


@pytest.mark.slow
def test_interrupted_run_resumes_from_last_checkpoint(tmp_path, fashion_dir, monkeypatch):
    cfg = load_config(tiny_config(tmp_path, fashion_dir))
    cfg.methods = cfg.methods[:1]
    cfg.trainer["max_epochs"] = 2
    out = tmp_path / "out"
    method = cfg.methods[0]
    # first attempt: stops after one epoch, as if interrupted (no result.json written)
    cfg.trainer["max_epochs"] = 1
    runner.train_run(cfg, method, None, 0, out)
    run_dir = out / "runs" / "sgd" / "seed0"
    (run_dir / "result.json").unlink()
    cfg.trainer["max_epochs"] = 2
    seen = {}
    real_fit_args = runner._fit_args

    def spy(*args, **kwargs):
        fit = real_fit_args(*args, **kwargs)
        seen["ckpt_path"] = fit.get("ckpt_path")
        return fit

    monkeypatch.setattr(runner, "_fit_args", spy)
    result = runner.train_run(cfg, method, None, 0, out)
    assert seen["ckpt_path"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert result["steps"] == 2 * 20  # the second epoch only added its 20 steps


@pytest.mark.slow
def test_cifar_comparison_config_on_a_slice_of_real_cifar(tmp_path, data_roots):
    if data_roots["cifar10"] is None:
        pytest.skip("CIFAR-10 files not found (set ROBUSTTRAIN_TEST_DATA)")
    raw = yaml.safe_load((ROOT / "experiments" / "cifar10_resnet20.yaml").read_text())
    raw["seeds"] = [0]
    raw["trainer"] = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1}
    raw["data"]["init_args"].update(data_dir=str(data_roots["cifar10"]), batch_size=8,
                                    eval_batch_size=64, train_subset=64)
    raw["methods"] = {k: raw["methods"][k] for k in ["sgd_momentum", "zo_nesterov"]}
    raw["methods"]["zo_nesterov"]["sigmas"] = [0.01]
    raw["methods"]["zo_nesterov"]["model"]["init_args"]["num_pairs"] = 2
    raw["robustness"].update(levels=[0, 0.1], draws=2, max_images=64)
    path = tmp_path / "cifar.yaml"
    path.write_text(yaml.safe_dump(raw))
    report = run_comparison(load_config(path), tmp_path / "out").read_text()
    assert "| sgd_momentum |" in report and "| zo_nesterov | 0.01 |" in report


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("methods"), "missing 'methods:'"),
        (lambda c: c.update(seeds=[]), "'seeds' must be a non-empty list"),
        (lambda c: c.update(seeds=[0, 0]), "duplicates"),
        (lambda c: c["methods"]["zo"].update(sigmas=[0.0]), "positive numbers"),
        (lambda c: c["methods"]["zo"].pop("model"), "needs 'model:'"),
        (lambda c: c["robustness"].update(draws=0), "draws"),
        (lambda c: c["robustness"].update(levels=[0, -0.1]), "levels"),
    ],
)
def test_bad_comparison_config_is_one_clear_error(tmp_path, change, message, capsys):
    path = tiny_config(tmp_path, tmp_path)
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CompareConfigError, match=re.escape(message)):
        load_config(path)
    assert main(["--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_committed_comparison_configs_parse():
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        cfg = load_config(path)
        assert len(cfg.methods) >= 2, path
        assert all(m.model["class_path"].startswith("robusttrain.training.") for m in cfg.methods)
    full = load_config(ROOT / "experiments" / "fashion_mlp.yaml")
    assert len(full.seeds) >= 3
    swept = [m for m in full.methods if m.sigmas and len(m.sigmas) >= 3]
    assert {m.model["class_path"].rsplit(".", 1)[-1] for m in swept} == {
        "ZerothOrderClassifier", "NoiseInjectionClassifier"}
