"""Peers: jax-privacy on the flow, Opacus (hooks, ghost clipping) on the conditioner MLP.

Run from the peers environment (``/work/venv-peers``: this package plus torch, opacus and
jax-privacy; see benchmarks/README.md)::

    python benchmarks/peers.py            # ~5 min on 2 CPU cores
    python benchmarks/peers.py --quick    # one batch size per section

1. **Flow.** ``jax_privacy.clipping.clipped_grad`` (vmap-based per-example clipping) on
   the flow's per-example NLL, followed by training's apply (noise + Adam), next to our
   non-private, ``fast`` and ``vmap`` steps, all compiled ahead of time and timed in
   interleaved rounds in one process. At the first batch size its clipped sum is
   checked against materialised per-example gradients clipped by ``clip_factors``.
2. **MLP.** An MLP shaped like the flow's conditioner (input d_a, the hidden widths,
   output ``d_b * (3 * num_bins + 1)``), per-example loss ``0.5 ||f(x) - y||^2``, one
   DP-SGD step (clip, Gaussian noise, Adam): PyTorch non-private, Opacus with per-sample
   gradient hooks (``GradSampleModule``) and with ghost clipping
   (``GradSampleModuleFastGradientClipping``), and in JAX a non-private step, vmap
   clipping and the analytic fast path written here for a plain MLP (per-example norms
   ``sum_l (||a_l||^2 + 1) ||delta_l||^2`` from layer inputs and output cotangents, one
   einsum per layer). The fast path is checked against vmap, and both Opacus clipped
   sums against it (same weights and data, no noise), in the same run.

Each peer that is not installed is skipped with a message saying so. Writes
``benchmarks/results/peers_<platform>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grad_strategies as gs
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpnf_jax.flows import layers, model
from dpnf_jax.privacy.clipping import FlatClipping
from dpnf_jax.train import make_dp_step

Layers = list[dict[str, jax.Array]]


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def interleaved(steps: dict[str, Callable[[], None]], repeats: int, max_step_s: float) -> dict[str, Any]:
    """Warm every step up once, then time ``repeats`` rounds, each in a shuffled order.

    A step whose warm-up took longer than ``max_step_s`` is timed once. Each entry of
    ``steps`` runs one full step and blocks until it is done.
    """
    samples = {name: [] for name in steps}
    notes = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if elapsed > max_step_s:
            samples[name].append(elapsed)
            notes[name] = f"one step took {elapsed:.1f} s > {max_step_s} s: timed once"
    names = [name for name in steps if name not in notes]
    for order in gs.shuffled_rounds(names, repeats):
        for name in order:
            start = time.perf_counter()
            steps[name]()
            samples[name].append(time.perf_counter() - start)
    results = {name: {"step_s": gs.summarize(samples[name])} for name in steps}
    for name, note in notes.items():
        results[name]["timing_note"] = note
    return results


def add_ratios(results: dict[str, Any], reference: str, batch: int) -> None:
    for entry in results.values():
        entry["examples_per_s"] = batch / entry["step_s"]["median"]
        entry[f"ratio_to_{reference}"] = entry["step_s"]["median"] / results[reference]["step_s"]["median"]


# --------------------------------------------------------------------------------------
# 1. The flow: jax-privacy's clipped_grad next to ours.
# --------------------------------------------------------------------------------------


def jax_privacy_chunk(config, l2_clip: float) -> Callable:
    """Sum of clipped per-example NLL gradients by ``jax_privacy.clipping.clipped_grad``."""
    from jax_privacy import clipping

    clipped = clipping.clipped_grad(
        lambda params, x: -model.log_prob(config, params, x), l2_clip_norm=l2_clip, batch_argnums=1, keep_batch_dim=False
    )
    return jax.jit(clipped)


def flow_section(args: argparse.Namespace, log) -> dict[str, Any]:
    if version("jax-privacy") is None:
        message = "jax-privacy is not installed (pip install jax-privacy): flow peer skipped"
        log(message)
        return {"skipped": message}
    out = {"jax_privacy_version": version("jax-privacy"), "points": []}
    for i, batch in enumerate(args.flow_batches):
        point = gs.Point(args.dim, args.blocks, args.width, batch, args.bins)
        log(f"flow {point.label}")
        inputs = gs.make_inputs(point)
        l2_clip, check = gs.L2_CLIP, None
        if i == 0:
            grads, norms = gs.reference_grads(point, inputs)
            l2_clip = float(np.median(norms))
        executables = {}
        for name in ("nonprivate", "fast", "vmap"):
            executables[name] = {k: v.compile() for k, v in gs.lower_method(point, gs.METHODS[name], inputs, l2_clip).items()}
        opt = gs.optimizer()
        apply = make_dp_step(point.config, FlatClipping(l2_clip), "vmap", opt, gs.NOISE_MULTIPLIER * l2_clip, float(batch)).apply
        peer_chunk = jax_privacy_chunk(point.config, l2_clip)
        executables["jax_privacy"] = {
            "peer_chunk": peer_chunk.lower(inputs["params"], inputs["data"]).compile(),
            "apply": apply.lower(inputs["params"], jax.eval_shape(opt.init, inputs["params"]), inputs["params"],
                                 inputs["step_key"]).compile(),
        }
        if i == 0:
            reference, _ = gs.reference_clipped_sum(point.config, FlatClipping(l2_clip), grads, inputs["params"],
                                                     jax.random.split(inputs["step_key"])[0])
            peer_sum = executables["jax_privacy"]["peer_chunk"](inputs["params"], inputs["data"])
            check = {"l2_clip": l2_clip, "fraction_clipped": float(np.mean(norms > l2_clip)),
                     "jax_privacy_max_rel_diff": gs.relative_difference(peer_sum, reference)}
        states = {name: gs.initial_state(inputs) for name in executables}

        def stepper(name):
            def step():
                if name == "jax_privacy":
                    params, opt_state = states[name]
                    grad_sum = executables[name]["peer_chunk"](params, inputs["data"])
                    states[name] = jax.block_until_ready(executables[name]["apply"](params, opt_state, grad_sum,
                                                                                    inputs["step_key"]))
                else:
                    states[name] = jax.block_until_ready(gs.run_step(executables[name], states[name], inputs))
            return step

        results = interleaved({name: stepper(name) for name in executables}, args.repeats, args.max_step_s)
        add_ratios(results, "nonprivate", batch)
        out["points"].append({"label": point.label, "batch": batch, "l2_clip": l2_clip, "methods": results,
                              "check": check})
    return out


# --------------------------------------------------------------------------------------
# 2. The conditioner-shaped MLP: Opacus vs JAX.
# --------------------------------------------------------------------------------------


def mlp_widths(args: argparse.Namespace) -> tuple[int, ...]:
    d_a, d_b = layers.split_sizes(args.dim)
    return (d_a, args.width, args.width, d_b * (3 * args.bins + 1))


def mlp_init(widths: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    """LeCun-normal kernels [in, out], small random biases (numpy, so both frameworks share them)."""
    rng = np.random.default_rng(0)
    return [
        {"kernel": (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32),
         "bias": (0.1 * rng.standard_normal(o)).astype(np.float32)}
        for i, o in zip(widths[:-1], widths[1:])
    ]


def mlp_loss(params: Layers, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example loss ``0.5 ||f(x) - y||^2`` of one example x [d_a], y [out]."""
    out, _ = layers.mlp_apply(params, "relu", x)
    return 0.5 * jnp.sum(jnp.square(out - y))


def mlp_fast_clipped_sum(params: Layers, x: jax.Array, y: jax.Array, l2_clip: float) -> tuple[Layers, jax.Array]:
    """Clipped per-example gradient sum of the MLP by analytic norms (no per-example gradients).

    One backward pass w.r.t. zero taps on the layer outputs gives each example's output
    cotangents ``delta_l`` [B, out_l]; with the recorded inputs ``a_l`` [B, in_l] the
    per-example squared norm is ``sum_l (||a_l||^2 + 1) ||delta_l||^2`` (kernel and bias),
    and the clipped sum is ``sum_i c_i a_{i,l} delta_{i,l}^T`` per layer.

    Returns:
      (clipped gradient sum shaped like ``params``, per-example norms [B]).
    """
    taps = [jnp.zeros((x.shape[0], layer["bias"].shape[0]), x.dtype) for layer in params]

    def total(taps):
        def one(xi, yi, ti):
            out, inputs = layers.mlp_apply(params, "relu", xi, None, ti)
            return 0.5 * jnp.sum(jnp.square(out - yi)), inputs

        losses, inputs = jax.vmap(one)(x, y, taps)
        return jnp.sum(losses), inputs

    deltas, inputs = jax.grad(total, has_aux=True)(taps)
    sq_norms = sum((jnp.sum(jnp.square(a), -1) + 1.0) * jnp.sum(jnp.square(d), -1) for a, d in zip(inputs, deltas))
    norms = jnp.sqrt(sq_norms)
    factors = l2_clip / jnp.maximum(norms, l2_clip)
    grads = [
        {"kernel": jnp.einsum("bi,bj->ij", a, factors[:, None] * d), "bias": jnp.sum(factors[:, None] * d, axis=0)}
        for a, d in zip(inputs, deltas)
    ]
    return grads, norms


def mlp_vmap_clipped_sum(params: Layers, x: jax.Array, y: jax.Array, l2_clip: float) -> tuple[Layers, jax.Array]:
    """The reference: materialised per-example gradients, flat-clipped and summed."""
    grads = jax.vmap(jax.grad(mlp_loss), in_axes=(None, 0, 0))(params, x, y)
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), -1) for g in jax.tree.leaves(grads)))
    factors = l2_clip / jnp.maximum(norms, l2_clip)
    return jax.tree.map(lambda g: jnp.einsum("b,b...->...", factors, g), grads), norms


def jax_mlp_steps(params0, x, y, l2_clip: float) -> dict[str, Callable[[], None]]:
    """Compiled JAX MLP steps (non-private, vmap, fast), each a closure over its own state."""
    opt = gs.optimizer()
    batch = x.shape[0]
    noise_std = gs.NOISE_MULTIPLIER * l2_clip

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def nonprivate(params, opt_state, x, y):
        grads = jax.grad(lambda p: jnp.mean(jax.vmap(mlp_loss, in_axes=(None, 0, 0))(p, x, y)))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def private(clipped_sum):
        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, opt_state, x, y, key):
            grad_sum, _ = clipped_sum(params, x, y, l2_clip)
            leaves, treedef = jax.tree.flatten(grad_sum)
            keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))
            noisy = jax.tree.map(lambda g, k: (g + noise_std * jax.random.normal(k, g.shape, g.dtype)) / batch,
                                 grad_sum, keys)
            updates, opt_state = opt.update(noisy, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return step

    key = jax.random.key(0)
    jitted = {"jax_nonprivate": (nonprivate, ()), "jax_vmap": (private(mlp_vmap_clipped_sum), (key,)),
              "jax_fast": (private(mlp_fast_clipped_sum), (key,))}
    steps = {}
    for name, (fn, extra) in jitted.items():
        params = jax.tree.map(jnp.asarray, params0)
        state = [params, jax.jit(opt.init)(params)]
        compiled = fn.lower(state[0], state[1], x, y, *extra).compile()

        def step(compiled=compiled, state=state, extra=extra):
            state[0], state[1] = jax.block_until_ready(compiled(state[0], state[1], x, y, *extra))

        steps[name] = step
    return steps


class HalfSquaredError:
    """Per-sample ``0.5 ||out - y||^2`` reduced by ``reduction`` (what Opacus' ghost loss wrapper expects)."""

    def __init__(self, reduction: str = "mean"):
        self.reduction = reduction

    def __call__(self, out, y):
        per_sample = 0.5 * ((out - y) ** 2).sum(dim=1)
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def torch_mlp(params0):
    import torch

    modules = []
    for i, layer in enumerate(params0):
        linear = torch.nn.Linear(*layer["kernel"].shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(layer["kernel"].T.copy()))
            linear.bias.copy_(torch.from_numpy(layer["bias"]))
        modules.append(linear)
        if i < len(params0) - 1:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


def opacus_step(kind: str, params0, x, y, l2_clip: float, noise_multiplier: float, learning_rate: float):
    """``(step, module, optimizer)`` for ``kind`` in {"torch_nonprivate", "opacus_hooks", "opacus_ghost"}."""
    import torch

    batch = x.shape[0]
    net = torch_mlp(params0)
    if kind == "torch_nonprivate":
        opt, loss_fn = torch.optim.Adam(net.parameters(), lr=learning_rate), HalfSquaredError()
        module = net
    elif kind == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        module = GradSampleModule(net)
        opt = DPOptimizer(torch.optim.Adam(module.parameters(), lr=learning_rate), noise_multiplier=noise_multiplier,
                          max_grad_norm=l2_clip, expected_batch_size=batch)
        loss_fn = HalfSquaredError()
    else:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        module = GradSampleModuleFastGradientClipping(net, max_grad_norm=l2_clip, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.Adam(module.parameters(), lr=learning_rate),
                                              noise_multiplier=noise_multiplier, max_grad_norm=l2_clip,
                                              expected_batch_size=batch)
        loss_fn = DPLossFastGradientClipping(module, opt, HalfSquaredError())

    def step():
        opt.zero_grad()
        loss_fn(module(x), y).backward()
        opt.step()

    def clipped_sum():
        """The clipped sum, noise-free, in the JAX layout (run with noise_multiplier=0)."""
        opt.zero_grad()
        loss_fn(module(x), y).backward()
        opt.pre_step()
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        return [{"kernel": batch * m.weight.grad.numpy().T, "bias": batch * m.bias.grad.numpy()} for m in linears]

    return step, clipped_sum


def mlp_section(args: argparse.Namespace, log) -> dict[str, Any]:
    widths = mlp_widths(args)
    out: dict[str, Any] = {"widths": list(widths), "points": [], "skipped": []}
    have_torch = version("torch") is not None
    have_opacus = have_torch and version("opacus") is not None
    if not have_torch:
        out["skipped"].append("torch is not installed: PyTorch and Opacus peers skipped")
    elif not have_opacus:
        out["skipped"].append("opacus is not installed (pip install opacus): Opacus peers skipped")
    for message in out["skipped"]:
        log(message)
    if have_torch:
        import torch

        out["torch_version"], out["torch_threads"] = version("torch"), torch.get_num_threads()
        out["opacus_version"] = version("opacus")
    params0 = mlp_init(widths)
    rng = np.random.default_rng(1)
    for i, batch in enumerate(args.mlp_batches):
        log(f"mlp widths={widths} B={batch}")
        x_np = rng.standard_normal((batch, widths[0])).astype(np.float32)
        y_np = rng.standard_normal((batch, widths[-1])).astype(np.float32)
        x, y = jnp.asarray(x_np), jnp.asarray(y_np)
        l2_clip, check = gs.L2_CLIP, None
        if i == 0:
            # Clip at the median norm so that the checks cover clipped and unclipped rows.
            jax_params = jax.tree.map(jnp.asarray, params0)
            _, norms = jax.jit(mlp_vmap_clipped_sum, static_argnums=3)(jax_params, x, y, 1.0)
            l2_clip = float(np.median(np.asarray(norms)))
            reference, _ = jax.jit(mlp_vmap_clipped_sum, static_argnums=3)(jax_params, x, y, l2_clip)
            fast, _ = jax.jit(mlp_fast_clipped_sum, static_argnums=3)(jax_params, x, y, l2_clip)
            check = {"l2_clip": l2_clip, "jax_fast_vs_vmap": gs.relative_difference(fast, reference)}
        steps = jax_mlp_steps(params0, x, y, l2_clip)
        kinds = (["torch_nonprivate"] if have_torch else []) + (["opacus_hooks", "opacus_ghost"] if have_opacus else [])
        for kind in kinds:
            tx, ty = torch.from_numpy(x_np), torch.from_numpy(y_np)
            steps[kind], _ = opacus_step(kind, copy.deepcopy(params0), tx, ty, l2_clip, gs.NOISE_MULTIPLIER,
                                         gs.LEARNING_RATE)
            if check is not None and kind != "torch_nonprivate":
                _, clipped_sum = opacus_step(kind, copy.deepcopy(params0), tx, ty, l2_clip, 0.0, gs.LEARNING_RATE)
                check[f"{kind}_vs_jax_vmap"] = gs.relative_difference(clipped_sum(), reference)
        results = interleaved(steps, args.repeats, args.max_step_s)
        add_ratios(results, "jax_nonprivate", batch)
        if have_torch:
            for entry in results.values():
                entry["ratio_to_torch_nonprivate"] = (
                    entry["step_s"]["median"] / results["torch_nonprivate"]["step_s"]["median"]
                )
        out["points"].append({"batch": batch, "l2_clip": l2_clip, "methods": results, "check": check})
    return out


# --------------------------------------------------------------------------------------
# Outputs.
# --------------------------------------------------------------------------------------


def _cell(entry: dict[str, Any], *ratios: str) -> str:
    step = entry["step_s"]
    cell = f"{1e3 * step['median']:.1f} ms [{1e3 * step['q25']:.1f}–{1e3 * step['q75']:.1f}]"
    cell += "".join(f" · {entry[r]:.2f}x" for r in ratios if r in entry)
    return cell + (" (once)" if "timing_note" in entry else "")


def write_markdown(results: dict[str, Any], path: Path) -> None:
    env = results["environment"]
    lines = [
        f"# Peers: one DP-SGD step ({env['device_kind']})",
        "",
        f"`{results['command']}` on {results['created']}: jax {env['jax_version']}, {env['cpu_count']} CPU cores, "
        f"load average {env['load_average_start']:.1f} → {env['load_average_end']:.1f}, "
        f"{results['wall_s'] / 60:.1f} min. Medians [IQR] over interleaved rounds; each section ran in its own process.",
        "",
        "## Flow: jax-privacy `clipped_grad` vs ours",
        "",
    ]
    flow = results["flow"]
    if "skipped" in flow:
        lines.append(f"Skipped: {flow['skipped']}.")
    else:
        lines += [f"jax-privacy {flow['jax_privacy_version']}; each cell: median · ratio to our non-private step.", ""]
        names = list(flow["points"][0]["methods"])
        lines += gs.markdown_table(["configuration", *names], [
            [p["label"]] + [_cell(p["methods"][n], "ratio_to_nonprivate") for n in names] for p in flow["points"]
        ])
        for p in flow["points"]:
            if p["check"]:
                c = p["check"]
                lines += ["", f"Clipped sum at {p['label']}, C={c['l2_clip']:.4g} "
                          f"({100 * c['fraction_clipped']:.0f}% clipped): jax-privacy vs materialised vmap "
                          f"per-example gradients, max relative difference {c['jax_privacy_max_rel_diff']:.2e}."]
    mlp = results["mlp"]
    lines += ["", f"## Conditioner-shaped MLP {mlp['widths']}: Opacus vs JAX", ""]
    lines += [f"Skipped: {s}." for s in mlp["skipped"]]
    if mlp.get("torch_version"):
        lines += [f"torch {mlp['torch_version']} ({mlp['torch_threads']} threads), opacus {mlp['opacus_version']}. "
                  "Each cell: median · ratio to the JAX non-private step · ratio to the PyTorch non-private step.", ""]
    names = list(mlp["points"][0]["methods"])
    lines += gs.markdown_table(["B", *names], [
        [str(p["batch"])] + [_cell(p["methods"][n], "ratio_to_jax_nonprivate", "ratio_to_torch_nonprivate")
                             for n in names] for p in mlp["points"]
    ])
    for p in mlp["points"]:
        if p["check"]:
            diffs = ", ".join(f"{k}: {v:.2e}" for k, v in p["check"].items() if k != "l2_clip")
            lines += ["", f"Clipped sums at B={p['batch']}, C={p['check']['l2_clip']:.4g} (max relative "
                      f"difference, noise off): {diffs}."]
    path.write_text("\n".join(lines) + "\n")


SECTIONS = {"flow": flow_section, "mlp": mlp_section}


def run_section(name: str, argv: list[str]) -> dict[str, Any]:
    """Run one section in a fresh process.

    In one process the MLP section's PyTorch steps ran ~100x slower after the flow
    section's JAX work than in a fresh process (3 ms vs 0.5 s at B=256), so each section
    gets its own; within a section, frameworks are still interleaved round by round.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--section", name, "--section-out", str(out)],
                       check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one batch size per section, 3 rounds")
    parser.add_argument("--out-dir", type=Path, default=gs.RESULTS_DIR)
    parser.add_argument("--suffix", default=None, help="output name suffix (default: platform, + _quick)")
    parser.add_argument("--dim", type=int, default=gs.DEFAULT_DIM)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--flow-batches", type=int, nargs="*", default=None, help="default 256 1024")
    parser.add_argument("--mlp-batches", type=int, nargs="*", default=None, help="default 256 1024 4096")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--max-step-s", type=float, default=10.0, help="time a step once when it is slower")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--section-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.flow_batches = args.flow_batches if args.flow_batches is not None else ([256] if args.quick else [256, 1024])
    args.mlp_batches = args.mlp_batches if args.mlp_batches is not None else ([1024] if args.quick else [256, 1024, 4096])
    args.repeats = args.repeats or (3 if args.quick else 5)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.section:
        args.section_out.write_text(json.dumps(SECTIONS[args.section](args, log)))
        return 0
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    env = gs.device_info()
    results: dict[str, Any] = {
        "benchmark": "peers",
        "command": " ".join(["python benchmarks/peers.py", *(argv if argv is not None else sys.argv[1:])]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "settings": {"l2_clip": gs.L2_CLIP, "noise_multiplier": gs.NOISE_MULTIPLIER, "repeats": args.repeats},
    }
    passed_on = list(argv if argv is not None else sys.argv[1:])
    results["flow"] = run_section("flow", passed_on) if args.flow_batches else {"skipped": "no --flow-batches"}
    results["mlp"] = run_section("mlp", passed_on)
    env.update(load_average_start=load_start, load_average_end=os.getloadavg()[0])
    results["wall_s"] = time.perf_counter() - started
    suffix = args.suffix or (env["platform"] + ("_quick" if args.quick else ""))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"peers_{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_markdown(results, stem.with_suffix(".md"))
    log(f"wrote {stem}.json and {stem}.md in {results['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
