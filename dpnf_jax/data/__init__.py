"""Data layer: public schemas, the DataFrame <-> R^d encoder, the bundled Adult data."""

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

__all__ = [
    "ADULT_COLUMNS",
    "CategoricalColumn",
    "ClippingWarning",
    "Column",
    "ContinuousColumn",
    "OrdinalColumn",
    "Schema",
    "Segment",
    "TabularEncoder",
    "adult_schema",
    "column_bins",
    "column_from_dict",
    "discretize",
    "load_adult",
    "n_codes",
]
