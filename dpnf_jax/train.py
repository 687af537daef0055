"""DP-SGD training of the flow: a pure step and the fit loop (design notes section 6).

One DP-SGD step on a Poisson batch (each row in with probability q):

1. the logical batch is split into fixed-shape padded chunks with a row mask, so its
   varying size never triggers a recompilation;
2. each chunk's sum of clipped per-example gradients is accumulated (padding rows get
   clip factor 0 and contribute exactly nothing);
3. Gaussian noise ``N(0, (sigma * sensitivity)^2)`` is added ONCE to the sum, on the
   coordinates the clipper kept this step, and the result is divided by the expected
   batch size ``qN`` (not the realised one, which would depend on the data);
4. any optax optimizer turns it into an update.

The accountant sees ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), T)`` plus any
earlier events (DP histograms), and sigma is calibrated so the total meets the budget.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dpnf_jax import checkpoint
from dpnf_jax.data import stream
from dpnf_jax.data.stream import ArrayRows
from dpnf_jax.flows import model
from dpnf_jax.flows.model import ConditionalSplineFlow, FlowConfig, Params
from dpnf_jax.privacy import accounting, sampling
from dpnf_jax.privacy.clipped import check_method, clipped_grad_sum_pure, unit_layout
from dpnf_jax.privacy.clipping import Clipper, FlatClipping, atom_mask
from dpnf_jax.privacy.units import structural_mask


@dataclasses.dataclass(frozen=True)
class DPReport:
    """What was spent and how (JSON-able via :meth:`to_dict`).

    Attributes:
      epsilon: total epsilon of all events at ``delta`` (the guarantee).
      delta: target delta.
      noise_multiplier: sigma; the noise std is ``sigma * sensitivity``.
      sampling_rate: Poisson inclusion probability q.
      steps: number of noisy steps T.
      expected_batch_size: qN, the normaliser of the noisy sum.
      num_rows: N.
      clipper: the clipping strategy's settings.
      sensitivity: L2 sensitivity of the clipped sum.
      accountant: "pld" or "rdp".
      events: every DP event composed into the accountant, as dicts, with labels.
      grad_method: per-example gradient method used (performance only).
      epochs: expected passes over the data.
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    sampling_rate: float
    steps: int
    expected_batch_size: float
    num_rows: int
    clipper: dict[str, Any]
    sensitivity: float
    accountant: str
    events: tuple[dict[str, Any], ...]
    grad_method: str
    epochs: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["events"] = list(self.events)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DPReport":
        return cls(**{**d, "events": tuple(d["events"])})


@dataclasses.dataclass(frozen=True)
class DPStep:
    """The jitted pieces of one DP-SGD step (exposed so tests can count compilations).

    ``chunk(params, rows [chunk, d], mask [chunk], step_key) -> (grad_sum, nll_sum)`` and
    ``apply(params, opt_state, grad_sum, step_key) -> (params, opt_state)``.
    """

    chunk: Callable
    apply: Callable


def make_dp_step(
    config: FlowConfig,
    clipper: Clipper,
    method: str,
    optimizer: optax.GradientTransformation,
    noise_std: float,
    expected_batch_size: float,
    mesh: jax.sharding.Mesh | None = None,
) -> DPStep:
    """Build the jitted chunk and update functions of a DP-SGD step.

    With a ``mesh`` (one axis, any name), each chunk's rows are split over its devices:
    every device clips its own examples and the clipped sums are added with ``psum``.
    The update, and with it the noise, runs on replicated values from the same key, so
    the noise is drawn ONCE per logical batch, identically on every device.
    """
    check_method(method, clipper)
    layout = unit_layout(config)

    def local_sum(params, x, mask, mask_key):
        res = clipped_grad_sum_pure(config, params, x, clipper, method, mask, mask_key)
        return res.grad_sum, jnp.sum(res.nll * mask.astype(res.nll.dtype))

    if mesh is None:
        summed = local_sum
    else:
        (axis,) = mesh.axis_names
        spec, replicated = jax.sharding.PartitionSpec(axis), jax.sharding.PartitionSpec()

        def reduced(params, x, mask, mask_key):
            return jax.lax.psum(local_sum(params, x, mask, mask_key), axis)

        sharded = jax.shard_map(
            reduced, mesh=mesh, in_specs=(replicated, spec, spec, replicated), out_specs=replicated,
            check_vma=False,  # the per-example flow code is written without shard_map types
        )

        # Explicit mesh axes (jax.make_mesh's default) are resharded; Auto ones constrained.
        explicit = tuple(mesh.axis_types) == (jax.sharding.AxisType.Explicit,)
        place = jax.reshard if explicit else jax.lax.with_sharding_constraint

        def summed(params, x, mask, mask_key):
            rows = jax.sharding.NamedSharding(mesh, spec)
            everywhere = jax.sharding.NamedSharding(mesh, replicated)
            params, mask_key = place((params, mask_key), everywhere)
            return sharded(params, place(x, rows), place(mask, rows), mask_key)

    @jax.jit
    def chunk(params, rows, mask, step_key):
        mask_key, _ = jax.random.split(step_key)
        return summed(params, rows, mask, mask_key)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def apply(params, opt_state, grad_sum, step_key):
        mask_key, noise_key = jax.random.split(step_key)
        kept = layout.expand(atom_mask(clipper, layout, mask_key), params)
        coordinate_mask = jax.tree.map(lambda a, b: a * b, kept, structural_mask(params))
        leaves, treedef = jax.tree.flatten(grad_sum)
        keys = jax.tree.unflatten(treedef, list(jax.random.split(noise_key, len(leaves))))
        noisy = jax.tree.map(
            lambda g, k, m: (g + noise_std * m * jax.random.normal(k, g.shape, g.dtype)) / expected_batch_size,
            grad_sum,
            keys,
            coordinate_mask,
        )
        updates, opt_state = optimizer.update(noisy, opt_state, params)
        # Sparsification: coordinates not kept this step are not updated at all.
        updates = jax.tree.map(lambda u, m: u * m, updates, coordinate_mask)
        return optax.apply_updates(params, updates), opt_state

    return DPStep(chunk, apply)


def _flow_and_params(flow, seed: int) -> tuple[FlowConfig, Params]:
    """(config, params) with params a private copy: the jitted steps donate their buffers,
    which must not delete the caller's arrays (e.g. a module's own parameters)."""
    if isinstance(flow, FlowConfig):
        return flow, model.init_params(flow, jax.random.key(seed))
    config, params = flow.pure() if isinstance(flow, ConditionalSplineFlow) else flow
    return config, jax.tree.map(jnp.copy, params)


def default_optimizer(learning_rate: float = 1e-3) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def dp_fit(
    flow: ConditionalSplineFlow | FlowConfig | tuple[FlowConfig, Params],
    x: np.ndarray | jax.Array,
    *,
    epsilon: float,
    delta: float,
    epochs: float = 10.0,
    batch_size: int = 256,
    clipper: Clipper | None = None,
    method: str = "fast",
    optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    noise_seed: int | None = None,
    accountant: str = "pld",
    chunk_size: int | None = None,
    prior_events: Sequence[tuple[str, dp_accounting.DpEvent]] = (),
    verbose: bool = True,
    callback: Callable[[int, Params, float], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    checkpoint_extra: dict[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    prefetch_rows: int = 1 << 20,
) -> tuple[Params, DPReport]:
    """Train the flow with DP-SGD to an (epsilon, delta) budget.

    Args:
      flow: a module, a config (initialised from ``seed``) or ``(config, params)``.
      x: [N, d] encoded private rows, or a row source (:mod:`dpnf_jax.data.stream`):
        e.g. ``StreamRows`` over a CSV/Parquet file larger than memory, or, on each host
        of a multi-host run, that host's shard (``ArrayRows(x_shard, num_rows=N,
        row_offset=lo)`` or ``StreamRows(..., row_range=(lo, hi))`` with the bounds of
        :func:`dpnf_jax.privacy.sampling.shard_bounds`).
      epsilon, delta: the TOTAL budget, including ``prior_events``.
      epochs: expected passes over the data; steps ``T = ceil(epochs / q)``.
      batch_size: expected batch size qN.
      clipper: clipping strategy (default flat, C = 1).
      method: "fast" (analytic), "fast_reweight" or "vmap" (reference).
      optimizer: optax optimizer (default Adam 1e-3).
      seed: seeds the initialisation when ``flow`` is a config (public randomness).
      noise_seed: seeds the PRIVATE randomness: Poisson sampling, Gaussian noise and
        sparsification masks. None (the default) draws 128 bits from the OS; fix it only
        for reproducible experiments, since anyone who knows it can recompute the noise.
      accountant: "pld" or "rdp".
      chunk_size: rows per padded chunk (default: the expected batch size plus three
        standard deviations, rounded up to a multiple of 64). Performance only.
      prior_events: ``(label, event)`` pairs already spent on these rows (e.g. DP
        histograms); the noise is calibrated so that everything together meets epsilon.
      verbose: show a progress bar with step, loss and epsilon spent.
      callback: optional ``callback(step, params, mean_nll)`` after every step.
      checkpoint_dir: where to keep the crash-safe checkpoint (see :mod:`dpnf_jax.checkpoint`).
      checkpoint_every: write it every this many steps (and after the last one); 0 = never.
      resume: continue from the checkpoint in ``checkpoint_dir`` if there is one. The
        noise multiplier, the sampler state and the plan come from the checkpoint, so the
        result and the spent epsilon equal an uninterrupted run's; changed privacy
        settings or data are refused.
      checkpoint_extra: JSON-able data stored with each checkpoint (e.g. the synthesizer's
        already released histograms).
      mesh: optional one-axis device mesh (``jax.make_mesh((n,), ("data",))``) over which
        each chunk's rows are sharded (data parallelism; parameters replicated, noise
        drawn once). Same results as one device up to float summation order. After
        ``jax.distributed.initialize`` the mesh spans every process's devices and each
        process passes its own shard of the rows: every host draws the same global
        Poisson batch from the shared seed and feeds the rows of its shard.
      prefetch_rows: about how many sampled rows to fetch per pass over the rows: the
        batches of ``prefetch_rows / qN`` future steps are drawn together and read in ONE
        pass (what makes streaming from a file affordable). Memory versus passes.

    Returns:
      (trained parameters, :class:`DPReport`).

    Raises:
      ValueError: on invalid settings or when the budget cannot be met.
    """
    clipper = FlatClipping(1.0) if clipper is None else clipper
    check_method(method, clipper)
    optimizer = default_optimizer() if optimizer is None else optimizer
    config, params = _flow_and_params(flow, seed)
    dtype = params["lu"]["log_diag"].dtype
    rows = x if _is_row_source(x) else ArrayRows(np.asarray(x), dtype=dtype)
    if rows.dim != config.dim:
        raise ValueError(f"x must have shape [N, {config.dim}], got rows of width {rows.dim}")
    num_rows = int(rows.num_rows)
    # Hosts that disagree on N would cut overlapping shards and sample with different q:
    # a row could then join a step twice while the noise is calibrated for once.
    all_processes_agree(str(num_rows), "the number of rows N of the table")
    process, bounds = _process_layout(rows, mesh)
    if not (isinstance(batch_size, (int, np.integer)) and 1 <= batch_size <= num_rows):
        raise ValueError(f"batch_size must be an integer in [1, {num_rows}], got {batch_size!r}")
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}")
    if delta >= 1.0 / num_rows:
        warnings.warn(f"delta={delta:g} is not below 1/N = {1.0 / num_rows:.3g}; the guarantee is weak", stacklevel=2)

    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir")
    if not (isinstance(checkpoint_every, (int, np.integer)) and checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be an integer >= 0, got {checkpoint_every!r}")
    if not (isinstance(prefetch_rows, (int, np.integer)) and prefetch_rows >= 1):
        raise ValueError(f"prefetch_rows must be an integer >= 1, got {prefetch_rows!r}")

    sampling_rate, steps = sampling.steps_for_epochs(num_rows, int(batch_size), epochs)
    prior = list(prior_events)
    expected = sampling_rate * num_rows
    processes = len(bounds) - 1
    # One chunk holds the batch unless it is 3 standard deviations above its mean, so a
    # step almost never pays for a second, mostly padded chunk.
    granule = 64 * (1 if mesh is None else mesh.size)  # chunks split evenly over the devices
    chunk = chunk_size or int(granule * math.ceil((expected + 3 * math.sqrt(expected * (1 - sampling_rate))) / granule))
    if mesh is not None and chunk % mesh.size:
        raise ValueError(f"chunk_size={chunk} must be a multiple of the mesh's {mesh.size} devices")
    group = stream.prefetch_steps(expected / processes, int(prefetch_rows), steps)
    # Everything the privacy guarantee or the random streams depend on; a resume must match it.
    plan = {
        "epsilon": float(epsilon),
        "delta": float(delta),
        "accountant": accountant,
        "epochs": float(epochs),
        "batch_size": int(batch_size),
        "num_rows": num_rows,
        "sampling_rate": float(sampling_rate),
        "steps": int(steps),
        "chunk_size": chunk,
        "prefetch_steps": group,
        "processes": processes,
        "seed": int(seed),
        "clipper": clipper.to_dict(),
        "flow": config.to_dict(),
        "prior_events": [{"label": label, **accounting.event_to_dict(e)} for label, e in prior],
        "data_fingerprint": _global_fingerprint(rows, processes) if checkpoint_dir is not None else None,
    }
    all_processes_agree(json.dumps(plan, sort_keys=True), "the training plan (privacy settings, sampling, flow, prior events)")
    saved = checkpoint.read_checkpoint_meta(checkpoint_dir) if (resume and checkpoint_dir is not None) else None
    all_processes_agree(json.dumps(saved, sort_keys=True), f"the checkpoint in {checkpoint_dir} (keep it where every host sees it)")
    if saved is not None:
        _check_resume_plan(saved["plan"], plan, checkpoint_dir)
        if noise_seed is not None and noise_seed != saved["noise_seed"]:
            raise ValueError(f"cannot resume from {checkpoint_dir}: it was made with another noise_seed")
        noise_seed = int(saved["noise_seed"])
        sigma = float(saved["noise_multiplier"])
    else:
        noise_seed = secrets.randbits(128) if noise_seed is None else int(noise_seed)
        noise_seed = same_on_every_process(noise_seed)
        try:
            sigma = accounting.calibrate_noise_multiplier(
                epsilon, delta, sampling_rate, steps, accountant, extra_events=[event for _, event in prior]
            )
        except ValueError as err:
            raise ValueError(
                f"cannot train to epsilon={epsilon}, delta={delta} with batch_size={batch_size}, "
                f"epochs={epochs} on {num_rows} rows: {err}"
            ) from err
    training_event = accounting.dpsgd_event(sampling_rate, sigma, steps)
    events = [*prior, ("dp-sgd", training_event)]
    spent = accounting.epsilon_of_events([e for _, e in events], delta, accountant)
    if spent > epsilon * (1 + 1e-9):
        raise ValueError(f"calibration failed: spend {spent} exceeds epsilon={epsilon}")

    step_fns = make_dp_step(config, clipper, method, optimizer, sigma * clipper.sensitivity(), expected, mesh)
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        row_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
        params = jax.device_put(params, replicated)
    # Its own random stream, independent of every other use of the seed; counter-based, so
    # batches can be drawn ahead (streaming), on every host alike, and again after a resume.
    sampler = sampling.PoissonSampler(num_rows, sampling_rate, seed=[noise_seed, 1])
    opt_state = optimizer.init(params)
    start = 0
    if saved is not None:
        params, opt_state = checkpoint.load_checkpoint_state(checkpoint_dir, params, opt_state)
        if mesh is not None:
            params, opt_state = jax.device_put((params, opt_state), replicated)
        start = int(saved["step"])
    train_key = jax.random.wrap_key_data(
        jnp.asarray(np.random.SeedSequence([noise_seed, 2]).generate_state(2), jnp.uint32)
    )
    show = verbose and process == 0
    progress_eps = _progress_epsilons(prior, sampling_rate, sigma, steps, delta, accountant) if show else {}

    def to_device(block):
        if mesh is None:
            return jnp.asarray(block)
        return jax.make_array_from_process_local_data(row_sharding, block)

    local_chunk = chunk // processes
    lo, hi = int(bounds[process]), int(bounds[process + 1])
    bar = tqdm(desc="DP-SGD", disable=not show, dynamic_ncols=True, initial=start, total=steps)
    eps_now = accounting.epsilon_of_events([e for _, e in prior], delta, accountant) if (show and prior) else 0.0
    for group_start in range(start - start % group, steps, group):
        group_steps = range(group_start, min(group_start + group, steps))
        batches = [sampler.indices(t) for t in group_steps]
        mine = [b[np.searchsorted(b, lo) : np.searchsorted(b, hi)] for b in batches]
        if show:
            bar.set_description("DP-SGD (fetching rows)", refresh=True)
        fetched = rows.gather(mine, group_start // group)
        if show:
            bar.set_description("DP-SGD", refresh=False)
        for step, batch, local in zip(group_steps, batches, fetched):
            if step < start:
                continue  # drawn only so a resumed group fetches (and encodes) as the first run did
            blocks, masks = sampling.host_chunks(batch, bounds, process, local, local_chunk, dtype)
            step_key = jax.random.fold_in(train_key, step)
            grad_sum, nll_sum = None, 0.0
            for block, mask in zip(blocks, masks):
                g, n = step_fns.chunk(params, to_device(block), to_device(mask), step_key)
                grad_sum = g if grad_sum is None else jax.tree.map(jnp.add, grad_sum, g)
                nll_sum = nll_sum + n
            params, opt_state = step_fns.apply(params, opt_state, grad_sum, step_key)
            mean_nll = float(_local(nll_sum)) / max(len(batch), 1) if (show or callback) else float("nan")
            if checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == steps) and process == 0:
                meta = {"plan": plan, "noise_multiplier": sigma, "noise_seed": noise_seed, "step": step + 1,
                        "extra": checkpoint_extra}
                checkpoint.save_checkpoint(
                    checkpoint_dir, params=jax.tree.map(_local, params), opt_state=jax.tree.map(_local, opt_state),
                    meta=meta,
                )
            if callback is not None:
                callback(step, params, mean_nll)
            if show:
                eps_now = progress_eps.get(step + 1, eps_now)
                bar.update()
                bar.set_postfix(nll=f"{mean_nll:.3f}", eps=f"{eps_now:.3f}/{epsilon:g}", refresh=False)
    bar.close()
    if processes > 1:
        params = jax.tree.map(lambda a: jnp.asarray(_local(a)), params)  # every process keeps a local copy

    report = DPReport(
        epsilon=float(spent),
        delta=float(delta),
        noise_multiplier=float(sigma),
        sampling_rate=float(sampling_rate),
        steps=int(steps),
        expected_batch_size=float(expected),
        num_rows=num_rows,
        clipper=clipper.to_dict(),
        sensitivity=float(clipper.sensitivity()),
        accountant=accountant,
        events=tuple({"label": label, **accounting.event_to_dict(e)} for label, e in events),
        grad_method=method,
        epochs=float(epochs),
    )
    return params, report


def _is_row_source(x) -> bool:
    return all(hasattr(x, name) for name in ("gather", "num_rows", "dim", "row_range", "fingerprint"))


def _process_layout(rows, mesh) -> tuple[int, np.ndarray]:
    """(this process's index, shard bounds of all processes) and checks that they fit."""
    processes, process = jax.process_count(), jax.process_index()
    if processes == 1:
        bounds = np.array([0, rows.num_rows], np.int64)
    else:
        if mesh is None or mesh.size != jax.device_count():
            raise ValueError(
                f"{processes} processes: pass a mesh over all {jax.device_count()} devices "
                "(jax.make_mesh((jax.device_count(),), ('data',)))"
            )
        per_process = collections.Counter(d.process_index for d in mesh.devices.flat)
        if len(per_process) != processes or len(set(per_process.values())) != 1:
            raise ValueError(f"every process must contribute the same number of devices to the mesh, got {dict(per_process)}")
        bounds = sampling.shard_bounds(rows.num_rows, processes)
    expected = (int(bounds[process]), int(bounds[process + 1]))
    if tuple(rows.row_range) != expected:
        raise ValueError(
            f"process {process} of {processes} holds rows {tuple(rows.row_range)} of {rows.num_rows}, but its shard "
            f"is rows {expected} (see dpnf_jax.privacy.sampling.shard_bounds)"
        )
    return process, bounds


def _local(a):
    """A host copy of a replicated (possibly multi-process) array."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return np.asarray(a.addressable_data(0))
    return a


def same_on_every_process(noise_seed: int) -> int:
    """Process 0's seed on every process (each would otherwise draw its own OS entropy)."""
    if jax.process_count() == 1:
        return noise_seed
    from jax.experimental import multihost_utils

    words = np.array([(noise_seed >> (32 * i)) & 0xFFFFFFFF for i in range(8)], np.uint32)
    words = np.asarray(multihost_utils.broadcast_one_to_all(words))
    return sum(int(w) << (32 * i) for i, w in enumerate(words))


def sum_over_processes(counts: dict[Any, Any]) -> dict[Any, np.ndarray]:
    """Exact integer counts (scalars or arrays, same keys and shapes everywhere) summed over processes."""
    if jax.process_count() == 1 or not counts:
        return {k: np.asarray(v, np.int64) for k, v in counts.items()}
    from jax.experimental import multihost_utils

    keys = list(counts)
    flat = np.concatenate([np.ravel(np.asarray(counts[k], np.int64)) for k in keys])
    # int64 through JAX needs x64; counts below 2**31 per process fit int32 exactly.
    too_large = bool(flat.size) and flat.max() >= 2**31
    raise_together(ValueError("a count per process reached 2**31; split the table over more processes")
                   if too_large else None)  # on every process, so none waits in the gather below
    total = np.asarray(multihost_utils.process_allgather(flat.astype(np.int32))).astype(np.int64).sum(axis=0)
    out, at = {}, 0
    for k in keys:
        shape = np.shape(counts[k])
        size = int(np.prod(shape))
        out[k] = total[at : at + size].reshape(shape)
        at += size
    return out


def all_processes_agree(value: str, what: str) -> None:
    """Raise on every process unless all processes hold the same ``value`` (a collective)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))
    if not (every == every[0]).all():
        differ = [p for p in range(len(every)) if not (every[p] == every[0]).all()]
        raise ValueError(f"processes {differ} disagree with process 0 on {what}")


def raise_together(error: BaseException | None) -> None:
    """Raise on every process when any failed, so none waits forever in a collective."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = np.asarray(multihost_utils.process_allgather(np.array([error is not None], np.int32))).ravel()
        if error is None and failed.any():
            raise ValueError(f"process(es) {np.flatnonzero(failed).tolist()} failed (see their error); stopping too")
    if error is not None:
        raise error


def _global_fingerprint(rows, processes: int) -> str:
    """The rows' fingerprint; with several processes, that of every shard together."""
    own = rows.fingerprint()
    if processes == 1:
        return own
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(own.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))
    return hashlib.sha256(every.tobytes()).hexdigest()


def _check_resume_plan(saved: dict[str, Any], plan: dict[str, Any], directory) -> None:
    """Refuse to resume when anything privacy-relevant differs from the checkpoint's plan."""
    for key, value in plan.items():
        if saved.get(key) != value:
            if key in ("chunk_size", "prefetch_steps", "processes"):
                raise ValueError(
                    f"cannot resume from {directory}: it was made with {key}={saved.get(key)!r}, this run has "
                    f"{value!r}; resume with the same setting (it fixes how batches are split and fetched)"
                )
            what = ("data (fingerprint; for a streamed table also its chunk rows)" if key == "data_fingerprint"
                    else f"{key} ({saved.get(key)!r} -> {value!r})")
            raise ValueError(
                f"cannot resume from {directory}: the checkpoint was made with other {what}; resuming would "
                "change the privacy plan or reuse its noise on other data. Start a new run in a fresh directory."
            )


def _progress_epsilons(prior, sampling_rate, sigma, steps, delta, accountant, num_points: int = 10) -> dict[int, float]:
    """Epsilon spent after a few step counts, for the progress bar (display only)."""
    marks = sorted({max(1, round(steps * i / num_points)) for i in range(1, num_points + 1)})
    prior_events = [e for _, e in prior]
    return {
        t: accounting.epsilon_of_events([*prior_events, accounting.dpsgd_event(sampling_rate, sigma, t)], delta, accountant)
        for t in marks
    }


def fit_nonprivate(
    flow: ConditionalSplineFlow | FlowConfig | tuple[FlowConfig, Params],
    x: np.ndarray | jax.Array,
    *,
    epochs: float = 10.0,
    batch_size: int = 256,
    optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> Params:
    """Plain maximum-likelihood training (NO privacy): the reference the DP runs are judged by."""
    optimizer = default_optimizer() if optimizer is None else optimizer
    config, params = _flow_and_params(flow, seed)
    data = jnp.asarray(x, dtype=params["lu"]["log_diag"].dtype)
    num_rows = int(data.shape[0])
    batch_size = min(int(batch_size), num_rows)
    steps = max(1, math.ceil(epochs * num_rows / batch_size))
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, idx):
        def loss(p):
            return -jnp.mean(jax.vmap(lambda xi: model.log_prob(config, p, xi))(data[idx]))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="MLE (non-private)", disable=not verbose, dynamic_ncols=True)
    for _ in bar:
        idx = jnp.asarray(rng.choice(num_rows, batch_size, replace=False))
        params, opt_state, value = step(params, opt_state, idx)
        if verbose:
            bar.set_postfix(nll=f"{float(value):.3f}", refresh=False)
    bar.close()
    return params


@functools.lru_cache(maxsize=16)
def _batched_log_prob(config: FlowConfig) -> Callable:
    """One jitted log-density per architecture, so repeated evaluations do not recompile."""
    return jax.jit(jax.vmap(lambda p, xi: model.log_prob(config, p, xi), in_axes=(None, 0)))


def mean_log_prob(config: FlowConfig, params: Params, x, batch: int = 4096) -> float:
    """Mean exact log-likelihood of rows x [N, d] (evaluated in batches)."""
    fn = _batched_log_prob(config)
    x = jnp.asarray(x, params["lu"]["log_diag"].dtype)
    total = sum(float(jnp.sum(fn(params, x[i : i + batch]))) for i in range(0, x.shape[0], batch))
    return total / x.shape[0]
