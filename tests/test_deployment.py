"""Deployment models: each step does what it says (values, rates, seeds), the model always comes
back bit for bit, and bad specifications are clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robusttrain.evaluation.deployment import (
    evaluate_deployment,
    format_deployment_table,
    parse_sweep,
    write_deployment_report,
)
from robusttrain.models import MLP
from robusttrain.noise.deployment import (
    PRESETS,
    BitFlips,
    Deployment,
    OutputQuantize,
    Quantize,
    ReadNoise,
    StuckAt,
    deployed,
    parse_deployment,
    quantize_tensor,
)

pytestmark = pytest.mark.usefixtures("single_thread")

K = 4.5  # tolerance in standard deviations for the rate checks (two-sided p ≈ 7e-6 each)


def _model():
    torch.manual_seed(0)
    return MLP(64, [128], 10)


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _same(model, state):
    return all(torch.equal(a, b) for a, b in zip(list(model.parameters()) + list(model.buffers()),
                                                 state))


# ----- quantization --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_tensor_has_2q_plus_1_levels_and_half_a_step_of_error(bits):
    torch.manual_seed(1)
    w = torch.randn(64, 32)
    out = quantize_tensor(w, bits)
    q = 2 ** (bits - 1) - 1
    delta = w.abs().max() / q
    assert out.unique().numel() <= 2 * q + 1
    assert torch.allclose(out / delta, torch.round(out / delta), atol=1e-4)  # on the grid
    assert (out - w).abs().max() <= delta / 2 + 1e-6  # round to nearest, no clipping
    assert out.abs().max() == pytest.approx(float(w.abs().max()))  # the range is kept


def test_quantize_per_channel_uses_each_rows_range_and_clip_limits_it():
    w = torch.tensor([[1.0, -0.6, 0.25], [100.0, 10.0, -3.0], [0.0, 0.0, 0.0]])
    per_tensor = quantize_tensor(w, 2)
    per_channel = quantize_tensor(w, 2, per_channel=True)
    assert torch.equal(per_tensor[0], torch.zeros(3))  # lost in the big row's range
    assert torch.equal(per_channel[0], torch.tensor([1.0, -1.0, 0.0]))  # its own range, Δ = 1
    assert torch.equal(per_channel[2], torch.zeros(3))  # an all-zero row stays zero
    torch.manual_seed(2)
    heavy = torch.randn(1000)
    heavy[0] = 50.0  # one outlier
    clipped = quantize_tensor(heavy, 4, clip=3.0)
    assert clipped.abs().max() <= 3.0 * heavy.std(unbiased=False) + 1e-5
    assert (clipped - heavy)[1:].abs().mean() < (quantize_tensor(heavy, 4) - heavy)[1:].abs().mean()


# ----- faults ----------------------------------------------------------------------------------


def _rate_ok(count, n, p):
    return abs(count - n * p) <= K * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("mode", ["zero", "max", "both"])
def test_stuck_at_breaks_a_fraction_p_of_weights_to_the_right_values(mode):
    torch.manual_seed(3)
    w = torch.randn(200, 100)
    high = w.abs().max()
    out = w.clone()
    StuckAt(0.1, mode).apply(out, torch.Generator().manual_seed(0))
    changed = out != w
    assert _rate_ok(int(changed.sum()), w.numel(), 0.1)
    values = out[changed]
    at_zero = values == 0
    at_max = values.abs() == high
    assert bool((at_zero | at_max).all())
    if mode == "zero":
        assert bool(at_zero.all())
    elif mode == "max":
        assert bool(at_max.all()) and _rate_ok(int((values > 0).sum()), values.numel(), 0.5)
    else:
        assert _rate_ok(int(at_zero.sum()), values.numel(), 0.5)


def test_faults_are_fixed_by_the_device_seed():
    w = torch.randn(50, 50)
    a, b, c = w.clone(), w.clone(), w.clone()
    StuckAt(0.05).apply(a, torch.Generator().manual_seed(7))
    StuckAt(0.05).apply(b, torch.Generator().manual_seed(7))
    StuckAt(0.05).apply(c, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bit_flips_flip_a_fraction_p_of_the_stored_bits():
    torch.manual_seed(4)
    w = torch.randn(100, 100)
    delta = w.abs().max() / 127
    stored = torch.round(w / delta).to(torch.int16) & 0xFF
    none = w.clone()
    BitFlips(0.0).apply(none, torch.Generator().manual_seed(0))
    assert torch.allclose(none, torch.round(w / delta) * delta)  # int8 storage alone
    out = w.clone()
    BitFlips(0.02).apply(out, torch.Generator().manual_seed(0))
    read = torch.round(out / delta).to(torch.int16) & 0xFF
    flipped_bits = sum(int((((stored ^ read) >> b) & 1).sum()) for b in range(8))
    assert _rate_ok(flipped_bits, 8 * w.numel(), 0.02)
    every = w.clone()
    BitFlips(1.0).apply(every, torch.Generator().manual_seed(0))
    q = torch.round(w / delta)
    assert torch.allclose(every / delta, -q - 1, atol=1e-3)  # ~x = −x − 1 in two's complement


# ----- read noise and converters -----------------------------------------------------------------


class _Recorder(nn.Module):
    """A Linear layer that records the weight it computes with."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(200, 50)
        self.seen = []
        self.fc.register_forward_hook(lambda m, i, o: self.seen.append(m.weight.detach().clone()))

    def forward(self, x):
        return self.fc(x)


def test_read_noise_is_fresh_at_every_pass_with_the_noise_models_scale():
    torch.manual_seed(5)
    model = _Recorder()
    clean = model.fc.weight.detach().clone()
    x = torch.randn(4, 200)
    with deployed(model, [ReadNoise(0.05)], inference_seed=1):
        model(x)
        model(x)
        assert torch.equal(model.fc.weight, clean)  # stored weights between passes
    first, second = (w - clean for w in model.seen)
    assert not torch.equal(first, second)
    # relative noise: std η·max|W|; the sample std of n = 10,000 normals is within 4.5/√(2n)
    target = 0.05 * clean.abs().max()
    for diff in (first, second):
        assert abs(float(diff.std() / target) - 1) < K / math.sqrt(2 * diff.numel())
    assert torch.equal(model.fc.weight, clean)


def test_inference_seed_repeats_the_read_noise():
    model = _model()
    x = torch.randn(8, 64)
    deployment = [Quantize(4), ReadNoise(0.1)]
    with deployed(model, deployment, inference_seed=3):
        a = model(x)
    with deployed(model, deployment, inference_seed=3):
        b = model(x)
    with deployed(model, deployment, inference_seed=4):
        c = model(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_output_quantize_limits_each_layer_output_to_2q_plus_1_values():
    torch.manual_seed(6)
    layer = nn.Linear(32, 64)
    x = torch.randn(16, 32)
    with deployed(layer, [OutputQuantize(3)]):
        out = layer(x)
    assert out.unique().numel() <= 7
    assert (out - layer(x)).abs().max() <= layer(x).abs().max() / 3 / 2 + 1e-6


def test_deployed_restores_parameters_buffers_and_hooks_also_on_error():
    model = _model()
    state = _state(model)
    x = torch.randn(4, 64)
    clean_out = model(x)
    everything = [Quantize(3, per_channel=True), StuckAt(0.05), BitFlips(0.01), ReadNoise(0.05),
                  OutputQuantize(6)]
    with deployed(model, everything, device_seed=1, inference_seed=2):
        assert not torch.equal(model(x), clean_out)
    assert _same(model, state) and torch.equal(model(x), clean_out)
    with pytest.raises(RuntimeError, match="boom"):
        with deployed(model, everything):
            model(x)
            raise RuntimeError("boom")
    assert _same(model, state) and torch.equal(model(x), clean_out)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_biases_stay_digital():
    model = _model()
    biases = [m.bias.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]
    with deployed(model, [Quantize(2), StuckAt(0.5)]):
        now = [m.bias.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(torch.equal(a, b) for a, b in zip(biases, now))


# ----- specifications ----------------------------------------------------------------------------


def test_presets_yaml_and_lists_parse_to_the_same_deployment(tmp_path):
    for name in PRESETS:
        deployment = parse_deployment(name)
        assert deployment.name == name
        assert parse_deployment(deployment.to_list()).steps == deployment.steps
    path = tmp_path / "chip.yaml"
    path.write_text("- {kind: quantize, bits: 3, per_channel: true}\n- {kind: stuck_at, p: 0.01}\n")
    chip = parse_deployment(path)
    assert chip.steps == (Quantize(3, per_channel=True), StuckAt(0.01)) and chip.name == "chip"
    assert chip.random_device and not chip.random_inference
    assert parse_deployment("int4_noisy").random_inference
    swept = chip.replace("quantize", "bits", 2)
    assert swept.steps[0] == Quantize(2, per_channel=True) and swept.steps[1] == StuckAt(0.01)


@pytest.mark.parametrize("spec, message", [
    ("int5", "neither a preset"),
    ([{"kind": "quantise", "bits": 4}], "unknown kind 'quantise'"),
    ([{"bits": 4}], "expected a mapping with a 'kind'"),
    ([{"kind": "quantize", "bits": 1}], "bits must be an integer from 2 to 16"),
    ([{"kind": "quantize", "bit": 4}], "unknown field"),
    ([{"kind": "stuck_at", "p": 1.5}], "p must be a probability"),
    ([{"kind": "read_noise", "noise": "gaussian", "level": 0.1}], "noise must be one of"),
    ([{"kind": "read_noise", "level": -0.1}], "level"),
    ([], "at least one step"),
])
def test_bad_deployments_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_deployment(spec)


def test_sweeping_a_step_the_deployment_lacks_is_an_error():
    with pytest.raises(ValueError, match="no stuck_at step"):
        Deployment((Quantize(4),)).replace("stuck_at", "p", 0.1)


def test_sweeping_a_field_the_step_lacks_is_an_error():
    with pytest.raises(ValueError, match="quantize has no field 'p'"):
        Deployment((Quantize(4),)).replace("quantize", "p", 0.1)


# ----- evaluation through a deployment -----------------------------------------------------------

def _exact_classifier():
    """A linear model whose labels are its own argmax: clean accuracy 1, hurt by coarse weights."""
    torch.manual_seed(7)
    layer = nn.Linear(16, 4)
    x = torch.randn(400, 16)
    with torch.no_grad():
        y = layer(x).argmax(dim=1)
    return layer, x, y


def test_evaluation_counts_draws_pairs_them_and_restores_the_models():
    layer, x, y = _exact_classifier()
    other = nn.Linear(16, 4)
    state = _state(layer)
    result = evaluate_deployment({"a": layer, "b": other}, x, y, "int4_faulty",
                                 sweep=("stuck_at", "p", [0.0, 0.05]), device_draws=3,
                                 inference_draws=2, progress=False)
    assert _same(layer, state)
    # at p = 0 no two chips differ: one chip, its 2 read-noise runs; at p = 0.05, 3 chips × 2
    assert len(result.rows) == 2 * (1 * 2 + 3 * 2)
    a = [(r["device_seed"], r["inference_seed"]) for r in result.rows if r["model"] == "a"]
    b = [(r["device_seed"], r["inference_seed"]) for r in result.rows if r["model"] == "b"]
    assert a == b  # the same chips and read noise for both models
    assert result.summaries["a"]["clean_accuracy"] == 1.0
    assert result.summaries["a"]["values"]["0.05"]["chips"] == 3
    assert "stuck_at.p=0.05" in format_deployment_table(result)


def test_coarser_weights_cost_accuracy_and_a_deterministic_deployment_is_drawn_once(tmp_path):
    layer, x, y = _exact_classifier()
    result = evaluate_deployment({"m": layer}, x, y, "int4", sweep=parse_sweep("quantize.bits=2,8"),
                                 device_draws=4, inference_draws=4, progress=False)
    assert len(result.rows) == 2  # no randomness: one evaluation per value
    values = result.summaries["m"]["values"]
    assert values["8"]["mean"] >= 0.97 and values["2"]["mean"] < values["8"]["mean"]
    paths = write_deployment_report(result, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"deployment.csv", "deployment.json",
                                                    "deployment.png"}
    assert paths["png"].stat().st_size > 0


@pytest.mark.parametrize("text, message", [("bits=2", "kind.field=v1,v2"),
                                           ("quantize.bits=two", "kind.field=v1,v2")])
def test_parse_sweep_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep(text)


def test_parse_sweep_keeps_integers_and_floats():
    assert parse_sweep("quantize.bits=2,3") == ("quantize", "bits", [2, 3])
    assert parse_sweep("read_noise.level=0,0.05") == ("read_noise", "level", [0, 0.05])
