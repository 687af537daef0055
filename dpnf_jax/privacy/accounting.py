"""Host-side privacy accounting for DP-SGD with `dp_accounting` events.

Every privacy-relevant step (DP-SGD training, DP histograms for schema discovery, DP
hyper-parameter choice) is described as a `dp_accounting.DpEvent`, and all events of a
run are composed in ONE accountant, so the reported epsilon is the total spend.

Two accountants are offered: ``"pld"`` (privacy loss distributions, tight; the default)
and ``"rdp"`` (Renyi DP, looser but classic). Both report an upper bound on epsilon.

The PLD accountant discretises privacy losses on a grid; a coarse grid over-estimates
epsilon (never under-estimates it), a fine one is slow. We compose once on a coarse grid
(interval ``1e-3``) and, when epsilon is small enough that the coarse grid is inaccurate,
once more on a grid proportional to epsilon. Measured against a ``1e-5`` reference this
keeps the relative error below ~0.2% over ``q in [1e-3, 0.1]``, ``sigma in [0.8, 25]``,
at 10-400 ms per evaluation.

Round trip between a target epsilon and the calibrated noise multiplier:

>>> sigma = calibrate_noise_multiplier(2.0, 1e-5, sampling_rate=0.01, steps=10_000)
>>> eps = dpsgd_epsilon(0.01, sigma, steps=10_000, delta=1e-5)
>>> 0.99 * 2.0 <= eps <= 2.0
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attr
import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("pld", "rdp")

# RDP orders: dense at small orders (where the optimum for eps ~ 1-10 lies), sparse
# above; this is dp_accounting's default set, pinned here so results are reproducible.
RDP_ORDERS = (
    tuple(1 + x / 10.0 for x in range(1, 100))
    + tuple(float(x) for x in range(11, 64))
    + (128.0, 256.0, 512.0, 1024.0)
)

_PLD_COARSE_INTERVAL = 1e-3
_PLD_FINEST_INTERVAL = 1e-5
# Fine-grid interval per unit of epsilon: the discretisation error grows roughly with
# the square of the interval, so an interval proportional to epsilon bounds the
# relative error (~0.2% measured at this factor).
_PLD_INTERVAL_PER_EPSILON = 3e-4

# Noise multipliers searched by calibration: _NOISE_SEARCH_MIN * 2**k, k < _NOISE_SEARCH_SIZE.
_NOISE_SEARCH_MIN = 0.1
_NOISE_SEARCH_SIZE = 18
_NOISE_SEARCH_START = 4


def _check_epsilon(epsilon: float, name: str = "epsilon") -> None:
    if not epsilon > 0:
        raise ValueError(f"{name} must be > 0, got {name}={epsilon}.")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got delta={delta}.")


def _check_sampling_rate(sampling_rate: float) -> None:
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got sampling_rate={sampling_rate}.")


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got steps={steps}.")


def _check_noise_multiplier(noise_multiplier: float) -> None:
    if not noise_multiplier > 0:
        raise ValueError(
            f"noise_multiplier must be > 0, got noise_multiplier={noise_multiplier}."
        )


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got accountant={accountant!r}.")


class _AdaptivePldAccountant(dp_accounting.PrivacyAccountant):
    """PLD accountant that refines its discretisation grid when epsilon is small.

    It records the composed events and evaluates them in `get_epsilon`: first on a grid
    of interval ``1e-3``, then, if epsilon is below ~3.3, again on a grid of interval
    ``3e-4 * epsilon`` (at least ``1e-5``). Both results are upper bounds; the smaller
    one is returned.
    """

    def __init__(self) -> None:
        super().__init__(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        self._support_checker = pld.PLDAccountant(self.neighboring_relation)

    def _maybe_compose(
        self, event: dp_accounting.DpEvent, count: int, do_compose: bool
    ) -> dp_accounting.PrivacyAccountant.CompositionErrorDetails | None:
        # The base class records every composed event in `self.ledger`; all the work
        # happens in `get_epsilon`, so composing only needs the support check.
        del count, do_compose
        if self._support_checker.supports(event):
            return None
        return self.CompositionErrorDetails(
            invalid_event=event, error_message="Unsupported by the PLD accountant."
        )

    def _epsilon_on_grid(self, interval: float, delta: float) -> float:
        accountant = pld.PLDAccountant(
            self.neighboring_relation, value_discretization_interval=interval
        )
        return accountant.compose(self.ledger).get_epsilon(delta)

    def get_epsilon(self, target_delta: float) -> float:
        coarse = self._epsilon_on_grid(_PLD_COARSE_INTERVAL, target_delta)
        if coarse <= 0 or not math.isfinite(coarse):
            return coarse
        interval = max(_PLD_FINEST_INTERVAL, _PLD_INTERVAL_PER_EPSILON * coarse)
        if interval >= _PLD_COARSE_INTERVAL:
            return coarse
        return min(coarse, self._epsilon_on_grid(interval, target_delta))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DeltaDpEvent(dp_accounting.DpEvent):
    """A ``(0, delta)``-DP release (``dp_accounting`` 0.6 has no such event).

    The mechanism's privacy curve (hockey-stick divergence, both directions) is at most
    ``delta`` for every epsilon >= 0. It is dominated by the pair "with probability
    ``delta`` the output reveals everything (privacy loss +infinity), otherwise it
    reveals nothing (loss 0)". Composed with any other events whose privacy curve is
    ``delta_rest(eps)``, the total curve is exactly
    ``delta(eps) = delta_T + (1 - delta_T) * delta_rest(eps)`` with
    ``delta_T = 1 - prod_i (1 - delta_i)``, for both accountants; see
    `_DeltaAwareAccountant`. Typical use: the selection step of DP partition selection
    (releasing a category that only one row has happens with probability <= delta).
    """

    delta: float


def _validate_delta_event(event: DeltaDpEvent) -> str | None:
    if not (isinstance(event.delta, (int, float)) and 0 <= event.delta < 1):
        return f"DeltaDpEvent.delta must be in [0, 1), got {event.delta!r}"
    return None


def _contains_delta_event(event: dp_accounting.DpEvent) -> bool:
    if isinstance(event, DeltaDpEvent):
        return True
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return any(_contains_delta_event(e) for e in event.events)
    inner = getattr(event, "event", None)
    return isinstance(inner, dp_accounting.DpEvent) and _contains_delta_event(inner)


class _DeltaAwareAccountant(dp_accounting.PrivacyAccountant):
    """Wraps a PLD or RDP accountant so that `DeltaDpEvent`s compose exactly.

    Every `DeltaDpEvent` (directly, in a `ComposedDpEvent` or a `SelfComposedDpEvent`)
    is collected into ``delta_T = 1 - prod (1 - delta_i)``; everything else goes to the
    wrapped accountant. The composed privacy curve is
    ``delta_T + (1 - delta_T) * delta_rest(eps)`` (product of dominating pairs), so

    * ``get_epsilon(delta) = inner.get_epsilon((delta - delta_T) / (1 - delta_T))``
      (``inf`` when ``delta <= delta_T``);
    * ``get_delta(eps) = delta_T + (1 - delta_T) * inner.get_delta(eps)``.

    A `DeltaDpEvent` inside a sampling event is not supported (no amplification is
    claimed).
    """

    def __init__(self, inner: dp_accounting.PrivacyAccountant) -> None:
        super().__init__(inner.neighboring_relation)
        self._inner = inner
        self._log_keep = 0.0  # log prod (1 - delta_i)

    @property
    def selection_delta(self) -> float:
        """``delta_T`` of the `DeltaDpEvent`s composed so far."""
        return -math.expm1(self._log_keep)

    def _maybe_compose(
        self, event: dp_accounting.DpEvent, count: int, do_compose: bool
    ) -> dp_accounting.PrivacyAccountant.CompositionErrorDetails | None:
        if isinstance(event, DeltaDpEvent):
            message = _validate_delta_event(event)
            if message is not None:
                return self.CompositionErrorDetails(invalid_event=event, error_message=message)
            if do_compose:
                self._log_keep += count * math.log1p(-float(event.delta))
            return None
        if isinstance(event, dp_accounting.ComposedDpEvent) and _contains_delta_event(event):
            for sub in event.events:
                error = self._maybe_compose(sub, count, do_compose)
                if error is not None:
                    return error
            return None
        if isinstance(event, dp_accounting.SelfComposedDpEvent) and _contains_delta_event(event):
            return self._maybe_compose(event.event, count * event.count, do_compose)
        if _contains_delta_event(event):
            return self.CompositionErrorDetails(
                invalid_event=event,
                error_message="DeltaDpEvent inside a sampling event is not supported.",
            )
        if not self._inner.supports(event):
            return self.CompositionErrorDetails(
                invalid_event=event, error_message=f"Unsupported by {type(self._inner).__name__}."
            )
        if do_compose:
            self._inner.compose(event, count)
        return None

    def get_epsilon(self, target_delta: float) -> float:
        selection = self.selection_delta
        if selection == 0.0:
            return self._inner.get_epsilon(target_delta)
        if target_delta <= selection:
            return math.inf
        return self._inner.get_epsilon((target_delta - selection) / (1.0 - selection))

    def get_delta(self, target_epsilon: float) -> float:
        selection = self.selection_delta
        rest = self._inner.get_delta(target_epsilon)
        return selection + (1.0 - selection) * rest


def _make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    _check_accountant(accountant)
    if accountant == "pld":
        return _DeltaAwareAccountant(_AdaptivePldAccountant())
    return _DeltaAwareAccountant(rdp.RdpAccountant(orders=RDP_ORDERS))


def dpsgd_event(sampling_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """The DP event of `steps` Poisson-subsampled Gaussian DP-SGD steps.

    Args:
        sampling_rate: Poisson inclusion probability q of each row per step, in (0, 1].
        noise_multiplier: Noise standard deviation divided by the sensitivity.
        steps: Number of noisy steps T >= 1.

    Returns:
        ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)``.

    Raises:
        ValueError: If an argument is out of range.
    """
    _check_sampling_rate(sampling_rate)
    _check_noise_multiplier(noise_multiplier)
    _check_steps(steps)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            float(sampling_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
        ),
        int(steps),
    )


def epsilon_of_events(
    events: Sequence[dp_accounting.DpEvent], delta: float, accountant: str = "pld"
) -> float:
    """Total epsilon of all `events` composed in one accountant.

    Args:
        events: Events spent so far, e.g. a DP histogram's ``GaussianDpEvent`` and a
            `dpsgd_event`. Gaussian, Poisson-sampled Gaussian, self-composed and
            composed events are supported by both accountants.
        delta: Target delta in (0, 1).
        accountant: ``"pld"`` or ``"rdp"``.

    Returns:
        Epsilon at `delta` (0.0 for no events, ``inf`` for a non-private event).

    Raises:
        ValueError: If `delta` or `accountant` is invalid.
        dp_accounting.UnsupportedEventError: If the accountant cannot handle an event.
    """
    _check_delta(delta)
    ledger = _make_accountant(accountant)
    ledger.compose(dp_accounting.ComposedDpEvent(list(events)))
    return float(ledger.get_epsilon(delta))


def dpsgd_epsilon(
    sampling_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "pld"
) -> float:
    """Epsilon of DP-SGD alone; see `dpsgd_event` and `epsilon_of_events`.

    >>> round(dpsgd_epsilon(0.01, 1.1, 10_000, 1e-5, accountant="rdp"), 2)
    5.63
    """
    event = dpsgd_event(sampling_rate, noise_multiplier, steps)
    return epsilon_of_events([event], delta, accountant)


def _bracket_noise_multiplier(epsilon_gap: Callable[[float], float]) -> tuple[float, float] | float:
    """Finds consecutive grid noise multipliers with ``gap(lower) > 0 >= gap(upper)``.

    Returns the smallest grid value instead of a pair when it already meets the target.

    Raises:
        ValueError: If even the largest grid noise multiplier misses the target.
    """
    grid = [_NOISE_SEARCH_MIN * 2.0**k for k in range(_NOISE_SEARCH_SIZE)]
    i = _NOISE_SEARCH_START
    if epsilon_gap(grid[i]) <= 0:
        while i > 0 and epsilon_gap(grid[i - 1]) <= 0:
            i -= 1
        return grid[0] if i == 0 else (grid[i - 1], grid[i])
    while i + 1 < len(grid) and epsilon_gap(grid[i + 1]) > 0:
        i += 1
    if i + 1 == len(grid):
        raise ValueError(
            f"Target epsilon is unreachable: even noise_multiplier={grid[-1]:g} exceeds it."
        )
    return grid[i], grid[i + 1]


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "pld",
    extra_events: Sequence[dp_accounting.DpEvent] = (),
    tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier whose total spend meets a privacy budget.

    The total spend is `extra_events` (already spent, e.g. a DP histogram) composed with
    `dpsgd_event(sampling_rate, sigma, steps)` in one accountant.

    Args:
        epsilon: Target total epsilon > 0.
        delta: Target delta in (0, 1).
        sampling_rate: Poisson sampling rate q in (0, 1].
        steps: Number of DP-SGD steps >= 1.
        accountant: ``"pld"`` or ``"rdp"``.
        extra_events: Events that compose with training.
        tol: Absolute tolerance on the noise multiplier.

    Returns:
        sigma with ``epsilon_of_events([*extra_events, dpsgd_event(q, sigma, T)]) <=
        epsilon``, within `tol` of the smallest such sigma. If the target is so loose
        that ``sigma = 0.1`` (epsilon in the hundreds) meets it, returns 0.1.

    Raises:
        ValueError: If an argument is invalid, if `extra_events` alone spend `epsilon`,
            or if no noise multiplier up to ~1.3e4 meets the target.
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    _check_sampling_rate(sampling_rate)
    _check_steps(steps)
    _check_accountant(accountant)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got tol={tol}.")
    extra_events = list(extra_events)
    if extra_events:
        spent = epsilon_of_events(extra_events, delta, accountant)
        if spent >= epsilon:
            raise ValueError(
                f"Target epsilon={epsilon} is unreachable: extra_events alone spend "
                f"epsilon={spent:.4g} at delta={delta}."
            )

    def make_event(noise_multiplier: float) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent(
            [*extra_events, dpsgd_event(sampling_rate, noise_multiplier, steps)]
        )

    def epsilon_gap(noise_multiplier: float) -> float:
        ledger = _make_accountant(accountant).compose(make_event(noise_multiplier))
        return ledger.get_epsilon(delta) - epsilon

    bracket = _bracket_noise_multiplier(epsilon_gap)
    if isinstance(bracket, float):
        return bracket
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _make_accountant(accountant),
            make_event,
            epsilon,
            delta,
            dp_accounting.ExplicitBracketInterval(*bracket),
            tol=tol,
        )
    )


def epsilon_curve(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    num_points: int = 10,
    accountant: str = "pld",
) -> list[tuple[int, float]]:
    """Epsilon after evenly spaced step counts, for progress displays.

    Args:
        sampling_rate: Poisson sampling rate q in (0, 1].
        noise_multiplier: Noise multiplier sigma > 0.
        steps: Final number of steps T >= 1 (always the last point).
        delta: Target delta in (0, 1).
        num_points: Number of points >= 1 (fewer when ``steps < num_points``).
        accountant: ``"pld"`` or ``"rdp"``.

    Returns:
        ``[(step, epsilon), ...]`` with increasing steps ending at `steps`.
    """
    _check_steps(steps)
    if isinstance(num_points, bool) or int(num_points) != num_points or num_points < 1:
        raise ValueError(f"num_points must be an integer >= 1, got num_points={num_points}.")
    checkpoints = sorted({max(1, round(steps * i / num_points)) for i in range(1, num_points + 1)})
    return [
        (t, dpsgd_epsilon(sampling_rate, noise_multiplier, t, delta, accountant))
        for t in checkpoints
    ]


def event_to_dict(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """JSON-able dict of a NoOp, Gaussian, Poisson-sampled, self-composed, composed or
    `DeltaDpEvent`.

    Raises:
        ValueError: For any other event type.
    """
    if isinstance(event, dp_accounting.NoOpDpEvent):
        return {"type": "noop"}
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return {"type": "gaussian", "noise_multiplier": float(event.noise_multiplier)}
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return {
            "type": "poisson_sampled",
            "sampling_probability": float(event.sampling_probability),
            "event": event_to_dict(event.event),
        }
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return {
            "type": "self_composed",
            "count": int(event.count),
            "event": event_to_dict(event.event),
        }
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return {"type": "composed", "events": [event_to_dict(e) for e in event.events]}
    if isinstance(event, DeltaDpEvent):
        return {"type": "delta", "delta": float(event.delta)}
    raise ValueError(f"Cannot serialise event of type {type(event).__name__}: {event}.")


def event_from_dict(d: dict[str, Any]) -> dp_accounting.DpEvent:
    """Inverse of `event_to_dict`.

    Raises:
        ValueError: For an unknown ``"type"``.
    """
    kind = d.get("type")
    if kind == "noop":
        return dp_accounting.NoOpDpEvent()
    if kind == "gaussian":
        return dp_accounting.GaussianDpEvent(float(d["noise_multiplier"]))
    if kind == "poisson_sampled":
        return dp_accounting.PoissonSampledDpEvent(
            float(d["sampling_probability"]), event_from_dict(d["event"])
        )
    if kind == "self_composed":
        return dp_accounting.SelfComposedDpEvent(event_from_dict(d["event"]), int(d["count"]))
    if kind == "composed":
        return dp_accounting.ComposedDpEvent([event_from_dict(e) for e in d["events"]])
    if kind == "delta":
        return DeltaDpEvent(float(d["delta"]))
    raise ValueError(f"Unknown event type {kind!r} in {d}.")


class PrivacyLedger:
    """Labelled record of every privacy event of a run, composed in one accountant.

    Args:
        delta: Target delta in (0, 1) at which epsilon is reported.
        accountant: ``"pld"`` or ``"rdp"``.

    Example:
        >>> ledger = PrivacyLedger(delta=1e-5)
        >>> ledger.spend(dpsgd_event(0.01, 1.1, 100), "DP-SGD")
        >>> ledger.would_exceed(dpsgd_event(0.01, 1.1, 10_000), epsilon_budget=1.0)
        True
    """

    def __init__(self, delta: float, accountant: str = "pld") -> None:
        _check_delta(delta)
        _check_accountant(accountant)
        self.delta = float(delta)
        self.accountant = accountant
        self._entries: list[tuple[str, dp_accounting.DpEvent]] = []

    @property
    def labels(self) -> list[str]:
        """Labels of the spent events, in order."""
        return [label for label, _ in self._entries]

    @property
    def events(self) -> list[dp_accounting.DpEvent]:
        """The spent events, in order."""
        return [event for _, event in self._entries]

    def spend(self, event: dp_accounting.DpEvent, label: str) -> None:
        """Records `event` under a human-readable `label`.

        Raises:
            ValueError: If the accountant cannot handle `event`.
        """
        if not _make_accountant(self.accountant).supports(event):
            raise ValueError(f"The {self.accountant} accountant does not support event {event}.")
        self._entries.append((str(label), event))

    def epsilon(self) -> float:
        """Total epsilon of all spent events at `delta`."""
        return epsilon_of_events(self.events, self.delta, self.accountant)

    def remaining(self, epsilon_budget: float) -> float:
        """`epsilon_budget` minus the spent epsilon (negative when overspent)."""
        _check_epsilon(epsilon_budget, "epsilon_budget")
        return epsilon_budget - self.epsilon()

    def would_exceed(self, event: dp_accounting.DpEvent, epsilon_budget: float) -> bool:
        """Whether spending `event` on top of the ledger would exceed `epsilon_budget`."""
        _check_epsilon(epsilon_budget, "epsilon_budget")
        total = epsilon_of_events([*self.events, event], self.delta, self.accountant)
        return total > epsilon_budget

    def events_as_dicts(self) -> list[dict[str, Any]]:
        """``[{"label": ..., "event": event_to_dict(...)}, ...]`` for privacy reports."""
        return [{"label": label, "event": event_to_dict(event)} for label, event in self._entries]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state for checkpoints."""
        return {
            "delta": self.delta,
            "accountant": self.accountant,
            "events": self.events_as_dicts(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyLedger:
        """Rebuilds a ledger saved with `to_dict`."""
        ledger = cls(delta=d["delta"], accountant=d["accountant"])
        for entry in d["events"]:
            ledger.spend(event_from_dict(entry["event"]), entry["label"])
        return ledger
