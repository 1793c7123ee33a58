"""IBM's hardware-aware training (``hwa``, the ``analog`` extra): the noise it injects is robusttrain's
relative noise, its analog copy trains the backbone's own tensors, its clipping is aihwkit-lightning's,
its checkpoints read without aihwkit-lightning, and the core package does not need the extra.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from robusttrain.models import MLP, LeNet
from robusttrain.noise.weight import perturbed_weights

ROOT = Path(__file__).resolve().parents[1]
K = 4.5  # standard errors: a two-sided normal tail of 7e-6 per comparison


def test_core_package_works_without_the_analog_extra():
    """With aihwkit-lightning hidden, every robusttrain module imports, the CLI answers, and hwa
    says in one line how to get the extra."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "aihwkit_lightning":
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, Hide())
        import robusttrain
        for info in pkgutil.walk_packages(robusttrain.__path__, "robusttrain."):
            if info.name != "robusttrain.__main__":  # that one runs the CLI
                importlib.import_module(info.name)
        from robusttrain.models import MLP
        from robusttrain.training import HardwareAwareClassifier
        try:
            HardwareAwareClassifier(MLP(784, [8], 10))
        except ImportError as err:
            print("ERROR:", err)
        from robusttrain.commands.main import main
        sys.exit(main(["fit", "--help"]))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    error = next(line for line in done.stdout.splitlines() if line.startswith("ERROR:"))
    assert "pip install 'robusttrain[analog]'" in error and "aihwkit-lightning" in error
    assert "--trainer.max_epochs" in done.stdout  # the LightningCLI of `fit` was built


# ----- with the extra ---------------------------------------------------------------------------
aihwkit_lightning = pytest.importorskip("aihwkit_lightning",
                                        reason="pip install 'robusttrain[analog]'")

from robusttrain.training import HardwareAwareClassifier, load_checkpoint  # noqa: E402
from robusttrain.training.hardware_aware import analog_twin, hwa_rpu_config  # noqa: E402


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian classes in 20 dimensions, overlapping enough that weight noise costs accuracy."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 20, generator=torch.Generator().manual_seed(99)) * 0.6
    y = torch.randint(0, 4, (n,), generator=g)
    return centres[y] + torch.randn(n, 20, generator=g), y


def _trained_mlp() -> MLP:
    torch.manual_seed(0)
    model = MLP(20, [64], 4)
    x, y = _blobs(4000, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(300):
        rows = slice(step % 40 * 100, step % 40 * 100 + 100)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    return model.eval()


def _accuracies_robusttrain(model, x, y, level, draws):
    out = []
    with torch.no_grad():
        for k in range(draws):
            with perturbed_weights(model, noise="relative", level=level, seed=k):
                out.append((model(x).argmax(1) == y).float().mean().item())
    return torch.tensor(out, dtype=torch.float64)


def _accuracies_aihwkit(model, x, y, std_dev, draws, per_channel=False):
    """One forward of all of ``x`` per draw: aihwkit-lightning draws its weight noise per forward."""
    twin = analog_twin(model, hwa_rpu_config(std_dev, per_channel, clip_sigma=None)).train()
    out = []
    with torch.no_grad():
        for k in range(draws):
            torch.manual_seed(10_000 + k)
            out.append((twin(x).argmax(1) == y).float().mean().item())
    return torch.tensor(out, dtype=torch.float64)


def _agree(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, bool, str]:
    """Same mean and same variance, each within K standard errors of the difference."""
    n, m = len(a), len(b)
    mean_gap = abs(a.mean() - b.mean()).item()
    mean_se = math.sqrt(a.var().item() / n + b.var().item() / m)
    # SE of a sample variance: s²·sqrt(2/(n−1)) for a normal sample; the accuracies are near normal
    var_gap = abs(a.var() - b.var()).item()
    var_se = math.sqrt(2 * a.var().item() ** 2 / (n - 1) + 2 * b.var().item() ** 2 / (m - 1))
    why = (f"means {a.mean():.4f} vs {b.mean():.4f} (gap {mean_gap:.4f}, SE {mean_se:.4f}); "
           f"stds {a.std():.4f} vs {b.std():.4f}")
    return mean_gap <= K * mean_se, var_gap <= K * var_se, why


def test_aihwkit_addnormal_is_robusttrain_relative_noise():
    """aihwkit-lightning's AddNormal at std_dev η and robusttrain's relative noise at η give the
    same accuracy distribution on the same model (300 draws each); the same test tells apart
    std_dev 1.25η and the per-row scale of AddNormalPerChannel, so it has the power to fail."""
    model = _trained_mlp()
    x, y = _blobs(2000, seed=2)
    clean = (model(x).argmax(1) == y).float().mean().item()
    level, draws = 0.4, 300
    ours = _accuracies_robusttrain(model, x, y, level, draws)
    assert ours.mean() < clean - 0.05, "the noise level is too small for the test to say anything"
    theirs = _accuracies_aihwkit(model, x, y, level, draws)
    same_mean, same_var, why = _agree(ours, theirs)
    assert same_mean and same_var, why
    louder = _accuracies_aihwkit(model, x, y, 1.25 * level, draws)
    same_mean, _, why = _agree(ours, louder)
    assert not same_mean, f"1.25x the noise was not detected: {why}"
    per_row = _accuracies_aihwkit(model, x, y, level, draws, per_channel=True)
    same_mean, _, why = _agree(ours, per_row)
    assert not same_mean, f"AddNormalPerChannel (max|W| per row) was not told apart: {why}"
    # the analog copy restored nothing it should not have: the model is clean afterwards
    assert (model(x).argmax(1) == y).float().mean().item() == clean


@pytest.mark.parametrize("backbone", [lambda: MLP(784, [32], 10),
                                      lambda: LeNet(in_channels=1, image_size=28)])
def test_analog_copy_trains_the_backbones_own_tensors(backbone):
    torch.manual_seed(0)
    module = HardwareAwareClassifier(backbone(), level=0.05)
    ours = dict(module.backbone.named_parameters())
    theirs = dict(module.analog.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[k] is theirs[k] for k in ours)
    # the checkpoint holds the plain backbone only
    assert all(k.startswith("backbone.") or "acc" in k or "loss" in k
               for k in module.state_dict()), list(module.state_dict())
    # a change to the backbone is a change to what the analog copy computes (eval: no noise)
    x = torch.randn(3, 1, 28, 28)
    module.analog.eval()
    before = module.analog(x).detach().clone()
    assert torch.allclose(before, module.backbone(x), atol=1e-5)
    with torch.no_grad():
        next(module.backbone.parameters()).mul_(2)
    assert not torch.allclose(before, module.analog(x))


def test_analog_training_forward_is_noisy_and_the_gradient_reaches_the_backbone():
    torch.manual_seed(0)
    module = HardwareAwareClassifier(MLP(20, [16], 4), level=0.1)
    x, y = _blobs(32, seed=3)
    module.analog.train()
    first, second = module.analog(x), module.analog(x)
    assert not torch.allclose(first, second), "two training forwards drew the same noise"
    F.cross_entropy(first, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.backbone.parameters())


def test_every_linear_and_conv_layer_is_clipped():
    """LeNet: both convolutions and both Linear layers are clipped."""
    module = HardwareAwareClassifier(LeNet(in_channels=1, image_size=28), level=0.05,
                                     clip_sigma=1.0)
    weights = [m.weight for m in module.backbone.modules()
               if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert len(weights) == 4
    with torch.no_grad():
        for w in weights:
            w.mul_(torch.rand_like(w) * 5)
        bounds = [w.view(w.shape[0], -1).std(1).view(-1, *[1] * (w.dim() - 1)) for w in weights]
    module.clip_weights()
    for w, bound in zip(weights, bounds):
        assert (w.abs() <= bound + 1e-7).all(), f"a {tuple(w.shape)} weight was not clipped"


def test_clipping_is_aihwkits_per_row_gaussian_clip():
    torch.manual_seed(0)
    module = HardwareAwareClassifier(MLP(20, [16], 4), level=0.05, clip_sigma=1.5)
    weights = [module.backbone.net[1].weight, module.backbone.net[3].weight]
    with torch.no_grad():
        for w in weights:
            w.mul_(torch.rand_like(w) * 5)  # heavy tails
        want = [w.clamp(-1.5 * w.std(1, keepdim=True), 1.5 * w.std(1, keepdim=True))
                for w in weights]
    bias = module.backbone.net[1].bias.detach().clone()
    module.clip_weights()
    for w, expected in zip(weights, want):
        assert torch.equal(w, expected)
    assert torch.equal(module.backbone.net[1].bias, bias)  # biases are not clipped
    assert any(not torch.equal(w, w.clamp(-1e-3, 1e-3)) for w in weights)

    unclipped = HardwareAwareClassifier(MLP(20, [16], 4), level=0.05, clip_sigma=None)
    w = unclipped.backbone.net[1].weight
    with torch.no_grad():
        w.mul_(10)
    before = w.detach().clone()
    unclipped.clip_weights()
    assert torch.equal(w, before)


def test_the_optimizer_clips_after_every_step():
    """One SGD step, then each row clamped to ±2 std of the stepped row: exactly that, no more."""
    torch.manual_seed(0)
    module = HardwareAwareClassifier(MLP(20, [16], 4), level=0.05, clip_sigma=2.0)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    lr = optimizer.param_groups[0]["lr"]
    w = module.backbone.net[1].weight
    for p in module.backbone.parameters():
        p.grad = torch.randn_like(p) * 50
    with torch.no_grad():
        stepped = w - lr * w.grad  # the first step of SGD with momentum is a plain step
        bound = 2.0 * stepped.std(1, keepdim=True)
        want = stepped.clamp(-bound, bound)
    optimizer.step()
    assert not torch.equal(want, stepped), "the step did not push any weight past the clip"
    assert torch.allclose(w, want, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"level": 0}, "level must be a positive number"),
    ({"level": float("nan")}, "level must be a positive number"),
    ({"noise": "absolute"}, "set noise: relative"),
    ({"clip_sigma": -1.0}, "clip_sigma must be a positive number"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HardwareAwareClassifier(MLP(20, [8], 4), **kwargs)


def test_checkpoint_reads_like_any_other(tmp_path, fashion_dir):
    """``robusttrain fit`` of hwa writes a checkpoint that load_checkpoint (no aihwkit code) and
    ``robusttrain robustness`` read; the meta names the method and its settings."""
    config = tmp_path / "hwa.yaml"
    config.write_text(textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          max_epochs: 1
          limit_train_batches: 20
          limit_val_batches: 2
          enable_progress_bar: false
          logger: {{class_path: lightning.pytorch.loggers.CSVLogger,
                   init_args: {{save_dir: {tmp_path / 'runs'}, name: hwa}}}}
        model:
          class_path: robusttrain.training.HardwareAwareClassifier
          init_args:
            backbone: {{class_path: robusttrain.models.MLP,
                       init_args: {{in_features: 784, hidden: [32], num_classes: 10}}}}
            level: 0.05
            clip_sigma: 2.5
        data:
          class_path: robusttrain.data.FashionMNISTDataModule
          init_args: {{data_dir: {fashion_dir}, batch_size: 128}}
    """))
    run = subprocess.run([sys.executable, "-m", "robusttrain", "fit", "--config", str(config)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = tmp_path / "runs" / "hwa" / "version_0" / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(ckpt)
    assert loaded.meta["method"] == "hwa"
    assert loaded.meta["level"] == 0.05 and loaded.meta["clip_sigma"] == 2.5
    raw = torch.load(ckpt, weights_only=True)
    assert all(k.startswith("backbone.") or "acc" in k or "loss" in k for k in raw["state_dict"])
    # the clipping held: every row within 2.5 std of the clip that ended the last step (slack 1.5x)
    w = loaded.backbone.net[1].weight
    assert (w.abs().amax(1) / w.std(1)).max() < 2.5 * 1.5
    out = tmp_path / "robustness"
    evaluated = subprocess.run(
        [sys.executable, "-m", "robusttrain", "robustness", "--ckpt", str(ckpt), "--levels", "0.1",
         "--draws", "2", "--out", str(out), "--no-progress", "--data-dir", str(fashion_dir)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (out / "robustness.csv").is_file()
