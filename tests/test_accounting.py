"""Tests for dpnf_jax.privacy.accounting: known values, calibration, events, ledger."""

import doctest
import json

import dp_accounting
import pytest
from dp_accounting import pld

from dpnf_jax.privacy import accounting
from dpnf_jax.privacy.accounting import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    dpsgd_epsilon,
    dpsgd_event,
    epsilon_curve,
    epsilon_of_events,
    event_from_dict,
    event_to_dict,
)

DELTA = 1e-5
ACCOUNTANTS = ["pld", "rdp"]
# Adult: 32561 rows, expected batch 256, 20 epochs.
ADULT_Q, ADULT_STEPS = 256 / 32561, 2544


def test_module_doctests():
    assert doctest.testmod(accounting).failed == 0


@pytest.mark.parametrize(
    "accountant, expected, tolerance", [("rdp", 5.63, 0.01), ("pld", 5.19, 0.02)]
)
def test_known_value(accountant, expected, tolerance):
    eps = dpsgd_epsilon(0.01, 1.1, 10_000, DELTA, accountant=accountant)
    assert eps == pytest.approx(expected, abs=tolerance)


def test_pld_single_gaussian_matches_analytic():
    sigma = 3.0
    analytic = dp_accounting.get_epsilon_gaussian(sigma, DELTA)
    eps = epsilon_of_events([dp_accounting.GaussianDpEvent(sigma)], DELTA)
    assert analytic <= eps <= analytic * 1.002


def test_pld_small_epsilon_is_refined():
    """A 1e-3 grid over-estimates this epsilon by ~20%; the refined grid must not."""
    event = dpsgd_event(ADULT_Q, 12.0, ADULT_STEPS)
    def pld_epsilon(interval):
        accountant = pld.PLDAccountant(value_discretization_interval=interval)
        return accountant.compose(event).get_epsilon(DELTA)

    reference, coarse = pld_epsilon(1e-5), pld_epsilon(1e-3)
    eps = epsilon_of_events([event], DELTA)
    assert coarse > 1.1 * reference
    assert eps == pytest.approx(reference, rel=5e-3)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_composition_of_histogram_and_training(accountant):
    histogram = dp_accounting.GaussianDpEvent(5.0)
    training = dpsgd_event(ADULT_Q, 1.0, ADULT_STEPS)
    eps_hist = epsilon_of_events([histogram], DELTA, accountant)
    eps_train = epsilon_of_events([training], DELTA, accountant)
    eps_total = epsilon_of_events([histogram, training], DELTA, accountant)
    assert max(eps_hist, eps_train) < eps_total < eps_hist + eps_train
    nested = dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(histogram, 1), training]
    )
    assert epsilon_of_events([nested], DELTA, accountant) == pytest.approx(eps_total, rel=1e-9)


def test_no_events_spend_nothing():
    assert epsilon_of_events([], DELTA) == 0.0


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("target", [0.8, 4.0])
def test_calibrate_round_trip(accountant, target):
    sigma = calibrate_noise_multiplier(target, DELTA, ADULT_Q, ADULT_STEPS, accountant=accountant)
    eps = dpsgd_epsilon(ADULT_Q, sigma, ADULT_STEPS, DELTA, accountant=accountant)
    assert 0.99 * target <= eps <= target


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_calibrate_with_extra_events_meets_total(accountant):
    target = 2.0
    histogram = dp_accounting.GaussianDpEvent(4.0)
    sigma = calibrate_noise_multiplier(
        target, DELTA, ADULT_Q, ADULT_STEPS, accountant=accountant, extra_events=[histogram]
    )
    training = dpsgd_event(ADULT_Q, sigma, ADULT_STEPS)
    total = epsilon_of_events([histogram, training], DELTA, accountant)
    assert 0.99 * target <= total <= target
    alone = calibrate_noise_multiplier(target, DELTA, ADULT_Q, ADULT_STEPS, accountant=accountant)
    assert sigma > alone


def test_calibrate_loose_target_returns_search_floor():
    sigma = calibrate_noise_multiplier(1e4, DELTA, 0.01, 10, accountant="rdp")
    assert sigma == pytest.approx(0.1)
    assert dpsgd_epsilon(0.01, sigma, 10, DELTA, accountant="rdp") <= 1e4


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_calibrate_extra_events_exceed_target(accountant):
    with pytest.raises(ValueError, match="extra_events alone"):
        calibrate_noise_multiplier(
            1.0, DELTA, 0.01, 100, accountant=accountant,
            extra_events=[dp_accounting.GaussianDpEvent(0.5)],
        )


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_calibrate_unreachable_target(accountant):
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(1e-5, DELTA, 1.0, 1, accountant=accountant)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"sampling_rate": 0.0}, "sampling_rate"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"accountant": "moments"}, "accountant"),
        ({"tol": 0.0}, "tol"),
    ],
)
def test_calibrate_rejects_bad_arguments(kwargs, name):
    args = {"epsilon": 1.0, "delta": DELTA, "sampling_rate": 0.01, "steps": 100} | kwargs
    with pytest.raises(ValueError, match=f"{name}={kwargs[name]!r}|{name}={kwargs[name]}"):
        calibrate_noise_multiplier(**args)


@pytest.mark.parametrize(
    "args, name",
    [
        ((0.01, 0.0, 100, DELTA), "noise_multiplier"),
        ((0.01, -1.0, 100, DELTA), "noise_multiplier"),
        ((0.0, 1.0, 100, DELTA), "sampling_rate"),
        ((0.01, 1.0, 0, DELTA), "steps"),
        ((0.01, 1.0, 100, 1.5), "delta"),
    ],
)
def test_dpsgd_epsilon_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        dpsgd_epsilon(*args)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_monotonicity(accountant):
    def eps(q=0.01, sigma=1.0, steps=1000):
        return dpsgd_epsilon(q, sigma, steps, DELTA, accountant=accountant)

    by_steps = [eps(steps=t) for t in (100, 1000, 5000)]
    by_rate = [eps(q=q) for q in (0.002, 0.01, 0.05)]
    by_sigma = [eps(sigma=s) for s in (0.7, 1.0, 2.0, 4.0)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == 3
    assert by_rate == sorted(by_rate) and len(set(by_rate)) == 3
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == 4


def test_epsilon_curve():
    curve = epsilon_curve(ADULT_Q, 1.0, ADULT_STEPS, DELTA, num_points=5, accountant="rdp")
    steps = [t for t, _ in curve]
    epsilons = [e for _, e in curve]
    assert len(curve) == 5 and steps[-1] == ADULT_STEPS and steps == sorted(steps)
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] == pytest.approx(dpsgd_epsilon(ADULT_Q, 1.0, ADULT_STEPS, DELTA, "rdp"))
    assert [t for t, _ in epsilon_curve(0.1, 1.0, 3, DELTA, num_points=10)] == [1, 2, 3]
    with pytest.raises(ValueError, match="num_points"):
        epsilon_curve(0.1, 1.0, 3, DELTA, num_points=0)


def test_event_dict_round_trip():
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.GaussianDpEvent(3.5),
            dpsgd_event(ADULT_Q, 1.3, ADULT_STEPS),
            dp_accounting.NoOpDpEvent(),
        ]
    )
    as_dict = json.loads(json.dumps(event_to_dict(event)))
    assert event_from_dict(as_dict) == event
    assert event_from_dict(as_dict) != dpsgd_event(ADULT_Q, 1.3, ADULT_STEPS)


def test_event_dict_rejects_unknown():
    with pytest.raises(ValueError, match="LaplaceDpEvent"):
        event_to_dict(dp_accounting.LaplaceDpEvent(1.0))
    with pytest.raises(ValueError, match="unknown_kind"):
        event_from_dict({"type": "unknown_kind"})


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_ledger(accountant):
    ledger = PrivacyLedger(delta=DELTA, accountant=accountant)
    assert ledger.epsilon() == 0.0
    histogram = dp_accounting.GaussianDpEvent(10.0)
    training = dpsgd_event(ADULT_Q, 1.0, ADULT_STEPS)
    ledger.spend(histogram, "schema histogram")
    ledger.spend(training, "DP-SGD")
    total = epsilon_of_events([histogram, training], DELTA, accountant)
    assert ledger.epsilon() == pytest.approx(total)
    assert ledger.labels == ["schema histogram", "DP-SGD"]
    assert ledger.remaining(10.0) == pytest.approx(10.0 - total)
    assert ledger.remaining(total / 2) < 0
    more = dpsgd_event(ADULT_Q, 1.0, 100)
    with_more = epsilon_of_events([histogram, training, more], DELTA, accountant)
    assert ledger.would_exceed(more, epsilon_budget=(total + with_more) / 2)
    assert not ledger.would_exceed(more, epsilon_budget=with_more * 1.01)

    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored.epsilon() == ledger.epsilon()
    assert restored.labels == ledger.labels
    assert restored.events_as_dicts() == ledger.events_as_dicts()
    assert (restored.delta, restored.accountant) == (DELTA, accountant)


def test_ledger_rejects_bad_input():
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(delta=0.0)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger(delta=DELTA, accountant="moments")
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp")
    with pytest.raises(ValueError, match="does not support"):
        ledger.spend(dp_accounting.UnsupportedDpEvent(), "mystery")
    with pytest.raises(ValueError, match="epsilon_budget"):
        ledger.remaining(0.0)
