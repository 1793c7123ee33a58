"""experiments/bench_variance.py end to end with --quick on random images: every row is there, the
files are written, the trained state is cached, and node perturbation beats Gaussian directions."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_variance.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_variance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


def _random_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    bench = _script()
    out, cache = tmp_path / "out", tmp_path / "cache"
    panels = bench.main(["--quick", "--out", str(out), "--cache", str(cache)], data=_random_data())
    assert [(p.network, p.state) for p in panels] == [("mlp", "init"), ("mlp", "trained")]
    for name in ("results.csv", "results.md", "results.json", "variance.png"):
        assert (out / name).stat().st_size > 0, name
    assert (cache / "mlp_adam_epochs2.pt").is_file()

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [(est, str(n)) for est, pairs in bench.QUICK_PAIRS.items() for n in pairs]
    for state in ("init", "trained"):
        got = [(r["estimator"], r["num_pairs"]) for r in rows if r["state"] == state]
        assert got == expected + [("backprop", "")], state
    for r in rows:
        assert r["network"] == "mlp" and r["repeats"] in ("2", "1")
        assert float(r["rel_mse"]) > 0 and float(r["ms"]) > 0
        assert (r["forward_only"] == "True") == (r["estimator"] != "backprop")
        if r["estimator"] != "backprop":
            n = int(r["num_pairs"])
            assert int(r["cost_forward"]) == 2 * n
            assert float(r["rel_mse_x_forward"]) == pytest.approx(2 * n * float(r["rel_mse"]))

    def rel_mse(state: str, estimator: str, n: int) -> float:
        (row,) = [r for r in rows if r["state"] == state and r["estimator"] == estimator
                  and r["num_pairs"] == str(n)]
        return float(row["rel_mse"])

    for state in ("init", "trained"):
        # node projects onto what the losses see: relative MSE of a few, against P/N ~ 10^4
        assert rel_mse(state, "node", 16) < rel_mse(state, "gaussian", 16) / 10
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"]["reference_draws"] == 256
    for panel_json in summary["panels"]:
        # the per-layer parts split the relative MSE exactly, and the layers cover every entry
        layers = panel_json["layers"]
        assert [layer["kind"] for layer in layers] == ["Linear", "Linear"]
        assert layers[0]["start"] == 0 and layers[-1]["stop"] == 784 * 128 + 128 + 128 * 10 + 10
        assert all(a["stop"] == b["start"] for a, b in zip(layers, layers[1:]))
        for key, parts in panel_json["layer_rel_mse"].items():
            estimator, n = key.split("/")
            assert sum(parts) == pytest.approx(rel_mse(panel_json["state"], estimator, int(n)),
                                               rel=1e-9), key
        # node perturbation gains in every Linear layer, not only in total
        parts_of = panel_json["layer_rel_mse"]
        assert all(a < b for a, b in zip(parts_of["node/16"], parts_of["gaussian/16"]))
    assert "Each layer's part of the relative MSE at N = 16" in (out / "results.md").read_text()
    assert all(p["reference"]["rel_mse"] < 0.01 for p in summary["panels"])

    # the second run takes the trained state from the cache
    (panel,) = bench.main(["--quick", "--states", "trained", "--repeats", "1", "--out",
                           str(tmp_path / "again"), "--cache", str(cache)], data=_random_data())
    assert "cached" in panel.source


def test_bad_options_are_refused() -> None:
    bench = _script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--networks", "resnet"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--checkpoint", "mlp"])
