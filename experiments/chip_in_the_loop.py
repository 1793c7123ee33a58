"""Fine-tuning one black-box chip in the loop, against the references, on the same chips.

    python experiments/chip_in_the_loop.py --config experiments/chip_fashion_mlp.yaml
    python experiments/chip_in_the_loop.py --config ... --report-only   # tables and figure again

For every target deployment of the study config and every chip k (``SimulatedChip(target,
seed=draw_seed(chip_seed, k))``, faults fixed for its life, fresh read noise per inference):

* ``ptq`` — the float backprop model (``float.config``), programmed as it is;
* ``qat_noise`` — QAT + noise trained for the target (a fresh chip per step: the distribution of
  chips), from the float model (``qat_noise.config``), one run per target;
* ``oracle`` — QAT told this chip's fault map (``chip_seed`` of
  :class:`robusttrain.training.QuantizationAwareClassifier`: white box), one run per chip;
* ``chip_from_<start>`` — :class:`robusttrain.training.ChipInTheLoopClassifier` fine-tuning this
  chip from its logits only, started from ``<start>`` (``ptq`` or ``qat_noise``), one run per chip.

Each run is ``robusttrain fit --config <config> <overrides>`` into ``<out>/runs/...`` (its console
output in ``<run>.fit.log`` beside it); a finished
run (its ``finished`` marker) is not run again, so an interrupted study continues. Every model is
then tested on its chip: the 10,000 test images, ``test_reads`` runs of inferences (each its own
read noise). Written: ``<out>/chips.csv`` (one row per method, target, chip), ``<out>/report.md``
(mean ± std over chips, the gain over QAT + noise, the share of the gap to the oracle closed),
``<out>/queries.png`` (the chip's validation accuracy against training queries) — whole files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from robusttrain.data import ImageDataModule  # noqa: E402
from robusttrain.evaluation.robustness import draw_seed  # noqa: E402
from robusttrain.files import write_atomic  # noqa: E402
from robusttrain.noise import SimulatedChip  # noqa: E402
from robusttrain.training import load_checkpoint  # noqa: E402

FIELDS = ["method", "target", "chip", "chip_seed", "test_acc", "test_acc_std_reads",
          "train_chip_examples", "fit_seconds"]


def _fit(name: str, config: str, overrides: list[str], out: Path,
         report_only: bool = False) -> tuple[Path, float]:
    """Run ``robusttrain fit`` once (unless finished before); (last.ckpt, wall seconds)."""
    run_dir = out / "runs" / name
    marker = run_dir / "finished"
    if marker.exists():
        return run_dir / "checkpoints" / "last.ckpt", float(marker.read_text())
    if report_only:
        raise SystemExit(f"--report-only: {run_dir} has not finished; run the study without it")
    logger = ["--trainer.logger.init_args.save_dir", str(out / "runs"),
              "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", ""]
    command = [sys.executable, "-m", "robusttrain", "fit", "--config", config, *overrides, *logger]
    print(f"[{name}] robusttrain fit --config {config} {' '.join(overrides)}", flush=True)
    log = run_dir.with_name(run_dir.name + ".fit.log")  # beside the run's folder
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(command, cwd=ROOT, check=True, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    marker.write_text(f"{seconds:.1f}")
    return run_dir / "checkpoints" / "last.ckpt", seconds


def _chip_accuracy(model: torch.nn.Module, target: Any, seed: int, x: torch.Tensor,
                   y: torch.Tensor, reads: int) -> list[float]:
    """Accuracy of ``model`` through chip ``seed`` of ``target``: one value per run of inferences."""
    chip = SimulatedChip(target, seed=seed)
    chip.program(model)
    accs = []
    for _ in range(reads):
        hits = sum(int((chip.run(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
                   for i in range(0, len(y), 1000))
        accs.append(hits / len(y))
    return accs


def _queries(run_dir: Path) -> list[tuple[float, float]]:
    """(training chip examples, validation accuracy on the chip) of a fine-tune's validations."""
    with open(run_dir / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/acc")]
    return [(float(r["chip/val_at_train_examples"]), float(r["val/acc"])) for r in rows]


def run_study(cfg: dict[str, Any], out: Path, report_only: bool) -> list[dict[str, Any]]:
    chips = [draw_seed(int(cfg["chip_seed"]), k) for k in range(int(cfg["chips"]))]
    data = ImageDataModule(**cfg["data"])
    data.setup("fit")
    rows: list[dict[str, Any]] = []
    curves: dict[Any, Any] = {}  # (fine-tune, target) -> per chip [(train examples, val acc)]
    references: dict[Any, list[float]] = {}  # (ptq|qat_noise|oracle, target) -> val acc per chip

    def fit(name: str, config: str, overrides: list[str]) -> tuple[Path, float]:
        return _fit(name, config, overrides, out, report_only)

    float_ckpt, float_s = fit("float", cfg["float"]["config"], cfg["float"].get("overrides", []))
    for target_name, target in cfg["targets"].items():
        dep = json.dumps(target)
        models: dict[str, tuple[Path, float]] = {"ptq": (float_ckpt, float_s)}
        models["qat_noise"] = fit(f"qat_noise/{target_name}", cfg["qat_noise"]["config"],
                                  [*cfg["qat_noise"].get("overrides", []),
                                   "--model.init_args.deployment", dep,
                                   "--model.init_args.init_from", str(float_ckpt)])
        for k, seed in enumerate(chips):
            per_chip = dict(models)
            per_chip["oracle"] = fit(f"oracle/{target_name}/chip{k}", cfg["oracle"]["config"],
                                     [*cfg["oracle"].get("overrides", []),
                                      "--model.init_args.deployment", dep,
                                      "--model.init_args.chip_seed", str(seed),
                                      "--model.init_args.init_from", str(float_ckpt)])
            for method, start, extra in _fine_tunes(cfg, target_name):
                name = f"{method}/{target_name}/chip{k}"
                per_chip[method] = fit(
                    name, cfg["chip_finetune"]["config"],
                    [*cfg["chip_finetune"].get("overrides", []), *extra,
                     "--model.init_args.chip.init_args.deployment", dep,
                     "--model.init_args.chip.init_args.seed", str(seed),
                     "--model.init_args.init_from", str(models[start][0])])
                curves.setdefault((method, target_name), []).append(
                    _queries(out / "runs" / name))
            for method, (ckpt, seconds) in per_chip.items():
                loaded = load_checkpoint(ckpt)
                accs = _chip_accuracy(loaded.backbone, target, seed, data.test_x, data.test_y,
                                      int(cfg["test_reads"]))
                examples = torch.load(ckpt, map_location="cpu", weights_only=True)[
                    "robusttrain"].get("train_queries", [0, 0, 0])[2]
                rows.append({"method": method, "target": target_name, "chip": k,
                             "chip_seed": seed, "test_acc": float(np.mean(accs)),
                             "test_acc_std_reads": float(np.std(accs, ddof=1)),
                             "train_chip_examples": int(examples), "fit_seconds": seconds})
                print(f"  {target_name} chip {k} {method}: {100 * np.mean(accs):.2f}%", flush=True)
            # the starting points of the curves: the start model on this chip's validation split
            # the same validation split through the same chip for the starts and references
            val = {m: _chip_accuracy(load_checkpoint(per_chip[m][0]).backbone, target, seed,
                                     data.val_x, data.val_y, 1)[0]
                   for m in ("ptq", "qat_noise", "oracle")}
            for m, acc in val.items():
                references.setdefault((m, target_name), []).append(acc)
            for method, start, _ in _fine_tunes(cfg, target_name):
                curves[(method, target_name)][-1].insert(0, (0.0, val[start]))
    _write_rows(rows, out)
    _write_report(rows, cfg, out)
    _plot(curves, references, cfg, out)
    return rows


def _fine_tunes(cfg: dict[str, Any], target: str) -> list[tuple[str, str, list[str]]]:
    """(method name, start, extra overrides) of every chip fine-tune of ``target``.

    ``chip_finetune.starts``: ``chip_from_<start>`` with the config as it is;
    ``chip_finetune.variants``: ``{name: {start, overrides, targets}}``, more fine-tunes with
    options of their own, on the listed targets (default: all).
    """
    tunes = [(f"chip_from_{start}", start, []) for start in cfg["chip_finetune"]["starts"]]
    for name, variant in cfg["chip_finetune"].get("variants", {}).items():
        if target in variant.get("targets", [target]):
            tunes.append((name, variant["start"], list(variant.get("overrides", []))))
    return tunes


def _write_rows(rows: list[dict[str, Any]], out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "chips.csv", buffer.getvalue())


METHOD_ORDER = ["ptq", "qat_noise", "oracle", "chip_from_ptq", "chip_from_qat_noise"]


def _write_report(rows: list[dict[str, Any]], cfg: dict[str, Any], out: Path) -> None:
    lines = [f"# {cfg['name']}: one chip in the loop", "",
             f"`python experiments/chip_in_the_loop.py --config {cfg['source']}`. "
             f"{cfg['chips']} chips per target; test accuracy through each model's chip "
             f"(10,000 test images, {cfg['test_reads']} runs of inferences, each its own read "
             "noise), mean ± std over the chips. chip_from_*: the forward-only fine-tune of that "
             "chip; oracle: QAT told that chip's fault map.", ""]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(METHOD_ORDER))  # the variants
    lines += ["| method | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for m in methods:
        cells = []
        for t in targets:
            accs = [100 * r["test_acc"] for r in rows if r["method"] == m and r["target"] == t]
            cells.append(f"{np.mean(accs):.2f} ± {np.std(accs, ddof=1):.2f}" if accs else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Per chip, against QAT + noise on the same chip (points; mean ± std over chips) "
              "and the share of the gap QAT + noise → oracle that the fine-tune closes "
              "(mean of the per-chip gains over the mean gap; \"no gap\" below half a point):", "",
              "| fine-tune | target | gain over qat_noise | gap to oracle | closed | chip "
              "examples | fit s |", "|---|---|---|---|---|---|---|"]
    for m in [m for m in methods if m not in ("ptq", "qat_noise", "oracle")]:
        for t in targets:
            mine, qat, oracle = (_per_chip(rows, method, t) for method in (m, "qat_noise", "oracle"))
            if not len(mine):
                continue
            gain, gap = mine - qat, oracle - qat
            mine_rows = [r for r in rows if r["method"] == m and r["target"] == t]
            examples = np.mean([r["train_chip_examples"] for r in mine_rows])
            seconds = np.mean([r["fit_seconds"] for r in mine_rows])
            # a share of a gap smaller than the read-noise spread of one chip's accuracy means nothing
            closed = f"{100 * gain.mean() / gap.mean():.0f}%" if gap.mean() >= 0.5 else "no gap"
            lines.append(f"| {m} | {t} | {gain.mean():+.2f} ± {gain.std(ddof=1):.2f} | "
                         f"{gap.mean():+.2f} | {closed} | {examples:.3g} | {seconds:.0f} |")
    write_atomic(out / "report.md", "\n".join(lines) + "\n")


def _per_chip(rows: list[dict[str, Any]], method: str, target: str) -> np.ndarray:
    """Test accuracies (%) of ``method`` on ``target``, in chip order."""
    mine = sorted((r for r in rows if r["method"] == method and r["target"] == target),
                  key=lambda r: r["chip"])
    return np.array([100 * r["test_acc"] for r in mine])


def _plot(curves: dict[Any, Any], references: dict[Any, list[float]], cfg: dict[str, Any],
          out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(cfg["targets"])
    fig, axes = plt.subplots(1, len(targets), figsize=(max(5.4 * len(targets), 8.0), 4.4), squeeze=False)
    lines = {"ptq": "tab:gray", "qat_noise": "tab:blue", "oracle": "tab:green"}
    tunes = list(dict.fromkeys(m for m, _ in curves))
    palette = ["tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    labels: dict[str, Any] = {}
    for ax, t in zip(axes[0], targets):
        for method, colour in zip(tunes, palette):
            runs = curves.get((method, t))
            if not runs:
                continue
            xs = np.array([q for q, _ in runs[0]])
            ys = np.array([[a for _, a in run] for run in runs]) * 100
            labels[method] = ax.plot(xs / 1e6, ys.mean(0), color=colour, marker="o",
                                     markersize=3, label=method)[0]
            ax.fill_between(xs / 1e6, ys.min(0), ys.max(0), color=colour, alpha=0.15)
        for m, colour in lines.items():
            accs = references.get((m, t))
            if accs:
                labels[m] = ax.axhline(100 * np.mean(accs), color=colour, linestyle="--",
                                       linewidth=1, label=f"{m} (no chip queries)")
        values = [100 * a for (m, tt), accs in references.items() if tt == t for a in accs]
        values += [100 * a for (m, tt), runs in curves.items() if tt == t
                   for run in runs for _, a in run]
        if values:  # every reference line inside the axes, with a margin
            span = max(values) - min(values)
            ax.set_ylim(min(values) - 0.06 * span, max(values) + 0.06 * span)
        ax.set_title(t)
        ax.set_xlabel("chip queries of training (million examples)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy through the chip (%)")
    fig.legend(list(labels.values()), [h.get_label() for h in labels.values()],
               loc="lower center", ncol=min(4, 1 + len(labels) // 2), frameon=False)
    fig.suptitle(f"{cfg['name']}: accuracy through each chip against its fine-tune's queries\n"
                 f"(mean of {cfg['chips']} chips; band: min to max)", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 0.93))
    tmp = out / ".queries.png.partial"
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, out / "queries.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="default: experiments/results/<name>")
    parser.add_argument("--report-only", action="store_true",
                        help="only evaluate finished runs and write the tables and figure")
    parser.add_argument("--chips", type=int, help="only the first K chips (default: the config's)")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(args.config.read_text())
    if args.chips is not None:
        cfg["chips"] = args.chips
    cfg["source"] = str(args.config)
    out = args.out or ROOT / "experiments" / "results" / cfg["name"]
    out.mkdir(parents=True, exist_ok=True)
    run_study(cfg, out.resolve(), args.report_only)
    print(f"wrote {out / 'report.md'}, {out / 'chips.csv'} and {out / 'queries.png'}")


if __name__ == "__main__":
    main()
