"""Shared fixtures: scoped float64 and strict dtype promotion.

Both are context managers around one test, never global switches: the data and DP tests
expect JAX's default float32 and must not inherit 64-bit mode from a flow test.
"""

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture
def strict_promotion():
    """Run the test under ``jax.numpy_dtype_promotion('strict')`` (no silent upcasts)."""
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture
def float64():
    """Run the test with 64-bit JAX types and strict promotion; restored afterwards."""
    default_dtype = jnp.zeros(()).dtype
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        assert jnp.zeros(()).dtype == jnp.float64
        yield
    assert jnp.zeros(()).dtype == default_dtype, "float64 leaked out of the fixture"
