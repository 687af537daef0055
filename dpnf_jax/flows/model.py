"""The DP-HFlow model: a conditional rational-quadratic spline flow.

``K`` blocks act on the encoded vector ``x`` (data -> base direction). Block ``t`` is
``[LU linear_t, spline coupling_t]``. The coupling's spline parameters come from ONE
conditioner MLP shared by all blocks; the block it is emulating is told through a stage
code. We use a learned stage embedding ``E_t`` added to the conditioner's first
pre-activation. That is exactly a one-hot stage code concatenated to the input (the
one-hot times the first kernel selects a row), without the wasted multiplications and
without an embedding width to tune; its per-example gradient norm is cheap and exact
(``sum_t ||delta_t||^2``, design notes section 4). With ``shared=False`` each block gets
its own conditioner (the ablation, ~K times the parameters).

Everything is written for one example and batched with ``vmap``. The parameters are a
plain pytree (``init_params``) so the DP engine can treat the model as a pure function;
``ConditionalSplineFlow`` is the ``flax.nnx`` module around it (``nnx.split``/``merge``
work, and :meth:`ConditionalSplineFlow.pure` returns ``(config, params)``).

Parameter pytree::

    {"lu": {"lower": [K, d, d], "upper": [K, d, d], "log_diag": [K, d]},
     "conditioner": {"layer_0": {"kernel": [(K,) in, h0], "bias": [(K,) h0],
                                 "stage_embedding": [K, h0]   # shared only
                                 },
                     "layer_1": ..., "layer_L": {...}}}       # leading K when unshared
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpnf_jax.flows import layers, spline

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Static architecture of a :class:`ConditionalSplineFlow` (public, data-independent).

    Attributes:
      dim: encoded data width d.
      num_blocks: number of [LU, coupling] blocks K.
      hidden: conditioner hidden widths.
      num_bins: spline bins per coordinate.
      bound: splines act on [-bound, bound], identity outside.
      activation: conditioner activation name.
      shared: one conditioner for all blocks (DP-HFlow) or one per block.
      perm_seed: seed of the fixed, public permutations of the LU layers.
    """

    dim: int
    num_blocks: int = 4
    hidden: tuple[int, ...] = (256, 256)
    num_bins: int = 8
    bound: float = 4.0
    activation: str = "relu"
    shared: bool = True
    perm_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.dim < 1:
            raise ValueError(f"FlowConfig: dim must be >= 1, got {self.dim}")
        if self.num_blocks < 1:
            raise ValueError(f"FlowConfig: num_blocks must be >= 1, got {self.num_blocks}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"FlowConfig: hidden widths must be >= 1, got {self.hidden}")
        if self.num_bins < 2:
            raise ValueError(f"FlowConfig: num_bins must be >= 2, got {self.num_bins}")
        if not (self.bound > 0 and math.isfinite(self.bound)):
            raise ValueError(f"FlowConfig: bound must be positive and finite, got {self.bound}")
        layers.get_activation(self.activation)

    @property
    def layer_widths(self) -> tuple[int, ...]:
        d_a, d_b = layers.split_sizes(self.dim)
        return (d_a, *self.hidden, d_b * spline.num_spline_params(self.num_bins))

    @property
    def num_layers(self) -> int:
        return len(self.hidden) + 1

    @functools.cached_property
    def permutations(self) -> np.ndarray:
        """[K, d] fixed permutations drawn from ``perm_seed`` (never from data)."""
        rng = np.random.default_rng(self.perm_seed)
        return np.stack([rng.permutation(self.dim) for _ in range(self.num_blocks)]).astype(np.int32)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlowConfig":
        return cls(**{**d, "hidden": tuple(d["hidden"])})


def layer_name(index: int) -> str:
    return f"layer_{index}"


def init_params(config: FlowConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Initial parameters: the flow is the identity up to its fixed permutations.

    The conditioner's last layer is zero, so every spline starts at the identity; LU
    layers start at ``P``. Hidden layers are LeCun-normal. Nothing looks at data.
    """
    K, widths = config.num_blocks, config.layer_widths
    keys = jax.random.split(key, config.num_layers + 1)
    conditioner: Params = {}
    for i in range(config.num_layers):
        last = i == config.num_layers - 1
        if config.shared:
            layer = layers.dense_init(keys[i], widths[i], widths[i + 1], zero=last, dtype=dtype)
        else:
            block_keys = jax.random.split(keys[i], K)
            per_block = [layers.dense_init(k, widths[i], widths[i + 1], zero=last, dtype=dtype) for k in block_keys]
            layer = jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)
        conditioner[layer_name(i)] = layer
    if config.shared:
        # Same scale as the kernel rows a one-hot stage input would select. With no hidden
        # layer the embedding feeds the spline parameters directly, so it belongs to the
        # zero-initialised last layer (otherwise the flow does not start at the identity).
        fan_in = widths[0] + K
        conditioner[layer_name(0)]["stage_embedding"] = (
            jnp.zeros((K, widths[1]), dtype)
            if config.num_layers == 1
            else jax.random.normal(keys[-1], (K, widths[1]), dtype) / math.sqrt(fan_in)
        )
    lu = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (K, *leaf.shape)), layers.lu_init(config.dim, dtype))
    return {"lu": lu, "conditioner": conditioner}


def zero_taps(config: FlowConfig, dtype=jnp.float32) -> Params:
    """Per-example zero taps: ``lu`` [K, d] and one [K, out_l] per conditioner layer."""
    K, widths = config.num_blocks, config.layer_widths
    return {
        "lu": jnp.zeros((K, config.dim), dtype),
        "conditioner": {layer_name(i): jnp.zeros((K, widths[i + 1]), dtype) for i in range(config.num_layers)},
    }


def _conditioner_layers(config: FlowConfig, conditioner: Params) -> list[Params]:
    return [
        {"kernel": conditioner[layer_name(i)]["kernel"], "bias": conditioner[layer_name(i)]["bias"]}
        for i in range(config.num_layers)
    ]


def _per_block(config: FlowConfig, params: Params):
    """Split parameters into what scan iterates over (per block) and what it closes over."""
    conditioner = params["conditioner"]
    if config.shared:
        stage_embedding = conditioner[layer_name(0)]["stage_embedding"]
        scanned = (params["lu"], None, stage_embedding)
        shared_layers = _conditioner_layers(config, conditioner)
    else:
        scanned = (params["lu"], _conditioner_layers(config, conditioner), None)
        shared_layers = None
    return scanned, shared_layers


def forward_with_records(
    config: FlowConfig, params: Params, x: jax.Array, taps: Params | None = None
) -> tuple[jax.Array, jax.Array, Params]:
    """Data -> base for one example, optionally with output taps.

    Args:
      config: the flow architecture.
      params: parameter pytree (see module docstring).
      x: [d] encoded example.
      taps: optional per-example zero taps from :func:`zero_taps`.

    Returns:
      (z [d], log|det dz/dx| scalar, records) where records hold the inputs of every
      parameterised layer per block: ``lu`` -> ``x``, ``u`` [K, d] and ``conditioner`` ->
      ``layer_l`` [K, in_l].
    """
    (lu, block_layers, stage_embedding), shared_layers = _per_block(config, params)
    perms = jnp.asarray(config.permutations)
    d_a, _ = layers.split_sizes(config.dim)

    def block(carry, inputs):
        h, log_det = carry
        lu_t, layers_t, embedding_t, perm_t, taps_t = inputs
        lu_taps = None if taps_t is None else taps_t["lu"]
        cond_taps = None if taps_t is None else [taps_t["conditioner"][layer_name(i)] for i in range(config.num_layers)]
        h, lu_log_det, lu_record = layers.lu_forward(lu_t, perm_t, h, lu_taps)
        mlp = shared_layers if config.shared else layers_t
        theta, cond_inputs = layers.mlp_apply(mlp, config.activation, h[:d_a], embedding_t, cond_taps)
        h, spline_log_det = layers.coupling_forward(theta, h, config.bound)
        records = {"lu": lu_record, "conditioner": {layer_name(i): a for i, a in enumerate(cond_inputs)}}
        return (h, log_det + lu_log_det + spline_log_det), records

    zero = jnp.zeros((), x.dtype)
    (z, log_det), records = jax.lax.scan(block, (x, zero), (lu, block_layers, stage_embedding, perms, taps))
    return z, log_det, records


def forward(config: FlowConfig, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Data -> base for one example: (z [d], log|det dz/dx|)."""
    z, log_det, _ = forward_with_records(config, params, x)
    return z, log_det


def inverse(config: FlowConfig, params: Params, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Base -> data for one example: (x [d], log|det dx/dz|)."""
    (lu, block_layers, stage_embedding), shared_layers = _per_block(config, params)
    perms = jnp.asarray(config.permutations)
    d_a, _ = layers.split_sizes(config.dim)

    def block(carry, inputs):
        h, log_det = carry
        lu_t, layers_t, embedding_t, perm_t = inputs
        mlp = shared_layers if config.shared else layers_t
        theta, _ = layers.mlp_apply(mlp, config.activation, h[:d_a], embedding_t)
        h, spline_log_det = layers.coupling_inverse(theta, h, config.bound)
        h, lu_log_det = layers.lu_inverse(lu_t, perm_t, h)
        return (h, log_det + spline_log_det + lu_log_det), None

    zero = jnp.zeros((), z.dtype)
    (x, log_det), _ = jax.lax.scan(block, (z, zero), (lu, block_layers, stage_embedding, perms), reverse=True)
    return x, log_det


def base_log_prob(z: jax.Array) -> jax.Array:
    """Standard normal log-density of one example z [d]."""
    return -0.5 * jnp.sum(z**2) - 0.5 * z.shape[-1] * math.log(2.0 * math.pi)


def log_prob(config: FlowConfig, params: Params, x: jax.Array) -> jax.Array:
    """Exact log-density of one example x [d]."""
    z, log_det = forward(config, params, x)
    return base_log_prob(z) + log_det


def nll_with_records(
    config: FlowConfig, params: Params, x: jax.Array, taps: Params
) -> tuple[jax.Array, Params]:
    """Per-example negative log-likelihood with taps; returns (nll, records)."""
    z, log_det, records = forward_with_records(config, params, x, taps)
    return -(base_log_prob(z) + log_det), records


def sample(config: FlowConfig, params: Params, key: jax.Array, num: int) -> jax.Array:
    """Draw ``num`` samples [num, d] by inverting base noise."""
    z = jax.random.normal(key, (num, config.dim), params["lu"]["log_diag"].dtype)
    return jax.vmap(lambda zi: inverse(config, params, zi)[0])(z)


def num_params(config: FlowConfig, params: Params | None = None) -> dict[str, int]:
    """Effective trainable parameter counts (LU counts only its used triangles).

    Returns:
      ``{"conditioner": ..., "lu": ..., "total": ...}``.
    """
    K, d, widths = config.num_blocks, config.dim, config.layer_widths
    per_net = sum(widths[i] * widths[i + 1] + widths[i + 1] for i in range(config.num_layers))
    conditioner = per_net + K * widths[1] if config.shared else K * per_net
    lu = K * (d * (d - 1) + d)
    if params is not None:
        counted = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params["conditioner"]))
        assert counted == conditioner, (counted, conditioner)
    return {"conditioner": conditioner, "lu": lu, "total": conditioner + lu}


# Jitted batch versions for the module's methods (the config is static and hashable): an
# eager vmap over a function with lax.scan would retrace and recompile on every call.
@functools.partial(jax.jit, static_argnums=0)
def _batched_forward(config: FlowConfig, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.vmap(lambda xi: forward(config, params, xi))(x)


@functools.partial(jax.jit, static_argnums=0)
def _batched_inverse(config: FlowConfig, params: Params, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.vmap(lambda zi: inverse(config, params, zi))(z)


@functools.partial(jax.jit, static_argnums=0)
def _batched_log_prob(config: FlowConfig, params: Params, x: jax.Array) -> jax.Array:
    return jax.vmap(lambda xi: log_prob(config, params, xi))(x)


_jitted_sample = jax.jit(sample, static_argnums=(0, 3))


def _to_nnx(tree):
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
    return nnx.Param(tree)


class ConditionalSplineFlow(nnx.Module):
    """Conditional RQ-spline flow with a shared conditioner (DP-HFlow).

    Example::

        flow = ConditionalSplineFlow(dim=8, num_blocks=4, rngs=nnx.Rngs(0))
        lp = flow.log_prob(x)                 # x: [batch, 8] -> [batch]
        xs = flow.sample(jax.random.key(1), 100)
        config, params = flow.pure()          # for jit / the DP engine
    """

    def __init__(
        self,
        dim: int,
        *,
        num_blocks: int = 4,
        hidden: tuple[int, ...] = (256, 256),
        num_bins: int = 8,
        bound: float = 4.0,
        activation: str = "relu",
        shared: bool = True,
        perm_seed: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = FlowConfig(dim, num_blocks, tuple(hidden), num_bins, bound, activation, shared, perm_seed)
        params = init_params(self.config, rngs.params(), dtype)
        self.lu = _to_nnx(params["lu"])
        self.conditioner = _to_nnx(params["conditioner"])

    @classmethod
    def from_pure(cls, config: FlowConfig, params: Params) -> "ConditionalSplineFlow":
        """Build a module from a config and a parameter pytree."""
        flow = cls(**config.to_dict(), rngs=nnx.Rngs(0))
        flow.set_params(params)
        return flow

    def params(self) -> Params:
        """The parameter pytree (plain arrays)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def set_params(self, params: Params) -> None:
        """Replace all parameters with ``params`` (same structure)."""
        state = nnx.state(self, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(self, state)

    def pure(self) -> tuple[FlowConfig, Params]:
        """(static config, parameter pytree) for pure-function use."""
        return self.config, self.params()

    def num_params(self) -> dict[str, int]:
        return num_params(self.config, self.params())

    def forward(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [batch, d] -> (z [batch, d], log|det dz/dx| [batch])."""
        return _batched_forward(self.config, self.params(), x)

    def inverse(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z: [batch, d] -> (x [batch, d], log|det dx/dz| [batch])."""
        return _batched_inverse(self.config, self.params(), z)

    def log_prob(self, x: jax.Array) -> jax.Array:
        """x: [batch, d] -> exact log-density [batch]."""
        return _batched_log_prob(self.config, self.params(), x)

    def sample(self, key: jax.Array, num: int) -> jax.Array:
        """Draw ``num`` samples [num, d]."""
        return _jitted_sample(self.config, self.params(), key, num)
