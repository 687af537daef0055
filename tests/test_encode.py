"""Tests for dpnf_jax.data.encode: layout, round trips, robustness of decode, bins."""

import warnings

import numpy as np
import pandas as pd
import pytest

from dpnf_jax.data.datasets import adult_schema, load_adult
from dpnf_jax.data.encode import (
    ClippingWarning,
    TabularEncoder,
    column_bins,
    discretize,
    n_codes,
)
from dpnf_jax.data.schema import CategoricalColumn, ContinuousColumn, OrdinalColumn, Schema

MODES = ("onehot", "ordinal")


@pytest.fixture(scope="module")
def small_schema() -> Schema:
    return Schema(
        (
            ContinuousColumn("age", 17, 100, integer=True),
            ContinuousColumn("gain", 0, 1000, integer=True, point_masses=(0, 1000), nullable=True),
            ContinuousColumn("score", -1.5, 2.5, point_masses=(0.0,)),
            ContinuousColumn("weight", 0.0, 10.0, nullable=True),
            CategoricalColumn("colour", ("red", "green", "blue"), nullable=True),
            CategoricalColumn("sex", ("F", "M")),
            OrdinalColumn("level", (1, 2, 3)),
            OrdinalColumn("size", ("S", "M", "L"), nullable=True),
        )
    )


def _small_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    gain = rng.choice([0.0, 1000.0, 5.0, 999.0, 420.0, np.nan], size=n)
    score = np.where(rng.uniform(size=n) < 0.3, 0.0, rng.uniform(-1.5, 2.5, size=n))
    weight = np.where(rng.uniform(size=n) < 0.2, np.nan, rng.uniform(0.0, 10.0, size=n))
    colour = rng.choice(np.array(["red", "green", "blue", None], dtype=object), size=n)
    size = rng.choice(np.array(["S", "M", "L", None], dtype=object), size=n)
    return pd.DataFrame(
        {
            "age": rng.integers(17, 101, size=n),
            "gain": gain,
            "score": score,
            "weight": weight,
            "colour": pd.array(colour, dtype="string"),
            "sex": pd.array(rng.choice(["F", "M"], size=n), dtype="string"),
            "level": rng.integers(1, 4, size=n),
            "size": pd.array(size, dtype="string"),
        }
    )


@pytest.fixture(scope="module")
def adult() -> pd.DataFrame:
    train, test = load_adult()
    return pd.concat([train, test], ignore_index=True)


def _assert_frames_equal(decoded: pd.DataFrame, original: pd.DataFrame, schema: Schema, atol: float) -> None:
    assert list(decoded.columns) == list(schema.names)
    for column in schema:
        got, want = decoded[column.name], original[column.name].reset_index(drop=True)
        np.testing.assert_array_equal(got.isna().to_numpy(), want.isna().to_numpy(), err_msg=column.name)
        present = want.notna().to_numpy()
        if isinstance(column, ContinuousColumn) and not column.integer:
            clipped = np.clip(want.to_numpy(dtype=float)[present], column.lower, column.upper)
            np.testing.assert_allclose(got.to_numpy()[present], clipped, atol=atol, rtol=0, err_msg=column.name)
        else:
            np.testing.assert_array_equal(
                got.to_numpy(dtype=object)[present], want.to_numpy(dtype=object)[present], err_msg=column.name
            )


def _assert_valid_table(decoded: pd.DataFrame, schema: Schema) -> None:
    """Every value is inside the schema (strict validation) and dtypes are as documented."""
    schema.validate_frame(decoded, strict=True)
    for column in schema:
        dtype = decoded[column.name].dtype
        if isinstance(column, ContinuousColumn):
            expected = ("Int64" if column.nullable else "int64") if column.integer else "float64"
        elif isinstance(column.categories[0], str):
            expected = "string"
        else:
            expected = "Int64" if column.nullable else "int64"
        assert dtype == expected, (column.name, dtype)


def test_segments_tile_the_output(small_schema):
    for mode in MODES:
        encoder = TabularEncoder(small_schema, categorical=mode)
        stops = [s.start for s in encoder.segments[1:]] + [encoder.dim]
        assert [s.stop for s in encoder.segments] == stops
        assert encoder.segments[0].start == 0
        assert {s.name for s in encoder.segments} == set(small_schema.names)
        for s in encoder.segments:
            assert s.width == (s.levels if s.encoding == "onehot" else 1)
    kinds = [(s.kind, s.levels) for s in TabularEncoder(small_schema).column_segments("gain")]
    assert kinds == [("missing", 2), ("atom", 3), ("continuous", 0)]


def test_dims(small_schema):
    # age 1, gain 1+3+1, score 2+1, weight 1+1, colour 4, sex 2, level 1, size 1.
    assert TabularEncoder(small_schema, "onehot").dim == 19
    # age 1, gain 3, score 2, weight 2, colour 1, sex 1, level 1, size 1.
    assert TabularEncoder(small_schema, "ordinal").dim == 12
    # education is ordinal (one dim): 116 - 16 + 1.
    assert TabularEncoder(adult_schema(), "onehot").dim == 101
    assert TabularEncoder(adult_schema(), "ordinal").dim == 18


@pytest.mark.parametrize("mode", MODES)
def test_small_round_trip(small_schema, mode):
    frame = _small_frame(2000)
    encoder = TabularEncoder(small_schema, categorical=mode)
    x = encoder.encode(frame, rng=1)
    assert x.shape == (2000, encoder.dim) and x.dtype == np.float32
    decoded = encoder.decode(x)
    _assert_frames_equal(decoded, frame, small_schema, atol=1e-4)
    _assert_valid_table(decoded, small_schema)


@pytest.mark.parametrize("mode", MODES)
def test_adult_round_trip(adult, mode):
    schema = adult_schema()
    encoder = TabularEncoder(schema, categorical=mode)
    x = encoder.encode(adult, rng=0)
    assert encoder.last_clip_counts == dict.fromkeys(
        ["age", "fnlwgt", "capital-gain", "capital-loss", "hours-per-week"], 0
    )
    decoded = encoder.decode(x)
    _assert_frames_equal(decoded, adult, schema, atol=1e-4)
    for name in ("workclass", "occupation", "native-country"):
        assert decoded[name].isna().sum() == adult[name].isna().sum() > 0
    assert (decoded.dtypes == adult.dtypes).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [1.0, 3.0, 1e6])
def test_decode_of_arbitrary_matrices_is_valid(small_schema, mode, scale):
    rng = np.random.default_rng(3)
    for schema in (small_schema, adult_schema()):
        encoder = TabularEncoder(schema, categorical=mode)
        x = rng.normal(scale=scale, size=(500, encoder.dim))
        x[:5] = scale
        x[5:10] = -scale
        _assert_valid_table(encoder.decode(x), schema)


def test_decode_hits_bounds_and_atoms_for_extreme_inputs(small_schema):
    encoder = TabularEncoder(small_schema, "ordinal")
    decoded = encoder.decode(np.full((1, encoder.dim), 1e6))
    # Ordinal-coded components clamp to their last level: "missing" for nullable columns.
    assert decoded["age"].item() == 100
    assert decoded["score"].item() == 2.5
    assert decoded["level"].item() == 3
    assert pd.isna(decoded["gain"].item()) and pd.isna(decoded["size"].item())
    decoded = encoder.decode(np.full((1, encoder.dim), -1e6))
    assert decoded["age"].item() == 17 and decoded["gain"].item() == 0 and decoded["score"].item() == 0.0


def test_decode_rejects_bad_input(small_schema):
    encoder = TabularEncoder(small_schema)
    with pytest.raises(ValueError, match=r"shape \[n, 19\], got \(4, 18\)"):
        encoder.decode(np.zeros((4, 18)))
    with pytest.raises(ValueError, match=r"shape \[n, 19\], got \(19,\)"):
        encoder.decode(np.zeros(19))
    x = np.zeros((4, 19))
    x[2, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite value nan at row 2, dim 0 .column 'age'"):
        encoder.decode(x)
    x[2, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite value inf"):
        encoder.decode(x)


def test_onehot_and_interval_ranges(small_schema):
    encoder = TabularEncoder(small_schema, "onehot", interval=3.0)
    frame = _small_frame(3000)
    x = encoder.encode(frame, rng=0)
    colour = encoder.column_segments("colour")[0]
    block = x[:, colour.start : colour.stop]
    codes = small_schema.parse_frame(frame)["colour"]
    is_hot = np.eye(4, dtype=bool)[np.where(codes < 0, 3, codes)]
    assert ((block[is_hot] >= 0) & (block[is_hot] <= 1)).all()
    assert ((block[~is_hot] >= -1) & (block[~is_hot] < 0)).all()
    for segment in encoder.segments:
        if segment.encoding != "onehot":
            values = x[:, segment.start]
            assert (np.abs(values) <= 3.0).all(), segment
    age = x[:, encoder.column_segments("age")[0].start]
    assert age.min() < -2.9 and age.max() > 2.9


def test_value_part_is_noise_at_atoms_and_when_missing(small_schema):
    encoder = TabularEncoder(small_schema, "onehot")
    n = 4000
    frame = _small_frame(n).assign(gain=np.where(np.arange(n) % 2 == 0, 0.0, np.nan))
    x = encoder.encode(frame, rng=0)
    value = x[:, encoder.column_segments("gain")[-1].start]
    # Uniform over [-2, 2]: no spike at the atom's own position (-2).
    assert np.abs(value.mean()) < 0.1 and abs(value.std() - 4 / np.sqrt(12)) < 0.05
    decoded = encoder.decode(x)["gain"]
    assert (decoded[::2] == 0).all() and decoded[1::2].isna().all()


def test_rng_reproducibility(small_schema):
    encoder = TabularEncoder(small_schema)
    frame = _small_frame(100)
    np.testing.assert_array_equal(encoder.encode(frame, rng=5), encoder.encode(frame, rng=5))
    np.testing.assert_array_equal(
        encoder.encode(frame, rng=np.random.default_rng(5)), encoder.encode(frame, rng=5)
    )
    assert not np.array_equal(encoder.encode(frame, rng=5), encoder.encode(frame, rng=6))


def test_strict_out_of_bounds_raises(small_schema):
    frame = _small_frame(10).assign(score=[0.0] * 9 + [7.5])
    with pytest.raises(ValueError, match=r"column 'score': value 7.5 outside the public bounds \[-1.5, 2.5\]"):
        TabularEncoder(small_schema).encode(frame, strict=True)


def test_default_clips_counts_and_warns(small_schema):
    frame = _small_frame(10).assign(score=[0.0] * 7 + [7.5, -9.0, 2.5], age=[5] + [30] * 9)
    encoder = TabularEncoder(small_schema)
    with pytest.warns(ClippingWarning, match="clipped 3 value.* age=1, score=2"):
        x = encoder.encode(frame, rng=0)
    assert encoder.last_clip_counts["score"] == 2
    assert encoder.last_clip_counts["age"] == 1
    assert encoder.last_clip_counts["gain"] == 0
    decoded = encoder.decode(x)
    assert decoded["score"].tolist()[7:] == pytest.approx([2.5, -1.5, 2.5], abs=1e-5)
    assert decoded["age"][0] == 17
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(_small_frame(10), rng=0)
    assert sum(encoder.last_clip_counts.values()) == 0


def test_encode_propagates_validation_errors(small_schema):
    frame = _small_frame(10)
    frame.loc[3, "sex"] = "X"
    with pytest.raises(ValueError, match="column 'sex': unknown category 'X'"):
        TabularEncoder(small_schema).encode(frame)


def test_no_statistic_from_the_rows(small_schema):
    encoder = TabularEncoder(small_schema)
    before_schema = small_schema.to_dict()
    before_settings = encoder.to_dict()
    probe = _small_frame(50, seed=9)
    before = encoder.encode(probe, rng=11)
    at_bound = _small_frame(1000, seed=1).assign(age=100, gain=1000.0, score=2.5, weight=10.0, level=3)
    encoder.encode(at_bound, rng=0)
    encoder.encode(_small_frame(1000, seed=2).assign(age=17, score=-1.5), rng=0)
    assert small_schema.to_dict() == before_schema
    assert encoder.to_dict() == before_settings
    np.testing.assert_array_equal(encoder.encode(probe, rng=11), before)
    # A fresh encoder built from the same public settings maps identically.
    np.testing.assert_array_equal(TabularEncoder(small_schema).encode(probe, rng=11), before)


def test_settings_round_trip(small_schema):
    encoder = TabularEncoder(small_schema, "ordinal", interval=4.0)
    restored = TabularEncoder.from_dict(encoder.to_dict())
    assert restored.schema == small_schema and restored.categorical == "ordinal" and restored.interval == 4.0
    frame = _small_frame(30)
    np.testing.assert_array_equal(restored.encode(frame, rng=2), encoder.encode(frame, rng=2))
    with pytest.raises(ValueError, match="missing field 'interval'"):
        TabularEncoder.from_dict({"schema": small_schema.to_dict(), "categorical": "onehot"})


def test_constructor_validation(small_schema):
    with pytest.raises(ValueError, match="categorical must be one of"):
        TabularEncoder(small_schema, categorical="binary")
    with pytest.raises(ValueError, match="interval must be a finite positive number"):
        TabularEncoder(small_schema, interval=0.0)
    with pytest.raises(TypeError, match="schema must be a Schema"):
        TabularEncoder(small_schema.to_dict())


def test_column_bins_from_schema_only():
    column = ContinuousColumn("x", 0.0, 10.0)
    np.testing.assert_allclose(column_bins(column, 5), [0, 2, 4, 6, 8, 10])
    small_integer = ContinuousColumn("k", 1, 4, integer=True)
    np.testing.assert_allclose(column_bins(small_integer, 20), [0.5, 1.5, 2.5, 3.5, 4.5])
    assert len(column_bins(ContinuousColumn("k", 0, 1000, integer=True), 20)) == 21
    with pytest.raises(TypeError, match="column 'c'"):
        column_bins(CategoricalColumn("c", ("a",)))


def test_discretize(small_schema):
    frame = pd.DataFrame(
        {
            "age": [17, 100, 150, 58],
            "gain": [0.0, 1000.0, np.nan, 420.0],
            "score": [0.0, 2.5, -1.5, 0.5],
            "weight": [np.nan, 0.0, 10.0, 4.99],
            "colour": pd.array(["red", None, "blue", "green"], dtype="string"),
            "sex": pd.array(["F", "M", "M", "F"], dtype="string"),
            "level": [1, 2, 3, 3],
            "size": pd.array(["S", "M", None, "L"], dtype="string"),
        },
        index=[5, 6, 7, 8],
    )
    codes = discretize(frame, small_schema, n_bins=10)
    assert list(codes.index) == [5, 6, 7, 8]
    assert (codes.dtypes == "int64").all()
    # age: 10 bins over [17, 100]; 150 is clipped into the last bin.
    assert codes["age"].tolist() == [0, 9, 9, 4]
    # gain: atoms 0 and 1000 take codes 0, 1; bins 2..11; missing 12.
    assert codes["gain"].tolist() == [0, 1, 12, 2 + 4]
    assert codes["score"].tolist() == [0, 1 + 9, 1, 1 + 5]
    assert codes["weight"].tolist() == [10, 0, 9, 4]
    assert codes["colour"].tolist() == [0, 3, 2, 1]
    assert codes["size"].tolist() == [0, 1, 3, 2]
    for column in small_schema:
        assert codes[column.name].between(0, n_codes(column, 10) - 1).all()
