"""Metrics against numpy/scipy; subject-level metrics by hand; the scoring CLI via subprocess."""
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr

from utils.metrics import PredictionFileError, mae, pearson, read_prediction_csv, rmse, score, subject_scores

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^MAE \d+\.\d{8} PC -?\d+\.\d{9} RMSE \d+\.\d{9}$")


def test_metrics_match_numpy_scipy():
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 100, 500)
    pred = true + rng.normal(0, 7, 500)
    got = score(pred, true)
    assert got["MAE"] == pytest.approx(np.abs(pred - true).mean(), rel=1e-12)
    assert got["RMSE"] == pytest.approx(np.sqrt(((pred - true) ** 2).mean()), rel=1e-12)
    assert got["PC"] == pytest.approx(pearsonr(pred, true)[0], rel=1e-10)
    assert mae(pred, true) == got["MAE"] and rmse(pred, true) == got["RMSE"] and pearson(pred, true) == got["PC"]


def test_constant_predictions_give_nan_pearson():
    assert math.isnan(pearson(np.full(5, 3.0), np.arange(5.0)))
    assert math.isnan(score(np.arange(5.0), np.zeros(5))["PC"])
    with pytest.raises(ValueError, match="length"):
        mae([1, 2], [1, 2, 3])


def test_subject_scores_by_hand():
    pred = [10, 20, 30, 50, 0, 4]
    true = [12, 18, 40, 40, 0, 0]
    subjects = ["a", "a", "b", "b", "c", "c"]
    # subject means: pred a 15, b 40, c 2 ; true a 15, b 40, c 0
    got = subject_scores(pred, true, subjects)
    assert got["MAE"] == pytest.approx(2 / 3)
    assert got["RMSE"] == pytest.approx(math.sqrt(4 / 3))
    assert got["PC"] == pytest.approx(pearsonr([15, 40, 2], [15, 40, 0])[0])


def write(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def run_cli(*args: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.metrics", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_headerless_crlf_truth_and_header_submission(tmp_path):
    truth = write(tmp_path / "truth.csv", ["Image_0000.png,0.0,0", "Image_0001.png,10.0,0",
                                           "Image_0002.png,55.0,1", "Image_0003.png,80.0,1"], "\r\n")
    submission = write(tmp_path / "sub.csv", ["Image,Predicted", "Image_0003.png,70", "Image_0001.png,12.5",
                                              "Image_0000.png,1", "Image_0002.png,50", "Image_9999.png,3"])
    refused = run_cli(submission, truth)  # an extra row: the challenge would reject the file
    assert refused.returncode == 2 and "row 6: Image_9999.png" in refused.stderr and "--allow-extra" in refused.stderr
    result = run_cli(submission, truth, "--allow-extra")
    assert result.returncode == 0, result.stderr
    line, *class_lines = result.stdout.strip().splitlines()  # the challenge's line first, unchanged
    assert LINE.match(line), line
    # then the class-balanced MAE and each class's MAE and bias: Normal 1, Moderate 2.5, Severe -5, Critical -10
    assert class_lines[0] == f"class-balanced MAE {(1 + 2.5 + 5 + 10) / 4:.4f}"
    assert [row.split() for row in class_lines[2:]] == [["Normal", "1", "1.000", "+1.000"],
                                                         ["Moderate", "1", "2.500", "+2.500"],
                                                         ["Severe", "1", "5.000", "-5.000"],
                                                         ["Critical", "1", "10.000", "-10.000"]]
    pred, true = np.array([1, 12.5, 50, 70]), np.array([0, 10, 55, 80.0])
    want = (f"MAE {np.abs(pred - true).mean():.8f} PC {pearsonr(pred, true)[0]:.9f} "
            f"RMSE {np.sqrt(((pred - true) ** 2).mean()):.9f}")
    assert line == want


def test_cli_missing_rows_is_an_error(tmp_path):
    truth = write(tmp_path / "truth.csv", [f"Image_{i:04d}.png,{i}.0,0" for i in range(10)])
    submission = write(tmp_path / "sub.csv", [f"Image_{i:04d}.png,{i}" for i in range(3)])
    result = run_cli(submission, truth)
    assert result.returncode == 2
    assert "7 of the 10" in result.stderr and "Image_0003.png" in result.stderr
    assert result.stdout == ""


def test_reader_errors_name_file_and_line(tmp_path):
    bad_value = write(tmp_path / "bad.csv", ["name,value", "a.png,1", "b.png,oops"])
    with pytest.raises(PredictionFileError, match=r"bad.csv, row 3.*oops"):
        read_prediction_csv(bad_value)
    duplicate = write(tmp_path / "dup.csv", ["a.png,1", "b.png,2", "a.png,3"])
    with pytest.raises(PredictionFileError, match="duplicate.*a.png"):
        read_prediction_csv(duplicate)
    result = run_cli(duplicate, bad_value)
    assert result.returncode == 2 and "duplicate" in result.stderr
    with pytest.raises(FileNotFoundError):
        read_prediction_csv(tmp_path / "absent.csv")


def test_reader_columns_and_real_train_csv(shared_dir):
    frame = read_prediction_csv(shared_dir / "Train.csv")
    assert list(frame.columns) == ["name", "value", "subject"]
    assert len(frame) == 3054 and frame["subject"].nunique() == 132
    assert frame.loc[0, "name"] == "Image_0000.png" and frame["value"].between(0, 100).all()
    assert score(frame["value"], frame["value"])["MAE"] == 0.0


@pytest.mark.parametrize("rows, row, fragment", [
    (["a.png,150", "b.png,2"], 1, "150"),  # impossible predictions: the challenge rejects them
    (["a.png,1", "b.png,-20"], 2, "-20"),
    (["a.png,abc", "b.png,2"], 1, "'abc' of 'a.png' is not a number"),  # a bad first row is a data row, not a header
    (["a.png,", "b.png,2"], 1, "not a number"),
])
def test_the_scorer_refuses_what_the_challenge_would_naming_the_row(tmp_path, rows, row, fragment):
    truth = write(tmp_path / "truth.csv", ["a.png,1.0,0", "b.png,2.0,0"])
    submission = write(tmp_path / "sub.csv", rows)
    result = run_cli(submission, truth)
    assert result.returncode == 2 and f"row {row}" in result.stderr and fragment in result.stderr, result.stderr
    assert result.stdout == ""
