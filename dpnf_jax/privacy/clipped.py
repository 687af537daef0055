"""Sum of clipped per-example gradients, by the reference or the analytic path."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dpnf_jax.flows.model import ConditionalSplineFlow, FlowConfig, Params
from dpnf_jax.privacy import fastgrad, pergrad
from dpnf_jax.privacy.clipping import (
    Clipper,
    FlatClipping,
    StochasticSparsification,
    atom_mask,
    clip_factors,
)
from dpnf_jax.privacy.units import UnitLayout

METHODS = ("vmap", "fast", "fast_reweight")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClippedGradSum:
    """Result of :func:`clipped_grad_sum`.

    Attributes:
      grad_sum: pytree like the parameters, sum of clipped per-example gradients of the NLL.
      norms: per-example gradient norms before clipping, [B] (flat) or [B, U] (per unit),
        over the coordinates kept this step.
      nll: [B] per-example negative log-likelihood.
      atoms_kept: [A] the step's atom mask (all ones unless sparsified).
    """

    grad_sum: Params
    norms: jax.Array
    nll: jax.Array
    atoms_kept: jax.Array


@functools.lru_cache(maxsize=64)
def unit_layout(config: FlowConfig) -> UnitLayout:
    """The (cached) atom layout of a flow architecture."""
    return UnitLayout(config)


def check_method(method: str, clipper: Clipper) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown gradient method {method!r}; choose one of {METHODS}")
    if method == "fast_reweight":
        base = clipper.base if isinstance(clipper, StochasticSparsification) else clipper
        if not isinstance(base, FlatClipping):
            raise ValueError(
                "method 'fast_reweight' reweights whole examples, so it supports flat clipping only; "
                "use method='fast' for per-unit clipping"
            )


def clipped_grad_sum_pure(
    config: FlowConfig,
    params: Params,
    x: jax.Array,
    clipper: Clipper,
    method: str = "fast",
    mask: jax.Array | None = None,
    key: jax.Array | None = None,
) -> ClippedGradSum:
    """Pure-function form of :func:`clipped_grad_sum` (jit with config, clipper, method static)."""
    check_method(method, clipper)
    layout = unit_layout(config)
    row_mask = jnp.ones((x.shape[0],), x.dtype) if mask is None else mask.astype(x.dtype)
    kept = atom_mask(clipper, layout, key).astype(x.dtype)
    if method == "vmap":
        grad_sum, norms, nll = pergrad.clipped_sum(config, params, x, row_mask, clipper, layout, kept)
        return ClippedGradSum(grad_sum, norms, nll, kept)
    nll, records, cotangents = fastgrad.tapped_backward(config, params, x)
    atom_sq = fastgrad.atom_sq_norms(config, params, records, cotangents, layout)
    factors, norms = clip_factors(clipper, layout, atom_sq, kept)
    factors = factors * row_mask[:, None]
    if method == "fast":
        grad_sum = fastgrad.weighted_grad_sum(config, params, records, cotangents, factors, layout)
    else:
        # Flat clipping: every kept atom of example i shares the factor c_i.
        example_factors = jnp.max(factors, axis=1)
        grad_sum = fastgrad.reweighted_grad_sum(config, params, x, example_factors)
        grad_sum = jax.tree.map(lambda g, m: g * m, grad_sum, layout.expand(kept, params))
    return ClippedGradSum(grad_sum, norms, nll, kept)


def clipped_grad_sum(
    flow: ConditionalSplineFlow | tuple[FlowConfig, Params],
    x: jax.Array,
    clipper: Clipper,
    method: str = "fast",
    mask: jax.Array | None = None,
    key: jax.Array | None = None,
) -> ClippedGradSum:
    """Sum over the batch of per-example gradients of the NLL, each clipped.

    Args:
      flow: a :class:`ConditionalSplineFlow` or its ``(config, params)``.
      x: [B, d] encoded examples.
      clipper: clipping strategy (flat, per-unit, sparsified).
      method: "vmap" (reference), "fast" (analytic norms, einsum sums) or
        "fast_reweight" (analytic norms, second backward pass; flat clipping only).
      mask: optional [B] 0/1 row mask; rows with 0 contribute exactly nothing.
      key: the step key, needed by stochastic sparsification.

    Returns:
      A :class:`ClippedGradSum`.
    """
    config, params = flow.pure() if isinstance(flow, ConditionalSplineFlow) else flow
    return _jitted(config, params, x, clipper, method, mask, key)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _jitted(config, params, x, clipper, method, mask, key):
    return clipped_grad_sum_pure(config, params, x, clipper, method, mask, key)
