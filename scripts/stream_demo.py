"""Train from a table much larger than the memory the run is allowed, and record the numbers.

Runs ``dpnf train --data FILE --stream ...`` as a child process under a hard memory cap
and writes what happened (rows, file size, cap, peak RSS, wall time, rows/s, epsilon) to
JSON and markdown.

The cap is a Linux memory cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``) when
one can be created: the kernel then kills the child if its memory (resident pages plus
the page cache it dirties, which the kernel reclaims first) would exceed the cap. Where no
cgroup can be made, a watchdog samples the child's resident set every 50 ms and kills it
above the cap (the JSON says which enforcement ran). Peak RSS is the kernel's own
``ru_maxrss`` of the child.

    python scripts/make_big_table.py --rows 10000000 --out /data/big.csv
    python scripts/stream_demo.py --data /data/big.csv --schema /data/big.schema.json --cap-mib 1024 \\
        --out runs/big -- --epochs 0.1 --prefetch-rows 262144
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def make_cgroup(cap_bytes: int) -> Path | None:
    """A fresh memory cgroup limited to ``cap_bytes`` (v1 or v2), or None when not allowed."""
    name = f"dpnf-stream-demo-{os.getpid()}"
    for root, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"), (Path("/sys/fs/cgroup"), "memory.max")):
        if not (root / limit_file).exists() and not (root / "cgroup.controllers").exists():
            continue
        group = root / name
        try:
            group.mkdir()
            (group / limit_file).write_text(str(cap_bytes))
            if (group / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the cap either
                (group / "memory.memsw.limit_in_bytes").write_text(str(cap_bytes))
            if (group / "memory.swap.max").exists():
                (group / "memory.swap.max").write_text("0")
            return group
        except OSError:
            try:
                group.rmdir()
            except OSError:
                pass
    return None


def watchdog(pid: int, cap_bytes: int, stop: threading.Event, killed: list[bool]) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    while not stop.wait(0.05):
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError):
            return
        if resident > cap_bytes:
            killed.append(True)
            os.kill(pid, 9)
            return


def fidelity(data: str, schema_path: str, synthetic: Path, rows: int) -> dict:
    """Mean 1- and 2-way TVD of the synthetic rows against the file's first ``rows`` rows."""
    import pandas as pd

    from dpnf_jax.data.schema import Schema
    from dpnf_jax.data.stream import text_dtypes
    from dpnf_jax.evaluate import evaluate_synthetic

    schema = Schema.from_json(schema_path)
    read = dict(dtype=text_dtypes(schema), skipinitialspace=True, usecols=list(schema.names))
    real = pd.read_csv(data, nrows=rows, **read)[list(schema.names)]
    synth = pd.read_csv(synthetic, **read)[list(schema.names)]
    summary = evaluate_synthetic(real, synth, schema)["summary"]
    return {"real_rows": len(real), "synthetic_rows": len(synth), "mean_tvd_1way": summary["mean_tvd_1way"],
            "mean_tvd_2way": summary["mean_tvd_2way"], "note": "compares with real rows: NOT private"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--out", required=True, help="dpnf train's output directory")
    parser.add_argument("--cap-mib", type=int, default=1024)
    parser.add_argument("--report", default="docs/results/streaming_demo", help="path stem of the JSON and markdown")
    parser.add_argument("--evaluate-rows", type=int, default=100_000,
                        help="after the run (outside the cap), compare synthetic.csv with the file's first N rows "
                             "(1- and 2-way TVD; a NON-private, operator-side check); 0 skips it")
    parser.add_argument("train_args", nargs="*", help="more `dpnf train` arguments (after --)")
    args = parser.parse_args()
    cap = args.cap_mib * 2**20
    command = [sys.executable, "-m", "dpnf_jax.cli", "train", "--data", args.data, "--stream", "--schema", args.schema,
               "--out", args.out, "--no-eval", *args.train_args]
    group = make_cgroup(cap)
    enforcement = f"cgroup {group}" if group else "watchdog on /proc/PID/statm (no cgroup could be created)"
    print(f"stream_demo: cap {args.cap_mib} MiB by {enforcement}\n  {' '.join(command)}", file=sys.stderr)

    def enter_cgroup():
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    started = time.perf_counter()
    child = subprocess.Popen(command, preexec_fn=enter_cgroup)
    stop, killed = threading.Event(), []
    guard = threading.Thread(target=watchdog, args=(child.pid, cap, stop, killed), daemon=True)
    if group is None:
        guard.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    stop.set()
    code = os.waitstatus_to_exitcode(status)
    group_peak = None
    if group is not None:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            if (group / name).exists():
                group_peak = int((group / name).read_text())
        try:
            group.rmdir()
        except OSError:
            pass

    size = Path(args.data).stat().st_size
    result = {"command": command, "exit_code": code, "cap_bytes": cap, "enforcement": enforcement,
              "killed_by_watchdog": bool(killed), "file": str(args.data), "file_bytes": size,
              "file_over_cap": size / cap, "peak_rss_bytes": usage.ru_maxrss * 1024,
              "cgroup_peak_bytes_incl_page_cache": group_peak, "wall_s": wall}
    privacy_path = Path(args.out) / "privacy.json"
    if code == 0 and privacy_path.exists():
        privacy = json.loads(privacy_path.read_text())
        training = privacy["training"]
        result.update(rows=privacy["num_rows"], epsilon=privacy["epsilon"], delta=privacy["delta"],
                      steps=training["steps"], expected_batch_size=training["expected_batch_size"],
                      epochs=training["epochs"], fit_s=privacy["fit_seconds"],
                      sampled_rows_per_s=training["steps"] * training["expected_batch_size"] / privacy["fit_seconds"],
                      scan_s=privacy.get("scan_seconds"))
        if args.evaluate_rows > 0:
            result["fidelity_vs_first_rows"] = fidelity(args.data, args.schema, Path(args.out) / "synthetic.csv",
                                                        args.evaluate_rows)
    stem = Path(args.report)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# Streaming a table larger than the memory cap", "",
             f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}`", "",
             "| quantity | value |", "|---|---|",
             f"| exit code | {code} |",
             f"| rows | {result.get('rows', 'n/a'):,} |" if "rows" in result else "| rows | n/a |",
             f"| file size | {size / 2**30:.2f} GiB |",
             f"| memory cap | {args.cap_mib} MiB ({enforcement.split(' ')[0]}) |",
             f"| file / cap | {size / cap:.1f}x |",
             f"| peak RSS | {usage.ru_maxrss / 1024:.0f} MiB |"]
    if group_peak:
        lines.append(f"| cgroup peak (incl. page cache) | {group_peak / 2**20:.0f} MiB |")
    lines.append(f"| wall time (whole command) | {wall:.0f} s |")
    if "steps" in result:
        lines += [f"| DP-SGD steps (expected batch) | {result['steps']} ({result['expected_batch_size']:.0f}) |",
                  f"| epochs | {result['epochs']:g} |",
                  f"| fit time | {result['fit_s']:.0f} s |",
                  f"| sampled rows/s (steps x batch / fit time) | {result['sampled_rows_per_s']:,.0f} |",
                  f"| epsilon, delta | {result['epsilon']:.3f}, {result['delta']:.2g} |"]
        if result.get("scan_s") is not None:
            lines.insert(-2, f"| of which the validate + count + hash pass | {result['scan_s']:.0f} s |")
    if "fidelity_vs_first_rows" in result:
        f = result["fidelity_vs_first_rows"]
        lines += [f"| mean 1-way / 2-way TVD vs the first {f['real_rows']:,} rows ({f['synthetic_rows']:,} synthetic; "
                  f"not private) | {f['mean_tvd_1way']:.4f} / {f['mean_tvd_2way']:.4f} |"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(code)


if __name__ == "__main__":
    main()
