"""Tests for dpnf_jax.flows.spline: identity, knots, monotonicity, boundary numerics.

The round trip and log|det J| against ``jax.jacobian`` for every bijector (the spline
included) live in ``test_flows.py``; this file checks what is specific to one spline.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpnf_jax.flows import spline

pytestmark = pytest.mark.usefixtures("strict_promotion")

BOUND = 3.0


def _batched(fn):
    """fn(value [], params [3K+1], bound) mapped over values [n]; jitted (eager vmap is slow)."""
    return jax.jit(jax.vmap(fn, in_axes=(0, None, None)), static_argnums=2)


batched_forward = _batched(spline.spline_forward)
batched_inverse = _batched(spline.spline_inverse)
jitted_knots = jax.jit(spline.spline_knots, static_argnums=1)


@functools.cache
def _value_grad(fn):
    """d fn(v, params)[0] / dv on values [m, n] (params shared), jitted once per fn."""
    grad = jax.grad(lambda v, p: fn(v, p, BOUND)[0])
    return jax.jit(jax.vmap(jax.vmap(grad, in_axes=(0, None)), in_axes=(0, None)))


def _random_params(seed: int, num_bins: int, scale: float = 1.5, dtype=jnp.float32) -> jax.Array:
    key = jax.random.key(seed)
    return scale * jax.random.normal(key, (spline.num_spline_params(num_bins),), dtype)


def _edge_inputs(bound: float, dtype) -> jax.Array:
    """Values at, just inside, just outside and far beyond the interval edges, and 0."""
    eps = float(jnp.finfo(dtype).eps) * 4
    edges = [bound, bound * (1 - eps), bound * (1 + eps), 10 * bound, 1e6, 0.0]
    return jnp.asarray(sorted({v for e in edges for v in (e, -e)}), dtype)


@pytest.mark.parametrize("num_bins", [2, 5, 8])
def test_zero_params_give_identity(num_bins):
    params = jnp.zeros((spline.num_spline_params(num_bins),), jnp.float32)
    x_knots, y_knots, derivatives = jitted_knots(params, BOUND)
    np.testing.assert_allclose(x_knots, np.linspace(-BOUND, BOUND, num_bins + 1), atol=1e-6)
    np.testing.assert_allclose(y_knots, x_knots, atol=1e-6)
    np.testing.assert_allclose(derivatives, 1.0, atol=1e-6)

    x = jnp.concatenate([jnp.linspace(-2 * BOUND, 2 * BOUND, 101), x_knots, _edge_inputs(BOUND, jnp.float32)])
    y, log_det = batched_forward(x, params, BOUND)
    np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(log_det, 0.0, atol=1e-6)
    x_back, inv_log_det = batched_inverse(x, params, BOUND)
    np.testing.assert_allclose(x_back, x, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(inv_log_det, 0.0, atol=1e-6)


def test_knots_are_interpolated_with_their_derivatives(float64):
    """At every knot: y = y_k and dy/dx = d_k, both from log_det and from autodiff."""
    params = _random_params(0, 6, dtype=jnp.float64)
    x_knots, y_knots, derivatives = jitted_knots(params, BOUND)
    inner = slice(1, -1)  # the end knots are +-bound, where the identity tails take over
    y, log_det = batched_forward(x_knots[inner], params, BOUND)
    np.testing.assert_allclose(y, y_knots[inner], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jnp.exp(log_det), derivatives[inner], rtol=1e-10)
    grad = jax.jit(jax.vmap(jax.grad(lambda x: spline.spline_forward(x, params, BOUND)[0])))(x_knots[inner])
    np.testing.assert_allclose(grad, derivatives[inner], rtol=1e-10)

    x, inv_log_det = batched_inverse(y_knots[inner], params, BOUND)
    np.testing.assert_allclose(x, x_knots[inner], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jnp.exp(-inv_log_det), derivatives[inner], rtol=1e-10)
    inv_grad = jax.jit(jax.vmap(jax.grad(lambda y: spline.spline_inverse(y, params, BOUND)[0])))(y_knots[inner])
    np.testing.assert_allclose(inv_grad, 1.0 / derivatives[inner], rtol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_gradients_next_to_knots(float64, seed):
    """A few ulps either side of each knot the derivative is still d_k, from both directions.

    Rounding can put the inverse's root just outside [0, 1] there; a clamp that cuts the
    gradient would then return 0 instead of 1 / d_k.
    """
    params = _random_params(seed, 8, scale=2.0, dtype=jnp.float64)
    x_knots, y_knots, derivatives = jitted_knots(params, BOUND)
    steps = np.array([-4, -2, -1, 1, 2, 4])

    def near(knots):
        inner = np.asarray(knots)[1:-1]
        return jnp.asarray(inner[:, None] + steps[None, :] * np.spacing(inner)[:, None])

    expected = np.repeat(np.asarray(derivatives)[1:-1, None], steps.size, axis=1)
    np.testing.assert_allclose(_value_grad(spline.spline_forward)(near(x_knots), params), expected, rtol=1e-6)
    np.testing.assert_allclose(_value_grad(spline.spline_inverse)(near(y_knots), params), 1.0 / expected, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monotone_continuous_and_identity_outside(float64, seed):
    params = _random_params(seed, 8, scale=2.0, dtype=jnp.float64)
    x = jnp.linspace(-2 * BOUND, 2 * BOUND, 20001)
    y, log_det = batched_forward(x, params, BOUND)
    assert np.all(np.diff(np.asarray(y)) > 0), "spline is not strictly increasing"
    # Continuity everywhere, edges included: steps are bounded by the largest slope.
    max_slope = float(jnp.exp(jnp.max(log_det)))
    assert np.max(np.diff(np.asarray(y))) <= 1.05 * max_slope * float(x[1] - x[0])
    outside = np.abs(np.asarray(x)) >= BOUND
    np.testing.assert_array_equal(np.asarray(y)[outside], np.asarray(x)[outside])
    np.testing.assert_array_equal(np.asarray(log_det)[outside], 0.0)
    assert np.all(np.abs(np.asarray(y)[~outside]) < BOUND)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_no_nan_values_or_gradients_at_and_beyond_bound(dtype, direction):
    with jax.enable_x64(dtype == jnp.float64):
        fn = spline.spline_forward if direction == "forward" else spline.spline_inverse
        params = _random_params(3, 8, scale=3.0, dtype=dtype)
        values = _edge_inputs(BOUND, dtype)
        out, log_det = _batched(fn)(values, params, BOUND)
        assert out.dtype == dtype and log_det.dtype == dtype
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(log_det))
        outside = np.abs(np.asarray(values)) >= BOUND
        np.testing.assert_array_equal(np.asarray(out)[outside], np.asarray(values)[outside])

        def scalar_loss(v, p):
            o, ld = fn(v, p, BOUND)
            return o + ld

        grad_v, grad_p = jax.jit(jax.vmap(jax.grad(scalar_loss, argnums=(0, 1)), in_axes=(0, None)))(values, params)
        assert np.all(np.isfinite(grad_v)) and np.all(np.isfinite(grad_p))
        np.testing.assert_array_equal(np.asarray(grad_v)[outside], 1.0)
        np.testing.assert_array_equal(np.asarray(grad_p)[outside], 0.0)


def test_extreme_raw_params_stay_finite_and_invertible(float64):
    """Huge raw values saturate at the minimum bin width/height/derivative, never NaN."""
    num_bins = 6
    params = jnp.concatenate(
        [jnp.array([60.0, -60.0, 0.0, 60.0, -60.0, 0.0]), jnp.array([-60.0, 60.0, 0.0, 0.0, 60.0, -60.0]),
         jnp.array([-80.0, 80.0, -80.0, 0.0, 80.0, -80.0, 80.0])]
    )
    assert params.shape == (spline.num_spline_params(num_bins),)
    x_knots, y_knots, derivatives = jitted_knots(params, BOUND)
    assert np.all(np.diff(np.asarray(x_knots)) >= 2 * BOUND * spline.MIN_BIN_WIDTH * (1 - 1e-9))
    assert np.all(np.diff(np.asarray(y_knots)) >= 2 * BOUND * spline.MIN_BIN_HEIGHT * (1 - 1e-9))
    assert np.all(np.asarray(derivatives) >= spline.MIN_DERIVATIVE)
    x = jnp.concatenate([jnp.linspace(-BOUND, BOUND, 401), x_knots])
    y, log_det = batched_forward(x, params, BOUND)
    x_back, inv_log_det = batched_inverse(y, params, BOUND)
    assert np.all(np.isfinite(log_det)) and np.all(np.isfinite(inv_log_det))
    np.testing.assert_allclose(x_back, x, atol=1e-8)
    np.testing.assert_allclose(inv_log_det, -log_det, atol=1e-6)


@pytest.mark.parametrize("size", [0, 1, 3, 5, 9, 26])
def test_wrong_param_size_raises(size):
    with pytest.raises(ValueError, match="3\\*num_bins\\+1"):
        spline.spline_forward(jnp.float32(0.0), jnp.zeros((size,), jnp.float32), BOUND)
