"""DP schema discovery: partition selection, DP bounds, dtype-only kinds, accounting, CLI."""

import json
import math

import dp_accounting
import numpy as np
import pandas as pd
import pytest

from dpnf_jax.cli import main
from dpnf_jax.data.schema import CategoricalColumn, Schema
from dpnf_jax.data.schema_dp import (
    LABEL_BOUNDS,
    LABEL_CATEGORIES,
    LABEL_SELECTION,
    OTHER_LABEL,
    events_from_dicts,
    events_to_dicts,
    infer_dp_schema,
    symlog_grid,
)
from dpnf_jax.privacy.accounting import DeltaDpEvent, epsilon_of_events

DELTA = 1e-6


def _frame(n_rare=200, seed=0, scale=1):
    rng = np.random.default_rng(seed)
    frequent = ["A"] * (300 * scale) + ["B"] * (200 * scale)
    rare = [f"rare{i}" for i in range(n_rare)]  # each value held by exactly one row
    colour = np.array(frequent + rare, dtype=object)
    n = len(colour)
    return pd.DataFrame({
        "colour": pd.array(colour, dtype="string"),
        "age": rng.integers(18, 90, n),
        "score": rng.normal(50.0, 10.0, n),
    })


# ------------------------------------------------------------------ categories


def test_count_one_categories_never_released_frequent_ones_always():
    df = _frame()
    for seed in range(20):
        schema, _ = infer_dp_schema(df, 1.0, DELTA, coarse_bounds={"score": (0, 100)}, rng=seed)
        column = schema["colour"]
        assert column.categories == ("A", "B", OTHER_LABEL), seed
        assert column.other == OTHER_LABEL


def test_selection_probability_of_a_count_one_value_is_delta_T_over_m():
    # With a large selection delta the release rate of unique values is observable:
    # tau = 1 + s * Phi^-1(1 - delta_T / m_k) releases each with probability delta_T / m_k.
    df = pd.DataFrame({"u": pd.array([f"v{i}" for i in range(2000)], dtype="string")})
    details = {}
    schema, events = infer_dp_schema(df, 1.0, 0.5, selection_delta=0.2, max_categories=5000, rng=1, details=details)
    released = len(schema["u"].categories) - 1
    assert 400 - 4 * math.sqrt(2000 * 0.2 * 0.8) < released < 400 + 4 * math.sqrt(2000 * 0.2 * 0.8)
    assert details["selection_delta"] == 0.2 and events[-1] == (LABEL_SELECTION, DeltaDpEvent(0.2))


def test_rare_values_map_to_other_in_validation():
    df = _frame(n_rare=50)
    schema, _ = infer_dp_schema(df, 1.0, DELTA, rng=0)
    codes = schema.parse_frame(df)["colour"]
    other = schema["colour"].categories.index(OTHER_LABEL)
    assert (codes[500:] == other).all() and (codes[:500] != other).all()
    unseen = df.head(3).assign(colour=pd.array(["never-seen", "A", None], dtype="string"))
    assert schema.parse_frame(unseen)["colour"].tolist() == [other, schema["colour"].categories.index("A"), -1]
    assert Schema.from_json(schema.to_json()) == schema


def test_other_field_validation_and_round_trip():
    column = CategoricalColumn("c", ("x", "__other__"), other="__other__")
    assert column.to_dict()["other"] == "__other__"
    assert "other" not in CategoricalColumn("c", ("x",)).to_dict()
    assert Schema.from_dict(Schema((column,)).to_dict())["c"] == column
    with pytest.raises(ValueError, match="other level"):
        CategoricalColumn("c", ("x",), other="y")
    with pytest.raises(TypeError):
        CategoricalColumn("c", ("x",), other=3)
    strict = Schema((CategoricalColumn("c", ("x",)),))
    with pytest.raises(ValueError, match="unknown category"):
        strict.parse_frame(pd.DataFrame({"c": ["y"]}))


def test_max_categories_and_no_other_label():
    df = pd.DataFrame({"c": pd.array(["a"] * 300 + ["b"] * 200 + ["c"] * 100, dtype="string")})
    schema, _ = infer_dp_schema(df, 2.0, DELTA, max_categories=2, rng=0)
    assert schema["c"].categories == ("a", "b", OTHER_LABEL)
    schema, _ = infer_dp_schema(df, 2.0, DELTA, other_label=None, rng=0)
    assert schema["c"].categories == ("a", "b", "c") and schema["c"].other is None
    with pytest.raises(ValueError, match="no category passed"):
        infer_dp_schema(df.head(3), 0.5, DELTA, other_label=None, rng=0)


# ---------------------------------------------------------------------- bounds


def test_bounds_are_grid_points_inside_the_coarse_range_and_reproducible():
    df = _frame()
    kwargs = dict(coarse_bounds={"score": (0.0, 100.0)}, n_bins=64)
    first, _ = infer_dp_schema(df, 1.0, DELTA, rng=7, **kwargs)
    again, _ = infer_dp_schema(df, 1.0, DELTA, rng=7, **kwargs)
    assert first == again
    grid = np.linspace(0.0, 100.0, 65)
    for seed in range(5):
        schema, _ = infer_dp_schema(df, 1.0, DELTA, rng=seed, **kwargs)
        score = schema["score"]
        assert 0.0 <= score.lower < score.upper <= 100.0
        assert np.isclose(grid, score.lower).any() and np.isclose(grid, score.upper).any()
        age = schema["age"]  # default range, log grid, integer: rounded outwards to integers
        assert age.integer and float(age.lower).is_integer() and float(age.upper).is_integer()
        assert -1e9 <= age.lower < age.upper <= 1e9


def test_bounds_follow_the_data():
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"x": rng.normal(50.0, 10.0, 5000), "y": rng.lognormal(8.0, 1.0, 5000)})
    schema, _ = infer_dp_schema(df, 1.0, DELTA, coarse_bounds={"x": (0, 100)}, rng=0)
    for name in ("x", "y"):
        column, values = schema[name], df[name].to_numpy()
        clipped = np.mean((values < column.lower) | (values > column.upper))
        assert clipped < 0.02, (name, column)
    assert 10 <= schema["x"].lower <= 35 and 65 <= schema["x"].upper <= 90
    assert schema["y"].upper < 1e6  # far from the default range's 1e9


def test_one_outlier_row_does_not_move_the_bounds():
    # With the same noise seed, the neighbouring frames' histograms differ by one count in
    # two bins, far below the threshold: the outlier at 1e8 is never revealed.
    rng = np.random.default_rng(4)
    base = pd.DataFrame({"x": rng.normal(100.0, 20.0, 2000)})
    moved = base.copy()
    moved.loc[0, "x"] = 1e8
    changed = 0
    for seed in range(20):
        a, _ = infer_dp_schema(base, 1.0, DELTA, rng=seed)
        b, _ = infer_dp_schema(moved, 1.0, DELTA, rng=seed)
        assert b["x"].upper < 1e4
        changed += a != b
    assert changed <= 2


def test_nothing_detectable_falls_back_to_the_coarse_range():
    df = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    with pytest.warns(UserWarning, match="coarse range"):
        schema, _ = infer_dp_schema(df, 0.1, DELTA, coarse_bounds={"x": (-5, 5)}, rng=0)
    assert (schema["x"].lower, schema["x"].upper) == (-5.0, 5.0)


def test_symlog_grid():
    edges = symlog_grid(-10.0, 100.0, bins_per_decade=1, min_abs=1.0)
    assert edges.tolist() == [-10.0, -1.0, 0.0, 1.0, 10.0, 100.0]


# -------------------------------------------------------------------- kinds


def test_kinds_come_from_the_declared_dtype_only():
    df = pd.DataFrame({
        "float_integral": np.array([1.0, 2.0, 3.0] * 100),
        "int": np.array([1, 2, 3] * 100, dtype=np.int64),
        "nullable_int": pd.array([1, 2, None] * 100, dtype="Int64"),
        "text": np.array(["a", "b", "c"] * 100, dtype=object),
        "cat": pd.Categorical(["a", "b", "c"] * 100),
        "flag": np.array([True, False, True] * 100),
    })
    schema, _ = infer_dp_schema(df, 1.0, DELTA, rng=0)
    assert [c.kind for c in schema] == ["continuous"] * 3 + ["categorical"] * 3
    assert [schema[n].integer for n in ("float_integral", "int", "nullable_int")] == [False, True, True]
    assert [schema[n].nullable for n in ("float_integral", "int", "nullable_int")] == [True, False, True]
    assert not schema["flag"].nullable and schema["text"].nullable
    assert set(schema["flag"].categories) == {"True", "False", OTHER_LABEL}
    assert schema.provenance == "dp" and schema.covers_schema_privacy


def test_kind_overrides_and_public_columns():
    df = pd.DataFrame({"code": np.array([1, 2, 3] * 100), "num_text": ["1.5", "2.5", "x"] * 100,
                       "f": np.arange(300.0), "known": ["p", "q", "p"] * 100})
    public = CategoricalColumn("known", ("p", "q", "r"))
    schema, events = infer_dp_schema(
        df, 1.0, DELTA, categorical_columns=["code"], continuous_columns=["num_text"],
        integer_columns=["f"], public_columns=[public], nullable=["num_text"], rng=0,
    )
    assert schema["code"].kind == "categorical" and set(schema["code"].categories) >= {"1", "2", "3"}
    assert schema["num_text"].kind == "continuous" and schema["num_text"].nullable
    assert schema["f"].integer and not schema["f"].nullable
    assert schema["known"] is public
    assert [label for label, _ in events] == [LABEL_BOUNDS, LABEL_CATEGORIES, LABEL_SELECTION]
    with pytest.raises(ValueError, match="no column kind"):
        infer_dp_schema(pd.DataFrame({"t": pd.to_datetime(["2020-01-01"] * 3)}), 1.0, DELTA)


@pytest.mark.parametrize("kwargs, message", [
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=float("inf")), "epsilon"),
    (dict(delta=0.0), "delta"),
    (dict(selection_delta=2e-6), "selection_delta"),
    (dict(coarse_bounds={"nope": (0, 1)}), "not in the frame"),
    (dict(coarse_bounds={"score": (1, 0)}), "lo < hi"),
    (dict(coarse_bounds={"colour": (0, 1)}), "categorical"),
    (dict(categorical_columns=["age"], continuous_columns=["age"]), "both"),
    (dict(quantiles=(0.9, 0.1)), "quantiles"),
    (dict(grid="cubic"), "grid"),
    (dict(nullable="maybe"), "nullable"),
    (dict(coarse_bounds={"age": (0.2, 0.8)}), "fewer than two integers"),
])
def test_bad_arguments(kwargs, message):
    args = {"epsilon": 1.0, "delta": DELTA, **kwargs}
    with pytest.raises(ValueError, match=message):
        infer_dp_schema(_frame(n_rare=0), args.pop("epsilon"), args.pop("delta"), **args)


# ------------------------------------------------------------------ accounting


def test_events_meet_the_budget_in_both_accountants_and_round_trip():
    schema, events = Schema.infer_dp(_frame(), 0.5, DELTA, rng=0)
    assert schema.provenance == "dp"
    assert [label for label, _ in events] == [LABEL_BOUNDS, LABEL_CATEGORIES, LABEL_SELECTION]
    plain = [e for _, e in events]
    pld = epsilon_of_events(plain, DELTA, "pld")
    assert 0.49 <= pld <= 0.5
    assert pld <= epsilon_of_events(plain, DELTA, "rdp") < 1.0
    # The selection delta is a floor: below it nothing is private.
    assert epsilon_of_events(plain, DELTA / 2, "pld") == math.inf
    assert events_from_dicts(json.loads(json.dumps(events_to_dicts(events)))) == events
    # Gaussian parts compose back to one Gaussian of noise multiplier sigma.
    mu2 = sum(1 / e.noise_multiplier**2 for e in plain if isinstance(e, dp_accounting.GaussianDpEvent))
    assert epsilon_of_events([dp_accounting.GaussianDpEvent(mu2**-0.5), DeltaDpEvent(DELTA / 2)], DELTA) == pytest.approx(pld)


def test_delta_event_composes_exactly_in_both_accountants():
    from dpnf_jax.privacy.accounting import PrivacyLedger, calibrate_noise_multiplier, event_from_dict, event_to_dict

    gaussian = dp_accounting.GaussianDpEvent(8.0)
    for accountant in ("pld", "rdp"):
        # eps(delta) of Gaussian + (0, d) = eps_Gaussian((delta - d) / (1 - d)).
        combined = epsilon_of_events([gaussian, DeltaDpEvent(1e-6)], 1e-5, accountant)
        assert combined == pytest.approx(epsilon_of_events([gaussian], (1e-5 - 1e-6) / (1 - 1e-6), accountant))
        repeated = dp_accounting.SelfComposedDpEvent(DeltaDpEvent(1e-6), 3)  # 1 - (1 - d)^3
        assert epsilon_of_events([gaussian, repeated], 1e-5, accountant) == pytest.approx(
            epsilon_of_events([gaussian], (1e-5 - (1 - (1 - 1e-6) ** 3)) / (1 - 1e-6) ** 3, accountant))
        ledger = PrivacyLedger(1e-5, accountant)
        ledger.spend(DeltaDpEvent(1e-6), "selection")
        assert PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict()))).events == [DeltaDpEvent(1e-6)]
        sigma = calibrate_noise_multiplier(1.0, 1e-5, 0.05, 100, accountant, extra_events=[gaussian, DeltaDpEvent(1e-6)])
        assert sigma > calibrate_noise_multiplier(1.0, 1e-5, 0.05, 100, accountant, extra_events=[gaussian])
        with pytest.raises(ValueError, match="unreachable"):
            calibrate_noise_multiplier(1.0, 1e-5, 0.05, 100, accountant, extra_events=[DeltaDpEvent(2e-5)])
    assert event_from_dict(event_to_dict(DeltaDpEvent(1e-7))) == DeltaDpEvent(1e-7)
    with pytest.raises(dp_accounting.UnsupportedEventError, match="sampling"):
        epsilon_of_events([dp_accounting.PoissonSampledDpEvent(0.1, DeltaDpEvent(1e-7))], 1e-5)
    with pytest.raises(dp_accounting.UnsupportedEventError):
        epsilon_of_events([DeltaDpEvent(1.5)], 1e-5)


def test_synthesizer_rejects_malformed_schema_events():
    from dpnf_jax.synthesizer import DPFlowSynthesizer

    schema, _ = Schema.infer_dp(_frame(n_rare=0), 1.0, DELTA, rng=0)
    with pytest.raises(TypeError, match="schema_events"):
        DPFlowSynthesizer(schema, schema_events=[("x", "not an event")])
    with pytest.raises(TypeError, match="schema_events"):
        DPFlowSynthesizer(schema, schema_events="schema: bounds")


# ------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_schema_then_train_composes_one_budget(tmp_path, capsys):
    # The only test here that trains (JAX compilation dominates): `dpnf schema`, then
    # `dpnf train` builds DPFlowSynthesizer(..., schema_events=events).fit(rows).
    from dpnf_jax.synthesizer import DPFlowSynthesizer

    df = _frame(n_rare=30, scale=4)
    df.to_csv(tmp_path / "x.csv", index=False)
    (tmp_path / "bounds.json").write_text(json.dumps({"score": [0, 100]}))
    out = tmp_path / "s.json"
    assert main(["schema", "--data", str(tmp_path / "x.csv"), "--epsilon", "0.5", "--bounds",
                 str(tmp_path / "bounds.json"), "--categorical", "colour", "--integer", "age",
                 "--seed", "0", "--out", str(out)]) == 0
    assert "NOT differentially private" not in capsys.readouterr().err  # every kind was declared
    schema = Schema.from_json(out)
    assert schema.provenance == "dp" and schema["colour"].categories == ("A", "B", OTHER_LABEL)
    assert 0 <= schema["score"].lower < 30 and 70 < schema["score"].upper <= 100
    saved = json.loads((tmp_path / "s.json.events.json").read_text())
    schema_labels = [LABEL_BOUNDS, LABEL_CATEGORIES, LABEL_SELECTION]
    assert saved["epsilon"] == 0.5 and [e["label"] for e in saved["events"]] == schema_labels
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "x.csv"), "--schema", str(out), "--epsilon", "2",
                 "--epochs", "1", "--hidden", "16", "--blocks", "2", "--batch-size", "128", "--no-eval",
                 "--quiet", "--out", str(run)]) == 0
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["epsilon"] <= 2.0 and privacy["guarantee_covers_schema"]
    labels = [e["label"] for e in privacy["training"]["events"]]
    assert labels == [*schema_labels, "marginal histograms", "dp-sgd"]
    assert [e["label"] for e in privacy["schema_events"]] == schema_labels
    # The composed total is more than DP-SGD and the histograms alone would spend.
    events = events_from_dicts(saved)
    assert epsilon_of_events([e for _, e in events], privacy["delta"]) < privacy["epsilon"]

    synth = DPFlowSynthesizer.load(run / "model", verbose=False)  # save/load keeps the events
    assert synth.schema_events == events
    assert synth.privacy_report()["schema_events"] == privacy["schema_events"]
    synthetic = pd.read_csv(run / "synthetic.csv", dtype={"colour": "string"})
    assert set(synthetic["colour"].dropna()) <= set(schema["colour"].categories)
    synth.schema_events = []  # a "dp" schema whose cost is not in epsilon is flagged
    unaccounted = synth.privacy_report()
    assert not unaccounted["guarantee_covers_schema"] and "NOT included" in unaccounted["notes"][0]


def test_cli_schema_bad_input(tmp_path, capsys):
    _frame(n_rare=0).to_csv(tmp_path / "x.csv", index=False)
    base = ["schema", "--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "s.json")]
    for epsilon in ("0", "-1", "nan?"):
        with pytest.raises(SystemExit) as exc:
            main([*base, "--epsilon", epsilon])
        assert exc.value.code == 2
    assert main(["schema", "--data", str(tmp_path / "missing.csv"), "--epsilon", "1",
                 "--out", str(tmp_path / "s.json")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main([*base, "--epsilon", "1", "--bounds", str(tmp_path / "bad.json")]) == 2
    assert main([*base, "--epsilon", "1", "--categorical", "nope"]) == 2
    assert main([*base, "--epsilon", "1", "--strict-types"]) == 2
    assert main([*base, "--epsilon", "1", "--default-range", "5", "1"]) == 2
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.json.events.json").exists()
    # Undeclared kinds work but say that pandas read them off the CSV text.
    assert main([*base, "--epsilon", "1", "--seed", "0", "--quiet"]) == 0
    assert "NOT differentially private" in capsys.readouterr().err


def test_cli_declared_kinds_do_not_depend_on_how_values_read(tmp_path):
    """Neighbouring CSVs (one row's "score" or "age" rewritten as 2.5 or left empty) give
    the same kinds, integer flags and nullability for declared columns: they come from the
    declarations, not from pandas' guess at the text."""
    df = _frame(n_rare=0)
    variants = {"same": df.astype({"score": object})}
    decimal = variants["same"].copy()
    decimal["age"] = decimal["age"].astype(object)
    decimal.loc[0, "age"] = 2.5
    variants["decimal"] = decimal
    empty = variants["same"].copy()
    empty.loc[0, "score"] = None
    variants["empty"] = empty
    flags = {}
    for name, frame in variants.items():
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        out = tmp_path / f"{name}.json"
        assert main(["schema", "--data", str(tmp_path / f"{name}.csv"), "--epsilon", "1", "--categorical", "colour",
                     "--integer", "age", "--continuous", "score", "--seed", "0", "--quiet", "--out", str(out)]) == 0
        schema = Schema.from_json(out)
        assert schema.provenance == "dp"
        flags[name] = [(c.name, c.kind, getattr(c, "integer", None), c.nullable) for c in schema]
    assert flags["same"] == flags["decimal"] == flags["empty"]
    assert ("age", "continuous", True, True) in flags["same"]


def test_cli_guessed_kinds_are_not_claimed_as_covered(tmp_path, capsys):
    from dpnf_jax.synthesizer import DPFlowSynthesizer

    _frame(n_rare=0).to_csv(tmp_path / "x.csv", index=False)
    out = tmp_path / "s.json"
    assert main(["schema", "--data", str(tmp_path / "x.csv"), "--epsilon", "1", "--categorical", "colour",
                 "--seed", "0", "--quiet", "--out", str(out)]) == 0  # age and score: kinds guessed
    schema = Schema.from_json(out)
    assert schema.provenance == "dp-guessed-kinds" and not schema.covers_schema_privacy
    events = events_from_dicts(json.loads((tmp_path / "s.json.events.json").read_text()))
    synth = DPFlowSynthesizer(schema, schema_events=events)
    synth.params, synth.num_rows = {}, 500  # stands in for a fit: the report reads only the settings
    report = synth.privacy_report()
    assert not report["guarantee_covers_schema"]
    assert any("guessed from the private values" in note for note in report["notes"])
