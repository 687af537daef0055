"""Machine-learning efficacy: train on synthetic, test on real (TSTR), next to train on real.

Two standard scikit-learn classifiers predict a target column from all the others:

* ``"logreg"``: `LogisticRegression` on one-hot categorical columns (the schema's
  levels, missing as its own level) and standardised numeric columns (continuous
  values and ordinal level indices; missing imputed by the median with an indicator).
* ``"hgb"``: `HistGradientBoostingClassifier` with native categorical support on the
  category codes; numeric missing values are left as NaN, which it handles natively.

The positive class is the target's last category in the schema (">50K" for Adult);
every other category is negative.

Fits run single-threaded: on shared cores (next to a JAX training run, or other jobs)
the OpenMP pool of gradient boosting slows down 10-50x, while a single-threaded fit on
the 32,561 Adult rows takes about half a second.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from threadpoolctl import threadpool_limits

from dpnf_jax.data.encode import n_codes
from dpnf_jax.data.schema import CategoricalColumn, ContinuousColumn, OrdinalColumn, Schema

MODELS = ("logreg", "hgb")
# HistGradientBoostingClassifier's limit on native categorical levels (max_bins).
_HGB_MAX_CATEGORIES = 255


def _features_and_labels(
    df: pd.DataFrame, schema: Schema, target: str, features: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a target value as (x [n, f] floats, positive-class indicator [n]).

    Category codes keep missing as their own level; numeric columns (continuous
    values, ordinal level indices) keep it as NaN.
    """
    parsed = schema.parse_frame(df)
    x = np.empty((len(df), len(features)))
    for j, name in enumerate(features):
        column, values = schema[name], parsed[name]
        if isinstance(column, CategoricalColumn):
            x[:, j] = np.where(values < 0, n_codes(column) - 1, values)
        elif isinstance(column, OrdinalColumn):
            x[:, j] = np.where(values < 0, np.nan, values)
        else:
            x[:, j] = values
    codes = parsed[target]
    has_target = codes >= 0
    return x[has_target], codes[has_target] == len(schema[target].categories) - 1


def _make_model(name: str, schema: Schema, features: list[str], seed: int) -> ClassifierMixin:
    categorical = [j for j, f in enumerate(features) if isinstance(schema[f], CategoricalColumn)]
    numeric = [j for j in range(len(features)) if j not in categorical]
    if name == "logreg":
        levels = [list(range(n_codes(schema[features[j]]))) for j in categorical]
        scale = make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler())
        preprocess = ColumnTransformer(
            [("onehot", OneHotEncoder(categories=levels), categorical), ("numeric", scale, numeric)]
        )
        return make_pipeline(preprocess, LogisticRegression(max_iter=2000))
    native = [j for j in categorical if n_codes(schema[features[j]]) <= _HGB_MAX_CATEGORIES]
    mask = np.isin(np.arange(len(features)), native)
    return HistGradientBoostingClassifier(categorical_features=mask, random_state=seed)


def _scores(probability: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """ROC AUC and accuracy (threshold 0.5) of positive-class probabilities [n]."""
    return {
        "auc": float(roc_auc_score(y_test, probability)),
        "accuracy": float(np.mean((probability >= 0.5) == y_test)),
    }


def _fit_and_score(
    name: str,
    schema: Schema,
    features: list[str],
    seed: int,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> dict[str, float]:
    if np.all(y_train == y_train[0]):
        # A classifier cannot be fitted on one class; the constant predictor it would
        # amount to has AUC 0.5.
        return _scores(np.full(len(y_test), float(y_train[0])), y_test)
    model = _make_model(name, schema, features, seed).fit(x_train, y_train)
    return _scores(model.predict_proba(x_test)[:, 1], y_test)


def tstr(
    real_train: pd.DataFrame,
    synth: pd.DataFrame,
    real_test: pd.DataFrame,
    schema: Schema,
    target: str,
    models: tuple[str, ...] = MODELS,
    seed: int = 0,
) -> dict:
    """Train-on-synthetic / test-on-real scores, next to train-on-real / test-on-real.

    Rows without a target value are dropped. A synthetic set whose target has a
    single class gets the constant predictor (AUC 0.5) and `synthetic_single_class`.

    Args:
      real_train: [n rows] the real rows the generator was trained on.
      synth: [m rows] synthetic rows.
      real_test: [t rows] real rows held out from training.
      schema: the public schema all frames fit.
      target: a categorical or ordinal column to predict.
      models: any of `MODELS`.
      seed: random state of the gradient-boosting model.

    Returns:
      `{"target", "positive_class", "n_synthetic", "n_real_train", "n_real_test",
      "positive_rate": {"synthetic", "real_train", "real_test"},
      "synthetic_single_class", "models": {name: {"tstr_auc", "tstr_accuracy",
      "trtr_auc", "trtr_accuracy"}}}`.

    Raises:
      ValueError: unknown target or model, a continuous target, an empty training
        set, or a test set with a single class.
    """
    if target not in schema:
        raise ValueError(f"target {target!r} is not a schema column (columns: {list(schema.names)})")
    if isinstance(schema[target], ContinuousColumn):
        raise ValueError(f"target {target!r} is continuous; TSTR needs a categorical or ordinal target")
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    features = [name for name in schema.names if name != target]
    splits = {}
    for split, df in (("synthetic", synth), ("real_train", real_train), ("real_test", real_test)):
        splits[split] = _features_and_labels(df, schema, target, features)
        if len(splits[split][1]) == 0:
            raise ValueError(f"the {split} frame has no rows with a value for target {target!r}")
    x_test, y_test = splits["real_test"]
    if np.all(y_test == y_test[0]):
        raise ValueError(f"the real test frame has a single class of {target!r}; AUC is undefined")
    results = {}
    with threadpool_limits(limits=1):
        for name in models:
            tstr_scores = _fit_and_score(name, schema, features, seed, *splits["synthetic"], x_test, y_test)
            trtr_scores = _fit_and_score(name, schema, features, seed, *splits["real_train"], x_test, y_test)
            results[name] = {
                "tstr_auc": tstr_scores["auc"],
                "tstr_accuracy": tstr_scores["accuracy"],
                "trtr_auc": trtr_scores["auc"],
                "trtr_accuracy": trtr_scores["accuracy"],
            }
    y_synth = splits["synthetic"][1]
    positive = schema[target].categories[-1]
    return {
        "target": target,
        "positive_class": positive,
        "n_synthetic": int(len(y_synth)),
        "n_real_train": int(len(splits["real_train"][1])),
        "n_real_test": int(len(y_test)),
        "positive_rate": {split: float(y.mean()) for split, (_, y) in splits.items()},
        "synthetic_single_class": bool(np.all(y_synth == y_synth[0])),
        "models": results,
    }
