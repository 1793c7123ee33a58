"""``robusttrain predict`` writes one CSV row per image of a split, in split order, and agrees with
``robusttrain test`` on the same checkpoint: the accuracy of its predicted classes and the mean
cross-entropy of its probabilities are test's ``test/acc`` and ``test/loss``, also through a
deployment with faults and read noise (the same chip, the same read noise per batch)."""

import csv
import doctest
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from robusttrain.commands.main import main
from robusttrain.data import ImageDataModule, MNISTDataModule
from robusttrain.models import MLP
from robusttrain.training import Classifier, PredictionWriter, load_checkpoint
from robusttrain.training import predict as predict_module

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("runs") / "mnist_mlp_sgd" / "version_0"
# 16 test and 16 validation images in batches of 5: four batches, the last one short
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.enable_progress_bar", "false", "--data.init_args.val_size", "16",
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "5"]


def _args(data_dir: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "mnist_mlp_sgd.yaml"), *TINY,
            "--data.init_args.data_dir", str(data_dir)]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _metrics(path: Path) -> dict[str, float]:
    """The last value of every column of a CSVLogger's metrics.csv."""
    values: dict[str, float] = {}
    for row in _rows(path):
        values.update({k: float(v) for k, v in row.items() if v})
    return values


def _check_rows(rows: list[dict[str, str]], labels: torch.Tensor) -> tuple[float, float]:
    """Rows in split order with the split's labels; returns (accuracy, mean cross-entropy)."""
    assert [int(r["index"]) for r in rows] == list(range(len(labels)))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    probs = torch.tensor([[float(r[f"prob_{c}"]) for c in range(10)] for r in rows],
                         dtype=torch.float64)
    assert list(rows[0]) == ["index", "label", "predicted", *(f"prob_{c}" for c in range(10))]
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(rows), dtype=torch.float64), atol=1e-7)
    predicted = torch.tensor([int(r["predicted"]) for r in rows])
    assert torch.equal(predicted, probs.argmax(dim=1))
    accuracy = (predicted == labels).double().mean().item()
    loss = -probs[torch.arange(len(labels)), labels].log().mean().item()
    return accuracy, loss


def _split(data_dir: Path, split: str) -> torch.Tensor:
    dm = MNISTDataModule(data_dir=str(data_dir), val_size=16)
    dm.setup()
    return {"train": dm.train_y, "val": dm.val_y, "test": dm.test_y}[split]


def test_predict_writes_every_split_in_order_and_agrees_with_test(tiny_mnist, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = _args(tiny_mnist)
    elsewhere = tmp_path / "elsewhere.csv"
    # fit, validate and test do not write predictions, whatever --predictions.path says
    assert main(["fit", *args, "--predictions.path", str(elsewhere)]) == 0
    best = RUN / "checkpoints" / "best.ckpt"
    for command in ("validate", "test"):
        assert main([command, *args, "--ckpt_path", str(best),
                     "--predictions.path", str(elsewhere)]) == 0
    assert not elsewhere.exists()
    capsys.readouterr()

    # default: the test split, beside the run
    assert main(["predict", *args, "--ckpt_path", str(best)]) == 0
    written = RUN / "predict_best" / "predictions.csv"
    assert f"predictions: 16 rows written to {written}" in capsys.readouterr().out.splitlines()
    accuracy, loss = _check_rows(_rows(written), _split(tiny_mnist, "test"))
    test = _metrics(RUN / "test_best" / "metrics.csv")
    assert accuracy == pytest.approx(test["test/acc"], abs=1e-6)
    assert loss == pytest.approx(test["test/loss"], rel=1e-5)
    assert [p.name for p in (RUN.parent).iterdir()] == ["version_0"]  # no version of its own

    # --predictions.path and the other splits
    for split, n in [("val", 16), ("train", 48)]:
        out = tmp_path / "out" / f"{split}.csv"
        assert main(["predict", *args, "--ckpt_path", str(best), "--data.init_args.predict_split",
                     split, "--predictions.path", str(out)]) == 0
        rows = _rows(out)
        assert len(rows) == n
        accuracy, loss = _check_rows(rows, _split(tiny_mnist, split))
        if split == "val":
            val = _metrics(RUN / "validate_best" / "metrics.csv")
            assert accuracy == pytest.approx(val["val/acc"], abs=1e-6)
            assert loss == pytest.approx(val["val/loss"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.csv", "val.csv"]


def test_predict_through_a_deployment_agrees_with_test_through_it(tiny_mnist, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _args(tiny_mnist)
    assert main(["fit", *args]) == 0
    best = str(RUN / "checkpoints" / "best.ckpt")
    deployment = ["--model.init_args.deployment", "int4_faulty"]  # faults and read noise
    assert main(["test", *args, *deployment, "--ckpt_path", best]) == 0
    assert main(["predict", *args, *deployment, "--ckpt_path", best,
                 "--predictions.path", "deployed.csv"]) == 0
    assert main(["predict", *args, "--ckpt_path", best, "--predictions.path", "float.csv"]) == 0

    rows = _rows(tmp_path / "deployed.csv")
    accuracy, loss = _check_rows(rows, _split(tiny_mnist, "test"))
    test = _metrics(RUN / "test_best" / "metrics.csv")
    assert accuracy == pytest.approx(test["test/acc"], abs=1e-6)
    # a continuous function of every row: equal only when each batch drew test's faults and noise
    assert loss == pytest.approx(test["test/loss"], rel=1e-5)
    float_accuracy, float_loss = _check_rows(_rows(tmp_path / "float.csv"), _split(tiny_mnist, "test"))
    assert float_accuracy == pytest.approx(test["test/float_acc"], abs=1e-6)
    assert float_loss != pytest.approx(loss, rel=1e-5)  # the deployment was applied


def test_bad_predict_split_is_one_line(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", *_args(tiny_mnist), "--data.init_args.predict_split", "tset"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert errors[0] == ("robusttrain predict: error: data.init_args (MNISTDataModule): "
                         "predict_split must be one of train, val, test, got 'tset'")


def test_predicting_an_empty_validation_split_is_refused(tiny_mnist):
    dm = MNISTDataModule(data_dir=str(tiny_mnist), val_size=0, predict_split="val")
    with pytest.raises(ValueError, match="val_size=0 leaves no validation split"):
        dm.setup("predict")


def test_checkpoints_without_predict_split_still_rebuild_their_data_module():
    # written by 0.1.0, before predict_split existed
    loaded = load_checkpoint(ROOT / "tests" / "fixtures" / "checkpoint_v0_1.ckpt")
    assert "predict_split" not in loaded.data
    dm = ImageDataModule(**loaded.data)
    assert dm.hparams.predict_split == "test"
    assert ImageDataModule(**dict(dm.hparams)).hparams == dm.hparams


def test_a_folder_is_not_a_predictions_path(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        PredictionWriter(str(tmp_path))


def test_examples_in_the_module_run():
    assert doctest.testmod(predict_module).failed == 0


@pytest.mark.slow
def test_two_processes_write_the_rows_one_process_writes(tiny_mnist, tmp_path):
    torch.manual_seed(0)
    model = Classifier(MLP(784, [16], 10))
    dm = MNISTDataModule(data_dir=str(tiny_mnist), val_size=16, eval_batch_size=3)
    for devices in (1, 2):
        trainer = Trainer(accelerator="cpu", devices=devices,
                          strategy="ddp_spawn" if devices > 1 else "auto", logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[PredictionWriter(str(tmp_path / f"{devices}.csv"))],
                          default_root_dir=tmp_path)
        trainer.predict(model, datamodule=dm, return_predictions=False)
    one, two = _rows(tmp_path / "1.csv"), _rows(tmp_path / "2.csv")
    assert len(one) == 16
    for a, b in zip(one, two, strict=True):
        assert (a["index"], a["label"], a["predicted"]) == (b["index"], b["label"], b["predicted"])
        assert all(math.isclose(float(a[k]), float(b[k]), abs_tol=1e-6) for k in a)
