"""Robustness evaluation: exact at level 0, paired, restores weights, statistics and the CLI."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robusttrain.models import MLP
from robusttrain.robustness import (
    area_under_curve,
    drop_levels,
    evaluate,
    evaluate_models,
    level_statistics,
    main,
    t_quantile_975,
    write_report,
)


def blobs(n=600, dim=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained to high accuracy on separable blobs."""
    torch.manual_seed(0)
    x, y = blobs()
    model = MLP(10, [32], 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_level_zero_is_the_plain_accuracy_and_weights_are_restored(trained):
    model, x, y = trained
    before = state(model)
    plain = (model(x).argmax(1) == y).float().mean().item()
    result = evaluate_models({"m": model}, x, y, levels=[0, 0.1, 0.5], draws=5, progress=False)
    assert result.summaries["m"]["clean_accuracy"] == pytest.approx(plain, abs=1e-7)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_weights_restored_when_evaluation_is_interrupted(trained, monkeypatch):
    model, x, y = trained
    before = state(model)
    calls = {"n": 0}
    real = evaluate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("robusttrain.robustness.evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate_models({"m": model}, x, y, levels=[0, 0.3], draws=5, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_same_seed_same_table_and_models_share_draws(trained):
    model, x, y = trained
    twin = MLP(10, [32], 4)
    twin.load_state_dict(model.state_dict())
    a = evaluate_models({"m": model, "twin": twin}, x, y, levels=[0.2], draws=4, seed=1,
                        progress=False)
    b = evaluate_models({"m": model}, x, y, levels=[0.2], draws=4, seed=1, progress=False)
    c = evaluate_models({"m": model}, x, y, levels=[0.2], draws=4, seed=2, progress=False)
    acc = lambda r, name: [row["accuracy"] for row in r.rows if row["model"] == name]  # noqa: E731
    assert acc(a, "m") == acc(b, "m")
    assert acc(a, "m") == acc(a, "twin")  # same architecture, same weights, same ε: paired
    assert acc(a, "m") != acc(c, "m")


def test_accuracy_falls_with_noise_and_reaches_chance(trained):
    model, x, y = trained
    result = evaluate_models({"m": model}, x, y, levels=[0, 0.2, 1.0, 50.0], draws=20,
                             progress=False)
    means = [result.summaries["m"]["levels"][k]["mean"] for k in ["0", "0.2", "1", "50"]]
    assert means[0] > 0.95
    assert means[0] >= means[1] > means[2] > means[3]
    # at 50 x max|W| the network is random: mean accuracy over 20 draws of 600 images is within
    # a few standard errors of chance, 1/4 (sd of one draw's accuracy <= sqrt(.25*.75/600)=0.018,
    # but draws are also biased towards one class: allow 0.15)
    assert abs(means[3] - 0.25) < 0.15


def test_drop_levels_and_area_on_hand_made_curves():
    levels = [0, 0.1, 0.2, 0.3]
    acc = [0.90, 0.88, 0.84, 0.70]
    # 1 point: between 0 (0.90) and 0.1 (0.88): 0.89 reached halfway -> 0.05
    # 5 points: 0.85 between 0.1 (0.88) and 0.2 (0.84): 3/4 of the way -> 0.175
    # 10 points: 0.80 between 0.2 (0.84) and 0.3 (0.70): 4/14 -> 0.2286
    d1, d5, d10 = drop_levels(levels, acc, 0.90)
    assert d1 == pytest.approx(0.05)
    assert d5 == pytest.approx(0.175)
    assert d10 == pytest.approx(0.2 + 0.1 * 4 / 14)
    assert drop_levels(levels, [0.9, 0.9, 0.9, 0.85], 0.9, drops=(0.05, 0.10)) == [0.3, None]
    # trapezoid: 0.1*(0.89 + 0.86 + 0.77) = 0.252, over range 0.3 -> 0.84
    assert area_under_curve(levels, acc, normalize=False) == pytest.approx(0.252)
    assert area_under_curve(levels, acc) == pytest.approx(0.84)


def test_level_statistics_and_t_quantile():
    stats = level_statistics([0.8, 0.82, 0.84, 0.86])
    assert stats["mean"] == pytest.approx(0.83)
    assert stats["std"] == pytest.approx(np.std([0.8, 0.82, 0.84, 0.86], ddof=1))
    assert stats["min"] == 0.8
    half = 3.182 * stats["std"] / 2
    assert stats["ci95_high"] - stats["mean"] == pytest.approx(half)
    # the expansion beyond the table joins it smoothly and tends to the normal quantile
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=1e-3)
    assert 1.96 < t_quantile_975(10_000) < 1.961


def test_report_files_match_rows(trained, tmp_path):
    model, x, y = trained
    result = evaluate_models({"m": model}, x, y, levels=[0, 0.1, 0.3], draws=6, progress=False)
    paths = write_report(result, tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 1 + 6 + 6
    summary = json.loads(paths["json"].read_text())
    for level in ["0.1", "0.3"]:
        accs = [float(r["accuracy"]) for r in rows if r["level"] == level]
        assert summary["models"]["m"]["levels"][level]["mean"] == pytest.approx(np.mean(accs),
                                                                                 abs=1e-6)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert summary["settings"]["bn_mode"] == "keep"


def _write_checkpoint(tmp_path, fashion_dir):
    from lightning.pytorch import Trainer

    from robusttrain.data import FashionMNISTDataModule
    from robusttrain.module import Classifier

    dm = FashionMNISTDataModule(data_dir=str(fashion_dir), train_subset=512, val_size=500)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Classifier(MLP(784, [16], 10)), datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_cli_on_a_real_checkpoint(tmp_path, fashion_dir, capsys):
    ckpt = _write_checkpoint(tmp_path, fashion_dir)
    out = tmp_path / "out"
    code = main(["--ckpt", str(ckpt), "--levels", "0,0.1", "--draws", "2", "--out", str(out),
                 "--no-progress", "--split", "val"])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"robustness.csv", "summary.json", "robustness.png"}
    assert "clean" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ckpt", "missing.ckpt"], "does not exist"),
        (["--levels", "0,-0.1"], "levels"),
        (["--levels", "0,abc"], "levels"),
        (["--draws", "0"], "draws"),
        (["--noise", "pink"], "unknown noise model"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message, capsys):
    bogus = tmp_path / "not_a_checkpoint.ckpt"
    torch.save({"state_dict": {}}, bogus)
    base = {"--ckpt": str(bogus), "--levels": "0,0.1", "--draws": "2", "--noise": "relative"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [t for kv in base.items() for t in kv] + ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_rejects_a_file_that_is_not_a_robusttrain_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bogus)
    assert main(["--ckpt", str(bogus), "--out", str(tmp_path / "o")]) == 2
    assert "not a robusttrain checkpoint" in capsys.readouterr().err
