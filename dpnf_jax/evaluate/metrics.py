"""Fidelity metrics: marginal TVD, associations, Kolmogorov-Smirnov, distance to closest record.

Every binned metric uses `dpnf_jax.data.discretize`, whose bins come from the public
schema (never from the rows), so real and synthetic frames are always binned alike.
Results are plain Python floats, ready for JSON.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from dpnf_jax.data.encode import discretize, n_codes
from dpnf_jax.data.schema import CategoricalColumn, ContinuousColumn, Schema

ASSOCIATION_METHOD = (
    "Pearson correlation between numeric columns (continuous values, ordinal level "
    "indices; pairwise-complete rows), Cramer's V between categorical columns (missing "
    "as its own level), correlation ratio eta between a categorical and a numeric column."
)
DCR_NOTE = (
    "Distance to closest record is a diagnostic, not a privacy guarantee: it can flag "
    "copied rows but cannot show that a release is private."
)
# Rows closer than this (in the scaled encoding) count as exact copies; a little above
# the rounding error of the |a|^2 + |b|^2 - 2ab expansion.
_EXACT_MATCH_DISTANCE = 1e-6
_DCR_CHUNK_ROWS = 256


def code_frequencies(df: pd.DataFrame, schema: Schema, n_bins: int = 20) -> dict[str, np.ndarray]:
    """1-way relative frequencies of every column on the schema's bins.

    Args:
      df: [n rows] frame fitting the schema.
      schema: the public schema.
      n_bins: bins per continuous column (see `dpnf_jax.data.discretize`).

    Returns:
      `{column: [n_codes(column)] frequencies summing to 1}` in schema order.
    """
    codes = discretize(df, schema, n_bins).to_numpy()
    return {
        column.name: np.bincount(codes[:, j], minlength=n_codes(column, n_bins)) / len(df)
        for j, column in enumerate(schema)
    }


def marginal_tvd(
    real: pd.DataFrame, synth: pd.DataFrame, schema: Schema, n_bins: int = 20
) -> dict[str, float]:
    """1-way total-variation distance per column, on the schema's bins.

    TVD(p, q) = 0.5 * sum_k |p_k - q_k|: 0 for equal histograms, 1 for disjoint support.

    Args:
      real: [n rows] real frame.
      synth: [m rows] synthetic frame.
      schema: the public schema both frames fit.
      n_bins: bins per continuous column.

    Returns:
      `{column: tvd}` in schema order.
    """
    p = code_frequencies(real, schema, n_bins)
    q = code_frequencies(synth, schema, n_bins)
    return {name: 0.5 * float(np.abs(p[name] - q[name]).sum()) for name in schema.names}


def pairwise_tvd(
    real: pd.DataFrame,
    synth: pd.DataFrame,
    schema: Schema,
    n_bins: int = 20,
    max_pairs: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """2-way total-variation distance for column pairs, on the schema's bins.

    Each pair's joint histogram is one `np.bincount` of the combined code
    `code_a * n_codes(b) + code_b`.

    Args:
      real: [n rows] real frame.
      synth: [m rows] synthetic frame.
      schema: the public schema both frames fit.
      n_bins: bins per continuous column.
      max_pairs: evaluate at most this many pairs, drawn at random with `seed`
        (None: all pairs).
      seed: seed of the pair subset.

    Returns:
      `{"a|b": tvd}` with `a` before `b` in schema order, pairs in schema order.
    """
    real_codes = discretize(real, schema, n_bins).to_numpy()
    synth_codes = discretize(synth, schema, n_bins).to_numpy()
    sizes = [n_codes(column, n_bins) for column in schema]
    pairs = list(itertools.combinations(range(len(schema)), 2))
    if max_pairs is not None and max_pairs < len(pairs):
        chosen = np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)
        pairs = [pairs[i] for i in np.sort(chosen)]
    names = schema.names
    out = {}
    for a, b in pairs:
        cells = sizes[a] * sizes[b]
        p = np.bincount(real_codes[:, a] * sizes[b] + real_codes[:, b], minlength=cells) / len(real_codes)
        q = np.bincount(synth_codes[:, a] * sizes[b] + synth_codes[:, b], minlength=cells) / len(synth_codes)
        out[f"{names[a]}|{names[b]}"] = 0.5 * float(np.abs(p - q).sum())
    return out


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep] - x[keep].mean(), y[keep] - y[keep].mean()
    # Elementwise sums rather than BLAS dots: no thread start-up on a busy machine.
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator > 0 else 0.0


def _cramers_v(a: np.ndarray, b: np.ndarray, size_a: int, size_b: int) -> float:
    table = np.bincount(a * size_b + b, minlength=size_a * size_b).reshape(size_a, size_b)
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0].astype(np.float64)
    k = min(table.shape) - 1
    if k == 0:
        return 0.0
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    return math.sqrt(chi2 / (table.sum() * k))


def _correlation_ratio(groups: np.ndarray, values: np.ndarray, n_groups: int) -> float:
    keep = ~np.isnan(values)
    groups, values = groups[keep], values[keep]
    total = float(((values - values.mean()) ** 2).sum()) if len(values) else 0.0
    if total <= 0:
        return 0.0
    counts = np.bincount(groups, minlength=n_groups)
    sums = np.bincount(groups, weights=values, minlength=n_groups)
    present = counts > 0
    between = float((sums[present] ** 2 / counts[present]).sum() - values.sum() ** 2 / len(values))
    return math.sqrt(min(max(between / total, 0.0), 1.0))


def association_matrix(df: pd.DataFrame, schema: Schema) -> np.ndarray:
    """Mixed-type association matrix (see `ASSOCIATION_METHOD`).

    Pearson entries lie in [-1, 1]; Cramer's V and eta in [0, 1]; the diagonal is 1.
    A pair with a constant column (no variation to associate) gets 0.

    Args:
      df: [n rows] frame fitting the schema.
      schema: the public schema.

    Returns:
      [m, m] symmetric matrix, columns in schema order.
    """
    parsed = schema.parse_frame(df)
    numeric: dict[str, np.ndarray] = {}
    levels: dict[str, np.ndarray] = {}
    for column in schema:
        values = parsed[column.name]
        if isinstance(column, ContinuousColumn):
            numeric[column.name] = values
        elif isinstance(column, CategoricalColumn):
            levels[column.name] = np.where(values < 0, n_codes(column) - 1, values)
        else:
            numeric[column.name] = np.where(values < 0, np.nan, values.astype(np.float64))
    matrix = np.eye(len(schema))
    for i, j in itertools.combinations(range(len(schema)), 2):
        a, b = schema.columns[i], schema.columns[j]
        if a.name in numeric and b.name in numeric:
            value = _pearson(numeric[a.name], numeric[b.name])
        elif a.name in numeric:
            value = _correlation_ratio(levels[b.name], numeric[a.name], n_codes(b))
        elif b.name in numeric:
            value = _correlation_ratio(levels[a.name], numeric[b.name], n_codes(a))
        else:
            value = _cramers_v(levels[a.name], levels[b.name], n_codes(a), n_codes(b))
        matrix[i, j] = matrix[j, i] = value
    return matrix


def correlation_difference(real: pd.DataFrame, synth: pd.DataFrame, schema: Schema) -> dict:
    """Association matrices of real and synthetic data and their mean absolute difference.

    Args:
      real: [n rows] real frame.
      synth: [m rows] synthetic frame.
      schema: the public schema both frames fit.

    Returns:
      `{"method", "columns", "real": [m][m], "synthetic": [m][m],
      "mean_abs_difference"}`; the mean runs over the m(m-1)/2 off-diagonal pairs.
    """
    real_matrix = association_matrix(real, schema)
    synth_matrix = association_matrix(synth, schema)
    upper = np.triu_indices(len(schema), k=1)
    difference = np.abs(real_matrix - synth_matrix)[upper]
    return {
        "method": ASSOCIATION_METHOD,
        "columns": list(schema.names),
        "real": real_matrix.tolist(),
        "synthetic": synth_matrix.tolist(),
        "mean_abs_difference": float(difference.mean()) if difference.size else 0.0,
    }


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)|.

    Args:
      a: [n] finite samples.
      b: [m] finite samples.

    Returns:
      The statistic in [0, 1]; 0 when both are empty, 1 when exactly one is.
    """
    if len(a) == 0 or len(b) == 0:
        return float(len(a) != len(b))
    a, b = np.sort(a), np.sort(b)
    # Both empirical CDFs jump only at sample points, so the sup is attained there.
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_statistics(real: pd.DataFrame, synth: pd.DataFrame, schema: Schema) -> dict[str, float]:
    """Kolmogorov-Smirnov statistic per continuous column, on the observed (non-missing) values.

    Args:
      real: [n rows] real frame.
      synth: [m rows] synthetic frame.
      schema: the public schema both frames fit.

    Returns:
      `{continuous column: statistic}` in schema order (see `ks_statistic`).
    """
    real_parsed = schema.parse_frame(real)
    synth_parsed = schema.parse_frame(synth)
    out = {}
    for column in schema:
        if isinstance(column, ContinuousColumn):
            a, b = real_parsed[column.name], synth_parsed[column.name]
            out[column.name] = ks_statistic(a[~np.isnan(a)], b[~np.isnan(b)])
    return out


def scaled_encoding(df: pd.DataFrame, schema: Schema) -> np.ndarray:
    """Encoding for distances in which every column moves the squared distance by at most 1.

    Continuous values are scaled by the public bounds to [0, 1] and ordinal levels to
    index / (k - 1); a nullable numeric column adds a missing indicator (its value
    part is 0 when missing). Categorical columns are one-hot (missing as its own
    level) scaled by 1/sqrt(2), so a mismatch adds 1 to the squared distance.

    Args:
      df: [n rows] frame fitting the schema.
      schema: the public schema.

    Returns:
      [n, d] float64 matrix.
    """
    parsed = schema.parse_frame(df)
    blocks = []
    for column in schema:
        values = parsed[column.name]
        if isinstance(column, CategoricalColumn):
            levels = n_codes(column)
            codes = np.where(values < 0, levels - 1, values)
            blocks.append(np.eye(levels)[codes] / math.sqrt(2.0))
            continue
        if isinstance(column, ContinuousColumn):
            missing = np.isnan(values)
            unit = np.clip((values - column.lower) / (column.upper - column.lower), 0.0, 1.0)
        else:
            missing = values < 0
            unit = values / max(len(column.categories) - 1, 1)
        blocks.append(np.where(missing, 0.0, unit)[:, None])
        if column.nullable:
            blocks.append(missing.astype(np.float64)[:, None])
    return np.concatenate(blocks, axis=1)


def _nearest_distances(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance of each query row to its nearest reference row; [q]."""
    reference_sq = (reference**2).sum(axis=1)
    out = np.empty(len(queries))
    for start in range(0, len(queries), _DCR_CHUNK_ROWS):
        chunk = queries[start : start + _DCR_CHUNK_ROWS]
        squared = (chunk**2).sum(axis=1)[:, None] + reference_sq[None, :] - 2.0 * chunk @ reference.T
        out[start : start + len(chunk)] = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
    return out


def _distance_summary(distances: np.ndarray) -> dict[str, float]:
    quantiles = np.quantile(distances, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "min": float(distances.min()),
        **{key: float(v) for key, v in zip(("q05", "q25", "q50", "q75", "q95"), quantiles)},
        "mean": float(distances.mean()),
        "exact_match_rate": float((distances < _EXACT_MATCH_DISTANCE).mean()),
    }


def distance_to_closest_record(
    real: pd.DataFrame,
    synth: pd.DataFrame,
    schema: Schema,
    holdout: pd.DataFrame | None = None,
    max_rows: int = 2000,
    seed: int = 0,
) -> dict:
    """Distance to closest record (DCR): a diagnostic, not a privacy guarantee.

    For up to `max_rows` synthetic rows (drawn with `seed`), the Euclidean distance in
    `scaled_encoding` to the nearest row of `real` (all of it). With a `holdout` of
    real rows not used for training, the same for holdout rows: synthetic rows much
    closer to `real` than fresh real rows are (ratio well below 1, exact matches
    above the holdout's rate) hint at memorisation.

    Args:
      real: [n rows] the training rows.
      synth: [m rows] synthetic rows.
      schema: the public schema all frames fit.
      holdout: optional real rows not seen in training.
      max_rows: query rows sampled from `synth` (and from `holdout`).
      seed: seed of the row samples.

    Returns:
      `{"note", "max_rows", "synthetic": summary, "holdout": summary or None,
      "median_ratio": synthetic q50 / holdout q50 or None}`, each summary with
      min, q05..q95, mean and exact_match_rate.
    """
    rng = np.random.default_rng(seed)

    def sample(df: pd.DataFrame) -> np.ndarray:
        encoded = scaled_encoding(df, schema)
        if len(encoded) > max_rows:
            encoded = encoded[np.sort(rng.choice(len(encoded), size=max_rows, replace=False))]
        return encoded

    reference = scaled_encoding(real, schema)
    synthetic = _distance_summary(_nearest_distances(sample(synth), reference))
    result = {
        "note": DCR_NOTE,
        "max_rows": int(max_rows),
        "synthetic": synthetic,
        "holdout": None,
        "median_ratio": None,
    }
    if holdout is not None:
        result["holdout"] = _distance_summary(_nearest_distances(sample(holdout), reference))
        if result["holdout"]["q50"] > 0:
            result["median_ratio"] = synthetic["q50"] / result["holdout"]["q50"]
    return result
