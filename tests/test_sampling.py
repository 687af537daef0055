"""Tests for dpnf_jax.privacy.sampling: Poisson statistics, padded chunks, resume."""

import doctest
import math

import numpy as np
import pytest

from dpnf_jax.privacy import sampling
from dpnf_jax.privacy.sampling import (
    PoissonSampler,
    host_chunks,
    poisson_sample,
    shard_bounds,
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


def test_sampler_draws_each_step_independently_and_reproducibly():
    sampler = PoissonSampler(num_rows=500, sampling_rate=0.05, seed=[3, 1])
    assert sampler.expected_batch_size == pytest.approx(25.0)
    batches = [sampler.indices(t) for t in range(300)]
    # Counter-based: step t is the same whenever (and in whatever order) it is drawn.
    assert all(np.array_equal(sampler.indices(t), batches[t]) for t in (299, 0, 17))
    again = PoissonSampler(500, 0.05, seed=[3, 1])
    assert all(np.array_equal(again.indices(t), batches[t]) for t in range(10))
    other = PoissonSampler(500, 0.05, seed=[3, 2])
    assert not all(np.array_equal(other.indices(t), batches[t]) for t in range(10))
    for batch in batches:
        assert batch.dtype == np.int64 and np.all(np.diff(batch) > 0) and (len(batch) == 0 or batch[-1] < 500)
    assert len({len(b) for b in batches}) > 5


def test_sampler_steps_are_independent():
    """Joint inclusion of a row in consecutive steps ~ q^2 (not 0 as without-replacement epochs give)."""
    q, rows, steps = 0.2, 400, 1500
    sampler = PoissonSampler(rows, q, seed=9)
    member = np.zeros((steps, rows), bool)
    for t in range(steps):
        member[t, sampler.indices(t)] = True
    both = (member[1:] & member[:-1]).mean()
    trials = (steps - 1) * rows
    z = (both - q * q) / math.sqrt(q * q * (1 - q * q) / trials)
    assert abs(z) < 5, (both, q * q)
    # Two different rows in the same step are independent too.
    pair = (member[:, ::2] & member[:, 1::2]).mean()
    assert abs(pair - q * q) < 5 * math.sqrt(q * q / (steps * rows / 2))


def test_sampler_inclusion_rate_on_ten_million_rows():
    """The geometric-gap sampler at census scale: q = 1e-4 on 10M rows, 200 steps."""
    rows, q, steps = 10_000_000, 1e-4, 200
    sampler = PoissonSampler(rows, q, seed=0)
    sizes = np.array([len(sampler.indices(t)) for t in range(steps)])
    mean, var = rows * q, rows * q * (1 - q)
    z = (sizes.sum() - steps * mean) / math.sqrt(steps * var)
    assert abs(z) < 4
    assert sizes.var(ddof=1) / var == pytest.approx(1.0, abs=0.3)
    # Spread over the whole table, not bunched at its start.
    last = np.concatenate([sampler.indices(t) for t in range(20)])
    assert last.max() > 0.99 * rows and last.min() < 0.01 * rows


def test_sampler_accepts_custom_bit_generator():
    sampler = PoissonSampler(300, 0.1, seed=5, bit_generator=np.random.Philox)
    expected = poisson_sample(np.random.Generator(np.random.Philox(np.random.SeedSequence([5], spawn_key=(2,)))), 300, 0.1)
    np.testing.assert_array_equal(sampler.indices(2), expected)


@pytest.mark.parametrize(
    "args, name",
    [
        ((0, 0.1, 0), "num_rows"),
        ((10, 0.0, 0), "sampling_rate"),
        ((10, 1.5, 0), "sampling_rate"),
    ],
)
def test_sampler_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        PoissonSampler(*args)
    with pytest.raises(ValueError, match="step"):
        PoissonSampler(10, 0.5, 0).indices(-1)


def test_shard_bounds():
    assert shard_bounds(10, 3).tolist() == [0, 3, 6, 10]
    assert shard_bounds(7, 1).tolist() == [0, 7]
    bounds = shard_bounds(1_000_003, 8)
    assert bounds[0] == 0 and bounds[-1] == 1_000_003 and np.ptp(np.diff(bounds)) <= 1
    for bad in (0, 11, 2.5):
        with pytest.raises(ValueError, match="num_shards"):
            shard_bounds(10, bad)


def test_host_chunks_give_every_process_the_same_number_of_chunks():
    bounds = shard_bounds(100, 2)
    batch = np.array([1, 2, 3, 50, 60, 61, 62, 63, 70, 99])  # 3 rows on host 0, 7 on host 1
    shares = [batch[batch < 50], batch[batch >= 50]]
    out = [host_chunks(batch, bounds, p, shares[p][:, None].astype(np.float32), 4) for p in (0, 1)]
    (blocks0, masks0), (blocks1, masks1) = out
    assert blocks0.shape == blocks1.shape == (2, 4, 1) and masks0.shape == (2, 4)
    np.testing.assert_array_equal(blocks0[masks0][:, 0], [1, 2, 3])
    np.testing.assert_array_equal(blocks1[masks1][:, 0], [50, 60, 61, 62, 63, 70, 99])
    assert not blocks0[~masks0].any()
    empty_blocks, empty_masks = host_chunks(np.zeros(0, np.int64), bounds, 0, np.zeros((0, 3)), 8)
    assert empty_blocks.shape == (1, 8, 3) and not empty_masks.any()
    with pytest.raises(ValueError, match="share"):
        host_chunks(batch, bounds, 0, np.zeros((2, 1)), 4)


def test_steps_for_epochs():
    rate, steps = steps_for_epochs(32561, 256, 20)
    assert rate == 256 / 32561 and steps == math.ceil(20 / rate) == 2544
    assert steps_for_epochs(100, 10, 1) == (0.1, 10)
    assert steps_for_epochs(100, 100, 2.5) == (1.0, 3)
    bad = [((100, 0, 1), "batch_size"), ((100, 101, 1), "batch_size"), ((100, 10, 0), "epochs")]
    for args, name in bad:
        with pytest.raises(ValueError, match=name):
            steps_for_epochs(*args)
