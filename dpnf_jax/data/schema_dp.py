"""DP schema discovery: bounds and category lists read off the rows under DP.

Design notes section 2: a schema inferred from the data must spend privacy budget and
compose it into the same accountant as training. :func:`infer_dp_schema` (also
``Schema.infer_dp``) touches the rows only through the mechanisms below and returns the
``dp_accounting`` events it spent; pass them to
``DPFlowSynthesizer(..., schema_events=events)`` and ``privacy_report()`` shows ONE
epsilon for schema discovery, the marginal histograms and DP-SGD.

What is public and what is private
----------------------------------
* Column names, their order and their DECLARED dtypes are public: a column's kind
  comes from its dtype alone (bool / object / string / category -> categorical,
  numeric -> continuous, integer dtype -> ``integer=True``), never from its values, and
  can be overridden by arguments. A float column with integral values stays
  non-integer. (Reading a CSV with pandas infers dtypes from the text; the CLI says so
  and lets you declare kinds instead.)
* Each continuous column's coarse range ``(lo, hi)`` is public: from ``coarse_bounds``
  or ``default_range`` (``(-1e9, 1e9)``). Values are clipped to it, so the discovered
  bounds always lie inside it.
* The release itself never uses the number of rows (elsewhere the library treats N as
  public, e.g. for the default delta; see the README).

Mechanism: one Gaussian release of per-column histograms
---------------------------------------------------------
Every DP column gets one histogram with one count per bin, and every row adds exactly
one to one bin of every histogram:

* continuous: ``B`` public bins over the coarse range (``grid="linear"``: ``n_bins``
  equal bins; ``grid="log"``: a symmetric log grid with ``bins_per_decade`` edges per
  decade between ``min_abs`` and ``max(|lo|, |hi|)``, plus 0; ``"auto"``: linear when
  the range was given in ``coarse_bounds``, log for the default range) plus a "missing"
  bin;
* categorical: one count per category value that occurs in the rows (partition
  selection, below) plus a "missing" count.

With ``m`` DP columns, adding or removing one row changes ``m`` counts by one each, so
the L2 sensitivity of the whole release is ``sqrt(m)``. Every count gets independent
``N(0, s^2)`` noise with ``s = sigma * sqrt(m)``: the release is ONE Gaussian mechanism
with noise multiplier ``sigma`` (the budget is split equally per column: each column's
histogram is a Gaussian mechanism of noise multiplier ``s``, and ``1/sigma^2 =
sum_columns 1/s^2``). It is reported as two Gaussian events that compose back exactly
to ``sigma`` (Gaussian composition: ``mu^2`` add up):

* ``"schema: bounds"``: ``GaussianDpEvent(s / sqrt(m_c))`` (the ``m_c`` continuous
  histograms);
* ``"schema: categories"``: ``GaussianDpEvent(s / sqrt(m_k))`` (the ``m_k`` categorical
  histograms).

Bounds (post-processing of the noisy value-bin counts only): level ``r = 0..levels``
merges ``2^r`` adjacent bins (blocks aligned at the edge 0), so its counts have noise std
``s * 2^(r/2)``; merged counts below ``s * 2^(r/2) * Phi^-1(1 - empty_bin_rate / K)``
(``K`` = number of merged bins over all levels) are set to zero, so a bin without rows
survives anywhere with probability <= ``empty_bin_rate``. The finest level that keeps at
least ``1 - tail_mass`` of the largest kept mass of any level is used (fine bins for
large data, coarse ones when the noise hides thin tails), and its kept counts form a CDF
``F``: ``lower`` is the left edge of the bin where ``F`` first exceeds ``quantiles[0]``
and ``upper`` the right edge of the bin where ``F`` reaches ``quantiles[1]``. The default
``quantiles=(0, 1)`` takes the outermost bins that clear the threshold ("noisy
support"); measured on Adult at schema epsilon 1 this clips <= 0.2% of any column's rows
(capital-gain keeps its 99999 spike), where 1st/99th percentiles clip up to 1.5%. Both
bounds are grid points (integer columns round outwards to integers inside the coarse
range). When nothing clears the threshold the coarse range itself is used (with a
warning).

Categories: Gaussian partition selection
-----------------------------------------
Only the category values that occur in the rows get a count (the domain is not public),
and a value is released iff its noisy count exceeds

    ``tau = 1 + s * Phi^-1(1 - delta_T / m_k)``.

A value that only the added/removed row has has count 1 in one dataset and no count in
the other; each of the at most ``m_k`` such values (one per categorical column) is
released with probability ``1 - Phi((tau - 1) / s) = delta_T / m_k``, so the
probability of releasing any of them is at most ``delta_T``. Conditioned on releasing
none, the output is post-processing of the Gaussian mechanism on the counts both
datasets have; hence the privacy curve of the whole release is at most
``delta_T + (1 - delta_T) * delta_Gauss(sigma; eps)`` in both directions, which is the
curve of the Gaussian event composed with ``DeltaDpEvent(delta_T)``
(:class:`dpnf_jax.privacy.accounting.DeltaDpEvent`, a ``(0, delta_T)`` event both
accountants of ``dpnf_jax.privacy.accounting`` compose exactly). Third event:

* ``"schema: category selection"``: ``DeltaDpEvent(delta_T)``.

Released values beyond ``max_categories`` (fewest noisy counts first) and all unreleased
values map to the extra level ``other_label`` (``"__other__"``; ``CategoricalColumn.other``)
so every row, including rare ones, stays valid.

Calibration: ``delta_T = selection_delta`` (default ``delta / 2``; 0 without categorical
columns) and ``sigma = histogram_noise_multiplier(epsilon, (delta - delta_T) / (1 -
delta_T))`` (exact analytic Gaussian calibration), so the three events together are
exactly ``(epsilon, delta)``-DP; the PLD accountant's total is checked to be at most
``epsilon`` before any noise is drawn.

Nullability: ``nullable="dtype"`` (default, no data access) marks a column nullable iff
its dtype can hold a missing value (float, object, string, category, pandas nullable
integers; not numpy int / bool). ``nullable="dp"`` additionally needs the column's noisy
missing count (part of the same Gaussian release, so free) to exceed ``s``; beware that
a column with a few missing values can then come out non-nullable and such rows fail
validation. A collection of names declares the nullable columns exactly.

The noise comes from ``np.random.default_rng(rng)``; the default ``rng=None`` draws fresh
OS entropy. A fixed seed makes the noise reproducible: use it for tests only, since
anyone who knows the seed can subtract the noise.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import dp_accounting
import numpy as np
import pandas as pd
from scipy import special

from dpnf_jax.data.marginal import histogram_noise_multiplier
from dpnf_jax.data.schema import CategoricalColumn, Column, ContinuousColumn, OrdinalColumn, Schema

DEFAULT_RANGE = (-1e9, 1e9)
OTHER_LABEL = "__other__"
GRIDS = ("auto", "linear", "log")
NULLABLE_MODES = ("dtype", "dp")

LABEL_BOUNDS = "schema: bounds"
LABEL_CATEGORIES = "schema: categories"
LABEL_SELECTION = "schema: category selection"

# nullable="dp": a noisy missing count above this many noise standard deviations.
_NULL_Z = 1.0


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_range(name: str, value: Any, what: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{what} for column {name!r} must be a pair (lo, hi), got {value!r}")
    lo, hi = value
    if not (_is_real(lo) and _is_real(hi) and math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{what} for column {name!r} must be finite numbers with lo < hi, got {value!r}")
    return float(lo), float(hi)


def _names(value: Collection[str] | None, what: str, columns: Sequence[str]) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a collection of column names, not a single string {value!r}")
    names = set(value)
    unknown = sorted(str(n) for n in names - set(columns))
    if unknown:
        raise ValueError(f"{what}: column(s) {unknown} are not in the frame")
    return names


def declared_kind(dtype: Any) -> str | None:
    """``"categorical"``, ``"continuous"``, ``"integer"`` or None from a dtype (no values)."""
    if pd.api.types.is_bool_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
        return "categorical"
    if pd.api.types.is_complex_dtype(dtype):
        return None
    if pd.api.types.is_integer_dtype(dtype):
        return "integer"
    if pd.api.types.is_numeric_dtype(dtype):
        return "continuous"
    if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
        return "categorical"
    return None


def dtype_can_hold_missing(dtype: Any) -> bool:
    """False only for numpy int / uint / bool dtypes (they cannot hold NaN / NA)."""
    return not (isinstance(dtype, np.dtype) and dtype.kind in "iub")


def symlog_grid(lo: float, hi: float, bins_per_decade: int = 10, min_abs: float = 1e-3) -> np.ndarray:
    """Public bin edges on ``[lo, hi]``: 0 and ``+-10^(k / bins_per_decade)`` for
    ``min_abs <= 10^(k / bins_per_decade) <= max(|lo|, |hi|)``, plus ``lo`` and ``hi``."""
    top = max(abs(lo), abs(hi))
    points = [lo, hi]
    if top > min_abs:
        k = np.arange(math.floor(math.log10(min_abs) * bins_per_decade),
                      math.ceil(math.log10(top) * bins_per_decade) + 1)
        magnitudes = 10.0 ** (k / bins_per_decade)
        magnitudes = magnitudes[magnitudes >= min_abs * (1 - 1e-12)]
        points.extend(magnitudes)
        points.extend(-magnitudes)
    points.append(0.0)
    inner = np.unique(np.asarray(points, np.float64))
    tol = 1e-9 * (hi - lo)
    inner = inner[(inner > lo + tol) & (inner < hi - tol)]
    return np.concatenate([[lo], inner, [hi]])


def _plan_kinds(df, categorical, continuous, integer, public) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for name in df.columns:
        if name in public:
            continue
        if name in categorical:
            kind = "categorical"
        else:
            kind = declared_kind(df[name].dtype)
            if name in continuous and kind in (None, "categorical"):
                kind = "continuous"
            if kind is None:
                raise ValueError(
                    f"column {name!r}: dtype {df[name].dtype} has no column kind; declare it in "
                    "categorical_columns or continuous_columns, or give a public column for it"
                )
        if name in integer:
            if kind == "categorical":
                raise ValueError(f"column {name!r}: integer_columns names a categorical column")
            kind = "integer"
        kinds[name] = kind
    return kinds


def _continuous_values(series: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    # Declared continuous but stored as text: non-numbers count as missing (no error
    # message may quote a private value).
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _merge_bins(counts: np.ndarray, edges: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of `width` adjacent bins and their edges.

    Blocks are aligned at the edge 0 when 0 is an interior edge (so a merged bin never
    straddles 0 and a non-negative column keeps a lower bound >= 0), else at the left end.
    """
    n = len(counts)
    zero = np.flatnonzero(edges[1:-1] == 0.0)
    anchor = int(zero[0]) + 1 if len(zero) else 0
    starts = sorted({0, *range(anchor, -1, -width), *range(anchor, n, width)})
    return np.add.reduceat(counts, starts), np.append(edges[starts], edges[-1])


def _bounds_from_counts(
    noisy: np.ndarray, edges: np.ndarray, s: float, quantiles, rate: float, tail: float, levels: int
) -> tuple[float, float] | None:
    """Bounds from one column's noisy value-bin counts (post-processing only).

    Level ``r`` merges ``2^r`` adjacent bins (noise std ``s * 2^(r/2)``); merged counts
    below ``s * 2^(r/2) * Phi^-1(1 - rate / total bins over all levels)`` are zeroed (a
    bin with no rows survives at some level with probability <= `rate`; blocks cut short
    at the ends have less noise, so the threshold is conservative there). The finest
    level that keeps at least ``1 - tail`` of the largest mass kept by any level is
    used; its thresholded counts form the CDF the quantiles are read from.
    """
    widths = [2**r for r in range(levels + 1) if 2**r <= max(1, len(noisy) // 4)] or [1]
    merged = [_merge_bins(noisy, edges, w) for w in widths]
    z = -special.ndtri(rate / sum(len(c) for c, _ in merged))
    kept = [(np.where(c > s * math.sqrt(w) * z, c, 0.0), e) for (c, e), w in zip(merged, widths)]
    reference = max(c.sum() for c, _ in kept)
    if not reference > 0:
        return None
    counts, level_edges = next((c, e) for c, e in kept if c.sum() >= (1.0 - tail) * reference)
    cdf = np.cumsum(counts) / counts.sum()
    q_lo, q_hi = quantiles
    n = len(counts)
    first = min(int(np.searchsorted(cdf, q_lo, side="right")), n - 1)
    last = min(int(np.searchsorted(cdf, q_hi * (1 - 1e-12), side="left")), n - 1)
    last = max(last, first)
    return float(level_edges[first]), float(level_edges[last + 1])


def _integer_bounds(name: str, lower: float, upper: float, lo: float, hi: float) -> tuple[float, float]:
    lo_i, hi_i = math.ceil(lo), math.floor(hi)
    lower = float(min(max(math.floor(lower), lo_i), hi_i))
    upper = float(max(min(math.ceil(upper), hi_i), lo_i))
    if lower >= upper:
        if lower + 1 <= hi_i:
            upper = lower + 1
        else:
            lower = upper - 1
    return lower, upper


def infer_dp_schema(
    df: pd.DataFrame,
    epsilon: float,
    delta: float,
    *,
    coarse_bounds: Mapping[str, tuple[float, float]] | None = None,
    default_range: tuple[float, float] = DEFAULT_RANGE,
    quantiles: tuple[float, float] = (0.0, 1.0),
    grid: str | Mapping[str, str] = "auto",
    n_bins: int = 64,
    empty_bin_rate: float = 0.01,
    tail_mass: float = 0.01,
    levels: int = 5,
    bins_per_decade: int = 10,
    min_abs: float = 1e-3,
    categorical_columns: Collection[str] | None = None,
    continuous_columns: Collection[str] | None = None,
    integer_columns: Collection[str] | None = None,
    public_columns: Mapping[str, Column] | Sequence[Column] | None = None,
    max_categories: int = 100,
    other_label: str | None = OTHER_LABEL,
    selection_delta: float | None = None,
    nullable: str | Collection[str] = "dtype",
    rng: np.random.Generator | int | None = None,
    details: dict[str, Any] | None = None,
) -> tuple[Schema, list[tuple[str, dp_accounting.DpEvent]]]:
    """Discovers a schema under ``(epsilon, delta)``-DP; see the module docstring.

    Args:
      df: the private rows; column names must be str.
      epsilon, delta: the budget of schema discovery alone (it then composes with
        training in one accountant: pass the events as ``schema_events``).
      coarse_bounds: PUBLIC search range ``{column: (lo, hi)}`` per continuous column;
        values are clipped to it and the bounds found lie inside it.
      default_range: PUBLIC range of continuous columns missing from `coarse_bounds`.
      quantiles: ``(q_lo, q_hi)``, ``0 <= q_lo < q_hi <= 1``: the bounds are DP estimates
        of these quantiles (rounded outwards to the grid); ``(0, 1)``: the noisy support.
      grid: "linear", "log", "auto" (linear for columns in `coarse_bounds`, log
        otherwise) or ``{column: grid}`` (missing columns: "auto").
      n_bins: bins of a linear grid; bins_per_decade, min_abs: the log grid.
      empty_bin_rate, tail_mass, levels: the bounds' post-processing (see above).
      categorical_columns: columns treated as categorical whatever their dtype (values
        compared as text).
      continuous_columns: columns treated as continuous whatever their dtype
        (non-numeric text counts as missing).
      integer_columns: continuous columns marked integer in addition to those with an
        integer dtype.
      public_columns: ready, PUBLIC column specs used as they are (no data access, no
        budget), e.g. a known category list or known bounds.
      max_categories: at most this many released categories per column (the largest
        noisy counts); the rest map to `other_label`.
      other_label: the catch-all level added to every discovered categorical column;
        None: no catch-all (unreleased values then fail validation).
      selection_delta: ``delta_T``, the part of `delta` for partition selection, in
        ``(0, delta)``; default ``delta / 2`` (unused without categorical columns).
      nullable: "dtype", "dp" or the collection of nullable columns (see above).
      rng: noise generator or seed (None: fresh OS entropy; fixed seeds are for tests).
      details: if a dict is given, it is filled with the mechanism's parameters
        (noise multiplier, per-count noise std, thresholds): all public.

    Returns:
      ``(schema, events)``: the Schema (``provenance="dp"``, columns in frame order) and
      ``[(label, event)]`` with labels "schema: bounds", "schema: categories" and
      "schema: category selection" (only those that apply).

    Raises:
      ValueError / TypeError: bad arguments, all checked before the rows are read.
    """
    # ------------------------------------------------------------ public checks only
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if df.shape[1] == 0 or len(df) == 0:
        raise ValueError("infer_dp_schema needs a non-empty DataFrame")
    columns = list(df.columns)
    for name in columns:
        if not isinstance(name, str) or not name:
            raise ValueError(f"column names must be non-empty str, got {name!r}")
    if len(set(columns)) != len(columns):
        raise ValueError("duplicate column names in the frame")
    if not (_is_real(epsilon) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(quantiles, Sequence) and len(quantiles) == 2
            and all(_is_real(q) for q in quantiles) and 0 <= quantiles[0] < quantiles[1] <= 1):
        raise ValueError(f"quantiles must be (q_lo, q_hi) with 0 <= q_lo < q_hi <= 1, got {quantiles!r}")
    quantiles = (float(quantiles[0]), float(quantiles[1]))
    if not (isinstance(n_bins, (int, np.integer)) and n_bins >= 1):
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if not (isinstance(bins_per_decade, (int, np.integer)) and bins_per_decade >= 1):
        raise ValueError(f"bins_per_decade must be an integer >= 1, got {bins_per_decade!r}")
    if not (_is_real(empty_bin_rate) and 0 < empty_bin_rate < 1):
        raise ValueError(f"empty_bin_rate must be in (0, 1), got {empty_bin_rate!r}")
    if not (_is_real(tail_mass) and 0 <= tail_mass < 1):
        raise ValueError(f"tail_mass must be in [0, 1), got {tail_mass!r}")
    if not (isinstance(levels, (int, np.integer)) and levels >= 0):
        raise ValueError(f"levels must be an integer >= 0, got {levels!r}")
    if not (_is_real(min_abs) and math.isfinite(min_abs) and min_abs > 0):
        raise ValueError(f"min_abs must be a positive number, got {min_abs!r}")
    if not (isinstance(max_categories, (int, np.integer)) and max_categories >= 1):
        raise ValueError(f"max_categories must be an integer >= 1, got {max_categories!r}")
    if other_label is not None and (not isinstance(other_label, str) or not other_label):
        raise ValueError(f"other_label must be a non-empty str or None, got {other_label!r}")
    default_lo, default_hi = _check_range("<default>", default_range, "default_range")

    public: dict[str, Column] = {}
    if public_columns is not None:
        specs = public_columns.values() if isinstance(public_columns, Mapping) else public_columns
        for spec in specs:
            if not isinstance(spec, (ContinuousColumn, CategoricalColumn, OrdinalColumn)):
                raise TypeError(f"public_columns must hold column specs, got {spec!r}")
            public[spec.name] = spec
        unknown = sorted(set(public) - set(columns))
        if unknown:
            raise ValueError(f"public_columns: column(s) {unknown} are not in the frame")
    categorical = _names(categorical_columns, "categorical_columns", columns)
    continuous = _names(continuous_columns, "continuous_columns", columns)
    integer = _names(integer_columns, "integer_columns", columns)
    both = sorted(categorical & continuous)
    if both:
        raise ValueError(f"column(s) {both} are declared both categorical and continuous")
    kinds = _plan_kinds(df, categorical, continuous, integer, set(public))

    ranges: dict[str, tuple[float, float]] = {}
    coarse_bounds = {} if coarse_bounds is None else coarse_bounds
    if not isinstance(coarse_bounds, Mapping):
        raise TypeError(f"coarse_bounds must be a mapping {{column: (lo, hi)}}, got {type(coarse_bounds).__name__}")
    for name, value in coarse_bounds.items():
        if name not in columns:
            raise ValueError(f"coarse_bounds: column {name!r} is not in the frame")
        if name in public:
            raise ValueError(f"coarse_bounds: column {name!r} is given in public_columns")
        if kinds[name] == "categorical":
            raise ValueError(f"coarse_bounds: column {name!r} is categorical (declare it continuous)")
        ranges[name] = _check_range(name, value, "coarse_bounds")
    grids: dict[str, str] = {}
    grid_of = grid if isinstance(grid, Mapping) else {}
    if not isinstance(grid, Mapping) and grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS} or a mapping, got {grid!r}")
    for name in grid_of:
        if name not in kinds or kinds[name] == "categorical":
            raise ValueError(f"grid: column {name!r} is not a DP continuous column")
        if grid_of[name] not in GRIDS:
            raise ValueError(f"grid for column {name!r} must be one of {GRIDS}, got {grid_of[name]!r}")
    edges_of: dict[str, np.ndarray] = {}
    for name, kind in kinds.items():
        if kind == "categorical":
            continue
        lo, hi = ranges.get(name, (default_lo, default_hi))
        if kind == "integer" and math.ceil(lo) >= math.floor(hi):
            raise ValueError(f"column {name!r}: the coarse range ({lo}, {hi}) holds fewer than two integers")
        ranges[name] = (lo, hi)
        choice = grid_of.get(name, grid if isinstance(grid, str) else "auto")
        if choice == "auto":
            choice = "linear" if name in coarse_bounds else "log"
        grids[name] = choice
        if choice == "linear":
            edges_of[name] = np.linspace(lo, hi, int(n_bins) + 1)
        else:
            edges_of[name] = symlog_grid(lo, hi, int(bins_per_decade), float(min_abs))

    if isinstance(nullable, str):
        if nullable not in NULLABLE_MODES:
            raise ValueError(f"nullable must be one of {NULLABLE_MODES} or a collection of names, got {nullable!r}")
        declared_nullable = None
    else:
        declared_nullable = _names(nullable, "nullable", columns)

    n_continuous = sum(kind != "categorical" for kind in kinds.values())
    n_categorical = len(kinds) - n_continuous
    m = n_continuous + n_categorical
    if n_categorical:
        selection = delta / 2 if selection_delta is None else selection_delta
        if not (_is_real(selection) and 0 < selection < delta):
            raise ValueError(f"selection_delta must be in (0, delta={delta}), got {selection_delta!r}")
        selection = float(selection)
    else:
        selection = 0.0

    events: list[tuple[str, dp_accounting.DpEvent]] = []
    sigma = s = tau = float("nan")
    if m:
        from dpnf_jax.privacy.accounting import DeltaDpEvent, epsilon_of_events

        sigma = histogram_noise_multiplier(float(epsilon), (delta - selection) / (1.0 - selection))
        for _ in range(50):
            s = sigma * math.sqrt(m)
            events = []
            if n_continuous:
                events.append((LABEL_BOUNDS, dp_accounting.GaussianDpEvent(s / math.sqrt(n_continuous))))
            if n_categorical:
                events.append((LABEL_CATEGORIES, dp_accounting.GaussianDpEvent(s / math.sqrt(n_categorical))))
                events.append((LABEL_SELECTION, DeltaDpEvent(selection)))
            if epsilon_of_events([e for _, e in events], delta, "pld") <= epsilon:
                break
            sigma *= 1.001  # the PLD grid over-estimates slightly: never report more than epsilon
        else:  # pragma: no cover - the analytic calibration is exact
            raise RuntimeError("schema discovery: calibration did not meet the budget")
        if n_categorical:
            tau = float(1.0 + s * -special.ndtri(selection / n_categorical))

    # ------------------------------------------------------------ the DP release
    generators = iter(np.random.default_rng(rng).spawn(m)) if m else iter(())
    built: list[Column] = []
    for name in columns:
        if name in public:
            built.append(public[name])
            continue
        kind, series, gen = kinds[name], df[name], next(generators)
        if declared_nullable is not None:
            is_nullable = name in declared_nullable
        else:
            is_nullable = dtype_can_hold_missing(series.dtype)
        if kind == "categorical":
            missing = series.isna().to_numpy()
            observed = series[~missing].astype("string").to_numpy(dtype=object)
            values, counts = np.unique(observed, return_counts=True) if len(observed) else (np.array([], object), np.array([], np.int64))
            noisy = counts + gen.normal(0.0, s, len(values))
            noisy_missing = int(missing.sum()) + gen.normal(0.0, s)
            released = [i for i in range(len(values)) if noisy[i] > tau]
            released.sort(key=lambda i: (-noisy[i], str(values[i])))
            categories = sorted(str(values[i]) for i in released[: int(max_categories)])
            if other_label is not None and other_label not in categories:
                categories.append(other_label)
            if not categories:
                raise ValueError(
                    f"column {name!r}: no category passed the DP threshold ({tau:.1f}); "
                    "set other_label, raise epsilon or give the column in public_columns"
                )
            if nullable == "dp" and declared_nullable is None:
                is_nullable = is_nullable and noisy_missing > _NULL_Z * s
            built.append(CategoricalColumn(name, tuple(categories), nullable=is_nullable, other=other_label))
        else:
            lo, hi = ranges[name]
            edges = edges_of[name]
            v = _continuous_values(series)
            missing = np.isnan(v)
            idx = np.clip(np.searchsorted(edges, np.clip(v[~missing], lo, hi), side="right") - 1, 0, len(edges) - 2)
            counts = np.bincount(idx, minlength=len(edges) - 1).astype(np.float64)
            noisy = counts + gen.normal(0.0, s, len(counts))
            noisy_missing = float(missing.sum()) + gen.normal(0.0, s)
            found = _bounds_from_counts(noisy, edges, s, quantiles, empty_bin_rate, tail_mass, levels)
            if found is None:
                warnings.warn(
                    f"column {name!r}: no histogram bin cleared the DP noise threshold; its bounds "
                    f"are the coarse range [{lo:g}, {hi:g}]", UserWarning, stacklevel=2,
                )
                found = (lo, hi)
            lower, upper = found
            if kind == "integer":
                lower, upper = _integer_bounds(name, lower, upper, lo, hi)
            if nullable == "dp" and declared_nullable is None:
                is_nullable = is_nullable and noisy_missing > _NULL_Z * s
            built.append(ContinuousColumn(name, lower, upper, integer=kind == "integer", nullable=is_nullable))

    if details is not None:
        details.update(
            noise_multiplier=sigma if m else None,
            count_noise_std=s if m else None,
            selection_delta=selection if n_categorical else None,
            selection_threshold=tau if n_categorical else None,
            continuous_columns=n_continuous,
            categorical_columns=n_categorical,
            grids=grids,
            ranges={k: list(v) for k, v in ranges.items()},
        )
    return Schema(tuple(built), provenance="dp"), events


EVENTS_FORMAT = "dpnf-schema-events"


def events_to_dicts(events: Sequence[tuple[str, dp_accounting.DpEvent]]) -> list[dict[str, Any]]:
    """``[{"label": ..., "event": event_to_dict(...)}]``, JSON-ready."""
    from dpnf_jax.privacy.accounting import event_to_dict

    return [{"label": label, "event": event_to_dict(event)} for label, event in events]


def events_from_dicts(entries: Any) -> list[tuple[str, dp_accounting.DpEvent]]:
    """Inverse of `events_to_dicts`; also accepts a whole events file (a dict with "events").

    Raises:
      ValueError: malformed entries or unknown event types.
    """
    from dpnf_jax.privacy.accounting import event_from_dict

    if isinstance(entries, Mapping):
        if entries.get("format", EVENTS_FORMAT) != EVENTS_FORMAT:
            raise ValueError(f"not a schema events file (format {entries.get('format')!r})")
        entries = entries.get("events")
    if not isinstance(entries, list):
        raise ValueError(f"schema events must be a list of {{label, event}} entries, got {type(entries).__name__}")
    out = []
    for entry in entries:
        if not (isinstance(entry, Mapping) and isinstance(entry.get("label"), str)
                and isinstance(entry.get("event"), Mapping)):
            raise ValueError(f"malformed schema event entry {entry!r}")
        try:
            out.append((entry["label"], event_from_dict(dict(entry["event"]))))
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed schema event entry {entry!r} ({err!r})") from err
    return out


def events_file_dict(events: Sequence[tuple[str, dp_accounting.DpEvent]], epsilon: float, delta: float) -> dict[str, Any]:
    """The content of a ``<schema>.events.json`` file written by ``dpnf schema``."""
    return {
        "format": EVENTS_FORMAT,
        "version": 1,
        "epsilon": float(epsilon),
        "delta": float(delta),
        "events": events_to_dicts(events),
    }
