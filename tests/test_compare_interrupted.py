"""A comparison killed at any stage picks up where it stopped and ends with the uninterrupted report.

The process test runs real ``robusttrain compare`` processes on a tiny fake MNIST and kills them
with SIGKILL (tests/compare_killer.py) at each stage: during the training of the second run, after
all training and before any evaluation, and after the first model's evaluation was written. Each
kill is followed by a rerun of the same command that checks what the killed call left and what it
redoes; to keep the file short, the reruns after the first two kills are themselves the victims of
the next kill, which comes after everything they check (the kills only wrap functions at stage
boundaries: they change nothing before them). The last rerun runs to the end, and its results equal
those of a comparison that was never interrupted, run in another folder (in the test's process,
while the first child runs): byte for byte, but for the wall times.

The other tests check, in process, what invalidates a kept evaluation, and that the deployment
comparison keeps its evaluations too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robusttrain.commands.compare import main as compare
from robusttrain.comparison import deployment as deployment_comparison
from robusttrain.comparison import load_deployment_config, run_deployment_comparison, runner
from robusttrain.comparison.evaluation_cache import tensor_digest
from robusttrain.models import MLP

TESTS = Path(__file__).parent

# three runs of 2 epochs × 3 steps (48 training images in batches of 16); last.ckpt after each epoch
RUNS = {"sgd": "sgd/seed0", "zo σ=0.01": "zo/sigma0.01/seed0", "zo σ=0.1": "zo/sigma0.1/seed0"}
KILL_AT_STEP = 4  # in the second epoch of the second run: it resumes from its step-3 last.ckpt
OUTPUTS = ["robustness.csv", "summary.json", "robustness.png", "frontier.png"]


def _config(folder: Path, data_dir: Path) -> None:
    folder.mkdir()
    config = {
        "name": "tiny",
        "seeds": [0],
        "trainer": {"max_epochs": 2, "limit_val_batches": 1},
        "data": {"class_path": "robusttrain.data.MNISTDataModule",
                 "init_args": {"data_dir": str(data_dir), "batch_size": 16, "val_size": 16}},
        "backbone": {"class_path": "robusttrain.models.MLP",
                     "init_args": {"in_features": 784, "hidden": [8], "num_classes": 10}},
        "methods": {
            "sgd": {"model": {"class_path": "robusttrain.training.Classifier"},
                    "optimizer": {"class_path": "torch.optim.SGD",
                                  "init_args": {"lr": 0.05, "momentum": 0.9}}},
            "zo": {"model": {"class_path": "robusttrain.training.ZerothOrderClassifier",
                             "init_args": {"num_pairs": 2}},
                   "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.001}},
                   "sigmas": [0.01, 0.1]},
        },
        "robustness": {"noise": "relative", "levels": [0, 0.1, 0.5], "draws": 3, "seed": 0},
    }
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))


def _start(folder: Path, stage: str | None = None) -> subprocess.Popen:
    """``robusttrain compare --config tiny.yaml --out out`` in ``folder``, killed at ``stage``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["compare", "--config", "tiny.yaml", "--out", "out"]
    command = ([sys.executable, str(TESTS / "compare_killer.py"), stage, *args] if stage
               else [sys.executable, "-m", "robusttrain", *args])
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, returncode: int) -> list[str]:
    """The ``[compare]`` lines the process printed, once it ended with ``returncode``."""
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == returncode, stderr[-3000:]
    return [line.removeprefix("[compare] ") for line in stdout.splitlines()
            if line.startswith("[compare] ")]


def _run(folder: Path, stage: str | None = None) -> list[str]:
    return _finish(_start(folder, stage), 0 if stage is None else -signal.SIGKILL)


def _trained(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("training ", "resuming "))]


def _evaluated(lines: list[str]) -> list[str]:
    return [line.split(" under ")[0] for line in lines if line.startswith("evaluating ")]


def _stamps(paths: list[Path]) -> dict[Path, tuple[int, bytes]]:
    """(mtime in ns, content) of each file: a file written again, even with the same bytes, shows."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


def _run_files(out: Path, runs: list[str]) -> list[Path]:
    return [out / "runs" / RUNS[r] / name for r in runs
            for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "result.json")]


def _kept(out: Path, run: str) -> Path:
    return out / "runs" / RUNS[run] / "evaluations" / "robustness_relative.json"


def _without_wall_times(report: str) -> str:
    report = re.sub(r"\d+\.\d min", "… min", report)  # the wall time of the comparison
    return re.sub(r"\| \d+ s \|", "| … s |", report)  # the wall time per run


@pytest.mark.slow
def test_compare_killed_at_every_stage_ends_with_the_uninterrupted_report(
    tmp_path, tiny_mnist, monkeypatch
):
    reference, work = tmp_path / "reference", tmp_path / "work"
    _config(reference, tiny_mnist)
    _config(work, tiny_mnist)
    out = work / "out"

    # (i) killed in the second epoch of the second run; meanwhile the uninterrupted comparison
    # runs in this process, as the children do (one thread; the same command, relative paths)
    killed = _start(work, f"train:2:{KILL_AT_STEP}")
    monkeypatch.chdir(reference)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert compare(["--config", "tiny.yaml", "--out", "out"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = _finish(killed, -signal.SIGKILL)
    assert _trained(lines) == ["training sgd seed 0", "training zo σ=0.01 seed 0"]
    assert not (out / "runs" / RUNS["zo σ=0.01"] / "result.json").exists()
    last = torch.load(out / "runs" / RUNS["zo σ=0.01"] / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=False)
    assert last["global_step"] == 3  # the end of its first epoch
    finished = _stamps(_run_files(out, ["sgd"]))

    # rerun: the finished run is reused, the killed one resumes from its last.ckpt, the third
    # is trained; (ii) killed after all training, before the first evaluation
    lines = _run(work, "evaluate:1")
    assert _trained(lines) == ["resuming zo σ=0.01 seed 0", "training zo σ=0.1 seed 0"]
    assert _stamps(finished) == finished
    resumed = json.loads((out / "runs" / RUNS["zo σ=0.01"] / "result.json").read_text())
    assert resumed["steps"] == 6
    assert not list(out.glob("runs/**/evaluations/*"))
    trained = _stamps(_run_files(out, list(RUNS)))

    # rerun: nothing is trained; (iii) killed after the first model's evaluation was written
    lines = _run(work, "evaluate:2")
    assert _trained(lines) == [] and _stamps(trained) == trained
    # (the second evaluation announces itself, then the process dies)
    assert _evaluated(lines) == ["evaluating sgd seed0", "evaluating zo σ=0.01 seed0"]
    assert sorted(out.glob("runs/**/evaluations/*")) == [_kept(out, "sgd")]
    evaluated = _stamps([_kept(out, "sgd")])

    # rerun to the end: nothing trained, the kept evaluation reused, the two others evaluated
    lines = _run(work)
    assert _trained(lines) == [] and _stamps(trained) == trained
    assert _stamps(evaluated) == evaluated
    assert _evaluated(lines) == ["evaluating zo σ=0.01 seed0", "evaluating zo σ=0.1 seed0"]
    assert [line for line in lines if line.startswith("reusing")] == [
        "reusing the relative-noise evaluation of sgd seed0 "
        "(runs/sgd/seed0/evaluations/robustness_relative.json)"]

    want = reference / "out"
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (want / name).read_bytes(), name
    assert _without_wall_times((out / "report.md").read_text()) == _without_wall_times(
        (want / "report.md").read_text())
    entries = [json.loads((folder / "comparison.json").read_text()) for folder in (out, want)]
    for entry in entries[0] + entries[1]:
        entry.pop("wall_time_s")
    assert entries[0] == entries[1]


def _two_models(tmp_path: Path) -> tuple[list[dict], dict[str, torch.nn.Module]]:
    """Two tiny MLPs, each with a stand-in checkpoint file (only its bytes matter here)."""
    results, models = [], {}
    for i, name in enumerate(["a seed0", "b seed0"]):
        torch.manual_seed(i)
        models[name] = MLP(in_features=4, hidden=[8], num_classes=3)
        checkpoint = tmp_path / "runs" / name[0] / "seed0" / "checkpoints" / "last.ckpt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(name.encode())
        results.append({"key": name, "checkpoint": str(checkpoint.relative_to(tmp_path))})
    return results, models


def _same(a, b) -> bool:
    """Equal as JSON (NaN equal to NaN)."""
    return json.dumps(a) == json.dumps(b)


def test_kept_evaluation_is_reused_until_its_checkpoint_data_or_settings_change(
    tmp_path, monkeypatch
):
    results, models = _two_models(tmp_path)
    x, y = torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 3
    settings = {"noise": "relative", "levels": [0.0, 0.1, 0.5], "draws": 2, "seed": 0}
    calls: list[list[str]] = []
    real = runner.evaluate_models

    def counted(models, *args, **kwargs):
        calls.append(list(models))
        return real(models, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_models", counted)

    def evaluate(x=x, y=y, **changes):
        calls.clear()
        return runner._evaluate_runs(results, models, x, y, tmp_path, tensor_digest(x, y),
                                     **{**settings, **changes})

    first = evaluate()
    assert calls == [["a seed0"], ["b seed0"]]  # one model at a time
    # the same as one evaluation of all the models
    direct = real(models, x, y, progress=False, **settings)
    for field in ("rows", "summaries", "settings"):
        assert _same(getattr(first, field), getattr(direct, field)), field

    again = evaluate()
    assert calls == []
    for field in ("rows", "summaries", "settings"):
        assert _same(getattr(again, field), getattr(first, field)), field

    for change in ({"draws": 3}, {"seed": 1}, {"levels": [0.0, 0.2]}):
        evaluate(**change)
        assert calls == [["a seed0"], ["b seed0"]], change
    evaluate()  # back to the first settings: each run keeps one evaluation per noise model
    assert calls == [["a seed0"], ["b seed0"]]

    # a retrained checkpoint: that model only
    (tmp_path / results[1]["checkpoint"]).write_bytes(b"retrained")
    evaluate()
    assert calls == [["b seed0"]]
    # other test data (another max_images, another dataset): every model
    evaluate(x=x[:20], y=y[:20])
    assert calls == [["a seed0"], ["b seed0"]]
    # a kept file that does not parse is evaluated again
    kept = tmp_path / "runs" / "a" / "seed0" / "evaluations" / "robustness_relative.json"
    kept.write_text("{")
    evaluate(x=x[:20], y=y[:20])
    assert calls == [["a seed0"]]


@pytest.mark.slow
def test_deployment_comparison_keeps_each_evaluation(tmp_path, tiny_mnist, monkeypatch):
    int2 = [{"kind": "quantize", "bits": 2, "per_channel": True, "clip": 2.5}]
    config = {
        "name": "tiny_deployment", "seeds": [0],
        "trainer": {"max_epochs": 1, "limit_val_batches": 1},
        "data": {"class_path": "robusttrain.data.MNISTDataModule",
                 "init_args": {"data_dir": str(tiny_mnist), "batch_size": 16, "val_size": 16}},
        "backbone": {"class_path": "robusttrain.models.MLP",
                     "init_args": {"in_features": 784, "hidden": [8], "num_classes": 10}},
        "deployments": {"int2": int2, "int2_noisy": int2 + [
            {"kind": "read_noise", "noise": "relative", "level": 0.05}]},
        "methods": {"sgd": {"model": {"class_path": "robusttrain.training.Classifier"},
                            "optimizer": {"class_path": "torch.optim.SGD",
                                          "init_args": {"lr": 0.05}}}},
        "evaluation": {"device_draws": 2, "inference_draws": 2, "seed": 0},
    }
    path = tmp_path / "tiny_deployment.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    run_deployment_comparison(load_deployment_config(path), out)
    kept = sorted(p.name for p in out.glob("runs/sgd/float/seed0/evaluations/*"))
    assert kept == ["deployment_int2.json", "deployment_int2_noisy.json"]
    first = {name: (out / name).read_bytes() for name in ("deployment.csv", "comparison.json")}

    calls = []
    real = deployment_comparison.evaluate_deployment

    def counted(models, x, y, dep, **kwargs):
        calls.append(dep.name)
        return real(models, x, y, dep, **kwargs)

    monkeypatch.setattr(deployment_comparison, "evaluate_deployment", counted)
    run_deployment_comparison(load_deployment_config(path), out)
    assert calls == []
    assert {name: (out / name).read_bytes() for name in first} == first

    config["deployments"]["int2_noisy"][-1]["level"] = 0.1  # another target: evaluated again
    path.write_text(yaml.safe_dump(config))
    run_deployment_comparison(load_deployment_config(path), out)
    assert calls == ["int2_noisy"]
    config["evaluation"]["inference_draws"] = 3  # other draws: every target
    path.write_text(yaml.safe_dump(config))
    calls.clear()
    run_deployment_comparison(load_deployment_config(path), out)
    assert calls == ["int2", "int2_noisy"]
