"""Utility vs epsilon on Adult: DP flows, a non-private flow, and DP independent marginals.

For each epsilon and seed: train a DPFlowSynthesizer on the Adult train split, sample as
many rows, and score them against the test split (TSTR AUC, 1-/2-way TVD). The DP
independent-marginals baseline (Gaussian noise on all 1-way histograms, same epsilon and
delta) is scored the same way. Writes ``results.json``, ``results.md`` (a table of means
and standard deviations over seeds) and ``utility_vs_epsilon.png``.

Usage::

    python scripts/adult_sweep.py --out runs/sweep --seeds 0 1 2
    python scripts/adult_sweep.py --out runs/sweep --epsilons 1 --seeds 0 --encodings marginal onehot

Tuning on private data costs privacy: this sweep tunes on Adult, a public dataset, and
the chosen defaults are public choices.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np

from dpnf_jax import DPFlowSynthesizer, evaluate
from dpnf_jax.datasets import adult_schema, load_adult
from dpnf_jax.fileio import atomic_write

METRICS = ("tstr_auc_hgb", "tstr_auc_logreg", "mean_tvd_1way", "mean_tvd_2way", "corr_diff")


def score(train, synthetic, test, schema, seed: int) -> dict[str, float]:
    summary = {}
    tvd1 = evaluate.marginal_tvd(train, synthetic, schema)
    tvd2 = evaluate.pairwise_tvd(train, synthetic, schema)
    summary["mean_tvd_1way"] = float(np.mean(list(tvd1.values())))
    summary["mean_tvd_2way"] = float(np.mean(list(tvd2.values())))
    summary["corr_diff"] = float(evaluate.correlation_difference(train, synthetic, schema)["mean_abs_difference"])
    utility = evaluate.tstr(train, synthetic, test, schema, "income", seed=seed)
    for model, scores in utility["models"].items():
        summary[f"tstr_auc_{model}"] = float(scores["tstr_auc"])
        summary[f"trtr_auc_{model}"] = float(scores["trtr_auc"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--encodings", nargs="+", default=["marginal"], choices=["marginal", "onehot", "ordinal"])
    parser.add_argument("--nonprivate", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--epochs", type=float, default=None, help="override the synthesizer default")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--hidden", type=int, nargs="+", default=None)
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--num-bins", type=int, default=None)
    parser.add_argument("--from-json", help="re-render the table and plot from an earlier results.json")
    args = parser.parse_args()
    if args.from_json:
        runs = json.loads(Path(args.from_json).read_text())["runs"]
        atomic_write(Path(args.out) / "results.md", summarize(runs))
        plot(runs, Path(args.out) / "utility_vs_epsilon.png")
        print(summarize(runs))
        return
    warnings.filterwarnings("ignore", category=UserWarning)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_adult()
    schema = adult_schema()
    overrides = {
        k: v
        for k, v in dict(
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
            hidden=None if args.hidden is None else tuple(args.hidden), num_blocks=args.blocks, num_bins=args.num_bins,
        ).items()
        if v is not None
    }
    runs = []
    settings = [(enc, eps) for enc in args.encodings for eps in args.epsilons]
    if args.nonprivate:
        settings += [(enc, None) for enc in args.encodings]
    for encoding, epsilon in settings:
        for seed in args.seeds:
            started = time.perf_counter()
            synth = DPFlowSynthesizer(schema, epsilon, encoding=encoding, seed=seed, verbose=False, **overrides).fit(train)
            fit_seconds = time.perf_counter() - started
            synthetic = synth.sample(len(train), seed=seed)
            row = {"method": f"flow-{encoding}", "epsilon": epsilon, "seed": seed, "fit_seconds": fit_seconds,
                   **score(train, synthetic, test, schema, seed)}
            runs.append(row)
            print(json.dumps(row), flush=True)
    for epsilon in args.epsilons:
        for seed in args.seeds:
            delta = min(1e-5, 0.1 / len(train))
            synthetic, _ = evaluate.independent_marginals_sample(train, schema, len(train), epsilon, delta, seed)
            row = {"method": "independent-marginals", "epsilon": epsilon, "seed": seed, "fit_seconds": 0.0,
                   **score(train, synthetic, test, schema, seed)}
            runs.append(row)
            print(json.dumps(row), flush=True)

    atomic_write(out / "results.json", json.dumps({"overrides": overrides, "runs": runs}, indent=2))
    table = summarize(runs)
    atomic_write(out / "results.md", table)
    plot(runs, out / "utility_vs_epsilon.png")
    print(table)


def _groups(runs):
    keys = sorted({(r["method"], r["epsilon"]) for r in runs}, key=lambda k: (k[0], float("inf") if k[1] is None else k[1]))
    for method, epsilon in keys:
        yield method, epsilon, [r for r in runs if r["method"] == method and r["epsilon"] == epsilon]


def summarize(runs) -> str:
    lines = [
        "| method | epsilon | seeds | " + " | ".join(METRICS) + " | fit s |",
        "|---|---:|---:|" + "---:|" * (len(METRICS) + 1),
    ]
    for method, epsilon, group in _groups(runs):
        cells = []
        for metric in METRICS:
            values = np.array([r[metric] for r in group])
            cells.append(f"{values.mean():.4f} ± {values.std():.4f}")
        eps = "non-private" if epsilon is None else f"{epsilon:g}"
        fit = np.mean([r["fit_seconds"] for r in group])
        lines.append(f"| {method} | {eps} | {len(group)} | " + " | ".join(cells) + f" | {fit:.0f} |")
    return "\n".join(lines) + "\n"


def plot(runs, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    for ax, metric, label in zip(axes, ("tstr_auc_hgb", "mean_tvd_1way", "mean_tvd_2way"),
                                 ("TSTR ROC AUC (gradient boosting)", "mean 1-way TVD", "mean 2-way TVD")):
        methods = sorted({r["method"] for r in runs})
        for method in methods:
            points = [(e, g) for m, e, g in _groups(runs) if m == method and e is not None]
            if points:
                eps = [e for e, _ in points]
                means = [np.mean([r[metric] for r in g]) for _, g in points]
                stds = [np.std([r[metric] for r in g]) for _, g in points]
                ax.errorbar(eps, means, yerr=stds, marker="o", capsize=3, label=method)
            reference = [g for m, e, g in _groups(runs) if m == method and e is None]
            if reference:
                ax.axhline(np.mean([r[metric] for r in reference[0]]), linestyle="--", color="gray",
                           label=f"{method} (non-private)")
        ax.set_xscale("log")
        ticks = sorted({r["epsilon"] for r in runs if r["epsilon"] is not None})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("epsilon")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())


if __name__ == "__main__":
    main()
