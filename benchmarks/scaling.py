"""Scaling of DP-SGD: throughput (rows/s) against devices, and the streaming path against table size.

Part 1, devices: one worker process sees ``--max-devices`` devices (forced host CPU devices
through ``XLA_FLAGS=--xla_force_host_platform_device_count``, or the GPUs with ``--platform
gpu``). For each count n it builds ``train.make_dp_step`` with a mesh over the first n
devices (and once without a mesh) and times full DP-SGD steps (clipped-sum chunk + noisy
apply) on one logical batch. All counts are timed in the same process in interleaved,
shuffled rounds, so their ratios are measured side by side. rows/s = batch / median step.
Forced CPU devices share the machine's cores: on a 2-core machine they show the cost of
sharding, not a speed-up; real accelerators (or hosts) are what scale.

Part 2, streaming: for each table size (default 0.1M, 1M, 10M rows of Adult rows drawn
with replacement, as Parquet, cached in ``--data-dir``), a fresh worker process
(so its peak RSS is its own) times

* the validating + counting pass that ``fit_stream`` starts with (rows/s over the file);
* ``dp_fit`` on ``StreamRows`` for ``--stream-steps`` steps with the marginal encoder:
  setup (noise calibration, first prefetch pass, compilation) apart from the loop, and
  loop throughput in sampled rows/s, which includes the later prefetch passes.

Usage::

    python benchmarks/scaling.py                       # CPU: devices 1,2,4 and 0.1M/1M/10M rows
    python benchmarks/scaling.py --stream-rows 100000 1000000 --stream-steps 200
    python benchmarks/scaling.py --platform gpu        # (benchmarks/run_gpu.sh does this)

Writes ``benchmarks/results/scaling_<platform>[_<suffix>].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- part 1


def devices_worker(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    from dpnf_jax.flows.model import FlowConfig, init_params
    from dpnf_jax.privacy.clipping import FlatClipping
    from dpnf_jax.train import make_dp_step

    devices = jax.devices()
    config = FlowConfig(dim=args.dim, num_blocks=args.blocks, hidden=(args.width,) * 2, num_bins=8)
    counts = [n for n in args.devices if n <= len(devices)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.dim)).astype(np.float32)
    mask = np.ones(args.batch, bool)
    opt = optax.adam(1e-3)
    setups = {}
    for n in [0, *counts]:  # 0: no mesh at all (the single-device code path)
        mesh = None if n == 0 else jax.sharding.Mesh(np.array(devices[:n]), ("data",))
        step = make_dp_step(config, FlatClipping(1.0), args.grad_method, opt, 1.0, float(args.batch), mesh)
        params = init_params(config, jax.random.key(0))
        if mesh is None:
            rows, valid = jnp.asarray(x), jnp.asarray(mask)
        else:
            rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
            params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            rows, valid = jax.device_put(x, rows_sharding), jax.device_put(mask, rows_sharding)
        started = time.perf_counter()
        state = [params, opt.init(params)]
        key = jax.random.key(1)

        def run(step=step, rows=rows, valid=valid, state=state, key=key):
            grad_sum, _ = step.chunk(state[0], rows, valid, key)
            state[0], state[1] = step.apply(state[0], state[1], grad_sum, key)
            jax.block_until_ready(state[0])

        run()
        setups[n] = {"run": run, "compile_s": time.perf_counter() - started}
    times = {n: [] for n in setups}
    order_rng = np.random.default_rng(0)
    for _ in range(args.repeats):
        for n in order_rng.permutation(list(setups)):
            started = time.perf_counter()
            setups[int(n)]["run"]()
            times[int(n)].append(time.perf_counter() - started)
    points = []
    for n, samples in times.items():
        median = float(np.median(samples))
        q1, q3 = (float(v) for v in np.percentile(samples, [25, 75]))
        points.append({"devices": n or 1, "mesh": n > 0, "median_step_s": median, "iqr_step_s": [q1, q3],
                       "rows_per_s": args.batch / median, "compile_s": setups[n]["compile_s"]})
    base = next(p["median_step_s"] for p in points if not p["mesh"])
    for p in points:
        p["speedup_vs_no_mesh"] = base / p["median_step_s"]
    return {"device_kind": devices[0].device_kind, "available_devices": len(devices), "points": points}


# ----------------------------------------------------------------------------- part 2


def make_table(rows: int, directory: Path) -> Path:
    """Adult training rows drawn with replacement, as Parquet (made once, then cached)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpnf_jax.datasets import load_adult

    path = directory / f"adult_{rows}.parquet"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    base, _ = load_adult()
    rng = np.random.default_rng(rows)
    partial = path.with_suffix(".partial")
    writer = None
    for start in range(0, rows, 500_000):
        frame = base.iloc[rng.integers(0, len(base), min(500_000, rows - start))].reset_index(drop=True)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        writer = writer or pq.ParquetWriter(partial, table.schema)
        writer.write_table(table, row_group_size=131_072)
    writer.close()
    os.replace(partial, path)
    return path


def stream_worker(args: argparse.Namespace, rows: int) -> dict[str, Any]:
    import warnings

    import jax
    import optax

    from dpnf_jax.data.encode import ClippingWarning
    from dpnf_jax.data.marginal import DPMarginalEncoder
    from dpnf_jax.data.stream import StreamRows, TableFile, scan
    from dpnf_jax.datasets import adult_schema
    from dpnf_jax.flows.model import FlowConfig
    from dpnf_jax.train import dp_fit

    warnings.simplefilter("ignore", ClippingWarning)
    path = make_table(rows, Path(args.data_dir))
    schema = adult_schema()
    table = TableFile(path, schema, chunk_rows=args.chunk_rows)
    encoder = DPMarginalEncoder(schema)
    started = time.perf_counter()
    counts = None
    for _, frame, parsed in scan(table):
        part = encoder.exact_counts(frame, parsed)
        counts = part if counts is None else [a + b for a, b in zip(counts, part)]
    scan_s = time.perf_counter() - started
    encoder.release(counts, noise_multiplier=1.0, rng=0)  # a benchmark: the noise level is irrelevant here
    stream = StreamRows(table, encoder.encode, encoder.dim)
    config = FlowConfig(dim=encoder.dim, num_blocks=args.blocks, hidden=(args.width,) * 2)
    batch = min(args.batch, rows)
    epochs = args.stream_steps * batch / rows
    marks = []
    started = time.perf_counter()
    _, report = dp_fit(config, stream, epsilon=8.0, delta=1e-7, epochs=epochs, batch_size=batch,
                       optimizer=optax.adam(1e-3), verbose=False, prefetch_rows=args.prefetch_rows,
                       method=args.grad_method, callback=lambda step, p, nll: marks.append(time.perf_counter()))
    total_s = time.perf_counter() - started
    loop_s = marks[-1] - marks[0]
    return {
        "rows": rows,
        "file_bytes": path.stat().st_size,
        "scan_s": scan_s,
        "scan_rows_per_s": rows / scan_s,
        "steps": report.steps,
        "batch": batch,
        "prefetch_rows": args.prefetch_rows,
        "passes": stream.passes,
        "rows_encoded": stream.rows_encoded,
        "setup_s": marks[0] - started,
        "loop_s": loop_s,
        "train_total_s": total_s,
        "loop_sampled_rows_per_s": (report.steps - 1) * report.expected_batch_size / loop_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_kind": jax.devices()[0].device_kind,
    }


# ------------------------------------------------------------------------------ driver


def _run_worker(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {argv[:2]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Scaling ({result['environment']['platform']}, {result['environment']['device_kind']})", ""]
    devices = result.get("devices")
    if devices:
        lines += [f"## DP-SGD step vs devices (batch {result['settings']['batch']}, "
                  f"{result['settings']['grad_method']}, one process, interleaved rounds)", "",
                  "| devices | mesh | median step (ms) | rows/s | vs no mesh | compile (s) |", "|---|---|---|---|---|---|"]
        for p in devices["points"]:
            lines.append(f"| {p['devices']} | {'yes' if p['mesh'] else 'no'} | {1e3 * p['median_step_s']:.1f} | "
                         f"{p['rows_per_s']:,.0f} | {p['speedup_vs_no_mesh']:.2f}x | {p['compile_s']:.1f} |")
        lines.append("")
    if result.get("stream"):
        lines += ["## Streaming from Parquet vs table size (one process per size)", "",
                  "| rows | file (MB) | scan rows/s | steps | passes | setup (s) | loop sampled rows/s | peak RSS (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in result["stream"]:
            lines.append(f"| {p['rows']:,} | {p['file_bytes'] / 1e6:.0f} | {p['scan_rows_per_s']:,.0f} | {p['steps']} | "
                         f"{p['passes']} | {p['setup_s']:.1f} | {p['loop_sampled_rows_per_s']:,.0f} | "
                         f"{p['peak_rss_bytes'] / 2**20:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    devices = result.get("devices")
    if devices:
        meshed = [p for p in devices["points"] if p["mesh"]]
        axes[0].plot([p["devices"] for p in meshed], [p["rows_per_s"] for p in meshed], "o-", label="mesh")
        plain = next(p for p in devices["points"] if not p["mesh"])
        axes[0].axhline(plain["rows_per_s"], color="gray", ls="--", label="no mesh")
        axes[0].set(xlabel="devices", ylabel="rows/s", title=f"DP-SGD step, batch {result['settings']['batch']}",
                    xticks=[p["devices"] for p in meshed])
        axes[0].set_ylim(bottom=0)
        axes[0].legend()
    stream = result.get("stream")
    if stream:
        rows = [p["rows"] for p in stream]
        axes[1].loglog(rows, [p["scan_rows_per_s"] for p in stream], "o-", label="validate + count pass (file rows/s)")
        axes[1].loglog(rows, [p["loop_sampled_rows_per_s"] for p in stream], "s-", label="training loop (sampled rows/s)")
        axes[1].set(xlabel="table rows", ylabel="rows/s", title="streaming from Parquet")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4], help="device counts to time")
    parser.add_argument("--stream-rows", type=int, nargs="*", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--stream-steps", type=int, default=300)
    parser.add_argument("--prefetch-rows", type=int, default=65_536)
    parser.add_argument("--chunk-rows", type=int, default=131_072)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=15)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--grad-method", default="fast")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--data-dir", default=str(Path.home() / ".cache" / "dpnf-jax" / "scaling"))
    parser.add_argument("--suffix", default="")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--worker", choices=["devices", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "devices":
        print(json.dumps(devices_worker(args)))
        return
    if args.worker == "stream":
        print(json.dumps(stream_worker(args, args.worker_rows)))
        return

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = {**os.environ}
    if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    result: dict[str, Any] = {
        "environment": {"platform": args.platform, "python": platform.python_version(), "machine": platform.machine(),
                        "cpu_count": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_rows")},
    }
    started = time.perf_counter()
    if args.devices:
        devices_env = dict(env)
        if args.platform == "cpu":
            forced = f"--xla_force_host_platform_device_count={max(args.devices)}"
            devices_env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {forced}".strip()
        result["devices"] = _run_worker([*passthrough, "--worker", "devices"], devices_env)
        print(f"devices done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    result["stream"] = []
    for rows in args.stream_rows:
        result["stream"].append(_run_worker([*passthrough, "--worker", "stream", "--worker-rows", str(rows)], env))
        print(f"stream {rows} rows done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    kinds = [result.get("devices", {}).get("device_kind")] + [p["device_kind"] for p in result["stream"]]
    result["environment"]["device_kind"] = next((k for k in kinds if k), "unknown")
    result["wall_s"] = time.perf_counter() - started
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"scaling_{args.platform}" + (f"_{args.suffix}" if args.suffix else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out_dir / f"{stem}.md").write_text(table)
    plot(result, out_dir / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
