"""Tests for the bundled Adult data and its public schema."""

from importlib import resources

import pandas as pd
import pytest

import dpnf_jax.datasets
from dpnf_jax.data import datasets
from dpnf_jax.data.datasets import ADULT_COLUMNS, adult_schema, load_adult
from dpnf_jax.data.schema import CategoricalColumn, ContinuousColumn, OrdinalColumn

NULLABLE = ("workclass", "occupation", "native-country")
NUMERIC = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")


@pytest.fixture(scope="module")
def adult():
    return load_adult()


def test_reexport():
    assert dpnf_jax.datasets.load_adult is load_adult
    assert dpnf_jax.datasets.adult_schema is adult_schema


def test_files_are_package_data():
    root = resources.files("dpnf_jax.data").joinpath("adult")
    for name in ("adult.data.gz", "adult.test.gz", "adult.names"):
        assert root.joinpath(name).is_file(), name


def test_shapes_columns_dtypes(adult):
    train, test = adult
    assert train.shape == (32_561, 15)
    assert test.shape == (16_281, 15)
    for df in adult:
        assert tuple(df.columns) == ADULT_COLUMNS
        for name in ADULT_COLUMNS:
            assert df[name].dtype == ("int64" if name in NUMERIC else "string"), name


def test_first_rows(adult):
    train, test = adult
    assert train.iloc[0].tolist() == [
        39, "State-gov", 77516, "Bachelors", 13, "Never-married", "Adm-clerical",
        "Not-in-family", "White", "Male", 2174, 0, 40, "United-States", "<=50K",
    ]  # fmt: skip
    assert test.iloc[0].tolist() == [
        25, "Private", 226802, "11th", 7, "Never-married", "Machine-op-inspct",
        "Own-child", "Black", "Male", 0, 0, 40, "United-States", "<=50K",
    ]  # fmt: skip


def test_missing_values(adult):
    for df in adult:
        counts = df.isna().sum()
        for name in ADULT_COLUMNS:
            if name in NULLABLE:
                assert counts[name] > 0, name
            else:
                assert counts[name] == 0, name
        # "?" is read as missing, never kept as a category.
        for name in NULLABLE:
            assert not (df[name] == "?").any()
    assert adult[0]["workclass"].isna().sum() == 1836


def test_text_is_stripped_and_labels_clean(adult):
    for df in adult:
        for name in ADULT_COLUMNS:
            if name not in NUMERIC:
                values = df[name].dropna()
                assert (values == values.str.strip()).all(), name
        assert set(df["income"].unique()) == {"<=50K", ">50K"}
    assert not adult[1]["income"].str.endswith(".").any()


def test_schema_contents():
    schema = adult_schema()
    assert schema.provenance == "public" and schema.covers_schema_privacy
    assert schema.names == ADULT_COLUMNS
    assert schema["income"] == CategoricalColumn("income", ("<=50K", ">50K"))
    assert schema["education-num"] == OrdinalColumn("education-num", tuple(range(1, 17)))
    assert schema["age"] == ContinuousColumn("age", 17, 100, integer=True)
    assert schema["hours-per-week"].point_masses == (40.0,)
    assert schema["capital-gain"].point_masses == (0.0,)
    assert len(schema["native-country"].categories) == 41
    assert len(schema["education"].categories) == 16
    assert schema["workclass"].categories[0] == "Private"
    assert {c.name for c in schema if c.nullable} == set(NULLABLE)


def test_observed_values_are_in_the_schema(adult):
    schema = adult_schema()
    for df in adult:
        # Strict: every category is listed and every number inside the public bounds.
        schema.validate_frame(df, strict=True)
        for column in schema:
            if isinstance(column, CategoricalColumn):
                assert set(df[column.name].dropna().unique()) <= set(column.categories), column.name


def test_schema_never_reads_the_rows(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("adult_schema read the data rows")

    monkeypatch.setattr(datasets, "_read_split", refuse)
    monkeypatch.setattr(pd, "read_csv", refuse)
    datasets.adult_schema.cache_clear()
    try:
        assert len(datasets.adult_schema()) == 15
    finally:
        datasets.adult_schema.cache_clear()
