"""Normalizing-flow building blocks: RQ splines, LU linear layers, the conditional flow."""

from dpnf_jax.flows.model import ConditionalSplineFlow, FlowConfig

__all__ = ["ConditionalSplineFlow", "FlowConfig"]
