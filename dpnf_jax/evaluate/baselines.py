"""Independent noisy marginals: the simplest DP baseline a synthesizer has to beat.

All 1-way histograms on the schema's bins are released at once with the Gaussian
mechanism; each column is then sampled independently from its noisy histogram, so
the baseline keeps marginals and loses every dependence between columns.

Privacy: under add/remove-one-row neighbours a row changes one count in each of the
m histograms by 1, so the L2 sensitivity of the concatenated histograms is sqrt(m).
The noise is calibrated for (epsilon, delta) with the exact analytic Gaussian
mechanism (Balle & Wang 2018, through `dp_accounting`), so the release is one
`GaussianDpEvent(noise_multiplier)` with noise standard deviation
`sigma = noise_multiplier * sqrt(m)`. Everything after the noise (clipping negative
counts, normalising, zeroing bins the schema makes empty, sampling) is
post-processing. The row count `n` is an argument, not read off the data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from dp_accounting.pld import common as pld_common
from dp_accounting.pld import privacy_loss_mechanism

from dpnf_jax.data.encode import column_bins, discretize, n_codes
from dpnf_jax.data.schema import CategoricalColumn, Column, ContinuousColumn, Schema

# The analytic calibration is exact; PLD accountants add a small pessimistic
# discretisation error (relative ~1e-5 in sigma at epsilon=100). This margin keeps
# their epsilon at or below the target as well.
_NOISE_MARGIN = 1.0 + 1e-4


def gaussian_noise_multiplier(epsilon: float, delta: float) -> float:
    """Noise multiplier (sigma / L2 sensitivity) of one Gaussian release at (epsilon, delta).

    >>> round(gaussian_noise_multiplier(1.0, 1e-5), 3)
    3.731

    Raises:
      ValueError: epsilon <= 0 or delta outside (0, 1).
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    guarantee = pld_common.DifferentialPrivacyParameters(float(epsilon), float(delta))
    loss = privacy_loss_mechanism.GaussianPrivacyLoss.from_privacy_guarantee(guarantee, sensitivity=1.0)
    return float(loss.standard_deviation) * _NOISE_MARGIN


def _bin_integers(column: ContinuousColumn, lo_edge: float, hi_edge: float, last: bool) -> np.ndarray:
    """Integers v with lo_edge <= v < hi_edge (<= upper in the last bin), minus the point masses."""
    lo = max(math.ceil(lo_edge), int(column.lower))
    hi = int(column.upper) if last else math.ceil(hi_edge) - 1
    values = np.arange(lo, hi + 1, dtype=np.float64)
    return values[~np.isin(values, column.point_masses)]


def _code_values(column: ContinuousColumn, n_bins: int) -> list[np.ndarray | None]:
    """Per bin code of an integer column, the integers it can hold (None for float columns)."""
    edges = column_bins(column, n_bins)
    if not column.integer:
        return [None] * (len(edges) - 1)
    last = len(edges) - 2
    return [_bin_integers(column, edges[i], edges[i + 1], i == last) for i in range(last + 1)]


def _structurally_empty(column: Column, n_bins: int) -> np.ndarray:
    """[n_codes] True for codes no valid value can take (integer bins holding only point masses)."""
    empty = np.zeros(n_codes(column, n_bins), dtype=bool)
    if isinstance(column, ContinuousColumn) and column.integer:
        offset = len(column.point_masses)
        for i, values in enumerate(_code_values(column, n_bins)):
            empty[offset + i] = len(values) == 0
    return empty


def _codes_to_values(column: Column, codes: np.ndarray, n_bins: int, rng: np.random.Generator) -> Any:
    """Sampled codes [n] -> column values with `TabularEncoder.decode`'s dtypes."""
    missing = codes == n_codes(column, n_bins) - 1 if column.nullable else np.zeros(len(codes), dtype=bool)
    if not isinstance(column, ContinuousColumn):
        index = np.where(missing, 0, codes)
        if isinstance(column, CategoricalColumn) or isinstance(column.categories[0], str):
            values = pd.array(np.asarray(column.categories, dtype=object)[index], dtype="string")
            values[missing] = pd.NA
            return values
        values = np.asarray(column.categories, dtype=np.int64)[index]
        return pd.arrays.IntegerArray(values, missing) if column.nullable else values
    edges = column_bins(column, n_bins)
    n_atoms = len(column.point_masses)
    values = np.zeros(len(codes))
    for j, atom in enumerate(column.point_masses):
        values[codes == j] = atom
    for i, integers in enumerate(_code_values(column, n_bins)):
        rows = np.flatnonzero(codes == n_atoms + i)
        if len(rows) == 0:
            continue
        if integers is None:
            values[rows] = rng.uniform(edges[i], edges[i + 1], size=len(rows))
        else:
            values[rows] = integers[rng.integers(0, len(integers), size=len(rows))]
    if column.integer:
        integers = values.astype(np.int64)
        return pd.arrays.IntegerArray(integers, missing) if column.nullable else integers
    values[missing] = np.nan
    return values


def independent_marginals_sample(
    real: pd.DataFrame,
    schema: Schema,
    n: int,
    epsilon: float,
    delta: float,
    seed: int,
    n_bins: int = 20,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Samples `n` rows from independently sampled (epsilon, delta)-DP noisy 1-way marginals.

    Continuous columns are sampled uniformly within the drawn bin (integers: uniform
    over the bin's integers other than point masses); point masses are exact; a
    nullable column's missing level yields NaN / NA. `discretize` of the output gives
    back the sampled codes.

    Args:
      real: [rows] the private rows.
      schema: the public schema.
      n: number of rows to sample (public).
      epsilon: target epsilon (> 0).
      delta: target delta in (0, 1).
      seed: seed of the noise and of the sampling.
      n_bins: bins per continuous column.

    Returns:
      (frame of `n` rows with the schema's columns, info) where info is
      `{"mechanism", "epsilon", "delta", "n_bins", "n_histograms", "l2_sensitivity",
      "noise_multiplier", "sigma", "dp_event"}`; `dp_event` is
      `{"type": "gaussian", "noise_multiplier": z}` (the format of
      `dpnf_jax.privacy.accounting.event_to_dict`).

    Raises:
      ValueError: n < 1, epsilon <= 0 or delta outside (0, 1).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    noise_multiplier = gaussian_noise_multiplier(epsilon, delta)
    sensitivity = math.sqrt(len(schema))
    sigma = noise_multiplier * sensitivity
    rng = np.random.default_rng(seed)
    codes = discretize(real, schema, n_bins).to_numpy()
    data = {}
    for j, column in enumerate(schema):
        counts = np.bincount(codes[:, j], minlength=n_codes(column, n_bins)).astype(np.float64)
        noisy = np.maximum(counts + rng.normal(0.0, sigma, size=counts.shape), 0.0)
        empty = _structurally_empty(column, n_bins)
        noisy[empty] = 0.0
        if noisy.sum() == 0:
            noisy = (~empty).astype(np.float64)
        sampled = rng.choice(len(noisy), size=n, p=noisy / noisy.sum())
        data[column.name] = _codes_to_values(column, sampled, n_bins, rng)
    info = {
        "mechanism": "gaussian",
        "epsilon": float(epsilon),
        "delta": float(delta),
        "n_bins": int(n_bins),
        "n_histograms": len(schema),
        "l2_sensitivity": sensitivity,
        "noise_multiplier": noise_multiplier,
        "sigma": sigma,
        "dp_event": {"type": "gaussian", "noise_multiplier": noise_multiplier},
    }
    return pd.DataFrame(data), info
