"""Robustness evaluation: exact at level 0, paired, restores weights, statistics, report and CLI."""

import csv
import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robusttrain.commands.robustness import main
from robusttrain.evaluation import (
    area_under_curve,
    drop_levels,
    evaluate,
    evaluate_models,
    level_statistics,
    plot_robustness,
    t_quantile_975,
    write_report,
)
from robusttrain.models import MLP
from robusttrain.noise import perturbed_weights


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: with several threads, synchronisation would dominate the time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n=600, dim=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def train(model, x, y, steps=60):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained to high accuracy on separable blobs."""
    torch.manual_seed(0)
    x, y = blobs()
    return train(MLP(10, [32], 4), x, y), x, y


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state(model, saved):
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def accuracies(result, name):
    return [row["accuracy"] for row in result.rows if row["model"] == name]


# ----- the evaluation -----------------------------------------------------------------------------
def test_level_zero_is_the_plain_accuracy_and_weights_are_restored(trained):
    model, x, y = trained
    before = state(model)
    model.train()  # evaluated in eval mode, handed back in the mode it came in
    plain_acc, plain_loss = evaluate(model.eval(), x, y)
    model.train()
    result = evaluate_models({"m": model}, x, y, levels=[0.1, 0.5], draws=5, progress=False)
    summary = result.summaries["m"]
    assert summary["clean_accuracy"] == plain_acc  # level 0 is always evaluated, exactly once
    assert summary["clean_loss"] == plain_loss
    hits = int((model(x).argmax(1) == y).sum())
    assert plain_acc == pytest.approx(hits / len(y), abs=1e-7)  # float32 rounding of k/N
    assert summary["levels"]["0"]["n"] == 1 and summary["levels"]["0.1"]["n"] == 5
    assert model.training
    assert_state(model, before)


def test_evaluated_draws_are_the_perturbed_model(trained):
    # every row equals evaluating the model inside perturbed_weights with the row's seed (the MLP
    # takes the cached-first-layer path: same sums in another order, so float32-rounding close)
    model, x, y = trained
    for include_bias in (False, True):
        result = evaluate_models({"m": model}, x, y, levels=[0.3, 1.0], draws=3, seed=4,
                                 include_bias=include_bias, progress=False)
        for row in result.rows[1:]:
            with perturbed_weights(model, level=row["level"], seed=row["seed"],
                                   include_bias=include_bias):
                acc, loss = evaluate(model, x, y)
            assert abs(row["accuracy"] - acc) <= 1 / len(y) + 1e-7  # an argmax near-tie at most
            assert row["loss"] == pytest.approx(loss, rel=1e-5)


class FlakyNet(nn.Module):
    """An MLP whose forward pass raises on call number ``fail_at``."""

    def __init__(self, fail_at):
        super().__init__()
        self.body = MLP(10, [32], 4)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("sensor unplugged")
        return self.body(x)


def test_weights_restored_when_the_forward_pass_raises(trained):
    _, x, y = trained
    model = FlakyNet(fail_at=3)
    model.body.load_state_dict(trained[0].state_dict())
    before = state(model)
    model.train()
    with pytest.raises(RuntimeError, match="sensor unplugged"):
        evaluate_models({"m": model}, x, y, levels=[0.3, 0.6], draws=5, progress=False)
    assert model.calls == 3  # clean, draw 0 at 0.3, draw 0 at 0.6 (perturbed when it raised)
    assert_state(model, before)
    assert all(m.training for m in model.modules())


def test_weights_restored_when_interrupted_from_the_progress_callback(trained):
    model, x, y = trained
    other = MLP(10, [32], 4)
    before, before_other = state(model), state(other)
    seen = []

    def on_row(row):
        seen.append(row)
        if len(seen) == 8:  # inside the second model, with its weights perturbed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_models({"m": model, "other": other}, x, y, levels=[0.3], draws=4,
                        progress=False, on_row=on_row)
    assert [r["model"] for r in seen] == ["m"] * 5 + ["other"] * 3
    assert_state(model, before)
    assert_state(other, before_other)


def test_same_seed_same_table_other_seed_other_table_and_models_share_draws(trained):
    model, x, y = trained
    twin = MLP(10, [32], 4)
    twin.load_state_dict(model.state_dict())
    a = evaluate_models({"m": model, "twin": twin}, x, y, levels=[0.2], draws=4, seed=1,
                        progress=False)
    b = evaluate_models({"m": model}, x, y, levels=[0.2], draws=4, seed=1, progress=False)
    c = evaluate_models({"m": model}, x, y, levels=[0.2], draws=4, seed=2, progress=False)
    assert accuracies(a, "m") == accuracies(b, "m")
    # the twin has the same weights; identical rows show it got the same ε (paired)
    assert accuracies(a, "m") == accuracies(a, "twin")
    assert accuracies(a, "m") != accuracies(c, "m")
    seeds = lambda r, name: [row["seed"] for row in r.rows if row["model"] == name]  # noqa: E731
    assert seeds(a, "m") == seeds(a, "twin")


def test_accuracy_falls_with_noise_and_reaches_chance(trained):
    model, x, y = trained
    levels = [0.1, 0.3, 1.0, 100.0]
    result = evaluate_models({"m": model}, x, y, levels=levels, draws=100, progress=False)
    stats = result.summaries["m"]["levels"]
    means = [stats[k]["mean"] for k in ["0", "0.1", "0.3", "1", "100"]]
    assert means[0] > 0.95
    assert means[0] >= means[1] > means[2] > means[3] > means[4]
    # At 100·max|W| the network is random: over draws, its accuracy averages to chance, 1/4
    # (4 balanced classes, ε symmetric in the classes). The tolerance comes from the observed
    # spread: |mean − 1/4| < 4 standard errors (z = 4: false alarm 6e-5).
    chance = stats["100"]
    assert abs(chance["mean"] - 0.25) < 4 * chance["std"] / math.sqrt(chance["n"])
    # and the CI of the mean covers chance
    assert chance["ci95_low"] < 0.25 + 2 * chance["std"] / math.sqrt(chance["n"])


def test_batchnorm_keep_or_reestimate_and_buffers_restored():
    torch.manual_seed(0)
    x, y = blobs(n=400)
    model = train(nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                nn.Linear(32, 4)).train(), x, y)
    model[1].running_mean.add_(5.0)  # wrong statistics: keeping them hurts, re-estimating fixes
    before = state(model)
    keep = evaluate_models({"m": model}, x, y, levels=[0.05], draws=3, progress=False)
    fixed = evaluate_models({"m": model}, x, y, levels=[0.05], draws=3, bn_mode="reestimate",
                            bn_data=x, bn_batches=2, bn_batch_size=100, progress=False)
    assert fixed.summaries["m"]["clean_accuracy"] > 0.95 > keep.summaries["m"]["clean_accuracy"]
    assert fixed.summaries["m"]["levels"]["0.05"]["mean"] > 0.9
    assert fixed.summaries["m"]["bn_mode"] == "reestimate"
    assert {r["bn_mode"] for r in fixed.rows} == {"reestimate"}
    assert model[1].momentum == 0.1 and not model[1].training
    assert_state(model, before)
    with pytest.raises(ValueError, match="needs bn_data"):
        evaluate_models({"m": model}, x, y, bn_mode="reestimate", progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise="pink"), "unknown noise model 'pink'; choose one of relative"),
        (dict(levels=[0.1, -0.1]), ">= 0"),
        (dict(levels=[0.1, 0.1]), "distinct"),
        (dict(draws=0), "draws must be an integer >= 1"),
        (dict(bn_mode="fresh"), "bn_mode must be one of keep, reestimate"),
    ],
)
def test_bad_settings_are_clear_errors(trained, kwargs, message):
    model, x, y = trained
    with pytest.raises(ValueError, match=message):
        evaluate_models({"m": model}, x, y, progress=False, **kwargs)


def test_labels_out_of_range_are_a_clear_error(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        evaluate_models({"m": model}, x, y + 4, levels=[0.1], draws=1, progress=False)


# ----- pure statistics -----------------------------------------------------------------------------
def test_drop_levels_and_area_on_hand_made_curves():
    levels = [0, 0.1, 0.2, 0.3]
    acc = [0.90, 0.88, 0.84, 0.70]
    # 1 point: 0.89, between 0 (0.90) and 0.1 (0.88), halfway -> 0.05
    # 5 points: 0.85, between 0.1 (0.88) and 0.2 (0.84), 3/4 of the way -> 0.175
    # 10 points: 0.80, between 0.2 (0.84) and 0.3 (0.70), 4/14 of the way -> 0.22857
    d1, d5, d10 = drop_levels(levels, acc, 0.90)
    assert d1 == pytest.approx(0.05)
    assert d5 == pytest.approx(0.175)
    assert d10 == pytest.approx(0.2 + 0.1 * 4 / 14)
    # the same curve given out of order
    assert drop_levels(levels[::-1], acc[::-1], 0.90) == [d1, d5, d10]
    # not reached
    assert drop_levels(levels, [0.9, 0.9, 0.9, 0.86], 0.9, drops=(0.05, 0.10)) == [None, None]
    # exactly at a grid point, after a flat part and after a slope
    assert drop_levels(levels, [0.9, 0.9, 0.9, 0.85], 0.9, drops=(0.05,)) == [0.3]
    assert drop_levels(levels, [0.9, 0.88, 0.85, 0.7], 0.9, drops=(0.05,)) == [0.2]
    # a non-monotone curve: the first crossing counts
    assert drop_levels(levels, [0.9, 0.84, 0.9, 0.7], 0.9, drops=(0.05,)) == [
        pytest.approx(0.1 * 5 / 6)]
    # trapezoid: 0.1·(0.89 + 0.86 + 0.77) = 0.252; over the range 0.3 -> 0.84
    assert area_under_curve(levels, acc, normalize=False) == pytest.approx(0.252)
    assert area_under_curve(levels, acc) == pytest.approx(0.84)
    assert area_under_curve([0, 1], [1.0, 0.0]) == pytest.approx(0.5)
    assert area_under_curve([0.2], [0.7]) == 0.7


def test_curve_functions_reject_bad_curves():
    with pytest.raises(ValueError, match="equally long"):
        drop_levels([0, 0.1], [0.9], 0.9)
    with pytest.raises(ValueError, match="distinct"):
        area_under_curve([0, 0.1, 0.1], [0.9, 0.8, 0.7])


def test_level_statistics_and_t_quantile():
    values = [0.8, 0.82, 0.84, 0.86]
    stats = level_statistics(values)
    assert stats["mean"] == pytest.approx(0.83)
    assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    assert stats["min"] == 0.8 and stats["n"] == 4
    assert stats["p5"] == pytest.approx(np.percentile(values, 5))
    assert stats["ci95_high"] - stats["mean"] == pytest.approx(3.182 * stats["std"] / 2)
    assert level_statistics([0.5])["ci95_low"] is None
    # table values (3 decimals) beyond the table, and the normal limit
    for df, t in [(31, 2.040), (40, 2.021), (60, 2.000), (120, 1.980)]:
        assert t_quantile_975(df) == pytest.approx(t, abs=6e-4)
    assert 1.95996 < t_quantile_975(100_000) < 1.96001
    assert t_quantile_975(30) > t_quantile_975(31) > t_quantile_975(32)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_confidence_interval_covers_the_mean_95_percent_of_the_time():
    # 4,000 samples of n = 5 normals; coverage is Binomial(4000, 0.95)/4000, sd = 0.0034;
    # z = 4 -> tolerance 0.014 (a z-interval, 1.96 instead of t = 2.776, would cover ~0.88)
    rng = np.random.default_rng(0)
    covered = 0
    for sample in rng.normal(0.7, 0.1, size=(4000, 5)):
        stats = level_statistics(sample)
        covered += stats["ci95_low"] <= 0.7 <= stats["ci95_high"]
    assert abs(covered / 4000 - 0.95) < 4 * math.sqrt(0.95 * 0.05 / 4000)


# ----- report --------------------------------------------------------------------------------------
def test_report_files_match_rows(trained, tmp_path):
    model, x, y = trained
    twin = MLP(10, [32], 4)
    result = evaluate_models({"m": model, "untrained": twin}, x, y, levels=[0.1, 0.3], draws=6,
                             progress=False)
    paths = write_report(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "robustness.csv", "robustness.png", "summary.json"]  # no temporary files left
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 2 * (1 + 6 + 6)
    summary = json.loads(paths["json"].read_text())  # strict JSON: no NaN
    for name in ("m", "untrained"):
        entry = summary["models"][name]
        for stats in entry["levels"].values():
            accs = [float(r["accuracy"]) for r in rows if r["model"] == name and r["level"] == str(
                stats["level"])]
            assert stats == {**level_statistics(accs), "level": stats["level"],
                             "loss_mean": stats["loss_mean"], "loss_std": stats["loss_std"]}
        assert entry["perturbed_tensors"] == ["net.1.weight", "net.3.weight"]
        assert entry["noise"] == "relative" and entry["bn_mode"] == "keep"
        assert entry["drop_1pt"] is None or entry["drop_1pt"] > 0
    assert summary["settings"]["levels"] == [0.0, 0.1, 0.3]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    # the plot can be redrawn from the JSON alone
    plot_robustness(summary["models"], tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"


# ----- command line --------------------------------------------------------------------------------
def idx_gz(array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    """Generated Fashion-MNIST files: the label is encoded in the brightness of the image."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion"
    folder.mkdir()
    for stem, n in (("train", 300), ("t10k", 200)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 20, (n, 28, 28)) + 20 * labels[:, None, None]
        (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(idx_gz(images))
        (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(idx_gz(labels))
    return folder


def write_checkpoint(path, data_dir, backbone=None, deployment=None):
    """A checkpoint in the format `robusttrain fit` writes, saved with plain torch.save."""
    backbone = backbone or MLP(784, [16], 10)
    torch.save({
        "state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
        "robusttrain": {"format": 1, "backbone": backbone.spec, "method": "sgd",
                        "deployment": deployment},
        "datamodule_hyper_parameters": {"dataset": "fashion_mnist", "data_dir": str(data_dir),
                                        "val_size": 50, "split_seed": 0},
    }, path)
    return path


def test_cli_evaluates_checkpoints_on_their_saved_data(tmp_path, fake_fashion, capsys):
    torch.manual_seed(0)
    a = write_checkpoint(tmp_path / "a.ckpt", fake_fashion)
    b = write_checkpoint(tmp_path / "b.ckpt", tmp_path / "nowhere")  # fixed by --data-dir
    out = tmp_path / "out"
    code = main(["--ckpt", str(a), "--ckpt", str(b), "--name", "first", "--name", "second",
                 "--levels", "0.1,0.2", "--draws", "3", "--out", str(out), "--no-progress",
                 "--data-dir", str(fake_fashion)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "first" in printed and "second" in printed and "clean" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["examples"] == 200  # the test split of the generated files
    assert list(summary["models"]) == ["first", "second"]
    rows = list(csv.DictReader((out / "robustness.csv").open()))
    assert len(rows) == 2 * (1 + 3 + 3)

    code = main(["--ckpt", str(a), "--levels", "0.1", "--draws", "2", "--split", "val",
                 "--out", str(out / "val"), "--no-progress"])
    assert code == 0
    assert json.loads((out / "val" / "summary.json").read_text())["settings"]["examples"] == 50


def test_cli_evaluates_checkpoints_through_a_deployment_sweep(tmp_path, fake_fashion, capsys):
    torch.manual_seed(0)
    a = write_checkpoint(tmp_path / "a.ckpt", fake_fashion)
    b = write_checkpoint(tmp_path / "b.ckpt", fake_fashion)
    out = tmp_path / "out"
    code = main(["--ckpt", str(a), "--ckpt", str(b), "--deployment", "int4_faulty",
                 "--sweep", "quantize.bits=2,8", "--device-draws", "2", "--inference-draws", "3",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "quantize.bits=2" in printed and "quantize.bits=8" in printed
    assert {p.name for p in out.iterdir()} == {"deployment.csv", "deployment.json",
                                               "deployment.png"}
    rows = list(csv.DictReader((out / "deployment.csv").open()))
    assert len(rows) == 2 * 2 * (2 * 3)  # models × values × chips × read-noise runs
    summary = json.loads((out / "deployment.json").read_text())
    assert summary["settings"]["sweep"] == "quantize.bits" and summary["settings"]["examples"] == 200


def test_cli_evaluates_through_the_deployment_the_checkpoints_were_trained_for(
        tmp_path, fake_fashion, capsys):
    from robusttrain.noise import parse_deployment

    torch.manual_seed(0)
    steps = parse_deployment([{"kind": "quantize", "bits": 3}, {"kind": "stuck_at", "p": 0.02}])
    a = write_checkpoint(tmp_path / "a.ckpt", fake_fashion, deployment=steps.to_list())
    b = write_checkpoint(tmp_path / "b.ckpt", fake_fashion, deployment=steps.to_list())
    common = ["--device-draws", "2", "--no-progress"]
    code = main(["--ckpt", str(a), "--ckpt", str(b), "--deployment", "trained",
                 "--out", str(tmp_path / "trained"), *common])
    assert code == 0
    assert "quantize(bits=3, per_channel=False) → stuck_at(p=0.02" in capsys.readouterr().out
    # the same numbers as naming that deployment
    named = tmp_path / "named.yaml"
    named.write_text(json.dumps(steps.to_list()))
    assert main(["--ckpt", str(a), "--ckpt", str(b), "--deployment", str(named),
                 "--out", str(tmp_path / "named"), *common]) == 0
    accs = [[r["accuracy"] for r in csv.DictReader((tmp_path / d / "deployment.csv").open())]
            for d in ("trained", "named")]
    assert accs[0] == accs[1] and len(accs[0]) == 2 * 2

    plain = write_checkpoint(tmp_path / "plain.ckpt", fake_fashion)
    assert main(["--ckpt", str(plain), "--deployment", "trained", "--out", str(tmp_path / "x"),
                 *common]) == 2
    assert "was not trained for a deployment" in capsys.readouterr().err
    other = write_checkpoint(tmp_path / "other.ckpt", fake_fashion, deployment=[
        {"kind": "quantize", "bits": 4}])
    assert main(["--ckpt", str(a), "--ckpt", str(other), "--deployment", "trained",
                 "--out", str(tmp_path / "y"), *common]) == 2
    assert "trained for different deployments" in capsys.readouterr().err


def test_cli_on_a_checkpoint_written_by_training(tmp_path, fashion_dir, capsys):
    from lightning.pytorch import Trainer

    from robusttrain.data import FashionMNISTDataModule
    from robusttrain.training import Classifier

    dm = FashionMNISTDataModule(data_dir=str(fashion_dir), train_subset=512, val_size=500)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Classifier(MLP(784, [16], 10)), datamodule=dm)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
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
        (["--ckpt", "BOGUS"], "not a robusttrain checkpoint"),
        (["--levels", "0,-0.1"], "--levels must be comma-separated numbers >= 0"),
        (["--levels", "0,abc"], "--levels must be comma-separated numbers >= 0"),
        (["--levels", "0.1,0.1"], "--levels must be distinct"),
        (["--draws", "0"], "--draws must be an integer >= 1"),
        (["--draws", "many"], "--draws must be an integer >= 1"),
        (["--noise", "pink"], "unknown noise model 'pink'"),
        (["--bn-mode", "fresh"], "invalid choice: 'fresh'"),
        (["--out", None], "the following arguments are required: --out"),
        (["--sweep", "quantize.bits=2,4"], "--sweep needs --deployment"),
        (["--deployment", "int5"], "neither a preset"),
        (["--deployment", "int4", "--sweep", "bits=2"], "--sweep must look like kind.field=v1,v2"),
        (["--deployment", "int4", "--sweep", "stuck_at.p=0.1"], "no stuck_at step to sweep"),
        (["--deployment", "int4", "--sweep", "quantize.bits=1,4"], "bits must be an integer"),
        (["--deployment", "int4", "--device-draws", "0"], "--device-draws must be an integer"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, fake_fashion, args, message, capsys):
    good = write_checkpoint(tmp_path / "good.ckpt", fake_fashion)
    bogus = tmp_path / "not_a_checkpoint.ckpt"
    torch.save({"state_dict": {}}, bogus)
    base = {"--ckpt": str(good), "--levels": "0,0.1", "--draws": "2", "--noise": "relative",
            "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = str(bogus) if value == "BOGUS" else value
    argv = [t for kv in base.items() if kv[1] is not None for t in kv] + ["--no-progress"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("batchnorm_layers", [0, 2])
def test_robustness_plot_names_batchnorm_only_when_it_applies_and_keeps_the_legend_outside(
    trained, batchnorm_layers
):
    import matplotlib.pyplot as plt

    from robusttrain.evaluation.report import robustness_figure

    model, x, y = trained
    result = evaluate_models({"a": model, "b": model}, x, y, levels=[0.1, 0.5], draws=3,
                             progress=False)
    summaries = {k: {**v, "batchnorm_layers": batchnorm_layers}
                 for k, v in result.summaries.items()}
    fig = robustness_figure(summaries)
    ax = fig.axes[0]
    assert ("BatchNorm" in ax.get_title()) == (batchnorm_layers > 0)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())
    plt.close(fig)
