"""A chip in the loop: the black-box chip, what a trainer may hold of it, the in-the-loop estimator
(unbiased for the chip's smoothed expected loss), query counting, and the white-box oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from blob_problem import blobs, loaders, sgd, trainer

from robusttrain.models import MLP, LeNet
from robusttrain.noise import ChipPort, ChipQueries, SimulatedChip, deployed, noisy_parameters
from robusttrain.noise.chip import Chip
from robusttrain.noise.deployment import deploy_weights_, parse_deployment
from robusttrain.training import ChipInTheLoopClassifier, QuantizationAwareClassifier
from robusttrain.training.chip_in_the_loop import chip_smoothed_grad
from robusttrain.zo.estimators import estimate_smoothed_grad

pytestmark = pytest.mark.usefixtures("single_thread")

FAULTY = [{"kind": "quantize", "bits": 2, "per_channel": True, "clip": 2.5},
          {"kind": "stuck_at", "p": 0.1},
          {"kind": "read_noise", "noise": "relative", "level": 0.05}]
NO_READ_NOISE = [{"kind": "quantize", "bits": 3, "per_channel": True},
                 {"kind": "stuck_at", "p": 0.1}, {"kind": "bit_flips", "p": 0.01}]


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(8, [16], 3)


# ----- the simulated chip -----------------------------------------------------------------------


@pytest.mark.parametrize("net", ["mlp", "lenet"])
def test_a_chip_runs_what_deployed_runs_on_its_seed_then_fresh_read_noise(net):
    torch.manual_seed(0)
    model = _mlp() if net == "mlp" else LeNet(in_channels=1, num_classes=10)
    x = torch.randn(5, 8) if net == "mlp" else torch.randn(5, 1, 28, 28)
    dep = FAULTY + [{"kind": "bit_flips", "p": 0.01}]
    chip = SimulatedChip(dep, seed=11)
    chip.program(model)
    first, second = chip.run(x), chip.run(x)
    with torch.no_grad(), deployed(model, dep, device_seed=11,
                                   inference_seed=SimulatedChip.read_seed(11)):
        expected = model(x)
    assert torch.equal(first, expected)
    assert not torch.equal(first, second)  # every inference draws its own read noise


def test_the_fault_map_is_fixed_for_the_life_of_the_chip():
    x = torch.randn(32, 8)
    a, b = _mlp(0), _mlp(1)
    chip = SimulatedChip(NO_READ_NOISE, seed=3)
    chip.program(a)
    out_a = chip.run(x)
    chip.program(b)
    out_b = chip.run(x)
    chip.program(a)
    assert torch.equal(chip.run(x), out_a)  # the same cells stuck and bits flipped as before
    assert not torch.equal(out_b, out_a)
    other = SimulatedChip(NO_READ_NOISE, seed=4)
    other.program(a)
    assert not torch.equal(other.run(x), out_a)  # another chip, other faults


def test_programming_reads_the_model_and_never_writes_it():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    chip = SimulatedChip(FAULTY, seed=0)
    chip.program(model)
    chip.run(torch.randn(4, 8))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the chip holds its own copy
    assert not torch.equal(next(chip._network.parameters()), next(model.parameters()))


def test_queries_are_counted_exactly():
    chip = ChipPort(SimulatedChip(FAULTY, seed=0))
    assert chip.queries == ChipQueries()
    model = _mlp()
    chip.program(model)
    chip.program(model)
    for n in (7, 5, 3):
        chip.run(torch.randn(n, 8))
    assert chip.queries == ChipQueries(programs=2, forward_passes=3, examples=15)
    assert chip.queries - ChipQueries(1, 1, 7) == ChipQueries(1, 2, 8)


def test_chip_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="program the chip first"):
        SimulatedChip(FAULTY).run(torch.randn(2, 8))
    chip = SimulatedChip(FAULTY)
    chip.program(_mlp())
    with pytest.raises(ValueError, match="one architecture"):
        chip.program(MLP(8, [4], 3))
    with pytest.raises(ValueError, match="chip seed must be an integer"):
        SimulatedChip(FAULTY, seed=-1)
    with pytest.raises(ValueError, match="stuck_at: mode must be"):
        SimulatedChip([{"kind": "stuck_at", "p": 0.1, "mode": "sideways"}])
    with pytest.raises(TypeError, match="must be a robusttrain.noise.chip.Chip"):
        ChipPort(object())  # type: ignore[arg-type]


# ----- what the trainer may hold ----------------------------------------------------------------


def test_the_port_offers_program_run_and_queries_only():
    chip = SimulatedChip(FAULTY, seed=1234567)
    port = ChipPort(chip)
    for name in ("deployment", "_deployment", "seed", "_seed", "fault_map", "_network", "_reads"):
        with pytest.raises(AttributeError, match="program, run and queries only"):
            getattr(port, name)
    with pytest.raises(TypeError):
        vars(port)
    with pytest.raises(AttributeError, match="cannot be changed"):
        port.seed = 1
    assert getattr(port.run, "__self__", None) is port  # no bound method of the chip in reach
    assert "1234567" not in repr(port) + repr(chip)


class _Peeking(ChipInTheLoopClassifier):
    """A trainer that tries to read the chip's faults: it must fail."""

    def training_step(self, batch, batch_idx):
        return self.chip.fault_map


def test_a_trainer_that_reads_the_hidden_state_fails(tmp_path):
    chip = SimulatedChip(FAULTY, seed=5)
    model = _Peeking(_mlp(), chip=chip, optimizer=sgd(), sigma=0.1, num_pairs=2, num_classes=3)
    assert all(v is not chip for v in vars(model).values()) and "chip" not in model.hparams
    assert model.chip.__class__ is ChipPort
    train, val = loaders()
    with pytest.raises(AttributeError, match="hidden from the trainer"):
        trainer(tmp_path, max_steps=1).fit(model, train, val)


def test_the_trainer_counts_its_queries_and_keeps_the_chip_out_of_its_checkpoint(tmp_path):
    chip = SimulatedChip(FAULTY, seed=5)
    port_total = ChipPort(chip)
    model = ChipInTheLoopClassifier(_mlp(), chip=chip, optimizer=sgd(0.01), sigma=0.05,
                                    num_pairs=3, reads_per_member=2, num_classes=3)
    train, val = loaders(batch_size=64)  # 384 examples: 6 steps of 64
    run = trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0)
    run.fit(model, train, val)
    steps = 6
    # per step: one clean program and inference, then 2N members of R inferences each
    assert model.train_queries == ChipQueries(programs=steps * (1 + 2 * 3),
                                              forward_passes=steps * (1 + 2 * 3 * 2),
                                              examples=64 * steps * (1 + 2 * 3 * 2))
    # validation ran through the chip too (one program, one pass of 128), not counted as training
    assert port_total.queries - model.train_queries == ChipQueries(1, 1, 128)
    run.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert "chip" not in checkpoint["hyper_parameters"]
    assert checkpoint["robusttrain"]["train_queries"] == [42, 78, 78 * 64]


def test_the_trainer_refuses_what_a_chip_cannot_give():
    with pytest.raises(ValueError, match="node perturbation needs each layer's input"):
        ChipInTheLoopClassifier(_mlp(), chip=SimulatedChip(FAULTY), perturbation="node",
                                num_classes=3)
    with pytest.raises(ValueError, match="reads_per_member must be"):
        ChipInTheLoopClassifier(_mlp(), chip=SimulatedChip(FAULTY), reads_per_member=0,
                                num_classes=3)


# ----- what the in-the-loop estimate is unbiased for --------------------------------------------


def test_the_in_the_loop_estimate_is_unbiased_for_the_chips_smoothed_expected_loss():
    """E[ĝ] = ∇_θ E_g E_n L(θ + σg + n): absolute read noise n (fresh for every member) on the
    weights, smoothing g on every parameter; reference by autograd over many draws. A reference
    that leaves out the read noise must be told apart by the same test (the negative control)."""
    torch.manual_seed(0)
    model = MLP(8, [6], 3)
    x, y = blobs(n=64, seed=3)
    x = x / 4
    sigma, tau, pairs, estimates, draws = 0.3, 0.6, 4, 3000, 20000
    port = ChipPort(SimulatedChip([{"kind": "read_noise", "noise": "absolute", "level": tau}], 9))
    flat = torch.stack([torch.cat([g.flatten() for g in chip_smoothed_grad(
        port, model, x, y, sigma=sigma, num_pairs=pairs, seed=s).grads])
        for s in range(estimates)])
    params = list(model.parameters())
    weights = {id(w) for _, w in noisy_parameters(model)}

    def reference(read_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        grads = []
        for _ in range(draws // 100):
            moved = [(p.detach().unsqueeze(0) + sigma * torch.randn((100, *p.shape), generator=g)
                      + (tau * torch.randn((100, *p.shape), generator=g)
                         if read_noise and id(p) in weights else 0)).requires_grad_()
                     for p in params]
            loss = sum(F.cross_entropy(torch.func.functional_call(
                model, dict(zip([n for n, _ in model.named_parameters()],
                                [m[k] for m in moved])), (x,)), y) for k in range(100))
            grads.append(torch.cat([t.flatten(1) for t in torch.autograd.grad(loss, moved)], 1))
        stacked = torch.cat(grads)
        return stacked.mean(0), stacked.var(0).sum() / len(stacked)

    mean = flat.mean(0)
    own_var = flat.var(0).sum() / estimates
    for read_noise, should_agree in ((True, True), (False, False)):
        ref, ref_var = reference(read_noise)
        error = (mean - ref).pow(2).sum()
        # E‖mean − ref‖² = tr Cov(mean) + tr Cov(ref) when both are unbiased for the same vector;
        # a sum of squares of d ≈ 75 nearly independent coordinates stays below 3x its mean
        assert (error < 3 * (own_var + ref_var)) == should_agree, (read_noise, error, own_var)


def test_reads_per_member_averages_that_many_inferences():
    model = _mlp()
    x, y = blobs(n=16)
    port = ChipPort(SimulatedChip(FAULTY, seed=2))
    chip_smoothed_grad(port, model, x, y, sigma=0.1, num_pairs=5, seed=0, reads_per_member=3)
    assert port.queries == ChipQueries(programs=10, forward_passes=30, examples=480)


# ----- the white-box oracle ---------------------------------------------------------------------


def test_the_oracle_trains_on_the_chips_own_faults(tmp_path):
    dep = FAULTY[:2]  # no read noise: the stored weights are the whole chip
    seed = 77
    model = QuantizationAwareClassifier(_mlp(), optimizer=sgd(0.0), deployment=dep, chip_seed=seed,
                                        num_classes=3)
    seen = []
    model.backbone.register_forward_pre_hook(
        lambda m, inp: seen.append([w.detach().clone() for _, w in noisy_parameters(m)]))
    train, val = loaders()
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, train, val)
    chip = SimulatedChip(dep, seed=seed)
    chip.program(model.backbone)
    stored = [w for _, w in noisy_parameters(chip._network)]
    assert len(seen) == 2 and all(torch.equal(a, b) for s in seen for a, b in zip(s, stored))
    assert model.eval_chip_seed() == seed
    with pytest.raises(ValueError, match="chip_seed must be"):
        QuantizationAwareClassifier(_mlp(), deployment=dep, chip_seed=-2, num_classes=3)
    # without chip_seed every step draws another chip
    fresh = [w.detach().clone() for _, w in noisy_parameters(_mlp())]
    deploy_weights_(fresh, dep, torch.Generator().manual_seed(seed + 1))
    assert not all(torch.equal(a, b) for a, b in zip(fresh, stored))


def test_a_real_device_plugs_in_as_a_chip_subclass():
    class Exact(Chip):  # a device without faults or noise: the model itself
        def __init__(self):
            self.model, self.count = None, ChipQueries()

        def program(self, model):
            self.model = model

        def run(self, x):
            self.count = self.count + ChipQueries(0, 1, len(x))
            with torch.no_grad():
                return self.model(x)

        @property
        def queries(self):
            return self.count

    model = _mlp()
    x, y = blobs(n=32)
    est = chip_smoothed_grad(ChipPort(Exact()), model, x, y, sigma=0.01, num_pairs=4, seed=0)
    expected = estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y),
                                      list(model.parameters()), sigma=0.01, num_pairs=4, seed=0)
    assert all(torch.allclose(a, b) for a, b in zip(est.grads, expected.grads))


def test_a_resumed_fine_tune_continues_its_query_count(tmp_path):
    """A chip's read noise cannot be rewound, so resuming is not bit for bit; what must hold is
    that θ and the training query count carry on from the checkpoint."""
    seen = []

    class Watched(ChipInTheLoopClassifier):
        def on_train_start(self):
            seen.append([p.detach().clone() for p in self.parameters()])

    def model():
        return Watched(_mlp(), chip=SimulatedChip(FAULTY, seed=5), num_classes=3,
                       optimizer=sgd(0.01, momentum=0.9), sigma=0.05, num_pairs=2)

    train, val = loaders(batch_size=64)
    first = model()
    run = trainer(tmp_path, max_steps=3, max_epochs=5, limit_val_batches=0)
    run.fit(first, train, val)
    run.save_checkpoint(tmp_path / "three.ckpt")
    saved = [p.detach().clone() for p in first.parameters()]
    second = model()
    resumed = trainer(tmp_path, max_steps=5, max_epochs=5, limit_val_batches=0)
    resumed.fit(second, train, val, ckpt_path=tmp_path / "three.ckpt")
    assert resumed.global_step == 5
    assert all(torch.equal(a, b) for a, b in zip(seen[1], saved))  # θ restored before step 4
    # 5 steps of one clean inference and 2 pairs: 5 programs and passes of 64 examples each
    assert second.train_queries == ChipQueries(5 * 5, 5 * 5, 5 * 5 * 64)


def test_trainable_fine_tunes_only_the_named_parameters(tmp_path):
    model = ChipInTheLoopClassifier(_mlp(), chip=SimulatedChip(FAULTY, seed=1), num_classes=3,
                                    optimizer=sgd(0.05), sigma=0.05, num_pairs=2,
                                    trainable=["*.bias"])
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    train, val = loaders()
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, train, val)
    for name, p in model.backbone.named_parameters():
        assert torch.equal(p, before[name]) != name.endswith(".bias"), name
    with pytest.raises(ValueError, match=r"match no parameter; the backbone has net.1.weight"):
        ChipInTheLoopClassifier(_mlp(), chip=SimulatedChip(FAULTY), num_classes=3,
                                trainable=["layer9.*"])


def test_the_committed_chip_studies_name_what_exists():
    """experiments/chip_*.yaml: every config they run exists, every target is a deployment with
    chip-to-chip variation, and each target has at least 5 chips."""
    root = Path(__file__).resolve().parent.parent
    studies = sorted((root / "experiments").glob("chip_*.yaml"))
    assert len(studies) >= 2
    for path in studies:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["chips"] >= 5, path
        for role in ("float", "qat_noise", "oracle", "chip_finetune"):
            assert (root / cfg[role]["config"]).is_file(), (path, role)
        assert set(cfg["chip_finetune"]["starts"]) <= {"ptq", "qat_noise"}
        for name, target in cfg["targets"].items():
            assert parse_deployment(target).random_device, (path, name)
