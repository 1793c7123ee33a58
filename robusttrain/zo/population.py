r"""The population engine: the losses of many perturbed copies of a network in one batched pass.

The generic estimator (:func:`robusttrain.zo.estimators.estimate_smoothed_grad`) perturbs the weights
in place and runs 2N ordinary forward passes. For a network whose parameters all sit in Linear,
Conv2d and normalization layers there is a faster way that never writes a parameter: stack the
members along the batch dimension and let forward hooks add each member's perturbation to its
slice of every layer's output,

    Linear:  h_m (W + s_m E_m)ᵀ + (b + s_m ζ_m) = [h_m Wᵀ + b] + s_m (h_m E_mᵀ + ζ_m),

where the bracket is the layer's ordinary output and s_m = ±σ. For a low-rank direction
E = A Bᵀ/√r the correction is ((h B) Aᵀ)/√r, O((in + out)·r) per example instead of O(in·out)
(EGGROLL, Sarkar et al. 2025); a Conv2d computes it as a grouped convolution with each member's
r filters of B, then mixes the r maps with A. Normalization layers add s_m (ζ_m ⊙ n + ξ_m) with
n the normalized input. Everything else (activations, pooling, residual additions, flattening)
acts per example and needs no change, so any such network works (MLP, LeNet, ResNet-20 with
GroupNorm or no norm).

Members meet the examples in one of two ways (``batch_mode``):

* ``shared``: every pair sees the whole batch. Until the first perturbed layer all members hold
  the same tensor, so the network runs on the B clean examples once and the first perturbed layer
  *expands* the batch to its 2N·B member rows; its correction is one GEMM for all pairs.
* ``split``: pair i sees its own b = ⌊B/N⌋ examples (wrapping around when N > B), both members of
  the pair the same ones, so a step costs about two plain forward passes of the batch whatever N
  is. Both modes are unbiased for the gradient of the smoothed *expected* loss: a pair's examples
  are drawn independently of its direction, so E[(L_x(θ+σz) − L_x(θ−σz)) z]/(2σ) over x and z is
  ∇E_x L_σ; split trades the examples per pair for more pairs (docs/theory.md).

BatchNorm in training mode normalizes with the statistics of the whole stacked batch, which would
mix members: the engine refuses it (:func:`supports_population` says why) and the ZO module falls
back to the in-place loop; BatchNorm in eval mode (running statistics) is per example and works.
The factors are drawn exactly as in the loop (``Perturbation.draw_block``: Gaussian pair i from
``pair_seed(seed, i)``, all low-rank or orthogonal pairs as one block), so both paths give the same
estimate up to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robusttrain.zo.arguments import Sigmas, check_estimator_args, elementwise_lowrank_error, per_tensor
from robusttrain.zo.coefficients import (
    NonFiniteLossError,
    SmoothedGradEstimate,
    fitness_shaping_name,
    pair_coefficients,
)
from robusttrain.zo.perturbations import LowRankFactors, Perturbation

__all__ = [
    "BATCH_MODES",
    "choose_population",
    "perturbed_losses",
    "population_smoothed_grad",
    "split_rows",
    "supports_population",
    "unsupported_reason",
]

BATCH_MODES = ("shared", "split")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNEL_NORMS = (nn.GroupNorm, *_BATCHNORMS)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ROWS_PER_CHUNK = 16384  # member rows evaluated together in shared mode (bounds activation memory)


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def unsupported_reason(model: nn.Module, perturbation: Perturbation | None = None) -> str | None:
    """Why the engine cannot run ``model`` (``None`` when it can).

    Every trainable parameter must be the weight or bias of a Linear, a Conv2d (groups 1, zero
    padding), a GroupNorm, a LayerNorm over the last dimension, or a BatchNorm in eval mode.
    """
    family = perturbation or Perturbation()
    seen: set[int] = set()
    for module in model.modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        name = type(module).__name__
        if any(id(p) in seen for _, p in own):
            return f"a parameter of {name} is shared with another layer"
        seen.update(id(p) for _, p in own)
        if any(n not in ("weight", "bias") for n, _ in own):
            return f"{name} has parameters other than weight and bias"
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros":
                return f"{name} has groups={module.groups}, padding_mode={module.padding_mode!r}"
        elif isinstance(module, _BATCHNORMS):
            if module.training or not module.track_running_stats:
                return (
                    f"{name} in training mode normalizes with the statistics of the whole stacked "
                    "batch, which would mix members; use GroupNorm or no norm, or the in-place loop "
                    "(population: false)"
                )
        elif isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1:
                return "LayerNorm over more than the last dimension"
        elif not isinstance(module, (nn.Linear, nn.GroupNorm)):
            return f"{name} holds parameters, and only Linear, Conv2d and norm layers are supported"
        if not isinstance(module, (nn.Linear, nn.Conv2d)) and any(
            family.is_lowrank(p) for _, p in own
        ):
            return f"{name} has a parameter of two or more dimensions outside a Linear/Conv2d layer"
    if not seen:
        return "the model has no trainable parameters"
    return None


def supports_population(model: nn.Module) -> bool:
    """True when the population engine can evaluate ``model`` (see :func:`unsupported_reason`)."""
    return unsupported_reason(model) is None


def choose_population(
    model: nn.Module, device: torch.device | str, batch_mode: str = "shared"
) -> bool:
    """Whether :class:`~robusttrain.training.ZerothOrderClassifier` should use the engine.

    Measured with ``experiments/bench_estimator.py`` on a 2-core CPU (README): for the MLP the
    engine beats the in-place loop (Gaussian, N = 16: 1.3× against 1.7× the time of 2N forward
    passes; low-rank far below 1×), but for LeNet in ``shared`` mode it is about 4× slower — the
    members' convolutions cost as much as 2N forwards, and the grouped convolutions and stacked
    activations of the corrections come on top. So on a CPU: the engine for networks without
    convolutions, and for every supported network in ``split`` mode (where the loop would make 2N
    calls on tiny slices); elsewhere (GPU) whenever the model is supported.
    """
    if not supports_population(model):
        return False
    if batch_mode == "split" or torch.device(device).type != "cpu":
        return True
    return not any(isinstance(m, nn.Conv2d) for m in model.modules())


def split_rows(batch_size: int, num_pairs: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row indices of each pair's examples in ``split`` mode, shape (N, b) with b = max(1, ⌊B/N⌋).

    Pair i takes rows i·b … i·b + b − 1, modulo B (so pairs reuse examples when N > B, and the
    B − N·b rows left over when N does not divide B are not used in that step).
    """
    b = max(1, batch_size // num_pairs)
    start = torch.arange(num_pairs, device=device)[:, None] * b
    return (start + torch.arange(b, device=device)) % batch_size


class _Layout:
    """Where each member's rows are in a stacked tensor.

    Before the first perturbed layer a tensor holds ``pre_rows`` rows shared by the members
    (``shared``: the B examples; ``split``: each pair's b examples, pair after pair); after it,
    ``signs × pairs × rows`` member rows, ordered sign-major (all + members, then all −).
    """

    def __init__(self, sign_values: list[float], pairs: int, rows: int, split: bool) -> None:
        self.sign_values = sign_values  # +σ (and −σ): the members' scales
        self.signs, self.pairs, self.rows = len(sign_values), pairs, rows
        self.pre = (1, pairs if split else 1, rows)
        self.expanded_rows = self.signs * pairs * rows

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """(s, k, rows, …) view of ``t``, with (s, k) = (1, 1), (1, K) or (S, K)."""
        n = t.shape[0]
        if n == self.expanded_rows:
            return t.view(self.signs, self.pairs, self.rows, *t.shape[1:])
        if n == self.pre[0] * self.pre[1] * self.pre[2]:
            return t.view(*self.pre, *t.shape[1:])
        raise RuntimeError(
            f"a layer received {n} rows, expected {self.expanded_rows} (members) or "
            f"{math.prod(self.pre)} (before the first perturbed layer); the model mixes rows of "
            "the batch, which the population engine cannot follow: use population: false"
        )


def _conv_delta(
    module: nn.Conv2d, hv: torch.Tensor, weight: torch.Tensor | LowRankFactors
) -> torch.Tensor:
    """conv(h_m, E_m) for (s, k, rows, C, H, W) inputs → (s or 1, K, rows, out, H', W')."""
    s, k, rows = hv.shape[:3]
    c, kh, kw = module.weight.shape[1:]
    # keyword arguments of F.conv2d (padding is a tuple or a string such as 'same')
    conv: dict[str, Any] = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    if isinstance(weight, LowRankFactors):
        pairs, out_f, r = weight.a.shape
        # each pair's r filters B_j, as conv kernels (K·r, C, kh, kw)
        filters = weight.b.permute(0, 2, 1).reshape(pairs * r, c, kh, kw)
        channels = r
    else:
        pairs, out_f = weight.shape[:2]
        filters = weight.reshape(pairs * out_f, c, kh, kw)
        channels = out_f
    if s == 1 and k == 1:
        u = F.conv2d(hv[0, 0], filters, **conv)  # (rows, K·channels, H', W')
        u = u.view(rows, 1, pairs, channels, *u.shape[2:])
    else:
        # one group per member: (rows, s·K·C, H, W) against (s·K·channels, C, kh, kw)
        h = hv.reshape(s * k, rows, *hv.shape[3:]).transpose(0, 1).reshape(rows, s * k * c,
                                                                            *hv.shape[4:])
        u = F.conv2d(h, filters.repeat(s, 1, 1, 1), groups=s * k, **conv)
        u = u.view(rows, s, k, channels, *u.shape[2:])
    if isinstance(weight, LowRankFactors):
        # mix the r maps with A: (rows, s, K, r, H', W') × (K, out, r) → (s, K, rows, out, H', W')
        return torch.einsum("nskrhw,kor->sknohw", u, weight.a).mul_(weight.scale)
    return u.permute(1, 2, 0, 3, 4, 5)


def _normalized(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The input of a norm layer, normalized but not yet scaled and shifted."""
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(h, module.num_groups, eps=module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(h, module.normalized_shape, eps=module.eps)
    # a BatchNorm with running statistics (unsupported_reason refuses one without)
    assert isinstance(module, _BATCHNORMS)
    mean, var = module.running_mean, module.running_var
    assert mean is not None and var is not None
    shape = [1, -1] + [1] * (h.dim() - 2)
    return (h - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)


def _channel_view(vector: torch.Tensor, module: nn.Module, member_dims: int) -> torch.Tensor:
    """(K, C) → a view that broadcasts against (s, K, rows, …) member tensors of ``member_dims``."""
    k, c = vector.shape
    if isinstance(module, nn.LayerNorm):  # channels last (Linear layers take the fused path)
        return vector.view(1, k, *[1] * (member_dims - 3), c)
    return vector.view(1, k, 1, c, *[1] * (member_dims - 4))  # channels in dim 1 of the rows


def _linear_lowrank_members(
    hv: torch.Tensor, output: torch.Tensor, weight: LowRankFactors | None,
    bias: torch.Tensor | None, layout: _Layout, signs: torch.Tensor,
) -> torch.Tensor:
    """A Linear layer's member outputs for low-rank (or bias-only) perturbations, fused.

    The correction s_m (h_m B_m A_mᵀ/√r + ζ_m) is written as left @ rightᵀ with
    left = [h_m B_m, 1] and right = s_m [A_m/√r, ζ_m], and added by one ``baddbmm`` straight into
    the output (in place once the members are expanded), so no correction tensor of the
    output's size is ever made.
    """
    s, k, rows, in_f = hv.shape
    pairs, out_f = layout.pairs, output.shape[-1]
    left, right = [], []
    if weight is not None:
        b = weight.b  # (K, in, r)
        r = b.shape[-1]
        if s == 1 and k == 1:  # every pair sees the same rows: h B for all pairs in one GEMM
            u = (hv[0, 0] @ b.permute(1, 0, 2).reshape(in_f, pairs * r)).view(rows, pairs, r)
            u = u.transpose(0, 1)[None]
        else:
            u = torch.matmul(hv, b)  # (s, K, rows, r)
        left.append(u)
        right.append(weight.a * weight.scale)  # (K, out, r)
    if bias is not None:
        left.append(hv.new_ones(()).expand(*(left[0].shape[:-1] if left else (s, k, rows)), 1))
        right.append(bias[..., None])
    left_t = left[0] if len(left) == 1 else torch.cat(
        [t.expand(*left[0].shape[:-1], t.shape[-1]) for t in left], dim=-1)
    left_t = left_t.expand(left_t.shape[0], pairs, *left_t.shape[2:])
    right_t = torch.cat(right, dim=-1) if len(right) > 1 else right[0]
    right_signed = signs.view(-1, 1, 1, 1) * right_t[None]  # (S, K, out, r')
    if output.shape[0] == layout.expanded_rows:  # the members are already expanded
        view = output.view(layout.signs * pairs, rows, out_f)
        view.baddbmm_(left_t.reshape(-1, rows, left_t.shape[-1]),
                      right_signed.reshape(-1, out_f, right_t.shape[-1]).transpose(1, 2))
        return output
    result = output.new_empty(layout.signs, pairs, rows, out_f)
    clean = output.view(k, rows, out_f)
    for j in range(layout.signs):
        torch.baddbmm(clean, left_t[0], right_signed[j].transpose(1, 2), out=result[j])
    return result.view(layout.expanded_rows, out_f)


def _linear_dense_members(
    hv: torch.Tensor, output: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    layout: _Layout, signs: torch.Tensor,
) -> torch.Tensor:
    """A Linear layer's member outputs for dense (Gaussian) weight directions Z (K, out, in).

    Before the members are expanded, h Z_kᵀ (+ ζ_k) is formed once per pair and written into both
    members' rows with ``torch.add(…, alpha=±σ)``; after, one in-place ``baddbmm`` with the
    signed directions adds every member's correction to the layer's output.
    """
    s, k, rows, in_f = hv.shape
    out_f = output.shape[-1]
    members = layout.signs * layout.pairs
    if output.shape[0] == layout.expanded_rows:  # the members are already expanded
        signed = (signs.view(-1, 1, 1, 1) * weight[None]).reshape(members, out_f, in_f)
        output.view(members, rows, out_f).baddbmm_(hv.reshape(members, rows, in_f),
                                                    signed.transpose(1, 2))
        if bias is not None:
            output.view(layout.signs, layout.pairs, rows, out_f).add_(
                (signs.view(-1, 1, 1) * bias[None])[:, :, None, :])
        return output
    if k == 1:  # every pair sees the same rows: h Zᵀ for all pairs in one GEMM
        delta = torch.matmul(hv[0, 0], weight.transpose(1, 2))  # (K, rows, out)
    else:
        delta = torch.bmm(hv[0], weight.transpose(1, 2))
    if bias is not None:
        delta += bias[:, None, :]
    clean = output.view(k, rows, out_f)
    result = output.new_empty(layout.signs, layout.pairs, rows, out_f)
    for j, sign in enumerate(layout.sign_values):
        torch.add(clean, delta, alpha=sign, out=result[j])
    return result.view(layout.expanded_rows, out_f)


def _make_hook(
    module: nn.Module, parts: dict[str, torch.Tensor | LowRankFactors], layout: _Layout,
    signs: torch.Tensor,
) -> Callable[..., torch.Tensor]:
    weight, bias = parts.get("weight"), parts.get("bias")
    # a bias is 1-D, and 1-D tensors always get Gaussian directions (robusttrain.zo.perturbations)
    assert not isinstance(bias, LowRankFactors)
    linear = isinstance(module, nn.Linear)

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        hv = layout.view(inputs[0])
        if linear:
            if hv.dim() != 4:
                raise RuntimeError(
                    f"a Linear layer received a {inputs[0].dim()}-D input; the population engine "
                    "handles Linear layers on (batch, features) inputs: use population: false"
                )
            if isinstance(weight, torch.Tensor):
                return _linear_dense_members(hv, output, weight, bias, layout, signs)
            return _linear_lowrank_members(hv, output, weight, bias, layout, signs)
        out = layout.view(output)
        delta = None
        if isinstance(module, _CHANNEL_NORMS + (nn.LayerNorm,)):
            if weight is not None:
                assert isinstance(weight, torch.Tensor)  # a norm scale is 1-D: Gaussian directions
                n = layout.view(_normalized(module, inputs[0]))
                delta = _channel_view(weight, module, n.dim()) * n
        elif weight is not None:
            assert isinstance(module, nn.Conv2d)  # the layers left once Linear and norms are out
            delta = _conv_delta(module, hv, weight)
        if bias is not None:
            shift = _channel_view(bias, module, out.dim())
            delta = shift if delta is None else delta + shift
        assert delta is not None  # the hook is only made for a layer with a perturbed weight or bias
        result = out + signs.view(-1, *[1] * (out.dim() - 1)) * delta
        shape = (layout.expanded_rows, *output.shape[1:])
        return result.expand(layout.signs, layout.pairs, *result.shape[2:]).reshape(shape)

    return hook


def perturbed_losses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    factors: torch.Tensor,
    *,
    sigma: float | Sigmas,
    perturbation: Perturbation | None = None,
    antithetic: bool = True,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of the members θ + σz_k (and θ − σz_k) for a block of K pairs.

    Args:
        model: a supported model (:func:`unsupported_reason`); its parameters are only read.
        x: input batch (B, …).
        y: targets (B,).
        factors: (K, F) factors in the layout of ``perturbation`` over the model's trainable
            parameters.
        sigma: perturbation scale, or one per trainable parameter (as in
            :func:`~robusttrain.zo.estimators.smoothed_loss_grad`).
        perturbation: the family the factors belong to (default Gaussian).
        antithetic: also evaluate θ − σz_k.
        rows: (K, b) row indices of each pair's examples (``split`` mode, see :func:`split_rows`);
            ``None``: every pair sees the whole batch.

    Returns:
        (losses_plus (K,), losses_minus (K,) or ``None``).
    """
    family = perturbation or Perturbation()
    _require_supported(model, family)
    if per_tensor(sigma):
        check_estimator_args(_trainable(model), sigma, 1, 0, "antithetic")
        return _member_losses(model, x, y, factors, 1.0, family, antithetic, rows, list(sigma))
    return _member_losses(model, x, y, factors, float(sigma), family, antithetic, rows)


def _require_supported(model: nn.Module, family: Perturbation) -> None:
    reason = unsupported_reason(model, family)
    if reason is not None:
        raise ValueError(
            f"the population engine cannot run {type(model).__name__}: {reason}. Use "
            "robusttrain.zo.estimators.estimate_smoothed_grad (population: false) for it"
        )


def _scaled(
    part: torch.Tensor | LowRankFactors, scale: float | torch.Tensor, index: int
) -> torch.Tensor | LowRankFactors:
    """One tensor's directions times its smoothing scale (a number or a tensor of its shape)."""
    if isinstance(part, LowRankFactors):
        if isinstance(scale, torch.Tensor) and scale.dim() > 0:
            raise elementwise_lowrank_error(index)
        return dataclasses.replace(part, scale=part.scale * scale)
    if isinstance(scale, torch.Tensor):
        return part * scale.to(part.dtype)  # (K, *shape) times a 0-dim or (*shape) scale
    return part * scale


def _member_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, factors: torch.Tensor, sigma: float,
    family: Perturbation, antithetic: bool, rows: torch.Tensor | None,
    sigmas: list[float | torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`perturbed_losses` on a model already checked (once per estimate, not per chunk).

    With ``sigmas`` (one scale per trainable parameter) each tensor's directions are scaled by
    its own σ and the members are θ ± σ⊙z (``sigma`` is then 1).
    """
    params = _trainable(model)
    split = family.split(params, factors)
    if sigmas is not None:
        split = [_scaled(part, scale, i) for i, (part, scale) in enumerate(zip(split, sigmas))]
    parts = dict(zip(map(id, params), split))
    k = factors.shape[0]
    sign_values = [sigma, -sigma] if antithetic else [sigma]
    signs = torch.tensor(sign_values, dtype=x.dtype, device=x.device)
    if rows is None:
        layout = _Layout(sign_values, k, x.shape[0], split=False)
        inputs, targets = x, y.repeat(len(sign_values) * k)
    else:
        layout = _Layout(sign_values, k, rows.shape[1], split=True)
        inputs = x[rows.flatten()]
        targets = y[rows.flatten()].repeat(len(sign_values))
    handles = []
    # dropout would give the two members of a pair different networks: off in perturbed passes
    dropout = [m for m in model.modules() if isinstance(m, _DROPOUTS) and m.training]
    try:
        for m in dropout:
            m.eval()
        for module in model.modules():
            own = {n: parts[id(p)] for n, p in module.named_parameters(recurse=False)
                   if id(p) in parts}
            if own:
                handles.append(module.register_forward_hook(_make_hook(module, own, layout, signs)))
        with torch.no_grad():  # only losses are needed; in-place writes into layer outputs
            logits = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m in dropout:
            m.train()
    if logits.shape[0] != layout.expanded_rows:
        raise RuntimeError(
            f"the model returned {logits.shape[0]} rows, expected {layout.expanded_rows}: no "
            "perturbed layer was on the path from input to output"
        )
    losses = F.cross_entropy(logits, targets, reduction="none").view(-1, layout.rows).mean(dim=1)
    if antithetic:
        return losses[:k], losses[k:]
    return losses, None


def population_smoothed_grad(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float | Sigmas,
    num_pairs: int,
    seed: int,
    estimator: str = "antithetic",
    fitness_shaping: bool | str = False,
    perturbation: str = "gaussian",
    rank: int = 1,
    orthogonal: bool = False,
    batch_mode: str = "shared",
    chunk_size: int | None = None,
) -> SmoothedGradEstimate:
    """The estimate of :func:`~robusttrain.zo.estimators.smoothed_loss_grad`, batched.

    The loss is the mean cross-entropy of ``model(x)`` against ``y``. Same directions, same
    coefficients (:func:`~robusttrain.zo.coefficients.pair_coefficients`) as the in-place loop; the
    parameters are only read. ``"plain"`` is not batched (use the loop).

    Args:
        model: a supported model (see :func:`unsupported_reason`).
        x: input batch.
        y: targets.
        sigma: smoothing scale σ > 0, or one per trainable parameter (see
            :func:`~robusttrain.zo.estimators.smoothed_loss_grad`).
        num_pairs: N.
        seed: as in the loop.
        estimator: ``"antithetic"`` or ``"one_sided"`` (``shared`` mode only).
        fitness_shaping: as in :func:`~robusttrain.zo.coefficients.pair_coefficients`.
        perturbation: ``"gaussian"`` or ``"lowrank"``.
        rank: r of the low-rank family.
        orthogonal: orthogonal directions (:mod:`robusttrain.zo.perturbations`), as in the loop.
        batch_mode: ``"shared"`` (every pair sees the batch) or ``"split"`` (pair i sees its own
            ⌊B/N⌋ examples, see :func:`split_rows`).
        chunk_size: pairs evaluated together (bounds memory); default: as many as keep the
            stacked batch near 16,384 member rows (all pairs at once in ``split`` mode).

    Returns:
        The estimate; ``num_forward`` counts member forward passes (2N, plus 1 for the one-sided
        baseline) and ``forward_equivalents`` the examples they processed, in batches of B.
    """
    params = _trainable(model)
    check_estimator_args(params, sigma, num_pairs, seed, estimator)
    if estimator not in ("antithetic", "one_sided"):
        raise ValueError(
            f"the batched path supports 'antithetic' and 'one_sided', not {estimator!r}"
        )
    if batch_mode not in BATCH_MODES:
        raise ValueError(f"batch_mode must be one of {', '.join(BATCH_MODES)}, got {batch_mode!r}")
    if batch_mode == "split" and estimator != "antithetic":
        raise ValueError(
            "batch_mode 'split' needs estimator 'antithetic' (a one-sided pair would need a "
            "baseline on its own examples)"
        )
    family = Perturbation(perturbation, rank, orthogonal)
    shaping = fitness_shaping_name(fitness_shaping)
    _require_supported(model, family)
    sigmas = list(sigma) if per_tensor(sigma) else None
    num_pairs, seed = int(num_pairs), int(seed)
    sigma = 1.0 if per_tensor(sigma) else float(sigma)  # scales then go into the directions
    antithetic = estimator == "antithetic"
    signs = 2 if antithetic else 1
    batch = x.shape[0]
    all_rows = split_rows(batch, num_pairs, x.device) if batch_mode == "split" else None
    rows_per_member = batch if all_rows is None else all_rows.shape[1]
    if chunk_size is None:
        chunk = num_pairs if all_rows is not None else _ROWS_PER_CHUNK // (signs * batch)
    else:
        chunk = chunk_size
    chunk = max(1, min(num_pairs, chunk))
    device = params[0].device
    whole = family.draw_block(params, seed, num_pairs) if family.drawn_as_block else None
    plus_all, minus_all, blocks = [], [], []
    baseline = None
    grads = [torch.zeros(p.shape, device=device, dtype=torch.float32) for p in params]
    with torch.no_grad():
        if not antithetic:
            baseline = float(F.cross_entropy(model(x), y))
            if not math.isfinite(baseline):
                raise NonFiniteLossError(
                    f"the baseline loss L(θ) is {baseline}; lower the learning rate, or check the "
                    "inputs for NaN", value=baseline,
                )
        for start in range(0, num_pairs, chunk):
            k = min(chunk, num_pairs - start)
            z = (whole[start : start + k] if whole is not None
                 else family.draw_block(params, seed, num_pairs, start, start + k))
            plus, minus = _member_losses(
                model, x, y, z, sigma, family, antithetic,
                None if all_rows is None else all_rows[start : start + k], sigmas,
            )
            for sign, values in (("+", plus), ("-", minus)):
                if values is not None and not torch.isfinite(values).all():
                    bad = int((~torch.isfinite(values)).nonzero()[0])
                    raise NonFiniteLossError(
                        f"the loss is {float(values[bad])} at pair {start + bad}, {sign}sigma; "
                        "lower the learning rate or sigma, or check the inputs for NaN",
                        pair=start + bad, sign=sign, value=float(values[bad]),
                    )
            plus, minus = plus.double().cpu(), None if minus is None else minus.double().cpu()
            plus_all.append(plus)
            if minus is not None:
                minus_all.append(minus)
            if shaping != "none":
                blocks.append(z.clone())  # the shaped losses need every pair's loss first
                continue
            c = pair_coefficients(plus, minus, sigma=sigma, estimator=estimator,
                                  baseline=baseline) * (k / num_pairs)
            torch._foreach_add_(grads, family.combine(params, c, z))
        plus_t = torch.cat(plus_all)
        minus_t = torch.cat(minus_all) if antithetic else None
        if shaping != "none":
            c = pair_coefficients(plus_t, minus_t, sigma=sigma, estimator=estimator,
                                  baseline=baseline, fitness_shaping=shaping)
            grads = family.combine(params, c, torch.cat(blocks))
    if sigmas is not None:  # Σ c_i z_i / σ, elementwise
        grads = [g / (s.to(g.device, torch.float32) if isinstance(s, torch.Tensor) else s)
                 for g, s in zip(grads, sigmas)]
    grads = [g.to(p.dtype) for g, p in zip(grads, params)]
    num_forward = signs * num_pairs + (0 if antithetic else 1)
    equivalents = (signs * num_pairs * rows_per_member + (0 if antithetic else batch)) / batch
    return SmoothedGradEstimate(grads, plus_t, minus_t, baseline, num_forward, equivalents)
