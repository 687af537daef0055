"""Clipping units, strategies and their sensitivities (design notes §5).

The claims checked here are the ones the accountant relies on: every example's clipped
contribution has L2 norm at most ``clipper.sensitivity() == C`` (per unit: at most C_u,
with ``sum_u C_u^2 = C^2``), the norms reported are the true per-example gradient norms,
and stochastic sparsification draws its units from the step key alone. Norms are
recomputed here from the per-example gradient pytree by explicit slicing, independently
of the atom bookkeeping in ``units.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_cases import KEY, ROW_MASK, SMALL_CLIP, clippers, make_batch, make_config, precision, random_params

from dpnf_jax.flows.model import FlowConfig, num_params
from dpnf_jax.privacy import pergrad
from dpnf_jax.privacy.clipped import clipped_grad_sum, unit_layout
from dpnf_jax.privacy.clipping import (
    FlatClipping,
    PerUnitClipping,
    StochasticSparsification,
    atom_mask,
    clip_factors,
    clipper_from_dict,
    unit_thresholds,
)
from dpnf_jax.privacy.units import structural_mask


@functools.cache
def setup32(shared: bool):
    """float32 (config, params, x, mask), as used by the end-to-end calls."""
    config = make_config(shared)
    with precision("float32"):
        params = random_params(config, jnp.float32)
        x, mask = make_batch(jnp.float32)
    return config, params, x, mask


@functools.partial(jax.jit, static_argnums=0)
def _reference_grads(config, params, x):
    return pergrad.per_example_grads(config, params, x)[1]


@functools.cache
def reference64(shared: bool):
    """(config, params, x, per-example grads) in float64, from the float32 values."""
    config, params, x, _ = setup32(shared)
    with precision("float64"):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        grads = _reference_grads(config, params64, x64)
        return config, params64, x64, jax.tree.map(np.asarray, grads)


def unit_sq_norms(config: FlowConfig, grads, granularity: str) -> np.ndarray:
    """Squared norms per clipping unit [B, U] by explicit slicing of the gradient pytree.

    Unit order follows the layout: conditioner layers in order (per block when
    unshared), then the LU layers per block; neurons within a layer, LU rows within a block.
    """
    grads = jax.tree.map(np.asarray, grads)
    if granularity == "flat":
        return sum(np.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads))[:, None]
    K, d = config.num_blocks, config.dim
    neurons, layers = [], []
    for i in range(config.num_layers):
        layer = grads["conditioner"][f"layer_{i}"]
        if config.shared:  # kernel [B, in, out], bias [B, out], embedding [B, K, out]
            sq = np.sum(layer["kernel"] ** 2, axis=1) + layer["bias"] ** 2
            if i == 0:
                sq = sq + np.sum(layer["stage_embedding"] ** 2, axis=1)
            neurons.append(sq)
            layers.append(sq.sum(axis=1, keepdims=True))
        else:  # kernel [B, K, in, out], bias [B, K, out]
            sq = np.sum(layer["kernel"] ** 2, axis=2) + layer["bias"] ** 2
            neurons.append(sq.reshape(sq.shape[0], -1))
            layers.append(sq.sum(axis=2))
    lu = grads["lu"]
    rows = np.zeros(lu["log_diag"].shape)  # [B, K, d]
    for t in range(K):
        for j in range(d):
            rows[:, t, j] = (
                np.sum(lu["lower"][:, t, j, :j] ** 2, axis=1)
                + np.sum(lu["upper"][:, t, j, j + 1 :] ** 2, axis=1)
                + lu["log_diag"][:, t, j] ** 2
            )
    neurons.append(rows.reshape(rows.shape[0], -1))
    layers.append(rows.sum(axis=2))
    return np.concatenate(neurons if granularity == "neuron" else layers, axis=1)


def base_granularity(clipper) -> str:
    base = clipper.base if isinstance(clipper, StochasticSparsification) else clipper
    return base.granularity


def base_allocation(clipper) -> str | None:
    base = clipper.base if isinstance(clipper, StochasticSparsification) else clipper
    return getattr(base, "allocation", None)


LAYOUTS = [pytest.param(True, id="shared"), pytest.param(False, id="unshared")]


# --------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", LAYOUTS)
def test_atoms_partition_the_parameters(shared):
    config, params, _, _ = setup32(shared)
    layout = unit_layout(config)
    K, d, widths, L = config.num_blocks, config.dim, config.layer_widths, config.num_layers
    total = num_params(config)["total"]
    assert layout.atom_sizes.sum() == total
    expected_units = {
        "flat": 1,
        "layer": (L if shared else L * K) + K,
        "neuron": (1 if shared else K) * sum(widths[1:]) + K * d,
    }
    for granularity, count in expected_units.items():
        ids, num_units = layout.unit_of_atom(granularity)
        assert num_units == count
        assert sorted(set(ids.tolist())) == list(range(count))
        assert layout.unit_sizes(granularity).sum() == total
    # Each used coordinate lies in exactly one atom: spread a value v_a over atom a's
    # coordinates; the atom's squared norm must come back as v_a^2 * size_a.
    values = np.random.default_rng(3).uniform(0.5, 2.0, layout.num_atoms).astype(np.float32)
    with precision("float32"):
        sq = _spread_sq_norms(config, jnp.asarray(values), params)
    np.testing.assert_allclose(sq, values.astype(np.float64) ** 2 * layout.atom_sizes, rtol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _spread_sq_norms(config, values, params):
    layout = unit_layout(config)
    spread = jax.tree.map(lambda a, m: a * m, layout.expand(values, params), structural_mask(params))
    return layout.atom_sq_norms(spread)


# --------------------------------------------------------------------------------------
# Clipped contributions are bounded (reference path, float64)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(clippers(1.0)))
@pytest.mark.parametrize("shared", LAYOUTS)
def test_clipped_contributions_are_bounded(shared, name):
    clipper = clippers(SMALL_CLIP)[name]
    config, params, _, grads = reference64(shared)
    layout = unit_layout(config)
    granularity = base_granularity(clipper)
    assert clipper.sensitivity() == SMALL_CLIP
    with precision("float64"):
        kept = atom_mask(clipper, layout, jax.random.key(KEY)).astype(jnp.float64)
        atom_sq = jax.vmap(layout.atom_sq_norms)(grads)
        factors, norms = clip_factors(clipper, layout, atom_sq, kept)
        bounds = np.asarray(unit_thresholds(clipper, layout, kept))
        kept_coordinates = layout.expand(kept, params)
        clipped = jax.tree.map(lambda g, f: g * f, grads, jax.vmap(layout.expand, in_axes=(0, None))(factors, params))
        kept_grads = jax.tree.map(lambda g, m: g * m, grads, kept_coordinates)
        dropped_clipped = jax.tree.map(lambda g, m: g * (1 - m), clipped, kept_coordinates)

    # The reported norms are the true per-example norms over the kept coordinates.
    true_norms = np.sqrt(unit_sq_norms(config, kept_grads, granularity))
    norms = np.asarray(norms)
    np.testing.assert_allclose(norms.reshape(true_norms.shape), true_norms, rtol=1e-10)

    # Unit bounds: sum_u C_u^2 = C^2 over kept units, each clipped unit norm <= C_u.
    np.testing.assert_allclose(np.sum(bounds**2), SMALL_CLIP**2, rtol=1e-12)
    clipped_norms = np.sqrt(unit_sq_norms(config, clipped, granularity))
    assert np.all(clipped_norms <= bounds[None, :] + 1e-6)
    np.testing.assert_allclose(clipped_norms, np.minimum(true_norms, bounds[None, :]), rtol=1e-10, atol=1e-12)
    active = bounds > 0
    assert np.mean(true_norms[:, active] > bounds[active]) > 0.5, "the bound should be active for most units"
    # Whatever the strategy, one example's whole contribution is within the sensitivity.
    total = np.sqrt(unit_sq_norms(config, clipped, "flat"))[:, 0]
    assert np.all(total <= clipper.sensitivity() + 1e-6)
    for leaf in jax.tree.leaves(dropped_clipped):
        np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("name", list(clippers(1.0)))
def test_unit_thresholds(name):
    clip = 2.5
    clipper = clippers(clip)[name]
    layout = unit_layout(make_config(True))
    assert clipper.sensitivity() == clip == clipper.l2_clip
    assert clipper_from_dict(clipper.to_dict()).sensitivity() == clip
    ids, num_units = layout.unit_of_atom(base_granularity(clipper))
    sizes = layout.unit_sizes(base_granularity(clipper))
    with precision("float32"):
        for seed in range(3):
            kept = atom_mask(clipper, layout, jax.random.key(seed))
            bounds = np.asarray(unit_thresholds(clipper, layout, kept))
            kept_units = np.zeros(num_units, bool)
            kept_units[ids[np.asarray(kept) > 0]] = True
            np.testing.assert_allclose(np.sum(bounds**2), clip**2, rtol=1e-6)
            assert np.all(bounds[~kept_units] == 0) and np.all(bounds[kept_units] > 0)
            if base_allocation(clipper) == "proportional":
                share = np.where(kept_units, sizes, 0) / sizes[kept_units].sum()
                np.testing.assert_allclose(bounds**2 / clip**2, share, rtol=1e-5)
            elif num_units > 1:
                np.testing.assert_allclose(bounds[kept_units], clip / np.sqrt(kept_units.sum()), rtol=1e-6)


# --------------------------------------------------------------------------------------
# End to end through clipped_grad_sum (float32)
# --------------------------------------------------------------------------------------

SPARSE_NEURON = StochasticSparsification(PerUnitClipping(SMALL_CLIP, "neuron", "proportional"), 0.3)
API_CASES = [
    pytest.param(FlatClipping(SMALL_CLIP), "fast", id="flat-fast"),
    pytest.param(SPARSE_NEURON, "fast", id="sparse-neuron-proportional-fast"),
    pytest.param(SPARSE_NEURON, "vmap", id="sparse-neuron-proportional-vmap"),
    pytest.param(
        StochasticSparsification(FlatClipping(SMALL_CLIP), 0.5, "layer"),
        "fast_reweight",
        id="sparse-flat-layer-reweight",
    ),
]


def api(clipper, method, x=None, mask=None, key=KEY):
    config, params, x0, mask0 = setup32(True)
    with precision("float32"):
        return clipped_grad_sum(
            (config, params),
            x0 if x is None else x,
            clipper,
            method,
            mask0 if mask is None else mask,
            jax.random.key(key),
        )


@pytest.mark.parametrize("clipper, method", API_CASES)
def test_api_norms_are_true_gradient_norms(clipper, method):
    config, params64, _, grads = reference64(True)
    result = api(clipper, method)
    with precision("float64"):
        kept = unit_layout(config).expand(jnp.asarray(result.atoms_kept, jnp.float64), params64)
        kept_grads = jax.tree.map(lambda g, m: g * m, grads, kept)
    true_norms = np.sqrt(unit_sq_norms(config, kept_grads, base_granularity(clipper)))
    np.testing.assert_allclose(np.asarray(result.norms).reshape(true_norms.shape), true_norms, rtol=1e-4)


@pytest.mark.parametrize("clipper, method", API_CASES)
def test_removing_one_row_moves_the_sum_by_at_most_the_sensitivity(clipper, method):
    full = api(clipper, method)
    sensitivity = clipper.sensitivity()
    for row in range(5):
        mask = jnp.asarray([0.0 if i == row else float(m) for i, m in enumerate(ROW_MASK)], jnp.float32)
        without = api(clipper, method, mask=mask)
        change = np.sqrt(
            sum(
                np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                for a, b in zip(jax.tree.leaves(full.grad_sum), jax.tree.leaves(without.grad_sum))
            )
        )
        assert change <= sensitivity * (1 + 1e-4)
        if isinstance(clipper, FlatClipping):
            # Norms here are O(100): the row is clipped to exactly C.
            np.testing.assert_allclose(change, sensitivity, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Stochastic sparsification
# --------------------------------------------------------------------------------------


def test_sparsification_mask_depends_on_the_key_only():
    _, _, x, _ = setup32(True)
    other_x = 2.0 * jax.random.normal(jax.random.key(11), x.shape, x.dtype)
    first = api(SPARSE_NEURON, "fast")
    same_key_other_data = api(SPARSE_NEURON, "fast", x=other_x)
    other_key = api(SPARSE_NEURON, "fast", key=KEY + 1)
    np.testing.assert_array_equal(first.atoms_kept, same_key_other_data.atoms_kept)
    assert not np.array_equal(first.atoms_kept, other_key.atoms_kept)
    # The data did matter for the sums (so the equal masks are not an accident).
    assert not np.allclose(first.grad_sum["lu"]["log_diag"], same_key_other_data.grad_sum["lu"]["log_diag"])


@pytest.mark.parametrize("granularity", ["layer", "neuron"])
@pytest.mark.parametrize("per_unit_base", [False, True], ids=["flat-base", "per-unit-base"])
@pytest.mark.parametrize("keep_fraction", [0.01, 0.3, 0.5, 1.0])
def test_sparsification_keeps_exactly_round_p_units(keep_fraction, per_unit_base, granularity):
    base = PerUnitClipping(1.0, granularity) if per_unit_base else FlatClipping(1.0)
    clipper = StochasticSparsification(base, keep_fraction, granularity)
    assert clipper.mask_granularity == granularity
    layout = unit_layout(make_config(False))
    ids, num_units = layout.unit_of_atom(granularity)
    expected = max(1, round(keep_fraction * num_units))
    keys = jax.random.split(jax.random.key(5), 400)
    with precision("float32"):
        masks = np.asarray(jax.vmap(lambda k: atom_mask(clipper, layout, k))(keys))
    assert set(np.unique(masks)) <= {0.0, 1.0}
    unit_masks = np.zeros((len(keys), num_units))
    unit_masks[:, ids] = masks
    np.testing.assert_array_equal(masks, unit_masks[:, ids], err_msg="a unit is kept or dropped as a whole")
    np.testing.assert_array_equal(unit_masks.sum(axis=1), expected)
    # Uniform over units: each is kept with frequency expected / U.
    rate = expected / num_units
    spread = 5 * np.sqrt(rate * (1 - rate) / len(keys)) + 1e-12
    assert np.all(np.abs(unit_masks.mean(axis=0) - rate) <= spread)


@pytest.mark.parametrize("clipper, method", [case for case in API_CASES if "sparse" in case.id])
def test_dropped_coordinates_have_zero_grad_sum(clipper, method):
    config, params, _, _ = setup32(True)
    result = api(clipper, method)
    with precision("float32"):
        kept = unit_layout(config).expand(result.atoms_kept, params)
    structural = structural_mask(params)
    for g, m, s in zip(jax.tree.leaves(result.grad_sum), jax.tree.leaves(kept), jax.tree.leaves(structural)):
        g, m, s = np.asarray(g), np.asarray(m), np.asarray(s)
        np.testing.assert_array_equal(g[(m == 0) | (s == 0)], 0.0)
    kept_values = np.concatenate(
        [
            np.asarray(g)[(np.asarray(m) > 0) & (np.asarray(s) > 0)]
            for g, m, s in zip(jax.tree.leaves(result.grad_sum), jax.tree.leaves(kept), jax.tree.leaves(structural))
        ]
    )
    assert np.mean(kept_values != 0) > 0.25  # not trivially zero (dead ReLUs give some exact zeros)


def test_atom_mask_needs_a_key_and_is_all_ones_otherwise():
    layout = unit_layout(make_config(True))
    with pytest.raises(ValueError, match="key"):
        atom_mask(StochasticSparsification(), layout, None)
    for clipper in (FlatClipping(), PerUnitClipping(1.0, "neuron")):
        np.testing.assert_array_equal(atom_mask(clipper, layout, None), 1.0)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: FlatClipping(0.0), ValueError),
        (lambda: FlatClipping(-1.0), ValueError),
        (lambda: FlatClipping(float("nan")), ValueError),
        (lambda: FlatClipping(float("inf")), ValueError),
        (lambda: PerUnitClipping(1.0, "flat"), ValueError),
        (lambda: PerUnitClipping(1.0, "layer", "sqrt"), ValueError),
        (lambda: StochasticSparsification(FlatClipping(), 0.0), ValueError),
        (lambda: StochasticSparsification(FlatClipping(), 1.5), ValueError),
        (lambda: StochasticSparsification(FlatClipping(), 0.5, "flat"), ValueError),
        (lambda: StochasticSparsification(StochasticSparsification(), 0.5), TypeError),
        (lambda: clipper_from_dict({"type": "magic"}), ValueError),
    ],
)
def test_invalid_clippers_raise(build, error):
    with pytest.raises(error):
        build()


@pytest.mark.parametrize("name", list(clippers(1.0)))
def test_clipper_dict_round_trip(name):
    clipper = clippers(0.75)[name]
    again = clipper_from_dict(clipper.to_dict())
    assert again.to_dict() == clipper.to_dict()
    assert again.sensitivity() == clipper.sensitivity()
