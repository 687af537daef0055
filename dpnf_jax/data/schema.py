"""Public table schemas: column specifications, validation of frames, JSON.

A schema is public metadata (names, types, bounds, category lists). It must never be
read off the private rows; the one helper that does so, `Schema.infer_nonprivate`, says
so in its name, in a warning and in the schema's `provenance`. `Schema.infer_dp` reads
the rows only through differentially private mechanisms and returns the DP events spent
(provenance "dp").
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Union

import numpy as np
import pandas as pd

from dpnf_jax.fileio import atomic_write

# "dp-guessed-kinds": bounds and categories released under DP, but the kind of some
# columns (text or number, integer, nullable) guessed from how the values read.
PROVENANCES = ("public", "nonprivate-inference", "dp", "dp-guessed-kinds")


def _is_real(value: Any) -> bool:
    # bool is a numbers.Real subclass, but True as a bound is a type error, not 1.0.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_integral(value: float) -> bool:
    return float(value).is_integer()


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"column name must be a non-empty str, got {name!r}")


def _check_flag(name: str, field: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"column {name!r}: {field} must be a bool, got {value!r}")


def _check_unique(name: str, field: str, values: tuple) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ValueError(f"column {name!r}: duplicate value {value!r} in {field}")
        seen.add(value)


@dataclasses.dataclass(frozen=True)
class ContinuousColumn:
    """A real-valued column with public bounds.

    Attributes:
      name: column name.
      lower: public lower bound (finite).
      upper: public upper bound (finite, > lower).
      integer: values are integers; the encoder dequantizes and decode rounds.
      point_masses: values that many rows take exactly (e.g. 0 for capital-gain),
        declared from domain knowledge; each gets its own discrete level.
      nullable: the column may be missing (NaN / NA).
    """

    name: str
    lower: float
    upper: float
    integer: bool = False
    point_masses: tuple[float, ...] = ()
    nullable: bool = False

    kind: ClassVar[str] = "continuous"

    def __post_init__(self) -> None:
        _check_name(self.name)
        for field in ("lower", "upper"):
            value = getattr(self, field)
            if not _is_real(value):
                raise TypeError(f"column {self.name!r}: {field} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"column {self.name!r}: {field} must be finite, got {value!r}")
            object.__setattr__(self, field, float(value))
        if not self.lower < self.upper:
            raise ValueError(
                f"column {self.name!r}: lower ({self.lower}) must be < upper ({self.upper})"
            )
        _check_flag(self.name, "integer", self.integer)
        _check_flag(self.name, "nullable", self.nullable)
        object.__setattr__(self, "integer", bool(self.integer))
        object.__setattr__(self, "nullable", bool(self.nullable))
        if isinstance(self.point_masses, (str, bytes)) or not isinstance(self.point_masses, Sequence):
            raise TypeError(
                f"column {self.name!r}: point_masses must be a sequence of numbers, "
                f"got {self.point_masses!r}"
            )
        atoms = []
        for atom in self.point_masses:
            if not _is_real(atom) or not math.isfinite(atom):
                raise ValueError(f"column {self.name!r}: point mass {atom!r} is not a finite number")
            if not self.lower <= atom <= self.upper:
                raise ValueError(
                    f"column {self.name!r}: point mass {atom!r} outside [{self.lower}, {self.upper}]"
                )
            atoms.append(float(atom))
        object.__setattr__(self, "point_masses", tuple(atoms))
        _check_unique(self.name, "point_masses", self.point_masses)
        if self.integer:
            for field, value in (("lower", self.lower), ("upper", self.upper)):
                if not _is_integral(value):
                    raise ValueError(
                        f"column {self.name!r}: integer column needs an integral {field}, got {value}"
                    )
            for atom in self.point_masses:
                if not _is_integral(atom):
                    raise ValueError(
                        f"column {self.name!r}: integer column needs integral point masses, got {atom}"
                    )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict, including `kind`."""
        return {
            "kind": self.kind,
            "name": self.name,
            "lower": self.lower,
            "upper": self.upper,
            "integer": self.integer,
            "point_masses": list(self.point_masses),
            "nullable": self.nullable,
        }


def _check_categories(name: str, categories: Any, allow_int: bool) -> tuple:
    if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence):
        raise TypeError(f"column {name!r}: categories must be a sequence, got {categories!r}")
    if len(categories) == 0:
        raise ValueError(f"column {name!r}: categories must be non-empty")
    out = []
    for category in categories:
        if isinstance(category, str):
            out.append(str(category))
        elif allow_int and isinstance(category, numbers.Integral) and not isinstance(category, (bool, np.bool_)):
            out.append(int(category))
        else:
            allowed = "str or int" if allow_int else "str"
            raise TypeError(f"column {name!r}: category {category!r} must be a {allowed}")
    # One element type per column, so decode has one well-defined dtype.
    if len({type(c) for c in out}) > 1:
        raise TypeError(f"column {name!r}: categories mix str and int: {tuple(out)!r}")
    out_tuple = tuple(out)
    _check_unique(name, "categories", out_tuple)
    return out_tuple


@dataclasses.dataclass(frozen=True)
class CategoricalColumn:
    """An unordered column with a public list of str categories.

    Attributes:
      name: column name.
      categories: the public category list (non-empty, unique str).
      nullable: the column may be missing; missing becomes its own level.
      other: optional catch-all level (one of `categories`, e.g. "__other__" from DP
        category discovery): values not in the list map to it instead of raising.
    """

    name: str
    categories: tuple[str, ...]
    nullable: bool = False
    other: str | None = None

    kind: ClassVar[str] = "categorical"

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "categories", _check_categories(self.name, self.categories, False))
        _check_flag(self.name, "nullable", self.nullable)
        object.__setattr__(self, "nullable", bool(self.nullable))
        if self.other is not None:
            if not isinstance(self.other, str):
                raise TypeError(f"column {self.name!r}: other must be a str or None, got {self.other!r}")
            if self.other not in self.categories:
                raise ValueError(
                    f"column {self.name!r}: other level {self.other!r} must be one of the categories"
                )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict, including `kind` (and `other` when set)."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "categories": list(self.categories),
            "nullable": self.nullable,
        }
        if self.other is not None:
            d["other"] = self.other
        return d


@dataclasses.dataclass(frozen=True)
class OrdinalColumn:
    """An ordered column; categories are all str or all int, listed in order.

    Attributes:
      name: column name.
      categories: the ordered public levels, e.g. `(1, 2, ..., 16)`.
      nullable: the column may be missing.
    """

    name: str
    categories: tuple[str | int, ...]
    nullable: bool = False

    kind: ClassVar[str] = "ordinal"

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "categories", _check_categories(self.name, self.categories, True))
        _check_flag(self.name, "nullable", self.nullable)
        object.__setattr__(self, "nullable", bool(self.nullable))

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict, including `kind`."""
        return {
            "kind": self.kind,
            "name": self.name,
            "categories": list(self.categories),
            "nullable": self.nullable,
        }


Column = Union[ContinuousColumn, CategoricalColumn, OrdinalColumn]
_COLUMN_TYPES: dict[str, type] = {
    cls.kind: cls for cls in (ContinuousColumn, CategoricalColumn, OrdinalColumn)
}


def column_from_dict(d: Mapping[str, Any]) -> Column:
    """Builds a column from `Column.to_dict()` output.

    Raises:
      TypeError: `d` is not a mapping.
      ValueError: unknown kind, missing or unknown fields (the message names the
        column and the field); constructor validation errors.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"column spec must be a mapping, got {type(d).__name__}")
    name = d.get("name", "<unnamed>")
    if "kind" not in d:
        raise ValueError(f"column {name!r}: missing field 'kind'")
    kind = d["kind"]
    if kind not in _COLUMN_TYPES:
        raise ValueError(
            f"column {name!r}: unknown kind {kind!r} (expected one of {sorted(_COLUMN_TYPES)})"
        )
    cls = _COLUMN_TYPES[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields) - {"kind"})
    if unknown:
        raise ValueError(f"column {name!r}: unknown field(s) {unknown} for kind {kind!r}")
    for field_name, field in fields.items():
        no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if no_default and field_name not in d:
            raise ValueError(f"column {name!r}: missing field {field_name!r}")
    kwargs = {k: v for k, v in d.items() if k != "kind"}
    for list_field in ("categories", "point_masses"):
        if list_field in kwargs and not isinstance(kwargs[list_field], (list, tuple)):
            raise TypeError(
                f"column {name!r}: field {list_field!r} must be a list, got {kwargs[list_field]!r}"
            )
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    """numpy scalars as Python scalars, so messages read `7`, not `np.int64(7)`."""
    return value.item() if isinstance(value, np.generic) else value


def _first_index(series: pd.Series, mask: np.ndarray) -> Any:
    return _plain(series.index[int(np.argmax(mask))])


def _continuous_values(column: ContinuousColumn, series: pd.Series) -> np.ndarray:
    """Parses a continuous column to float64 with NaN for missing; [n]."""
    if pd.api.types.is_bool_dtype(series.dtype):
        raise ValueError(f"column {column.name!r}: boolean values in a continuous column")
    if pd.api.types.is_numeric_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    numeric = pd.to_numeric(series, errors="coerce")
    bad = (numeric.isna() & series.notna()).to_numpy()
    if bad.any():
        value = _plain(series.iloc[int(np.argmax(bad))])
        raise ValueError(f"column {column.name!r}: non-numeric value {value!r} in a continuous column")
    return numeric.to_numpy(dtype=np.float64, na_value=np.nan)


def _category_codes(column: CategoricalColumn | OrdinalColumn, series: pd.Series) -> np.ndarray:
    """Maps a column to int64 category indices with -1 for missing; [n]."""
    missing = series.isna().to_numpy()
    if isinstance(column.categories[0], str):
        # Category lists are str; compare as str so an int-typed 1 matches "1".
        values = series.astype("string")
        index = pd.Index(column.categories, dtype="string")
    else:
        values = series
        index = pd.Index(column.categories, dtype=np.int64)
    codes = index.get_indexer(values).astype(np.int64)
    unknown = (codes < 0) & ~missing
    other = getattr(column, "other", None)
    if other is not None:
        codes[unknown] = column.categories.index(other)
    elif unknown.any():
        value = _plain(series.iloc[int(np.argmax(unknown))])
        raise ValueError(
            f"column {column.name!r}: unknown category {value!r} "
            f"(the schema lists {len(column.categories)} categories)"
        )
    return codes


@dataclasses.dataclass(frozen=True)
class Schema:
    """An ordered collection of public column specifications.

    Attributes:
      columns: the columns, in table order.
      provenance: where the schema came from: "public" (domain knowledge), "dp"
        (discovered under differential privacy, accounted for), "dp-guessed-kinds"
        (the same, but some columns' kinds guessed from the values: not covered) or
        "nonprivate-inference" (read off the rows: not private).
    """

    columns: tuple[Column, ...]
    provenance: str = "public"

    def __post_init__(self) -> None:
        if isinstance(self.columns, (str, bytes, Mapping)) or not isinstance(self.columns, Sequence):
            raise TypeError(f"columns must be a sequence of columns, got {type(self.columns).__name__}")
        columns = tuple(self.columns)
        for column in columns:
            if not isinstance(column, (ContinuousColumn, CategoricalColumn, OrdinalColumn)):
                raise TypeError(f"schema entries must be column specs, got {column!r}")
        if not columns:
            raise ValueError("a schema needs at least one column")
        seen = set()
        for column in columns:
            if column.name in seen:
                raise ValueError(f"duplicate column name {column.name!r} in schema")
            seen.add(column.name)
        object.__setattr__(self, "columns", columns)
        if self.provenance not in PROVENANCES:
            raise ValueError(f"provenance must be one of {PROVENANCES}, got {self.provenance!r}")

    @property
    def names(self) -> tuple[str, ...]:
        """Column names in schema order."""
        return tuple(column.name for column in self.columns)

    @property
    def covers_schema_privacy(self) -> bool:
        """True when the schema itself costs no unaccounted privacy ("public" or "dp")."""
        return self.provenance in ("public", "dp")

    def __getitem__(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(f"no column {name!r} in schema (columns: {list(self.names)})")

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.columns)

    def __iter__(self) -> Iterator[Column]:
        return iter(self.columns)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict `{"provenance": ..., "columns": [...]}`."""
        return {"provenance": self.provenance, "columns": [c.to_dict() for c in self.columns]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Schema:
        """Inverse of `to_dict`.

        Raises:
          TypeError / ValueError: malformed input; messages name the column and field.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"schema must be a mapping, got {type(d).__name__}")
        if "columns" not in d:
            raise ValueError("schema: missing field 'columns'")
        if not isinstance(d["columns"], (list, tuple)):
            raise TypeError(f"schema: field 'columns' must be a list, got {type(d['columns']).__name__}")
        unknown = sorted(set(d) - {"columns", "provenance"})
        if unknown:
            raise ValueError(f"schema: unknown field(s) {unknown}")
        columns = tuple(column_from_dict(c) for c in d["columns"])
        return cls(columns, d.get("provenance", "public"))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialises to JSON; if `path` is given, also writes it atomically.

        The file is written to a temporary file in the same directory and moved into
        place with `os.replace`, so a reader never sees a half-written schema.
        """
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Schema:
        """Reads a schema from a JSON string or from a path to a JSON file."""
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        else:
            text = str(text_or_path)
        return cls.from_dict(json.loads(text))

    @classmethod
    def infer_nonprivate(cls, df: pd.DataFrame, max_categories: int = 50) -> Schema:
        """Derives a schema FROM THE ROWS. This is not differentially private.

        Bounds are the observed min/max and categories the observed values, so the
        schema leaks information about individual rows. The result has provenance
        "nonprivate-inference" and every privacy report built on it must say so. Use
        it for public data or for prototyping only.

        Args:
          df: the frame to read.
          max_categories: a non-numeric column with more distinct values is refused.

        Returns:
          A Schema with `provenance="nonprivate-inference"`.

        Raises:
          ValueError: empty frame, or a text column with too many distinct values.
        """
        warnings.warn(
            "Schema.infer_nonprivate reads bounds and categories from the rows: the "
            "schema is NOT differentially private (provenance='nonprivate-inference').",
            UserWarning,
            stacklevel=2,
        )
        if not isinstance(df, pd.DataFrame) or len(df) == 0:
            raise ValueError("infer_nonprivate needs a non-empty DataFrame")
        columns: list[Column] = []
        for name in df.columns:
            series = df[name]
            nullable = bool(series.isna().any())
            observed = series.dropna()
            if len(observed) == 0:
                raise ValueError(f"column {name!r}: all values are missing; cannot infer a type")
            if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
                values = observed.to_numpy(dtype=np.float64)
                integer = bool(np.all(np.mod(values, 1.0) == 0.0))
                lower, upper = float(values.min()), float(values.max())
                if lower == upper:
                    upper = lower + 1.0
                columns.append(ContinuousColumn(str(name), lower, upper, integer=integer, nullable=nullable))
            else:
                categories = sorted(set(observed.astype(str)))
                if len(categories) > max_categories:
                    raise ValueError(
                        f"column {name!r}: {len(categories)} distinct values exceed "
                        f"max_categories={max_categories}"
                    )
                columns.append(CategoricalColumn(str(name), tuple(categories), nullable=nullable))
        return cls(tuple(columns), provenance="nonprivate-inference")

    @classmethod
    def infer_dp(cls, df: pd.DataFrame, epsilon: float, delta: float, **kwargs: Any) -> tuple[Schema, list]:
        """Discovers a schema from the rows UNDER DIFFERENTIAL PRIVACY.

        Column kinds come from the declared dtypes; bounds are DP quantiles of noisy
        histograms on a public grid and category lists come from DP partition
        selection. See :func:`dpnf_jax.data.schema_dp.infer_dp_schema` for the
        arguments and the exact accounting.

        Returns:
          ``(schema, events)``: a Schema with ``provenance="dp"`` and the
          ``[(label, dp_accounting.DpEvent)]`` spent, to pass to
          ``DPFlowSynthesizer(..., schema_events=events)`` so one accountant covers
          schema discovery and training.
        """
        from dpnf_jax.data.schema_dp import infer_dp_schema

        return infer_dp_schema(df, epsilon, delta, **kwargs)

    def _check_structure(self, df: pd.DataFrame) -> None:
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
        if len(df) == 0:
            raise ValueError("the frame is empty (0 rows)")
        duplicated = df.columns[df.columns.duplicated()]
        if len(duplicated):
            raise ValueError(f"duplicate column(s) in frame: {list(duplicated)}")
        missing = [name for name in self.names if name not in df.columns]
        if missing:
            raise ValueError(f"frame is missing schema column(s): {missing}")
        extra = [name for name in df.columns if name not in self.names]
        if extra:
            raise ValueError(f"frame has column(s) not in the schema: {extra}")

    def parse_frame(self, df: pd.DataFrame, strict: bool = False) -> dict[str, np.ndarray]:
        """Validates `df` and returns each column as a numpy array.

        Continuous columns become float64 with NaN for missing (values not yet
        clipped); categorical and ordinal columns become int64 category indices with
        -1 for missing.

        Args:
          df: the frame, with exactly the schema's columns (any order).
          strict: raise on values outside a continuous column's public bounds (and on
            non-integral values in integer columns) instead of leaving them for the
            encoder to clip.

        Returns:
          `{name: array [n]}` in schema order.

        Raises:
          TypeError: `df` is not a DataFrame.
          ValueError: empty frame, missing / extra columns, non-numeric text in a
            continuous column, unknown categories, missing values in a non-nullable
            column, and (strict) out-of-bounds values. Messages name the column and
            the offending value.
        """
        self._check_structure(df)
        parsed: dict[str, np.ndarray] = {}
        for column in self.columns:
            series = df[column.name]
            if isinstance(column, ContinuousColumn):
                values = _continuous_values(column, series)
                missing = np.isnan(values)
            else:
                values = _category_codes(column, series)
                missing = values < 0
            if not column.nullable and missing.any():
                raise ValueError(
                    f"column {column.name!r}: missing value (NaN) at row "
                    f"{_first_index(series, missing)!r} in a non-nullable column"
                )
            if strict and isinstance(column, ContinuousColumn):
                outside = ~missing & ((values < column.lower) | (values > column.upper))
                if outside.any():
                    value = values[int(np.argmax(outside))]
                    raise ValueError(
                        f"column {column.name!r}: value {float(value)!r} outside the public bounds "
                        f"[{column.lower}, {column.upper}]"
                    )
                if column.integer:
                    fractional = ~missing & (np.mod(values, 1.0) != 0.0)
                    if fractional.any():
                        value = values[int(np.argmax(fractional))]
                        raise ValueError(
                            f"column {column.name!r}: non-integral value {float(value)!r} in an integer column"
                        )
            parsed[column.name] = values
        return parsed

    def validate_frame(self, df: pd.DataFrame, strict: bool = False) -> None:
        """Checks `df` against the schema; raises as `parse_frame` does.

        Out-of-bounds continuous values raise only with `strict=True`; otherwise the
        encoder clips them to the public bounds and counts them.
        """
        self.parse_frame(df, strict=strict)
