"""Empirical privacy audit in ONE training run (Steinke, Nasr and Jagielski, 2023).

``audit(schema, train_df, epsilon)`` inserts ``m`` canary rows, each independently with
probability 1/2 (coin flips independent of the data), trains the synthesizer ONCE on
the real rows plus the included canaries, scores every canary by its log-likelihood
under the trained model, guesses "included" for the ``k`` highest scores and "excluded"
for the ``k`` lowest (abstaining on the rest, ``r = 2k`` guesses), and converts the
number ``v`` of correct guesses into a statistical LOWER bound on epsilon:

  For an (eps, delta)-DP training algorithm, Steinke et al. (2023, Theorem 5.2 and
  their Algorithm 2 / appendix code) show
      P[V >= v] <= P[Binomial(r, q) >= v] + 2 m delta alpha(v),    q = e^eps / (1 + e^eps),
      alpha(v) = max_{i = 1..v} P[v - i <= Binomial(r, q) < v] / i.
  The audit reports the largest eps whose p-value is still below ``1 - confidence``
  (found by bisection): with probability >= ``confidence`` over the coins and the
  training randomness, the algorithm is NOT (eps', delta)-DP for any eps' below it.
  With ``delta = 0`` the bound is exactly the Binomial tail (their Theorem 3.1).

The bound is a lower bound whatever the scores are: a weak attack gives a loose (small)
bound, never an invalid one. When several guess counts are tried, the confidence is
split among them (Bonferroni), so picking the best afterwards stays valid.

The audit uses its OWN randomness for canaries and coin flips (``seed``); the training's
private randomness is ``noise_seed`` in ``synthesizer_kwargs`` (fresh OS entropy if unset).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import special, stats

from dpnf_jax.data.encode import discretize
from dpnf_jax.data.marginal import DPMarginalEncoder
from dpnf_jax.data.schema import CategoricalColumn, OrdinalColumn, Schema
from dpnf_jax.flows import model

CANARY_DESIGNS = ("uniform", "extreme")
_DESIGN_TEXT = {
    "uniform": (
        "each column drawn independently and uniformly from the PUBLIC schema (categories "
        "uniform, continuous values uniform over [lower, upper], rounded for integer columns); "
        "no missing values; all canaries distinct. Such rows are rare combinations far from "
        "the data (e.g. education and education-num disagree, fnlwgt up to 1.5M)."
    ),
    "extreme": (
        "categories uniform from the PUBLIC schema; every continuous value within the top or "
        "bottom 2% of its public range (side chosen at random per cell); no missing values; "
        "all canaries distinct."
    ),
}


# ----------------------------------------------------------------------------- the bound


def audit_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float = 0.0) -> float:
    """p-value of ``num_correct`` correct out of ``num_guesses`` under an (eps, delta)-DP null.

    ``P[Bin(r, q) >= v] + 2 m delta max_i P[v - i <= Bin(r, q) < v] / i`` with
    ``q = e^eps / (1 + e^eps)`` (Steinke, Nasr, Jagielski 2023, Theorem 5.2), capped at 1.
    """
    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = float(special.expit(epsilon))
    p = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta > 0 and v > 0:
        # partial[i-1] = P[v - i <= Bin < v] for i = 1..v
        partial = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(partial / np.arange(1, v + 1)))
        p += 2.0 * m * delta * alpha
    return min(p, 1.0)


def epsilon_lower_bound(
    num_canaries: int, num_guesses: int, num_correct: int, *, confidence: float = 0.95, delta: float = 0.0
) -> float:
    """Largest eps with p-value ``< 1 - confidence`` (0 if none): the audit's lower bound.

    With delta = 0 and all ``r`` guesses correct this is ``logit((1 - confidence)^(1/r))``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    pval = lambda e: audit_p_value(num_canaries, num_guesses, num_correct, e, delta)  # noqa: E731
    if num_guesses == 0 or pval(0.0) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while pval(high) < beta:  # terminates: the p-value tends to 1 as eps grows
        low, high = high, 2.0 * high
        if high > 1e4:
            return float("inf")
    for _ in range(60):
        mid = 0.5 * (low + high)
        if pval(mid) < beta:
            low = mid
        else:
            high = mid
        if high - low < 1e-9:
            break
    return low


# ----------------------------------------------------------------------------- canaries


def make_canaries(schema: Schema, num_canaries: int, design: str = "uniform", rng=None, like: pd.DataFrame | None = None) -> pd.DataFrame:
    """``num_canaries`` distinct schema-valid rows built from the PUBLIC schema only.

    ``like``: an optional frame whose column dtypes the canaries copy (only dtypes are read).
    """
    if design not in CANARY_DESIGNS:
        raise ValueError(f"canary_design must be one of {CANARY_DESIGNS}, got {design!r}")
    if not (isinstance(num_canaries, (int, np.integer)) and num_canaries >= 2):
        raise ValueError(f"num_canaries must be an integer >= 2, got {num_canaries!r}")
    rng = np.random.default_rng(rng)
    parts: list[pd.DataFrame] = []
    have = 0
    for _ in range(50):
        need = num_canaries - have
        cols: dict[str, Any] = {}
        for column in schema:
            if isinstance(column, (CategoricalColumn, OrdinalColumn)):
                idx = rng.integers(0, len(column.categories), size=need)
                cols[column.name] = [column.categories[i] for i in idx]
            else:
                lo, hi = column.lower, column.upper
                if design == "uniform":
                    u = rng.uniform(size=need)
                else:
                    side = rng.integers(0, 2, size=need)
                    u = np.where(side == 1, 1.0 - 0.02 * rng.uniform(size=need), 0.02 * rng.uniform(size=need))
                values = lo + u * (hi - lo)
                if column.integer:
                    values = np.clip(np.round(values), lo, hi).astype(np.int64)
                cols[column.name] = values
        parts.append(pd.DataFrame(cols))
        frame = pd.concat(parts, ignore_index=True).drop_duplicates(ignore_index=True)
        parts, have = [frame], len(frame)
        if have >= num_canaries:
            break
    else:
        raise ValueError(f"the schema does not allow {num_canaries} distinct canaries")
    out = parts[0].iloc[:num_canaries].reset_index(drop=True)
    if like is not None:
        for name in out.columns:
            if name in like.columns:
                try:
                    out[name] = out[name].astype(like[name].dtype)
                except (TypeError, ValueError):
                    pass
    out = out[list(schema.names)]
    schema.validate_frame(out)
    return out


# ----------------------------------------------------------------------------- scoring


def canary_scores(synth, canaries: pd.DataFrame, num_draws: int = 4) -> np.ndarray:
    """Model log-likelihood of each canary (higher = more likely a training row), [m].

    The flow log-density of the encoding, averaged over ``num_draws`` dequantisations;
    with the marginal encoding, plus the copula's marginal part
    ``sum_j [log p_bin_j - log phi(z_j)]``, so the score is the full model
    log-likelihood of the row's bins and within-bin positions (the DP histograms are
    part of the released model, so this is post-processing).
    """
    synth._require_fit()
    enc = synth.encoder
    fn = jax.jit(jax.vmap(lambda p, xi: model.log_prob(synth.config, p, xi), in_axes=(None, 0)))
    total = np.zeros(len(canaries))
    for draw in range(num_draws):
        z = enc.encode(canaries, np.random.default_rng([0xCA, draw]))
        lp = np.concatenate([np.asarray(fn(synth.params, jnp.asarray(z[i : i + 8192]))) for i in range(0, len(z), 8192)])
        if isinstance(enc, DPMarginalEncoder):
            lp = lp - np.sum(stats.norm.logpdf(z.astype(np.float64)), axis=1)
        total += lp
    score = total / num_draws
    if isinstance(enc, DPMarginalEncoder):
        codes = discretize(canaries, enc.schema, enc.n_bins)
        for i, column in enumerate(enc.schema):
            order = enc.level_order(i)
            position_of_code = np.empty_like(order)
            position_of_code[order] = np.arange(len(order))
            p = enc.bin_masses(i)
            score = score + np.log(p[position_of_code[codes[column.name].to_numpy()]])
    return np.nan_to_num(score, nan=-np.inf)


# ----------------------------------------------------------------------------- the audit


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit (JSON-able via :meth:`to_dict`).

    Attributes:
      epsilon_lower_bound: eps_hat, the audit's lower bound on epsilon at ``confidence``.
      accountant_epsilon: epsilon the accountant guarantees (None when trained without DP).
      delta: delta used in the bound (the training's delta; 0 for a non-private run).
      num_canaries: m.
      num_included: canaries actually inserted (coin flips).
      num_guesses: r of the guess count that gave the bound (k "in" + k "out").
      num_correct: v, correct guesses among them.
      confidence: 1 - beta.
      guess_counts_tried: every r tried (confidence Bonferroni-split among them).
      per_guess_count: [{"guesses", "correct", "epsilon_lower_bound"}] for every r tried.
      num_train_rows: real rows (without canaries).
      wall_seconds: wall time of the whole audit (canaries, training, scoring).
      design: the canary design, in words.
    """

    epsilon_lower_bound: float
    accountant_epsilon: float | None
    delta: float
    num_canaries: int
    num_included: int
    num_guesses: int
    num_correct: int
    confidence: float
    guess_counts_tried: tuple[int, ...]
    per_guess_count: tuple[dict, ...]
    num_train_rows: int
    wall_seconds: float
    design: str

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["guess_counts_tried"] = list(self.guess_counts_tried)
        d["per_guess_count"] = [dict(x) for x in self.per_guess_count]
        return d


def _guess_counts(guesses, m: int) -> tuple[int, ...]:
    if guesses is None:
        fractions = (0.05, 0.1, 0.25, 0.5, 1.0)
        counts = sorted({max(2, 2 * int(f * m // 2)) for f in fractions})
    else:
        values = [guesses] if isinstance(guesses, (int, np.integer)) else list(guesses)
        if not values:
            raise ValueError("guesses must name at least one guess count")
        for g in values:
            if not (isinstance(g, (int, np.integer)) and 2 <= g <= m and g % 2 == 0):
                raise ValueError(f"each guess count must be an even integer in [2, num_canaries={m}], got {g!r}")
        counts = sorted({int(g) for g in values})
    return tuple(c for c in counts if c <= m)


def audit(
    schema: Schema,
    train_df: pd.DataFrame,
    epsilon: float | None,
    *,
    num_canaries: int = 1000,
    canary_design: str = "uniform",
    synthesizer_kwargs: Mapping[str, Any] | None = None,
    seed: int | None = None,
    confidence: float = 0.95,
    guesses: int | Sequence[int] | None = None,
) -> AuditResult:
    """One-run privacy audit of :class:`DPFlowSynthesizer` (see the module docstring).

    Args:
      schema: the public schema (canaries come from it alone).
      train_df: the real training rows.
      epsilon: the synthesizer's budget; None audits training WITHOUT privacy.
      num_canaries: m, each included with probability 1/2.
      canary_design: "uniform" or "extreme" (see ``CANARY_DESIGNS``).
      synthesizer_kwargs: further DPFlowSynthesizer arguments (flow size, epochs,
        noise_seed, ...). ``delta`` defaults to ``min(1e-5, 0.1 / (N + m))``, fixed
        before the coins so it does not depend on how many canaries went in.
      seed: the audit's randomness (canaries, coins); None = fresh.
      confidence: 1 - beta of the lower bound.
      guesses: total guess count r (even: r/2 "in" + r/2 "out"), or several; default
        r in {5%, 10%, 25%, 50%, 100%} of m. With several, each is tested at
        confidence 1 - beta / (number tried) and the best bound is reported.
    """
    start = time.perf_counter()
    from dpnf_jax.synthesizer import DPFlowSynthesizer, default_delta

    if not isinstance(schema, Schema):
        raise TypeError(f"schema must be a dpnf_jax.Schema, got {type(schema).__name__}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not isinstance(train_df, pd.DataFrame) or len(train_df) == 0:
        raise ValueError("train_df must be a non-empty DataFrame")
    schema.validate_frame(train_df)
    m = num_canaries
    if not (isinstance(m, (int, np.integer)) and not isinstance(m, bool) and m >= 2):
        raise ValueError(f"num_canaries must be an integer >= 2, got {m!r}")
    m = int(m)
    counts = _guess_counts(guesses, m)
    kwargs = dict(synthesizer_kwargs or {})
    for reserved in ("schema", "epsilon"):
        if reserved in kwargs:
            raise ValueError(f"synthesizer_kwargs must not contain {reserved!r} (pass it to audit())")
    kwargs.setdefault("verbose", False)
    if kwargs.get("delta") is None:
        kwargs["delta"] = default_delta(len(train_df) + int(m))
    synth = DPFlowSynthesizer(schema, epsilon, **kwargs)  # validates the settings before any training

    rng = np.random.default_rng(seed)
    canaries = make_canaries(schema, m, canary_design, rng, like=train_df)
    include = rng.random(m) < 0.5
    data = pd.concat([train_df[list(schema.names)], canaries[include]], ignore_index=True)
    synth.fit(data)

    scores = canary_scores(synth, canaries)
    order = np.argsort(-scores, kind="stable")  # best score first
    delta = 0.0 if epsilon is None else float(synth.delta)
    level = 1.0 - (1.0 - confidence) / len(counts)
    rows, best = [], None
    for r in counts:
        k = r // 2
        correct = int(include[order[:k]].sum() + (~include[order[m - k :]]).sum())
        bound = epsilon_lower_bound(m, r, correct, confidence=level, delta=delta)
        rows.append({"guesses": r, "correct": correct, "epsilon_lower_bound": bound})
        if best is None or bound > best["epsilon_lower_bound"]:
            best = rows[-1]
    return AuditResult(
        epsilon_lower_bound=float(best["epsilon_lower_bound"]),
        accountant_epsilon=None if synth.report is None else float(synth.report.epsilon),
        delta=delta,
        num_canaries=int(m),
        num_included=int(include.sum()),
        num_guesses=int(best["guesses"]),
        num_correct=int(best["correct"]),
        confidence=float(confidence),
        guess_counts_tried=counts,
        per_guess_count=tuple(rows),
        num_train_rows=len(train_df),
        wall_seconds=time.perf_counter() - start,
        design=f"{canary_design}: {_DESIGN_TEXT[canary_design]} Scored by model log-likelihood; "
        f"top r/2 guessed in, bottom r/2 out.",
    )
