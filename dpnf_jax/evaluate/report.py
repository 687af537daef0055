"""One call for every metric (`evaluate_synthetic`) and a report on disk (`write_report`)."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dpnf_jax.data.schema import Schema
from dpnf_jax.evaluate.metrics import (
    correlation_difference,
    distance_to_closest_record,
    ks_statistics,
    marginal_tvd,
    pairwise_tvd,
)
from dpnf_jax.evaluate.plots import plot_correlations, plot_marginals
from dpnf_jax.evaluate.utility import MODELS, tstr
from dpnf_jax.fileio import atomic_write

_WORST_SHOWN = 5


def _mean(values: Mapping[str, float]) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


def _max(values: Mapping[str, float]) -> float | None:
    return float(max(values.values())) if values else None


def evaluate_synthetic(
    real_train: pd.DataFrame,
    synth: pd.DataFrame,
    schema: Schema,
    real_test: pd.DataFrame | None = None,
    target: str | None = None,
    n_bins: int = 20,
    heldout_log_likelihood: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """All fidelity, utility and privacy-diagnostic metrics of a synthetic frame.

    With `real_test`, the same TVDs of `real_test` against `real_train` are reported
    as the sampling-noise floor (`real_test_mean_tvd_*`), DCR compares synthetic rows
    with the test rows, and with a `target` too, TSTR is run.

    Args:
      real_train: [n rows] the rows the generator was trained on.
      synth: [m rows] synthetic rows.
      schema: the public schema all frames fit.
      real_test: optional [t rows] real rows held out from training.
      target: optional column for TSTR (needs `real_test`).
      n_bins: bins per continuous column for TVDs.
      heldout_log_likelihood: optional mean log-likelihood of held-out rows under
        the generator (flows compute it), copied into the result.
      seed: seed of the DCR row sample and of the gradient-boosting model.

    Returns:
      JSON-ready dict: "summary" (flat, fixed keys, None where not computed),
      "n_bins", "n_real_train", "n_synthetic", "n_real_test", "tvd_1way",
      "tvd_2way", "correlation", "ks", "dcr", "tstr" (or None),
      "heldout_log_likelihood" and "timings_s" (seconds per metric).

    Raises:
      ValueError: a `target` without `real_test`.
    """
    if target is not None and real_test is None:
        raise ValueError("TSTR needs a real test frame: pass real_test together with target")
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        return result

    tvd_1way = timed("tvd_1way", lambda: marginal_tvd(real_train, synth, schema, n_bins))
    tvd_2way = timed("tvd_2way", lambda: pairwise_tvd(real_train, synth, schema, n_bins))
    correlation = timed("correlation", lambda: correlation_difference(real_train, synth, schema))
    ks = timed("ks", lambda: ks_statistics(real_train, synth, schema))
    dcr = timed(
        "dcr", lambda: distance_to_closest_record(real_train, synth, schema, holdout=real_test, seed=seed)
    )
    summary: dict[str, Any] = {
        "mean_tvd_1way": _mean(tvd_1way),
        "max_tvd_1way": _max(tvd_1way),
        "mean_tvd_2way": _mean(tvd_2way),
        "max_tvd_2way": _max(tvd_2way),
        "corr_diff": correlation["mean_abs_difference"],
        "mean_ks": _mean(ks),
        "max_ks": _max(ks),
    }
    utility = None
    if target is not None:
        utility = timed("tstr", lambda: tstr(real_train, synth, real_test, schema, target, seed=seed))
    for model in MODELS:
        scores = utility["models"][model] if utility is not None else {}
        for key in ("tstr_auc", "tstr_accuracy", "trtr_auc", "trtr_accuracy"):
            summary[f"{key}_{model}"] = scores.get(key)
    summary["dcr_median_synthetic"] = dcr["synthetic"]["q50"]
    summary["dcr_exact_match_rate_synthetic"] = dcr["synthetic"]["exact_match_rate"]
    summary["dcr_median_holdout"] = dcr["holdout"]["q50"] if dcr["holdout"] else None
    summary["real_test_mean_tvd_1way"] = None
    summary["real_test_mean_tvd_2way"] = None
    if real_test is not None:
        floor_1way = timed("real_test_tvd_1way", lambda: marginal_tvd(real_train, real_test, schema, n_bins))
        floor_2way = timed("real_test_tvd_2way", lambda: pairwise_tvd(real_train, real_test, schema, n_bins))
        summary["real_test_mean_tvd_1way"] = _mean(floor_1way)
        summary["real_test_mean_tvd_2way"] = _mean(floor_2way)
    if heldout_log_likelihood is not None:
        heldout_log_likelihood = float(heldout_log_likelihood)
    summary["heldout_log_likelihood"] = heldout_log_likelihood
    return {
        "privacy_note": NOT_PRIVATE_NOTE,
        "summary": summary,
        "n_bins": int(n_bins),
        "n_real_train": len(real_train),
        "n_synthetic": len(synth),
        "n_real_test": None if real_test is None else len(real_test),
        "tvd_1way": tvd_1way,
        "tvd_2way": tvd_2way,
        "correlation": correlation,
        "ks": ks,
        "dcr": dcr,
        "tstr": utility,
        "heldout_log_likelihood": heldout_log_likelihood,
        "timings_s": timings,
    }


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _worst(values: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted(values.items(), key=lambda item: -item[1])[:_WORST_SHOWN]


NOT_PRIVATE_NOTE = (
    "This report compares the synthetic rows with the real rows, so its numbers and plots "
    "(marginals, correlations, distances to closest records) are statistics of the private data "
    "that no privacy budget covers. Share the model and the synthetic rows, not this report."
)


def _markdown(metrics: Mapping[str, Any], title: str) -> str:
    summary = metrics["summary"]
    lines = [
        f"# {title}",
        "",
        f"> **Not private.** {NOT_PRIVATE_NOTE}",
        "",
        f"Real training rows: {metrics['n_real_train']}, synthetic rows: {metrics['n_synthetic']}, "
        f"real test rows: {_fmt(metrics['n_real_test'])}; continuous columns in {metrics['n_bins']} bins.",
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {_fmt(value)} |" for key, value in summary.items()),
        "",
        "## Worst marginals (TVD)",
        "",
        "| marginal | column(s) | TVD |",
        "|---|---|---|",
        *(f"| 1-way | {name} | {value:.4f} |" for name, value in _worst(metrics["tvd_1way"])),
        *(f"| 2-way | {name} | {value:.4f} |" for name, value in _worst(metrics["tvd_2way"])),
        "",
    ]
    utility = metrics.get("tstr")
    if utility is not None:
        rates = ", ".join(f"{split} {rate:.3f}" for split, rate in utility["positive_rate"].items())
        flag = ""
        if utility["synthetic_single_class"]:
            flag = " The synthetic target has a single class (constant predictor)."
        lines += [
            f"## Train on synthetic, test on real (target {utility['target']!r}, "
            f"positive class {utility['positive_class']!r})",
            "",
            "| model | TSTR AUC | TRTR AUC | TSTR accuracy | TRTR accuracy |",
            "|---|---|---|---|---|",
            *(
                f"| {name} | {s['tstr_auc']:.4f} | {s['trtr_auc']:.4f} "
                f"| {s['tstr_accuracy']:.4f} | {s['trtr_accuracy']:.4f} |"
                for name, s in utility["models"].items()
            ),
            "",
            f"Positive rates: {rates}.{flag}",
            "",
        ]
    dcr = metrics["dcr"]
    holdout = dcr["holdout"]
    lines += [
        "## Distance to closest record",
        "",
        f"Median distance to the closest training row: synthetic {dcr['synthetic']['q50']:.4f}"
        + (f", real holdout {holdout['q50']:.4f}" if holdout else "")
        + f"; exact copies among synthetic rows: {dcr['synthetic']['exact_match_rate']:.4f}. {dcr['note']}",
        "",
        "## Plots",
        "",
        "![marginals](marginals.png)",
        "",
        "![correlations](correlations.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(
    metrics: Mapping[str, Any],
    real_train: pd.DataFrame,
    synth: pd.DataFrame,
    schema: Schema,
    out_dir: str | os.PathLike,
    title: str = "Synthetic data report",
) -> list[Path]:
    """Writes metrics.json, report.md, marginals.png and correlations.png to `out_dir`.

    Each file is written to a temporary file and moved into place with `os.replace`,
    so a reader never sees a half-written file; `out_dir` is created if needed.

    Args:
      metrics: `evaluate_synthetic` output.
      real_train: the real frame the metrics compared against.
      synth: the synthetic frame.
      schema: the public schema.
      out_dir: output directory.
      title: report title.

    Returns:
      The written paths: metrics.json, report.md, marginals.png, correlations.png.

    Raises:
      ValueError: `metrics` holds a NaN or infinite number (not valid JSON).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics.json": json.dumps(metrics, indent=2, allow_nan=False).encode("utf-8"),
        "report.md": _markdown(metrics, title).encode("utf-8"),
        "marginals.png": _png(plot_marginals(real_train, synth, schema, n_bins=metrics["n_bins"])),
        "correlations.png": _png(plot_correlations(metrics["correlation"])),
    }
    paths = []
    for name, data in files.items():
        atomic_write(out / name, data)
        paths.append(out / name)
    return paths
