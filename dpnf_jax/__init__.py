"""dpnf_jax: differentially private synthetic tables with normalizing flows in JAX."""

__version__ = "0.1.0"
