"""The deployment comparison on a tiny budget: which model stands for which target, fine-tuning
starts, a report that matches its CSV, reuse of finished runs, and clear config errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from robusttrain.commands.compare import main
from robusttrain.comparison import CompareConfigError, load_deployment_config, run_deployment_comparison
from robusttrain.comparison.deployment import is_deployment_config
from robusttrain.noise.deployment import parse_deployment

ROOT = Path(__file__).resolve().parents[1]
INT2 = [{"kind": "quantize", "bits": 2, "per_channel": True, "clip": 2.5}]
INT2_NOISY = INT2 + [{"kind": "stuck_at", "p": 0.05},
                     {"kind": "read_noise", "noise": "relative", "level": 0.05}]


def tiny_config(tmp_path: Path, data_dir: Path) -> Path:
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}
    cfg = {
        "name": "tiny_deployment",
        "seeds": [0],
        "trainer": {"max_epochs": 1, "limit_train_batches": 8, "limit_val_batches": 2},
        "data": {"class_path": "robusttrain.data.FashionMNISTDataModule",
                 "init_args": {"data_dir": str(data_dir), "batch_size": 64, "train_subset": 1000}},
        "backbone": {"class_path": "robusttrain.models.MLP",
                     "init_args": {"in_features": 784, "hidden": [16], "num_classes": 10}},
        "deployments": {"int2": INT2, "int2_noisy": INT2_NOISY},
        "methods": {
            "sgd": {"model": {"class_path": "robusttrain.training.Classifier"}, "optimizer": sgd},
            "qat": {"model": {"class_path": "robusttrain.training.QuantizationAwareClassifier"},
                    "optimizer": sgd, "init_from": "sgd", "trainer": {"limit_train_batches": 4},
                    "train_through": {"int2": "int2", "int2_noisy": "int2"}},
            "zo": {"model": {"class_path": "robusttrain.training.ZerothOrderClassifier",
                             "init_args": {"num_pairs": 2, "noise": "relative", "level": 0.1}},
                   "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0001}},
                   "init_from": "sgd", "train_through": "target",
                   "trainer": {"limit_train_batches": 3}},
        },
        "evaluation": {"device_draws": 2, "inference_draws": 2, "seed": 0, "max_images": 500},
    }
    path = tmp_path / "tiny_deployment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
def test_tiny_deployment_comparison(tmp_path, fashion_dir, monkeypatch):
    cfg = load_deployment_config(tiny_config(tmp_path, fashion_dir))
    out = tmp_path / "out"
    report = run_deployment_comparison(cfg, out).read_text()
    for name in ["report.md", "deployment.csv", "comparison.json", "deployment.png"]:
        assert (out / name).is_file(), name

    # one float sgd model, one qat model (through int2) standing for both targets, one zo per target
    runs = sorted(p.parent.relative_to(out / "runs").as_posix()
                  for p in (out / "runs").rglob("result.json"))
    assert runs == ["qat/int2/seed0", "sgd/float/seed0", "zo/int2/seed0", "zo/int2_noisy/seed0"]
    zo_fit = yaml.safe_load((out / "runs/zo/int2_noisy/seed0/fit_config.yaml").read_text())
    assert zo_fit["model"]["init_args"]["deployment"] == parse_deployment(INT2_NOISY).to_list()
    start = out / "runs/sgd/float/seed0/checkpoints/last.ckpt"
    assert zo_fit["model"]["init_args"]["init_from"] == str(start)

    with (out / "deployment.csv").open() as f:
        rows = list(csv.DictReader(f))
    # int2 is deterministic: one draw per model; int2_noisy: 2 chips x 2 read-noise runs
    assert len(rows) == 3 * 1 + 3 * 4
    summary = json.loads((out / "comparison.json").read_text())
    results = {r: json.loads((out / "runs" / r / "result.json").read_text()) for r in runs}
    for entry in summary["entries"]:
        accs = [float(r["accuracy"]) for r in rows
                if r["target"] == entry["target"] and r["model"] == f"{entry['method']} seed0"]
        assert entry["mean"] == pytest.approx(np.mean(accs), abs=1e-12)
        line = next(ln for ln in report.splitlines() if ln.startswith(f"| {entry['method']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        column = 2 + list(cfg.deployments).index(entry["target"])
        assert cells[column].startswith(f"{100 * np.mean(accs):.2f} ±")
        if entry["method"] != "sgd":  # the cost of a fine-tuned model includes its start
            own = results[f"{entry['method']}/{entry['trained_through']}/seed0"]["wall_time_s"]
            assert entry["wall_time_s"] == pytest.approx(
                own + results["sgd/float/seed0"]["wall_time_s"])
    # the same float model is behind both sgd cells and the same qat model behind both qat cells
    for method in ("sgd", "qat"):
        floats = {e["target"]: e["float_mean"] for e in summary["entries"] if e["method"] == method}
        assert floats["int2"] == floats["int2_noisy"]
    assert re.search(r"Reproduce: `robusttrain compare", report)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("robusttrain.comparison.runner.make_cli", no_training)
    assert run_deployment_comparison(cfg, out).read_text().split("This call took")[1].split(
        "\n", 1)[1] == report.split("This call took")[1].split("\n", 1)[1]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["methods"]["qat"].update(train_through={"int3": "int2"}),
         "train_through names 'int3', which is not in deployments (int2, int2_noisy)"),
        (lambda c: c["methods"]["qat"].update(init_from="zo"), "must name a method listed before it"),
        (lambda c: c["methods"]["zo"].update(init_from="qat"), "must be a float method"),
        (lambda c: c["methods"]["zo"]["model"]["init_args"].update(deployment="int4"),
         "set the deployment with 'train_through'"),
        (lambda c: c["deployments"].update(int5="int5"), "deployment 'int5': deployment 'int5' is "
                                                         "neither a preset"),
        (lambda c: c["evaluation"].update(device_draws=0), "evaluation.device_draws must be"),
        (lambda c: c.update(robustness={}), "unknown entries robustness"),
        (lambda c: c["methods"]["zo"].update(train_through="each"), "train_through must be null"),
    ],
)
def test_bad_deployment_comparison_config_is_one_clear_error(tmp_path, change, message, capsys):
    path = tiny_config(tmp_path, tmp_path)
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(CompareConfigError, match=re.escape(message)):
        load_deployment_config(path)
    assert main(["--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_committed_deployment_comparison_configs_parse():
    paths = [p for p in sorted((ROOT / "experiments").glob("*.yaml")) if is_deployment_config(p)]
    assert paths
    for path in paths:
        cfg = load_deployment_config(path)
        assert len(cfg.seeds) >= 3
        classes = {m.model["class_path"].rsplit(".", 1)[-1] for m in cfg.methods}
        assert {"Classifier", "QuantizationAwareClassifier", "ZerothOrderClassifier"} <= classes
