"""Tests for dpnf_jax.data.schema: column validation, JSON, frame validation."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from dpnf_jax.data.schema import (
    CategoricalColumn,
    ContinuousColumn,
    OrdinalColumn,
    Schema,
)


@pytest.fixture
def schema() -> Schema:
    return Schema(
        (
            ContinuousColumn("age", 17, 100, integer=True),
            ContinuousColumn("gain", 0, 1000, integer=True, point_masses=[0], nullable=True),
            ContinuousColumn("score", -1.5, 2.5),
            CategoricalColumn("colour", ["red", "green", "blue"], nullable=True),
            CategoricalColumn("sex", ("F", "M")),
            OrdinalColumn("level", [1, 2, 3]),
        )
    )


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [20, 35, 90],
            "gain": [0.0, np.nan, 500.0],
            "score": [0.1, -1.5, 2.5],
            "colour": pd.array(["red", None, "blue"], dtype="string"),
            "sex": pd.array(["F", "M", "M"], dtype="string"),
            "level": [1, 3, 2],
        }
    )


def test_kinds_and_list_conversion(schema):
    assert [c.kind for c in schema] == ["continuous"] * 3 + ["categorical"] * 2 + ["ordinal"]
    assert schema["gain"].point_masses == (0.0,)
    assert schema["colour"].categories == ("red", "green", "blue")
    assert schema["level"].categories == (1, 2, 3)
    assert isinstance(schema["age"].lower, float)


def test_container_protocol(schema):
    assert schema.names == ("age", "gain", "score", "colour", "sex", "level")
    assert len(schema) == 6
    assert [c.name for c in schema] == list(schema.names)
    assert "age" in schema and "nope" not in schema
    with pytest.raises(KeyError, match="nope"):
        schema["nope"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ContinuousColumn("x", 1.0, 1.0), "column 'x': lower .* must be < upper"),
        (lambda: ContinuousColumn("x", 2.0, 1.0), "column 'x': lower .* must be < upper"),
        (lambda: ContinuousColumn("x", 0.0, float("inf")), "column 'x': upper must be finite"),
        (lambda: ContinuousColumn("x", float("nan"), 1.0), "column 'x': lower must be finite"),
        (lambda: ContinuousColumn("x", 0, 10, point_masses=(11,)), "column 'x': point mass 11 outside"),
        (lambda: ContinuousColumn("x", 0, 10, point_masses=(1, 1)), "column 'x': duplicate value 1.0"),
        (lambda: ContinuousColumn("x", 0.5, 10, integer=True), "column 'x': integer column needs an integral lower"),
        (lambda: ContinuousColumn("x", 0, 10, integer=True, point_masses=(0.5,)), "column 'x': .*integral point"),
        (lambda: ContinuousColumn("", 0, 1), "non-empty str"),
        (lambda: CategoricalColumn("c", ()), "column 'c': categories must be non-empty"),
        (lambda: CategoricalColumn("c", ("a", "a")), "column 'c': duplicate value 'a'"),
        (lambda: OrdinalColumn("o", (1, 2, 2)), "column 'o': duplicate value 2"),
        (lambda: Schema((ContinuousColumn("a", 0, 1), CategoricalColumn("a", ("x",)))), "duplicate column name 'a'"),
        (lambda: Schema((ContinuousColumn("a", 0, 1),), provenance="guess"), "provenance"),
        (lambda: Schema(()), "at least one column"),
    ],
)
def test_constructor_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ContinuousColumn("x", "0", 1), "column 'x': lower must be a real number"),
        (lambda: ContinuousColumn("x", True, 2), "column 'x': lower must be a real number"),
        (lambda: ContinuousColumn("x", 0, 1, integer="yes"), "column 'x': integer must be a bool"),
        (lambda: CategoricalColumn("c", ("a", 1)), "column 'c': category 1 must be a str"),
        (lambda: CategoricalColumn("c", "abc"), "column 'c': categories must be a sequence"),
        (lambda: OrdinalColumn("o", (1, "b")), "column 'o': categories mix str and int"),
        (lambda: OrdinalColumn("o", (1.5, 2.5)), "column 'o': category 1.5 must be a str or int"),
    ],
)
def test_constructor_type_errors(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_frozen(schema):
    with pytest.raises(AttributeError):
        schema["age"].lower = 0.0


def test_provenance_flag(schema):
    assert schema.covers_schema_privacy
    assert Schema(schema.columns, provenance="dp").covers_schema_privacy
    assert not Schema(schema.columns, provenance="nonprivate-inference").covers_schema_privacy


def test_json_round_trip(schema, tmp_path):
    assert Schema.from_json(schema.to_json()) == schema
    assert Schema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema
    path = tmp_path / "schema.json"
    text = schema.to_json(path)
    assert path.read_text() == text
    assert Schema.from_json(path) == schema
    assert Schema.from_json(str(path)) == schema
    # Atomic write leaves no temporary files behind.
    assert [p.name for p in tmp_path.iterdir()] == ["schema.json"]
    # Ordinal int levels stay ints, not floats or strings.
    assert Schema.from_json(text)["level"].categories == (1, 2, 3)


def _mutated(schema, index, **changes):
    d = schema.to_dict()
    d["columns"][index].update(changes)
    return d


def test_from_dict_wrong_type(schema):
    with pytest.raises(TypeError, match="column 'age': lower must be a real number, got 'seventeen'"):
        Schema.from_dict(_mutated(schema, 0, lower="seventeen"))
    with pytest.raises(TypeError, match="column 'colour': field 'categories' must be a list"):
        Schema.from_dict(_mutated(schema, 3, categories="red"))
    with pytest.raises(TypeError, match="column 'sex': nullable must be a bool"):
        Schema.from_dict(_mutated(schema, 4, nullable="no"))
    with pytest.raises(TypeError, match="schema must be a mapping"):
        Schema.from_dict([1, 2])


def test_from_dict_missing_and_unknown_fields(schema):
    d = schema.to_dict()
    del d["columns"][0]["upper"]
    with pytest.raises(ValueError, match="column 'age': missing field 'upper'"):
        Schema.from_dict(d)
    d = schema.to_dict()
    del d["columns"][3]["categories"]
    with pytest.raises(ValueError, match="column 'colour': missing field 'categories'"):
        Schema.from_json(json.dumps(d))
    with pytest.raises(ValueError, match="column 'age': unknown kind 'float'"):
        Schema.from_dict(_mutated(schema, 0, kind="float"))
    with pytest.raises(ValueError, match=re.escape("column 'age': unknown field(s) ['lowr']")):
        Schema.from_dict(_mutated(schema, 0, lowr=1))
    with pytest.raises(ValueError, match="missing field 'columns'"):
        Schema.from_dict({"provenance": "public"})


def test_validate_accepts_good_frame_in_any_column_order(schema, frame):
    schema.validate_frame(frame)
    schema.validate_frame(frame[list(reversed(frame.columns))], strict=True)


def test_parse_frame_values(schema, frame):
    parsed = schema.parse_frame(frame)
    np.testing.assert_array_equal(parsed["colour"], [0, -1, 2])
    np.testing.assert_array_equal(parsed["level"], [0, 2, 1])
    np.testing.assert_array_equal(parsed["gain"], [0.0, np.nan, 500.0])


def test_not_a_frame(schema, frame):
    with pytest.raises(TypeError, match="expected a pandas DataFrame, got dict"):
        schema.validate_frame(frame.to_dict())


def test_empty_frame(schema, frame):
    with pytest.raises(ValueError, match="empty"):
        schema.validate_frame(frame.iloc[:0])


def test_missing_column(schema, frame):
    with pytest.raises(ValueError, match=re.escape("missing schema column(s): ['score', 'sex']")):
        schema.validate_frame(frame.drop(columns=["score", "sex"]))


def test_extra_column(schema, frame):
    with pytest.raises(ValueError, match=re.escape("not in the schema: ['zip']")):
        schema.validate_frame(frame.assign(zip=1))


def test_non_numeric_text_in_continuous(schema, frame):
    bad = frame.assign(age=pd.array(["20", "abc", "90"], dtype="string"))
    with pytest.raises(ValueError, match="column 'age': non-numeric value 'abc' in a continuous column"):
        schema.validate_frame(bad)
    # Numeric text is accepted.
    schema.validate_frame(frame.assign(age=pd.array(["20", "35", "90"], dtype="string")))


def test_boolean_in_continuous(schema, frame):
    with pytest.raises(ValueError, match="column 'score': boolean values"):
        schema.validate_frame(frame.assign(score=[True, False, True]))


def test_unknown_category(schema, frame):
    bad = frame.assign(colour=pd.array(["red", "purple", "blue"], dtype="string"))
    with pytest.raises(ValueError, match="column 'colour': unknown category 'purple'"):
        schema.validate_frame(bad)
    with pytest.raises(ValueError, match="column 'level': unknown category 7"):
        schema.validate_frame(frame.assign(level=[1, 7, 2]))


def test_nan_in_non_nullable(schema, frame):
    bad = frame.assign(score=[0.1, 0.2, np.nan])
    bad.index = [10, 11, 12]
    with pytest.raises(ValueError, match="column 'score': missing value .* at row 12"):
        schema.validate_frame(bad)
    with pytest.raises(ValueError, match="column 'sex': missing value .* at row 1"):
        schema.validate_frame(frame.assign(sex=pd.array(["F", None, "M"], dtype="string")))


def test_out_of_bounds_strict_raises_default_passes(schema, frame):
    bad = frame.assign(age=[20, 150, 90])
    schema.validate_frame(bad)
    with pytest.raises(ValueError, match=re.escape("column 'age': value 150.0 outside the public bounds [17.0, 100.0]")):
        schema.validate_frame(bad, strict=True)
    with pytest.raises(ValueError, match="column 'age': non-integral value 20.5"):
        schema.validate_frame(frame.assign(age=[20.5, 35, 90]), strict=True)


def test_infer_nonprivate_is_flagged(frame):
    with pytest.warns(UserWarning, match="NOT differentially private"):
        inferred = Schema.infer_nonprivate(frame)
    assert inferred.provenance == "nonprivate-inference"
    assert not inferred.covers_schema_privacy
    assert inferred["age"] == ContinuousColumn("age", 20, 90, integer=True)
    assert inferred["gain"].nullable and inferred["gain"].integer
    assert inferred["colour"] == CategoricalColumn("colour", ("blue", "red"), nullable=True)
    inferred.validate_frame(frame)


def test_infer_nonprivate_refuses_high_cardinality_text():
    df = pd.DataFrame({"id": [f"row{i}" for i in range(20)]})
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="column 'id': 20 distinct values"):
        Schema.infer_nonprivate(df, max_categories=10)
