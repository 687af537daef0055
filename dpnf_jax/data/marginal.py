"""DP marginal pre-transform: noisy 1-way histograms -> per-column Gaussian copula.

Design notes section 2. Each column is discretised on PUBLIC bins (the schema's
categories, point masses and equal-width bins over the public bounds; see
:func:`dpnf_jax.data.encode.discretize`). One Gaussian-mechanism release of all ``m``
histograms costs one ``GaussianDpEvent``: adding or removing a row changes one count in
each histogram by one, so the L2 sensitivity is ``sqrt(m)``. From the noisy counts each
column gets a monotone CDF ``F``; a row in bin ``b`` is encoded as
``Phi^-1(F(b-1) + U * p_b)`` with ``U ~ U(0, 1)`` (uniform dequantisation inside the
bin), so every encoded column is close to standard normal and the flow only has to learn
the dependence between columns. Decoding inverts: ``u = Phi(z)`` picks the bin, the
position inside the bin places a continuous value uniformly within it.

The noisy histograms are a DP release; storing them with the model costs nothing more.
"""

from __future__ import annotations

import math
from typing import Any

import dp_accounting
import numpy as np
import pandas as pd
from scipy import special

from dpnf_jax.data.encode import column_bins, continuous_to_array, discretize, levels_to_array, n_codes
from dpnf_jax.data.schema import CategoricalColumn, ContinuousColumn, Schema

# Every bin keeps at least this probability so the CDF is strictly increasing and any
# real row (even in a bin whose noisy count fell below zero) has somewhere to go.
_MIN_MASS = 1e-6
# Encoded values stay inside Phi^-1([_U_EPS, 1 - _U_EPS]) = about +-5.6.
_U_EPS = 1e-8


def gaussian_mechanism_delta(noise_multiplier: float, epsilon: float) -> float:
    """Exact delta(epsilon) of one Gaussian mechanism (Balle and Wang, 2018, Theorem 8).

    ``delta = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma)`` for noise
    std ``sigma`` times the L2 sensitivity.
    """
    a = 1.0 / (2.0 * noise_multiplier)
    b = epsilon * noise_multiplier
    return float(special.ndtr(a - b) - math.exp(epsilon + special.log_ndtr(-a - b)))


def histogram_noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest noise multiplier of a Gaussian mechanism meeting (epsilon, delta) exactly.

    Bisection on the exact privacy curve of the Gaussian mechanism (the same curve the
    PLD accountant represents); the result is rounded up, never down.
    """
    if not epsilon > 0:
        raise ValueError(f"marginal epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"marginal delta must be in (0, 1), got {delta}")
    low, high = 1e-3, 1.0
    while gaussian_mechanism_delta(high, epsilon) > delta:
        high *= 2.0
    for _ in range(100):
        mid = math.sqrt(low * high)
        if gaussian_mechanism_delta(mid, epsilon) > delta:
            low = mid
        else:
            high = mid
        if high / low < 1 + 1e-9:
            break
    return high


class DPMarginalEncoder:
    """One dimension per column through its DP-estimated CDF (a Gaussian copula).

    Args:
      schema: the public schema.
      n_bins: equal-width bins per continuous column (point masses and, for nullable
        columns, "missing" get bins of their own).
      order_categories: order categorical (not ordinal) levels by their noisy counts,
        most frequent first (post-processing of the DP release, free); otherwise in
        schema order.

    Call :meth:`fit` once (it spends privacy and returns the DP event) before encoding.
    """

    def __init__(self, schema: Schema, n_bins: int = 20, order_categories: bool = True):
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a Schema, got {type(schema).__name__}")
        if not (isinstance(n_bins, (int, np.integer)) and n_bins >= 1):
            raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
        self.schema = schema
        self.n_bins = int(n_bins)
        self.order_categories = bool(order_categories)
        self.dim = len(schema)
        self.noisy_counts: list[np.ndarray] | None = None
        self.noise_multiplier: float | None = None
        self.last_clip_counts: dict[str, int] = {}

    # ---------------------------------------------------------------- fitting (DP)

    def fit(self, df: pd.DataFrame, epsilon: float, delta: float, rng: np.random.Generator | int | None = None):
        """Release all 1-way histograms with the Gaussian mechanism.

        Args:
          df: the private rows.
          epsilon, delta: budget of this release alone (it composes with training).
          rng: noise generator or seed.

        Returns:
          The ``dp_accounting.GaussianDpEvent`` spent (noise multiplier relative to the
          sqrt(m) sensitivity).
        """
        return self.fit_with_noise_multiplier(df, histogram_noise_multiplier(epsilon, delta), rng)

    def fit_with_noise_multiplier(
        self, df: pd.DataFrame, noise_multiplier: float, rng: np.random.Generator | int | None = None
    ) -> dp_accounting.GaussianDpEvent:
        """Like :meth:`fit` with an explicit noise multiplier; returns its DP event."""
        return self.release(self.exact_counts(df), noise_multiplier, rng)

    def exact_counts(self, df: pd.DataFrame, parsed: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """The exact (NOT private) histogram counts of ``df``, one array per column.

        Counts add up over disjoint chunks of rows, so a table larger than memory is
        counted chunk by chunk (and over hosts) before ONE noisy :meth:`release`.
        ``parsed`` is ``schema.parse_frame(df)`` if the caller already has it.
        """
        codes = discretize(df, self.schema, self.n_bins, parsed)
        return [
            np.bincount(codes[c.name].to_numpy(), minlength=n_codes(c, self.n_bins)).astype(np.int64)
            for c in self.schema
        ]

    def release(
        self, counts: list[np.ndarray], noise_multiplier: float, rng: np.random.Generator | int | None = None
    ) -> dp_accounting.GaussianDpEvent:
        """Add Gaussian noise once to exact counts of all rows and keep the result.

        Args:
          counts: :meth:`exact_counts` of the whole table (summed over its chunks).
          noise_multiplier: noise std over the sqrt(m) L2 sensitivity.
          rng: noise generator or seed.

        Returns:
          The ``dp_accounting.GaussianDpEvent`` spent.
        """
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        expected = [n_codes(c, self.n_bins) for c in self.schema]
        if [len(c) for c in counts] != expected:
            raise ValueError(f"counts must have {expected} entries per column, got {[len(c) for c in counts]}")
        rng = np.random.default_rng(rng)
        std = noise_multiplier * math.sqrt(len(self.schema))
        self.noisy_counts = [np.asarray(c, np.float64) + rng.normal(0.0, std, len(c)) for c in counts]
        self.noise_multiplier = float(noise_multiplier)
        return dp_accounting.GaussianDpEvent(self.noise_multiplier)

    def fit_nonprivate(self, df: pd.DataFrame) -> None:
        """Exact histograms, NO privacy: for non-private reference runs only."""
        self.noisy_counts = [c.astype(np.float64) for c in self.exact_counts(df)]
        self.noise_multiplier = None

    def _require_fit(self) -> None:
        if self.noisy_counts is None:
            raise RuntimeError("DPMarginalEncoder: call fit() (a DP release) before encoding or decoding")

    def level_order(self, index: int) -> np.ndarray:
        """Permutation of codes: position -> code."""
        column = self.schema.columns[index]
        counts = self.noisy_counts[index]
        if self.order_categories and isinstance(column, CategoricalColumn):
            return np.argsort(-counts, kind="stable")
        return np.arange(len(counts))

    def bin_masses(self, index: int) -> np.ndarray:
        """Bin probabilities in position order, strictly positive, summing to one."""
        counts = np.maximum(self.noisy_counts[index][self.level_order(index)], 0.0)
        total = counts.sum()
        p = counts / total if total > 0 else np.full_like(counts, 1.0 / len(counts))
        p = np.maximum(p, _MIN_MASS)
        return p / p.sum()

    # ------------------------------------------------------------ encode / decode

    def encode(self, df: pd.DataFrame, rng: np.random.Generator | int | None = None, strict: bool = False) -> np.ndarray:
        """[n rows] -> [n, m] float32, each column ~ N(0, 1) marginally."""
        self._require_fit()
        if strict:
            self.schema.validate_frame(df, strict=True)
        rng = np.random.default_rng(rng)
        codes = discretize(df, self.schema, self.n_bins)
        self.last_clip_counts = self._clip_counts(df)
        out = np.empty((len(df), self.dim), np.float32)
        for i, column in enumerate(self.schema):
            order = self.level_order(i)
            position_of_code = np.empty_like(order)
            position_of_code[order] = np.arange(len(order))
            p = self.bin_masses(i)
            cdf_left = np.concatenate([[0.0], np.cumsum(p)[:-1]])
            pos = position_of_code[codes[column.name].to_numpy()]
            u = cdf_left[pos] + rng.uniform(size=len(df)) * p[pos]
            out[:, i] = special.ndtri(np.clip(u, _U_EPS, 1.0 - _U_EPS))
        return out

    def _clip_counts(self, df: pd.DataFrame) -> dict[str, int]:
        parsed = self.schema.parse_frame(df)
        counts = {}
        for column in self.schema:
            if isinstance(column, ContinuousColumn):
                v = parsed[column.name]
                counts[column.name] = int(np.sum((v < column.lower) | (v > column.upper)))
        return counts

    def decode(self, x: np.ndarray) -> pd.DataFrame:
        """[n, m] finite -> a valid table (bins picked by the noisy CDF, uniform inside)."""
        self._require_fit()
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected an array of shape [n, {self.dim}], got {x.shape}")
        if not np.isfinite(x).all():
            row, col = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(
                f"non-finite value {float(x[row, col])!r} at row {row} (column {self.schema.columns[col].name!r})"
            )
        data: dict[str, Any] = {}
        for i, column in enumerate(self.schema):
            order, p = self.level_order(i), self.bin_masses(i)
            cdf = np.cumsum(p)
            u = special.ndtr(x[:, i])
            pos = np.clip(np.searchsorted(cdf, u, side="right"), 0, len(p) - 1)
            within = np.clip((u - (cdf[pos] - p[pos])) / p[pos], 0.0, 1.0)
            codes = order[pos]
            if isinstance(column, ContinuousColumn):
                data[column.name] = self._continuous_values(column, codes, within)
            else:
                data[column.name] = levels_to_array(column, codes)
        return pd.DataFrame(data)

    def _continuous_values(self, column: ContinuousColumn, codes: np.ndarray, within: np.ndarray):
        n_atoms = len(column.point_masses)
        edges = column_bins(column, self.n_bins)
        n_value_bins = len(edges) - 1
        missing = codes >= n_atoms + n_value_bins
        b = np.clip(codes - n_atoms, 0, n_value_bins - 1)
        values = edges[b] + within * (edges[b + 1] - edges[b])
        values = np.clip(values, column.lower, column.upper)
        if column.integer:
            values = np.clip(np.rint(values), column.lower, column.upper)
        if n_atoms:
            at_atom = codes < n_atoms
            values[at_atom] = np.asarray(column.point_masses, np.float64)[codes[at_atom]]
        return continuous_to_array(column, values, missing)

    # ------------------------------------------------------------------- storage

    def to_dict(self) -> dict[str, Any]:
        """Settings and the (already private) noisy counts, JSON-ready."""
        return {
            "type": "marginal",
            "schema": self.schema.to_dict(),
            "n_bins": self.n_bins,
            "order_categories": self.order_categories,
            "noise_multiplier": self.noise_multiplier,
            "noisy_counts": None if self.noisy_counts is None else [c.tolist() for c in self.noisy_counts],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DPMarginalEncoder":
        for field in ("schema", "n_bins", "order_categories", "noisy_counts"):
            if field not in d:
                raise ValueError(f"marginal encoder settings: missing field {field!r}")
        encoder = cls(Schema.from_dict(d["schema"]), d["n_bins"], d["order_categories"])
        if d["noisy_counts"] is not None:
            counts = [np.asarray(c, np.float64) for c in d["noisy_counts"]]
            expected = [n_codes(c, encoder.n_bins) for c in encoder.schema]
            if [len(c) for c in counts] != expected:
                raise ValueError("marginal encoder settings: noisy_counts do not match the schema's bins")
            encoder.noisy_counts = counts
            encoder.noise_multiplier = d.get("noise_multiplier")
        return encoder
