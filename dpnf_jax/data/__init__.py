"""Data layer: public schemas, the DataFrame <-> R^d encoder, the bundled Adult data, and
row sources for DP-SGD (in memory, or streamed from CSV/Parquet files)."""

from dpnf_jax.data.datasets import ADULT_COLUMNS, adult_schema, load_adult
from dpnf_jax.data.encode import ClippingWarning, Segment, TabularEncoder, column_bins, discretize, n_codes
from dpnf_jax.data.schema import (
    CategoricalColumn,
    Column,
    ContinuousColumn,
    OrdinalColumn,
    Schema,
    column_from_dict,
)
from dpnf_jax.data.stream import ArrayRows, StreamRows, TableFile

__all__ = [
    "ADULT_COLUMNS",
    "ArrayRows",
    "CategoricalColumn",
    "ClippingWarning",
    "Column",
    "ContinuousColumn",
    "OrdinalColumn",
    "Schema",
    "Segment",
    "StreamRows",
    "TableFile",
    "TabularEncoder",
    "adult_schema",
    "column_bins",
    "column_from_dict",
    "discretize",
    "load_adult",
    "n_codes",
]
