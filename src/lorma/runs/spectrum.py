"""Singular values and numerical rank of a matrix, as the rank callback records them during training and
:mod:`lorma.analysis.matrices` reports them (the paper's rank measurements, Section 5.3). numpy / scipy only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.linalg


def _input_eps(matrix: Any) -> float:
    """Machine epsilon of the dtype the matrix arrived in (torch or numpy); float64 for anything else."""
    dtype = getattr(matrix, "dtype", None)
    if dtype is not None and hasattr(dtype, "is_floating_point"):  # a torch dtype
        import torch

        if dtype.is_floating_point:
            return float(torch.finfo(dtype).eps)
        return float(np.finfo(np.float64).eps)
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating):
        return float(np.finfo(np.dtype(dtype)).eps)
    return float(np.finfo(np.float64).eps)


def to_numpy(matrix: Any, name: str = "matrix") -> np.ndarray:
    """A float64 2-D numpy copy of a torch tensor or array-like; errors name the offending input."""
    if hasattr(matrix, "detach"):  # torch tensor: move to CPU, upcast there
        matrix = matrix.detach().to("cpu").double().numpy()
    array = np.asarray(matrix, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name}: empty matrix of shape {tuple(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite entries")
    return array


def default_rtol(shape: tuple[int, ...], eps: float) -> float:
    """numpy's matrix_rank default relative tolerance, max(m, n) * eps, for a given epsilon."""
    return float(max(shape) * eps)


def singular_values(matrix: Any, name: str = "matrix") -> np.ndarray:
    """All singular values, largest first (LAPACK gesdd via scipy, in float64)."""
    return scipy.linalg.svdvals(to_numpy(matrix, name))


@dataclass(frozen=True)
class SVSummary:
    """Rank and singular-value summary of one matrix; ``tol`` is the absolute threshold actually used."""

    rank: int
    size: int  # min(m, n): the largest rank possible
    rtol: float
    tol: float
    sigma_max: float
    sigma_min: float
    cond: float  # sigma_max / sigma_min; inf when sigma_min is 0
    sigma_median: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _summary_from_svals(svals: np.ndarray, shape: tuple[int, int], rtol: float) -> SVSummary:
    sigma_max = float(svals[0])
    sigma_min = float(svals[-1])
    tol = rtol * sigma_max
    rank = int(np.count_nonzero(svals > tol))
    cond = sigma_max / sigma_min if sigma_min > 0 else float("inf")
    return SVSummary(
        rank=rank,
        size=min(shape),
        rtol=rtol,
        tol=tol,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        cond=cond,
        sigma_median=float(np.median(svals)),
    )


def sv_summary(matrix: Any, rtol: float | None = None, name: str = "matrix") -> SVSummary:
    """Numerical rank and singular-value summary; ``rtol=None`` means max(m, n) * eps(input dtype)."""
    eps = _input_eps(matrix)
    array = to_numpy(matrix, name)
    if rtol is None:
        rtol = default_rtol(array.shape, eps)
    elif not (rtol >= 0):
        raise ValueError(f"{name}: relative tolerance must be >= 0, got {rtol}")
    return _summary_from_svals(scipy.linalg.svdvals(array), array.shape, rtol)


def numerical_rank(matrix: Any, rtol: float | None = None, name: str = "matrix") -> int:
    """Number of singular values above ``rtol * sigma_max`` (see the module docstring for the default)."""
    return sv_summary(matrix, rtol=rtol, name=name).rank
