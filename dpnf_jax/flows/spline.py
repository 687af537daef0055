"""Rational-quadratic spline maths (Durkan et al., 2019) on one coordinate.

Pure JAX functions, no Flax. The spline is monotone on ``[-bound, bound]`` with
``num_bins`` bins and is the identity outside (linear tails of slope one), so the
whole real line is covered and nothing overflows for far-away inputs.

Raw parameters per coordinate: ``3 * num_bins + 1`` numbers, ``num_bins`` unnormalised
bin widths, ``num_bins`` unnormalised bin heights and ``num_bins + 1`` unnormalised knot
derivatives. All-zero raw parameters give the identity: equal bins and unit
derivatives.

Numerics follow distrax's bijector: minimum bin width/height/derivative, a masked bin
search, the numerically stable root ``2c / (-b - sqrt(b^2 - 4ac))`` in the inverse, and
``jnp.where`` on *safe* inputs so that neither values nor gradients are NaN at or beyond
the interval edges.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def num_spline_params(num_bins: int) -> int:
    """Number of raw parameters per transformed coordinate."""
    return 3 * num_bins + 1


def _normalize_bins(raw: jax.Array, bound: float, min_size: float) -> tuple[jax.Array, jax.Array]:
    """Raw bin sizes [num_bins] -> (knot positions [num_bins + 1], bin sizes [num_bins])."""
    num_bins = raw.shape[-1]
    sizes = jax.nn.softmax(raw, axis=-1)
    sizes = min_size + (1.0 - min_size * num_bins) * sizes
    knots = jnp.cumsum(sizes, axis=-1)
    knots = jnp.concatenate([jnp.zeros_like(knots[..., :1]), knots], axis=-1)
    knots = 2.0 * bound * knots - bound
    # Pin the end knots exactly so the spline meets the identity tails continuously.
    knots = knots.at[..., 0].set(-bound).at[..., -1].set(bound)
    return knots, knots[..., 1:] - knots[..., :-1]


def _normalize_derivatives(raw: jax.Array) -> jax.Array:
    """Raw knot derivatives -> positive derivatives; zero maps to exactly one."""
    offset = math.log(math.expm1(1.0 - MIN_DERIVATIVE))
    return jax.nn.softplus(raw + offset) + MIN_DERIVATIVE


def spline_knots(params: jax.Array, bound: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw parameters [3K+1] -> (x knots [K+1], y knots [K+1], derivatives [K+1])."""
    num_bins = (params.shape[-1] - 1) // 3
    if num_bins < 1 or params.shape[-1] != 3 * num_bins + 1:
        raise ValueError(f"spline parameters must have size 3*num_bins+1, got {params.shape[-1]}")
    x_knots, _ = _normalize_bins(params[..., :num_bins], bound, MIN_BIN_WIDTH)
    y_knots, _ = _normalize_bins(params[..., num_bins : 2 * num_bins], bound, MIN_BIN_HEIGHT)
    derivatives = _normalize_derivatives(params[..., 2 * num_bins :])
    return x_knots, y_knots, derivatives


def _bin_index(knots: jax.Array, value: jax.Array) -> jax.Array:
    """Masked bin search: index k with knots[k] <= value < knots[k+1], clamped to [0, K-1]."""
    num_bins = knots.shape[-1] - 1
    below = (value >= knots[..., 1:-1]).astype(jnp.int32)
    return jnp.clip(jnp.sum(below, axis=-1), 0, num_bins - 1)


def _clamp_unit(xi: jax.Array) -> jax.Array:
    """Clamp to [0, 1] in value only; the gradient is that of the unclamped ``xi``.

    ``xi`` leaves [0, 1] only by rounding, at a knot (the bin search and the knots of a
    fused XLA program may disagree in the last bit). ``jnp.clip`` would then zero the
    gradient (and halve it at exact ties), so d/dx and d/dparams would be wrong at the
    knots; as the spline is C1 there, the neighbouring bin's gradient is the right one.
    """
    return xi + jax.lax.stop_gradient(jnp.clip(xi, 0.0, 1.0) - xi)


def _gather_bin(x_knots, y_knots, derivatives, k):
    x_k, x_k1 = x_knots[k], x_knots[k + 1]
    y_k, y_k1 = y_knots[k], y_knots[k + 1]
    d_k, d_k1 = derivatives[k], derivatives[k + 1]
    return x_k, x_k1 - x_k, y_k, y_k1 - y_k, d_k, d_k1


def spline_forward(x: jax.Array, params: jax.Array, bound: float) -> tuple[jax.Array, jax.Array]:
    """Forward spline on a scalar.

    Args:
      x: [] input value.
      params: [3K+1] raw spline parameters.
      bound: half-width B of the spline interval [-B, B].

    Returns:
      (y, log|dy/dx|), both scalars.
    """
    x_knots, y_knots, derivatives = spline_knots(params, bound)
    inside = (x > -bound) & (x < bound)
    x_safe = jnp.where(inside, x, 0.0)
    k = _bin_index(x_knots, x_safe)
    x_k, w, y_k, h, d_k, d_k1 = _gather_bin(x_knots, y_knots, derivatives, k)
    slope = h / w
    xi = _clamp_unit((x_safe - x_k) / w)
    xi_1m = xi * (1.0 - xi)
    denominator = slope + (d_k1 + d_k - 2.0 * slope) * xi_1m
    y = y_k + h * (slope * xi**2 + d_k * xi_1m) / denominator
    dy_dx = slope**2 * (d_k1 * xi**2 + 2.0 * slope * xi_1m + d_k * (1.0 - xi) ** 2) / denominator**2
    log_det = jnp.log(dy_dx)
    return jnp.where(inside, y, x), jnp.where(inside, log_det, 0.0)


def spline_inverse(y: jax.Array, params: jax.Array, bound: float) -> tuple[jax.Array, jax.Array]:
    """Inverse spline on a scalar.

    Args:
      y: [] output value.
      params: [3K+1] raw spline parameters.
      bound: half-width B of the spline interval.

    Returns:
      (x, log|dx/dy|), both scalars.
    """
    x_knots, y_knots, derivatives = spline_knots(params, bound)
    inside = (y > -bound) & (y < bound)
    y_safe = jnp.where(inside, y, 0.0)
    k = _bin_index(y_knots, y_safe)
    x_k, w, y_k, h, d_k, d_k1 = _gather_bin(x_knots, y_knots, derivatives, k)
    slope = h / w
    dy = y_safe - y_k
    d_sum = d_k1 + d_k - 2.0 * slope
    a = h * (slope - d_k) + dy * d_sum
    b = h * d_k - dy * d_sum
    c = -slope * dy
    discriminant = jnp.maximum(b**2 - 4.0 * a * c, 0.0)
    # The root written as 2c / (-b - sqrt(.)) avoids the cancellation of the textbook form.
    xi = _clamp_unit(2.0 * c / (-b - jnp.sqrt(discriminant)))
    x = x_k + xi * w
    xi_1m = xi * (1.0 - xi)
    denominator = slope + d_sum * xi_1m
    dy_dx = slope**2 * (d_k1 * xi**2 + 2.0 * slope * xi_1m + d_k * (1.0 - xi) ** 2) / denominator**2
    return jnp.where(inside, x, y), jnp.where(inside, -jnp.log(dy_dx), 0.0)
