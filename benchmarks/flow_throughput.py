"""Throughput of the flow's training computation on Adult rows.

Times one jitted call of ``log_prob`` on a batch plus the gradient of the batch's mean
log-likelihood with respect to the parameters (the non-private training step without the
optimizer), for the default ``FlowConfig`` (4 blocks, hidden (256, 256), 8 bins), both
categorical encodings, shared and unshared conditioners. Compile time is reported apart
from the step time; step times are the median and interquartile range over repeats, each
call waited for with ``block_until_ready``.

Usage::

    python benchmarks/flow_throughput.py [--batch 1024] [--repeats 20] [--out PATH]

Prints a markdown table and writes JSON (default ``benchmarks/results/flow_throughput.json``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpnf_jax.data.encode import TabularEncoder
from dpnf_jax.datasets import adult_schema, load_adult
from dpnf_jax.flows import FlowConfig, model

DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "flow_throughput.json"


def encoded_batch(categorical: str, batch: int, seed: int = 0) -> np.ndarray:
    """[batch, d] float32: ``batch`` training rows of Adult, encoded."""
    train, _ = load_adult()
    rows = train.sample(n=batch, random_state=seed).reset_index(drop=True)
    return TabularEncoder(adult_schema(), categorical=categorical).encode(rows, rng=seed)


def make_step(config: FlowConfig):
    """(params, x [batch, d]) -> (log_prob [batch], grad of mean log_prob w.r.t. params)."""

    def mean_log_prob(params, x):
        log_prob = jax.vmap(lambda xi: model.log_prob(config, params, xi))(x)
        return jnp.mean(log_prob), log_prob

    def step(params, x):
        (_, log_prob), grads = jax.value_and_grad(mean_log_prob, has_aux=True)(params, x)
        return log_prob, grads

    return jax.jit(step)


def time_config(config: FlowConfig, x: np.ndarray, repeats: int, warmup: int = 2) -> dict:
    params = model.init_params(config, jax.random.key(0))
    x = jax.device_put(jnp.asarray(x))
    step = make_step(config)

    start = time.perf_counter()
    compiled = step.lower(params, x).compile()
    compile_s = time.perf_counter() - start

    for _ in range(warmup):
        jax.block_until_ready(compiled(params, x))
    times_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        log_prob, grads = jax.block_until_ready(compiled(params, x))
        times_ms.append(1e3 * (time.perf_counter() - start))
    if not (np.all(np.isfinite(log_prob)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))):
        raise RuntimeError(f"non-finite log_prob or gradients for {config}")

    q25, median, q75 = np.percentile(times_ms, [25, 50, 75])
    counts = model.num_params(config, params)
    return {
        "dim": config.dim,
        "shared": config.shared,
        "config": config.to_dict(),
        "num_params": counts,
        "compile_s": compile_s,
        "median_ms": float(median),
        "iqr_ms": float(q75 - q25),
        "rows_per_s": float(x.shape[0] / (median / 1e3)),
        "times_ms": [float(t) for t in times_ms],
    }


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| encoding | d | conditioner | params (cond. / LU / total) | compile s | median ms | IQR ms | rows/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p = r["num_params"]
        lines.append(
            f"| {r['encoding']} | {r['dim']} | {'shared' if r['shared'] else 'unshared'} "
            f"| {p['conditioner']:,} / {p['lu']:,} / {p['total']:,} | {r['compile_s']:.2f} "
            f"| {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['rows_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    results = []
    for categorical in ("onehot", "ordinal"):
        x = encoded_batch(categorical, args.batch)
        for shared in (True, False):
            config = FlowConfig(dim=x.shape[1], shared=shared)
            result = {"encoding": categorical, **time_config(config, x, args.repeats)}
            results.append(result)
            print(f"  {categorical:7s} d={config.dim:3d} shared={shared!s:5s} median {result['median_ms']:.1f} ms", flush=True)

    print()
    print(markdown_table(results))
    print()
    for categorical in ("onehot", "ordinal"):
        rows = [r for r in results if r["encoding"] == categorical]
        by_kind = {r["shared"]: r["num_params"] for r in rows}
        ratio = by_kind[False]["conditioner"] / by_kind[True]["conditioner"]
        print(
            f"{categorical} (d={rows[0]['dim']}): conditioner params "
            f"shared {by_kind[True]['conditioner']:,} vs unshared {by_kind[False]['conditioner']:,} "
            f"({ratio:.2f}x); total {by_kind[True]['total']:,} vs {by_kind[False]['total']:,}"
        )

    device = jax.devices()[0]
    report = {
        "benchmark": "flow_throughput",
        "what": "jitted vmap(log_prob) + grad of mean log_prob w.r.t. params, one batch of Adult rows",
        "batch": args.batch,
        "repeats": args.repeats,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
