"""Evaluation of synthetic tables: fidelity, ML efficacy, privacy diagnostics, plots, reports.

>>> from dpnf_jax import evaluate
>>> from dpnf_jax.datasets import adult_schema, load_adult
>>> train, test = load_adult()
>>> tvd = evaluate.marginal_tvd(train, train, adult_schema())
>>> max(tvd.values())
0.0
"""

from dpnf_jax.evaluate.baselines import gaussian_noise_multiplier, independent_marginals_sample
from dpnf_jax.evaluate.metrics import (
    ASSOCIATION_METHOD,
    DCR_NOTE,
    association_matrix,
    code_frequencies,
    correlation_difference,
    distance_to_closest_record,
    ks_statistic,
    ks_statistics,
    marginal_tvd,
    pairwise_tvd,
    scaled_encoding,
)
from dpnf_jax.evaluate.plots import plot_correlations, plot_marginals
from dpnf_jax.evaluate.report import evaluate_synthetic, write_report
from dpnf_jax.evaluate.utility import MODELS, tstr

__all__ = [
    "ASSOCIATION_METHOD",
    "DCR_NOTE",
    "MODELS",
    "association_matrix",
    "code_frequencies",
    "correlation_difference",
    "distance_to_closest_record",
    "evaluate_synthetic",
    "gaussian_noise_multiplier",
    "independent_marginals_sample",
    "ks_statistic",
    "ks_statistics",
    "marginal_tvd",
    "pairwise_tvd",
    "plot_correlations",
    "plot_marginals",
    "scaled_encoding",
    "tstr",
    "write_report",
]
