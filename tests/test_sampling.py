"""Tests for dpnf_jax.privacy.sampling: Poisson statistics, padded chunks, resume."""

import doctest
import json
import math

import numpy as np
import pytest

from dpnf_jax.privacy import sampling
from dpnf_jax.privacy.sampling import (
    PoissonBatchSampler,
    padded_chunks,
    poisson_sample,
    steps_for_epochs,
)

NUM_ROWS, RATE, STEPS = 200, 0.1, 2000


def test_module_doctests():
    assert doctest.testmod(sampling).failed == 0


@pytest.fixture(scope="module")
def inclusion_counts_and_sizes():
    rng = np.random.default_rng(0)
    counts = np.zeros(NUM_ROWS, dtype=np.int64)
    sizes = []
    for _ in range(STEPS):
        indices = poisson_sample(rng, NUM_ROWS, RATE)
        counts[indices] += 1
        sizes.append(len(indices))
    return counts, np.array(sizes)


def test_overall_inclusion_rate(inclusion_counts_and_sizes):
    """z-test over N*T Bernoulli trials: sd ~ 4.7e-4, so q off by 10% (0.01) is ~21 sd."""
    counts, _ = inclusion_counts_and_sizes
    trials = NUM_ROWS * STEPS
    z = (counts.sum() - trials * RATE) / math.sqrt(trials * RATE * (1 - RATE))
    assert abs(z) < 4


def test_per_row_inclusion_is_binomial(inclusion_counts_and_sizes):
    """Every row's count ~ Binomial(T, q): each within 5 sd, and dispersion ~ 1.

    Fixed-size shuffled batches give near-identical counts per row (dispersion ~ 0).
    """
    counts, _ = inclusion_counts_and_sizes
    mean, var = STEPS * RATE, STEPS * RATE * (1 - RATE)
    assert np.all(np.abs(counts - mean) < 5 * math.sqrt(var))
    dispersion = counts.var(ddof=1) / var
    assert 0.6 < dispersion < 1.4


def test_batch_sizes_vary_binomially(inclusion_counts_and_sizes):
    _, sizes = inclusion_counts_and_sizes
    assert len(np.unique(sizes)) > 10
    assert sizes.var(ddof=1) / (NUM_ROWS * RATE * (1 - RATE)) == pytest.approx(1.0, abs=0.15)


def test_poisson_sample_output():
    indices = poisson_sample(np.random.default_rng(1), 1000, 0.3)
    assert indices.ndim == 1 and np.all(np.diff(indices) > 0)
    assert indices.min() >= 0 and indices.max() < 1000
    assert len(poisson_sample(np.random.default_rng(1), 10, 1.0)) == 10


def test_poisson_sample_can_be_empty():
    assert len(poisson_sample(np.random.default_rng(2), 1, 1e-9)) == 0


@pytest.mark.parametrize(
    "num_rows, rate, name",
    [
        (0, 0.1, "num_rows"),
        (10, 0.0, "sampling_rate"),
        (10, 1.1, "sampling_rate"),
        (2.5, 0.1, "num_rows"),
    ],
)
def test_poisson_sample_rejects_bad_arguments(num_rows, rate, name):
    with pytest.raises(ValueError, match=name):
        poisson_sample(np.random.default_rng(0), num_rows, rate)


@pytest.mark.parametrize("batch", [1, 7, 8, 9, 23])
def test_padded_chunks(batch):
    chunk_size = 8
    indices = np.sort(np.random.default_rng(batch).choice(1000, size=batch, replace=False))
    chunks = list(padded_chunks(indices, chunk_size))
    assert len(chunks) == math.ceil(batch / chunk_size)
    for idx, mask in chunks:
        assert idx.shape == mask.shape == (chunk_size,)
        assert idx.dtype == np.int32 and mask.dtype == np.bool_
        assert np.all(idx[~mask] == 0)
    masks = np.concatenate([m for _, m in chunks])
    # Real rows first, padding only at the end of the last chunk.
    assert masks.sum() == batch and np.all(masks[:batch]) and not np.any(masks[batch:])
    real = np.concatenate([i[m] for i, m in chunks])
    np.testing.assert_array_equal(real, indices)


def test_empty_batch_gives_one_padding_chunk():
    chunks = list(padded_chunks(np.array([], dtype=np.int64), 16))
    assert len(chunks) == 1
    idx, mask = chunks[0]
    assert idx.shape == (16,) and not mask.any() and not idx.any()


def test_padded_chunks_rejects_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size"):
        padded_chunks(np.arange(3), 0)
    with pytest.raises(ValueError, match="1-D"):
        padded_chunks(np.zeros((2, 2), dtype=int), 4)
    with pytest.raises(ValueError, match="int32"):
        padded_chunks(np.array([2**31]), 4)


def test_sampler_batches():
    sampler = PoissonBatchSampler(num_rows=500, sampling_rate=0.05, chunk_size=8, seed=3)
    assert sampler.expected_batch_size == pytest.approx(25.0)
    sizes = set()
    for _, batch in zip(range(50), sampler):
        sizes.add(batch.batch_size)
        assert batch.chunks and all(i.shape == m.shape == (8,) for i, m in batch.chunks)
        real = np.concatenate([i[m] for i, m in batch.chunks])
        assert len(real) == batch.batch_size and len(np.unique(real)) == batch.batch_size
    assert len(sizes) > 5
    assert sampler.steps_taken == 50


def _batches(sampler, n):
    return [np.concatenate([i[m] for i, m in sampler.sample().chunks]) for _ in range(n)]


def test_sampler_is_deterministic_given_seed():
    first = _batches(PoissonBatchSampler(300, 0.1, 16, seed=7), 5)
    second = _batches(PoissonBatchSampler(300, 0.1, 16, seed=7), 5)
    other = _batches(PoissonBatchSampler(300, 0.1, 16, seed=8), 5)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_sampler_resume_reproduces_future_batches():
    sampler = PoissonBatchSampler(300, 0.1, 16, seed=11)
    _batches(sampler, 4)
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = _batches(sampler, 6)
    resumed = PoissonBatchSampler(300, 0.1, 16, seed=999)
    resumed.load_state_dict(state)
    assert resumed.steps_taken == 4
    assert all(np.array_equal(a, b) for a, b in zip(expected, _batches(resumed, 6)))


def test_sampler_resume_rejects_other_config():
    state = PoissonBatchSampler(300, 0.1, 16, seed=0).state_dict()
    with pytest.raises(ValueError, match="sampling_rate"):
        PoissonBatchSampler(300, 0.2, 16, seed=0).load_state_dict(state)


def test_sampler_accepts_custom_bit_generator():
    sampler = PoissonBatchSampler(300, 0.1, 16, seed=0, bit_generator=np.random.Philox(5))
    expected = poisson_sample(np.random.Generator(np.random.Philox(5)), 300, 0.1)
    np.testing.assert_array_equal(_batches(sampler, 1)[0], expected)


@pytest.mark.parametrize(
    "args, name",
    [
        ((0, 0.1, 4, 0), "num_rows"),
        ((10, 0.0, 4, 0), "sampling_rate"),
        ((10, 0.1, 0, 0), "chunk_size"),
    ],
)
def test_sampler_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        PoissonBatchSampler(*args)


def test_steps_for_epochs():
    rate, steps = steps_for_epochs(32561, 256, 20)
    assert rate == 256 / 32561 and steps == math.ceil(20 / rate) == 2544
    assert steps_for_epochs(100, 10, 1) == (0.1, 10)
    assert steps_for_epochs(100, 100, 2.5) == (1.0, 3)
    bad = [((100, 0, 1), "batch_size"), ((100, 101, 1), "batch_size"), ((100, 10, 0), "epochs")]
    for args, name in bad:
        with pytest.raises(ValueError, match=name):
            steps_for_epochs(*args)
