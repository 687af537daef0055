"""Clipping strategies and their sensitivities (design notes section 5).

A strategy is a frozen dataclass of privacy-relevant settings. It owns its sensitivity:
the L2 norm bound of one example's contribution to the clipped sum, which is what the
Gaussian noise is scaled by. Every strategy here has sensitivity exactly ``l2_clip``:

* :class:`FlatClipping`: ``c_i = min(1, C / ||g_i||)``.
* :class:`PerUnitClipping`: units ``u`` (layers or output neurons) clipped separately to
  ``C_u`` with ``sum_u C_u^2 = C^2`` (equal or size-proportional allocation), so
  ``sqrt(sum_u C_u^2) = C``.
* :class:`StochasticSparsification`: each step selects a data-independent random subset
  of units from the step's key; only they are clipped, noised and updated. The clip
  budget ``C`` is re-allocated among the selected units, so the sensitivity stays ``C``
  while the noise energy lands on the selected coordinates only.

:func:`clip_factors` turns per-example, per-atom squared gradient norms into per-atom
clip factors; the vmap and the analytic path both go through it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Union

import jax
import jax.numpy as jnp

from dpnf_jax.privacy.units import UnitLayout

ALLOCATIONS = ("equal", "proportional")


def _check_clip(name: str, l2_clip: float) -> None:
    if not (isinstance(l2_clip, (int, float)) and math.isfinite(l2_clip) and l2_clip > 0):
        raise ValueError(f"{name}: l2_clip must be a positive finite number, got {l2_clip!r}")


@dataclasses.dataclass(frozen=True)
class FlatClipping:
    """Clip each example's whole gradient to L2 norm ``l2_clip``."""

    l2_clip: float = 1.0

    def __post_init__(self):
        _check_clip("FlatClipping", self.l2_clip)

    @property
    def granularity(self) -> str:
        return "flat"

    def sensitivity(self) -> float:
        """L2 sensitivity of the clipped sum under adding or removing one row."""
        return float(self.l2_clip)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "flat", "l2_clip": self.l2_clip}


@dataclasses.dataclass(frozen=True)
class PerUnitClipping:
    """Clip each unit (layer or output neuron) of each example's gradient separately.

    Attributes:
      l2_clip: total bound C; unit bounds satisfy ``sum_u C_u^2 = C^2``.
      granularity: "layer" (one unit per layer per block that owns it) or "neuron".
      allocation: "equal" (``C_u = C / sqrt(U)``) or "proportional" to the unit's
        parameter count (``C_u = C sqrt(n_u / n)``).
    """

    l2_clip: float = 1.0
    granularity: str = "layer"
    allocation: str = "equal"

    def __post_init__(self):
        _check_clip("PerUnitClipping", self.l2_clip)
        if self.granularity not in ("layer", "neuron"):
            raise ValueError(f"PerUnitClipping: granularity must be 'layer' or 'neuron', got {self.granularity!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"PerUnitClipping: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")

    def sensitivity(self) -> float:
        return float(self.l2_clip)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_unit", "l2_clip": self.l2_clip, "granularity": self.granularity, "allocation": self.allocation}


@dataclasses.dataclass(frozen=True)
class StochasticSparsification:
    """Each step keeps a random, data-independent fraction of units.

    Attributes:
      base: the clipping applied to the kept coordinates.
      keep_fraction: fraction p of units kept per step (exactly ``max(1, round(p U))``).
      granularity: units that are kept or dropped when ``base`` is flat ("layer" or
        "neuron"); with a per-unit base its own units are used.
    """

    base: Union[FlatClipping, PerUnitClipping] = dataclasses.field(default_factory=FlatClipping)
    keep_fraction: float = 0.5
    granularity: str = "neuron"

    def __post_init__(self):
        if not isinstance(self.base, (FlatClipping, PerUnitClipping)):
            raise TypeError(f"StochasticSparsification: base must be FlatClipping or PerUnitClipping, got {self.base!r}")
        if not (0.0 < self.keep_fraction <= 1.0):
            raise ValueError(f"StochasticSparsification: keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
        if self.granularity not in ("layer", "neuron"):
            raise ValueError(
                f"StochasticSparsification: granularity must be 'layer' or 'neuron', got {self.granularity!r}"
            )

    @property
    def mask_granularity(self) -> str:
        return self.base.granularity if isinstance(self.base, PerUnitClipping) else self.granularity

    @property
    def l2_clip(self) -> float:
        return self.base.l2_clip

    def sensitivity(self) -> float:
        return self.base.sensitivity()

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "sparsified",
            "base": self.base.to_dict(),
            "keep_fraction": self.keep_fraction,
            "granularity": self.mask_granularity,
        }


Clipper = Union[FlatClipping, PerUnitClipping, StochasticSparsification]


def clipper_from_dict(d: dict[str, Any]) -> Clipper:
    """Inverse of ``clipper.to_dict()``."""
    kind = d.get("type")
    if kind == "flat":
        return FlatClipping(d["l2_clip"])
    if kind == "per_unit":
        return PerUnitClipping(d["l2_clip"], d["granularity"], d["allocation"])
    if kind == "sparsified":
        return StochasticSparsification(clipper_from_dict(d["base"]), d["keep_fraction"], d["granularity"])
    raise ValueError(f"unknown clipper type {kind!r}")


def _base(clipper: Clipper) -> Union[FlatClipping, PerUnitClipping]:
    return clipper.base if isinstance(clipper, StochasticSparsification) else clipper


def atom_mask(clipper: Clipper, layout: UnitLayout, key: jax.Array | None) -> jax.Array:
    """Which atoms take part this step: [A] of 0/1, all ones unless sparsified.

    The selection depends on ``key`` only (the step's key), never on data.
    """
    if not isinstance(clipper, StochasticSparsification):
        return jnp.ones((layout.num_atoms,), jnp.float32)
    if key is None:
        raise ValueError("StochasticSparsification needs the step's key to draw its unit mask")
    ids, num_units = layout.unit_of_atom(clipper.mask_granularity)
    num_kept = max(1, round(clipper.keep_fraction * num_units))
    kept = jax.random.permutation(key, num_units)[:num_kept]
    unit_mask = jnp.zeros((num_units,), jnp.float32).at[kept].set(1.0)
    return unit_mask[jnp.asarray(ids)]


def unit_thresholds(clipper: Clipper, layout: UnitLayout, atoms_kept: jax.Array) -> jax.Array:
    """Per-unit bounds C_u [U] with ``sum over kept units of C_u^2 = C^2``; 0 for dropped units."""
    base = _base(clipper)
    ids, num_units = layout.unit_of_atom(base.granularity)
    kept = jax.ops.segment_max(atoms_kept, jnp.asarray(ids), num_segments=num_units)
    # In the norms' dtype: a float32 bound in a float64 run would not be exactly C.
    if isinstance(base, FlatClipping):
        return jnp.full((1,), base.l2_clip, kept.dtype) * kept
    if base.allocation == "equal":
        weights = kept
    else:
        weights = kept * jnp.asarray(layout.unit_sizes(base.granularity), kept.dtype)
    return base.l2_clip * jnp.sqrt(weights / jnp.sum(weights))


def clip_factors(
    clipper: Clipper, layout: UnitLayout, atom_sq_norms: jax.Array, atoms_kept: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-example clip factors per atom from per-example squared norms per atom.

    Args:
      clipper: the strategy.
      layout: the flow's atoms and units.
      atom_sq_norms: [B, A] squared per-example gradient norms of every atom.
      atoms_kept: [A] 0/1 atom mask from :func:`atom_mask`.

    Returns:
      (factors [B, A], norms) with norms [B] for flat clipping and [B, U] per unit:
      each example's gradient norm over the kept coordinates of each clipping unit.
    """
    base = _base(clipper)
    ids, num_units = layout.unit_of_atom(base.granularity)
    ids = jnp.asarray(ids)
    kept_sq = atom_sq_norms * atoms_kept
    if isinstance(base, FlatClipping):
        unit_sq = jnp.sum(kept_sq, axis=1, keepdims=True)  # one unit: no scatter or gather
    else:
        unit_sq = jax.ops.segment_sum(kept_sq.T, ids, num_segments=num_units).T
    norms = jnp.sqrt(unit_sq)
    bounds = unit_thresholds(clipper, layout, atoms_kept)
    factors = jnp.where(bounds > 0, bounds / jnp.maximum(norms, jnp.where(bounds > 0, bounds, 1.0)), 0.0)
    per_atom = (factors if isinstance(base, FlatClipping) else factors[:, ids]) * atoms_kept
    # An example whose gradient overflowed (inf/NaN norm) contributes nothing at all: a
    # zero contribution respects every bound, while 0 * inf would poison the whole sum.
    finite = jnp.all(jnp.isfinite(atom_sq_norms), axis=1, keepdims=True)
    per_atom = jnp.where(finite, per_atom, 0.0)
    return per_atom, (norms[:, 0] if isinstance(base, FlatClipping) else norms)
