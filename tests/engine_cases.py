"""The small flow, parameters and batch shared by the engine tests (test_fastgrad, test_clipping).

Both files use the same objects so their end-to-end calls reuse one set of compilations.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from dpnf_jax.flows.model import FlowConfig, init_params
from dpnf_jax.privacy import FlatClipping, PerUnitClipping, StochasticSparsification

SMALL_CLIP = 0.5  # per-example gradient norms here are O(100): clipping is active
ROW_MASK = (1, 1, 1, 1, 1, 0)  # five real rows and one padding row
KEY = 7


@contextlib.contextmanager
def precision(dtype: str):
    """64-bit mode only for float64 (restored afterwards); strict promotion always."""
    with jax.enable_x64(dtype == "float64"), jax.numpy_dtype_promotion("strict"):
        yield


def make_config(shared: bool) -> FlowConfig:
    return FlowConfig(dim=5, num_blocks=3, hidden=(8, 6), num_bins=4, shared=shared)


def random_params(config: FlowConfig, dtype, scale: float = 0.3):
    """Random non-zero values for every leaf (LU triangles, log-diagonal and the
    zero-initialised last layer included). numpy draws: no compilation needed."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), dtype), shapes)


def make_batch(dtype):
    """x [6, 5] with one value beyond the spline bound, and the row mask."""
    x = 1.5 * np.random.default_rng(2).standard_normal((len(ROW_MASK), 5))
    x[1, 3] = 5.0
    return jnp.asarray(x, dtype), jnp.asarray(ROW_MASK, dtype)


def clippers(clip: float) -> dict:
    """Every clipping strategy the engine offers, by name."""
    return {
        "flat": FlatClipping(clip),
        "layer-equal": PerUnitClipping(clip, "layer", "equal"),
        "layer-proportional": PerUnitClipping(clip, "layer", "proportional"),
        "neuron-equal": PerUnitClipping(clip, "neuron", "equal"),
        "neuron-proportional": PerUnitClipping(clip, "neuron", "proportional"),
        "sparse-flat-neuron": StochasticSparsification(FlatClipping(clip), 0.3, "neuron"),
        "sparse-flat-layer": StochasticSparsification(FlatClipping(clip), 0.5, "layer"),
        "sparse-neuron-equal": StochasticSparsification(PerUnitClipping(clip, "neuron", "equal"), 0.3),
        "sparse-layer-proportional": StochasticSparsification(PerUnitClipping(clip, "layer", "proportional"), 0.5),
    }
