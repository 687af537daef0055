"""Bundled datasets: `dpnf_jax.datasets.load_adult()` and the public Adult schema."""

from dpnf_jax.data.datasets import ADULT_COLUMNS, adult_schema, load_adult

__all__ = ["ADULT_COLUMNS", "adult_schema", "load_adult"]
