"""DataFrame <-> R^d: the tabular encoder, and schema-derived bins for evaluation.

Every mapping here is a function of the public schema and of fresh noise only; nothing
is fitted to the rows, so encoding costs no privacy.

Layout of one encoded row (components in schema column order):

* continuous column: [missing indicator (nullable only)] [which-atom level (point
  masses only)] [value, affine onto [-interval, interval]];
* categorical column: one-hot dequantized levels (K dims, K+1 if nullable), or one
  ordinal-dequantized dim;
* ordinal column: one ordinal-dequantized dim.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from dpnf_jax.data.schema import (
    CategoricalColumn,
    Column,
    ContinuousColumn,
    OrdinalColumn,
    Schema,
)

CATEGORICAL_MODES = ("onehot", "ordinal")

# A unit value u in [0, 1] stored as the float32 (2u - 1) * interval comes back with an
# error below eps/4, i.e. eps * levels / 4 in level units. Dequantization noise stays
# eps * levels (4x that) away from the cell edges, so decoding the float32 encoding
# recovers every level exactly (measured: without the margin, 1% of Adult rows decode
# fnlwgt off by one). The margin is capped at a quarter level for columns with more
# than ~2 million levels, which float32 cannot resolve anyway.
_FLOAT32_EPS = float(np.finfo(np.float32).eps)
_MAX_EDGE_MARGIN = 0.25


class ClippingWarning(UserWarning):
    """Values outside a column's public bounds were clipped during encoding."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """Which encoded dims `[start, stop)` carry which component of which column.

    Attributes:
      name: the schema column.
      kind: the component: "continuous" (the value part of a continuous column),
        "categorical" / "ordinal" (the levels of such a column; a nullable column's
        last level is "missing"), "atom" (which point mass, with the last level
        meaning "not at an atom") or "missing" (missing indicator: level 1 = missing).
      start: first dim.
      stop: one past the last dim.
      encoding: "affine" (value mapped onto the interval), "onehot" (one dim per
        level, decoded by argmax) or "ordinal" (one dim, level + U(0,1) scaled onto
        the interval, decoded by floor).
      levels: number of discrete levels (0 for "affine").
    """

    name: str
    kind: str
    start: int
    stop: int
    encoding: str
    levels: int = 0

    @property
    def width(self) -> int:
        return self.stop - self.start


def _unit_to_interval(unit: np.ndarray, interval: float) -> np.ndarray:
    return (2.0 * unit - 1.0) * interval


def _interval_to_unit(x: np.ndarray, interval: float) -> np.ndarray:
    return np.clip((x / interval + 1.0) / 2.0, 0.0, 1.0)


def _dequantize(codes: np.ndarray, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Spreads integer levels uniformly over their cells of [0, 1].

    Args:
      codes: [n] ints in [0, levels).
      levels: number of cells.
      rng: noise source.

    Returns:
      [n] floats in (0, 1); code k lands in (k/levels, (k+1)/levels).
    """
    half_width = 0.5 - min(_FLOAT32_EPS * levels, _MAX_EDGE_MARGIN)
    noise = rng.uniform(-half_width, half_width, size=codes.shape)
    return (codes + 0.5 + noise) / levels


def _quantize(unit: np.ndarray, levels: int) -> np.ndarray:
    """Inverse of `_dequantize` for any unit value; [n] -> [n] ints in [0, levels)."""
    return np.clip(np.floor(unit * levels), 0, levels - 1).astype(np.int64)


def _encode_levels(
    codes: np.ndarray, levels: int, encoding: str, interval: float, rng: np.random.Generator
) -> np.ndarray:
    """Encodes level indices; [n] -> [n, width]."""
    if encoding == "onehot":
        # Hot coordinate in [0, 1), the others in [-1, 0): argmax recovers the level.
        out = rng.uniform(size=(codes.shape[0], levels)) - 1.0
        out[np.arange(codes.shape[0]), codes] += 1.0
        return out
    return _unit_to_interval(_dequantize(codes, levels, rng), interval)[:, None]


def _decode_levels(block: np.ndarray, levels: int, encoding: str, interval: float) -> np.ndarray:
    """Decodes a [n, width] block to level indices [n]."""
    if encoding == "onehot":
        return np.argmax(block, axis=1)
    return _quantize(_interval_to_unit(block[:, 0], interval), levels)


def _integer_levels(column: ContinuousColumn) -> int:
    return int(column.upper - column.lower) + 1


class TabularEncoder:
    """Maps table rows to points of R^d and back, using only the public schema.

    Args:
      schema: the public schema.
      categorical: "onehot" (one dim per category, decoded by argmax) or "ordinal"
        (one dim, code + U(0,1) scaled onto the interval). Ordinal columns always
        use the one-dim ordinal encoding. Which-atom components follow this mode.
      interval: continuous parts are mapped affinely onto [-interval, interval].
    """

    def __init__(self, schema: Schema, categorical: str = "onehot", interval: float = 2.0):
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a Schema, got {type(schema).__name__}")
        if categorical not in CATEGORICAL_MODES:
            raise ValueError(f"categorical must be one of {CATEGORICAL_MODES}, got {categorical!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not (
            math.isfinite(interval) and interval > 0
        ):
            raise ValueError(f"interval must be a finite positive number, got {interval!r}")
        self.schema = schema
        self.categorical = categorical
        self.interval = float(interval)
        self.segments: list[Segment] = self._layout()
        self.dim: int = self.segments[-1].stop
        self.last_clip_counts: dict[str, int] = {}

    def _layout(self) -> list[Segment]:
        segments: list[Segment] = []

        def add(name: str, kind: str, encoding: str, levels: int = 0) -> None:
            start = segments[-1].stop if segments else 0
            width = levels if encoding == "onehot" else 1
            segments.append(Segment(name, kind, start, start + width, encoding, levels))

        for column in self.schema:
            if isinstance(column, ContinuousColumn):
                if column.nullable:
                    add(column.name, "missing", "ordinal", 2)
                if column.point_masses:
                    add(column.name, "atom", self.categorical, len(column.point_masses) + 1)
                add(column.name, "continuous", "affine")
            elif isinstance(column, CategoricalColumn):
                levels = len(column.categories) + column.nullable
                add(column.name, "categorical", self.categorical, levels)
            else:
                add(column.name, "ordinal", "ordinal", len(column.categories) + column.nullable)
        return segments

    def column_segments(self, name: str) -> list[Segment]:
        """The segments of one column, in layout order."""
        found = [s for s in self.segments if s.name == name]
        if not found:
            raise KeyError(f"no column {name!r} in the encoder's schema")
        return found

    def encode(
        self,
        df: pd.DataFrame,
        rng: np.random.Generator | int | None = None,
        strict: bool = False,
    ) -> np.ndarray:
        """Encodes a frame.

        Continuous values outside the public bounds are clipped (and counted in
        `last_clip_counts`, with a `ClippingWarning`) unless `strict`, which raises.

        Args:
          df: [n rows] with exactly the schema's columns.
          rng: Generator or seed for the dequantization / fill noise (the only
            randomness); None draws a fresh seed.
          strict: raise on out-of-bounds or non-integral (integer column) values.

        Returns:
          [n, dim] float32.

        Raises:
          ValueError / TypeError: the frame does not fit the schema (see
            `Schema.parse_frame`).
        """
        rng = np.random.default_rng(rng)
        parsed = self.schema.parse_frame(df, strict=strict)
        n = len(df)
        out = np.empty((n, self.dim), dtype=np.float32)
        clip_counts: dict[str, int] = {}
        for column in self.schema:
            segments = self.column_segments(column.name)
            values = parsed[column.name]
            if isinstance(column, ContinuousColumn):
                blocks, clip_counts[column.name] = self._encode_continuous(column, values, rng)
            else:
                codes = np.where(values < 0, len(column.categories), values)
                blocks = [_encode_levels(codes, segments[0].levels, segments[0].encoding, self.interval, rng)]
            for segment, block in zip(segments, blocks):
                out[:, segment.start : segment.stop] = block
        self.last_clip_counts = clip_counts
        total = sum(clip_counts.values())
        if total:
            detail = ", ".join(f"{name}={count}" for name, count in clip_counts.items() if count)
            warnings.warn(
                f"clipped {total} value(s) to the public schema bounds: {detail}",
                ClippingWarning,
                stacklevel=2,
            )
        return out

    def _encode_continuous(
        self, column: ContinuousColumn, values: np.ndarray, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], int]:
        """Encodes one continuous column; returns its blocks in layout order and the clip count."""
        n = values.shape[0]
        missing = np.isnan(values)
        outside = ~missing & ((values < column.lower) | (values > column.upper))
        values = np.clip(values, column.lower, column.upper)
        if column.integer:
            values = np.rint(values)
        blocks: list[np.ndarray] = []
        if column.nullable:
            blocks.append(_encode_levels(missing.astype(np.int64), 2, "ordinal", self.interval, rng))
        # Rows whose value part carries no information (missing, or at an atom) get
        # uniform noise over the interval: data-independent and not a spike.
        filled = missing.copy()
        if column.point_masses:
            n_atoms = len(column.point_masses)
            atom_codes = np.full(n, n_atoms, dtype=np.int64)
            for j, atom in enumerate(column.point_masses):
                atom_codes[values == atom] = j
            filled |= atom_codes < n_atoms
            atom_codes[missing] = rng.integers(0, n_atoms + 1, size=int(missing.sum()))
            blocks.append(_encode_levels(atom_codes, n_atoms + 1, self.categorical, self.interval, rng))
        if column.integer:
            levels = _integer_levels(column)
            codes = np.where(missing, 0, values - column.lower).astype(np.int64)
            unit = _dequantize(codes, levels, rng)
        else:
            unit = (values - column.lower) / (column.upper - column.lower)
        unit = np.where(filled, rng.uniform(size=n), unit)
        blocks.append(_unit_to_interval(unit, self.interval)[:, None])
        return blocks, int(outside.sum())

    def decode(self, x: np.ndarray) -> pd.DataFrame:
        """Decodes any finite matrix of the right width to a valid table.

        Values never leave the schema: continuous parts are clipped to the bounds,
        integers rounded, level codes clamped.

        Args:
          x: [n, dim] array-like of finite numbers.

        Returns:
          DataFrame [n rows] with the schema's columns in schema order. Dtypes:
          continuous integer -> int64 ("Int64" if nullable), continuous float ->
          float64 (NaN for missing), categorical -> "string" (pd.NA for missing),
          ordinal -> int64 / "Int64" for int levels, "string" for str levels.

        Raises:
          ValueError: wrong shape or non-finite entries.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected an array of shape [n, {self.dim}], got {x.shape}")
        if not np.isfinite(x).all():
            bad_row, bad_col = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(
                f"non-finite value {float(x[bad_row, bad_col])!r} at row {bad_row}, dim {bad_col} "
                f"(column {self._segment_at(bad_col).name!r})"
            )
        data: dict[str, Any] = {}
        for column in self.schema:
            segments = self.column_segments(column.name)
            blocks = [x[:, s.start : s.stop] for s in segments]
            if isinstance(column, ContinuousColumn):
                data[column.name] = self._decode_continuous(column, segments, blocks)
            else:
                codes = _decode_levels(blocks[0], segments[0].levels, segments[0].encoding, self.interval)
                data[column.name] = levels_to_array(column, codes)
        return pd.DataFrame(data)

    def _segment_at(self, dim: int) -> Segment:
        return next(s for s in self.segments if s.start <= dim < s.stop)

    def _decode_continuous(
        self, column: ContinuousColumn, segments: list[Segment], blocks: list[np.ndarray]
    ) -> Any:
        # The value part is last in the layout; the discrete parts come before it.
        unit = _interval_to_unit(blocks[-1][:, 0], self.interval)
        if column.integer:
            values = column.lower + _quantize(unit, _integer_levels(column)).astype(np.float64)
        else:
            values = np.clip(column.lower + unit * (column.upper - column.lower), column.lower, column.upper)
        missing = np.zeros(values.shape[0], dtype=bool)
        for segment, block in zip(segments[:-1], blocks[:-1]):
            codes = _decode_levels(block, segment.levels, segment.encoding, self.interval)
            if segment.kind == "atom":
                at_atom = codes < len(column.point_masses)
                values[at_atom] = np.asarray(column.point_masses)[codes[at_atom]]
            elif segment.kind == "missing":
                missing = codes == 1
        return continuous_to_array(column, values, missing)

    def to_dict(self) -> dict[str, Any]:
        """The encoder's settings (schema, categorical mode, interval), JSON-ready."""
        return {"schema": self.schema.to_dict(), "categorical": self.categorical, "interval": self.interval}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TabularEncoder:
        """Inverse of `to_dict`."""
        for field in ("schema", "categorical", "interval"):
            if field not in d:
                raise ValueError(f"encoder settings: missing field {field!r}")
        return cls(Schema.from_dict(d["schema"]), d["categorical"], d["interval"])


def continuous_to_array(column: ContinuousColumn, values: np.ndarray, missing: np.ndarray) -> Any:
    """Decoded values (already inside the bounds) -> the column's dtype, NA where missing."""
    if column.integer:
        integers = values.astype(np.int64)
        return pd.arrays.IntegerArray(integers, missing) if column.nullable else integers
    values = values.copy()
    values[missing] = np.nan
    return values


def levels_to_array(column: CategoricalColumn | OrdinalColumn, codes: np.ndarray) -> Any:
    """Level indices (the last one is "missing" for nullable columns) -> column values."""
    k = len(column.categories)
    missing = codes >= k
    if isinstance(column.categories[0], str):
        return pd.Categorical.from_codes(np.where(missing, -1, codes), categories=list(column.categories)).astype(
            "string"
        )
    values = np.asarray(column.categories, dtype=np.int64)[np.minimum(codes, k - 1)]
    if column.nullable:
        return pd.arrays.IntegerArray(values, missing)
    return values


def column_bins(column: ContinuousColumn, n_bins: int = 20) -> np.ndarray:
    """Bin edges for a continuous column, from its public bounds only.

    Equal-width bins over [lower, upper]; an integer column with at most `n_bins`
    values gets one bin per integer (edges at half-integers). Point masses get codes
    of their own in `discretize`, ahead of these bins.

    Args:
      column: a continuous column.
      n_bins: number of equal-width bins.

    Returns:
      [n_edges] increasing edges; values are binned by `edges[i] <= v < edges[i+1]`,
      with the upper bound in the last bin.
    """
    if not isinstance(column, ContinuousColumn):
        raise TypeError(f"column {column.name!r}: bins are defined for continuous columns only")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if column.integer and _integer_levels(column) <= n_bins:
        return np.arange(column.lower - 0.5, column.upper + 1.0, 1.0)
    return np.linspace(column.lower, column.upper, n_bins + 1)


def n_codes(column: Column, n_bins: int = 20) -> int:
    """Number of distinct codes `discretize` can give a column."""
    if isinstance(column, ContinuousColumn):
        return len(column.point_masses) + len(column_bins(column, n_bins)) - 1 + column.nullable
    return len(column.categories) + column.nullable


def discretize(
    df: pd.DataFrame, schema: Schema, n_bins: int = 20, parsed: dict[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """Maps a frame to integer codes on schema-derived bins (for marginals / TVD).

    Codes per column: categorical / ordinal -> category index; continuous -> point
    masses first (0..A-1), then the `column_bins` bins (values clipped to the
    bounds); the missing value, if the column is nullable, takes the last code
    (`n_codes(column) - 1`).

    Args:
      df: [n rows] frame fitting the schema.
      schema: the public schema.
      n_bins: bins per continuous column.
      parsed: ``schema.parse_frame(df)`` when the caller already has it.

    Returns:
      DataFrame [n rows] of int64 codes, same columns (schema order) and index as `df`.
    """
    parsed = schema.parse_frame(df) if parsed is None else parsed
    data = {}
    for column in schema:
        values = parsed[column.name]
        if isinstance(column, ContinuousColumn):
            missing = np.isnan(values)
            values = np.clip(values, column.lower, column.upper)
            edges = column_bins(column, n_bins)
            n_atoms = len(column.point_masses)
            codes = n_atoms + np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
            for j, atom in enumerate(column.point_masses):
                codes[values == atom] = j
        else:
            missing = values < 0
            codes = values
        data[column.name] = np.where(missing, n_codes(column, n_bins) - 1, codes).astype(np.int64)
    return pd.DataFrame(data, index=df.index)
