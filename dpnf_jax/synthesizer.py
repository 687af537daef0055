"""DPFlowSynthesizer: a DataFrame and a budget in, a synthetic table and a report out.

>>> from dpnf_jax import DPFlowSynthesizer, datasets      # doctest: +SKIP
>>> train, test = datasets.load_adult()                   # doctest: +SKIP
>>> synth = DPFlowSynthesizer(datasets.adult_schema(), epsilon=1.0).fit(train)  # doctest: +SKIP
>>> rows = synth.sample(1000, seed=0)                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from scipy import special
from tqdm.auto import tqdm

from dpnf_jax.checkpoint import read_checkpoint_meta
from dpnf_jax.data.encode import ClippingWarning, TabularEncoder
from dpnf_jax.data.marginal import DPMarginalEncoder, histogram_noise_multiplier
from dpnf_jax.data.schema import ContinuousColumn, Schema
from dpnf_jax.data.schema_dp import events_from_dicts, events_to_dicts
from dpnf_jax.data.stream import ArrayRows, StreamRows, TableFile, scan
from dpnf_jax.fileio import atomic_write, new_staging_dir, publish_dir, read_versioned_json
from dpnf_jax.flows import model
from dpnf_jax.flows.model import FlowConfig
from dpnf_jax.privacy.accounting import event_from_dict, event_to_dict
from dpnf_jax.privacy.clipping import Clipper, FlatClipping, clipper_from_dict
from dpnf_jax.privacy.sampling import shard_bounds
from dpnf_jax.train import (
    DPReport,
    all_processes_agree,
    dp_fit,
    fit_nonprivate,
    raise_together,
    same_on_every_process,
    sum_over_processes,
)

MODEL_FORMAT = "dpnf-jax-model"
MODEL_VERSION = 1
ENCODINGS = ("marginal", "onehot", "ordinal")
_META_FILE = "dpnf_model.json"
_PARAMS_FILE = "params.npz"


def gaussianize_ranks(x: np.ndarray) -> np.ndarray:
    """Map each column's ranks to standard-normal quantiles, [n, d] -> [n, d].

    Post-processing of generated samples only: the flow supplies the dependence (the
    ranks), the DP histograms behind the marginal encoder supply every marginal.
    """
    n = x.shape[0]
    ranks = np.argsort(np.argsort(x, axis=0, kind="stable"), axis=0)
    return special.ndtri((ranks + 0.5) / n)


def default_delta(num_rows: int) -> float:
    """``min(1e-5, 0.1 / N)``: comfortably below 1/N, as DP practice asks."""
    return min(1e-5, 0.1 / num_rows)


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """Training settings (public choices; see the README for how defaults were chosen)."""

    epochs: float = 20.0
    batch_size: int = 1024
    learning_rate: float = 3e-3
    grad_method: str = "fast"
    accountant: str = "pld"


class DPFlowSynthesizer:
    """Differentially private synthetic data with a conditional spline flow (DP-HFlow).

    Args:
      schema: the PUBLIC schema of the table.
      epsilon: total privacy budget; ``None`` trains WITHOUT privacy (reference runs only).
      delta: target delta; default ``min(1e-5, 0.1 / N)`` once N is known.
      encoding: "marginal" (DP 1-way histograms -> Gaussian copula, one dim per column;
        spends ``marginal_share`` of epsilon), "onehot" or "ordinal" (schema-only).
      marginal_share: fraction of epsilon given to the histogram release.
      marginal_bins: equal-width bins per continuous column for the histograms.
      calibrate_marginals: with the marginal encoding, map each sampled column's ranks
        to normal quantiles before decoding, so every synthetic marginal follows its DP
        histogram exactly while the flow supplies the dependence (post-processing, free).
      num_blocks, hidden, num_bins, bound, activation, shared: the flow (see FlowConfig).
      clipper: clipping strategy (default flat, C = 1).
      epochs, batch_size, learning_rate, grad_method, accountant: training.
      seed: seeds the public randomness (initialisation, dequantisation).
      noise_seed: seeds the PRIVATE randomness (histogram noise, Poisson sampling, DP-SGD
        noise). None (default) draws 128 fresh bits from the OS and never stores them in
        the model; fix it only for reproducible experiments: a known noise seed voids the
        guarantee.
      mesh: optional one-axis device mesh for data-parallel DP-SGD (see
        :func:`dpnf_jax.train.dp_fit`); performance only, not saved with the model.
      verbose: progress bar during training.
      schema_events: ``[(label, dp_accounting.DpEvent)]`` already spent on these rows to
        build the schema (``Schema.infer_dp``). They are composed first in the same
        accountant; `epsilon` stays the TOTAL budget (DP-SGD gets what is left).
    """

    def __init__(
        self,
        schema: Schema,
        epsilon: float | None = 1.0,
        delta: float | None = None,
        *,
        encoding: str = "marginal",
        marginal_share: float = 0.5,
        marginal_bins: int = 20,
        calibrate_marginals: bool = True,
        num_blocks: int = 4,
        hidden: tuple[int, ...] = (128, 128),
        num_bins: int = 8,
        bound: float = 4.0,
        activation: str = "relu",
        shared: bool = True,
        clipper: Clipper | None = None,
        epochs: float = 20.0,
        batch_size: int = 1024,
        learning_rate: float = 3e-3,
        grad_method: str = "fast",
        accountant: str = "pld",
        seed: int = 0,
        noise_seed: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        verbose: bool = True,
        schema_events: Sequence[tuple[str, dp_accounting.DpEvent]] = (),
    ):
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a dpnf_jax.Schema, got {type(schema).__name__}")
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a positive finite number (or None for no privacy), got {epsilon!r}")
        if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if not 0 < marginal_share < 1:
            raise ValueError(f"marginal_share must be in (0, 1), got {marginal_share!r}")
        self.schema_events = _check_schema_events(schema_events)
        self.schema = schema
        self.epsilon = None if epsilon is None else float(epsilon)
        self.delta = None if delta is None else float(delta)
        self.encoding = encoding
        self.marginal_share = float(marginal_share)
        self.marginal_bins = int(marginal_bins)
        self.calibrate_marginals = bool(calibrate_marginals)
        self.flow_options = dict(
            num_blocks=num_blocks, hidden=tuple(hidden), num_bins=num_bins, bound=bound, activation=activation, shared=shared
        )
        self.clipper = FlatClipping(1.0) if clipper is None else clipper
        self.training = TrainingOptions(float(epochs), int(batch_size), float(learning_rate), grad_method, accountant)
        self.seed = int(seed)
        self.noise_seed = None if noise_seed is None else int(noise_seed)
        self.noise_seed_fixed = noise_seed is not None
        self.mesh = mesh
        self.verbose = verbose
        self.encoder: TabularEncoder | DPMarginalEncoder | None = None
        self.config: FlowConfig | None = None
        self.params = None
        self.report: DPReport | None = None
        self.num_rows: int | None = None
        self.delta_was_default = delta is None
        self.scan_seconds: float | None = None  # fit_stream's validating pass (wall time)
        # Validate the flow options now, not after the data were touched.
        FlowConfig(dim=1, **self.flow_options)

    # ------------------------------------------------------------------ training

    def fit(
        self,
        df: pd.DataFrame,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
    ) -> "DPFlowSynthesizer":
        """Train on the private rows ``df`` (validated against the schema first).

        Args:
          df: the private rows.
          checkpoint_dir, checkpoint_every, resume: crash-safe checkpoints (see
            :func:`dpnf_jax.train.dp_fit`). A resumed run reuses the histograms already
            released (stored in the checkpoint) instead of releasing new ones, and ends
            with the same model and the same epsilon as an uninterrupted run.
        """
        self.schema.validate_frame(df)
        self.scan_seconds = None  # no validating pass over a file here (a reused synthesizer keeps no stale time)
        n = len(df)
        delta = default_delta(n) if self.delta is None else self.delta
        if self.epsilon is not None and delta >= 1.0 / n:
            warnings.warn(f"delta={delta:g} is not below 1/N = {1.0 / n:.3g}: the guarantee is weak", stacklevel=2)
        saved = self._read_checkpoint(checkpoint_dir, resume)
        noise_seed = self._noise_seed(saved)
        encoder = self._new_encoder(saved)
        prior_events = self._prior_events(saved)
        if isinstance(encoder, DPMarginalEncoder) and encoder.noisy_counts is None:
            if self.epsilon is None:
                encoder.fit_nonprivate(df)
            else:
                sigma = histogram_noise_multiplier(self.marginal_share * self.epsilon, self.marginal_share * delta)
                event = encoder.fit_with_noise_multiplier(df, sigma, np.random.default_rng([noise_seed, 3]))
                prior_events.append(("marginal histograms", event))
        # Independent random streams for the histogram noise and the dequantisation noise,
        # so a resume can skip the first and still encode identically.
        x = encoder.encode(df, np.random.default_rng([self.seed, 2]))
        return self._train(encoder, x, n, delta, noise_seed, prior_events, checkpoint_dir, checkpoint_every, resume)

    def _read_checkpoint(self, checkpoint_dir, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume from (None: start fresh); every process must see the same.

        The checkpoint's released histograms and prior events are reused, never spent
        again, so a resume is refused unless it was made with this synthesizer's schema
        and schema events (the report would otherwise list events the spent epsilon
        does not include, or the bounds would change mid-run).
        """
        saved = read_checkpoint_meta(checkpoint_dir) if (resume and checkpoint_dir is not None) else None
        all_processes_agree(json.dumps(saved, sort_keys=True),
                            f"the checkpoint in {checkpoint_dir} (keep it where every host sees it)")
        if saved is not None:
            extra = saved.get("extra") or {}
            as_saved = lambda value: json.loads(json.dumps(value))  # noqa: E731 (tuples become lists, as in the file)
            if extra.get("schema") != as_saved(self.schema.to_dict()):
                raise ValueError(f"cannot resume from {checkpoint_dir}: it was made with another schema")
            if extra.get("schema_events") != as_saved(events_to_dicts(self.schema_events)):
                raise ValueError(f"cannot resume from {checkpoint_dir}: it was made with other schema_events "
                                 "(the privacy spent on the schema)")
        return saved

    def _noise_seed(self, saved: dict[str, Any] | None) -> int:
        """The private seed: the checkpoint's, the user's, or 128 OS bits (process 0's on every process)."""
        if saved is not None:
            return int(saved["noise_seed"])
        seed = secrets.randbits(128) if self.noise_seed is None else self.noise_seed
        return same_on_every_process(seed)

    def _new_encoder(self, saved: dict[str, Any] | None) -> TabularEncoder | DPMarginalEncoder:
        """A fresh encoder, or the one a checkpoint stored (already released: never again)."""
        if self.encoding != "marginal":
            return TabularEncoder(self.schema, categorical=self.encoding)
        if saved is not None and saved.get("extra"):
            return DPMarginalEncoder.from_dict(saved["extra"]["encoder"])
        return DPMarginalEncoder(self.schema, self.marginal_bins)

    def _prior_events(self, saved: dict[str, Any] | None) -> list[tuple[str, dp_accounting.DpEvent]]:
        if saved is not None and saved.get("extra"):
            return [(e["label"], event_from_dict(e)) for e in saved["extra"]["prior_events"]]
        return list(self.schema_events)

    def _train(self, encoder, x, n, delta, noise_seed, prior_events, checkpoint_dir, checkpoint_every, resume,
               prefetch_rows: int = 1 << 20) -> "DPFlowSynthesizer":
        """Fit the flow to encoded rows ``x`` (an array or a row source) and keep the result."""
        extra = {
            "encoder": encoder.to_dict(),
            "prior_events": [{"label": label, **event_to_dict(e)} for label, e in prior_events],
            "schema": self.schema.to_dict(),
            "schema_events": events_to_dicts(self.schema_events),
        }
        if jax.process_count() > 1 and isinstance(x, np.ndarray):
            # Every process was given the whole table: each feeds DP-SGD its own shard.
            lo, hi = (int(v) for v in shard_bounds(n, jax.process_count())[jax.process_index() : jax.process_index() + 2])
            x = ArrayRows(x[lo:hi], num_rows=n, row_offset=lo)
        config = FlowConfig(dim=encoder.dim, **self.flow_options)
        params = model.init_params(config, jax.random.key(self.seed))
        optimizer = optax.adam(self.training.learning_rate)
        batch_size = min(self.training.batch_size, n)
        if self.epsilon is None:
            params = fit_nonprivate(
                (config, params), x, epochs=self.training.epochs, batch_size=batch_size,
                optimizer=optimizer, seed=self.seed, verbose=self.verbose,
            )
            report = None
        else:
            params, report = dp_fit(
                (config, params), x, epsilon=self.epsilon, delta=delta, epochs=self.training.epochs,
                batch_size=batch_size, clipper=self.clipper, method=self.training.grad_method,
                optimizer=optimizer, seed=self.seed, noise_seed=noise_seed, accountant=self.training.accountant,
                prior_events=prior_events, verbose=self.verbose, checkpoint_dir=checkpoint_dir,
                checkpoint_every=checkpoint_every, resume=resume, checkpoint_extra=extra, mesh=self.mesh,
                prefetch_rows=prefetch_rows,
            )
        self.encoder, self.config, self.params, self.report = encoder, config, params, report
        self.num_rows, self.delta = n, delta
        return self

    def fit_stream(
        self,
        data: str | os.PathLike | Sequence[str | os.PathLike] | TableFile,
        *,
        chunk_rows: int = 65536,
        prefetch_rows: int = 1 << 20,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
    ) -> "DPFlowSynthesizer":
        """Train on a CSV or Parquet table that need not fit in memory.

        The table is read in chunks of ``chunk_rows``, never whole:

        1. one pass validates every row against the schema (errors name the rows, the
           column and the value) and, for the marginal encoding, adds up the exact 1-way
           histogram counts, which are then released ONCE with Gaussian noise;
        2. DP-SGD draws the Poisson batches of about ``prefetch_rows / batch_size``
           future steps at once (every row in every step independently with probability
           q) and collects their rows in one further pass, encoding only those rows.

        Memory stays about ``chunk_rows + prefetch_rows`` rows plus the model, whatever
        the table's size. Under ``jax.distributed.initialize`` every process reads only
        its shard of the rows (:func:`dpnf_jax.privacy.sampling.shard_bounds`), the
        histogram counts are summed over processes before the noise is added, and
        ``mesh`` must span every process's devices. DP-SGD only (``epsilon`` set).

        Args:
          data: a path, a glob pattern, a list of paths or a :class:`TableFile`.
          chunk_rows: rows per read chunk.
          prefetch_rows: sampled rows fetched per pass over the table.
          checkpoint_dir, checkpoint_every, resume: as in :meth:`fit`.
        """
        if self.epsilon is None:
            raise ValueError("fit_stream trains with DP-SGD; a non-private reference run needs fit(df) in memory")
        table = data if isinstance(data, TableFile) else TableFile(data, self.schema, chunk_rows=chunk_rows)
        if table.schema != self.schema:
            raise ValueError("the TableFile was made with another schema than the synthesizer's")
        n = table.num_rows
        # Overlapping shards would count a row twice in the summed histograms.
        all_processes_agree(str(n), "the number of rows N of the table")
        processes, process = jax.process_count(), jax.process_index()
        lo, hi = (int(b) for b in shard_bounds(n, processes)[process : process + 2])
        delta = default_delta(n) if self.delta is None else self.delta
        if delta >= 1.0 / n:
            warnings.warn(f"delta={delta:g} is not below 1/N = {1.0 / n:.3g}: the guarantee is weak", stacklevel=2)
        saved = self._read_checkpoint(checkpoint_dir, resume)
        noise_seed, released = self._noise_seed(saved), saved is not None and bool(saved.get("extra"))

        # Pass 1: validate everything; count what the histograms need; count clipping;
        # hash the contents (a resume must see the same rows).
        encoder = self._new_encoder(saved)
        counting = isinstance(encoder, DPMarginalEncoder) and not released
        counts = None
        clipped = dict.fromkeys((c.name for c in self.schema if isinstance(c, ContinuousColumn)), 0)
        digest = hashlib.sha256()
        scan_started = time.perf_counter()
        bar = tqdm(total=hi - lo, unit="rows", unit_scale=True, desc="validate + count", disable=not self.verbose,
                   dynamic_ncols=True)
        error = None
        try:
            for _, frame, parsed in scan(table, lo, hi):
                bar.update(len(frame))
                digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
                if counting:
                    part = encoder.exact_counts(frame, parsed)
                    counts = part if counts is None else [a + b for a, b in zip(counts, part)]
                for column in self.schema:
                    if column.name in clipped:
                        v = parsed[column.name]
                        clipped[column.name] += int(np.sum((v < column.lower) | (v > column.upper)))
        except (ValueError, OSError) as err:  # an unreadable shard, too, stops every host
            error = err
        finally:
            bar.close()
        raise_together(error)  # a bad row on one host stops every host, before anything is spent
        self.scan_seconds = time.perf_counter() - scan_started
        clipped = {k: int(v) for k, v in sum_over_processes(clipped).items()}
        if any(clipped.values()):
            detail = ", ".join(f"{k}={v}" for k, v in clipped.items() if v)
            warnings.warn(f"{sum(clipped.values())} value(s) will be clipped to the public schema bounds: {detail}",
                          ClippingWarning, stacklevel=2)
        prior_events = self._prior_events(saved)
        if counting:
            counts = sum_over_processes(dict(enumerate(counts)))
            sigma = histogram_noise_multiplier(self.marginal_share * self.epsilon, self.marginal_share * delta)
            event = encoder.release(list(counts.values()), sigma, np.random.default_rng([noise_seed, 3]))
            prior_events.append(("marginal histograms", event))

        def encode(frame, rng):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ClippingWarning)  # counted once, above
                return encoder.encode(frame, rng)

        rows = StreamRows(table, encode, encoder.dim, seed=self.seed, row_range=(lo, hi), content_digest=digest.hexdigest())
        return self._train(encoder, rows, n, delta, noise_seed, prior_events, checkpoint_dir, checkpoint_every,
                           resume, prefetch_rows=prefetch_rows)

    def _require_fit(self) -> None:
        if self.params is None:
            raise RuntimeError("DPFlowSynthesizer: call fit() or load() first")

    # ------------------------------------------------------------------ using it

    def sample(self, n: int, seed: int | None = None) -> pd.DataFrame:
        """``n`` synthetic rows (same seed, same rows; also after save/load)."""
        self._require_fit()
        if not (isinstance(n, (int, np.integer)) and n > 0):
            raise ValueError(f"number of rows must be a positive integer, got {n!r}")
        seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)
        key = jax.random.key(seed)
        chunk = 8192
        draw = jax.jit(lambda p, k: model.sample(self.config, p, k, chunk))
        parts = [np.asarray(draw(self.params, jax.random.fold_in(key, i))) for i in range(math.ceil(n / chunk))]
        x = np.concatenate(parts)[:n].astype(np.float64)
        # The flow is invertible on all of R^d, but guard the decoder against overflow anyway.
        x = np.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6)
        if self.encoding == "marginal" and self.calibrate_marginals:
            x = gaussianize_ranks(x)
        return self.encoder.decode(x)

    def log_prob(self, df: pd.DataFrame, seed: int = 0) -> np.ndarray:
        """Exact flow log-density of each row's encoding, [n] (dequantised with ``seed``)."""
        self._require_fit()
        x = jnp.asarray(self.encoder.encode(df, seed))
        fn = jax.jit(jax.vmap(lambda p, xi: model.log_prob(self.config, p, xi), in_axes=(None, 0)))
        return np.concatenate([np.asarray(fn(self.params, x[i : i + 8192])) for i in range(0, x.shape[0], 8192)])

    def privacy_report(self) -> dict[str, Any]:
        """What is guaranteed, at which (epsilon, delta), and every DP event spent."""
        self._require_fit()
        # A "dp" schema is covered only when its events were composed into epsilon.
        covers_schema = self.schema.covers_schema_privacy and (
            self.schema.provenance != "dp" or bool(self.schema_events)
        )
        report: dict[str, Any] = {
            "private": self.report is not None,
            "epsilon": None if self.report is None else self.report.epsilon,
            "delta": self.delta,
            "delta_source": "default min(1e-5, 0.1/N)" if self.delta_was_default else "user",
            "num_rows": self.num_rows,
            "schema_provenance": self.schema.provenance,
            "guarantee_covers_schema": covers_schema,
            "schema_events": events_to_dicts(self.schema_events),
            "encoding": self.encoding,
            "training": None if self.report is None else self.report.to_dict(),
        }
        notes = []
        if self.noise_seed_fixed:
            notes.append(
                "The noise seed was fixed by the user (noise_seed): the guarantee holds only while that "
                "seed stays secret; it is not stored in the model."
            )
        if self.report is None:
            notes.append("Trained WITHOUT differential privacy: no guarantee at all.")
        if self.schema.provenance == "dp" and not self.schema_events:
            notes.append(
                "The schema has provenance 'dp' but no schema_events were given: the privacy "
                "cost of discovering it is NOT included in epsilon."
            )
        elif self.schema.provenance == "dp-guessed-kinds":
            notes.append(
                "The schema's bounds and categories were released under DP, but the kinds of some columns "
                "(text or number, integer, nullable) were guessed from the private values (`dpnf schema` "
                "without declaring them): the guarantee does NOT cover those kinds."
            )
        elif not covers_schema:
            notes.append(
                "The schema was inferred from the private rows without privacy "
                "(Schema.infer_nonprivate): the guarantee does NOT cover the schema's bounds and categories."
            )
        report["notes"] = notes
        return report

    # ------------------------------------------------------------------ storage

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model directory atomically (temporary directory, then rename).

        Holds schema, encoder settings (with the DP histograms), flow config, parameters
        and the privacy report; never training rows.
        """
        self._require_fit()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "encoding": self.encoding,
            "encoder": self.encoder.to_dict(),
            "flow": self.config.to_dict(),
            "settings": {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "delta_was_default": self.delta_was_default,
                "marginal_share": self.marginal_share,
                "marginal_bins": self.marginal_bins,
                "calibrate_marginals": self.calibrate_marginals,
                "clipper": self.clipper.to_dict(),
                "training": dataclasses.asdict(self.training),
                "seed": self.seed,
                "noise_seed_fixed": self.noise_seed_fixed,
                "num_rows": self.num_rows,
                "schema_events": events_to_dicts(self.schema_events),
            },
            "report": None if self.report is None else self.report.to_dict(),
        }
        flat = {"/".join(str(k.key) for k in kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(self.params)}
        stage = new_staging_dir(path)
        try:
            atomic_write(stage / _META_FILE, json.dumps(meta, indent=2))
            buffer = io.BytesIO()
            np.savez(buffer, **flat)
            atomic_write(stage / _PARAMS_FILE, buffer.getvalue())
            return publish_dir(stage, path)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, verbose: bool = True) -> "DPFlowSynthesizer":
        """Load a model directory written by :meth:`save`; clear errors for anything else."""
        path = Path(path)
        meta_path, params_path = path / _META_FILE, path / _PARAMS_FILE
        if not path.is_dir() or not meta_path.is_file() or not params_path.is_file():
            raise ValueError(f"{path}: not a dpnf-jax model directory (expected {_META_FILE} and {_PARAMS_FILE})")
        meta = read_versioned_json(meta_path, MODEL_FORMAT, MODEL_VERSION, "model")
        try:
            settings = meta["settings"]
            encoder_dict = meta["encoder"]
            encoder = (
                DPMarginalEncoder.from_dict(encoder_dict)
                if meta["encoding"] == "marginal"
                else TabularEncoder.from_dict(encoder_dict)
            )
            config = FlowConfig.from_dict(meta["flow"])
            synth = cls(
                encoder.schema,
                settings["epsilon"],
                settings["delta"],
                encoding=meta["encoding"],
                marginal_share=settings["marginal_share"],
                marginal_bins=settings["marginal_bins"],
                calibrate_marginals=settings["calibrate_marginals"],
                clipper=clipper_from_dict(settings["clipper"]),
                seed=settings["seed"],
                verbose=verbose,
                schema_events=events_from_dicts(settings.get("schema_events", [])),
                **{k: v for k, v in config.to_dict().items() if k not in ("dim", "perm_seed")},
                **settings["training"],
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"{meta_path}: incomplete or malformed model metadata ({err!r})") from err
        expected = model.init_params(config, jax.random.key(0))
        try:
            with np.load(params_path) as stored:
                arrays = dict(stored)
        except Exception as err:  # numpy raises several types for a damaged archive
            raise ValueError(f"{params_path}: corrupted parameter file ({err})") from err
        leaves = []
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(expected):
            name = "/".join(str(k.key) for k in key_path)
            if name not in arrays or arrays[name].shape != leaf.shape:
                raise ValueError(f"{params_path}: parameter {name!r} missing or of the wrong shape")
            leaves.append(jnp.asarray(arrays[name], leaf.dtype))
        synth.params = jax.tree.unflatten(jax.tree.structure(expected), leaves)
        synth.encoder, synth.config = encoder, config
        synth.report = None if meta["report"] is None else DPReport.from_dict(meta["report"])
        synth.num_rows = settings["num_rows"]
        synth.delta_was_default = settings["delta_was_default"]
        synth.noise_seed_fixed = bool(settings.get("noise_seed_fixed", False))
        return synth


def _check_schema_events(events: Any) -> list[tuple[str, dp_accounting.DpEvent]]:
    if isinstance(events, (str, bytes)) or not isinstance(events, Sequence):
        raise TypeError(f"schema_events must be a sequence of (label, DpEvent) pairs, got {events!r}")
    out = []
    for entry in events:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], dp_accounting.DpEvent)):
            raise TypeError(f"schema_events entries must be (label: str, DpEvent) pairs, got {entry!r}")
        event_to_dict(entry[1])  # raises ValueError for an event that cannot be saved
        out.append((entry[0], entry[1]))
    return out

