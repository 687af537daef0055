"""DPFlowSynthesizer: fit / sample / log_prob / save / load and the privacy report."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from dpnf_jax import DPFlowSynthesizer, Schema
from dpnf_jax.datasets import adult_schema, load_adult

SMALL = dict(num_blocks=2, hidden=(16,), epochs=1, batch_size=128, verbose=False)


@pytest.fixture(scope="module")
def adult_small():
    train, test = load_adult()
    return train.sample(1500, random_state=0).reset_index(drop=True), test.head(300)


@pytest.fixture(scope="module")
def fitted(adult_small):
    train, _ = adult_small
    return DPFlowSynthesizer(adult_schema(), epsilon=2.0, seed=1, **SMALL).fit(train)


def test_sample_matches_schema(fitted):
    rows = fitted.sample(400, seed=0)
    schema = adult_schema()
    assert list(rows.columns) == list(schema.names)
    assert len(rows) == 400
    schema.validate_frame(rows, strict=True)  # every value inside the public schema


def test_same_seed_same_rows_and_save_load_round_trip(fitted, tmp_path):
    first = fitted.sample(200, seed=7)
    pd.testing.assert_frame_equal(first, fitted.sample(200, seed=7))
    assert not first.equals(fitted.sample(200, seed=8))
    path = fitted.save(tmp_path / "model")
    loaded = DPFlowSynthesizer.load(path, verbose=False)
    pd.testing.assert_frame_equal(first, loaded.sample(200, seed=7))
    assert loaded.privacy_report() == fitted.privacy_report()


def test_save_holds_no_training_rows(fitted, adult_small, tmp_path):
    path = fitted.save(tmp_path / "model")
    meta = (path / "dpnf_model.json").read_text()
    train, _ = adult_small
    # fnlwgt values are near-unique identifiers of rows; none may appear in the artifact.
    assert not any(f'"{v}"' in meta or f" {v}," in meta for v in train["fnlwgt"].head(50))
    assert sorted(p.name for p in path.iterdir()) == ["dpnf_model.json", "params.npz"]


def test_save_replaces_atomically(fitted, tmp_path):
    target = tmp_path / "model"
    fitted.save(target)
    fitted.save(target)  # overwriting leaves exactly one complete model, no temporary dirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_log_prob_per_row_finite(fitted, adult_small):
    _, test = adult_small
    lp = fitted.log_prob(test)
    assert lp.shape == (len(test),) and np.all(np.isfinite(lp))


def test_privacy_report(fitted):
    report = fitted.privacy_report()
    assert report["private"] and report["guarantee_covers_schema"]
    assert report["epsilon"] <= 2.0 + 1e-9 and report["epsilon"] > 1.9
    assert report["delta"] == pytest.approx(min(1e-5, 0.1 / 1500))
    assert report["delta_source"].startswith("default")
    labels = [e["label"] for e in report["training"]["events"]]
    assert labels == ["marginal histograms", "dp-sgd"]
    json.dumps(report)


def test_nonprivate_schema_is_flagged(adult_small):
    train, _ = adult_small
    with pytest.warns(UserWarning):
        schema = Schema.infer_nonprivate(train)
    synth = DPFlowSynthesizer(schema, epsilon=1.0, encoding="ordinal", **SMALL).fit(train)
    report = synth.privacy_report()
    assert not report["guarantee_covers_schema"]
    assert any("does NOT cover the schema" in note for note in report["notes"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(epsilon=math.inf), "epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.5), "delta"),
        (dict(encoding="bogus"), "encoding"),
        (dict(marginal_share=1.0), "marginal_share"),
        (dict(num_bins=1), "num_bins"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPFlowSynthesizer(adult_schema(), **{"epsilon": 1.0, **kwargs})


def test_large_delta_warns(adult_small):
    train, _ = adult_small
    with pytest.warns(UserWarning, match="not below 1/N"):
        DPFlowSynthesizer(adult_schema(), epsilon=1.0, delta=0.01, encoding="ordinal", **SMALL).fit(train.head(300))


def test_bad_frame_names_column(adult_small):
    train, _ = adult_small
    bad = train.head(50).copy()
    bad.loc[3, "workclass"] = "Astronaut"
    with pytest.raises(ValueError, match="workclass.*Astronaut"):
        DPFlowSynthesizer(adult_schema(), epsilon=1.0, **SMALL).fit(bad)


def test_bad_sample_size(fitted):
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            fitted.sample(n)


def test_load_rejects_foreign_and_corrupted(fitted, tmp_path):
    with pytest.raises(ValueError, match="not a dpnf-jax model directory"):
        DPFlowSynthesizer.load(tmp_path)
    path = fitted.save(tmp_path / "model")
    (path / "params.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupted parameter file"):
        DPFlowSynthesizer.load(path)
    (path / "dpnf_model.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted model metadata"):
        DPFlowSynthesizer.load(path)
    (path / "dpnf_model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a dpnf-jax model"):
        DPFlowSynthesizer.load(path)


def test_unfitted_use_is_an_error():
    synth = DPFlowSynthesizer(adult_schema(), epsilon=1.0)
    with pytest.raises(RuntimeError, match="fit"):
        synth.sample(3)


def test_nonprivate_reference_has_no_guarantee(adult_small):
    train, _ = adult_small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        synth = DPFlowSynthesizer(adult_schema(), epsilon=None, **SMALL).fit(train)
    report = synth.privacy_report()
    assert not report["private"] and report["epsilon"] is None
    assert any("WITHOUT differential privacy" in n for n in report["notes"])
