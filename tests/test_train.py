"""DP-SGD training (design notes §6): the noisy step, the fit loop and its privacy report.

Expensive runs are module fixtures shared by several tests: three DP fits on (a subset
of) the encoded Adult data (fast, fast again with the same seed, vmap) whose jitted step
functions and Poisson batches are captured, and one sparsified step built directly.
"""

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpnf_jax import train
from dpnf_jax.data.encode import TabularEncoder
from dpnf_jax.datasets import adult_schema, load_adult
from dpnf_jax.flows.model import FlowConfig, init_params
from dpnf_jax.privacy import accounting, sampling
from dpnf_jax.privacy.clipped import clipped_grad_sum, unit_layout
from dpnf_jax.privacy.clipping import FlatClipping, PerUnitClipping, StochasticSparsification, atom_mask
from dpnf_jax.privacy.units import structural_mask
from dpnf_jax.train import DPReport, dp_fit, make_dp_step, mean_log_prob

TINY_ROWS = 400
TINY_CONFIG = FlowConfig(dim=4, num_blocks=2, hidden=(8,), num_bins=4)


@pytest.fixture
def strict():
    """Strict dtype promotion (not everywhere: optax's Adam mixes float and int32)."""
    with jax.numpy_dtype_promotion("strict"):
        yield


def random_params(config: FlowConfig, seed: int, scale: float = 0.3):
    """Random non-zero float32 values for every leaf (numpy draws: nothing to compile)."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), shapes)


def copy(tree):
    """The step's apply donates its inputs: hand it copies."""
    return jax.tree.map(jnp.copy, tree)


def relative_tree_difference(a, b) -> float:
    """Largest per-leaf max |a - b| / max |b|."""
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# --------------------------------------------------------------------------------------
# DP fits on Adult: fast, fast again (same seed), vmap; step functions captured
# --------------------------------------------------------------------------------------

ADULT_ROWS, ADULT_TEST_ROWS = 6000, 3000
ADULT_EPSILON, ADULT_DELTA, ADULT_EPOCHS, ADULT_BATCH, ADULT_CHUNK = 1.0, 1e-5, 2, 200, 64
ADULT_CLIPPER = FlatClipping(0.5)
ADULT_METHODS = ("fast", "fast", "vmap")


@pytest.fixture(scope="module")
def adult_runs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the encoder's clipping notices
        train_frame, test_frame = load_adult()
        encoder = TabularEncoder(adult_schema(), categorical="ordinal")
        x_train = encoder.encode(train_frame.iloc[:ADULT_ROWS], rng=0)
        x_test = encoder.encode(test_frame.iloc[:ADULT_TEST_ROWS], rng=1)
    assert x_train.shape == (ADULT_ROWS, 18)
    config = FlowConfig(dim=18, num_blocks=2, hidden=(64, 64))
    initial = init_params(config, jax.random.key(0))
    captured, runs = [], []

    def spy_make_dp_step(*args, **kwargs):
        step = make_dp_step(*args, **kwargs)
        captured.append({"args": args, "step": step})
        return step

    original_chunks = sampling.host_chunks

    def spy_chunks(batch, *args, **kwargs):  # called once per step
        blocks, masks = original_chunks(batch, *args, **kwargs)
        runs[-1]["batches"].append((len(batch), len(blocks)))
        return blocks, masks

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "make_dp_step", spy_make_dp_step)
        patch.setattr(sampling, "host_chunks", spy_chunks)
        for method in ADULT_METHODS:
            run = {"method": method, "batches": [], "losses": []}
            runs.append(run)
            params, report = dp_fit(
                (config, initial),  # the same arrays every time: dp_fit must not consume them
                x_train,
                epsilon=ADULT_EPSILON,
                delta=ADULT_DELTA,
                epochs=ADULT_EPOCHS,
                batch_size=ADULT_BATCH,
                clipper=ADULT_CLIPPER,
                method=method,
                seed=3,
                noise_seed=4,  # fixed for the comparisons below; None (OS entropy) in real use
                chunk_size=ADULT_CHUNK,
                verbose=False,
                callback=lambda step, p, nll: run["losses"].append(nll),
            )
            step = captured[-1]["step"]
            run.update(
                params=params,
                report=report,
                log_prob=mean_log_prob(config, params, x_test),
                capture=captured[-1],
                cache_sizes=(step.chunk._cache_size(), step.apply._cache_size()),
            )
    return {"runs": runs, "initial_log_prob": mean_log_prob(config, initial, x_test)}


@pytest.mark.parametrize("index", range(len(ADULT_METHODS)), ids=[f"{m}-{i}" for i, m in enumerate(ADULT_METHODS)])
def test_dp_fit_raises_heldout_likelihood(adult_runs, index):
    log_prob = adult_runs["runs"][index]["log_prob"]
    assert np.isfinite(log_prob)
    assert log_prob > adult_runs["initial_log_prob"] + 2.0, (log_prob, adult_runs["initial_log_prob"])


@pytest.mark.parametrize("index", [0, 2], ids=["fast", "vmap"])
def test_dp_report(adult_runs, index):
    run = adult_runs["runs"][index]
    report = run["report"]
    assert ADULT_EPSILON * 0.99 <= report.epsilon <= ADULT_EPSILON
    assert report.delta == ADULT_DELTA
    q = ADULT_BATCH / ADULT_ROWS
    assert report.sampling_rate == pytest.approx(q)
    assert report.steps == math.ceil(ADULT_EPOCHS / q) == len(run["batches"]) == len(run["losses"])
    assert report.expected_batch_size == pytest.approx(ADULT_BATCH)
    assert report.num_rows == ADULT_ROWS
    assert report.sensitivity == ADULT_CLIPPER.sensitivity() == 0.5
    assert report.clipper == ADULT_CLIPPER.to_dict()
    assert report.grad_method == run["method"] and report.accountant == "pld"
    assert [event["label"] for event in report.events] == ["dp-sgd"]
    event = report.events[0]
    assert event["type"] == "self_composed" and event["count"] == report.steps
    assert event["event"]["type"] == "poisson_sampled"
    assert event["event"]["sampling_probability"] == pytest.approx(q)
    assert event["event"]["event"] == {"type": "gaussian", "noise_multiplier": report.noise_multiplier}
    # The recorded events reproduce the recorded epsilon.
    events = [accounting.event_from_dict({k: v for k, v in e.items() if k != "label"}) for e in report.events]
    assert accounting.epsilon_of_events(events, report.delta, report.accountant) == pytest.approx(report.epsilon)
    assert DPReport.from_dict(json.loads(report.to_json())) == report


def test_dp_fit_scales_noise_by_sensitivity_and_expected_batch(adult_runs):
    for run in adult_runs["runs"]:
        config, clipper, method, _, noise_std, expected, mesh = run["capture"]["args"]
        assert mesh is None
        assert clipper == ADULT_CLIPPER and method == run["method"]
        assert noise_std == pytest.approx(run["report"].noise_multiplier * ADULT_CLIPPER.sensitivity(), rel=1e-12)
        assert expected == pytest.approx(ADULT_BATCH) == run["report"].expected_batch_size


def test_step_does_not_recompile_when_the_batch_size_changes(adult_runs):
    for run in adult_runs["runs"]:
        sizes = {size for size, _ in run["batches"]}
        chunks = {count for _, count in run["batches"]}
        assert len(sizes) > 10, "Poisson batch sizes should vary"
        assert len(chunks) > 1, "the number of chunks per batch should vary"
        assert run["cache_sizes"] == (1, 1)
    # The counter does count: a new input shape is one more compilation.
    probe = jax.jit(lambda a: a + 1)
    probe(jnp.ones(2))
    probe(jnp.ones(2))
    probe(jnp.ones(3))
    assert probe._cache_size() == 2


def test_same_seed_gives_identical_parameters(adult_runs):
    first, second = adult_runs["runs"][:2]
    assert first["batches"] == second["batches"]
    assert first["losses"] == second["losses"]
    for a, b in zip(jax.tree.leaves(first["params"]), jax.tree.leaves(second["params"])):
        np.testing.assert_array_equal(a, b)


def test_fast_and_vmap_fits_agree(adult_runs):
    fast, _, vmap = adult_runs["runs"]
    assert fast["report"].noise_multiplier == vmap["report"].noise_multiplier
    assert fast["batches"] == vmap["batches"]
    assert relative_tree_difference(fast["params"], vmap["params"]) < 1e-4


# --------------------------------------------------------------------------------------
# One sparsified step: chunk and noisy update
# --------------------------------------------------------------------------------------

STEP_CONFIG = FlowConfig(dim=6, num_blocks=2, hidden=(32,), num_bins=4)
STEP_CLIPPER = StochasticSparsification(PerUnitClipping(0.8, "neuron"), 0.5)
STEP_ROWS, STEP_CHUNK, STEP_REAL = 50, 16, 12
NOISE_MULTIPLIER, EXPECTED_BATCH = 1.3, 4.0


@pytest.fixture(scope="module")
def sparse_step():
    step = make_dp_step(
        STEP_CONFIG, STEP_CLIPPER, "fast", optax.sgd(1.0), NOISE_MULTIPLIER * STEP_CLIPPER.sensitivity(), EXPECTED_BATCH
    )
    params = random_params(STEP_CONFIG, seed=2)
    data = jnp.asarray(np.random.default_rng(4).normal(size=(STEP_ROWS, 6)), jnp.float32)
    return step, params, data


def apply(step, params, grad_sum, key):
    """One update with plain SGD(1): returns params - noisy mean gradient."""
    new, _ = step.apply(copy(params), optax.sgd(1.0).init(params), copy(grad_sum), key)
    return new


def coordinates_kept(params, step_key):
    """The step's kept coordinates [pytree of bool], drawn as make_dp_step does."""
    layout = unit_layout(STEP_CONFIG)
    mask_key, _ = jax.random.split(step_key)
    kept = layout.expand(atom_mask(STEP_CLIPPER, layout, mask_key), params)
    return [np.asarray(k * s) > 0 for k, s in zip(jax.tree.leaves(kept), jax.tree.leaves(structural_mask(params)))]


def test_sparsified_step_touches_only_kept_coordinates(sparse_step):
    step, params, data = sparse_step
    idx = jnp.asarray([3, 17, 5, 49, 25, 8, 42, 31, 7, 14, 28, 20, 0, 0, 0, 0], jnp.int32)
    mask = jnp.arange(STEP_CHUNK) < STEP_REAL
    step_key = jax.random.key(123)
    grad_sum, nll_sum = step.chunk(params, data[idx], mask, step_key)
    # Padding rows (mask 0) change nothing, whichever rows they point at.
    other_padding = idx.at[STEP_REAL:].set(jnp.asarray([1, 2, 48, 49], jnp.int32))
    grad_sum_2, nll_sum_2 = step.chunk(params, data[other_padding], mask, step_key)
    for a, b in zip(jax.tree.leaves(grad_sum), jax.tree.leaves(grad_sum_2)):
        np.testing.assert_array_equal(a, b)
    assert float(nll_sum) == float(nll_sum_2)

    kept = coordinates_kept(params, step_key)
    layout = unit_layout(STEP_CONFIG)
    _, num_units = layout.unit_of_atom("neuron")
    mask_key, _ = jax.random.split(step_key)
    assert int(np.sum(atom_mask(STEP_CLIPPER, layout, mask_key))) == max(1, round(0.5 * num_units))
    new_params = apply(step, params, grad_sum, step_key)
    for g, old, new, k in zip(jax.tree.leaves(grad_sum), jax.tree.leaves(params), jax.tree.leaves(new_params), kept):
        g, old, new = np.asarray(g), np.asarray(old), np.asarray(new)
        np.testing.assert_array_equal(g[~k], 0.0)
        np.testing.assert_array_equal(new[~k], old[~k])  # dropped units and unused LU entries
        assert np.all(new[k] != old[k]), "noise should reach every kept coordinate"


def test_noise_std_and_normalisation_by_expected_batch(sparse_step, strict):
    step, params, _ = sparse_step
    zero = jax.tree.map(jnp.zeros_like, params)

    def noise(grad_sum, seed):
        new = apply(step, params, grad_sum, jax.random.key(seed))
        return [np.asarray(o) - np.asarray(n) for o, n in zip(jax.tree.leaves(params), jax.tree.leaves(new))]

    draws = {seed: noise(zero, seed) for seed in range(40)}
    kept = {seed: coordinates_kept(params, jax.random.key(seed)) for seed in draws}
    samples = np.concatenate([d[k] for seed in draws for d, k in zip(draws[seed], kept[seed])])
    assert samples.size > 20_000
    target = NOISE_MULTIPLIER * STEP_CLIPPER.sensitivity() / EXPECTED_BATCH
    assert abs(np.std(samples) / target - 1) < 0.05
    assert abs(np.mean(samples)) < 5 * target / np.sqrt(samples.size)
    for seed in draws:  # nothing else moves: dropped units, unused LU triangles
        for d, k in zip(draws[seed], kept[seed]):
            np.testing.assert_array_equal(d[~k], 0.0)
    # Independent noise per leaf. A key reused across leaves would repeat the same
    # normals along each leaf's flattened prefix, so compare leaves position by position.
    sizes = [leaf.size for leaf in jax.tree.leaves(params)]
    for i in range(len(sizes)):
        for j in range(i):
            n = min(sizes[i], sizes[j])
            both = [kept[s][i].ravel()[:n] & kept[s][j].ravel()[:n] for s in draws]
            a = np.concatenate([draws[s][i].ravel()[:n][m] for s, m in zip(draws, both)])
            b = np.concatenate([draws[s][j].ravel()[:n][m] for s, m in zip(draws, both)])
            if a.size >= 100:
                assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size), (i, j)
    # Same key, same noise; a signal G moves the parameters by exactly G / (q N).
    again = noise(zero, 0)
    for x, y in zip(again, draws[0]):
        np.testing.assert_array_equal(x, y)
    signal = jax.tree.map(lambda p: jnp.linspace(-3.0, 3.0, p.size, dtype=p.dtype).reshape(p.shape), params)
    with_signal = noise(signal, 0)
    for w, d, g, k in zip(with_signal, draws[0], jax.tree.leaves(signal), kept[0]):
        np.testing.assert_allclose((w - d)[k], np.asarray(g)[k] / EXPECTED_BATCH, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal((w - d)[~k], 0.0)


# --------------------------------------------------------------------------------------
# Settings that must be refused
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epsilon": 0.0}, "epsilon must be > 0"),
        ({"epsilon": -1.0}, "epsilon must be > 0"),
        ({"batch_size": TINY_ROWS + 1}, "batch_size must be an integer in"),
        ({"batch_size": 0}, "batch_size must be an integer in"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"epsilon": 1e-4, "epochs": 1000}, "cannot train to epsilon=0.0001"),
        ({"method": "fast_reweight", "clipper": PerUnitClipping(1.0)}, "'fast_reweight'.*flat clipping only"),
        (
            {"method": "fast_reweight", "clipper": StochasticSparsification(PerUnitClipping(1.0), 0.5)},
            "'fast_reweight'.*flat clipping only",
        ),
        ({"method": "exact"}, "unknown gradient method"),
    ],
)
def test_dp_fit_refuses_bad_settings(overrides, message):
    x = np.random.default_rng(0).normal(size=(TINY_ROWS, 4)).astype(np.float32)
    settings = {"epsilon": 1.0, "delta": 1e-5, "epochs": 1, "batch_size": 40, "verbose": False, **overrides}
    with pytest.raises(ValueError, match=message):
        dp_fit(TINY_CONFIG, x, **settings)


@pytest.mark.parametrize(
    "x", [np.zeros((10, 3), np.float32), np.full((10, 4), np.nan, np.float32)], ids=["shape", "nan"]
)
def test_dp_fit_refuses_bad_data(x):
    with pytest.raises(ValueError, match="x "):
        dp_fit(TINY_CONFIG, x, epsilon=1.0, delta=1e-5, batch_size=5, verbose=False)


def test_fast_reweight_refuses_per_unit_clipping_everywhere():
    params = init_params(TINY_CONFIG, jax.random.key(0))
    x = jnp.zeros((3, 4), jnp.float32)
    for clipper in (PerUnitClipping(1.0, "neuron"), StochasticSparsification(PerUnitClipping(1.0), 0.5)):
        with pytest.raises(ValueError, match="fast_reweight"):
            make_dp_step(TINY_CONFIG, clipper, "fast_reweight", optax.sgd(1.0), 1.0, 1.0)
        with pytest.raises(ValueError, match="fast_reweight"):
            clipped_grad_sum((TINY_CONFIG, params), x, clipper, "fast_reweight", key=jax.random.key(0))
