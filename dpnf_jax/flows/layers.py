"""Flow layers: the LU-parameterised invertible linear map and the spline coupling.

Pure per-example functions do the maths; thin ``flax.nnx`` modules wrap them for users who
want a single bijector. The shared-conditioner flow in ``model.py`` calls the pure
functions directly on stacked per-block parameters.

Every parameterised affine map can take an additive ``tap`` on its output (zeros in normal
use). Differentiating the loss with respect to a tap gives that layer's output cotangent;
together with the recorded layer input this is all the analytic per-example gradient
path needs (design notes section 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpnf_jax.flows import spline

# --------------------------------------------------------------------------------------
# LU linear layer: z = P L U x, L unit lower-triangular, U upper with diagonal exp(s).
# --------------------------------------------------------------------------------------


def lu_init(dim: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Identity initialisation: ``lower = upper = 0`` and ``log_diag = 0``."""
    return {
        "lower": jnp.zeros((dim, dim), dtype),
        "upper": jnp.zeros((dim, dim), dtype),
        "log_diag": jnp.zeros((dim,), dtype),
    }


def lu_factors(params: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(L, U) from raw parameters; only the strict triangles of lower/upper are used."""
    dim = params["log_diag"].shape[-1]
    eye = jnp.eye(dim, dtype=params["log_diag"].dtype)
    lower = jnp.tril(params["lower"], -1) + eye
    upper = jnp.triu(params["upper"], 1) + jnp.diag(jnp.exp(params["log_diag"]))
    return lower, upper


def lu_forward(
    params: dict[str, jax.Array], perm: np.ndarray, x: jax.Array, tap: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """z = P (L U x + tap) for one example.

    Args:
      params: ``lower`` [d, d], ``upper`` [d, d], ``log_diag`` [d].
      perm: [d] fixed permutation (public, data-independent).
      x: [d] input.
      tap: optional [d] additive zero whose gradient is the cotangent of ``L U x``.

    Returns:
      (z [d], log|det| scalar, record) where record holds the layer input ``x`` and
      ``u = U x`` for the analytic per-example gradient path.
    """
    lower, upper = lu_factors(params)
    u = upper @ x
    y = lower @ u
    if tap is not None:
        y = y + tap
    return y[perm], jnp.sum(params["log_diag"]), {"x": x, "u": u}


def lu_inverse(params: dict[str, jax.Array], perm: np.ndarray, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x = U^-1 L^-1 P^T z for one example; returns (x [d], log|det dx/dz|)."""
    lower, upper = lu_factors(params)
    y = jnp.zeros_like(z).at[perm].set(z)
    u = jax.scipy.linalg.solve_triangular(lower, y, lower=True, unit_diagonal=True)
    x = jax.scipy.linalg.solve_triangular(upper, u, lower=False)
    return x, -jnp.sum(params["log_diag"])


# --------------------------------------------------------------------------------------
# Dense layers and the conditioner MLP.
# --------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense_init(key: jax.Array, fan_in: int, fan_out: int, zero: bool = False, dtype=jnp.float32):
    """LeCun-normal kernel (or zeros) and zero bias; never looks at data."""
    if zero:
        kernel = jnp.zeros((fan_in, fan_out), dtype)
    else:
        kernel = jax.random.normal(key, (fan_in, fan_out), dtype) / math.sqrt(max(fan_in, 1))
    return {"kernel": kernel, "bias": jnp.zeros((fan_out,), dtype)}


def mlp_apply(
    layers: list[dict[str, jax.Array]],
    activation: str,
    a: jax.Array,
    first_offset: jax.Array | None = None,
    taps: list[jax.Array] | None = None,
) -> tuple[jax.Array, list[jax.Array]]:
    """MLP on one example: ``z_l = a_l W_l + b_l (+ offset on layer 0) (+ tap_l)``.

    Args:
      layers: per layer ``kernel`` [in, out] and ``bias`` [out].
      activation: name of the hidden activation (none after the last layer).
      a: [in] input.
      first_offset: optional [out_0] added to the first pre-activation (the stage
        embedding row of the shared conditioner).
      taps: optional list of [out_l] additive zeros, one per layer.

    Returns:
      (output [out_last], list of layer inputs a_l).
    """
    act = get_activation(activation)
    inputs = []
    for index, layer in enumerate(layers):
        inputs.append(a)
        z = a @ layer["kernel"] + layer["bias"]
        if index == 0 and first_offset is not None:
            z = z + first_offset
        if taps is not None:
            z = z + taps[index]
        a = act(z) if index < len(layers) - 1 else z
    return a, inputs


# --------------------------------------------------------------------------------------
# Spline coupling: y_a = x_a, y_b = spline(x_b; theta(x_a)).
# --------------------------------------------------------------------------------------


def split_sizes(dim: int) -> tuple[int, int]:
    """Coupling split: the first ``dim // 2`` coordinates condition the rest."""
    return dim // 2, dim - dim // 2


def coupling_forward(
    theta: jax.Array, x: jax.Array, bound: float
) -> tuple[jax.Array, jax.Array]:
    """Transform ``x_b`` with splines whose raw parameters are ``theta`` [d_b * (3K+1)]."""
    d_a, d_b = split_sizes(x.shape[-1])
    theta = theta.reshape(d_b, -1)
    y_b, log_det = jax.vmap(spline.spline_forward, in_axes=(0, 0, None))(x[d_a:], theta, bound)
    return jnp.concatenate([x[:d_a], y_b]), jnp.sum(log_det)


def coupling_inverse(
    theta: jax.Array, y: jax.Array, bound: float
) -> tuple[jax.Array, jax.Array]:
    """Inverse of :func:`coupling_forward` given the same ``theta`` (a function of y_a = x_a)."""
    d_a, d_b = split_sizes(y.shape[-1])
    theta = theta.reshape(d_b, -1)
    x_b, log_det = jax.vmap(spline.spline_inverse, in_axes=(0, 0, None))(y[d_a:], theta, bound)
    return jnp.concatenate([y[:d_a], x_b]), jnp.sum(log_det)


# --------------------------------------------------------------------------------------
# Thin nnx modules (single bijectors; per example, batch with vmap).
# --------------------------------------------------------------------------------------


class LULinear(nnx.Module):
    """Invertible linear map ``z = P L U x`` initialised to the permutation ``P``."""

    def __init__(self, dim: int, *, perm: np.ndarray | None = None, dtype=jnp.float32):
        if dim < 1:
            raise ValueError(f"LULinear: dim must be >= 1, got {dim}")
        self.perm = nnx.Variable(jnp.asarray(np.arange(dim) if perm is None else perm))
        self.params = nnx.Dict({k: nnx.Param(v) for k, v in lu_init(dim, dtype).items()})

    def _params(self):
        return {k: v[...] for k, v in self.params.items()}

    def forward(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [d] -> (z [d], log|det dz/dx|)."""
        z, log_det, _ = lu_forward(self._params(), self.perm[...], x)
        return z, log_det

    def inverse(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z: [d] -> (x [d], log|det dx/dz|)."""
        return lu_inverse(self._params(), self.perm[...], z)


class SplineCoupling(nnx.Module):
    """RQ-spline coupling with its own MLP conditioner (zero-initialised output)."""

    def __init__(
        self,
        dim: int,
        *,
        hidden: tuple[int, ...] = (64,),
        num_bins: int = 8,
        bound: float = 4.0,
        activation: str = "relu",
        rngs: nnx.Rngs,
    ):
        if dim < 2:
            raise ValueError(f"SplineCoupling: dim must be >= 2, got {dim}")
        get_activation(activation)
        d_a, d_b = split_sizes(dim)
        widths = (d_a, *hidden, d_b * spline.num_spline_params(num_bins))
        keys = jax.random.split(rngs.params(), len(widths) - 1)
        self.layers = nnx.List(
            [
                nnx.Dict(
                    {
                        k: nnx.Param(v)
                        for k, v in dense_init(keys[i], widths[i], widths[i + 1], zero=i == len(widths) - 2).items()
                    }
                )
                for i in range(len(widths) - 1)
            ]
        )
        self.bound = bound
        self.activation = activation

    def _theta(self, x_a: jax.Array) -> jax.Array:
        layers = [{k: v[...] for k, v in layer.items()} for layer in self.layers]
        return mlp_apply(layers, self.activation, x_a)[0]

    def forward(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [d] -> (y [d], log|det dy/dx|)."""
        d_a, _ = split_sizes(x.shape[-1])
        return coupling_forward(self._theta(x[:d_a]), x, self.bound)

    def inverse(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """y: [d] -> (x [d], log|det dx/dy|)."""
        d_a, _ = split_sizes(y.shape[-1])
        return coupling_inverse(self._theta(y[:d_a]), y, self.bound)
