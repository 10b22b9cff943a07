"""Prediction intervals (utils.intervals) and per-scan summaries (utils.explain): coverage on synthetic residuals whose
spread grows with severity, as on real CT, reaches its level overall and per class within sampling error."""
import numpy as np
import pandas as pd
import pytest

from utils import explain, intervals


def heteroscedastic(n, seed):
    """Predictions over 0..100 and truths whose error sd grows from 1 to 13 with the predicted percentage."""
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0, 100, n)
    truth = np.clip(pred + rng.normal(0, 1 + 0.12 * pred), 0, 100)
    return pred, truth


def test_mondrian_intervals_cover_at_their_level_overall_and_in_every_class():
    calibration = intervals.Calibration(*heteroscedastic(6000, 0))
    pred, truth = heteroscedastic(6000, 1)
    low, high = calibration.intervals(pred, 0.9)
    table = intervals.coverage_table(low, high, truth).set_index("class")
    # 6000 slices: sampling sd of a 0.9 coverage ~0.004 overall, ~0.01 per class (~1000 slices)
    assert 0.88 <= table.loc["all", "coverage"] <= 0.92
    assert (table["coverage"] >= 0.85).all(), table
    assert table.loc["Critical", "mean_width"] > 3 * table.loc["Minimal", "mean_width"]  # width follows the error
    assert (low >= 0).all() and (high <= 100).all() and (low <= pred + 1e-9).all() and (high >= pred - 1e-9).all()


def test_one_interval_for_all_undercovers_the_severe_slices_where_mondrian_does_not():
    cal_pred, cal_truth = heteroscedastic(6000, 2)
    pred, truth = heteroscedastic(6000, 3)
    one = intervals.coverage_table(*intervals.Calibration(cal_pred, cal_truth, "global").intervals(pred, 0.9), truth)
    per_class = intervals.coverage_table(*intervals.Calibration(cal_pred, cal_truth).intervals(pred, 0.9), truth)
    one_critical = one.set_index("class").loc["Critical", "coverage"]
    mondrian_critical = per_class.set_index("class").loc["Critical", "coverage"]
    assert one_critical < 0.85 <= mondrian_critical and mondrian_critical - one_critical > 0.05


def test_small_classes_share_a_quantile_with_their_neighbours():
    pred = np.array([0.0] * 50 + [5.0] * 40 + [60.0] * 5 + [90.0] * 3)
    bins = intervals.Calibration(pred, pred).bins_of(np.array([0.0, 5.0, 60.0, 90.0]))
    assert bins.tolist() == [0, 1, 1, 1]  # Severe (5) and Critical (3) join Minimal: each quantile has >= 30 slices


def test_cross_conformal_calibrates_each_fold_on_the_others():
    pred, truth = heteroscedastic(3000, 4)
    folds = np.arange(3000) % 5
    low, high = intervals.cross_conformal(pred, truth, folds, level=0.8)
    assert 0.77 <= ((truth >= low) & (truth <= high)).mean() <= 0.83


def test_one_trained_fold_has_intervals_but_no_measured_coverage():
    pred, truth = heteroscedastic(400, 6)
    oof = pd.DataFrame({"prediction": pred, "percentage": truth, "fold": 0})
    with pytest.raises(intervals.IntervalError, match="at least 2 trained folds"):
        intervals.cross_conformal(pred, truth, oof["fold"])
    tables, low, high = intervals.out_of_fold_coverage(oof)
    assert tables == {} and len(low) == len(high) == 400 and (low <= high).all()
    oof["fold"] = np.arange(400) % 4
    tables, _, _ = intervals.out_of_fold_coverage(oof)
    assert sorted(tables) == sorted(intervals.METHODS)


@pytest.mark.parametrize("level", [0, 1, 1.5, -0.1])
def test_a_level_outside_zero_one_is_an_error(level):
    with pytest.raises(intervals.IntervalError, match="strictly between 0 and 1"):
        intervals.Calibration(*heteroscedastic(100, 5)).intervals([10.0], level)


def test_a_missing_calibration_names_the_file_and_the_notebook(tmp_path):
    with pytest.raises(intervals.IntervalError, match=r"calibration.csv is missing.*03_ensemble"):
        intervals.Calibration.load(tmp_path / "calibration.csv")


def test_calibration_round_trips(tmp_path):
    calibration = intervals.Calibration(*heteroscedastic(200, 6))
    back = intervals.Calibration.load(calibration.save(tmp_path / "c.csv"))
    np.testing.assert_array_equal(back.predictions, calibration.predictions)
    assert back.intervals([50.0], 0.9) == calibration.intervals([50.0], 0.9)


def test_per_scan_summaries_by_hand():
    frame = pd.DataFrame({"name": list("abcde"), "subject": [1, 1, 1, 2, 2], "prediction": [10.0, 30.0, 50.0, 80.0,
                                                                                         90.0],
                          "percentage": [12.0, 30.0, 40.0, 70.0, 100.0]})
    table = explain.per_scan(frame).set_index("subject")
    assert table.loc[1, "slices"] == 3 and table.loc[1, "mean_prediction"] == pytest.approx(30.0)
    assert table.loc[1, "max_prediction"] == 50.0 and table.loc[1, "severity"] == "Extent"
    assert table.loc[2, "severity"] == "Critical" and table.loc[2, "abs_error"] == pytest.approx(0.0)
    assert table.loc[1, "abs_error"] == pytest.approx(abs(30.0 - 82 / 3))
    with pytest.raises(ValueError, match="subject"):
        explain.per_scan(frame.drop(columns=["subject"]))
