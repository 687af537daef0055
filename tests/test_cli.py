"""The `dpnf` command line end to end on a small Adult subset, and its bad-input handling."""

import json
import math
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from report_numbers import numbers

from dpnf_jax.cli import main, read_csv
from dpnf_jax.datasets import adult_schema, load_adult

FAST = ["--epochs", "1", "--blocks", "2", "--hidden", "16", "--batch-size", "128", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train, test = load_adult()
    train.sample(1200, random_state=0).to_csv(root / "train.csv", index=False)
    test.head(400).to_csv(root / "test.csv", index=False)
    adult_schema().to_json(root / "schema.json")
    return root


@pytest.fixture(scope="module")
def trained(files):
    out = files / "run"
    args = ["train", "--data", str(files / "train.csv"), "--schema", str(files / "schema.json"),
            "--test", str(files / "test.csv"), "--target", "income", "--epsilon", "2", "--rows", "300",
            "--out", str(out), *FAST]
    assert main(args) == 0
    return out


def test_train_writes_everything(trained):
    assert {p.name for p in trained.iterdir()} == {"model", "synthetic.csv", "privacy.json", "schema.json", "report"}
    synthetic = pd.read_csv(trained / "synthetic.csv")
    assert len(synthetic) == 300 and list(synthetic.columns) == list(adult_schema().names)
    privacy = json.loads((trained / "privacy.json").read_text())
    assert privacy["private"] and privacy["epsilon"] <= 2.0
    report = trained / "report"
    assert {p.name for p in report.iterdir()} == {"metrics.json", "report.md", "marginals.png", "correlations.png"}
    metrics = json.loads((report / "metrics.json").read_text())
    values = list(numbers(metrics["summary"]))
    assert values and all(math.isfinite(x) for x in values)
    assert metrics["summary"]["tstr_auc_hgb"] is not None


def test_sample_and_evaluate(trained, files, tmp_path):
    out_csv = tmp_path / "s.csv"
    assert main(["sample", "--model", str(trained / "model"), "--rows", "50", "--out", str(out_csv), "--seed", "3"]) == 0
    first = pd.read_csv(out_csv)
    assert len(first) == 50
    assert main(["sample", "--model", str(trained / "model"), "--rows", "50", "--out", str(out_csv), "--seed", "3"]) == 0
    pd.testing.assert_frame_equal(first, pd.read_csv(out_csv))
    report = tmp_path / "report"
    assert main(["evaluate", "--real", str(files / "train.csv"), "--test", str(files / "test.csv"),
                 "--synthetic", str(trained / "synthetic.csv"), "--schema", str(files / "schema.json"),
                 "--target", "income", "--out", str(report), "--quiet"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert 0.0 <= metrics["summary"]["mean_tvd_1way"] <= 1.0


def test_privacy_command(capsys):
    assert main(["privacy", "--epsilon", "1", "--delta", "1e-5", "--rows", "32561", "--batch-size", "256",
                 "--epochs", "20", "--points", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2544
    assert result["epsilon_curve"][-1]["epsilon"] == pytest.approx(1.0, rel=0.01)
    assert [p["epsilon"] for p in result["epsilon_curve"]] == sorted(p["epsilon"] for p in result["epsilon_curve"])


def _write_bad_csv(files, tmp_path, change):
    df = pd.read_csv(files / "train.csv").head(200)
    change(df)
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda df: df.insert(0, "ssn", 1), "ssn"),
        (lambda df: df.pop("age"), "age"),
        (lambda df: df.__setitem__("age", ["old"] + list(df["age"][1:])), "age.*old"),
        (lambda df: df.__setitem__("race", ["Martian"] + list(df["race"][1:])), "race.*Martian"),
    ],
)
def test_bad_training_csv_exit_2_and_no_output(files, tmp_path, capsys, change, message):
    bad = _write_bad_csv(files, tmp_path, change)
    out = tmp_path / "out"
    code = main(["train", "--data", str(bad), "--schema", str(files / "schema.json"), "--out", str(out), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["privacy", "--epsilon", "0", "--delta", "1e-5", "--rows", "100", "--batch-size", "10", "--epochs", "1"],
    ["privacy", "--epsilon", "1", "--delta", "1.5", "--rows", "100", "--batch-size", "10", "--epochs", "1"],
    ["train", "--dataset", "adult", "--epsilon", "-1", "--out", "x"],
    ["sample", "--model", "m", "--rows", "0", "--out", "s.csv"],
])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_unwritable_out(files, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["train", "--data", str(files / "train.csv"), "--schema", str(files / "schema.json"),
                 "--out", str(blocker / "sub"), *FAST])
    assert code == 2
    assert "not writable" in capsys.readouterr().err


def test_corrupted_model_exit_2(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "dpnf_model.json").write_text("{broken")
    (model / "params.npz").write_bytes(b"")
    assert main(["sample", "--model", str(model), "--rows", "5", "--out", str(tmp_path / "s.csv")]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_failed_training_leaves_previous_output_intact(trained, files, tmp_path):
    before = (trained / "synthetic.csv").read_bytes()
    bad = _write_bad_csv(files, tmp_path, lambda df: df.insert(0, "extra", 0))
    assert main(["train", "--data", str(bad), "--schema", str(files / "schema.json"), "--out", str(trained), *FAST]) == 2
    assert (trained / "synthetic.csv").read_bytes() == before
    assert not [p for p in trained.iterdir() if p.name.startswith(".")]


def test_installed_entry_point_help():
    for command in ([], ["train"], ["sample"], ["evaluate"], ["privacy"]):
        result = subprocess.run([sys.executable, "-m", "dpnf_jax.cli", *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: dpnf" in result.stdout


def test_train_streams_a_parquet_file(files, trained, tmp_path, capsys):
    """`dpnf train --data x.parquet` streams the table in chunks; same histograms as the
    in-memory CSV run with the same noise seed; synthetic rows written in chunks. It is
    run over an earlier run's output, whose report/ (which a streamed run does not write)
    must not stay behind next to the new model."""
    pytest.importorskip("pyarrow")
    shutil.copytree(trained, tmp_path / "streamed")
    pd.read_csv(files / "train.csv", skipinitialspace=True).to_parquet(tmp_path / "train.parquet", row_group_size=300)
    common = ["--schema", str(files / "schema.json"), "--epsilon", "2", "--noise-seed", "5", *FAST]
    assert main(["train", "--data", str(tmp_path / "train.parquet"), "--chunk-rows", "256", "--prefetch-rows", "512",
                 "--rows", "250", "--out", str(tmp_path / "streamed"), *common]) == 0
    assert main(["train", "--data", str(files / "train.csv"), "--rows", "250", "--no-eval",
                 "--out", str(tmp_path / "memory"), *common]) == 0
    streamed = tmp_path / "streamed"
    assert {p.name for p in streamed.iterdir()} == {"model", "synthetic.csv", "privacy.json", "schema.json"}
    synthetic = read_csv(str(streamed / "synthetic.csv"), adult_schema(), "synthetic")
    assert len(synthetic) == 250
    adult_schema().validate_frame(synthetic)
    a, b = (json.loads((tmp_path / d / "model" / "dpnf_model.json").read_text()) for d in ("streamed", "memory"))
    assert a["encoder"]["noisy_counts"] == b["encoder"]["noisy_counts"]
    assert a["report"]["epsilon"] == b["report"]["epsilon"] <= 2.0
    privacy = json.loads((streamed / "privacy.json").read_text())
    assert 0 < privacy["scan_seconds"] <= privacy["fit_seconds"]  # the validating pass is timed apart
    assert "scan_seconds" not in json.loads((tmp_path / "memory" / "privacy.json").read_text())


def test_streamed_bad_row_exits_2_and_leaves_nothing(files, tmp_path, capsys):
    frame = pd.read_csv(files / "train.csv", skipinitialspace=True)
    frame.loc[1000, "workclass"] = "Astronaut"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    out = tmp_path / "out"
    code = main(["train", "--data", str(tmp_path / "bad.csv"), "--stream", "--chunk-rows", "300",
                 "--schema", str(files / "schema.json"), "--out", str(out), *FAST])
    assert code == 2
    message = capsys.readouterr().err
    assert "rows 900..1199" in message and "workclass" in message and "Astronaut" in message
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "127.0.0.1:1"], "all of --coordinator"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be in"),
])
def test_bad_distributed_flags_exit_2(files, tmp_path, capsys, argv, message):
    code = main(["train", "--data", str(files / "train.csv"), "--schema", str(files / "schema.json"),
                 "--out", str(tmp_path / "o"), *FAST, *argv])
    assert code == 2 and message in capsys.readouterr().err
