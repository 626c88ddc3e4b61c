"""The matrix metrics of lorma.analysis.matrices against direct computations on small known matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorma.analysis.matrices import compare_matrices, random_control, summarise
from lorma.runs.spectrum import numerical_rank, sv_summary


def _rank_k(m: int, n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)) @ rng.standard_normal((k, n))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rank_k_matrix_has_rank_k(k: int) -> None:
    assert numerical_rank(_rank_k(20, 12, k)) == k
    # the same kind of product formed in float32 carries float32 rounding noise; the float32 tolerance
    # (max(m, n) * eps32 * sigma_max) ignores it
    g = torch.Generator().manual_seed(k)
    assert numerical_rank(torch.randn(20, k, generator=g) @ torch.randn(k, 12, generator=g)) == k


def test_float32_noise_would_count_at_float64_tolerance() -> None:
    """Why the default tolerance uses the input dtype: float64's epsilon counts float32 rounding as rank."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g)
    assert numerical_rank(m) == 4
    assert numerical_rank(m, rtol=64 * np.finfo(np.float64).eps) > 4


def test_summary_against_known_singular_values_and_given_tolerance() -> None:
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    sig = np.array([10.0, 5.0, 1.0, 1e-3, 1e-6])
    m = u[:, :5] @ np.diag(sig) @ v.T
    s = sv_summary(m)
    assert s.rank == 5 and s.size == 5
    assert s.rtol == pytest.approx(6 * np.finfo(np.float64).eps)
    assert s.tol == pytest.approx(s.rtol * 10.0)
    assert s.sigma_max == pytest.approx(10.0)
    assert s.sigma_min == pytest.approx(1e-6, rel=1e-6)
    assert s.cond == pytest.approx(1e7, rel=1e-6)
    assert s.sigma_median == pytest.approx(1.0)
    # a given relative tolerance: 1e-5 * 10 = 1e-4 drops only 1e-6; 2e-4 * 10 = 2e-3 drops 1e-3 as well
    assert numerical_rank(m, rtol=1e-5) == 4
    assert numerical_rank(m, rtol=2e-4) == 3
    assert numerical_rank(np.zeros((3, 4))) == 0
    assert sv_summary(np.zeros((3, 4))).cond == math.inf


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="delta: expected a 2-D"):
        numerical_rank(np.ones(3), name="delta")
    with pytest.raises(ValueError, match="NaN"):
        numerical_rank(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="shape"):
        compare_matrices(np.ones((2, 3)), np.ones((3, 2)), r=1)
    with pytest.raises(ValueError, match="relative tolerance"):
        sv_summary(np.eye(2), rtol=-1.0)


def test_matrix_against_itself_and_its_negative() -> None:
    m = _rank_k(8, 8, 3) + 0.01 * np.eye(8)
    same = compare_matrices(m, m, r=3)
    assert same.frobenius_distance == 0.0
    assert same.cosine == pytest.approx(1.0)
    assert same.sv_sq_diff == pytest.approx(0.0, abs=1e-20)
    assert same.eig_sq_diff == pytest.approx(0.0, abs=1e-20)
    assert same.angle_first == pytest.approx(0.0, abs=1e-6)
    assert same.angle_largest == pytest.approx(0.0, abs=1e-6)
    neg = compare_matrices(-m, m, r=3)
    assert neg.cosine == pytest.approx(-1.0)
    assert neg.frobenius_distance == pytest.approx(2 * np.linalg.norm(m))
    # -M has the same singular values, eigenvalue moduli and column space as M
    assert neg.sv_sq_diff == pytest.approx(0.0, abs=1e-18)
    assert neg.eig_sq_diff == pytest.approx(0.0, abs=1e-18)
    assert neg.angle_largest == pytest.approx(0.0, abs=1e-6)


def test_values_match_direct_formulas() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    c = compare_matrices(x, y, r=2)
    assert c.frobenius_distance == pytest.approx(math.sqrt(((x - y) ** 2).sum()))
    assert c.cosine == pytest.approx((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))
    sx, sy = np.linalg.svd(x, compute_uv=False), np.linalg.svd(y, compute_uv=False)
    assert c.sv_sq_diff == pytest.approx(((sx[:2] - sy[:2]) ** 2).sum())
    ex = np.sort(np.abs(np.linalg.eigvals(x)))[::-1]
    ey = np.sort(np.abs(np.linalg.eigvals(y)))[::-1]
    assert c.eig_sq_diff == pytest.approx(((ex[:2] - ey[:2]) ** 2).sum())
    # principal angles from their definition: cosines are the singular values of Ux^T Uy
    ux = np.linalg.svd(x)[0][:, :2]
    uy = np.linalg.svd(y)[0][:, :2]
    cosines = np.clip(np.linalg.svd(ux.T @ uy, compute_uv=False), -1, 1)
    assert c.angle_first == pytest.approx(math.acos(cosines.max()), abs=1e-7)
    assert c.angle_largest == pytest.approx(math.acos(cosines.min()), abs=1e-7)
    assert compare_matrices(rng.standard_normal((6, 4)), rng.standard_normal((6, 4)), r=2).eig_sq_diff is None


def test_row_rotation_changes_the_right_metrics() -> None:
    """A rotation applied to the rows (Q @ M) keeps singular values; it moves the column space."""
    m = _rank_k(6, 6, 2, seed=4)
    theta = 0.7
    q = np.eye(6)
    # rotate in the plane of the first left singular vector and a direction orthogonal to the column space
    u = np.linalg.svd(m)[0]
    e1, e2 = u[:, 0], u[:, 5]
    q = (
        q
        + (math.cos(theta) - 1) * (np.outer(e1, e1) + np.outer(e2, e2))
        + math.sin(theta) * (np.outer(e2, e1) - np.outer(e1, e2))
    )
    assert np.allclose(q.T @ q, np.eye(6))
    c = compare_matrices(q @ m, m, r=2)
    assert c.sv_sq_diff == pytest.approx(0.0, abs=1e-18)  # singular values unchanged
    assert c.frobenius_distance > 0.1
    assert c.cosine < 1.0 - 1e-3
    # the top-2 column spaces now differ by exactly theta in one direction and not in the other
    assert c.angle_largest == pytest.approx(theta, abs=1e-7)
    assert c.angle_first == pytest.approx(0.0, abs=1e-6)


def test_random_control_has_matched_norm_and_is_seeded() -> None:
    a = random_control((5, 7), norm=3.5, seed=11)
    assert a.shape == (5, 7)
    assert np.linalg.norm(a) == pytest.approx(3.5)
    assert np.array_equal(a, random_control((5, 7), norm=3.5, seed=11))
    assert not np.array_equal(a, random_control((5, 7), norm=3.5, seed=12))
    with pytest.raises(ValueError, match="norm"):
        random_control((2, 2), norm=-1.0)


def test_summarise_skips_missing() -> None:
    s = summarise({"a": 1.0, "b": 3.0, "c": None, "d": float("nan")})
    assert s == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 2}
