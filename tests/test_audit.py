"""One-run privacy audit: the bound against hand-computed cases, canaries, and leakage detection."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from dpnf_jax.audit import AuditResult, audit, audit_p_value, epsilon_lower_bound, make_canaries
from dpnf_jax.cli import main
from dpnf_jax.datasets import adult_schema, load_adult

# Tiny flow, few rows, many canaries relative to rows, many epochs: non-private training memorises.
TINY = dict(hidden=(16,), num_blocks=2, epochs=30.0, batch_size=64, seed=0, noise_seed=123)


# ----------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("r", [10, 100, 500])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_all_correct_closed_form(r, confidence):
    # P[Bin(r, q) >= r] = q^r <= beta  <=>  q <= beta^(1/r), eps = logit(q).
    q = (1 - confidence) ** (1 / r)
    expected = math.log(q / (1 - q))
    assert epsilon_lower_bound(1000, r, r, confidence=confidence) == pytest.approx(expected, abs=1e-6)


def test_known_value():
    # r = 100, all correct, 95%: logit(0.05^(1/100)) = 3.49297 (worked out by hand).
    assert epsilon_lower_bound(1000, 100, 100) == pytest.approx(3.49297, abs=1e-4)


def test_chance_level_gives_zero():
    for r in (10, 100, 1000):
        assert epsilon_lower_bound(1000, r, r // 2) == 0.0
        assert epsilon_lower_bound(1000, r, 0) == 0.0
    assert epsilon_lower_bound(1000, 0, 0) == 0.0
    # Just above chance, the bound is positive but small.
    assert 0 < epsilon_lower_bound(1000, 1000, 560) < 0.2


def test_monotone_in_correct_guesses():
    bounds = [epsilon_lower_bound(1000, 200, v) for v in range(0, 201, 5)]
    assert all(b1 <= b2 + 1e-9 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[len(bounds) // 2 + 4] > 0


def test_p_value_is_binomial_tail_and_delta_only_weakens():
    assert audit_p_value(100, 50, 30, 0.7) == pytest.approx(stats.binom.sf(29, 50, 1 / (1 + math.exp(-0.7))))
    assert audit_p_value(100, 50, 30, 0.7, delta=1e-3) > audit_p_value(100, 50, 30, 0.7)
    # The bound is the eps where the p-value crosses beta.
    eps = epsilon_lower_bound(1000, 300, 240, delta=1e-5)
    assert audit_p_value(1000, 300, 240, eps, 1e-5) < 0.05 <= audit_p_value(1000, 300, 240, eps + 1e-6, 1e-5)
    assert eps <= epsilon_lower_bound(1000, 300, 240)


def test_bound_rejects_bad_input():
    with pytest.raises(ValueError):
        audit_p_value(10, 5, 6, 1.0)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, 3, confidence=1.0)


# ----------------------------------------------------------------------------- canaries


@pytest.mark.parametrize("design", ["uniform", "extreme"])
def test_canaries_valid_distinct_reproducible(design):
    schema = adult_schema()
    train, _ = load_adult()
    a = make_canaries(schema, 300, design, rng=1, like=train)
    b = make_canaries(schema, 300, design, rng=1, like=train)
    assert len(a) == 300 and not a.duplicated().any()
    assert a.equals(b)
    schema.validate_frame(a)
    assert list(a.columns) == list(schema.names)
    with pytest.raises(ValueError):
        make_canaries(schema, 10, "bogus")


# ----------------------------------------------------------------------------- the audit


@pytest.fixture(scope="module")
def small():
    train, _ = load_adult()
    return train.iloc[:200].reset_index(drop=True)


@pytest.fixture(scope="module")
def nonprivate(small):
    return audit(adult_schema(), small, None, num_canaries=200, synthesizer_kwargs=TINY, seed=7)


@pytest.fixture(scope="module")
def private(small):
    return audit(adult_schema(), small, 1.0, num_canaries=200, synthesizer_kwargs=TINY, seed=7)


def test_audit_detects_nonprivate_leakage(nonprivate, private):
    assert isinstance(nonprivate, AuditResult)
    assert nonprivate.accountant_epsilon is None and nonprivate.delta == 0.0
    # Memorised canaries: far more correct guesses than chance, so a clearly positive bound.
    assert nonprivate.epsilon_lower_bound > 0.5
    assert nonprivate.epsilon_lower_bound > private.epsilon_lower_bound + 0.4
    assert nonprivate.num_correct / nonprivate.num_guesses > 0.75


def test_private_bound_below_accountant(private):
    assert private.accountant_epsilon == pytest.approx(1.0, rel=1e-3)
    assert private.epsilon_lower_bound < private.accountant_epsilon
    assert 0 < private.delta < 1e-3
    assert private.num_canaries == 200 and 0 < private.num_included < 200
    assert private.guess_counts_tried == (10, 20, 50, 100, 200)
    assert json.loads(json.dumps(private.to_dict()))["num_canaries"] == 200


def test_audit_rejects_bad_input(small):
    with pytest.raises(ValueError):
        audit(adult_schema(), small, 1.0, num_canaries=1)
    with pytest.raises(ValueError):
        audit(adult_schema(), small, 1.0, num_canaries=100, guesses=7)
    with pytest.raises(ValueError):
        audit(adult_schema(), small, 1.0, num_canaries=100, guesses=(200,))
    with pytest.raises(ValueError):
        audit(adult_schema(), small, 1.0, num_canaries=100, synthesizer_kwargs={"epsilon": 2.0})
    with pytest.raises(ValueError):
        audit(adult_schema(), small, 1.0, confidence=1.5)


# ----------------------------------------------------------------------------- CLI


def test_cli_audit_writes_json(tmp_path):
    out = tmp_path / "audit.json"
    args = ["audit", "--dataset", "adult", "--rows", "100", "--canaries", "40", "--epochs", "2",
            "--blocks", "1", "--hidden", "8", "--batch-size", "32", "--noise-seed", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["num_canaries"] == 40 and report["num_train_rows"] == 100
    assert report["epsilon"] == 1.0 and report["accountant_epsilon"] == pytest.approx(1.0, rel=1e-3)
    assert np.isfinite(report["epsilon_lower_bound"]) and report["wall_seconds"] > 0
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize(
    "extra",
    [["--guesses", "7"], ["--guesses", "100"], ["--rows", "999999"], ["--canaries", "1"], ["--canaries", "0"],
     ["--confidence", "1.5"]],
)
def test_cli_audit_bad_input_exits_2(tmp_path, extra, capsys):
    args = ["audit", "--dataset", "adult", "--canaries", "40", "--out", str(tmp_path / "a.json"), "--quiet"]
    # Later flags override earlier ones in argparse.
    try:
        code = main(args + extra)
    except SystemExit as exc:  # argparse type errors
        code = exc.code
    assert code == 2
    assert not (tmp_path / "a.json").exists()


def test_cli_audit_needs_a_source(tmp_path):
    assert main(["audit", "--out", str(tmp_path / "a.json"), "--quiet"]) == 2
