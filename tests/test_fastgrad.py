"""The analytic per-example gradient path against the vmap reference (design notes §4).

Every clipping strategy reduces to per-example squared norms per atom and a sum of
factor-weighted per-example gradients, so the fast path is checked piece by piece for
every strategy, both conditioner layouts and both precisions: norms, the einsum sums and
the reweighted second backward pass. A few end-to-end calls of ``clipped_grad_sum``
check the wiring (row mask, sparsification key, method dispatch) on top.

Parameters are random and non-zero everywhere (LU triangles and log-diagonal, the
zero-initialised last layer), so no gradient term vanishes by accident.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_cases import KEY, SMALL_CLIP, clippers, make_batch, make_config, precision, random_params

from dpnf_jax.privacy import fastgrad, pergrad
from dpnf_jax.privacy.clipped import clipped_grad_sum, unit_layout
from dpnf_jax.privacy.clipping import (
    FlatClipping,
    PerUnitClipping,
    StochasticSparsification,
    atom_mask,
    clip_factors,
)

LARGE_CLIP = 1e6  # never active
RTOL = {"float32": 1e-3, "float64": 1e-6}


def has_flat_base(clipper) -> bool:
    base = clipper.base if isinstance(clipper, StochasticSparsification) else clipper
    return isinstance(base, FlatClipping)


@functools.partial(jax.jit, static_argnums=0)
def _both_paths(config, params, x, example_factors):
    """Reference per-example grads, the tapped backward pass and the reweighted sum, in one
    compilation (the three share the forward pass; compiling them apart costs ~2x)."""
    layout = unit_layout(config)
    nll_ref, grads = pergrad.per_example_grads(config, params, x)
    nll_fast, records, cotangents = fastgrad.tapped_backward(config, params, x)
    return {
        "nll_ref": nll_ref,
        "grads": grads,
        "atom_sq_ref": jax.vmap(layout.atom_sq_norms)(grads),
        "nll_fast": nll_fast,
        "records": records,
        "cotangents": cotangents,
        "atom_sq_fast": fastgrad.atom_sq_norms(config, params, records, cotangents, layout),
        "reweighted": fastgrad.reweighted_grad_sum(config, params, x, example_factors),
    }


@functools.cache
def setup(shared: bool, dtype: str):
    """(config, params, x, mask) for one layout and precision (cached across tests)."""
    config = make_config(shared)
    with precision(dtype):
        params = random_params(config, jnp.dtype(dtype))
        x, mask = make_batch(jnp.dtype(dtype))
    return config, params, x, mask


def pieces(shared: bool, dtype: str, example_factors=None):
    config, params, x, mask = setup(shared, dtype)
    if example_factors is None:
        example_factors = jnp.ones_like(mask)
    return _both_paths(config, params, x, example_factors)


def assert_close(actual, desired, rtol, what=""):
    """Relative agreement; entries far below the largest one get an absolute floor."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * 1e-2 * scale, err_msg=what)


def assert_trees_close(actual, desired, rtol):
    for (path, a), d in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(desired)):
        assert a.shape == d.shape, (path, a.shape, d.shape)
        assert_close(a, d, rtol, what=jax.tree_util.keystr(path))


def reference_sum(grads, factors, layout, params):
    """sum_i factors_i * grad_i with per-example gradients materialised; factors [B, A]."""
    coordinate = jax.vmap(layout.expand, in_axes=(0, None))(factors, params)
    return jax.tree.map(lambda g, f: jnp.sum(g * f, axis=0), grads, coordinate)


LAYOUTS = [pytest.param(True, id="shared"), pytest.param(False, id="unshared")]
DTYPES = ["float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", LAYOUTS)
def test_parameters_are_random_everywhere(shared, dtype):
    _, params, _, _ = setup(shared, dtype)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        assert leaf.dtype == jnp.dtype(dtype)
        assert np.min(np.abs(np.asarray(leaf))) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", LAYOUTS)
def test_atom_norms_match_reference(shared, dtype):
    """Per-example squared norms of every atom (neuron / LU row), fast vs vmap."""
    with precision(dtype):
        p = pieces(shared, dtype)
        assert p["atom_sq_fast"].dtype == jnp.dtype(dtype)
        assert_close(p["nll_fast"], p["nll_ref"], RTOL[dtype])
        assert_close(p["atom_sq_fast"], p["atom_sq_ref"], RTOL[dtype])
        # The atoms carry the whole gradient: sum over atoms == full per-example norm^2.
        total = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in jax.tree.leaves(p["grads"]))
        assert_close(jnp.sum(p["atom_sq_fast"], axis=1), total, RTOL[dtype])


@pytest.mark.parametrize("clip", [SMALL_CLIP, LARGE_CLIP], ids=["clipping", "no-clipping"])
@pytest.mark.parametrize("name", list(clippers(1.0)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", LAYOUTS)
def test_clipped_sum_matches_reference(shared, dtype, name, clip):
    """Norms, factors and clipped sums of every strategy: einsum path (and, for flat bases,
    the reweighted backward pass) against materialised per-example gradients."""
    clipper = clippers(clip)[name]
    config, params, _, mask = setup(shared, dtype)
    layout = unit_layout(config)
    rtol = RTOL[dtype]
    with precision(dtype):
        p = pieces(shared, dtype)
        kept = atom_mask(clipper, layout, jax.random.key(KEY)).astype(mask.dtype)
        factors_ref, norms_ref = clip_factors(clipper, layout, p["atom_sq_ref"], kept)
        factors_fast, norms_fast = clip_factors(clipper, layout, p["atom_sq_fast"], kept)
        assert norms_fast.shape == norms_ref.shape == ((6,) if has_flat_base(clipper) else (6, norms_ref.shape[1]))
        assert_close(norms_fast, norms_ref, rtol)
        assert_close(factors_fast, factors_ref, rtol)

        real = np.asarray(mask, bool)
        kept_factors = np.asarray(factors_ref)[real][:, np.asarray(kept, bool)]
        if clip == LARGE_CLIP:
            np.testing.assert_array_equal(kept_factors, 1.0)
        else:
            assert np.mean(kept_factors < 1.0) > 0.5, "clipping should be active for most units"

        factors_ref = factors_ref * mask[:, None]
        factors_fast = factors_fast * mask[:, None]
        expected = reference_sum(p["grads"], factors_ref, layout, params)
        einsum = fastgrad.weighted_grad_sum(config, params, p["records"], p["cotangents"], factors_fast, layout)
        assert_trees_close(einsum, expected, rtol)
        if has_flat_base(clipper):
            example_factors = jnp.max(factors_fast, axis=1)
            reweighted = pieces(shared, dtype, example_factors)["reweighted"]
            reweighted = jax.tree.map(lambda g, m: g * m, reweighted, layout.expand(kept, params))
            assert_trees_close(reweighted, expected, rtol)


# --------------------------------------------------------------------------------------
# End to end through clipped_grad_sum (float32, shared conditioner).
# --------------------------------------------------------------------------------------

API_CASES = [
    pytest.param(FlatClipping(SMALL_CLIP), "fast", id="flat-fast"),
    pytest.param(
        StochasticSparsification(PerUnitClipping(SMALL_CLIP, "neuron", "proportional"), 0.3),
        "fast",
        id="sparse-neuron-proportional-fast",
    ),
    pytest.param(
        StochasticSparsification(PerUnitClipping(SMALL_CLIP, "neuron", "proportional"), 0.3),
        "vmap",
        id="sparse-neuron-proportional-vmap",
    ),
    pytest.param(
        StochasticSparsification(FlatClipping(SMALL_CLIP), 0.5, "layer"),
        "fast_reweight",
        id="sparse-flat-layer-reweight",
    ),
]


@pytest.mark.parametrize("clipper, method", API_CASES)
def test_clipped_grad_sum_api_matches_reference(clipper, method):
    config, params, x, mask = setup(True, "float32")
    layout = unit_layout(config)
    rtol = RTOL["float32"]
    key = jax.random.key(KEY)
    with precision("float32"):
        p = pieces(True, "float32")
        result = clipped_grad_sum((config, params), x, clipper, method, mask, key)
        kept = atom_mask(clipper, layout, key)
        np.testing.assert_array_equal(result.atoms_kept, kept)
        factors, norms = clip_factors(clipper, layout, p["atom_sq_ref"], kept)
        expected = reference_sum(p["grads"], factors * mask[:, None], layout, params)
        assert_close(result.norms, norms, rtol)
        assert_close(result.nll, p["nll_ref"], rtol)
        assert_trees_close(result.grad_sum, expected, rtol)


def test_padding_rows_change_nothing():
    """Masked rows, whatever their data, leave the clipped sum exactly as without them."""
    config, params, x, mask = setup(True, "float32")
    clipper = FlatClipping(SMALL_CLIP)
    key = jax.random.key(KEY)
    with precision("float32"):
        padded = clipped_grad_sum((config, params), x, clipper, "fast", mask, key)
        garbage = x.at[-1].set(jnp.asarray([30.0, -7.0, 1e3, 0.0, -2.5], x.dtype))
        padded_garbage = clipped_grad_sum((config, params), garbage, clipper, "fast", mask, key)
        unpadded = clipped_grad_sum((config, params), x[:-1], clipper, "fast", None, key)
    for a, b in zip(jax.tree.leaves(padded.grad_sum), jax.tree.leaves(padded_garbage.grad_sum)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(padded.nll[:-1], padded_garbage.nll[:-1])
    # A different batch shape may reorder the float32 reductions: rounding level only.
    for a, b in zip(jax.tree.leaves(padded.grad_sum), jax.tree.leaves(unpadded.grad_sum)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("method", ["vmap", "fast", "fast_reweight"])
def test_row_with_overflowing_gradient_contributes_nothing(method):
    """One row whose gradient overflows must not poison the step (0 * inf = NaN)."""
    from dpnf_jax.flows import model as flow_model
    from dpnf_jax.privacy import FlatClipping, clipped_grad_sum

    config = flow_model.FlowConfig(dim=3, num_blocks=2, hidden=(8,))
    params = flow_model.init_params(config, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    poisoned = x.at[2].set(1e30)
    keep = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0])
    clean = clipped_grad_sum((config, params), x, FlatClipping(1.0), method, mask=keep)
    dirty = clipped_grad_sum((config, params), poisoned, FlatClipping(1.0), method)
    for a, b in zip(jax.tree.leaves(clean.grad_sum), jax.tree.leaves(dirty.grad_sum)):
        assert bool(jnp.all(jnp.isfinite(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
