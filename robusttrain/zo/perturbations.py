r"""Perturbation families: the random directions z_i that the smoothed-loss estimators use.

* ``gaussian`` (the default and the reference): every entry of z is N(0, 1), so the estimators
  target the exactly Gaussian-smoothed loss L_σ(θ) = E_g[L(θ + σg)].
* ``lowrank`` (EGGROLL, Sarkar et al. 2025, "Evolution Strategies at the Hyperscale"): a tensor
  with two or more dimensions is viewed as a matrix W of shape out × in (a conv kernel as
  out × in·k·k) and perturbed by

      E = A Bᵀ / √r,    A (out × r), B (in × r) with independent N(0, 1) entries.

  E has mean 0 and identity covariance, E[E_ab E_cd] = (1/r) Σ_j E[A_aj A_cj] E[B_bj B_dj]
  = δ_ac δ_bd, so the low-rank smoothed loss agrees with L_σ to second order in σ (exactly for a
  quadratic loss); its entries have excess kurtosis 6/r, which shows at fourth order
  (docs/theory.md). One-dimensional tensors (biases, norm scales) get Gaussian noise.

A member's forward pass through a low-rank-perturbed layer is x Wᵀ ± σ/√r (x B) Aᵀ: the clean
product is shared by all members and the perturbation costs O((in + out)·r) per example, which is
what :mod:`robusttrain.zo.population` exploits. The update Σ_i c_i E_i is one matrix product of the
stacked factors (:meth:`Perturbation.combine`), so no member's dense direction is ever needed.

Layout. Pair i's direction is stored as one flat vector of *factors*: tensor after tensor (in the
order given), a low-rank tensor contributes A (out·r entries, row-major) then B (in·r), any other
tensor its own entries. For ``gaussian`` the factors *are* the direction, laid out as
:func:`robusttrain.noise.seeds.draw_noise` lays it out, and pair i's are drawn by one ``randn`` call
from a generator seeded with ``pair_seed(seed, i)``, so a dense direction can be regenerated alone
instead of keeping N of them. For ``lowrank`` the factors are small, and the N pairs' are the rows
of one (N, F) block drawn by a single ``randn`` call from ``pair_seed(seed, 0)`` — N generator
seedings cost more than the whole draw (:meth:`Perturbation.draw_block`).

Orthogonal directions (``orthogonal=True``; Choromanski et al. 2018, "Structured Evolution with
Compact Architectures for Scalable Policy Optimization", ICML, and Choromanski et al. 2017, "The
Unreasonable Effectiveness of Structured Random Orthogonal Embeddings", NeurIPS). The N pairs'
factors are then always one (N, F) block from ``pair_seed(seed, 0)`` (also for ``gaussian``), made
orthogonal in groups after the ``randn`` call (:func:`orthogonalize_rows`): a group of k ≤ n
Gaussian vectors g_1 … g_k in ℝⁿ becomes ‖g_j‖·q_j, with q_1 … q_k the orthonormal vectors of
Gram–Schmidt (QR with a positive diagonal of R). q_1 … q_k are uniform on the set of orthonormal
k-frames and depend on the g_j only through their directions, so the norms ‖g_j‖ are independent
chi_n draws, independent of the q_j: every vector is marginally *exactly* N(0, I_n) while those of
a group are exactly orthogonal.

* ``gaussian`` + orthogonal: n = F, the whole direction; the N directions form groups of at most F
  (N > F: several independent groups). Each z_i is N(0, I), so every estimator keeps its mean; the
  price is memory: the whole (N, F) float32 block of dense directions is held during an estimate
  (N·F·4 bytes: 256 MB for N = 64 and F = 10⁶; its QR needs about three times that for a moment)
  and the QR costs O(F·N²).
* ``lowrank`` + orthogonal: per low-rank tensor, the N·r columns of A (out × N·r, pair-major)
  in groups of at most out, the N·r columns of B in groups of at most in. A and B stay
  independent with marginally Gaussian columns that are uncorrelated, E[A_aj A_cl] = δ_ac δ_jl
  (flipping the sign of one g_j flips q_j alone), so each direction keeps mean 0 and identity
  covariance, (10) of docs/theory.md; for r > 1 a pair's own r columns are orthogonal too, which
  changes its fourth moments (not its first two). Every other tensor of the family (biases, norm
  scales, Gaussian entries) is orthogonalized the Gaussian way over its own entries: its N
  vectors in groups of at most its size.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from robusttrain.noise.seeds import pair_seed

__all__ = ["PERTURBATIONS", "Perturbation", "LowRankFactors", "orthogonalize_rows"]

PERTURBATIONS = ("gaussian", "lowrank")


@dataclass(frozen=True)
class LowRankFactors:
    """The factors of one tensor's low-rank directions for K pairs.

    Attributes:
        a: (K, out, r) left factors.
        b: (K, in, r) right factors (in = product of the tensor's trailing dimensions).
        scale: 1/√r, so that a direction is ``scale · a[k] @ b[k].T``; the population engine
            multiplies in a tensor's smoothing scale, which may be a 0-dim tensor.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float | torch.Tensor


@dataclass(frozen=True)
class Perturbation:
    """A family of random directions for a list of tensors.

    Args:
        kind: ``"gaussian"`` (dense N(0, I)) or ``"lowrank"`` (rank-``rank`` A Bᵀ/√r on tensors
            with two or more dimensions, Gaussian on the others).
        rank: r, the rank of each low-rank direction (ignored by ``"gaussian"``).
        orthogonal: make the N pairs' directions of a step orthogonal in groups, each still
            marginally Gaussian (module docstring); ``False`` (default): independent directions.

    Raises:
        ValueError: an unknown kind, a rank that is not a positive integer, or an ``orthogonal``
            that is not a bool.
    """

    kind: str = "gaussian"
    rank: int = 1
    orthogonal: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATIONS:
            raise ValueError(
                f"unknown perturbation {self.kind!r}; choose one of {', '.join(PERTURBATIONS)}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1 (e.g. 1), got {self.rank!r}")
        if not isinstance(self.orthogonal, bool):
            raise ValueError(
                f"orthogonal must be True or False, got {self.orthogonal!r} "
                f"({type(self.orthogonal).__name__})"
            )

    @property
    def drawn_as_block(self) -> bool:
        """Whether the N pairs' factors are one block from ``pair_seed(seed, 0)`` (low-rank or
        orthogonal), rather than pair i's alone from ``pair_seed(seed, i)``."""
        return self.kind == "lowrank" or self.orthogonal

    # ----- layout ---------------------------------------------------------------------------
    def is_lowrank(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` gets a low-rank direction (low-rank family, two or more dims)."""
        return self.kind == "lowrank" and tensor.dim() >= 2

    def factor_sizes(self, params: Sequence[torch.Tensor]) -> list[int]:
        """Number of factor entries per tensor."""
        sizes = []
        for p in params:
            if self.is_lowrank(p):
                out_f = p.shape[0]
                sizes.append((out_f + p.numel() // out_f) * self.rank)
            else:
                sizes.append(p.numel())
        return sizes

    def num_factors(self, params: Sequence[torch.Tensor]) -> int:
        """F, the length of one pair's flat factor vector."""
        return sum(self.factor_sizes(params))

    def draw(
        self, params: Sequence[torch.Tensor], generator: torch.Generator,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pair's factors, (F,) float32, drawn with one ``randn`` call from ``generator``.

        Independent of every other pair's: orthogonal directions come from :meth:`draw_block`.
        """
        total = self.num_factors(params)
        device = params[0].device
        if out is None:
            out = torch.empty(total, device=device, dtype=torch.float32)
        return torch.randn(total, generator=generator, device=device, dtype=torch.float32, out=out)

    def draw_block(
        self, params: Sequence[torch.Tensor], seed: int, num_pairs: int, start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Factors of pairs ``start … stop − 1`` of an estimate with ``num_pairs`` pairs, (K, F).

        The convention every path shares (loop and population engine): see the module docstring.
        A family drawn as a block (:attr:`drawn_as_block`) draws all ``num_pairs`` rows and
        orthogonalizes them (when ``orthogonal``) whatever the slice asked for, so draw it once
        per estimate and slice it.
        """
        stop = num_pairs if stop is None else stop
        device = params[0].device
        generator = torch.Generator(device=device)
        total = self.num_factors(params)
        if self.drawn_as_block:
            generator.manual_seed(pair_seed(seed, 0))
            block = torch.randn(num_pairs, total, generator=generator, device=device)
            if self.orthogonal:
                block = self._orthogonalized(params, block)
            return block[start:stop]
        block = torch.empty(stop - start, total, device=device, dtype=torch.float32)
        for j in range(stop - start):
            generator.manual_seed(pair_seed(seed, start + j))
            self.draw(params, generator, out=block[j])
        return block

    def _orthogonalized(self, params: Sequence[torch.Tensor], block: torch.Tensor) -> torch.Tensor:
        """The (N, F) block with its directions made orthogonal (module docstring)."""
        if self.kind == "gaussian":
            return orthogonalize_rows(block)  # N vectors in ℝ^F
        n = block.shape[0]
        for part in self.split(params, block):
            if isinstance(part, LowRankFactors):
                # the N·r columns of A (out × N·r) and of B (in × N·r), as rows, pair-major
                for factor in (part.a, part.b):
                    rows = factor.transpose(1, 2).reshape(-1, factor.shape[1])  # (N·r, out or in)
                    factor.copy_(orthogonalize_rows(rows).view(n, -1, factor.shape[1])
                                 .transpose(1, 2))
            else:
                rows = part.reshape(n, -1)  # the tensor's N dense directions, (N, numel)
                part.copy_(orthogonalize_rows(rows).view(part.shape))
        return block  # the factors were written through the views of split

    def split(
        self, params: Sequence[torch.Tensor], factors: torch.Tensor
    ) -> list[torch.Tensor | LowRankFactors]:
        """Views of a (K, F) block of factors, one entry per tensor.

        A low-rank tensor gets :class:`LowRankFactors`; any other tensor a (K, *shape) view of
        its dense directions.
        """
        k = factors.shape[0]
        parts: list[torch.Tensor | LowRankFactors] = []
        offset = 0
        scale = 1.0 / math.sqrt(self.rank)
        for p, size in zip(params, self.factor_sizes(params)):
            block = factors[:, offset : offset + size]
            offset += size
            if self.is_lowrank(p):
                out_f, r = p.shape[0], self.rank
                in_f = p.numel() // out_f
                a = block[:, : out_f * r].unflatten(1, (out_f, r))
                b = block[:, out_f * r :].unflatten(1, (in_f, r))
                parts.append(LowRankFactors(a, b, scale))
            else:
                parts.append(block.view(k, *p.shape))
        return parts

    # ----- directions and updates ---------------------------------------------------------
    def dense(
        self, params: Sequence[torch.Tensor], factors: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The dense direction z (P,) of one pair's factors (F,), in ``draw_noise``'s layout.

        For ``gaussian`` this is ``factors`` itself (no copy), or ``factors`` copied into ``out``.
        """
        if self.kind == "gaussian":
            return factors if out is None else out.copy_(factors)
        total = sum(p.numel() for p in params)
        if out is None:
            out = torch.empty(total, device=factors.device, dtype=torch.float32)
        offset = 0
        for p, part in zip(params, self.split(params, factors[None])):
            n = p.numel()
            target = out[offset : offset + n]
            if isinstance(part, LowRankFactors):
                torch.matmul(part.a[0], part.b[0].T, out=target.view(p.shape[0], -1))
                target.mul_(part.scale)
            else:
                target.copy_(part[0].flatten())
            offset += n
        return out

    def combine(
        self, params: Sequence[torch.Tensor], coefficients: torch.Tensor, factors: torch.Tensor
    ) -> list[torch.Tensor]:
        """Σ_k c_k z_k per tensor, from a (K, F) block of factors and (K,) coefficients.

        For a low-rank tensor this is one matrix product, (A·c)ᵀ-stacked times B-stacked:
        Σ_k c_k A_k B_kᵀ/√r = [c_1 A_1 … c_K A_K] [B_1 … B_K]ᵀ/√r, never forming a dense E_k.
        """
        c = coefficients.to(device=factors.device, dtype=torch.float32)
        grads = []
        for p, part in zip(params, self.split(params, factors)):
            if isinstance(part, LowRankFactors):
                k, out_f, r = part.a.shape
                left = (part.a * c[:, None, None]).permute(1, 0, 2).reshape(out_f, k * r)
                right = part.b.permute(1, 0, 2).reshape(-1, k * r)
                grads.append((left @ right.T).mul_(part.scale).view(p.shape))
            else:
                grads.append((c @ part.flatten(1)).view(p.shape))
        return grads


def orthogonalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows (M, n) of i.i.d. N(0, 1) → (M, n), orthogonal in consecutive groups of at most n rows.

    Row j of a group becomes ‖g_j‖·q_j with q the Gram–Schmidt orthonormalization of the group
    (QR of its transpose with diag R > 0), so each row keeps its own chi_n norm, independent of the
    uniformly random orthonormal q: each row is marginally N(0, I_n) exactly, and the first row of
    each group is left as it was (module docstring). Full groups go through one batched QR.

    Example:
        >>> rows = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
        >>> q = orthogonalize_rows(rows)
        >>> bool(torch.allclose(q @ q.T, torch.diag(rows.norm(dim=1) ** 2), atol=1e-4))
        True
    """
    m, n = rows.shape
    full = (m // n) * n
    out = torch.empty_like(rows)
    if full:
        out[:full] = _orthogonal_groups(rows[:full].reshape(m // n, n, n)).reshape(full, n)
    if full < m:
        out[full:] = _orthogonal_groups(rows[full:][None])[0]
    return out


def _orthogonal_groups(groups: torch.Tensor) -> torch.Tensor:
    """(G, k, n) with k ≤ n → each group's k rows orthogonalized, keeping their norms."""
    norms = torch.linalg.vector_norm(groups, dim=-1, keepdim=True)  # (G, k, 1)
    q, r = torch.linalg.qr(groups.transpose(1, 2))  # q (G, n, k), r (G, k, k)
    # the QR with a positive diagonal of R is Gram–Schmidt, unique: fix LAPACK's signs
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)  # a zero row: probability 0
    return q.transpose(1, 2) * signs[..., None] * norms
