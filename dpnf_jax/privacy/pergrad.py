"""Reference path: true per-example gradients from ``jax.vmap(jax.grad(...))``.

Exact and simple, with memory ``B x P``. Every fast path is tested against this one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpnf_jax.flows import model
from dpnf_jax.flows.model import FlowConfig, Params
from dpnf_jax.privacy.clipping import Clipper, clip_factors
from dpnf_jax.privacy.units import UnitLayout


def per_example_nll(config: FlowConfig, params: Params, x: jax.Array) -> jax.Array:
    """Negative log-likelihood of one example x [d]."""
    return -model.log_prob(config, params, x)


def per_example_grads(config: FlowConfig, params: Params, x: jax.Array) -> tuple[jax.Array, Params]:
    """(nll [B], per-example gradient pytree with leading axis B) for x [B, d]."""
    value_and_grad = jax.value_and_grad(per_example_nll, argnums=1)
    return jax.vmap(value_and_grad, in_axes=(None, None, 0))(config, params, x)


def clipped_sum(
    config: FlowConfig,
    params: Params,
    x: jax.Array,
    row_mask: jax.Array,
    clipper: Clipper,
    layout: UnitLayout,
    atoms_kept: jax.Array,
) -> tuple[Params, jax.Array, jax.Array]:
    """Sum of clipped per-example gradients by materialising them.

    Args:
      config, params: the flow.
      x: [B, d] examples.
      row_mask: [B] 1 for real rows, 0 for padding (padding contributes nothing).
      clipper, layout, atoms_kept: the clipping strategy, the flow's atoms, the step's atom mask.

    Returns:
      (grad_sum pytree, norms [B] or [B, U], nll [B]).
    """
    nll, grads = per_example_grads(config, params, x)
    atom_sq = jax.vmap(layout.atom_sq_norms)(grads)
    factors, norms = clip_factors(clipper, layout, atom_sq, atoms_kept)
    factors = factors * row_mask[:, None].astype(factors.dtype)
    coordinate_factors = jax.vmap(layout.expand, in_axes=(0, None))(factors, params)
    # where, not a product: rows with factor 0 (padding, overflowed gradients) add exactly 0.
    grad_sum = jax.tree.map(lambda g, f: jnp.sum(jnp.where(f == 0, 0.0, g * f), axis=0), grads, coordinate_factors)
    return grad_sum, norms, nll
