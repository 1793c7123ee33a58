"""A normal run prints no warnings: the console carries progress and results, nothing to ignore.

Each test runs the real ``robusttrain`` command in a fresh process (with Python's default warning
filters, as a user's shell has them) on a tiny dataset and looks for any line Python's ``warnings``
module prints (``path:line: SomethingWarning: message``).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# what warnings.showwarning prints: "<file>:<line>: <Category>: <message>"
WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ", re.MULTILINE)

TINY_TRAINER = {"max_epochs": 1, "log_every_n_steps": 1}
TINY_BACKBONE = {"class_path": "robusttrain.models.MLP",
                 "init_args": {"in_features": 784, "hidden": [8], "num_classes": 10}}


def _tiny_data(data_dir: Path) -> dict:
    return {"class_path": "robusttrain.data.MNISTDataModule",
            "init_args": {"data_dir": str(data_dir), "batch_size": 16, "val_size": 16}}


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "robusttrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _warnings(result: subprocess.CompletedProcess) -> list[str]:
    text = result.stdout + result.stderr
    return [line for line in text.splitlines() if WARNING_LINE.match(line)]


def test_the_pattern_finds_a_warning_as_python_prints_it(tmp_path):
    # the check below would pass vacuously if the pattern missed the format of a real warning
    script = "import warnings; warnings.warn('look at me', UserWarning)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert _warnings(result) and "look at me" in _warnings(result)[0]


def test_a_tiny_compare_prints_no_warning(tmp_path, tiny_mnist):
    config = {
        "name": "quiet",
        "seeds": [0],
        "trainer": TINY_TRAINER,
        "data": _tiny_data(tiny_mnist),
        "backbone": TINY_BACKBONE,
        "methods": {
            "sgd": {"model": {"class_path": "robusttrain.training.Classifier"}},
            "zo": {"model": {"class_path": "robusttrain.training.ZerothOrderClassifier",
                             "init_args": {"num_pairs": 2}},
                   "sigmas": [0.01]},
        },
        "robustness": {"noise": "relative", "levels": [0, 0.1], "draws": 2, "seed": 0},
    }
    path = tmp_path / "quiet.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _run(tmp_path, "compare", "--config", str(path), "--out", str(tmp_path / "results"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Results in" in result.stdout  # it ran to the end
    assert _warnings(result) == []


def test_a_fit_prints_no_warning(tmp_path, tiny_mnist):
    config = {"model": {"class_path": "robusttrain.training.Classifier",
                        "init_args": {"backbone": TINY_BACKBONE}},
              "data": _tiny_data(tiny_mnist), "trainer": TINY_TRAINER}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _run(tmp_path, "fit", "--config", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs").is_dir()
    assert _warnings(result) == []
