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
from collections.abc import Iterator
from typing import Any, NamedTuple

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
    return np.flatnonzero(rng.random(int(num_rows)) < sampling_rate)


def padded_chunks(indices: np.ndarray, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Splits a batch of row indices into fixed-shape chunks with a validity mask.

    Args:
        indices: [batch] row indices (batch may be 0).
        chunk_size: Rows per chunk >= 1.

    Returns:
        An iterator of ``(idx, mask)`` with idx: [chunk_size] int32 and
        mask: [chunk_size] bool. The last chunk is padded with index 0 and mask False;
        an empty batch yields one all-padding chunk.

    Raises:
        ValueError: If `indices` is not 1-D or outside int32, or `chunk_size` is invalid.
    """
    _check_chunk_size(chunk_size)
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}.")
    if len(indices) and not 0 <= indices.min() <= indices.max() <= np.iinfo(np.int32).max:
        raise ValueError("indices must lie in [0, 2**31 - 1] to fit int32.")
    num_chunks = max(1, math.ceil(len(indices) / chunk_size))
    padded = np.zeros(num_chunks * chunk_size, dtype=np.int32)
    padded[: len(indices)] = indices
    mask = np.arange(num_chunks * chunk_size) < len(indices)
    return zip(padded.reshape(num_chunks, chunk_size), mask.reshape(num_chunks, chunk_size))


class PoissonBatch(NamedTuple):
    """One logical DP-SGD batch.

    Attributes:
        chunks: ``[(idx [chunk_size] int32, mask [chunk_size] bool), ...]``, at least one.
        batch_size: Number of real (unmasked) rows in the batch.
    """

    chunks: list[tuple[np.ndarray, np.ndarray]]
    batch_size: int


class PoissonBatchSampler:
    """Endless, resumable stream of Poisson-subsampled batches as padded chunks.

    Iterating yields one `PoissonBatch` per DP-SGD step. The stream is deterministic
    given `seed`; `state_dict` / `load_state_dict` resume it exactly.

    The default bit generator is numpy's PCG64, which is statistically sound but NOT a
    cryptographic RNG: an adversary who learns its state can predict the batches. A
    production deployment can pass a CSPRNG-backed `np.random.BitGenerator` (for
    example randomgen's ChaCha or AESCounter) as `bit_generator`.

    Args:
        num_rows: Number of rows N >= 1.
        sampling_rate: Inclusion probability q in (0, 1].
        chunk_size: Rows per padded chunk >= 1.
        seed: Seed of the default PCG64 bit generator.
        bit_generator: Bit generator to use instead of ``PCG64(seed)``.

    Example:
        >>> sampler = PoissonBatchSampler(num_rows=1000, sampling_rate=0.05, chunk_size=32, seed=0)
        >>> batch = next(iter(sampler))
        >>> batch.chunks[0][0].shape, sum(int(m.sum()) for _, m in batch.chunks) == batch.batch_size
        ((32,), True)
    """

    def __init__(
        self,
        num_rows: int,
        sampling_rate: float,
        chunk_size: int,
        seed: int,
        *,
        bit_generator: np.random.BitGenerator | None = None,
    ) -> None:
        _check_num_rows(num_rows)
        _check_sampling_rate(sampling_rate)
        _check_chunk_size(chunk_size)
        self.num_rows = int(num_rows)
        self.sampling_rate = float(sampling_rate)
        self.chunk_size = int(chunk_size)
        self.steps_taken = 0
        self._rng = np.random.Generator(
            np.random.PCG64(seed) if bit_generator is None else bit_generator
        )

    @property
    def expected_batch_size(self) -> float:
        """q * N, the normaliser of the noisy gradient sum."""
        return self.sampling_rate * self.num_rows

    def sample(self) -> PoissonBatch:
        """Draws the next step's batch."""
        indices = poisson_sample(self._rng, self.num_rows, self.sampling_rate)
        self.steps_taken += 1
        return PoissonBatch(list(padded_chunks(indices, self.chunk_size)), len(indices))

    def __iter__(self) -> Iterator[PoissonBatch]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able configuration, step count and bit-generator state."""
        return {
            "num_rows": self.num_rows,
            "sampling_rate": self.sampling_rate,
            "chunk_size": self.chunk_size,
            "steps_taken": self.steps_taken,
            "bit_generator": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from `state_dict()` output; the configuration must match.

        Raises:
            ValueError: If `state` was saved with a different num_rows, sampling_rate
                or chunk_size (resuming with another q would break the accounting), or
                for a different bit generator type.
        """
        for name in ("num_rows", "sampling_rate", "chunk_size"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"Cannot resume: state has {name}={state[name]}, sampler has "
                    f"{name}={getattr(self, name)}."
                )
        self._rng.bit_generator.state = state["bit_generator"]
        self.steps_taken = int(state["steps_taken"])


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
