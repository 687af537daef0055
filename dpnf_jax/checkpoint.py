"""Crash-safe DP-SGD checkpoints that keep the privacy budget.

A checkpoint holds everything a run needs to continue *as if it had never stopped*:
parameters, optimizer state, the number of finished steps (the Poisson sampler is
counter-based: step t's batch is a function of the secret noise seed and t), the noise
seed itself, and the privacy plan (noise multiplier, sampling rate, total steps
and every earlier DP event). Resuming never recalibrates the noise: the run continues
the same mechanism with the same randomness, so the final epsilon equals an
uninterrupted run's and nothing is spent twice or forgotten. Steps redone after a crash
reuse exactly the same batches and noise as the lost ones, which is why a resume also
checks that the data and every privacy-relevant setting are unchanged (reusing noise on
different data would leak).

Checkpoints are operator-side files: besides the DP model state they hold a SHA-256
fingerprint of the encoded training rows (or of the files streamed from) and the secret noise seed.
Do not publish them; publish the final model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpnf_jax.fileio import atomic_write, new_staging_dir, publish_dir, read_versioned_json

CHECKPOINT_FORMAT = "dpnf-jax-checkpoint"
CHECKPOINT_VERSION = 2  # 2: counter-based sampler, no sampler state
_META = "checkpoint.json"
_ARRAYS = "state.npz"


def data_fingerprint(x: np.ndarray | jax.Array) -> str:
    """SHA-256 of the encoded rows (shape, dtype and bytes)."""
    array = np.ascontiguousarray(np.asarray(x))
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def save_checkpoint(directory: str | Path, *, params, opt_state, meta: dict[str, Any]) -> Path:
    """Atomically write a checkpoint directory (stage, then rename over the old one)."""
    directory = Path(directory)
    leaves = jax.tree.leaves((params, opt_state))
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    stage = new_staging_dir(directory)
    try:
        os.chmod(stage, 0o700)  # it holds the secret noise seed: owner only, whatever the umask
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write(stage / _ARRAYS, buffer.getvalue())
        body = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "num_leaves": len(leaves), **meta}
        atomic_write(stage / _META, json.dumps(body, indent=2))
        for name in (_ARRAYS, _META):
            os.chmod(stage / name, 0o600)
        return publish_dir(stage, directory)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint's metadata, or None when there is no checkpoint there."""
    path = Path(directory) / _META
    if not path.is_file():
        return None
    return read_versioned_json(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint")


def load_checkpoint_state(directory: str | Path, params_like, opt_state_like):
    """(params, opt_state) from a checkpoint, shaped like the given templates."""
    path = Path(directory) / _ARRAYS
    template_leaves, treedef = jax.tree.flatten((params_like, opt_state_like))
    try:
        with np.load(path) as stored:
            arrays = [stored[f"leaf_{i:05d}"] for i in range(len(template_leaves))]
    except Exception as err:  # a damaged archive raises several types
        raise ValueError(f"{path}: corrupted checkpoint state ({err})") from err
    leaves = []
    for i, (array, like) in enumerate(zip(arrays, template_leaves)):
        if array.shape != np.shape(like):
            raise ValueError(f"{path}: leaf {i} has shape {array.shape}, expected {np.shape(like)}")
        leaves.append(jnp.asarray(array, dtype=jnp.asarray(like).dtype))
    return jax.tree.unflatten(treedef, leaves)
