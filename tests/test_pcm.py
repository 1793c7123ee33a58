"""The PCM deployment step: each part of IBM aihwkit's statistical model (programming noise, drift
exponents, drift, 1/f read noise, global drift compensation, the conductance-pair mapping) against
its own formula, written out here again with its coefficients so that a changed coefficient in
:mod:`robusttrain.noise.deployment` fails a test; plus restoration, parsing and seeding.

Statistical checks: a sample moment from n independent draws must lie within K standard errors of
its exact value, the standard error computed from the exact distribution (for a sample std of
normals σ/√(2n); for a mean sd/√n; for a mean of X² with X ~ N(μ, σ), √((4μ²σ² + 2σ⁴)/n)).
K = 4.5: a two-sided normal tail of about 7e-6 per check, so the ~70 checks of this file together
fail by chance with probability below 1e-3; with fixed seeds they are deterministic anyway.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robusttrain.models import MLP
from robusttrain.noise.deployment import PRESETS, Deployment, deployed, parse_deployment
from robusttrain.noise.pcm import PCM

pytestmark = pytest.mark.usefixtures("single_thread")

K = 4.5
N = 100_000  # devices per checked condition
T0, T_READ = 20.0, 250e-9  # s (aihwkit PCMLikeNoiseModel t_0, t_read)
YEAR = 365 * 24 * 3600


# ----- the published formulas, independently of the module under test ---------------------------
# aihwkit src/aihwkit/inference/noise/pcm.py (PCMLikeNoiseModel) and docs/source/pcm_inference.rst


def sigma_prog(g_hat: float, g_max: float) -> float:
    """Programming-noise std (µS) at normalized target ĝ, the fit made at g_max = 25 µS."""
    return max(0.26348 + 1.9650 * g_hat - 1.1731 * g_hat**2, 0.0) * g_max / 25.0


def nu_moments(g_hat: float) -> tuple[float, float]:
    """(μ_ν, σ_ν) of the normal that the drift exponent is folded from."""
    log_g = math.log(max(g_hat, 1e-7))
    mean = min(max(-0.0155 * log_g + 0.0244, 0.049), 0.1)
    std = min(max(-0.0125 * log_g - 0.0059, 0.008), 0.045)
    return mean, std


def folded_normal_mean(mu: float, sigma: float) -> float:
    """E|X| for X ~ N(μ, σ²)."""
    phi = 0.5 * (1 + math.erf(-mu / (sigma * math.sqrt(2))))  # Φ(−μ/σ)
    return sigma * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * sigma**2)) + mu * (1 - 2 * phi)


def sigma_read(g_hat_prog: float, t_inference: float) -> float:
    """Relative 1/f read-noise std at t = t_inference + t₀."""
    q_s = min(0.0088 / max(g_hat_prog**0.65, 1e-3), 0.2)
    t = t_inference + T0
    return q_s * math.sqrt(math.log((t + T_READ) / (2 * T_READ)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _level(g_hat: float, g_max: float = 25.0, n: int = N) -> torch.Tensor:
    return torch.full((n,), g_hat * g_max, dtype=torch.float64)


def _within(sample: float, exact: float, standard_error: float) -> bool:
    return abs(sample - exact) <= K * standard_error


def _one_level_weights(level: float, n: int = N, sign: float = 1.0) -> torch.Tensor:
    """n weights at ``sign·level`` after one weight 1.0 that sets max|W| (so ĝ = level)."""
    w = torch.full((n + 1,), sign * level, dtype=torch.float64)
    w[0] = 1.0
    return w


# ----- programming noise ---------------------------------------------------------------------------


@pytest.mark.parametrize("g_max", [25.0, 40.0])
@pytest.mark.parametrize("g_hat", [0.1, 0.3, 0.6, 1.0])
def test_programming_noise_is_unbiased_with_the_polynomial_std(g_hat, g_max):
    # ĝ ≥ 0.1 lies ≥ 5.5 σ_prog above 0, so the clamp at 0 changes no moment measurably
    step = PCM(g_max=g_max)
    target = _level(g_hat, g_max)
    g_prog = step.program(target, _gen(1))
    sigma = sigma_prog(g_hat, g_max)
    assert _within(float(g_prog.mean()), g_hat * g_max, sigma / math.sqrt(N))
    assert _within(float(g_prog.std()), sigma, sigma / math.sqrt(2 * N))


def test_programming_noise_scale_multiplies_the_std_and_zero_turns_it_off():
    target = _level(0.5)
    half = PCM(prog_noise_scale=0.5).program(target, _gen(2))
    assert _within(float(half.std()), 0.5 * sigma_prog(0.5, 25.0), 0.5 * sigma_prog(0.5, 25.0)
                   / math.sqrt(2 * N))
    assert torch.equal(PCM(prog_noise_scale=0.0).program(target, _gen(2)), target)


def test_a_device_programmed_to_zero_is_clamped_to_a_half_normal():
    # target 0: g_prog = max(0, σ₀·Z) (aihwkit clamps programmed conductances at 0), so
    # P(g_prog = 0) = 1/2, E g_prog = σ₀/√(2π), E g_prog² = σ₀²/2
    sigma = sigma_prog(0.0, 25.0)
    g_prog = PCM().program(_level(0.0), _gen(16))
    assert bool((g_prog >= 0).all())
    assert _within(float((g_prog == 0).double().mean()), 0.5, 0.5 / math.sqrt(N))
    sd = sigma * math.sqrt(0.5 - 1 / (2 * math.pi))
    assert _within(float(g_prog.mean()), sigma / math.sqrt(2 * math.pi), sd / math.sqrt(N))


def test_programming_noise_std_follows_the_polynomial_on_a_grid():
    g_hat = torch.linspace(0, 1, 101, dtype=torch.float64)
    for g_max in (25.0, 10.0):
        got = PCM(g_max=g_max).programming_noise_std(g_hat * g_max)
        exact = torch.tensor([sigma_prog(float(g), g_max) for g in g_hat], dtype=torch.float64)
        assert torch.allclose(got, exact, rtol=1e-12, atol=0)


def test_a_device_programmed_to_zero_ends_half_normal_and_the_pair_maps_back():
    # w = ±0.5 with max|W| = 1: one device at ĝ = 0.5, its partner at 0; the partner's programming
    # noise is clamped at 0 (aihwkit), so it is max(0, N(0, σ₀)): mean σ₀/√(2π), variance
    # σ₀²(1/2 − 1/(2π)); read back, w' − w = (δ⁺ − δ⁻)/g_max with δ the two devices' errors
    step = PCM(drift_scale=0.0, read_noise_scale=0.0, t_inference=0.0)
    sigma_on, sigma_off = sigma_prog(0.5, 25.0), sigma_prog(0.0, 25.0)
    # raw moments E[max(0, Z)^k], k = 1..4, of a standard normal Z: 1/√(2π), 1/2, √(2/π), 3/2
    m1, m2, m3, m4 = 1 / math.sqrt(2 * math.pi), 0.5, math.sqrt(2 / math.pi), 1.5
    mean_off = sigma_off * m1
    var_off = sigma_off**2 * (m2 - m1**2)
    mu4_off = sigma_off**4 * (m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4)  # central
    var = sigma_on**2 + var_off
    mu4 = 3 * sigma_on**4 + 6 * sigma_on**2 * var_off + mu4_off  # of the independent sum
    sd = math.sqrt(var) / 25.0
    se_sd = math.sqrt((mu4 - var**2) / N) / (2 * math.sqrt(var)) / 25.0  # delta method
    for sign in (1.0, -1.0):
        w = _one_level_weights(0.5, sign=sign)
        out = w.clone()
        step.apply(out, _gen(3))
        error = (out - w)[1:] * sign  # towards the weight's own sign
        assert _within(float(error.mean()), -mean_off / 25.0, sd / math.sqrt(N))
        assert _within(float(error.std()), sd, se_sd)


# ----- drift ----------------------------------------------------------------------------------------


def test_drift_exponent_moments_follow_the_clamped_fits_on_a_grid():
    g_hat = torch.logspace(-9, 0, 91, dtype=torch.float64)
    mean, std = PCM().drift_exponent_moments(g_hat * 25.0)
    exact = [nu_moments(float(g)) for g in g_hat]
    assert torch.allclose(mean, torch.tensor([m for m, _ in exact], dtype=torch.float64),
                          rtol=1e-12, atol=0)
    assert torch.allclose(std, torch.tensor([s for _, s in exact], dtype=torch.float64),
                          rtol=1e-12, atol=0)


@pytest.mark.parametrize("g_hat", [0.0, 1e-3, 0.05, 0.2, 0.5, 1.0])
def test_drift_exponents_are_a_folded_normal_with_the_fitted_moments(g_hat):
    # ν = |X|, X ~ N(μ_ν, σ_ν): E ν = folded-normal mean, E ν² = μ² + σ² (folding keeps X²);
    # ĝ = 0 and 1e-3 sit on both upper clamps (μ = 0.1, σ = 0.045) where 1.3 % of X is < 0
    mu, sigma = nu_moments(g_hat)
    nu = PCM().drift_exponents(_level(g_hat), _gen(4))
    mean_abs = folded_normal_mean(mu, sigma)
    sd_abs = math.sqrt(mu**2 + sigma**2 - mean_abs**2)
    assert _within(float(nu.mean()), mean_abs, sd_abs / math.sqrt(N))
    se_square = math.sqrt((4 * mu**2 * sigma**2 + 2 * sigma**4) / N)
    assert _within(float((nu**2).mean()), mu**2 + sigma**2, se_square)
    assert bool((nu >= 0).all())
    doubled = PCM(drift_scale=2.0).drift_exponents(_level(g_hat), _gen(4))
    assert torch.allclose(doubled, 2 * nu, rtol=1e-12, atol=0)


@pytest.mark.parametrize("t_inference", [0.0, 20.0, 3600.0, float(YEAR)])
@pytest.mark.parametrize("g_hat", [0.02, 0.5])
def test_drift_mean_log_decay_is_minus_mean_nu_times_log_t_over_t0(t_inference, g_hat):
    # no programming or read noise: w(t)/w = (t/t₀)^(−ν), t = t_inference + t₀ (aihwkit counts
    # t_inference from the end of programming and adds t₀), so E log(w(t)/w) = −E ν·log(t/t₀)
    step = PCM(t_inference=t_inference, prog_noise_scale=0.0, read_noise_scale=0.0)
    w = _one_level_weights(g_hat)
    out = w.clone()
    step.apply(out, _gen(5))
    log_ratio = torch.log(out[1:] / w[1:])
    mu, sigma = nu_moments(g_hat)
    mean_nu = folded_normal_mean(mu, sigma)
    sd_nu = math.sqrt(mu**2 + sigma**2 - mean_nu**2)
    log_t = math.log((t_inference + T0) / T0)
    if t_inference == 0:
        assert torch.allclose(out, w, rtol=1e-12, atol=0)  # the first read: no drift yet
    else:
        assert _within(float(log_ratio.mean()), -mean_nu * log_t, sd_nu * log_t / math.sqrt(N))
        # E log² = E ν²·log²(t/t₀) = (μ² + σ²)·log², the square blind to the folding
        se_square = math.sqrt((4 * mu**2 * sigma**2 + 2 * sigma**4) / N) * log_t**2
        assert _within(float((log_ratio**2).mean()), (mu**2 + sigma**2) * log_t**2, se_square)
    assert float(out[0]) <= 1.0  # the max device drifts down too


# ----- read noise -----------------------------------------------------------------------------------


def test_read_noise_std_follows_q_s_and_grows_with_log_t_on_a_grid():
    g_hat = torch.logspace(-6, 0, 61, dtype=torch.float64)
    for t_inference in (0.0, 1.0, 3600.0, float(YEAR)):
        got = PCM(t_inference=t_inference).read_noise_std(g_hat * 25.0)
        exact = torch.tensor([sigma_read(float(g), t_inference) for g in g_hat],
                             dtype=torch.float64)
        assert torch.allclose(got, exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("t_inference", [0.0, 3600.0, float(YEAR)])
@pytest.mark.parametrize("g_hat", [0.1, 0.5, 1.0])
def test_read_noise_is_relative_gaussian_with_its_std_at_t(t_inference, g_hat):
    # no programming noise, no drift: w(t)/w − 1 ~ N(0, σ_read(ĝ, t)); σ_read ≤ 0.12 here, so
    # the clamp at 0 conductance (8 σ away) changes nothing measurable
    step = PCM(t_inference=t_inference, prog_noise_scale=0.0, drift_scale=0.0)
    w = _one_level_weights(g_hat)
    out = w.clone()
    step.apply(out, _gen(6))
    relative = out[1:] / w[1:] - 1
    sigma = sigma_read(g_hat, t_inference)
    assert _within(float(relative.mean()), 0.0, sigma / math.sqrt(N))
    assert _within(float(relative.std()), sigma, sigma / math.sqrt(2 * N))


def test_read_noise_scales_with_the_drifted_conductance_and_its_scale():
    # σ_nG = g_drift·Q_s(ĝ_prog)·√log(...): after a year's drift the noise shrinks with g_drift
    t_inference, g_hat = float(YEAR), 0.5
    w = _one_level_weights(g_hat)
    drift_only, both = w.clone(), w.clone()
    PCM(t_inference=t_inference, prog_noise_scale=0.0, read_noise_scale=0.0).apply(drift_only,
                                                                                   _gen(7))
    PCM(t_inference=t_inference, prog_noise_scale=0.0, read_noise_scale=2.0).apply(both, _gen(7))
    relative = both[1:] / drift_only[1:] - 1  # the same ν (same seed, same draw order)
    sigma = 2.0 * sigma_read(g_hat, t_inference)
    assert _within(float(relative.std()), sigma, sigma / math.sqrt(2 * N))


# ----- drift compensation ---------------------------------------------------------------------------


def _programmed(w: torch.Tensor, seed: int) -> torch.Tensor:
    """The programmed weights of chip ``seed``: the same draws, read at t₀ without read noise."""
    out = w.clone()
    PCM(t_inference=0.0, read_noise_scale=0.0).apply(out, _gen(seed))
    return out


def test_compensation_restores_the_programmed_mean_abs_weight_after_a_year():
    torch.manual_seed(8)
    w = torch.randn(256, 256, dtype=torch.float64)
    programmed = _programmed(w, 9)
    plain, compensated = w.clone(), w.clone()
    PCM(t_inference=float(YEAR)).apply(plain, _gen(9))
    PCM(t_inference=float(YEAR), drift_compensation=True).apply(compensated, _gen(9))
    reference = float(programmed.abs().sum())
    # E(t/t₀)^(−ν) = exp(−μL + σ²L²/2) for ν ~ N(μ, σ), L = log(t/t₀) ≈ 14.3 after a year: at
    # most 0.51 over the clamped fits (at μ = 0.049, the floor), so the uncompensated sum keeps
    # about half at most (read noise has mean 0); 0.6 leaves room for the folding and sampling
    assert float(plain.abs().sum()) < 0.6 * reference
    assert float(compensated.abs().sum()) == pytest.approx(reference, rel=1e-12)
    alpha = compensated.abs().sum() / plain.abs().sum()  # one scalar per tensor
    assert torch.allclose(compensated, alpha * plain, rtol=1e-12, atol=1e-15)


def test_compensation_equals_aihwkit_one_hot_readout_of_a_linear_layer():
    # aihwkit's GlobalDriftCompensation reads the tile with the one-hot inputs eye(in_features)
    # and compares mean|output| with the same readout right after programming; its α multiplies
    # the analog output, before the digital bias. Here α is folded into the weights, equivalently.
    torch.manual_seed(10)
    layer = nn.Linear(64, 32).double()
    eye = torch.eye(64, dtype=torch.float64)
    with deployed(layer, [PCM(t_inference=0.0, read_noise_scale=0.0)], device_seed=11):
        reference = (layer(eye) - layer.bias).abs().mean()
    with deployed(layer, [PCM(t_inference=1e5)], device_seed=11):
        drifted = (layer(eye) - layer.bias).abs().mean()
    with deployed(layer, [PCM(t_inference=1e5, drift_compensation=True)], device_seed=11):
        compensated = layer(eye) - layer.bias
    with deployed(layer, [PCM(t_inference=1e5)], device_seed=11):
        aihwkit = (layer(eye) - layer.bias) * (reference / drifted)  # α on the tile output
    assert torch.allclose(compensated, aihwkit, rtol=1e-10, atol=1e-14)


def test_compensation_leaves_an_undrifted_chip_alone():
    torch.manual_seed(12)
    w = torch.randn(40, 30, dtype=torch.float64)
    a, b = w.clone(), w.clone()
    PCM(t_inference=0.0, read_noise_scale=0.0).apply(a, _gen(13))
    PCM(t_inference=0.0, read_noise_scale=0.0, drift_compensation=True).apply(b, _gen(13))
    assert torch.allclose(a, b, rtol=1e-12, atol=0)  # α = 1 with nothing to compensate


# ----- the step in a deployment ---------------------------------------------------------------------


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _same(model, state):
    return all(torch.equal(a, b) for a, b in zip(list(model.parameters()) + list(model.buffers()),
                                                 state))


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).flatten(1))


@pytest.mark.parametrize("compensate", [False, True])
def test_deployed_changes_weights_keeps_biases_digital_and_restores_bit_for_bit(compensate):
    torch.manual_seed(14)
    for model, x in ((MLP(64, [128], 10), torch.randn(4, 64)), (_ConvNet(), torch.randn(2, 1, 8, 8))):
        model.eval()
        state = _state(model)
        clean = model(x)
        biases = {n: p.detach().clone() for n, p in model.named_parameters()
                  if not n.endswith("weight") or "norm" in n}
        weights = {n: p.detach().clone() for n, p in model.named_parameters()
                   if n.endswith("weight") and "norm" not in n}
        step = PCM(t_inference=86400.0, drift_compensation=compensate)
        with deployed(model, [step], device_seed=1):
            assert not torch.equal(model(x), clean)
            now = dict(model.named_parameters())
            assert all(torch.equal(now[n], v) for n, v in biases.items())  # digital
            assert all(not torch.equal(now[n], v) for n, v in weights.items())  # on the chip
        assert _same(model, state) and torch.equal(model(x), clean)
        with pytest.raises(RuntimeError, match="boom"):
            with deployed(model, [step]):
                raise RuntimeError("boom")
        assert _same(model, state) and torch.equal(model(x), clean)


def test_the_device_seed_fixes_the_chip():
    torch.manual_seed(15)
    model = MLP(16, [32], 4)
    x = torch.randn(8, 16)
    runs = {}
    for seed in (3, 3, 4):
        with deployed(model, [PCM(t_inference=3600.0)], device_seed=seed, inference_seed=seed + 1):
            runs.setdefault(seed, []).append(model(x))
    assert torch.equal(runs[3][0], runs[3][1]) and not torch.equal(runs[3][0], runs[4][0])


def test_one_chip_has_the_same_draws_whatever_the_time_and_scales():
    # every draw is made in full, in a fixed order (programming ε, ν's ε, read ε), whatever the
    # settings: a sweep over t_inference or a scale follows one chip
    w = _one_level_weights(0.5, n=2000)
    year = float(YEAR)

    def run(**fields):
        out = w.clone()
        PCM(**fields).apply(out, _gen(5))
        return out[1:]

    # the programming: the same at one second and after a year
    early = run(t_inference=1.0, drift_scale=0.0, read_noise_scale=0.0)
    assert torch.equal(early, run(t_inference=year, drift_scale=0.0, read_noise_scale=0.0))
    assert not torch.equal(early, w[1:])
    # ν: the same with and without programming noise (a vanishing one, 1e-9 of the model, so
    # that the drift factors can be compared; another ν draw would differ by ~10 %)
    without = run(t_inference=year, prog_noise_scale=0.0, read_noise_scale=0.0)
    with_some = run(t_inference=year, prog_noise_scale=1e-9, read_noise_scale=0.0)
    assert torch.allclose(without, with_some, rtol=1e-6, atol=0) and not torch.equal(without,
                                                                                     with_some)
    # the read noise ε: the same with and without drift
    drifted = run(t_inference=year, prog_noise_scale=0.0, read_noise_scale=0.0)
    with_drift = run(t_inference=year, prog_noise_scale=0.0) / drifted - 1
    without_drift = run(t_inference=year, prog_noise_scale=0.0, drift_scale=0.0) / w[1:] - 1
    assert torch.allclose(with_drift, without_drift, rtol=1e-9, atol=1e-15)


def test_an_all_zero_tensor_stays_zero():
    zero = torch.zeros(5, 5)
    PCM().apply(zero, _gen(0))  # no max|W| to map to g_max: nothing to program
    assert torch.equal(zero, torch.zeros(5, 5))


# ----- specifications -------------------------------------------------------------------------------


def test_yaml_presets_and_sweeps_of_t_inference(tmp_path):
    path = tmp_path / "pcm.yaml"
    path.write_text("- {kind: pcm, t_inference: 3600}\n")
    chip = parse_deployment(path)
    assert chip.steps == (PCM(t_inference=3600),) and chip.name == "pcm"
    assert chip.steps[0].g_max == 25.0 and not chip.steps[0].drift_compensation
    assert chip.random_device and not chip.random_inference
    swept = chip.replace("pcm", "t_inference", 86400)
    assert swept.steps == (PCM(t_inference=86400),)
    assert parse_deployment(swept.to_list()).steps == swept.steps
    assert "pcm(t_inference=86400" in swept.describe()
    assert parse_deployment("pcm").steps == (PCM(),)
    assert parse_deployment("pcm_compensated").steps == (PCM(drift_compensation=True),)
    assert set(PRESETS) >= {"pcm", "pcm_compensated"}
    quiet = Deployment((PCM(t_inference=0.0, prog_noise_scale=0.0, read_noise_scale=0.0),))
    assert not quiet.random_device  # no noise and no time to drift: one chip is enough


@pytest.mark.parametrize("fields, message", [
    ({"t_inference": -1}, "t_inference must be a finite number >= 0"),
    ({"t_inference": "1h"}, "t_inference must be a finite number >= 0"),
    ({"t_inference": float("inf")}, "t_inference must be a finite number >= 0"),
    ({"t_inference": True}, "t_inference must be a finite number >= 0"),
    ({"g_max": 0}, "g_max must be a finite number > 0"),
    ({"g_max": -25.0}, "g_max must be a finite number > 0"),
    ({"drift_compensation": "yes"}, "drift_compensation must be true or false"),
    ({"prog_noise_scale": -0.5}, "prog_noise_scale must be a finite number >= 0"),
    ({"drift_scale": float("nan")}, "drift_scale must be a finite number >= 0"),
    ({"read_noise_scale": None}, "read_noise_scale must be a finite number >= 0"),
    ({"t0": 20}, "unknown field"),
])
def test_bad_pcm_fields_are_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        parse_deployment([{"kind": "pcm", **fields}])
