"""Real-vs-synthetic plots as matplotlib `Figure`s on the Agg canvas (no pyplot, no display).

Figures are built with the object-oriented API and never registered with pyplot, so
they need no global backend switch and are freed with their last reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpnf_jax.data.encode import column_bins
from dpnf_jax.data.schema import ContinuousColumn, Schema
from dpnf_jax.evaluate.metrics import code_frequencies

REAL_COLOR = "#4c72b0"
SYNTH_COLOR = "#dd8452"
# Category tick labels are cut to this many characters to keep panels readable.
_LABEL_CHARS = 12


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _level_labels(column: Any) -> list[str]:
    labels = [str(c)[:_LABEL_CHARS] for c in column.categories]
    return labels + ["NA"] if column.nullable else labels


def _plot_levels(ax: Any, column: Any, real: np.ndarray, synth: np.ndarray) -> None:
    positions = np.arange(len(real))
    ax.bar(positions - 0.2, real, width=0.4, color=REAL_COLOR, label="real")
    ax.bar(positions + 0.2, synth, width=0.4, color=SYNTH_COLOR, label="synthetic")
    ax.set_xticks(positions, _level_labels(column), rotation=90, fontsize=max(4, 8 - len(real) // 10))


def _plot_continuous(
    ax: Any, column: ContinuousColumn, real: np.ndarray, synth: np.ndarray, n_bins: int
) -> str:
    """Histograms over the schema's bins; returns a caption with point-mass and missing shares."""
    edges = column_bins(column, n_bins)
    n_atoms = len(column.point_masses)
    bins = slice(n_atoms, n_atoms + len(edges) - 1)
    ax.stairs(real[bins], edges, fill=True, color=REAL_COLOR, alpha=0.6, label="real")
    ax.stairs(synth[bins], edges, color=SYNTH_COLOR, linewidth=1.5, label="synthetic")
    ax.tick_params(axis="x", labelsize=6)
    notes = [f"={atom:g}: {real[j]:.2f} / {synth[j]:.2f}" for j, atom in enumerate(column.point_masses)]
    if column.nullable:
        notes.append(f"NA: {real[-1]:.2f} / {synth[-1]:.2f}")
    return "; ".join(notes)


def plot_marginals(
    real: pd.DataFrame, synth: pd.DataFrame, schema: Schema, n_bins: int = 20, ncols: int = 4
) -> Figure:
    """Grid of real vs synthetic 1-way marginals, one panel per column.

    Categorical and ordinal columns are grouped bar charts; continuous columns are
    histograms over the schema's bins (shares of all rows), with the shares at each
    point mass and of missing values (real / synthetic) under the title.

    Args:
      real: [n rows] real frame.
      synth: [m rows] synthetic frame.
      schema: the public schema both frames fit.
      n_bins: bins per continuous column.
      ncols: panels per row.

    Returns:
      The figure.
    """
    real_freq = code_frequencies(real, schema, n_bins)
    synth_freq = code_frequencies(synth, schema, n_bins)
    nrows = math.ceil(len(schema) / ncols)
    figure = _new_figure(4.0 * ncols, 3.0 * nrows)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, column in zip(axes, schema):
        real_p, synth_p = real_freq[column.name], synth_freq[column.name]
        if isinstance(column, ContinuousColumn):
            caption = _plot_continuous(ax, column, real_p, synth_p, n_bins)
            ax.set_title(f"{column.name}\n{caption}" if caption else column.name, fontsize=8)
        else:
            _plot_levels(ax, column, real_p, synth_p)
            ax.set_title(column.name, fontsize=8)
        ax.tick_params(axis="y", labelsize=6)
    for ax in axes[len(schema) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    return figure


def plot_correlations(correlation: Mapping[str, Any]) -> Figure:
    """Real, synthetic and real - synthetic association matrices side by side.

    Args:
      correlation: `metrics.correlation_difference` output ("columns", "real",
        "synthetic", "mean_abs_difference").

    Returns:
      The figure.
    """
    names = list(correlation["columns"])
    real = np.asarray(correlation["real"])
    synth = np.asarray(correlation["synthetic"])
    panels = (
        ("real", real),
        ("synthetic", synth),
        (f"real - synthetic (mean |diff| {correlation['mean_abs_difference']:.3f})", real - synth),
    )
    size = max(4.0, 0.35 * len(names) + 2.0)
    figure = _new_figure(3 * size, size)
    axes = figure.subplots(1, 3)
    for ax, (title, matrix) in zip(axes, panels):
        image = ax.imshow(matrix, cmap="coolwarm", vmin=-1.0, vmax=1.0)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
    figure.colorbar(image, ax=list(axes), shrink=0.8)
    return figure
