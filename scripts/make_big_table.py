"""Generate a census-scale table (millions of rows) for the streaming demonstration.

Rows are the bundled Adult training rows drawn with replacement, plus ``--extra``
continuous "measurement" columns ``m01..mK``: noisy linear functions of age, education
and hours (so the table has structure to learn), written with full float precision, as
wide survey or sensor tables are. The file is written in chunks (bounded memory), and a
matching public schema is written beside it (the extra columns get public bounds
[-10, 10]; nothing is read off the generated rows).

    python scripts/make_big_table.py --rows 10000000 --extra 24 --out /data/big.csv
    dpnf train --data /data/big.csv --stream --schema /data/big.schema.json --out runs/big ...
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from dpnf_jax.data.datasets import adult_schema, load_adult
from dpnf_jax.data.schema import ContinuousColumn, Schema


def big_schema(extra: int) -> Schema:
    return Schema([*adult_schema().columns, *(ContinuousColumn(f"m{i:02d}", -10.0, 10.0) for i in range(1, extra + 1))])


def chunks(rows: int, extra: int, chunk: int, seed: int):
    base, _ = load_adult()
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(3, extra))
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        frame = base.iloc[rng.integers(0, len(base), n)].reset_index(drop=True)
        z = np.stack([(frame["age"] - 38.6) / 13.6, (frame["education-num"] - 10.1) / 2.6,
                      (frame["hours-per-week"] - 40.4) / 12.3], axis=1).astype(np.float64)
        measurements = np.clip(z @ weights + rng.normal(size=(n, extra)), -10, 10)
        for i in range(extra):
            frame[f"m{i + 1:02d}"] = measurements[:, i]
        yield frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--extra", type=int, default=24, help="extra continuous columns")
    parser.add_argument("--out", required=True, help=".csv or .parquet")
    parser.add_argument("--chunk", type=int, default=250_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        for frame in chunks(args.rows, args.extra, args.chunk, args.seed):
            batch = pa.Table.from_pandas(frame, preserve_index=False)
            writer = writer or pq.ParquetWriter(tmp, batch.schema)
            writer.write_table(batch, row_group_size=args.chunk)
        writer.close()
    else:
        with open(tmp, "w", newline="") as handle:
            for i, frame in enumerate(chunks(args.rows, args.extra, args.chunk, args.seed)):
                frame.to_csv(handle, index=False, header=i == 0, float_format="%.17g")
    os.replace(tmp, out)
    big_schema(args.extra).to_json(out.with_name(out.name.split(".")[0] + ".schema.json"))
    print(f"wrote {out}: {args.rows} rows, {out.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
