"""Rows for DP-SGD: in memory, or streamed from CSV / Parquet files larger than memory.

:func:`dpnf_jax.train.dp_fit` reads its rows through a *row source*: an object with

* ``num_rows``: N, the rows of the WHOLE table (over all hosts; treated as public);
* ``dim``: the encoded width d;
* ``row_range``: ``(lo, hi)``, the global rows this process holds (all of them on one host);
* ``fingerprint()``: a string that changes when the rows change (checkpoints refuse to
  resume on other data);
* ``gather(index_sets, group)``: for a list of sorted arrays of global row indices (each
  within ``row_range``), the encoded rows ``[len(set), d]`` float32 of every set.

:class:`ArrayRows` wraps an encoded array. :class:`StreamRows` wraps a :class:`TableFile`
and an encoder: one ``gather`` is ONE sequential pass over the file that keeps only the
rows some set asks for and encodes just those. ``dp_fit`` draws the Poisson batches of
many future steps at once (each row of each step independently with probability q, see
:class:`dpnf_jax.privacy.sampling.PoissonSampler`) and fetches all their rows in one
pass, so memory is bounded by the read chunk plus the prefetched batches, never by N.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dpnf_jax.data.schema import CategoricalColumn, OrdinalColumn, Schema

FORMATS = ("csv", "parquet")


def text_dtypes(schema: Schema) -> dict[str, str]:
    """Columns to read as text (categorical levels and text-valued ordinals)."""
    return {
        c.name: "string"
        for c in schema
        if isinstance(c, CategoricalColumn) or (isinstance(c, OrdinalColumn) and isinstance(c.categories[0], str))
    }


def _file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".parquet", ".pq"):
        return "parquet"
    if ".csv" in suffixes:
        return "csv"
    raise ValueError(f"{path}: unknown table format (expected .csv, .csv.gz or .parquet)")


class TableFile:
    """A table in one or more CSV or Parquet files, read in chunks of rows, never whole.

    Rows are numbered globally in file order (files in the order given; a glob is sorted).
    Parquet needs ``pip install pyarrow`` (the ``parquet`` extra); it is the format to use
    for very large tables and for several hosts, since a host reads only the row groups
    of its own shard, while a CSV reader has to scan the lines before its shard.

    Args:
      paths: a path, a glob pattern, or a list of paths.
      schema: the public schema; the files must hold exactly its columns.
      chunk_rows: rows per read chunk (memory versus overhead).
      allow_extra_columns: read only the schema's columns and ignore any others
        (default: refuse them, which catches a mistyped schema).

    Raises:
      ValueError: no file matches, mixed or unknown formats, a column of the schema is
        missing or a column is not in the schema (naming the file and columns).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        schema: Schema,
        *,
        chunk_rows: int = 65536,
        allow_extra_columns: bool = False,
    ):
        if isinstance(paths, (str, os.PathLike)):
            text = os.fspath(paths)
            matched = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
            paths = matched
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no table file matches the given path or pattern")
        for path in self.paths:
            if not path.is_file():
                raise ValueError(f"table file not found: {path}")
        formats = {_file_format(p) for p in self.paths}
        if len(formats) != 1:
            raise ValueError(f"all table files must have one format, got {sorted(formats)}")
        (self.format,) = formats
        if not (isinstance(chunk_rows, (int, np.integer)) and chunk_rows >= 1):
            raise ValueError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
        self.schema = schema
        self.chunk_rows = int(chunk_rows)
        self.allow_extra_columns = bool(allow_extra_columns)
        self._rows_per_file: list[int] | None = None
        for path in self.paths:
            self._check_columns(path)

    # ------------------------------------------------------------------ structure

    def _columns(self, path: Path) -> list[str]:
        if self.format == "parquet":
            return list(_pyarrow_parquet().ParquetFile(path).schema_arrow.names)
        try:
            return list(pd.read_csv(path, nrows=0, skipinitialspace=True).columns)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot parse CSV ({err})") from err

    def _check_columns(self, path: Path) -> None:
        columns = self._columns(path)
        missing = [n for n in self.schema.names if n not in columns]
        # pandas' stored index ("__index_level_0__") is bookkeeping, not a column of the table.
        extra = [n for n in columns if n not in self.schema.names and not n.startswith("__index_level_")]
        if missing:
            raise ValueError(f"{path}: column(s) {missing} of the schema are missing")
        if extra and not self.allow_extra_columns:
            raise ValueError(f"{path}: column(s) {extra} are not in the schema")

    @property
    def rows_per_file(self) -> list[int]:
        """Rows in each file (Parquet: from the footer; CSV: counted in one pass)."""
        if self._rows_per_file is None:
            if self.format == "parquet":
                pq = _pyarrow_parquet()
                self._rows_per_file = [pq.ParquetFile(p).metadata.num_rows for p in self.paths]
            else:
                self._rows_per_file = [self._count_csv_rows(p) for p in self.paths]
        return self._rows_per_file

    def _count_csv_rows(self, path: Path) -> int:
        """Data rows of a CSV: a byte scan for newlines when nothing is quoted (so no field
        can hold a line break), else a chunked pandas pass over one column."""
        if path.suffix.lower() == ".csv":  # compressed files are counted by the parser
            lines, last, quoted = 0, b"\n", False
            with open(path, "rb") as handle:
                while block := handle.read(1 << 24):
                    if b'"' in block:
                        quoted = True
                        break
                    lines += block.count(b"\n")
                    last = block[-1:]
            if not quoted:
                lines += last != b"\n"  # a last line without a newline
                return max(lines - 1, 0)  # minus the header
        first = self.schema.names[0]
        chunks = pd.read_csv(path, usecols=[first], dtype="string", chunksize=self.chunk_rows, skipinitialspace=True,
                             skip_blank_lines=False)
        return sum(len(c) for c in chunks)

    @property
    def num_rows(self) -> int:
        return int(sum(self.rows_per_file))

    def fingerprint(self) -> str:
        """Paths, sizes and modification times (cheap; a changed file changes it)."""
        digest = hashlib.sha256()
        for path in self.paths:
            stat = path.stat()
            digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns};".encode())
        return digest.hexdigest()

    # -------------------------------------------------------------------- reading

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
        """``(first global row, frame)`` chunks covering rows ``[start, stop)`` in order.

        Frames hold the schema's columns in schema order, text columns as strings.
        """
        stop = self.num_rows if stop is None else int(stop)
        offset = 0
        for path, count in zip(self.paths, self.rows_per_file):
            lo, hi = max(start - offset, 0), min(stop - offset, count)
            if lo < hi:
                reader = self._parquet_frames if self.format == "parquet" else self._csv_frames
                for first, frame in reader(path, lo, hi):
                    yield offset + first, frame
            offset += count
            if offset >= stop:
                return

    def _csv_frames(self, path: Path, lo: int, hi: int) -> Iterator[tuple[int, pd.DataFrame]]:
        # Rows are numbered by this reader itself from the top of the file (blank lines are
        # rows, as the row count has them), never by skipping physical lines: an index
        # must name the same row on every pass, whatever the first wanted row.
        names = list(self.schema.names)
        reader = pd.read_csv(
            path, dtype=text_dtypes(self.schema), skipinitialspace=True, chunksize=self.chunk_rows, usecols=names,
            skip_blank_lines=False,
        )
        first = 0
        try:
            for frame in reader:
                if first >= hi:
                    break
                start, stop = max(lo - first, 0), min(hi - first, len(frame))
                if start < stop:
                    part = frame.iloc[start:stop]
                    blank = part.isna().all(axis=1).to_numpy()
                    if blank.any():
                        raise ValueError(f"{path}: row {first + start + int(np.argmax(blank))} is a blank line (or every "
                                         "field of the schema's columns is empty); a streamed CSV has no empty rows: "
                                         "remove the line")
                    yield first + start, part[names].reset_index(drop=True)
                first += len(frame)
            if first < hi:
                raise ValueError(f"{path}: the file ended after {first} rows, {hi} were counted: was it changed?")
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot parse CSV near row {first} ({err})") from err
        finally:
            reader.close()

    def _parquet_frames(self, path: Path, lo: int, hi: int) -> Iterator[tuple[int, pd.DataFrame]]:
        pq = _pyarrow_parquet()
        names = list(self.schema.names)
        text = set(text_dtypes(self.schema))
        parquet = pq.ParquetFile(path)
        group_start = 0
        for group in range(parquet.num_row_groups):
            group_rows = parquet.metadata.row_group(group).num_rows
            group_stop = group_start + group_rows
            if group_stop > lo and group_start < hi:  # row groups outside the shard are never read
                first = group_start
                for batch in parquet.iter_batches(batch_size=self.chunk_rows, row_groups=[group], columns=names):
                    a, b = max(lo - first, 0), min(hi - first, batch.num_rows)
                    if a < b:
                        frame = batch.slice(a, b - a).to_pandas()
                        for name in text:
                            frame[name] = frame[name].astype("string")
                        yield first + a, frame[names]
                    first += batch.num_rows
            group_start = group_stop
            if group_start >= hi:
                return


def scan(
    table: TableFile, start: int = 0, stop: int | None = None, *, strict: bool = False
) -> Iterator[tuple[int, pd.DataFrame, dict[str, np.ndarray]]]:
    """:meth:`TableFile.frames`, each checked against the schema first.

    Yields ``(first global row, frame, parsed)`` with ``parsed`` the frame's
    ``Schema.parse_frame`` (so counting and clipping need not parse it again).

    Raises:
      ValueError: as ``Schema.parse_frame`` does (naming the column and the value),
        prefixed with the rows and file of the offending chunk.
    """
    for first, frame in table.frames(start, stop):
        try:
            parsed = table.schema.parse_frame(frame, strict=strict)
        except ValueError as err:
            raise ValueError(f"{_describe(table)}, rows {first}..{first + len(frame) - 1}: {err}") from err
        yield first, frame, parsed


def _describe(table: TableFile) -> str:
    return str(table.paths[0]) if len(table.paths) == 1 else f"{table.paths[0]} (+{len(table.paths) - 1} files)"


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading Parquet needs pyarrow: pip install 'dpnf-jax[parquet]'") from err
    return pq


def _check_index_sets(index_sets: Sequence[np.ndarray], row_range: tuple[int, int]) -> list[np.ndarray]:
    lo, hi = row_range
    out = []
    for indices in index_sets:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices[0] < lo or indices[-1] >= hi or np.any(np.diff(indices) <= 0))):
            raise ValueError(f"index sets must be sorted, unique, 1-D and within rows [{lo}, {hi})")
        out.append(indices)
    return out


class ArrayRows:
    """Encoded rows held in memory: all N of them, or one host's shard.

    Args:
      x: [n, d] encoded rows (float32 or float64, finite).
      num_rows: N of the whole table (default n: this process holds every row).
      row_offset: global index of ``x[0]`` (a host's shard starts at its offset).
    """

    def __init__(self, x: np.ndarray, *, num_rows: int | None = None, row_offset: int = 0, dtype=np.float32):
        x = np.asarray(x, dtype=dtype)
        if x.ndim != 2:
            raise ValueError(f"x must have shape [N, d], got {tuple(x.shape)}")
        if not np.isfinite(x).all():
            row, col = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"x contains non-finite values (first at row {row}, dimension {col}: {x[row, col]!r})")
        self.x = x
        self.num_rows = int(len(x) if num_rows is None else num_rows)
        self.dim = int(x.shape[1])
        self.row_range = (int(row_offset), int(row_offset) + len(x))
        if not 0 <= self.row_range[0] <= self.row_range[1] <= self.num_rows:
            raise ValueError(f"rows [{self.row_range[0]}, {self.row_range[1]}) do not fit in num_rows={self.num_rows}")

    def fingerprint(self) -> str:
        from dpnf_jax.checkpoint import data_fingerprint

        return data_fingerprint(self.x) + ("" if self.row_range == (0, self.num_rows) else f"@{self.row_range}")

    def gather(self, index_sets: Sequence[np.ndarray], group: int = 0) -> list[np.ndarray]:
        del group  # in-memory rows are encoded once and for all
        sets = _check_index_sets(index_sets, self.row_range)
        return [self.x[indices - self.row_range[0]] for indices in sets]


class StreamRows:
    """Rows of a :class:`TableFile`, encoded on the fly each time they are fetched.

    Args:
      table: the file(s).
      encode: ``encode(frame, rng) -> [len(frame), d] float32`` (e.g. a fitted encoder's
        ``encode``); ``rng`` carries its public dequantisation randomness.
      dim: the encoded width d.
      seed: public seed of that randomness. Rows fetched in one pass are encoded with a
        stream keyed by (seed, group, first row of the chunk), so a pass is reproducible
        (and a resumed run redoes the same encoding).
      row_range: the global rows this process reads (default all; a host of several
        reads its shard, see :func:`dpnf_jax.privacy.sampling.shard_bounds`).
      content_digest: a hash of the rows' contents (``fit_stream`` computes one in its
        validating pass); without it the fingerprint that guards a resume sees only the
        files' paths, sizes and modification times.
    """

    def __init__(
        self,
        table: TableFile,
        encode: Callable[[pd.DataFrame, np.random.Generator], np.ndarray],
        dim: int,
        *,
        seed: int = 0,
        row_range: tuple[int, int] | None = None,
        content_digest: str | None = None,
    ):
        self.table = table
        self.content_digest = content_digest
        self.encode = encode
        self.dim = int(dim)
        self.seed = int(seed)
        self.num_rows = table.num_rows
        self.row_range = (0, self.num_rows) if row_range is None else (int(row_range[0]), int(row_range[1]))
        if not 0 <= self.row_range[0] <= self.row_range[1] <= self.num_rows:
            raise ValueError(f"row_range {self.row_range} does not fit in the table's {self.num_rows} rows")
        self.passes = 0  # full passes over the shard so far (for benchmarks and tests)
        self.rows_encoded = 0

    def fingerprint(self) -> str:
        # The chunking keys the encoding randomness, so it is part of what a resume must match.
        content = f"#{self.content_digest}" if self.content_digest else ""
        return f"{self.table.fingerprint()}@{self.row_range}/chunk_rows={self.table.chunk_rows}{content}"

    def gather(self, index_sets: Sequence[np.ndarray], group: int = 0) -> list[np.ndarray]:
        """One pass over the shard; only the requested rows are encoded and kept."""
        sets = _check_index_sets(index_sets, self.row_range)
        wanted = np.unique(np.concatenate(sets)) if sets else np.zeros(0, np.int64)
        encoded = np.empty((len(wanted), self.dim), np.float32)
        if len(wanted):
            filled = 0
            start, stop = int(wanted[0]), int(wanted[-1]) + 1
            for first, frame in self.table.frames(start, stop):
                a = np.searchsorted(wanted, first)
                b = np.searchsorted(wanted, first + len(frame))
                if a == b:
                    continue
                rng = np.random.default_rng([self.seed, 4, int(group), int(first)])
                rows = frame.iloc[wanted[a:b] - first]
                try:
                    block = np.asarray(self.encode(rows, rng), np.float32)
                except ValueError as err:
                    raise ValueError(f"{_describe(self.table)}, rows {first}..{first + len(frame) - 1}: {err}") from err
                if not np.isfinite(block).all():
                    raise ValueError(f"the encoder returned non-finite values for rows near {first}")
                encoded[a:b] = block
                filled += b - a
            if filled != len(wanted):
                raise ValueError(f"the table ended after {filled} of the {len(wanted)} requested rows: was it changed?")
        self.passes += 1
        self.rows_encoded += len(wanted)
        return [encoded[np.searchsorted(wanted, indices)] for indices in sets]


def prefetch_steps(expected_rows_per_step: float, prefetch_rows: int, steps: int) -> int:
    """How many steps' batches to fetch per pass: about ``prefetch_rows`` rows in all."""
    return int(max(1, min(steps, math.floor(prefetch_rows / max(expected_rows_per_step, 1.0)))))
