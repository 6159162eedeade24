"""Gaussian statistics of features, merged exactly, and the Frechet distance between two of them.

Each unit contributes float64 sufficient statistics: the count ``n``, the sum of feature vectors and
the sum of their outer products (a small unit commits its feature rows instead, and they are added
here). Sums add, so statistics computed shard by shard, by any number of actors, merge into the
statistics of the whole set; they are added in shard order, so the result does not depend on which
actor did what.

The distance needs ``tr(sqrt(S1 S2))``. ``S1 S2`` is similar to a symmetric matrix ``A = R^T S2 R``
(``S1 = R R^T``), so the trace is the sum of square roots of the eigenvalues of ``A``: a Cholesky
factor and one symmetric eigenvalue decomposition, no ``scipy.linalg.sqrtm``. Eigenvalues that
rounding pushes slightly below zero (covariances of fewer samples than dimensions are singular) are
clipped to zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass
class GaussianSums:
    """float64 sufficient statistics of a set of d-dimensional feature vectors."""

    n: int
    total: np.ndarray  # (d,) sum of vectors
    outer: np.ndarray  # (d, d) sum of outer products

    @classmethod
    def empty(cls, dim: int) -> GaussianSums:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def add(self, features: np.ndarray) -> None:
        """Add a batch of feature rows (any float dtype; accumulated in float64)."""
        x = np.asarray(features, dtype=np.float64)
        self.n += x.shape[0]
        self.total += x.sum(axis=0)
        self.outer += x.T @ x

    def merge(self, other: GaussianSums) -> None:
        self.n += other.n
        self.total += other.total
        self.outer += other.outer

    def merge_unit(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Add one unit's partial as ``UnitFeatures.arrays`` wrote it: its feature rows, or its sums."""
        if "features" in arrays:
            self.add(arrays["features"])
        else:
            self.merge(GaussianSums(int(arrays["n"]), arrays["sum"], arrays["outer"]))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Sample mean and unbiased covariance (``np.cov`` convention, divisor ``n - 1``)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mu = self.total / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2


class UnitFeatures:
    """One unit's FID features, in the form that takes the least room in its partial.

    The float64 sums of a unit are ``d * d`` numbers (32 MiB for d = 2048) whatever its size; its feature
    rows are ``d`` float32 numbers each. So rows are kept while fewer than ``2 * d`` (4,096) of them
    take less room than the sums, and folded into ``GaussianSums`` once they would not: a unit of 1,000
    images commits 8 MiB instead of 32. The driver adds either form in unit order, in float64, so the
    merged statistics do not depend on which form a unit took.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.rows: list[np.ndarray] = []
        self.row_bytes = 0
        self.sums: GaussianSums | None = None

    def add(self, features: np.ndarray) -> None:
        x = np.asarray(features)
        if self.sums is not None:
            self.sums.add(x)
            return
        self.rows.append(x)
        self.row_bytes += x.nbytes
        if self.row_bytes >= self.dim * self.dim * 8:  # rows as large as the sums: fold them in
            self.sums = GaussianSums.empty(self.dim)
            for r in self.rows:
                self.sums.add(r)
            self.rows, self.row_bytes = [], 0

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"features": (n, d)}`` or ``{"sum": (d,), "outer": (d, d)}``, for the unit's npz."""
        if self.sums is not None:
            return {"sum": self.sums.total, "outer": self.sums.outer}
        if not self.rows:
            return {"features": np.zeros((0, self.dim), np.float32)}
        return {"features": np.concatenate(self.rows)}


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr(sqrt(sigma1 @ sigma2))`` for symmetric positive semi-definite matrices.

    With ``sigma1 = L L^T`` (Cholesky), ``sigma1 sigma2`` is similar to ``L^T sigma2 L``, which is
    symmetric: one Cholesky and one eigenvalue-only decomposition. A singular ``sigma1`` (fewer
    samples than dimensions) has no Cholesky factor; then ``L = sqrt(sigma1)`` from ``eigh``.
    """
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    try:
        r = np.linalg.cholesky(s1)
        a = r.T @ s2 @ r
    except np.linalg.LinAlgError:
        r = _sqrt_psd(s1)
        a = r @ s2 @ r
    w = np.linalg.eigvalsh((a + a.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
