"""Streaming rows from CSV / Parquet: chunked reading, one-pass gathering, exact Poisson
inclusion, and training that matches the in-memory path."""

import json
import math
import warnings

import jax
import numpy as np
import pandas as pd
import pytest

from dpnf_jax import DPFlowSynthesizer, datasets
from dpnf_jax.data.encode import TabularEncoder
from dpnf_jax.data.schema import CategoricalColumn, ContinuousColumn, Schema
from dpnf_jax.data.stream import ArrayRows, StreamRows, TableFile, scan
from dpnf_jax.flows.model import FlowConfig
from dpnf_jax.train import dp_fit

pytest.importorskip("pyarrow")

SCHEMA = Schema([
    ContinuousColumn("a", -4.0, 4.0),
    ContinuousColumn("b", -4.0, 4.0),
    CategoricalColumn("c", ("x", "y", "z")),
])


def _frame(n=600, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "a": np.round(rng.normal(size=n), 6),
        "b": np.round(rng.normal(size=n), 6),
        "c": pd.array(rng.choice(["x", "y", "z"], n), dtype="string"),
    })


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    df = _frame()
    df.to_csv(root / "t.csv", index=False)
    df.to_parquet(root / "t.parquet", row_group_size=128)
    df.iloc[:250].to_parquet(root / "part-0.parquet", row_group_size=100)
    df.iloc[250:].to_parquet(root / "part-1.parquet", row_group_size=100)
    return root, df


@pytest.mark.parametrize("name", ["t.csv", "t.parquet", "part-*.parquet"])
def test_frames_cover_any_row_range_in_order(files, name):
    root, df = files
    table = TableFile(root / name, SCHEMA, chunk_rows=97)
    assert table.num_rows == len(df)
    for start, stop in [(0, None), (0, 1), (130, 131), (99, 401), (599, 600), (250, 250)]:
        parts = list(table.frames(start, stop))
        stop = len(df) if stop is None else stop
        assert all(len(frame) <= 97 for _, frame in parts)
        got = pd.concat([f for _, f in parts], ignore_index=True) if parts else df.iloc[:0]
        assert [first for first, _ in parts] == sorted(first for first, _ in parts)
        if parts:
            assert parts[0][0] == start
        expected = df.iloc[start:stop].reset_index(drop=True)
        pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)
        assert str(got["c"].dtype) == "string"


def test_table_file_errors_name_the_problem(files, tmp_path):
    root, df = files
    with pytest.raises(ValueError, match="not found"):
        TableFile(tmp_path / "nope.csv", SCHEMA)
    with pytest.raises(ValueError, match="no table file matches"):
        TableFile(str(tmp_path / "*.parquet"), SCHEMA)
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown table format"):
        TableFile(tmp_path / "t.json", SCHEMA)
    df.drop(columns="b").to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(ValueError, match=r"missing.csv: column\(s\) \['b'\] of the schema are missing"):
        TableFile(tmp_path / "missing.csv", SCHEMA)
    df.assign(extra=1).to_parquet(tmp_path / "extra.parquet")
    with pytest.raises(ValueError, match=r"\['extra'\] are not in the schema"):
        TableFile(tmp_path / "extra.parquet", SCHEMA)


def test_scan_names_rows_column_and_value(files, tmp_path):
    _, df = files
    bad = df.copy()
    bad["c"] = bad["c"].astype(object)
    bad.loc[333, "c"] = "w"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    table = TableFile(tmp_path / "bad.csv", SCHEMA, chunk_rows=100)
    seen = []
    with pytest.raises(ValueError, match=r"bad.csv, rows 300\.\.399: .*'c'.*'w'") as err:
        for first, _, _ in scan(table):
            seen.append(first)
    assert seen == [0, 100, 200]  # everything before the bad chunk was valid
    assert "w" in str(err.value)


def _deterministic_encoder():
    # Continuous columns are encoded without randomness; only the categorical dequantises.
    return TabularEncoder(Schema(list(SCHEMA.columns[:2])), categorical="onehot")


def test_gather_is_one_pass_and_returns_exactly_the_requested_rows(files):
    root, df = files
    encoder = _deterministic_encoder()
    cont = df[["a", "b"]]
    full = encoder.encode(cont, 0)
    table = TableFile(root / "t.parquet", Schema(list(SCHEMA.columns[:2])), chunk_rows=64, allow_extra_columns=True)
    rows = StreamRows(table, encoder.encode, encoder.dim)
    sets = [np.array([0, 5, 599]), np.array([], np.int64), np.array([5, 6, 7, 300]), np.arange(0, 600, 7)]
    got = rows.gather(sets)
    assert rows.passes == 1 and rows.rows_encoded == len(np.unique(np.concatenate(sets)))
    for indices, block in zip(sets, got):
        np.testing.assert_array_equal(block, full[indices])
    in_memory = ArrayRows(full).gather(sets)
    for a, b in zip(got, in_memory):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="sorted"):
        rows.gather([np.array([3, 2])])
    with pytest.raises(ValueError, match="within rows"):
        rows.gather([np.array([600])])


CONFIG = FlowConfig(dim=2, num_blocks=2, hidden=(8,))
FIT = dict(epsilon=3.0, delta=1e-4, batch_size=30, seed=1, noise_seed=5, verbose=False)


class _Recording(StreamRows):
    """StreamRows that records every index set it is asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requested = []

    def gather(self, index_sets, group=0):
        self.requested.extend(np.asarray(s) for s in index_sets)
        return super().gather(index_sets, group)


def _stream_rows(root, df, cls=StreamRows, name="t.csv"):
    encoder = _deterministic_encoder()
    table = TableFile(root / name, Schema(list(SCHEMA.columns[:2])), chunk_rows=128, allow_extra_columns=True)
    return cls(table, encoder.encode, encoder.dim), encoder.encode(df[["a", "b"]], 0)


def test_streamed_training_equals_in_memory_training(files):
    """Same rows, same seeds: the file-backed run reaches the in-memory run's parameters."""
    root, df = files
    rows, x = _stream_rows(root, df)
    in_memory, report_a = dp_fit(CONFIG, x, epochs=1.5, **FIT)
    streamed, report_b = dp_fit(CONFIG, rows, epochs=1.5, prefetch_rows=90, **FIT)
    assert report_b.steps == report_a.steps and report_b.epsilon == report_a.epsilon
    assert rows.passes == math.ceil(report_b.steps / 3)  # 90 rows per pass at 30 per step
    for a, b in zip(jax.tree.leaves(in_memory), jax.tree.leaves(streamed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_streamed_poisson_inclusion_rate(files):
    """Each row of the file is fetched for a step with probability q, independently of the
    prefetch grouping: per-row counts ~ Binomial(T, q) and batch sizes ~ Binomial(N, q)."""
    root, df = files
    rows, _ = _stream_rows(root, df, _Recording, "t.parquet")
    _, report = dp_fit(CONFIG, rows, epochs=12, prefetch_rows=500, **FIT)
    q, steps, n = report.sampling_rate, report.steps, len(df)
    assert len(rows.requested) == steps == 240
    counts = np.bincount(np.concatenate(rows.requested), minlength=n)
    z = (counts.sum() - n * steps * q) / math.sqrt(n * steps * q * (1 - q))
    assert abs(z) < 4
    assert counts.var(ddof=1) / (steps * q * (1 - q)) == pytest.approx(1.0, abs=0.2)
    sizes = np.array([len(s) for s in rows.requested])
    assert sizes.var(ddof=1) / (n * q * (1 - q)) == pytest.approx(1.0, abs=0.3)
    assert rows.passes == math.ceil(steps / (500 // 30))


def test_streamed_run_resumes_to_the_uninterrupted_result(files, tmp_path):
    root, df = files
    reference, reference_report = dp_fit(CONFIG, _stream_rows(root, df)[0], epochs=2, prefetch_rows=120, **FIT)

    def crash(step, params, nll):
        if step == 9:  # mid-way through the third prefetch group of four steps
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dp_fit(CONFIG, _stream_rows(root, df)[0], epochs=2, prefetch_rows=120, **FIT, checkpoint_dir=tmp_path / "ck",
               checkpoint_every=3, callback=crash)
    assert json.loads((tmp_path / "ck" / "checkpoint.json").read_text())["step"] == 9
    resumed, report = dp_fit(CONFIG, _stream_rows(root, df)[0], epochs=2, prefetch_rows=120, **FIT,
                             checkpoint_dir=tmp_path / "ck", checkpoint_every=3, resume=True)
    assert report.epsilon == reference_report.epsilon
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_stream_matches_fit_on_the_adult_table(tmp_path):
    """fit_stream releases the very histograms fit releases (same noise seed), spends the
    same epsilon, and its model samples valid rows; a non-private stream is refused."""
    train, _ = datasets.load_adult()
    train = train.iloc[:3000]
    train.to_parquet(tmp_path / "adult.parquet", row_group_size=700)
    kwargs = dict(epsilon=2.0, epochs=1, batch_size=200, hidden=(16,), num_blocks=2, noise_seed=3, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = DPFlowSynthesizer(datasets.adult_schema(), **kwargs).fit(train)
        streamed = DPFlowSynthesizer(datasets.adult_schema(), **kwargs).fit_stream(tmp_path / "adult.parquet",
                                                                                   chunk_rows=512)
    for a, b in zip(memory.encoder.noisy_counts, streamed.encoder.noisy_counts):
        np.testing.assert_array_equal(a, b)
    assert streamed.report.epsilon == memory.report.epsilon <= 2.0
    assert [e["label"] for e in streamed.report.events] == ["marginal histograms", "dp-sgd"]
    assert streamed.num_rows == 3000
    sample = streamed.sample(200, seed=0)
    datasets.adult_schema().validate_frame(sample)
    with pytest.raises(ValueError, match="DP-SGD"):
        DPFlowSynthesizer(datasets.adult_schema(), epsilon=None).fit_stream(tmp_path / "adult.parquet")


def test_array_rows_checks_its_input():
    with pytest.raises(ValueError, match="non-finite"):
        ArrayRows(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="shape"):
        ArrayRows(np.zeros(3))
    with pytest.raises(ValueError, match="do not fit"):
        ArrayRows(np.zeros((5, 2)), num_rows=8, row_offset=4)
    shard = ArrayRows(np.arange(6.0).reshape(3, 2), num_rows=10, row_offset=4)
    assert shard.row_range == (4, 7)
    np.testing.assert_array_equal(shard.gather([np.array([4, 6])])[0], [[0, 1], [4, 5]])
    with pytest.raises(ValueError, match=r"holds rows \(4, 7\) of 10"):
        dp_fit(CONFIG, shard, epochs=1, **{**FIT, "batch_size": 2})


@pytest.mark.parametrize("text, rows", [
    ("a,c\n1,x\n2,y\n", 2),                 # trailing newline
    ("a,c\n1,x\n2,y", 2),                   # none
    ('a,c\n1,"x"\n2,"y"\n3,x\n', 3),        # quoted fields: counted by the parser
    ("a,c\n", 0),
])
def test_csv_row_count(tmp_path, text, rows):
    (tmp_path / "t.csv").write_text(text)
    schema = Schema([ContinuousColumn("a", 0.0, 5.0), CategoricalColumn("c", ("x", "y"))])
    assert TableFile(tmp_path / "t.csv", schema).num_rows == rows


def test_blank_lines_are_rows_and_stop_the_validating_pass(tmp_path):
    """A blank line is counted as a row by the counter and by every reader alike (so an
    index names the same row whatever the first wanted row), and validation refuses it."""
    schema = Schema([ContinuousColumn("a", 0.0, 5.0), CategoricalColumn("c", ("x", "y"))])
    (tmp_path / "b.csv").write_text("a,c\n0,x\n\n1,y\n2,x\n3,y\n")
    table = TableFile(tmp_path / "b.csv", schema, chunk_rows=2)
    assert table.num_rows == 5
    for start in range(2, 5):
        (first, frame), *_ = table.frames(start)
        assert first == start and frame["a"].iloc[0] == start - 1
    with pytest.raises(ValueError, match="row 1 is a blank line"):
        list(scan(table))


def test_compressed_csv_and_pandas_index_column(tmp_path):
    df = _frame(50)
    df.to_csv(tmp_path / "t.csv.gz", index=False)
    table = TableFile(tmp_path / "t.csv.gz", SCHEMA, chunk_rows=16)
    assert table.num_rows == 50
    pd.testing.assert_frame_equal(pd.concat([f for _, f in table.frames()], ignore_index=True), df, check_dtype=False)
    df.set_index(pd.Index(range(100, 150))).to_parquet(tmp_path / "indexed.parquet")  # stores __index_level_0__
    assert TableFile(tmp_path / "indexed.parquet", SCHEMA).num_rows == 50


def test_resume_refuses_a_streamed_file_changed_in_place(tmp_path):
    """Same path, size and modification time, other contents: the content hash of the
    validating pass tells them apart, so no noise is reused on other data."""
    import os

    df = _frame(300)
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    kwargs = dict(epsilon=2.0, encoding="ordinal", epochs=1, batch_size=60, hidden=(8,), num_blocks=2, noise_seed=1,
                  verbose=False)
    DPFlowSynthesizer(SCHEMA, **kwargs).fit_stream(path, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    stat = path.stat()
    text = path.read_text()
    changed = text.replace(",x\n", ",y\n", 1)
    assert changed != text and len(changed) == len(text)
    path.write_text(changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(ValueError, match="fingerprint"):
        DPFlowSynthesizer(SCHEMA, **kwargs).fit_stream(path, checkpoint_dir=tmp_path / "ck", resume=True)
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    DPFlowSynthesizer(SCHEMA, **kwargs).fit_stream(path, checkpoint_dir=tmp_path / "ck", resume=True)  # same rows: fine
