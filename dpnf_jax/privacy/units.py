"""Clipping units of the flow's parameters.

Every parameter coordinate belongs to exactly one *atom*: an output neuron of one layer
(a conditioner unit j with its kernel column, bias and stage-embedding column; an LU
row j of block t with its lower row, upper row and log-diagonal entry). Atoms are the
finest clipping units; coarser partitions (whole layers, one unit for everything) are
unions of atoms. Both gradient paths reduce to per-example squared norms per atom, so
one clipping routine serves both and they can be compared atom by atom.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpnf_jax.flows.model import FlowConfig, layer_name

GRANULARITIES = ("flat", "layer", "neuron")


@dataclasses.dataclass(frozen=True)
class AtomGroup:
    """Atoms of one layer.

    Attributes:
      path: location of the layer in the parameter pytree, e.g. ("conditioner", "layer_0").
      atom_shape: shape of this group's atom array, e.g. (out,) or (K, out) or (K, d).
      leaves: leaf name -> axes of the leaf that an atom spans (summed over to reduce).
      atom_size: number of effective parameters per atom.
      layer_axes: leading atom axes that index distinct layers (the block axis when
        each block owns the layer); ``layer`` granularity makes one unit per index.
    """

    path: tuple[str, ...]
    atom_shape: tuple[int, ...]
    leaves: dict[str, tuple[int, ...]]
    atom_size: np.ndarray
    layer_axes: int

    @property
    def num_atoms(self) -> int:
        return int(np.prod(self.atom_shape))


class UnitLayout:
    """The atoms of a flow and the unit partitions built from them."""

    def __init__(self, config: FlowConfig):
        self.config = config
        K, d, widths = config.num_blocks, config.dim, config.layer_widths
        groups = []
        for i in range(config.num_layers):
            fan_in, fan_out = widths[i], widths[i + 1]
            if config.shared:
                leaves = {"kernel": (0,), "bias": ()}
                size = fan_in + 1
                if i == 0:
                    leaves["stage_embedding"] = (0,)
                    size += K
                groups.append(
                    AtomGroup(("conditioner", layer_name(i)), (fan_out,), leaves, np.full((fan_out,), size), 0)
                )
            else:
                groups.append(
                    AtomGroup(
                        ("conditioner", layer_name(i)),
                        (K, fan_out),
                        {"kernel": (1,), "bias": ()},
                        np.full((K, fan_out), fan_in + 1),
                        1,
                    )
                )
        # LU row j of block t: j strict-lower entries, d-1-j strict-upper entries, one log-diagonal.
        groups.append(
            AtomGroup(("lu",), (K, d), {"lower": (2,), "upper": (2,), "log_diag": ()}, np.full((K, d), d), 1)
        )
        self.groups: tuple[AtomGroup, ...] = tuple(groups)
        self.offsets = np.cumsum([0] + [g.num_atoms for g in self.groups])
        self.num_atoms = int(self.offsets[-1])
        self.atom_sizes = np.concatenate([g.atom_size.ravel() for g in self.groups])

    @functools.lru_cache(maxsize=None)
    def unit_of_atom(self, granularity: str) -> tuple[np.ndarray, int]:
        """(unit index of every atom [A], number of units U) for a granularity."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
        if granularity == "flat":
            return np.zeros(self.num_atoms, np.int32), 1
        if granularity == "neuron":
            return np.arange(self.num_atoms, dtype=np.int32), self.num_atoms
        ids, next_unit = [], 0
        for group in self.groups:
            layer_shape = group.atom_shape[: group.layer_axes]
            num_layers = int(np.prod(layer_shape))
            per_layer = group.num_atoms // num_layers
            ids.append(next_unit + np.repeat(np.arange(num_layers), per_layer))
            next_unit += num_layers
        return np.concatenate(ids).astype(np.int32), next_unit

    def unit_sizes(self, granularity: str) -> np.ndarray:
        """Effective parameter count of every unit [U]."""
        ids, num_units = self.unit_of_atom(granularity)
        return np.bincount(ids, weights=self.atom_sizes, minlength=num_units)

    def split(self, atoms: jax.Array) -> list[jax.Array]:
        """[..., A] -> per group [..., *atom_shape]."""
        lead = atoms.shape[:-1]
        return [
            atoms[..., self.offsets[i] : self.offsets[i + 1]].reshape(*lead, *g.atom_shape)
            for i, g in enumerate(self.groups)
        ]

    def concat(self, per_group: list[jax.Array]) -> jax.Array:
        """Inverse of :meth:`split` for arrays with one leading axis: -> [B, A]."""
        return jnp.concatenate([a.reshape(a.shape[0], -1) for a in per_group], axis=-1)

    def atom_sq_norms(self, grads) -> jax.Array:
        """Squared norms per atom of ONE example's gradient pytree -> [A]."""
        out = []
        for group in self.groups:
            sub = _get(grads, group.path)
            total = 0.0
            for leaf, axes in group.leaves.items():
                total = total + jnp.sum(jnp.square(sub[leaf]), axis=axes)
            out.append(jnp.reshape(total, (-1,)))
        return jnp.concatenate(out)

    def expand(self, atoms: jax.Array, like):
        """Broadcast per-atom values [A] to a pytree shaped like the parameters ``like``."""
        result = jax.tree.map(lambda leaf: None, like)
        for group, values in zip(self.groups, self.split(atoms)):
            sub_like = _get(like, group.path)
            sub_out = {}
            for leaf, axes in group.leaves.items():
                v = values
                for axis in axes:
                    v = jnp.expand_dims(v, axis)
                sub_out[leaf] = jnp.broadcast_to(v, sub_like[leaf].shape).astype(sub_like[leaf].dtype)
            result = _set(result, group.path, sub_out)
        return result


def structural_mask(params):
    """1 where a coordinate is used by the flow, 0 for the unused LU triangles."""
    mask = jax.tree.map(jnp.ones_like, params)
    lu = dict(mask["lu"])
    lu["lower"] = jnp.tril(lu["lower"], -1)
    lu["upper"] = jnp.triu(lu["upper"], 1)
    return {**mask, "lu": lu}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    if not path:
        return value
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}
