"""Poisson subsampling of rows, served as fixed-shape padded chunks.

DP-SGD's accountant assumes Poisson subsampling: every row joins each step's batch
independently with probability q, so batch sizes vary (and may be 0). Shuffled
fixed-size batches are a different mechanism and must not be accounted as Poisson.

Variable batches are split into chunks of a fixed `chunk_size` with a mask, so jitted
consumers see one shape and never recompile; an empty batch is one all-padding chunk, so
the step (and its noise) still happens, exactly as the accountant assumes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _check_num_rows(num_rows: int) -> None:
    if isinstance(num_rows, bool) or int(num_rows) != num_rows or num_rows < 1:
        raise ValueError(f"num_rows must be an integer >= 1, got num_rows={num_rows}.")


def _check_sampling_rate(sampling_rate: float) -> None:
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got sampling_rate={sampling_rate}.")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got chunk_size={chunk_size}.")


def poisson_sample(rng: np.random.Generator, num_rows: int, sampling_rate: float) -> np.ndarray:
    """Includes each row independently with probability `sampling_rate`.

    Drawn as a Bernoulli process: the gaps between included rows are i.i.d.
    Geometric(q), which is exactly independent Bernoulli(q) inclusion of every row, in
    O(batch) time and memory instead of O(N) (it matters for tables of millions of rows).

    Args:
        rng: Source of randomness (any `np.random.Generator`, e.g. one wrapping a
            cryptographically secure bit generator).
        num_rows: Number of rows N >= 1.
        sampling_rate: Inclusion probability q in (0, 1].

    Returns:
        indices: [batch] int64, sorted row indices; `batch` ~ Binomial(N, q), possibly 0.

    Raises:
        ValueError: If an argument is out of range.
    """
    _check_num_rows(num_rows)
    _check_sampling_rate(sampling_rate)
    num_rows, q = int(num_rows), float(sampling_rate)
    if q == 1.0:
        return np.arange(num_rows, dtype=np.int64)
    expected = num_rows * q
    block = int(expected + 6 * math.sqrt(expected) + 16)
    parts, position = [], -1
    while position < num_rows:
        gaps = rng.geometric(q, size=block).astype(np.int64)
        positions = position + np.cumsum(gaps)
        parts.append(positions)
        position = int(positions[-1])
    indices = np.concatenate(parts)
    return indices[: np.searchsorted(indices, num_rows)]


def shard_bounds(num_rows: int, num_shards: int) -> np.ndarray:
    """Row boundaries of `num_shards` contiguous, near-equal shards: [num_shards + 1] int64.

    Shard p holds rows ``bounds[p] : bounds[p + 1]`` (the layout every host derives from the
    public N and process count, so each knows the others' shares without communicating).

    Example:
        >>> shard_bounds(10, 3).tolist()
        [0, 3, 6, 10]
    """
    _check_num_rows(num_rows)
    if isinstance(num_shards, bool) or int(num_shards) != num_shards or not 1 <= num_shards <= num_rows:
        raise ValueError(f"num_shards must be an integer in [1, num_rows={num_rows}], got {num_shards}.")
    return np.array([int(num_rows) * p // int(num_shards) for p in range(int(num_shards) + 1)], dtype=np.int64)


class PoissonSampler:
    """Counter-based Poisson subsampling: step t's batch is a pure function of (seed, t).

    Every row is in step t's batch independently with probability q, and different steps
    are independent. Because the batch of any step can be drawn on its own:

    * a resumed run redraws exactly the batches it lost (no generator state to save);
    * a streaming reader can draw many future steps' batches in advance and collect all
      their rows in one pass over a file;
    * every host of a multi-host run draws the same GLOBAL batch from the shared seed and
      keeps the rows of its own shard, so each row's inclusion is one Bernoulli(q) draw
      overall, and every host knows every other host's share of the batch.

    The default bit generator is numpy's PCG64, which is statistically sound but NOT a
    cryptographic RNG: an adversary who learns the seed can predict the batches (the seed
    is the private ``noise_seed`` and never stored in a model). A deployment can pass a
    CSPRNG-backed bit generator class (for example randomgen's ChaCha) as `bit_generator`.

    Args:
        num_rows: Number of rows N >= 1 (of the whole table, over all hosts).
        sampling_rate: Inclusion probability q in (0, 1].
        seed: Entropy: an int or a sequence of ints.
        bit_generator: A `np.random.BitGenerator` class taking a `SeedSequence`.

    Example:
        >>> sampler = PoissonSampler(num_rows=1000, sampling_rate=0.05, seed=0)
        >>> bool((sampler.indices(3) == sampler.indices(3)).all()), sampler.expected_batch_size
        (True, 50.0)
    """

    def __init__(
        self,
        num_rows: int,
        sampling_rate: float,
        seed: int | Sequence[int],
        *,
        bit_generator: type[np.random.BitGenerator] = np.random.PCG64,
    ) -> None:
        _check_num_rows(num_rows)
        _check_sampling_rate(sampling_rate)
        self.num_rows = int(num_rows)
        self.sampling_rate = float(sampling_rate)
        self._entropy = [int(seed)] if np.ndim(seed) == 0 else [int(s) for s in seed]
        self._bit_generator = bit_generator

    @property
    def expected_batch_size(self) -> float:
        """q * N, the normaliser of the noisy gradient sum."""
        return self.sampling_rate * self.num_rows

    def indices(self, step: int) -> np.ndarray:
        """Sorted global row indices of step `step`'s batch (int64; may be empty)."""
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"step must be an integer >= 0, got step={step}.")
        sequence = np.random.SeedSequence(self._entropy, spawn_key=(int(step),))
        rng = np.random.Generator(self._bit_generator(sequence))
        return poisson_sample(rng, self.num_rows, self.sampling_rate)


def host_chunks(
    batch: np.ndarray, bounds: np.ndarray, process: int, rows: np.ndarray, local_chunk: int, dtype=np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """One process's share of a global batch as fixed-shape padded chunks.

    Every process gets the same number of chunks (enough for the largest share, which
    each can compute from the global batch and the public shard bounds), so the SPMD
    program stays in step and nothing is communicated.

    Args:
        batch: [batch] sorted global row indices of the step.
        bounds: [P + 1] shard bounds (:func:`shard_bounds`).
        process: this process's index.
        rows: [share, d] this process's rows of the batch, in index order.
        local_chunk: rows per chunk and process.

    Returns:
        ``(blocks [chunks, local_chunk, d], masks [chunks, local_chunk] bool)``; padding
        rows are zeros with mask False; an empty batch gives one all-padding chunk.
    """
    _check_chunk_size(local_chunk)
    shares = np.diff(np.searchsorted(batch, bounds))
    if len(rows) != shares[process]:
        raise ValueError(f"process {process} got {len(rows)} rows for its share of {shares[process]}")
    num_chunks = max(1, math.ceil(int(shares.max(initial=0)) / local_chunk))
    blocks = np.zeros((num_chunks * local_chunk, rows.shape[1]), dtype)
    blocks[: len(rows)] = rows
    masks = np.arange(num_chunks * local_chunk) < len(rows)
    return blocks.reshape(num_chunks, local_chunk, -1), masks.reshape(num_chunks, local_chunk)


def steps_for_epochs(num_rows: int, batch_size: int, epochs: float) -> tuple[float, int]:
    """Sampling rate and step count for an expected batch size and number of epochs.

    Args:
        num_rows: Number of rows N >= 1.
        batch_size: Expected batch size in [1, N].
        epochs: Expected passes over the data > 0.

    Returns:
        ``(q, steps)`` with ``q = batch_size / N`` and ``steps = ceil(epochs / q)``.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> steps_for_epochs(32561, 256, 20)
        (0.007862166395380977, 2544)
    """
    _check_num_rows(num_rows)
    is_integer = not isinstance(batch_size, bool) and int(batch_size) == batch_size
    if not (is_integer and 1 <= batch_size <= num_rows):
        raise ValueError(
            f"batch_size must be an integer in [1, num_rows={num_rows}], "
            f"got batch_size={batch_size}."
        )
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got epochs={epochs}.")
    return batch_size / num_rows, math.ceil(epochs * num_rows / batch_size)
