"""The comparison driver on a tiny budget: a complete report that matches the CSV, and resuming."""

import csv
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from robusttrain.commands.compare import main
from robusttrain.comparison import (
    CompareConfig,
    CompareConfigError,
    MethodSpec,
    Variant,
    frontier_figure,
    load_config,
    plot_frontier,
    plot_robustness,
    render_report,
    robustness_figure,
    run_comparison,
    runner,
    summarize_runs,
)

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


class _LevelClassifier:
    """Stands in for a training class that takes ``noise`` and ``level`` (only its signature is read)."""

    def __init__(self, backbone=None, noise=None, level=None, sigma=0.01, seed=0):
        pass


@pytest.fixture
def level_class(monkeypatch):
    """The class path of :class:`_LevelClassifier`, importable for the duration of a test."""
    module = types.ModuleType("fake_level_training")
    module.LevelClassifier = _LevelClassifier
    monkeypatch.setitem(sys.modules, "fake_level_training", module)
    return "fake_level_training.LevelClassifier"


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


def _cifar_slice(name: str, data_roots) -> dict:
    """A committed CIFAR-10 comparison config cut down to one seed, 2 steps and 64 images."""
    if data_roots["cifar10"] is None:
        pytest.skip("CIFAR-10 files not found (set ROBUSTTRAIN_TEST_DATA)")
    raw = yaml.safe_load((ROOT / "experiments" / name).read_text())
    raw["seeds"] = [0]
    raw["trainer"] = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1}
    raw["data"]["init_args"].update(data_dir=str(data_roots["cifar10"]), batch_size=8,
                                    eval_batch_size=64, train_subset=64)
    return raw


@pytest.mark.slow
def test_cifar_comparison_config_on_a_slice_of_real_cifar(tmp_path, data_roots):
    raw = _cifar_slice("cifar10_resnet20.yaml", data_roots)
    raw["methods"] = {k: raw["methods"][k] for k in ["sgd_momentum", "zo_nesterov"]}
    raw["methods"]["zo_nesterov"]["sigmas"] = [0.01]
    raw["methods"]["zo_nesterov"]["model"]["init_args"]["num_pairs"] = 2
    raw["robustness"].update(levels=[0, 0.1], draws=2, max_images=64)
    path = tmp_path / "cifar.yaml"
    path.write_text(yaml.safe_dump(raw))
    report = run_comparison(load_config(path), tmp_path / "out").read_text()
    assert "| sgd_momentum |" in report and "| zo_nesterov | σ=0.01 |" in report


@pytest.mark.slow
def test_v2_comparison_config_runs_every_method_on_a_slice_of_real_cifar(tmp_path, data_roots):
    # the v2 path end to end: η_train variants of the smoothed methods (Gaussian and low-rank ZO,
    # noise injection), evaluation under two noise models, the report's matched-accuracy section
    raw = _cifar_slice("cifar10_lenet_v2.yaml", data_roots)
    for spec in raw["methods"].values():
        if "levels" in spec:
            spec["levels"] = spec["levels"][-1:]
        if "num_pairs" in (spec["model"].get("init_args") or {}):
            spec["model"]["init_args"]["num_pairs"] = 2
    raw["robustness"].update(levels={"relative": [0, 0.1], "multiplicative": [0, 0.2]}, draws=2,
                             max_images=64)
    path = tmp_path / "cifar_v2.yaml"
    path.write_text(yaml.safe_dump(raw))
    report = run_comparison(load_config(path), tmp_path / "out").read_text()
    for label in ("sgd_momentum", "sgd_weight_decay", "noise_injection", "zo_lowrank",
                  "zo_gaussian", "sgd_matched"):
        assert f"| {label} |" in report
    assert "η=0.1 (relative)" in report and "matched clean accuracy" in report.lower()
    for noise in ("relative", "multiplicative"):
        assert (tmp_path / "out" / noise / "robustness.csv").is_file()
    result = json.loads((tmp_path / "out" / "runs" / "zo_lowrank" / "level0.1" / "seed0"
                         / "result.json").read_text())
    assert (result["noise"], result["level"]) == ("relative", 0.1)


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
        (lambda c: c["methods"]["zo"].update(levels=[0.05]), "both 'sigmas' and 'levels'"),
        (lambda c: c["methods"]["sgd"].update(levels=[0.05]),
         "'sgd' gives 'levels' but robusttrain.training.Classifier.__init__ has no 'level'"),
        (lambda c: c["methods"]["zo"].update(sigmas=[0.01, 0.01]), "distinct positive numbers"),
        (lambda c: c["robustness"].update(noise=["relative", "gaussian"]),
         "unknown robustness noise model(s) ['gaussian']; valid: relative, absolute, multiplicative"),
        (lambda c: c["robustness"].update(noise=["relative", "multiplicative"],
                                          levels={"relative": [0, 0.1]}),
         "give one list of levels per noise model"),
        (lambda c: c["robustness"].update(noise=["relative", "relative"]), "duplicates"),
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
    from robusttrain.comparison.deployment import is_deployment_config

    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        if is_deployment_config(path):  # tests/test_deployment_comparison.py
            continue
        if "chip_finetune" in yaml.safe_load(path.read_text()):  # a chip study: tests/test_chip.py
            continue
        cfg = load_config(path)
        assert len(cfg.methods) >= 2, path
        assert all(m.model["class_path"].startswith("robusttrain.training.") for m in cfg.methods)
    full = load_config(ROOT / "experiments" / "fashion_mlp.yaml")
    assert len(full.seeds) >= 3
    swept = [m for m in full.methods if len(m.sigmas or m.levels or []) >= 3]
    assert {m.model["class_path"].rsplit(".", 1)[-1] for m in swept} == {
        "ZerothOrderClassifier", "NoiseInjectionClassifier"}


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_levels_grid_gives_eta_variants_labels_and_run_dirs(tmp_path, level_class):
    raw = yaml.safe_load(tiny_config(tmp_path, tmp_path).read_text())
    raw["methods"]["smooth"] = {
        "model": {"class_path": level_class, "init_args": {"noise": "relative", "num_pairs": 4}},
        "levels": [0.02, 0.05],
    }
    cfg = load_config(_write(tmp_path, raw))
    smooth = cfg.methods[2]
    assert smooth.levels == [0.02, 0.05] and smooth.sigmas is None and smooth.noise == "relative"
    assert smooth.variants() == [Variant(level=0.02), Variant(level=0.05)]
    assert [v.label("smooth") for v in smooth.variants()] == ["smooth η=0.02", "smooth η=0.05"]
    out = tmp_path / "out"
    variant = smooth.variants()[1]
    run_dir = runner._run_dir(out, smooth, variant, 1)
    assert run_dir == out / "runs" / "smooth" / "level0.05" / "seed1"
    init_args = runner._fit_args(cfg, smooth, variant, 1, run_dir)["model"]["init_args"]
    assert init_args["level"] == 0.05 and init_args["noise"] == "relative"
    assert "sigma" not in init_args and init_args["seed"] == 1
    # sigma grids and plain methods keep their labels and folders
    zo = cfg.methods[1]
    assert [v.label("zo") for v in zo.variants()] == ["zo σ=0.01"]
    assert runner._run_dir(out, zo, zo.variants()[0], 0) == out / "runs" / "zo" / "sigma0.01" / "seed0"
    assert runner._run_dir(out, cfg.methods[0], Variant(), 0) == out / "runs" / "sgd" / "seed0"
    zo_args = runner._fit_args(cfg, zo, zo.variants()[0], 0, run_dir)["model"]["init_args"]
    assert zo_args["sigma"] == 0.01 and "level" not in zo_args


def test_levels_need_the_noise_model_of_the_level(tmp_path, level_class):
    raw = yaml.safe_load(tiny_config(tmp_path, tmp_path).read_text())
    raw["methods"]["smooth"] = {"model": {"class_path": level_class}, "levels": [0.05]}
    with pytest.raises(CompareConfigError, match=r"'smooth' gives 'levels'.*init_args\.noise"):
        load_config(_write(tmp_path, raw))


def test_several_noise_models_are_parsed_with_their_levels(tmp_path):
    raw = yaml.safe_load(tiny_config(tmp_path, tmp_path).read_text())
    raw["robustness"].update(noise=["multiplicative", "relative"], levels=[0.2, 0.05])
    spec = load_config(_write(tmp_path, raw)).robustness_spec()
    assert list(spec.levels) == ["multiplicative", "relative"] and spec.primary == "multiplicative"
    assert spec.levels == {"multiplicative": [0.0, 0.05, 0.2], "relative": [0.0, 0.05, 0.2]}
    assert spec.per_noise_folders and spec.out_dir(tmp_path, "relative") == tmp_path / "relative"
    raw["robustness"]["levels"] = {"relative": [0.1], "multiplicative": [0, 0.3]}
    spec = load_config(_write(tmp_path, raw)).robustness_spec()
    assert spec.levels == {"multiplicative": [0.0, 0.3], "relative": [0.0, 0.1]}
    # a single noise model keeps the flat layout
    single = load_config(tiny_config(tmp_path, tmp_path)).robustness_spec()
    assert single.levels == {"relative": [0.0, 0.1, 0.5]} and not single.per_noise_folders
    assert single.out_dir(tmp_path, "relative") == tmp_path


def _synthetic(levels_by_noise: dict[str, list[float]]):
    """Results, rows and entries of 3 methods (1 + 2 η + 1 σ variants) x 2 seeds, no training."""
    rng = np.random.default_rng(0)
    variants = [("sgd_momentum", Variant()), ("zo", Variant(level=0.02)), ("zo", Variant(level=0.05)),
                ("ni", Variant(sigma=0.01))]
    results = []
    for method, variant in variants:
        for seed in (0, 1):
            r = {"method": method, "sigma": variant.sigma, "seed": seed, "wall_time_s": 10.0 + seed,
                 "forward_equivalents": 300, "steps": 100, "max_abs_weight": 0.5 + 0.1 * seed,
                 "weight_crest": 4.0 + seed,
                 "key": f"{variant.label(method)} seed{seed}"}
            if method != "ni":  # "ni" stands for a result.json from before `level` existed
                r.update(level=variant.level, noise="relative" if variant.level else None)
            results.append(r)
    entries, rows_by_noise = {}, {}
    for noise, levels in levels_by_noise.items():
        rows = []
        for i, r in enumerate(results):
            clean = 0.9 - 0.03 * (i // 2) + 0.002 * r["seed"]
            for lvl in levels:
                for _ in range(1 if lvl == 0 else 3):
                    slope = (0.6 - 0.1 * (i // 2)) * rng.uniform(0.9, 1.1)
                    acc = clean if lvl == 0 else clean - lvl * slope
                    rows.append({"model": r["key"], "level": lvl, "accuracy": acc})
        rows_by_noise[noise] = rows
        entries[noise] = summarize_runs(results, rows, levels)
    return results, rows_by_noise, entries


def _cfg(robustness: dict) -> CompareConfig:
    methods = [MethodSpec("sgd_momentum", {"class_path": "robusttrain.training.Classifier"}),
               MethodSpec("zo", {"class_path": "x.Y", "init_args": {"noise": "relative"}},
                          levels=[0.02, 0.05]),
               MethodSpec("ni", {"class_path": "x.Z"}, sigmas=[0.01])]
    return CompareConfig(name="synthetic", seeds=[0, 1], methods=methods,
                         backbone={"class_path": "robusttrain.models.MLP"},
                         data={"class_path": "robusttrain.data.FashionMNISTDataModule"},
                         robustness=robustness)


def test_summarize_runs_groups_level_variants_over_seeds():
    levels = [0.0, 0.05, 0.1]
    results, rows_by_noise, entries = _synthetic({"relative": levels})
    entries = entries["relative"]
    assert [e["label"] for e in entries] == ["sgd_momentum", "zo η=0.02", "zo η=0.05", "ni σ=0.01"]
    zo = entries[2]
    assert zo["level"] == 0.05 and zo["noise"] == "relative" and zo["sigma"] is None
    assert entries[3]["level"] is None and entries[3]["sigma"] == 0.01  # old result.json
    rows = rows_by_noise["relative"]
    per_seed = [np.mean([row["accuracy"] for row in rows
                         if row["model"] == f"zo η=0.05 seed{s}" and row["level"] == 0.1])
                for s in (0, 1)]
    assert zo["level_mean"][2] == pytest.approx(np.mean(per_seed))
    assert zo["level_std"][2] == pytest.approx(np.std(per_seed, ddof=1))
    assert zo["max_abs_weight"] == pytest.approx(0.55) and zo["seeds"] == [0, 1]


def _section(report: str, title: str) -> list[list[str]]:
    """The table rows (cells) of the section ``## title``."""
    part = report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    table = [ln for ln in part.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in table]


def test_report_has_a_table_per_noise_model_and_drops_at_matched_clean_accuracy():
    levels = {"relative": [0.0, 0.05, 0.1, 0.2], "multiplicative": [0.0, 0.3]}
    cfg = _cfg({"noise": ["relative", "multiplicative"],
                "levels": {k: v[1:] for k, v in levels.items()}, "draws": 3})
    _, _, entries = _synthetic(levels)
    report = render_report(cfg, entries, 60.0, "robusttrain compare --config synthetic.yaml")
    for noise in levels:
        table = _section(report, f"Accuracy under {noise} weight noise")
        assert [row[0] for row in table] == ["sgd_momentum", "zo", "zo", "ni"]
        assert [row[1] for row in table] == ["—", "η=0.02 (relative)", "η=0.05 (relative)", "σ=0.01"]
        # mean max|W| column: mean over seeds
        assert [float(row[-4]) for row in table] == pytest.approx([0.55] * 4)
        # max|W|/rms column: mean over seeds too (seeds 0 and 1: 4.0 and 5.0)
        assert [float(row[-3]) for row in table] == pytest.approx([4.5] * 4)
    assert r"mean max\|W\|" in report

    matched = _section(report, "At matched clean accuracy")
    rel = entries["relative"]
    i = levels["relative"].index(0.1)
    ref_drop = rel[0]["clean_mean"] - rel[0]["level_mean"][i]
    expected = sorted(rel, key=lambda e: e["clean_mean"], reverse=True)
    assert [row[0] for row in matched] == [e["label"] for e in expected]
    for row, e in zip(matched, expected):
        drop = e["clean_mean"] - e["level_mean"][i]
        assert float(row[1]) == pytest.approx(100 * e["clean_mean"], abs=0.006)
        assert float(row[2]) == pytest.approx(100 * e["level_mean"][i], abs=0.006)
        assert float(row[3]) == pytest.approx(100 * drop, abs=0.006)
        assert float(row[4]) == pytest.approx(drop / ref_drop, abs=0.006)
    assert "at η=0.1 (%)" in report and "drop / drop of sgd_momentum" in report
    # the units table lists the σ entries only; η entries are in the evaluation's own units
    assert [row[:2] for row in _section(report, "Units of σ and η")] == [["ni", "0.01"]]
    assert "no conversion needed" in report
    assert "`relative/`" in report and "`multiplicative/`" in report


def test_report_without_sigma_entries_has_no_units_section_and_uses_the_nearest_level():
    _, _, entries = _synthetic({"relative": [0.0, 0.05, 0.12, 0.3]})
    entries = {"relative": [e for e in entries["relative"] if e["sigma"] is None]}
    report = render_report(_cfg({"noise": "relative", "levels": [0.05, 0.12, 0.3]}), entries, 1.0,
                           "cmd")
    assert "## Units" not in report
    assert "at η=0.12 (%)" in report and "nearest η = 0.1" in report
    assert "Files: `robustness.csv`" in report


def _many_entries(levels: list[float]) -> list[dict]:
    """11 entries of 5 methods, the shape of the full Fashion-MNIST comparison."""
    rng = np.random.default_rng(1)
    grid = [("sgd_momentum", [None]), ("sgd_nesterov", [None]), ("zo_momentum", [0.05]),
            ("zo_nesterov", [0.02, 0.05, 0.1]), ("noise_injection", [0.02, 0.05, 0.1, 0.2, 0.3])]
    entries = []
    for method, etas in grid:
        for eta in etas:
            clean = rng.uniform(0.78, 0.9)
            slope = rng.uniform(0.5, 2.5)
            mean = [max(0.1, clean - slope * lvl ** 1.5) for lvl in levels]
            entries.append({"label": Variant(level=eta).label(method), "method": method,
                            "sigma": None, "level": eta, "seeds": [0, 1, 2], "clean_mean": clean,
                            "clean_std": 0.004, "level_mean": mean,
                            "level_std": [0.004 + 0.05 * lvl for lvl in levels]})
    return entries


def _overlaps_an_axes(fig, legend) -> bool:
    fig.canvas.draw()
    box = legend.get_window_extent()
    return any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)


@pytest.mark.parametrize("noise", ["relative", "multiplicative"])
def test_plots_draw_one_styled_curve_per_entry_with_the_legend_outside(tmp_path, noise):
    import matplotlib.pyplot as plt

    levels = [0.0, 0.02, 0.05, 0.1, 0.2]
    entries = _many_entries(levels)
    fig = robustness_figure(entries, levels, noise, draws=50)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == [e["label"] for e in entries]
    styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len(styles) == len(entries)  # every entry distinguishable
    colors = {e["method"]: set() for e in entries}
    for e, ln in zip(entries, lines):
        colors[e["method"]].add(ln.get_color())
    assert all(len(c) == 1 for c in colors.values())  # one colour per method
    assert ax.get_ylabel() == "test accuracy (%)" and "fraction" in ax.get_xlabel()
    assert "±1 std over seeds" in ax.get_title()
    assert not _overlaps_an_axes(fig, ax.get_legend())
    plt.close(fig)

    fig = frontier_figure(entries, levels, noise)
    assert len(fig.axes) == 2  # η = 0.1 and η = 0.2
    assert all(not ax.texts for ax in fig.axes)  # no labels beside the points
    assert not _overlaps_an_axes(fig, fig.axes[-1].get_legend())
    plt.close(fig)

    plot_robustness(entries, levels, noise, tmp_path / "robustness.png", draws=50)
    plot_frontier(entries, levels, tmp_path / "frontier.png", noise=noise)
    for name in ("robustness.png", "frontier.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_ends_by_saying_where_the_results_are(tmp_path):
    from robusttrain.commands.compare import _where

    for name in ["report.md", "relative/robustness.png", "runs/sgd/seed0/result.json"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    text = _where(tmp_path)
    assert f"Results in {tmp_path}/: relative/robustness.png, report.md" in text
    assert "result.json" not in text and f"{tmp_path}/runs/" in text
    assert "Reading the table" in text
