"""Checkpoint and resume: a killed run resumes to the uninterrupted run's result and budget."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dpnf_jax.flows.model import FlowConfig
from dpnf_jax.train import dp_fit

CONFIG = FlowConfig(dim=3, num_blocks=2, hidden=(8,))
FIT = dict(epsilon=2.0, delta=1e-4, epochs=2, batch_size=50, seed=3, noise_seed=11, verbose=False)


def _data(n=500, seed=0):
    return np.random.default_rng(seed).normal(size=(n, CONFIG.dim)).astype(np.float32)


def _assert_same_params(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_resume_in_process_equals_uninterrupted(tmp_path):
    x = _data()
    reference, reference_report = dp_fit(CONFIG, x, **FIT)
    steps_seen = []

    def stop_after_seven(step, params, nll):
        steps_seen.append(step)
        if step == 6:
            raise KeyboardInterrupt  # a crash right after the checkpoint at step 5 and one more step

    with pytest.raises(KeyboardInterrupt):
        dp_fit(CONFIG, x, **FIT, checkpoint_dir=tmp_path / "ck", checkpoint_every=5, callback=stop_after_seven)
    meta = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert meta["step"] == 5
    # It holds the secret noise seed: readable by its owner only.
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "ck").iterdir()} == {0o600}
    resumed, report = dp_fit(CONFIG, x, **FIT, checkpoint_dir=tmp_path / "ck", checkpoint_every=5, resume=True)
    _assert_same_params(reference, resumed)
    assert report.epsilon == reference_report.epsilon
    assert report.noise_multiplier == reference_report.noise_multiplier
    assert report.steps == reference_report.steps


def test_resume_refuses_changed_privacy_settings_or_data(tmp_path):
    x = _data()
    dp_fit(CONFIG, x, **{**FIT, "epochs": 0.5}, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    with pytest.raises(ValueError, match="epsilon"):
        dp_fit(CONFIG, x, **{**FIT, "epochs": 0.5, "epsilon": 3.0}, checkpoint_dir=tmp_path / "ck", resume=True)
    with pytest.raises(ValueError, match="epochs"):
        dp_fit(CONFIG, x, **{**FIT, "epochs": 5}, checkpoint_dir=tmp_path / "ck", resume=True)
    with pytest.raises(ValueError, match="data"):
        dp_fit(CONFIG, _data(seed=1), **{**FIT, "epochs": 0.5}, checkpoint_dir=tmp_path / "ck", resume=True)


def test_finished_checkpoint_resumes_to_the_same_result_without_new_steps(tmp_path):
    x = _data()
    first, report = dp_fit(CONFIG, x, **{**FIT, "epochs": 0.5}, checkpoint_dir=tmp_path / "ck", checkpoint_every=100)
    calls = []
    again, report_again = dp_fit(CONFIG, x, **{**FIT, "epochs": 0.5}, checkpoint_dir=tmp_path / "ck", resume=True,
                                 callback=lambda *a: calls.append(a))
    assert calls == []  # no step is run twice
    _assert_same_params(first, again)
    assert report_again.epsilon == report.epsilon


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    x = _data()
    a, _ = dp_fit(CONFIG, x, **{**FIT, "epochs": 0.2})
    b, _ = dp_fit(CONFIG, x, **{**FIT, "epochs": 0.2}, checkpoint_dir=tmp_path / "none", resume=True)
    _assert_same_params(a, b)


def test_synthesizer_resume_refuses_another_schema_or_other_schema_events(tmp_path):
    """The checkpoint's prior events are reused, not spent again: a resume under other
    schema events would report events the spent epsilon does not include."""
    import dp_accounting

    from dpnf_jax import DPFlowSynthesizer, Schema
    from dpnf_jax.datasets import adult_schema, load_adult

    rows = load_adult()[0].head(300)
    options = dict(delta=1e-4, num_blocks=1, hidden=(4,), epochs=0.5, batch_size=100, noise_seed=1, verbose=False)
    events = [("schema discovery", dp_accounting.GaussianDpEvent(40.0))]
    ck = tmp_path / "ck"
    DPFlowSynthesizer(adult_schema(), 2.0, schema_events=events, **options).fit(rows, checkpoint_dir=ck,
                                                                                checkpoint_every=1)
    with pytest.raises(ValueError, match="other schema_events"):
        DPFlowSynthesizer(adult_schema(), 2.0, **options).fit(rows, checkpoint_dir=ck, resume=True)
    wider = adult_schema().to_dict()
    age = next(c for c in wider["columns"] if c["name"] == "age")
    age["upper"] = age["upper"] + 10
    with pytest.raises(ValueError, match="another schema"):
        DPFlowSynthesizer(Schema.from_dict(wider), 2.0, schema_events=events, **options).fit(
            rows, checkpoint_dir=ck, resume=True)
    resumed = DPFlowSynthesizer(adult_schema(), 2.0, schema_events=events, **options).fit(rows, checkpoint_dir=ck,
                                                                                          resume=True)
    assert resumed.privacy_report()["epsilon"] <= 2.0


def _train_cmd(files, out, *extra):
    return [sys.executable, "-m", "dpnf_jax.cli", "train", "--data", str(files / "train.csv"),
            "--schema", str(files / "schema.json"), "--out", str(out), "--epochs", "6", "--batch-size", "100",
            "--blocks", "2", "--hidden", "8", "--no-eval", "--quiet", "--rows", "50", "--noise-seed", "5", *extra]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from dpnf_jax.datasets import adult_schema, load_adult

    root = tmp_path_factory.mktemp("ckpt")
    train, _ = load_adult()
    train.sample(800, random_state=1).to_csv(root / "train.csv", index=False)
    adult_schema().to_json(root / "schema.json")
    return root


def test_sigkill_then_resume_matches_uninterrupted_run(files, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    # (checkpointing changes nothing in the result; --keep-checkpoint keeps it after the run)
    subprocess.run(_train_cmd(files, reference, "--checkpoint-every", "100", "--keep-checkpoint"), check=True, env=env,
                   timeout=300)
    assert (reference / "checkpoint" / "checkpoint.json").is_file()

    out = tmp_path / "killed"
    process = subprocess.Popen(_train_cmd(files, out, "--checkpoint-every", "4"), env=env)
    meta_path = out / "checkpoint" / "checkpoint.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if meta_path.is_file() and json.loads(meta_path.read_text())["step"] >= 8:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed; make it longer"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (out / "synthetic.csv").exists()  # nothing published by the killed run
    killed_at = json.loads(meta_path.read_text())["step"]

    subprocess.run(_train_cmd(files, out, "--checkpoint-every", "4", "--resume"), check=True, env=env, timeout=300)
    privacy = json.loads((out / "privacy.json").read_text())
    privacy_reference = json.loads((reference / "privacy.json").read_text())
    assert privacy["epsilon"] == privacy_reference["epsilon"]
    assert privacy["training"]["noise_multiplier"] == privacy_reference["training"]["noise_multiplier"]
    assert privacy["training"]["steps"] == privacy_reference["training"]["steps"] > killed_at
    ours = np.load(out / "model" / "params.npz")
    theirs = np.load(reference / "model" / "params.npz")
    assert sorted(ours.files) == sorted(theirs.files)
    for name in ours.files:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert (out / "synthetic.csv").read_bytes() == (reference / "synthetic.csv").read_bytes()
    assert not (out / "checkpoint").exists()  # deleted once the run is done: it holds the noise seed
    again = subprocess.run(_train_cmd(files, out, "--resume"), env=env, timeout=300, capture_output=True, text=True)
    assert again.returncode == 2 and "holds a finished run" in again.stderr  # no second, unaccounted run
