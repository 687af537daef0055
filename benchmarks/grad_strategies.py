"""Time one DP-SGD step of the flow for every per-example gradient path and clipping strategy.

One step is what training runs: ``train.make_dp_step``'s jitted ``chunk`` (the sum of
clipped per-example gradients of one padded chunk) followed by its ``apply`` (Gaussian
noise once, divide by the expected batch size, Adam), both lowered and compiled ahead of
time from the very functions training uses. The non-private reference is the step of
``train.fit_nonprivate`` (mean NLL, ``value_and_grad``, Adam).

Methods (``METHODS``): ``nonprivate``; ``vmap`` (materialised per-example gradients),
``fast`` (analytic norms + one einsum per layer) and ``fast_reweight`` (analytic norms +
second backward), all with flat clipping; and the other clipping strategies on the fast
path: ``fast_layer`` and ``fast_neuron`` (per-unit clipping) and ``fast_sparse``
(stochastic sparsification, half of the neurons per step).

Sweeps, not the full product: batch size at the default Adult flow (d=15, the marginal
encoding; 4 blocks; 256x256 conditioner; 8 bins), then conditioner width and number of
blocks at one batch size. Each configuration runs in its own worker process:

* a *timing* worker compiles every method (trace/lower and XLA compile timed apart from
  the steps), warms up, then times full steps in interleaved rounds (the method order
  is shuffled every round) so that every ratio compares steps measured side by side under
  the same machine load; it reports medians and IQRs over rounds, the per-round paired
  ratio to the non-private step, XLA's buffer sizes, and serialises the executables;
* one *memory* worker per method loads that method's executables (no compiler in the
  process) and runs a few steps: peak RSS from ``getrusage`` (and the step's RSS growth
  over the process baseline) on CPU, ``memory_stats()['peak_bytes_in_use']`` on GPU.

The smallest batch of the default flow also checks that every clipped path computes the
same clipped gradient sum: each method's compiled ``chunk`` against materialised
``vmap(grad)`` per-example gradients clipped by the same ``clip_factors``, and the timed
vmap path itself. vmap is skipped above ``--vmap-max-batch`` and timed once when one step
takes longer than ``--vmap-max-step-s``; every skip is recorded with its reason.

Usage::

    python benchmarks/grad_strategies.py             # full CPU sweep, ~15 min on 2 cores
    python benchmarks/grad_strategies.py --quick     # one configuration, < 2 min
    bash benchmarks/run_gpu.sh                       # the GPU sweep (suffix _gpu)

Writes ``benchmarks/results/grad_strategies_<suffix>.{json,md}`` and
``..._<suffix>_time.png`` / ``..._<suffix>_memory.png`` (step time and memory vs batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import serialize_executable

from dpnf_jax.flows import model
from dpnf_jax.flows.model import FlowConfig, Params
from dpnf_jax.privacy import fastgrad, pergrad
from dpnf_jax.privacy.clipped import unit_layout
from dpnf_jax.privacy.clipping import (
    Clipper,
    FlatClipping,
    PerUnitClipping,
    StochasticSparsification,
    atom_mask,
    clip_factors,
)
from dpnf_jax.train import make_dp_step

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DIM = 15  # the Adult table under the default marginal encoding: one dim per column
L2_CLIP = 1.0  # of the timed steps; the clip does not change the step's cost
NOISE_MULTIPLIER = 1.0
LEARNING_RATE = 1e-3
PARAM_SCALE = 0.1  # random perturbation of the initial parameters: no gradient term vanishes
CHECK_TOLERANCE = 1e-3  # float32 relative tolerance of the clipped-sum comparison


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of taking a training step.

    Attributes:
      name: short key used in the outputs.
      description: one line for the tables.
      grad_method: ``clipped_grad_sum_pure`` method, or None for the non-private step.
      clipper: clipping strategy factory ``l2_clip -> Clipper`` (None when non-private).
    """

    name: str
    description: str
    grad_method: str | None
    clipper: Callable[[float], Clipper] | None

    @property
    def private(self) -> bool:
        return self.grad_method is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("nonprivate", "non-private step (mean NLL, value_and_grad, Adam)", None, None),
        Method("vmap", "vmap(grad) per-example gradients, flat clipping", "vmap", FlatClipping),
        Method("fast", "analytic norms + one einsum per layer, flat clipping", "fast", FlatClipping),
        Method("fast_reweight", "analytic norms + second backward, flat clipping", "fast_reweight", FlatClipping),
        Method("fast_layer", "fast path, per-unit clipping (layers)", "fast", lambda c: PerUnitClipping(c, "layer")),
        Method("fast_neuron", "fast path, per-unit clipping (neurons)", "fast", lambda c: PerUnitClipping(c, "neuron")),
        Method(
            "fast_sparse",
            "fast path, stochastic sparsification (half the neurons), flat clipping",
            "fast",
            lambda c: StochasticSparsification(FlatClipping(c), 0.5, "neuron"),
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark configuration: a flow architecture and a batch size.

    Attributes:
      dim: encoded data width d.
      num_blocks: flow blocks K.
      width: width of both conditioner hidden layers.
      batch: rows per step (one chunk).
      num_bins: spline bins.
    """

    dim: int
    num_blocks: int
    width: int
    batch: int
    num_bins: int = 8

    @property
    def config(self) -> FlowConfig:
        return FlowConfig(self.dim, self.num_blocks, (self.width, self.width), self.num_bins)

    @property
    def label(self) -> str:
        return f"d={self.dim} K={self.num_blocks} h={self.width}x2 B={self.batch}"


# --------------------------------------------------------------------------------------
# Steps: inputs, lowering, running (used by every worker, so all see the same programs).
# --------------------------------------------------------------------------------------


def benchmark_params(config: FlowConfig) -> Params:
    """Deterministic, data-independent random parameters with no vanishing gradient term.

    Drawn with numpy on the shapes of ``model.init_params`` (eager JAX random ops would
    compile one small program per leaf, seconds per worker on a loaded CPU): kernels
    LeCun-normal, everything else (biases, stage embedding, LU factors, the last layer
    that training starts at zero) ``PARAM_SCALE`` times a standard normal.
    """
    shapes = jax.eval_shape(functools.partial(model.init_params, config), jax.random.key(0))
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    rng = np.random.default_rng(0)
    arrays = []
    for path, leaf in leaves:
        scale = 1.0 / np.sqrt(leaf.shape[-2]) if path[-1].key == "kernel" else PARAM_SCALE
        arrays.append(jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype))
    return jax.tree.unflatten(treedef, arrays)


def make_inputs(point: Point) -> dict[str, Any]:
    """Parameters, one chunk of synthetic rows ``data`` [B, d], its mask and step key.

    The step time does not depend on the values: the flow has no data-dependent control
    flow, so standard-normal rows stand in for the encoded table.
    """
    rng = np.random.default_rng(2)
    return {
        "params": benchmark_params(point.config),
        "data": jnp.asarray(rng.standard_normal((point.batch, point.dim)), jnp.float32),
        "mask": jnp.asarray(np.ones((point.batch,), bool)),
        "step_key": jax.random.key(3),
    }


def optimizer() -> optax.GradientTransformation:
    return optax.adam(LEARNING_RATE)


def nonprivate_step(config: FlowConfig, opt: optax.GradientTransformation) -> Callable:
    """The step of ``train.fit_nonprivate``, given its batch's rows (as DP training's chunk is)."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, data):
        def loss(p):
            return -jnp.mean(jax.vmap(lambda xi: model.log_prob(config, p, xi))(data))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def lower_method(
    point: Point, method: Method, inputs: dict[str, Any], l2_clip: float = L2_CLIP
) -> dict[str, jax.stages.Lowered]:
    """Lower the jitted pieces of one step: ``{"step"}`` or training's ``{"chunk", "apply"}``."""
    opt = optimizer()
    params = inputs["params"]
    opt_state = jax.eval_shape(opt.init, params)
    if not method.private:
        step = nonprivate_step(point.config, opt)
        return {"step": step.lower(params, opt_state, inputs["data"])}
    clipper = method.clipper(l2_clip)
    dp = make_dp_step(
        point.config, clipper, method.grad_method, opt, NOISE_MULTIPLIER * clipper.sensitivity(), float(point.batch)
    )
    return {
        "chunk": dp.chunk.lower(params, inputs["data"], inputs["mask"], inputs["step_key"]),
        "apply": dp.apply.lower(params, opt_state, params, inputs["step_key"]),
    }


def initial_state(inputs: dict[str, Any]) -> tuple[Params, Any]:
    """A private copy of the parameters and a fresh Adam state (the steps donate both)."""
    params = jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf)), inputs["params"])
    return params, _adam_init(params)


@jax.jit
def _adam_init(params: Params):
    return optimizer().init(params)


def run_step(executables: dict[str, Any], state: tuple[Params, Any], inputs: dict[str, Any]):
    """One full training step; returns the new ``(params, opt_state)``."""
    params, opt_state = state
    if "step" in executables:
        params, opt_state, _ = executables["step"](params, opt_state, inputs["data"])
        return params, opt_state
    grad_sum, _ = executables["chunk"](params, inputs["data"], inputs["mask"], inputs["step_key"])
    return executables["apply"](params, opt_state, grad_sum, inputs["step_key"])


def shuffled_rounds(names: list[str], repeats: int) -> list[list[str]]:
    """The order of every timing round: a fresh seeded permutation each round.

    A fixed or rotated order makes one method always follow the same one; right after a
    heavy step (vmap frees a gigabyte) the next step pays for page faults, a bias that a
    shuffled order turns into noise that the median absorbs.
    """
    rng = np.random.default_rng(0)
    return [[names[i] for i in rng.permutation(len(names))] for _ in range(repeats)]


def timed_step(executables, state, inputs) -> tuple[float, tuple[Params, Any]]:
    start = time.perf_counter()
    state = jax.block_until_ready(run_step(executables, state, inputs))
    return time.perf_counter() - start, state


def xla_memory(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """XLA's static buffer sizes of a compiled program (bytes), when the backend reports them."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    return {name.removesuffix("_size_in_bytes"): int(getattr(stats, name)) for name in names}


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median, quartiles and IQR of step times (seconds)."""
    q25, median, q75 = np.percentile(samples, [25, 50, 75])
    return {
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "iqr": float(q75 - q25),
        "samples": [float(s) for s in samples],
    }


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


# --------------------------------------------------------------------------------------
# Correctness: every clipped path against materialised per-example gradients.
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0,))
def _per_example_grads(config, params, x):
    return pergrad.per_example_grads(config, params, x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def reference_clipped_sum(config: FlowConfig, clipper: Clipper, grads, params, mask_key):
    """Clip materialised per-example gradients exactly as ``pergrad.clipped_sum`` does."""
    layout = unit_layout(config)
    kept = atom_mask(clipper, layout, mask_key)
    atom_sq = jax.vmap(layout.atom_sq_norms)(grads)
    factors, norms = clip_factors(clipper, layout, atom_sq, kept)
    coordinate_factors = jax.vmap(layout.expand, in_axes=(0, None))(factors, params)
    return jax.tree.map(lambda g, f: jnp.sum(g * f, axis=0), grads, coordinate_factors), norms


def relative_difference(grad_sum: Params, reference: Params) -> float:
    """Largest per-leaf relative L2 difference ``||g - ref|| / ||ref||`` (absolute where ref is 0)."""
    worst = 0.0
    for g, ref in zip(jax.tree.leaves(grad_sum), jax.tree.leaves(reference)):
        g, ref = np.asarray(g, np.float64), np.asarray(ref, np.float64)
        diff, scale = np.linalg.norm(g - ref), np.linalg.norm(ref)
        worst = max(worst, float(diff / scale if scale > 0 else diff))
    return worst


def reference_grads(point: Point, inputs: dict[str, Any]) -> tuple[Params, np.ndarray]:
    """Materialised per-example gradients of the chunk and their flat norms [B]."""
    config, params = point.config, inputs["params"]
    grads = _per_example_grads(config, params, inputs["data"])[1]
    mask_key, _ = jax.random.split(inputs["step_key"])
    norms = reference_clipped_sum(config, FlatClipping(L2_CLIP), grads, params, mask_key)[1]
    return grads, np.asarray(norms)


def check_clipped_sums(
    point: Point, names: list[str], executables: dict, inputs: dict, grads: Params, norms: np.ndarray, l2_clip: float
) -> dict[str, Any]:
    """Each clipped method's compiled chunk vs the vmap reference with the same clipper and key.

    Args:
      grads, norms: from :func:`reference_grads`.
      l2_clip: the clip the executables were compiled with.
    """
    config, params = point.config, inputs["params"]
    mask_key, _ = jax.random.split(inputs["step_key"])  # as make_dp_step's chunk splits it
    paths = {}
    for name in names:
        method = METHODS[name]
        if not method.private:
            continue
        reference, _ = reference_clipped_sum(config, method.clipper(l2_clip), grads, params, mask_key)
        grad_sum, _ = executables[name]["chunk"](params, inputs["data"], inputs["mask"], inputs["step_key"])
        paths[name] = relative_difference(grad_sum, reference)
    return {
        "batch": point.batch,
        "point": point.label,
        "l2_clip": l2_clip,
        "fraction_clipped": float(np.mean(norms > l2_clip)),
        "median_grad_norm": float(np.median(norms)),
        "tolerance": CHECK_TOLERANCE,
        "max_rel_diff": paths,
        "passed": all(d <= CHECK_TOLERANCE for d in paths.values()),
    }


# --------------------------------------------------------------------------------------
# Workers (each runs in its own process).
# --------------------------------------------------------------------------------------


def timing_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile every method of one point, time interleaved rounds, serialise the executables."""
    point = Point(**spec["point"])
    inputs = make_inputs(point)
    names = list(spec["methods"])
    l2_clip = L2_CLIP
    if spec["check"]:
        # Clip at the median norm so that the comparison covers clipped and unclipped rows.
        grads, norms = reference_grads(point, inputs)
        l2_clip = float(np.median(norms))
    executables, results, states = {}, {}, {}
    for name in names:
        start = time.perf_counter()
        lowered = lower_method(point, METHODS[name], inputs, l2_clip)
        compile_info, executables[name], memory = {"lower_s": time.perf_counter() - start}, {}, {}
        for piece, lowered_piece in lowered.items():
            start = time.perf_counter()
            executables[name][piece] = lowered_piece.compile()
            compile_info[f"{piece}_compile_s"] = time.perf_counter() - start
            memory[piece] = xla_memory(executables[name][piece])
        compile_info["total_s"] = sum(compile_info.values())
        results[name] = {"status": "ok", "compile": compile_info, "xla_memory": memory}
        payload = {piece: serialize_executable.serialize(ex) for piece, ex in executables[name].items()}
        with open(Path(spec["exec_dir"]) / f"{name}.pkl", "wb") as f:
            pickle.dump(payload, f)

    check = check_clipped_sums(point, names, executables, inputs, grads, norms, l2_clip) if spec["check"] else None

    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        states[name] = initial_state(inputs)
        for _ in range(spec["warmup"]):
            elapsed, states[name] = timed_step(executables[name], states[name], inputs)
        if name == "vmap" and elapsed > spec["vmap_max_step_s"]:
            samples[name].append(elapsed)
            results[name]["timing_note"] = (
                f"one step took {elapsed:.1f} s > --vmap-max-step-s={spec['vmap_max_step_s']}: timed once"
            )
    rounds = [name for name in names if "timing_note" not in results[name]]
    paired: dict[str, list[float]] = {name: [] for name in names}
    for order in shuffled_rounds(rounds, spec["repeats"]):
        this_round = {}
        for name in order:
            this_round[name], states[name] = timed_step(executables[name], states[name], inputs)
            samples[name].append(this_round[name])
        if "nonprivate" in this_round:
            for name, elapsed in this_round.items():
                paired[name].append(elapsed / this_round["nonprivate"])
    for name in names:
        results[name]["step_s"] = summarize(samples[name])
        results[name]["examples_per_s"] = point.batch / results[name]["step_s"]["median"]
        if paired[name]:
            results[name]["ratio_to_nonprivate"] = summarize(paired[name])
    return {"device": device_info(), "l2_clip": l2_clip, "methods": results, "check": check}


def _rss_mb(field: str) -> float:
    """A memory field of /proc/self/status (e.g. VmRSS, the resident set now) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one method's executables in a fresh process, run a few steps, report peak memory."""
    point = Point(**spec["point"])
    inputs = make_inputs(point)
    with open(Path(spec["exec_dir"]) / f"{spec['method']}.pkl", "rb") as f:
        payload = pickle.load(f)
    executables = {piece: serialize_executable.deserialize_and_load(*p) for piece, p in payload.items()}
    state = jax.block_until_ready(initial_state(inputs))
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    baseline_rss, baseline_device = _rss_mb("VmRSS"), (stats or {}).get("bytes_in_use")
    for _ in range(spec["memory_steps"]):
        _, state = timed_step(executables, state, inputs)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {"peak_rss_mb": peak_rss, "baseline_rss_mb": baseline_rss, "step_rss_mb": peak_rss - baseline_rss}
    if stats is not None:
        peak = device.memory_stats()["peak_bytes_in_use"]
        result.update(
            device_peak_mb=peak / 2**20,
            device_baseline_mb=baseline_device / 2**20,
            device_step_mb=(peak - baseline_device) / 2**20,
        )
    return result


def profile_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time the pieces of the fast DP step and of the non-private step, interleaved.

    Pieces: the non-private gradient and Adam update; the tapped backward (forward +
    backward to the layer outputs), per-example norms + clip factors, the einsum
    weighted sum, the whole fast chunk, the DP apply (noise + masks + Adam), and the
    noise alone. XLA's flop counts come with each piece; XLA counts a ``lax.scan`` body
    once, so pieces that contain the flow's scan over blocks under-count by about K.
    """
    point = Point(**spec["point"])
    config, inputs = point.config, make_inputs(point)
    params, x, key = inputs["params"], inputs["data"], inputs["step_key"]
    layout, clipper, opt = unit_layout(config), FlatClipping(L2_CLIP), optimizer()
    kept = jnp.ones((layout.num_atoms,), x.dtype)

    def nonprivate_grad(p, x):
        return jax.value_and_grad(lambda q: -jnp.mean(jax.vmap(lambda xi: model.log_prob(config, q, xi))(x)))(p)

    def adam(p, s, g):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    def norms_and_factors(p, records, cotangents):
        return clip_factors(clipper, layout, fastgrad.atom_sq_norms(config, p, records, cotangents, layout), kept)[0]

    def weighted_sum(p, records, cotangents, factors):
        return fastgrad.weighted_grad_sum(config, p, records, cotangents, factors, layout)

    def noise(g, k):
        leaves, treedef = jax.tree.flatten(g)
        keys = jax.random.split(k, len(leaves))
        return jax.tree.unflatten(treedef, [jax.random.normal(kk, leaf.shape) for leaf, kk in zip(leaves, keys)])

    tapped = jax.jit(lambda p, x: fastgrad.tapped_backward(config, p, x))
    _, records, cotangents = tapped(params, x)
    factors = jax.jit(norms_and_factors)(params, records, cotangents)
    dp = make_dp_step(config, clipper, "fast", opt, NOISE_MULTIPLIER * L2_CLIP, float(point.batch))
    opt_state = _adam_init(params)
    pieces = {
        "nonprivate_grad": (nonprivate_grad, (params, x)),
        "adam_update": (adam, (params, opt_state, params)),
        "tapped_backward": (tapped, (params, x)),
        "norms_and_clip_factors": (norms_and_factors, (params, records, cotangents)),
        "weighted_grad_sum": (weighted_sum, (params, records, cotangents, factors)),
        "fast_chunk": (dp.chunk, (params, x, inputs["mask"], key)),
        # Without donation, so that it can run repeatedly on the same inputs.
        "dp_apply": (jax.jit(dp.apply.__wrapped__), (params, opt_state, params, key)),
        "noise_only": (noise, (params, key)),
    }
    compiled, out = {}, {}
    for name, (fn, args) in pieces.items():
        jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
        compiled[name] = jitted.lower(*args).compile()
        jax.block_until_ready(compiled[name](*args))
        cost = compiled[name].cost_analysis() or {}
        out[name] = {"xla_gflop": cost["flops"] / 1e9 if "flops" in cost else None}
    samples = {name: [] for name in pieces}
    for order in shuffled_rounds(list(pieces), spec["repeats"]):
        for name in order:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*pieces[name][1]))
            samples[name].append(time.perf_counter() - start)
    for name in pieces:
        out[name]["time_s"] = summarize(samples[name])
    return {"point": point.label, "batch": point.batch, "pieces": out}


def info_worker(spec: dict[str, Any]) -> dict[str, Any]:
    return device_info()


WORKERS = {"info": info_worker, "time": timing_worker, "memory": memory_worker, "profile": profile_worker}


class WorkerError(RuntimeError):
    """A worker process failed or ran out of time."""


def run_worker(kind: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one worker in a fresh Python process and return its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_path), str(result_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise WorkerError(f"{kind} worker ran past {timeout_s:.0f} s") from err
        if proc.returncode != 0:
            raise WorkerError(f"{kind} worker exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return json.loads(result_path.read_text())


# --------------------------------------------------------------------------------------
# The sweep (parent process: no JAX computation happens here).
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class PlannedPoint:
    point: Point
    sweeps: list[str]
    methods: list[str]
    check: bool = False


def plan(args: argparse.Namespace) -> list[PlannedPoint]:
    """Batch sweep at the default flow, then width and depth sweeps at ``--sweep-batch``."""
    planned: dict[Point, PlannedPoint] = {}

    def add(point: Point, sweep: str, methods: list[str]) -> None:
        entry = planned.setdefault(point, PlannedPoint(point, [], []))
        entry.sweeps.append(sweep)
        entry.methods = [m for m in METHODS if m in entry.methods or m in methods]

    default = functools.partial(Point, args.dim, args.blocks, args.width, num_bins=args.bins)
    for batch in args.batch_sizes:
        add(default(batch=batch), "batch", args.methods)
    for width in sorted({*args.widths, args.width} if args.widths else ()):
        add(Point(args.dim, args.blocks, width, args.sweep_batch, args.bins), "width", args.sweep_methods)
    for blocks in sorted({*args.depths, args.blocks} if args.depths else ()):
        add(Point(args.dim, blocks, args.width, args.sweep_batch, args.bins), "depth", args.sweep_methods)
    points = list(planned.values())
    points[0].check = True  # the smallest batch of the batch sweep (arguments are sorted)
    return points


def run_point(entry: PlannedPoint, args: argparse.Namespace, exec_root: Path, log) -> dict[str, Any]:
    point = entry.point
    result: dict[str, Any] = {**dataclasses.asdict(point), "label": point.label, "sweeps": entry.sweeps, "methods": {}}
    methods = []
    for name in entry.methods:
        if name == "vmap" and point.batch > args.vmap_max_batch:
            result["methods"][name] = {
                "status": "skipped",
                "reason": f"batch {point.batch} > --vmap-max-batch={args.vmap_max_batch} (vmap is too slow there)",
            }
        else:
            methods.append(name)
    exec_dir = exec_root / f"{point.dim}_{point.num_blocks}_{point.width}_{point.batch}"
    exec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "point": dataclasses.asdict(point),
        "methods": methods,
        "exec_dir": str(exec_dir),
        "check": entry.check,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "vmap_max_step_s": args.vmap_max_step_s,
        "memory_steps": args.memory_steps,
    }
    start = time.perf_counter()
    try:
        timing = run_worker("time", spec, args.worker_timeout_s)
    except WorkerError as err:
        log(f"  timing failed: {err}")
        result["methods"].update({name: {"status": "error", "reason": str(err)} for name in methods})
        return result
    result["methods"].update(timing["methods"])
    result["l2_clip"], result["check"] = timing["l2_clip"], timing["check"]
    log(f"  timed {len(methods)} methods in {time.perf_counter() - start:.0f} s")
    measured = [name for name in methods if name in args.memory_methods]
    start = time.perf_counter()
    for name in measured:
        try:
            result["methods"][name]["memory"] = run_worker("memory", {**spec, "method": name}, args.worker_timeout_s)
        except WorkerError as err:
            result["methods"][name]["memory"] = {"error": str(err)}
    if measured:
        log(f"  memory of {len(measured)} methods in {time.perf_counter() - start:.0f} s")
    return result


def memory_value(method_result: dict[str, Any], platform_name: str) -> float | None:
    """The memory figure compared across methods: the step's device peak on GPU, RSS growth on CPU."""
    memory = method_result.get("memory") or {}
    return memory.get("device_peak_mb" if platform_name != "cpu" else "step_rss_mb")


def find(points: list[dict], **fields) -> dict | None:
    return next((p for p in points if all(p[k] == v for k, v in fields.items())), None)


def ok(point: dict | None, name: str) -> dict | None:
    method = (point or {}).get("methods", {}).get(name)
    return method if method and method.get("status") == "ok" else None


def evaluate_targets(points: list[dict], args: argparse.Namespace, platform_name: str) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value (None when not measured) and a verdict."""
    default = {"dim": args.dim, "num_blocks": args.blocks, "width": args.width}
    targets = []
    for batch in (256, 1024):
        fast = ok(find(points, batch=batch, **default), "fast")
        value = fast["ratio_to_nonprivate"]["median"] if fast and "ratio_to_nonprivate" in fast else None
        targets.append({"target": f"fast DP step / non-private step at B={batch}", "bound": "<= 1.5", "value": value,
                        "met": None if value is None else value <= 1.5})
    point = find(points, batch=1024, **default)
    fast, vmap = ok(point, "fast"), ok(point, "vmap")
    value = vmap["step_s"]["median"] / fast["step_s"]["median"] if fast and vmap else None
    targets.append({"target": "vmap step / fast step at B=1024", "bound": ">= 10", "value": value,
                    "met": None if value is None else value >= 10})
    point = find(points, batch=4096, **default)
    fast, nonprivate = ok(point, "fast"), ok(point, "nonprivate")
    fast_mem = memory_value(fast, platform_name) if fast else None
    np_mem = memory_value(nonprivate, platform_name) if nonprivate else None
    value = fast_mem / np_mem if fast_mem and np_mem else None
    metric = "device peak" if platform_name != "cpu" else "step RSS growth"
    targets.append({"target": f"fast / non-private memory ({metric}) at B=4096", "bound": "<= 1.5", "value": value,
                    "met": None if value is None else value <= 1.5})
    growth = []
    for batch in args.batch_sizes:
        vmap = ok(find(points, batch=batch, **default), "vmap")
        growth.append({"batch": batch, "memory_mb": memory_value(vmap, platform_name) if vmap else None})
    targets.append({"target": f"vmap memory ({metric}, MiB) vs batch", "bound": "shown", "value": growth, "met": None})
    return targets


# --------------------------------------------------------------------------------------
# Outputs: markdown tables and plots.
# --------------------------------------------------------------------------------------


def _time_cell(method: dict | None) -> str:
    if method is None:
        return "–"
    if method.get("status") != "ok":
        return method.get("status", "–")
    step = method["step_s"]
    cell = f"{1e3 * step['median']:.1f} ms [{1e3 * step['q25']:.1f}–{1e3 * step['q75']:.1f}]"
    if "ratio_to_nonprivate" in method:
        cell += f" · {method['ratio_to_nonprivate']['median']:.2f}x"
    return cell + (" (once)" if "timing_note" in method else "")


def _memory_cell(method: dict | None, platform_name: str) -> str:
    if method is None or method.get("status") != "ok":
        return "–"
    memory = method.get("memory") or {}
    temp = sum((m or {}).get("temp", 0) for m in method["xla_memory"].values()) / 2**20
    if "error" in memory:
        return f"error (XLA temp {temp:.0f})"
    if not memory:
        return f"not measured (XLA temp {temp:.0f})"
    if platform_name != "cpu":
        return f"{memory['device_peak_mb']:.0f} (XLA temp {temp:.0f})"
    return f"{memory['peak_rss_mb']:.0f} / +{memory['step_rss_mb']:.0f} (XLA temp {temp:.0f})"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _sweep_rows(points: list[dict], sweep: str, key: str, names: list[str], cell) -> list[list[str]]:
    rows = [p for p in points if sweep in p["sweeps"]]
    return [[str(p[key])] + [cell(p["methods"].get(name)) for name in names] for p in sorted(rows, key=lambda p: p[key])]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    env, points, names = results["environment"], results["points"], list(results["methods"])
    platform_name = env["platform"]
    lines = [
        f"# One DP-SGD step: gradient paths and clipping strategies ({env['device_kind']})",
        "",
        f"`{results['command']}` on {results['created']}: jax {env['jax_version']}, {env['platform']}, "
        f"{env['cpu_count']} CPU cores, load average {env['load_average_start']:.1f} at the start and "
        f"{env['load_average_end']:.1f} at the end, {results['wall_s'] / 60:.1f} min in all.",
        "",
        "A step is training's jitted chunk (clipped per-example gradient sum) + apply (noise, Adam). Times are "
        "medians [IQR] over interleaved rounds in one process per configuration; `·1.23x` is the median of the "
        "per-round ratio to the non-private step of the same round. Memory comes from a fresh process per method "
        "that only loads the compiled step.",
        "",
        "## Targets",
        "",
    ]
    target_rows = []
    for t in results["targets"]:
        if isinstance(t["value"], list):
            value = ", ".join(f"B={g['batch']}: {_mib(g['memory_mb'])}" for g in t["value"])
        else:
            value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        target_rows.append([t["target"], t["bound"], value, met])
    lines += markdown_table(["target", "bound", "measured", "met"], target_rows)
    headers = {"batch": ("batch", "B"), "width": ("width", "h"), "depth": ("num_blocks", "K")}
    for sweep, (key, title) in headers.items():
        if any(sweep in p["sweeps"] for p in points):
            lines += ["", f"## Step time, {sweep} sweep", ""]
            lines += markdown_table([title, *names], _sweep_rows(points, sweep, key, names, _time_cell))
    lines += ["", "## Throughput (examples/s)", ""]
    lines += markdown_table(["configuration", *names], [
        [p["label"]] + [f"{m['examples_per_s']:.0f}" if (m := ok(p, n)) else "–" for n in names] for p in points
    ])
    lines += ["", "## Compile time (s: trace/lower + XLA compile of chunk and apply, or of the non-private step)", ""]
    lines += markdown_table(["configuration", *names], [
        [p["label"]] + [f"{m['compile']['total_s']:.1f}" if (m := ok(p, n)) else "–" for n in names] for p in points
    ])
    memory_title = "device peak MiB" if platform_name != "cpu" else "peak RSS MiB / + growth during the steps"
    lines += ["", f"## Memory ({memory_title}; XLA temp buffers MiB)", ""]
    lines += markdown_table(["configuration", *names], [
        [p["label"]] + [_memory_cell(p["methods"].get(n), platform_name) for n in names] for p in points
    ])
    check = results["check"]
    if check:
        lines += ["", f"## Same clipped gradient ({check['point']}, C={check['l2_clip']:.4g})", "",
                  f"{100 * check['fraction_clipped']:.0f}% of the examples are clipped (median norm "
                  f"{check['median_grad_norm']:.2f}). Largest per-leaf relative L2 difference of each path's "
                  "clipped sum from materialised vmap(grad) per-example gradients clipped by the same strategy "
                  f"(tolerance {check['tolerance']:g}):", ""]
        lines += markdown_table(["method", "max relative difference"],
                        [[n, f"{d:.2e}"] for n, d in check["max_rel_diff"].items()])
    for profile in results.get("profile", []):
        pieces = profile["pieces"]
        lines += ["", f"## Profile of the fast DP step ({profile['point']})", "",
                  "XLA flops count a scan body once (the flow scans over its K blocks).", ""]
        lines += markdown_table(["piece", "median ms [IQR]", "XLA GFLOP"], [
            [name, f"{1e3 * p['time_s']['median']:.2f} [{1e3 * p['time_s']['q25']:.2f}–{1e3 * p['time_s']['q75']:.2f}]",
             "–" if p["xla_gflop"] is None else f"{p['xla_gflop']:.3f}"] for name, p in pieces.items()
        ])
    skipped = [(p["label"], n, m.get("reason", m.get("timing_note", ""))) for p in points
               for n, m in p["methods"].items() if m.get("status") != "ok" or "timing_note" in m]
    if skipped:
        lines += ["", "## Skipped or shortened", ""] + [f"* {label}, {n}: {reason}" for label, n, reason in skipped]
    path.write_text("\n".join(lines) + "\n")


def write_plots(results: dict[str, Any], stem: Path) -> list[str]:
    """Step time and memory vs batch size at the default flow, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    platform_name = results["environment"]["platform"]
    batch_points = sorted((p for p in results["points"] if "batch" in p["sweeps"]), key=lambda p: p["batch"])
    if len(batch_points) < 2:
        return []
    written = []
    for what, ylabel in (("time", "step time (ms)"), ("memory", "memory (MiB)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in results["methods"]:
            xs, ys, lo, hi = [], [], [], []
            for p in batch_points:
                m = ok(p, name)
                value = None
                if m and what == "time":
                    value = 1e3 * m["step_s"]["median"]
                    lo.append(value - 1e3 * m["step_s"]["q25"])
                    hi.append(1e3 * m["step_s"]["q75"] - value)
                elif m:
                    value = memory_value(m, platform_name)
                if value is not None:
                    xs.append(p["batch"])
                    ys.append(value)
            if xs:
                if what == "time":
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
                else:
                    ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        metric = "device peak" if platform_name != "cpu" else "RSS growth during the step"
        ax.set_ylabel(ylabel if what == "time" else f"{ylabel}, {metric}")
        p0 = batch_points[0]
        ax.set_title(f"One DP step, d={p0['dim']} K={p0['num_blocks']} h={p0['width']}x2 "
                     f"({results['environment']['device_kind']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{what}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one configuration (B=256), 3 rounds: < 2 min on CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="fail unless JAX's default device is of this kind")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--suffix", default=None, help="output name suffix (default: platform, + _quick)")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=None, help="default 64 256 1024 4096")
    parser.add_argument("--widths", type=int, nargs="*", default=None, help="width sweep (default 128 512)")
    parser.add_argument("--depths", type=int, nargs="*", default=None, help="depth sweep (default 2 8)")
    parser.add_argument("--sweep-batch", type=int, default=1024, help="batch size of the width and depth sweeps")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--sweep-methods", nargs="+", choices=list(METHODS),
                        default=["nonprivate", "vmap", "fast"],
                        help="methods of the width and depth sweeps")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 7, quick 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--memory-methods", nargs="*", choices=list(METHODS), default=None,
                        help="methods whose peak memory is measured (default all; quick: nonprivate vmap fast)")
    parser.add_argument("--profile-batches", type=int, nargs="*", default=None,
                        help="batch sizes profiled piece by piece (default 256 1024; none with --quick)")
    parser.add_argument("--profile-repeats", type=int, default=15)
    parser.add_argument("--vmap-max-batch", type=int, default=None, help="default 1024 on CPU, 4096 on GPU")
    parser.add_argument("--vmap-max-step-s", type=float, default=10.0)
    parser.add_argument("--worker-timeout-s", type=float, default=900.0)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("--warmup and --repeats must be >= 1")
    defaults = {"batch_sizes": [256] if args.quick else [64, 256, 1024, 4096],
                "widths": [] if args.quick else [128, 512],
                "depths": [] if args.quick else [2, 8],
                "repeats": 3 if args.quick else 7,
                "memory_methods": ["nonprivate", "vmap", "fast"] if args.quick else list(METHODS),
                "profile_batches": [] if args.quick else [256, 1024]}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batch_sizes = sorted(set(args.batch_sizes))
    if not (args.batch_sizes or args.widths or args.depths):
        parser.error("nothing to run: give --batch-sizes, --widths or --depths")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, spec_path, result_path = args.worker
        result = WORKERS[kind](json.loads(Path(spec_path).read_text()))
        Path(result_path).write_text(json.dumps(result))
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    env = run_worker("info", {}, args.worker_timeout_s)
    if args.device != "auto" and env["platform"] != args.device:
        log(f"grad_strategies: --device {args.device} asked for, but JAX's default device is "
            f"{env['platform']} ({env['device_kind']}); nothing was run.")
        return 2
    if args.vmap_max_batch is None:
        args.vmap_max_batch = 1024 if env["platform"] == "cpu" else 4096
    suffix = args.suffix or (env["platform"] + ("_quick" if args.quick else ""))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"grad_strategies_{suffix}"
    planned = plan(args)
    log(f"grad_strategies: {len(planned)} configurations on {env['device_kind']} ({env['platform']}), "
        f"results to {stem}.*")
    points, profiles = [], []
    with tempfile.TemporaryDirectory() as exec_root:
        for i, entry in enumerate(planned):
            log(f"[{i + 1}/{len(planned)}] {entry.point.label}: {', '.join(entry.methods)} "
                f"({time.perf_counter() - started:.0f} s so far)")
            points.append(run_point(entry, args, Path(exec_root), log))
    for batch in args.profile_batches:
        point = Point(args.dim, args.blocks, args.width, batch, args.bins)
        log(f"profile {point.label} ({time.perf_counter() - started:.0f} s so far)")
        try:
            profiles.append(run_worker("profile", {"point": dataclasses.asdict(point), "repeats": args.profile_repeats},
                                       args.worker_timeout_s))
        except WorkerError as err:
            log(f"  profile failed: {err}")
    env.update(load_average_start=load_start, load_average_end=os.getloadavg()[0])
    results = {
        "benchmark": "grad_strategies",
        "command": " ".join(["python benchmarks/grad_strategies.py", *(argv if argv is not None else sys.argv[1:])]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "settings": {
            "l2_clip": L2_CLIP, "noise_multiplier": NOISE_MULTIPLIER, "learning_rate": LEARNING_RATE,
            "param_scale": PARAM_SCALE, "repeats": args.repeats, "warmup": args.warmup,
            "memory_steps": args.memory_steps, "vmap_max_batch": args.vmap_max_batch,
            "vmap_max_step_s": args.vmap_max_step_s, "quick": args.quick,
        },
        "methods": {name: METHODS[name].description for name in METHODS
                    if any(name in p["methods"] for p in points)},
        "points": points,
        "check": next((p["check"] for p in points if p.get("check")), None),
        "profile": profiles,
    }
    results["targets"] = evaluate_targets(points, args, env["platform"])
    results["wall_s"] = time.perf_counter() - started
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_markdown(results, stem.with_suffix(".md"))
    plots = write_plots(results, stem)
    log(f"wrote {stem}.json, {stem}.md{''.join(', ' + p for p in plots)} in {results['wall_s'] / 60:.1f} min")
    check = results["check"]
    if check and not check["passed"]:
        log(f"clipped sums disagree beyond {check['tolerance']}: {check['max_rel_diff']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
