"""Tests for dpnf_jax.evaluate: fidelity metrics, TSTR, DCR, reports, the marginals baseline."""

import json
import math
import time

import dp_accounting
import numpy as np
import pandas as pd
import pytest
from dp_accounting import pld
from dp_accounting.pld import privacy_loss_mechanism

from dpnf_jax.data.datasets import adult_schema, load_adult
from dpnf_jax.data.schema import CategoricalColumn, ContinuousColumn, OrdinalColumn, Schema
from dpnf_jax.evaluate import (
    association_matrix,
    correlation_difference,
    distance_to_closest_record,
    evaluate_synthetic,
    independent_marginals_sample,
    ks_statistic,
    ks_statistics,
    marginal_tvd,
    pairwise_tvd,
    scaled_encoding,
    tstr,
    write_report,
)


@pytest.fixture(scope="module")
def adult() -> tuple[pd.DataFrame, pd.DataFrame, Schema]:
    train, test = load_adult()
    return train, test, adult_schema()


@pytest.fixture(scope="module")
def adult_small(adult) -> tuple[pd.DataFrame, pd.DataFrame, Schema]:
    """6,000 training and 3,000 test rows: enough for stable AUCs, quick to fit."""
    train, test, schema = adult
    return (
        train.sample(6000, random_state=0).reset_index(drop=True),
        test.sample(3000, random_state=0).reset_index(drop=True),
        schema,
    )


@pytest.fixture(scope="module")
def mixed_schema() -> Schema:
    return Schema(
        (
            ContinuousColumn("x", 0.0, 10.0, nullable=True),
            ContinuousColumn("count", 0, 50, integer=True, point_masses=(0,)),
            OrdinalColumn("level", (1, 2, 3), nullable=True),
            CategoricalColumn("colour", ("red", "green", "blue", "grey"), nullable=True),
            CategoricalColumn("label", ("no", "yes")),
        )
    )


def _mixed_frame(n: int, seed: int) -> pd.DataFrame:
    """Rows of `mixed_schema` where `label` depends on `x`, with missing values."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 10.0, n)
    label = np.where(x + rng.normal(0.0, 2.0, n) > 5.0, "yes", "no")
    x[rng.uniform(size=n) < 0.1] = np.nan
    level = pd.array(rng.choice([1, 2, 3], n), dtype="Int64")
    level[rng.uniform(size=n) < 0.1] = pd.NA
    colour = pd.array(rng.choice(["red", "green", "blue", "grey"], n), dtype="string")
    colour[rng.uniform(size=n) < 0.1] = pd.NA
    count = np.where(rng.uniform(size=n) < 0.5, 0, rng.integers(1, 51, n))
    return pd.DataFrame({"x": x, "count": count, "level": level, "colour": colour, "label": label})


def _finite_numbers(obj) -> list[float]:
    """Every int / float inside a nested JSON value."""
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in _finite_numbers(value)]
    if isinstance(obj, list):
        return [v for value in obj for v in _finite_numbers(value)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [float(obj)]
    return []


# ---------------------------------------------------------------------------- TVD


def test_tvd_is_zero_for_identical_frames(adult):
    train, _, schema = adult
    assert max(marginal_tvd(train, train, schema).values()) == 0.0
    assert max(pairwise_tvd(train, train, schema).values()) == 0.0


def test_tvd_is_one_for_disjoint_supports():
    schema = Schema((CategoricalColumn("c", ("a", "b", "c", "d")), ContinuousColumn("v", 0.0, 10.0)))
    real = pd.DataFrame({"c": ["a", "b"] * 50, "v": np.linspace(0.0, 2.0, 100)})
    synth = pd.DataFrame({"c": ["c", "d"] * 50, "v": np.linspace(8.0, 10.0, 100)})
    assert marginal_tvd(real, synth, schema) == pytest.approx({"c": 1.0, "v": 1.0})
    assert pairwise_tvd(real, synth, schema) == pytest.approx({"c|v": 1.0})


def test_tvd_matches_a_hand_computation():
    schema = Schema((CategoricalColumn("c", ("a", "b", "c")),))
    real = pd.DataFrame({"c": ["a", "a", "b", "c"]})  # (0.5, 0.25, 0.25)
    synth = pd.DataFrame({"c": ["a", "b", "b", "b", "c"]})  # (0.2, 0.6, 0.2)
    assert marginal_tvd(real, synth, schema)["c"] == pytest.approx(0.5 * (0.3 + 0.35 + 0.05))


def test_pairwise_tvd_detects_broken_dependence(adult):
    train, _, schema = adult
    broken = train.copy()
    broken["relationship"] = np.random.default_rng(0).permutation(broken["relationship"].to_numpy())
    one_way = marginal_tvd(train, broken, schema)
    two_way = pairwise_tvd(train, broken, schema)
    assert max(one_way.values()) < 1e-12
    assert two_way["relationship|sex"] > 0.2
    assert two_way["marital-status|relationship"] > 0.3
    untouched = [v for key, v in two_way.items() if "relationship" not in key.split("|")]
    assert max(untouched) < 1e-12


def test_pairwise_tvd_covers_all_adult_pairs_quickly(adult):
    train, test, schema = adult
    start = time.perf_counter()
    two_way = pairwise_tvd(train, test, schema)
    elapsed = time.perf_counter() - start
    assert len(two_way) == 105
    assert list(two_way)[0] == "age|workclass"
    assert elapsed < 2.0
    subset = pairwise_tvd(train, test, schema, max_pairs=10, seed=1)
    assert len(subset) == 10
    assert all(two_way[key] == value for key, value in subset.items())


# ----------------------------------------------------------- correlations and KS


def test_association_matrix_entries(adult_small):
    train, _, schema = adult_small
    matrix = association_matrix(train, schema)
    names = list(schema.names)
    assert matrix.shape == (15, 15)
    np.testing.assert_allclose(matrix, matrix.T)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    age, hours = names.index("age"), names.index("hours-per-week")
    expected = np.corrcoef(train["age"].to_numpy(float), train["hours-per-week"].to_numpy(float))[0, 1]
    assert matrix[age, hours] == pytest.approx(expected)
    # education-num is a function of education: the correlation ratio is exactly 1.
    assert matrix[names.index("education"), names.index("education-num")] == pytest.approx(1.0)


def test_cramers_v_extremes():
    schema = Schema((CategoricalColumn("a", ("x", "y")), CategoricalColumn("b", ("x", "y"))))
    same = pd.DataFrame({"a": ["x", "y"] * 20, "b": ["x", "y"] * 20})
    balanced = pd.DataFrame({"a": ["x", "x", "y", "y"] * 10, "b": ["x", "y", "x", "y"] * 10})
    assert association_matrix(same, schema)[0, 1] == pytest.approx(1.0)
    assert association_matrix(balanced, schema)[0, 1] == pytest.approx(0.0)


def test_correlation_difference(adult_small, mixed_schema):
    train, test, schema = adult_small
    assert correlation_difference(train, train, schema)["mean_abs_difference"] == 0.0
    result = correlation_difference(train, test, schema)
    assert 0.0 < result["mean_abs_difference"] < 0.05
    assert result["columns"] == list(schema.names)
    json.dumps(result, allow_nan=False)
    # Missing values and a constant synthetic column stay finite.
    real = _mixed_frame(500, 0)
    constant = real.assign(x=3.0, colour="red")
    matrix = np.asarray(correlation_difference(real, constant, mixed_schema)["synthetic"])
    assert np.isfinite(matrix).all()
    assert matrix[0, 1:].tolist() == [0.0] * 4


def test_ks_statistic_matches_a_hand_computation():
    # F_a - F_b at 1, 2, 3, 4: 0.25, 0.5, 0.75 - 0.2, 1 - 0.4; the sup is 0.6 at x = 4.
    assert ks_statistic(np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 4.0, 5.0, 6.0, 7.0])) == pytest.approx(0.6)
    assert ks_statistic(np.array([1.0, 1.0]), np.array([1.0])) == 0.0
    assert ks_statistic(np.array([]), np.array([1.0])) == 1.0


def test_ks_statistic_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 20, 500).astype(float), rng.integers(2, 25, 300).astype(float)
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic)


def test_ks_statistics_per_continuous_column(adult_small, mixed_schema):
    train, test, schema = adult_small
    ks = ks_statistics(train, test, schema)
    assert list(ks) == ["age", "fnlwgt", "capital-gain", "capital-loss", "hours-per-week"]
    assert all(0.0 <= v < 0.05 for v in ks.values())
    real = _mixed_frame(200, 0)
    shifted = real.assign(x=real["x"] + 0.5)
    observed = real["x"].dropna().to_numpy()
    expected = ks_statistic(observed, observed + 0.5)
    assert ks_statistics(real, shifted, mixed_schema)["x"] == pytest.approx(expected)


# --------------------------------------------------------------------------- TSTR


def test_tstr_on_real_rows_and_on_shuffled_labels(adult_small):
    train, test, schema = adult_small
    real = tstr(train, train, test, schema, "income")
    assert real["positive_class"] == ">50K"
    assert real["models"]["hgb"]["tstr_auc"] > 0.85
    assert real["models"]["logreg"]["tstr_auc"] > 0.85
    assert real["models"]["hgb"]["tstr_auc"] == real["models"]["hgb"]["trtr_auc"]
    shuffled = train.copy()
    shuffled["income"] = np.random.default_rng(0).permutation(shuffled["income"].to_numpy())
    noise = tstr(train, shuffled, test, schema, "income")
    for scores in noise["models"].values():
        assert abs(scores["tstr_auc"] - 0.5) < 0.1
    assert noise["models"]["hgb"]["trtr_auc"] > 0.85


def test_tstr_single_class_synthetic_does_not_crash(adult_small):
    train, test, schema = adult_small
    synth = train.head(500).assign(income="<=50K")
    result = tstr(train.head(1000), synth, test, schema, "income")
    assert result["synthetic_single_class"]
    assert result["positive_rate"]["synthetic"] == 0.0
    for scores in result["models"].values():
        assert scores["tstr_auc"] == 0.5
        assert scores["tstr_accuracy"] == pytest.approx(1.0 - result["positive_rate"]["real_test"])


def test_tstr_handles_missing_values(mixed_schema):
    train, synth, test = _mixed_frame(1500, 0), _mixed_frame(1500, 1), _mixed_frame(1000, 2)
    result = tstr(train, synth, test, mixed_schema, "label")
    for scores in result["models"].values():
        assert scores["tstr_auc"] > 0.8


def test_tstr_rejects_bad_targets(adult_small):
    train, test, schema = adult_small
    with pytest.raises(ValueError, match="continuous"):
        tstr(train, train, test, schema, "age")
    with pytest.raises(ValueError, match="not a schema column"):
        tstr(train, train, test, schema, "salary")
    with pytest.raises(ValueError, match="single class"):
        tstr(train, train, test.assign(income=">50K"), schema, "income")


# ---------------------------------------------------------------------------- DCR


def test_scaled_encoding_gives_each_column_at_most_unit_distance(mixed_schema):
    base = {"x": 0.0, "count": 0, "level": 1, "colour": "red", "label": "no"}
    changes = {"x": 10.0, "count": 50, "level": 3, "colour": "blue", "label": "yes"}
    rows = [base] + [{**base, name: value} for name, value in changes.items()]
    frame = pd.DataFrame(rows).astype({"level": "Int64", "colour": "string"})
    encoded = scaled_encoding(frame, mixed_schema)
    np.testing.assert_allclose(np.linalg.norm(encoded[1:] - encoded[0], axis=1), 1.0)
    half = scaled_encoding(frame.assign(x=5.0, level=2).head(1), mixed_schema)
    np.testing.assert_allclose(np.linalg.norm(half - encoded[0]), math.hypot(0.5, 0.5))


def test_dcr_flags_copies_and_not_fresh_rows(adult_small):
    train, test, schema = adult_small
    copies = distance_to_closest_record(train, train.sample(500, random_state=1), schema, holdout=test, max_rows=500)
    assert copies["synthetic"]["exact_match_rate"] == 1.0
    assert copies["synthetic"]["q50"] == pytest.approx(0.0, abs=1e-6)
    assert copies["median_ratio"] == pytest.approx(0.0, abs=1e-4)
    fresh = distance_to_closest_record(train, test.head(1500), schema, holdout=test.tail(1500), max_rows=500)
    assert 0.7 < fresh["median_ratio"] < 1.4
    assert "not a privacy guarantee" in fresh["note"]
    alone = distance_to_closest_record(train, test, schema, max_rows=100)
    assert alone["holdout"] is None and alone["median_ratio"] is None


# ------------------------------------------------------------- evaluate and report


def test_evaluate_synthetic_and_write_report(adult_small, tmp_path):
    train, test, schema = adult_small
    synth = test.head(1500)
    metrics = evaluate_synthetic(
        train, synth, schema, real_test=test.tail(1500), target="income", heldout_log_likelihood=-12.5
    )
    summary = metrics["summary"]
    assert summary["heldout_log_likelihood"] == -12.5
    assert summary["tstr_auc_hgb"] > 0.8 and summary["trtr_auc_hgb"] > 0.85
    assert 0.0 < summary["mean_tvd_1way"] < summary["mean_tvd_2way"] < 0.2
    out = tmp_path / "nested" / "report"
    paths = write_report(metrics, train, synth, schema, out, title="Adult check")
    assert [p.name for p in paths] == ["metrics.json", "report.md", "marginals.png", "correlations.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files left

    def reject(token):
        raise ValueError(f"non-finite number {token} in metrics.json")

    loaded = json.loads((out / "metrics.json").read_text(), parse_constant=reject)
    assert loaded["summary"] == pytest.approx(summary)
    numbers = _finite_numbers(loaded)
    assert len(numbers) > 200 and all(math.isfinite(v) for v in numbers)
    for name in ("marginals.png", "correlations.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert report.startswith("# Adult check") and "TSTR AUC" in report and "marginals.png" in report


def test_evaluate_synthetic_without_test_split(mixed_schema):
    real, synth = _mixed_frame(400, 0), _mixed_frame(300, 1)
    metrics = evaluate_synthetic(real, synth, mixed_schema)
    assert metrics["tstr"] is None and metrics["summary"]["tstr_auc_hgb"] is None
    json.dumps(metrics, allow_nan=False)
    with pytest.raises(ValueError, match="real_test"):
        evaluate_synthetic(real, synth, mixed_schema, target="label")


# ----------------------------------------------------------------------- baseline


def test_baseline_keeps_marginals_and_loses_dependence(adult):
    train, test, schema = adult
    synth, info = independent_marginals_sample(train, schema, n=len(test), epsilon=100.0, delta=1e-5, seed=0)
    assert len(synth) == len(test) and list(synth.columns) == list(schema.names)
    schema.validate_frame(synth, strict=True)
    assert max(marginal_tvd(train, synth, schema).values()) < 0.05
    baseline_2way = np.mean(list(pairwise_tvd(train, synth, schema).values()))
    test_2way = np.mean(list(pairwise_tvd(train, test, schema).values()))
    assert baseline_2way > 2 * test_2way
    assert synth["workclass"].isna().any()  # the missing level is sampled too
    assert info["sigma"] == pytest.approx(info["noise_multiplier"] * math.sqrt(15))


def test_baseline_samples_every_column_kind(mixed_schema):
    real = _mixed_frame(3000, 0)
    synth, _ = independent_marginals_sample(real, mixed_schema, n=3000, epsilon=100.0, delta=1e-5, seed=1)
    mixed_schema.validate_frame(synth, strict=True)
    assert synth["count"].dtype == np.int64 and synth["level"].dtype == "Int64"
    assert synth[["x", "level", "colour"]].isna().any().all()
    assert max(marginal_tvd(real, synth, mixed_schema).values()) < 0.05
    # Rows drawn from a bin never land on a point mass: the zero share matches.
    assert (synth["count"] == 0).mean() == pytest.approx((real["count"] == 0).mean(), abs=0.03)


def test_baseline_sigma_meets_the_privacy_target(adult_small):
    train, _, schema = adult_small
    for epsilon in (1.0, 10.0):
        _, info = independent_marginals_sample(train, schema, n=10, epsilon=epsilon, delta=1e-5, seed=0)
        assert info["dp_event"] == {"type": "gaussian", "noise_multiplier": info["noise_multiplier"]}
        event = dp_accounting.GaussianDpEvent(info["dp_event"]["noise_multiplier"])
        spent = pld.PLDAccountant().compose(event).get_epsilon(1e-5)
        assert epsilon * 0.99 < spent <= epsilon
    # At epsilon = 100 a PLD grid is slow; the exact analytic Gaussian curve is not.
    _, info = independent_marginals_sample(train, schema, n=10, epsilon=100.0, delta=1e-5, seed=0)
    loss = privacy_loss_mechanism.GaussianPrivacyLoss(info["noise_multiplier"], sensitivity=1.0)
    assert loss.get_delta_for_epsilon(100.0) <= 1e-5


def test_baseline_rejects_bad_arguments(adult_small):
    train, _, schema = adult_small
    with pytest.raises(ValueError, match="epsilon"):
        independent_marginals_sample(train, schema, n=10, epsilon=0.0, delta=1e-5, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        independent_marginals_sample(train, schema, n=0, epsilon=1.0, delta=1e-5, seed=0)
