"""Matrix measurements the paper argues from: numerical rank, singular values, delta W comparisons.

Everything here takes torch tensors or numpy arrays and returns plain Python numbers, so the results
can go straight into JSON. Decompositions use numpy / scipy (LAPACK) in float64: the inputs are
float32 at most, and doing the SVD itself in float64 keeps the decomposition's own error far below the
tolerance, so the tolerance only has to account for the precision the matrix was *computed* in.

Definitions (also in docs/analysis.md):

* Numerical rank: the number of singular values strictly greater than ``tol = rtol * sigma_max``. The
  default ``rtol`` is ``max(m, n) * eps`` where ``eps`` is the machine epsilon of the dtype the matrix
  arrived in (float32: 1.19e-7, float64: 2.2e-16). That is numpy's ``matrix_rank`` default, but with
  the epsilon of the data rather than of the float64 computation: a float32 product such as
  ``s*B@A@W0`` carries float32 rounding noise that float64's epsilon would count as extra rank.
* Frobenius distance ``||X - Y||_F`` and cosine of the flattened matrices ``<X, Y>_F / (|X|_F |Y|_F)``.
* Top-r singular values: ``sum_i (s_i(X) - s_i(Y))^2`` over the r largest singular values of each.
* Top-r eigenvalues (square matrices only): eigenvalues of a real matrix are complex in general, and
  conjugate pairs have equal modulus, so pairing complex values by a sort order is ambiguous. We sort
  each matrix's eigenvalues by modulus, largest first, and compare the moduli:
  ``sum_i (|l_i(X)| - |l_i(Y)|)^2`` over the first r. (The paper does not say how it orders them.)
* First principal angle: the smallest principal angle (Bjorck & Golub's theta_1, the one with the
  largest cosine) between the spans of the top-k left singular vectors of X and of Y, in radians,
  computed with ``scipy.linalg.subspace_angles`` (which lists the angles largest first, so theta_1 is
  its last entry). k defaults to r. We also report the largest angle, which says whether the two
  k-dimensional spaces coincide rather than merely share one direction. Restricting to the top-k
  singular vectors matters: a full-rank delta W (LoRMA_pi) spans the whole space, and the angle
  between "column spaces" would then be 0 against anything.
* Random control: a Gaussian matrix of the same shape scaled to a given Frobenius norm (by default
  the norm of the matrix it stands in for), from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.linalg

from lorma.runs.spectrum import to_numpy

__all__ = [
    "MatrixComparison",
    "compare_matrices",
    "random_control",
    "summarise",
]


def _top_left_singular_vectors(array: np.ndarray, k: int) -> np.ndarray:
    u, _, _ = scipy.linalg.svd(array, full_matrices=False)
    return u[:, :k]


def _sorted_eig_moduli(array: np.ndarray) -> np.ndarray:
    moduli = np.abs(scipy.linalg.eigvals(array))
    return np.sort(moduli)[::-1]


@dataclass(frozen=True)
class MatrixComparison:
    """How close ``x`` is to the reference ``y`` (the paper's Table 9 rows, plus the largest angle)."""

    frobenius_distance: float  # ||x - y||_F, lower is closer
    cosine: float  # cosine of the flattened matrices, higher is closer
    sv_sq_diff: float  # sum over top-r singular values of (s_i(x) - s_i(y))^2
    eig_sq_diff: float | None  # same over top-r eigenvalue moduli; None for non-square matrices
    angle_first: float  # smallest principal angle between top-k left singular spaces (radians)
    angle_largest: float  # largest principal angle between the same spaces (radians)
    r: int
    k: int
    norm_x: float
    norm_y: float

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def compare_matrices(
    x: Any, y: Any, r: int, k: int | None = None, names: tuple[str, str] = ("x", "y")
) -> MatrixComparison:
    """Compare ``x`` against the reference ``y`` with the paper's metrics (definitions: module docstring).

    ``r`` is how many top singular values / eigenvalues enter the sums (the adapter rank in the
    paper); ``k`` the dimension of the singular subspaces whose principal angles are measured
    (default ``r``).
    """
    a = to_numpy(x, names[0])
    b = to_numpy(y, names[1])
    if a.shape != b.shape:
        raise ValueError(f"cannot compare {names[0]} of shape {a.shape} with {names[1]} of shape {b.shape}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    size = min(a.shape)
    r_eff = min(r, size)
    k_eff = min(k if k is not None else r, size)
    if k_eff < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    norm_a = float(np.linalg.norm(a))
    norm_b = float(np.linalg.norm(b))
    denom = norm_a * norm_b
    # cosine of two zero matrices is undefined: report NaN rather than a made-up number
    cosine = float(np.sum(a * b) / denom) if denom > 0 else float("nan")
    sv_a = scipy.linalg.svdvals(a)[:r_eff]
    sv_b = scipy.linalg.svdvals(b)[:r_eff]
    eig_diff: float | None = None
    if a.shape[0] == a.shape[1]:
        eig_diff = float(np.sum((_sorted_eig_moduli(a)[:r_eff] - _sorted_eig_moduli(b)[:r_eff]) ** 2))
    angles = scipy.linalg.subspace_angles(
        _top_left_singular_vectors(a, k_eff), _top_left_singular_vectors(b, k_eff)
    )  # descending order
    return MatrixComparison(
        frobenius_distance=float(np.linalg.norm(a - b)),
        cosine=cosine,
        sv_sq_diff=float(np.sum((sv_a - sv_b) ** 2)),
        eig_sq_diff=eig_diff,
        angle_first=float(angles[-1]),
        angle_largest=float(angles[0]),
        r=r_eff,
        k=k_eff,
        norm_x=norm_a,
        norm_y=norm_b,
    )


def random_control(shape: tuple[int, int], norm: float, seed: int = 0, dtype: type = np.float64) -> np.ndarray:
    """A Gaussian matrix of the given shape scaled to Frobenius norm ``norm`` (seeded, reproducible)."""
    if norm < 0:
        raise ValueError(f"norm must be >= 0, got {norm}")
    rng = np.random.default_rng(seed)
    m = rng.standard_normal(shape)
    return (m * (norm / np.linalg.norm(m))).astype(dtype)


def summarise(values: Mapping[str, float | int | None]) -> dict[str, float | int]:
    """Mean, min and max over modules of one metric, skipping None and NaN."""
    finite = [float(v) for v in values.values() if v is not None and np.isfinite(v)]
    if not finite:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(np.mean(finite)), "min": min(finite), "max": max(finite), "n": len(finite)}
