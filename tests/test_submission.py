"""The submission file: byte format, validation refusing bad input, atomic write, zip content."""
import zipfile

import pandas as pd
import pytest

from utils import submission
from utils.metrics import read_prediction_csv


def test_written_format_is_headerless_sorted_and_zipped(tmp_path):
    preds = pd.DataFrame({"name": ["Image_0002.png", "Image_0001.png"], "prediction": [13.0, 12.25]})
    csv = tmp_path / "sub.csv"
    submission.write_submission(preds, ["Image_0001.png", "Image_0002.png"], csv, tmp_path / "sub.zip")
    assert csv.read_bytes() == b"Image_0001.png,12.25\nImage_0002.png,13\n"
    with zipfile.ZipFile(tmp_path / "sub.zip") as archive:
        assert archive.namelist() == ["predictions.csv"]
        assert archive.read("predictions.csv") == csv.read_bytes()
    assert read_prediction_csv(csv)["value"].tolist() == [12.25, 13.0]  # what the scorer reads back


@pytest.mark.parametrize("names, values, message", [
    (["a", "b"], [1.0, float("nan")], "NaN"),
    (["a", "b"], [1.0, 100.5], "outside \\[0, 100\\]"),
    (["a", "a"], [1.0, 2.0], "appear twice"),
    (["a"], [1.0], "1 images have no prediction .*'b'"),
    (["a", "b", "c"], [1.0, 2.0, 3.0], "not in the split .*'c'"),
])
def test_invalid_submission_is_refused_and_nothing_written(tmp_path, names, values, message):
    csv = tmp_path / "sub.csv"
    with pytest.raises(submission.SubmissionError, match=message):
        submission.write_submission(pd.DataFrame({"name": names, "prediction": values}), ["a", "b"], csv,
                                    tmp_path / "sub.zip")
    assert list(tmp_path.iterdir()) == []
