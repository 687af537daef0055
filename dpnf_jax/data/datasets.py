"""The bundled UCI Adult data (Becker & Kohavi 1996, CC BY 4.0) and its public schema.

The files ship as package data, so this works from an installed wheel without network
access. The schema is built from the documentation file adult.names and from domain
knowledge about the 1994 Current Population Survey extract; no statistic is read from
the rows.
"""

from __future__ import annotations

import functools
import gzip
import re
from importlib import resources

import pandas as pd

from dpnf_jax.data.schema import CategoricalColumn, Column, ContinuousColumn, OrdinalColumn, Schema

ADULT_COLUMNS = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
ADULT_NUMERIC = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
# The columns adult.names (and the files) mark with "?" for unknown.
ADULT_NULLABLE = ("workclass", "occupation", "native-country")


def _adult_file(name: str):
    return resources.files("dpnf_jax.data").joinpath("adult", name)


def _read_split(name: str, skip_first_line: bool) -> pd.DataFrame:
    with _adult_file(name).open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
        df = pd.read_csv(
            text,
            header=None,
            names=list(ADULT_COLUMNS),
            sep=",",
            skipinitialspace=True,
            skiprows=1 if skip_first_line else 0,
            na_values=["?"],
            keep_default_na=False,
            dtype={name: "string" for name in ADULT_COLUMNS if name not in ADULT_NUMERIC},
        )
    for column in df.columns:
        if column in ADULT_NUMERIC:
            df[column] = df[column].astype("int64")
        else:
            df[column] = df[column].str.strip()
    # The test split writes labels as "<=50K." / ">50K."; the training split has no dot.
    df["income"] = df["income"].str.removesuffix(".")
    return df


def load_adult() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Loads the bundled Adult training and test splits.

    Returns:
      (train, test): DataFrames of 32,561 and 16,281 rows with the 15 columns of
      `ADULT_COLUMNS`; numeric columns int64, text columns "string" with pd.NA where
      the files have "?".
    """
    return _read_split("adult.data.gz", False), _read_split("adult.test.gz", True)


EDUCATION_LADDER = (
    "Preschool", "1st-4th", "5th-6th", "7th-8th", "9th", "10th", "11th", "12th",
    "HS-grad", "Some-college", "Assoc-voc", "Assoc-acdm", "Bachelors", "Masters",
    "Prof-school", "Doctorate",
)


def _parse_adult_names() -> dict[str, tuple[str, ...]]:
    """Category lists documented in adult.names: `{column: categories}` plus "income"."""
    text = _adult_file("adult.names").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    # Documentation lines start with "|"; the attribute section is "name: v1, v2, ...".
    # The one bare line without a colon before it lists the class labels.
    content = [line for line in lines if line and not line.startswith("|")]
    categories: dict[str, tuple[str, ...]] = {}
    for line in content:
        match = re.fullmatch(r"([a-z-]+):\s*(.*)\.", line)
        if match is None:
            categories.setdefault("income", tuple(v.strip() for v in line.rstrip(".").split(",")))
        elif match.group(2) != "continuous":
            categories[match.group(1)] = tuple(v.strip() for v in match.group(2).split(","))
    return categories


@functools.cache
def adult_schema() -> Schema:
    """The public schema of Adult (provenance "public").

    Category lists come from adult.names. Numeric bounds are domain knowledge about
    the CPS extract, not statistics of the rows (see the comments in the code).
    """
    documented = _parse_adult_names()
    columns: dict[str, Column] = {
        # adult.names: extraction condition AAGE > 16; 100 as a generous public cap.
        "age": ContinuousColumn("age", 17, 100, integer=True),
        # CPS final weights are integer person counts (adult.names: weights are
        # controlled to population estimates; extraction condition AFNLWGT > 1).
        # 1.5 million is a generous cap from domain knowledge; larger values are
        # clipped and counted by the encoder.
        "fnlwgt": ContinuousColumn("fnlwgt", 0, 1_500_000, integer=True),
        # The 16 education levels of adult.names, numbered 1 (Preschool) .. 16 (Doctorate).
        "education-num": OrdinalColumn("education-num", tuple(range(1, 17))),
        # Capital income is 0 for most people (public knowledge about the CPS); the
        # CPS top-codes capital gains at 99,999.
        "capital-gain": ContinuousColumn("capital-gain", 0, 100_000, integer=True, point_masses=(0,)),
        # US tax law limits the capital loss deductible against income to $3,000 a
        # year, so reported losses are small; 5,000 leaves headroom.
        "capital-loss": ContinuousColumn("capital-loss", 0, 5_000, integer=True, point_masses=(0,)),
        # Extraction condition HRSWK > 0; the CPS top-codes usual hours at 99; the
        # standard 40-hour full-time week is a known spike.
        "hours-per-week": ContinuousColumn("hours-per-week", 1, 99, integer=True, point_masses=(40,)),
        # The US educational ladder (public knowledge) orders adult.names' 16 levels;
        # the same order education-num numbers 1..16. Declaring it ordinal lets the
        # encoders keep the order instead of an arbitrary category order.
        "education": OrdinalColumn("education", EDUCATION_LADDER),
        # Negative class first, so that code 1 is the positive label ">50K".
        "income": CategoricalColumn("income", tuple(sorted(documented["income"]))),
    }
    if set(EDUCATION_LADDER) != set(documented["education"]):
        raise RuntimeError("bundled adult.names and the education ladder disagree")
    for name, categories in documented.items():
        if name not in columns:
            columns[name] = CategoricalColumn(name, categories, nullable=name in ADULT_NULLABLE)
    return Schema(tuple(columns[name] for name in ADULT_COLUMNS), provenance="public")
