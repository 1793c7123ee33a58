r"""Node perturbation: the weight-noise estimator of ∇L_σ, Rao–Blackwellized onto what the losses see.

The smoothed loss of a batch is a mean over its examples, L_σ(θ) = (1/B) Σ_b E_G[ℓ_b(θ + s⊙G)],
so every example may take its own draw G_b: the expectation of a sum is the sum of expectations,
and B independent estimates are averaged instead of one. For a Linear layer with weight W
(out × in), bias β and per-tensor (or per-element) scales s, example b's loss depends on that
layer's noise only through the output perturbation

    u_b = (s_W ⊙ G_b) h_b + s_β ⊙ g_b   — row i:  u_bi = G̃_i · a_bi,  a_bi = [s_W,i ⊙ h_b ; s_β,i],

where h_b is the layer's input for that member. An antithetic pair runs θ + s⊙G and θ − s⊙G;
its two members reach the layer with different inputs h⁺, h⁻ (the layers before are perturbed
with opposite signs), and they see G̃_i only through G̃_i·a⁺ and G̃_i·a⁻. Conditioning the
weight-space estimate (ℓ⁺ − ℓ⁻)/2 · G̃/s on everything the losses can see replaces each row G̃_i
by its projection onto span(a⁺_i, a⁻_i) (the rest of G̃_i is independent of every loss the pair
computes), which keeps the mean (∇L_σ: Rao–Blackwell) and removes all variance but that of two
directions per output. We never draw G̃: with Gram–Schmidt q₁ = a⁺/‖a⁺‖, q₂ ∝ a⁻ − (q₁·a⁻)q₁,
the numbers z₁ = G̃_i·q₁ and z₂ = G̃_i·q₂ are independent N(0, 1), so the layer adds

    member +:  +L₁₁ z₁,    member −:  −(L₂₁ z₁ + L₂₂ z₂)      (L = the Cholesky factor of the
                                                             Gram matrix of a⁺, a⁻)

to its output, exactly the law of ±G̃a^±, and the estimate of the weights is
(ℓ⁺ − ℓ⁻)/2 · (z₁q₁ + z₂q₂)/s. Dividing by s cancels it out of q (a = s⊙[h; 1]), which leaves, per
example and output row,

    ĝ_W,i = c · [ h⁺ (z₁/L₁₁ − z₂·m₁₂/(m₁₁ L₂₂)) + Δ z₂/L₂₂ ],   Δ = h⁻ − h⁺,
    ĝ_β,i = c ·     (z₁/L₁₁ − z₂·m₁₂/(m₁₁ L₂₂)),

with m₁₁ = ‖a⁺‖², m₁₂ = a⁺·Δa, L₂₂² = ‖Δa‖² − m₁₂²/m₁₁ computed from Δ, so nothing cancels when
the two members' inputs are close. Where h⁻ = h⁺ (the first layer; L₂₂ = 0) the projection is
onto a⁺ alone and z₂ is not drawn. Summed over the batch these are two matrix products,
(c·α)ᵀH⁺ + (c·β)ᵀΔ: the cost of a backprop weight gradient, no per-example matrices.

Conv layers. The patches of one example span the whole kernel space once the output has more
positions than the kernel has entries (LeNet: 576 positions against 26 kernel entries in the
first layer), so projecting onto them keeps everything; the cheaper exact conditioning is on the
kernel draw itself: every example gets its own G_b (out × in·k·k), applied as one grouped
convolution, and the estimate is the weight-space one, c · G_b/s, averaged over B independent
draws instead of one. docs/theory.md §16 derives the variance of both.

With ``num_pairs`` N every example takes N independent pairs (2N forward passes of the batch);
c = (ℓ_b⁺ − ℓ_b⁻)/(2NB) for per-example losses ℓ (cross-entropy by default). Every parameter
must belong to a Linear or Conv2d layer (:func:`node_unsupported_reason`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robusttrain.noise.seeds import pair_seed
from robusttrain.zo.arguments import Sigmas, check_estimator_args, per_tensor
from robusttrain.zo.coefficients import NonFiniteLossError, SmoothedGradEstimate

__all__ = ["node_smoothed_grad", "node_unsupported_reason", "per_example_cross_entropy"]

# L₂₂² below this fraction of ‖Δa‖² is rounding (float32 computes it to ~1e-7 of ‖Δa‖²): the two
# inputs are treated as parallel, which moves the minus member by less than 1e-3 of its own noise
_PARALLEL = 1e-6


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every row, shape (rows,)."""
    return F.cross_entropy(logits, y, reduction="none")


def node_unsupported_reason(model: nn.Module) -> str | None:
    """Why node perturbation cannot run ``model`` (``None`` when it can).

    Every trainable parameter must be the weight or bias of a Linear (on (batch, features)
    inputs) or a Conv2d (groups 1, zero padding) layer; layers without trainable parameters may
    be anything that acts on each example alone (activations, pooling, flattening, residual
    additions, frozen norms in eval mode).
    """
    found = False
    for module in model.modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                return (f"{type(module).__name__} in training mode mixes the examples of the "
                        "batch; freeze it (eval mode)")
            continue
        name = type(module).__name__
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            return (f"{name} holds trainable parameters, and node perturbation handles Linear and "
                    "Conv2d layers only; use perturbation: gaussian or lowrank for this network")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            return f"{name} has groups={module.groups}, padding_mode={module.padding_mode!r}"
        found = True
    return None if found else "the model has no trainable Linear or Conv2d layer"


@dataclass
class _Layer:
    """One perturbed layer: its scales, and what its hook recorded for the estimate."""

    module: nn.Module
    weight_scale: float | torch.Tensor | None  # None: the weight is frozen
    bias_scale: float | torch.Tensor | None
    generator: torch.Generator
    record: dict[str, torch.Tensor] = field(default_factory=dict)


def _square(scale: float | torch.Tensor) -> float | torch.Tensor:
    return scale * scale


def _two_members(out: torch.Tensor, plus: torch.Tensor | float, minus: torch.Tensor | float,
                 pairs: int, rows: int) -> torch.Tensor:
    """The 2N·B member rows: the + members' ``out + plus``, the − members' ``out − minus``.

    ``out`` holds the clean product of the layer's input: (N·2·B, …) once the members are
    expanded (written in place), or the B shared rows before (broadcast to every pair).
    """
    if out.shape[0] != rows:
        members = out.view(pairs, 2, rows, *out.shape[1:])
        members[:, 0] += plus
        members[:, 1] -= minus
        return out
    return torch.stack((out + plus, out - minus), dim=1).reshape(pairs * 2 * rows, *out.shape[1:])


def _linear_members(layer: _Layer, h: torch.Tensor, out: torch.Tensor, pairs: int,
                    rows: int) -> torch.Tensor:
    """The 2N·B member outputs of a Linear layer, and its record (see the module docstring).

    ``h`` is the layer's input: (B, in) before the members are expanded, (N·2·B, in) after;
    ``out`` the clean product of that input.
    """
    module = layer.module
    assert isinstance(module, nn.Linear)
    out_f = module.out_features
    expanded = h.shape[0] != rows
    if expanded:
        hv = h.view(pairs, 2, rows, -1)
        h_plus, delta = hv[:, 0], hv[:, 1] - hv[:, 0]  # (N, B, in)
    else:
        h_plus, delta = h[None], None  # (1, B, in): the same for every pair
    sw, sb = layer.weight_scale, layer.bias_scale
    zero = h.new_zeros(())

    def gram(a: torch.Tensor, b: torch.Tensor, with_bias: bool) -> torch.Tensor:
        """Σ_j s_ij² a_j b_j (+ s_β,i² for the bias coordinate): (N, B, out) or (N, B, 1)."""
        if sw is None:
            total: torch.Tensor = zero.expand(1, 1, 1)
        elif isinstance(sw, torch.Tensor) and sw.dim() == 2:
            total = (a * b) @ (sw * sw).t().to(h.dtype)
        else:
            total = (a * b).sum(-1, keepdim=True) * _square(sw)
        if with_bias and sb is not None:
            sb2 = _square(sb)
            total = total + (sb2.to(h.dtype) if isinstance(sb2, torch.Tensor) else sb2)
        return total

    m11 = gram(h_plus, h_plus, True)
    l11 = m11.sqrt()
    z1 = torch.randn(pairs, rows, out_f, generator=layer.generator, device=h.device, dtype=h.dtype)
    record = {"h_plus": h if not expanded else h_plus, "z1": z1, "l11": l11}
    u_plus = l11 * z1  # (N, B, out)
    u_minus = u_plus  # both members see the same input (the first layer): u⁻ = u⁺
    if delta is not None:
        m12 = gram(h_plus, delta, False)
        m22 = gram(delta, delta, False)
        rest = (m22 - m12 * m12 / m11).clamp_min(0)
        independent = rest > _PARALLEL * m22
        # where the inputs are parallel, z₂ = 0 and L₂₂ = 1 (any nonzero value: it only divides z₂)
        l22 = torch.where(independent, rest, torch.ones_like(rest)).sqrt()
        z2 = torch.randn(pairs, rows, out_f, generator=layer.generator, device=h.device,
                         dtype=h.dtype) * independent
        u_minus = (l11 + m12 / l11) * z1 + l22 * z2  # L₂₁z₁ + L₂₂z₂
        record.update(delta=delta, z2=z2, l22=l22, m12=m12)
    layer.record = record
    return _two_members(out, u_plus, u_minus, pairs, rows)


def _conv_members(layer: _Layer, h: torch.Tensor, out: torch.Tensor, pairs: int,
                  rows: int) -> torch.Tensor:
    """The member outputs of a Conv2d layer with one kernel draw per example and pair."""
    module = layer.module
    assert isinstance(module, nn.Conv2d)
    out_c, in_c, kh, kw = module.weight.shape
    expanded = h.shape[0] != rows
    gen, dev, dtype = layer.generator, h.device, h.dtype
    # (N·B, in, H, W): the inputs of the + members, and of the − members once they differ
    h_plus = h.view(pairs, 2, rows, *h.shape[1:])[:, 0] if expanded else h[None].expand(
        pairs, *h.shape)
    record: dict[str, torch.Tensor] = {}
    corr_plus: torch.Tensor | float = 0.0
    corr_minus: torch.Tensor | float = 0.0
    if layer.weight_scale is not None:
        g = torch.randn(pairs * rows, out_c, in_c, kh, kw, generator=gen, device=dev, dtype=dtype)
        record["g_weight"] = g
        scale = layer.weight_scale
        kernels = (g * scale.to(dtype) if isinstance(scale, torch.Tensor) else g * scale)
        kernels = kernels.reshape(pairs * rows * out_c, in_c, kh, kw)
        conv: dict[str, Any] = dict(stride=module.stride, padding=module.padding,
                                    dilation=module.dilation, groups=pairs * rows)

        def grouped(inputs: torch.Tensor) -> torch.Tensor:  # (N, B, in, H, W) → (N, B, out, H', W')
            flat = inputs.reshape(1, pairs * rows * in_c, *inputs.shape[-2:])
            res = F.conv2d(flat, kernels, **conv)
            return res.view(pairs, rows, out_c, *res.shape[-2:])

        corr_plus = grouped(h_plus)
        corr_minus = grouped(h.view(pairs, 2, rows, *h.shape[1:])[:, 1]) if expanded else corr_plus
    if layer.bias_scale is not None:
        gb = torch.randn(pairs * rows, out_c, generator=gen, device=dev, dtype=dtype)
        record["g_bias"] = gb
        scale = layer.bias_scale
        shift = (gb * scale.to(dtype) if isinstance(scale, torch.Tensor) else gb * scale).view(
            pairs, rows, out_c, 1, 1)
        corr_plus = corr_plus + shift
        corr_minus = corr_minus + shift
    layer.record = record
    return _two_members(out, corr_plus, corr_minus, pairs, rows)


def _linear_grads(layer: _Layer, coef: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ĝ_W, ĝ_β) of a Linear layer from the per-example coefficients ``coef`` (N, B)."""
    rec = layer.record
    c = coef[..., None].to(rec["z1"].dtype)
    along_plus = rec["z1"] / rec["l11"]
    along_delta = None
    if "delta" in rec:
        along_plus = along_plus - rec["z2"] * rec["m12"] / (rec["l11"] * rec["l11"] * rec["l22"])
        along_delta = c * rec["z2"] / rec["l22"]
    along_plus = c * along_plus  # (N, B, out)
    out_f = along_plus.shape[-1]
    grad_w = None
    if layer.weight_scale is not None:
        h_plus = rec["h_plus"]
        if h_plus.dim() == 2:  # one input for every pair (the first layer): sum the pairs first
            grad_w = along_plus.sum(0).t() @ h_plus
        else:
            grad_w = along_plus.reshape(-1, out_f).t() @ h_plus.reshape(-1, h_plus.shape[-1])
        if along_delta is not None:
            delta = rec["delta"]
            grad_w += along_delta.reshape(-1, out_f).t() @ delta.reshape(-1, delta.shape[-1])
    grad_b = along_plus.sum((0, 1)) if layer.bias_scale is not None else None
    return grad_w, grad_b


def _conv_grads(layer: _Layer, coef: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ĝ_W, ĝ_β) of a Conv2d layer: Σ c · G/s over the examples and pairs."""
    rec, c = layer.record, coef.reshape(-1)
    grads: list[torch.Tensor | None] = []
    for key, scale in (("g_weight", layer.weight_scale), ("g_bias", layer.bias_scale)):
        if scale is None:
            grads.append(None)
            continue
        g = rec[key]
        total = torch.tensordot(c.to(g.dtype), g, dims=1)
        grads.append(total / (scale.to(g.dtype) if isinstance(scale, torch.Tensor) else scale))
    return grads[0], grads[1]


def node_smoothed_grad(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float | Sigmas,
    num_pairs: int = 1,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_example_cross_entropy,
) -> SmoothedGradEstimate:
    r"""Node-perturbation estimate of ∇L_σ for the batch (x, y): unbiased, see the module docstring.

    Args:
        model: a network of Linear/Conv2d layers and parameter-free per-example layers
            (:func:`node_unsupported_reason`); its parameters are only read.
        x: input batch (B, …).
        y: targets (B, …), passed to ``loss_fn``.
        sigma: smoothing scale, or one per trainable parameter (a number, a 0-dim tensor or a
            tensor of the parameter's shape: the noise models of
            :func:`robusttrain.noise.smoothing_sigmas`).
        num_pairs: independent antithetic pairs per example N (2N forward passes of the batch).
        seed: the draws are a function of ``seed`` and the layer's position only.
        loss_fn: per-example loss, ``loss_fn(logits, y) → (rows,)``; the batch loss is its mean.

    Returns:
        The estimate (one tensor per trainable parameter, in ``model.parameters()`` order), with
        the N pairs' mean losses; ``num_forward`` 2N.

    Raises:
        NonFiniteLossError: a member's loss on some example was NaN or infinite.
        ValueError: an unsupported model or bad arguments.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> est = node_smoothed_grad(model, x, y, sigma=0.01, num_pairs=2, seed=1)
        >>> [tuple(g.shape) for g in est.grads], est.num_forward
        ([(8, 4), (8,), (3, 8), (3,)], 4)
    """
    reason = node_unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"node perturbation cannot run {type(model).__name__}: {reason}")
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    check_estimator_args(params, sigma, num_pairs, seed, "antithetic")
    scales: dict[int, float | torch.Tensor] = {}
    for i, p in enumerate(params):
        s = sigma[i] if per_tensor(sigma) else sigma
        scales[id(p)] = s.detach() if isinstance(s, torch.Tensor) else float(s)
    rows = x.shape[0]
    layers: list[_Layer] = []
    handles = []
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        w, b = module.weight, module.bias
        weight_scale = scales.get(id(w)) if w.requires_grad else None
        bias_scale = scales.get(id(b)) if b is not None and b.requires_grad else None
        if weight_scale is None and bias_scale is None:
            continue
        gen = torch.Generator(device=x.device).manual_seed(pair_seed(seed, len(layers)))
        layer = _Layer(module, weight_scale, bias_scale, gen)
        layers.append(layer)
        members = _linear_members if isinstance(module, nn.Linear) else _conv_members

        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                 layer: _Layer = layer, members: Any = members) -> torch.Tensor:
            h = inputs[0]
            if h.shape[0] not in (rows, 2 * num_pairs * rows):
                raise RuntimeError(
                    f"a layer received {h.shape[0]} rows, expected {rows} or {2 * num_pairs * rows}:"
                    " the model mixes the examples of the batch, which node perturbation cannot "
                    "follow; use perturbation: gaussian")
            if isinstance(mod, nn.Linear) and h.dim() != 2:
                raise RuntimeError(f"a Linear layer received a {h.dim()}-D input; node "
                                   "perturbation handles Linear layers on (batch, features) inputs")
            result: torch.Tensor = members(layer, h, output, num_pairs, rows)
            return result

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(x)
            if logits.shape[0] != 2 * num_pairs * rows:
                raise RuntimeError("the model's output does not come from its perturbed layers")
            target = y.repeat(2 * num_pairs, *[1] * (y.dim() - 1))
            losses = loss_fn(logits, target).reshape(num_pairs, 2, rows).double()
            _check_finite(losses)
            coef = (losses[:, 0] - losses[:, 1]) / (2 * num_pairs * rows)  # (N, B)
            by_param: dict[int, torch.Tensor] = {}
            for layer in layers:
                grad_w, grad_b = (_linear_grads if isinstance(layer.module, nn.Linear)
                                  else _conv_grads)(layer, coef)
                layer.record = {}
                if grad_w is not None:
                    by_param[id(layer.module.weight)] = grad_w
                if grad_b is not None:
                    assert layer.module.bias is not None
                    by_param[id(layer.module.bias)] = grad_b
    finally:
        for handle in handles:
            handle.remove()
    grads = [by_param[id(p)].to(p.dtype).reshape(p.shape) for p in params]
    means = losses.mean(-1).cpu()
    return SmoothedGradEstimate(grads, means[:, 0], means[:, 1], None, 2 * num_pairs)


def _check_finite(losses: torch.Tensor) -> None:
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        pair, side, example = (int(v) for v in bad.nonzero()[0])
        value = float(losses[pair, side, example])
        sign = "+" if side == 0 else "-"
        raise NonFiniteLossError(
            f"the loss of example {example} in pair {pair} ({sign} member) is {value}: lower sigma "
            "or the learning rate, or restart from an earlier checkpoint",
            pair=pair, sign=sign, value=value,
        )
