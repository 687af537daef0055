"""Differential privacy: clipping strategies, per-example gradients, sampling, accounting.

>>> from dpnf_jax import privacy
>>> clipper = privacy.PerUnitClipping(l2_clip=1.0, granularity="neuron")
>>> clipper.sensitivity()
1.0
"""

from dpnf_jax.privacy.accounting import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    dpsgd_epsilon,
    dpsgd_event,
    epsilon_curve,
    epsilon_of_events,
)
from dpnf_jax.privacy.clipped import ClippedGradSum, clipped_grad_sum
from dpnf_jax.privacy.clipping import (
    FlatClipping,
    PerUnitClipping,
    StochasticSparsification,
    clipper_from_dict,
)
from dpnf_jax.privacy.sampling import PoissonSampler, poisson_sample, shard_bounds, steps_for_epochs


def __getattr__(name: str):
    # train.py imports this package, so dp_fit is resolved on first use.
    if name == "dp_fit":
        from dpnf_jax.train import dp_fit

        return dp_fit
    raise AttributeError(f"module 'dpnf_jax.privacy' has no attribute {name!r}")


__all__ = [
    "ClippedGradSum",
    "FlatClipping",
    "PerUnitClipping",
    "PoissonSampler",
    "PrivacyLedger",
    "StochasticSparsification",
    "calibrate_noise_multiplier",
    "clipped_grad_sum",
    "clipper_from_dict",
    "dp_fit",
    "dpsgd_epsilon",
    "dpsgd_event",
    "epsilon_curve",
    "epsilon_of_events",
    "poisson_sample",
    "shard_bounds",
    "steps_for_epochs",
]
