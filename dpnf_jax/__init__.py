"""dpnf_jax: differentially private synthetic tables with normalizing flows in JAX.

A reimplementation of DP-HFlow (Lee, Kim, Jeong, Ro, AAAI 2022): a public schema,
a conditional rational-quadratic spline flow with one shared conditioner, DP-SGD with
Poisson sampling, exact (vmap) and analytic fast per-example clipping, and
dp-accounting for the budget.

Subpackages: ``data`` (schema, encoders, datasets), ``flows``, ``privacy``,
``evaluate`` (imported on first use: it pulls in scikit-learn and matplotlib).
"""

import importlib

from dpnf_jax import datasets, privacy
from dpnf_jax.data.encode import TabularEncoder
from dpnf_jax.data.marginal import DPMarginalEncoder
from dpnf_jax.data.schema import CategoricalColumn, ContinuousColumn, OrdinalColumn, Schema
from dpnf_jax.data.stream import TableFile
from dpnf_jax.flows.model import ConditionalSplineFlow, FlowConfig
from dpnf_jax.synthesizer import DPFlowSynthesizer
from dpnf_jax.train import DPReport, dp_fit, fit_nonprivate

__version__ = "0.1.0"

__all__ = [
    "CategoricalColumn",
    "ConditionalSplineFlow",
    "ContinuousColumn",
    "DPFlowSynthesizer",
    "DPMarginalEncoder",
    "DPReport",
    "FlowConfig",
    "OrdinalColumn",
    "Schema",
    "TableFile",
    "TabularEncoder",
    "datasets",
    "dp_fit",
    "evaluate",
    "fit_nonprivate",
    "privacy",
]


def __getattr__(name: str):
    if name == "evaluate":
        return importlib.import_module("dpnf_jax.evaluate")
    raise AttributeError(f"module 'dpnf_jax' has no attribute {name!r}")
