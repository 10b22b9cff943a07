"""Prediction intervals with measured coverage: split-conformal regression (crepes) on a run's out-of-fold residuals.

The error grows with severity (on real Val: MAE 0.8 on Normal slices, 14 on Critical ones), so one +- for every slice
is wrong for most of them. The default method, **mondrian**, is a Mondrian conformal predictive system (crepes): the
calibration residuals (truth - prediction of the ensemble's out-of-fold slices) are split by the severity class of
the *prediction* (neighbouring classes merged until each holds `MIN_BIN` calibration slices), and each class's
signed residuals give its own, asymmetric interval: the miss probability 1 - level is split between the two tails,
`UPPER_TAIL_SHARE` of it above the interval, the rest below. The models regress to the mean, so a slice's truth lies
far above its prediction more often than far below (the Critical slices are predicted 12-17 points low); an equal
split (0.5) left Critical slices covered 0.78 of the time on the `cpu` recipe's 5-fold CV, 0.2 covers them 0.83 with
every class at >= 0.83 and 0.90 overall (docs/explain.md). `global` (one symmetric +- for all, crepes' conformal
regressor) is the baseline it is measured against (`cross_conformal`: each fold's intervals calibrated on the other
folds' residuals, coverage per true severity class).

    calibration = intervals.Calibration.from_oof(predictions, truth)        # 03_ensemble writes it
    low, high = calibration.intervals(predictions, level=0.9)              # utils.predict --interval 0.9

Intervals are clipped to [0, 100]. Coverage of split conformal is >= the level on average over calibration sets
when slices are exchangeable; slices of one CT scan are not independent, so coverage is measured on held-out
subjects (folds), not assumed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from crepes import ConformalPredictiveSystem, ConformalRegressor

from utils import csvfiles
from utils.folds import SEVERITY_CLASSES, severity_class

METHODS = ("mondrian", "global")
MIN_BIN = 30  # calibration slices a severity class needs for a quantile of its own
UPPER_TAIL_SHARE = 0.2  # of the miss probability 1 - level, the share above the interval (module docstring)
CALIBRATION_FILE = "calibration.csv"


class IntervalError(ValueError):
    """Intervals cannot be made (no calibration, a level outside (0, 1)); the message names the fix."""


def check_level(level: float) -> float:
    if not 0 < level < 1:
        raise IntervalError(f"--interval {level}: the coverage level must lie strictly between 0 and 1, e.g. 0.9")
    return float(level)


def _classes(predictions: np.ndarray) -> np.ndarray:
    return np.asarray(severity_class(np.clip(np.asarray(predictions, np.float64), 0, 100)), dtype=object)


@dataclass
class Calibration:
    """The residuals intervals are calibrated on: out-of-fold predictions (unrounded ensemble mean) and truth."""

    predictions: np.ndarray
    truth: np.ndarray
    method: str = "mondrian"

    def __post_init__(self) -> None:
        self.predictions = np.asarray(self.predictions, np.float64)
        self.truth = np.asarray(self.truth, np.float64)
        if self.method not in METHODS:
            raise IntervalError(f"interval method {self.method!r}: choose one of {', '.join(METHODS)}")
        if len(self.predictions) < 2 or len(self.predictions) != len(self.truth):
            raise IntervalError(f"{len(self.predictions)} out-of-fold predictions for {len(self.truth)} labels: "
                                "intervals need the run's out-of-fold predictions (run 03_ensemble)")

    @classmethod
    def from_oof(cls, predictions, truth, method: str = "mondrian") -> Calibration:
        return cls(np.asarray(predictions), np.asarray(truth), method)

    def bins_of(self, predictions: np.ndarray) -> np.ndarray:
        """The Mondrian category of each prediction: its severity class, neighbouring classes merged (from Normal
        up) until each category holds at least MIN_BIN calibration slices."""
        classes = _classes(predictions)
        if self.method == "global":
            return np.zeros(len(classes), dtype=int)
        counts = pd.Series(_classes(self.predictions)).value_counts()
        category, size, assignment = 0, 0, {}
        for name in SEVERITY_CLASSES:
            if size >= MIN_BIN:
                category, size = category + 1, 0
            assignment[name] = category
            size += int(counts.get(name, 0))
        if size < MIN_BIN and category > 0:  # the top category is too small: it joins the one below
            assignment = {name: min(c, category - 1) for name, c in assignment.items()}
        return np.array([assignment[c] for c in classes])

    def intervals(self, predictions, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of each prediction at coverage `level`, clipped to [0, 100]."""
        level = check_level(level)
        predictions = np.asarray(predictions, np.float64)
        residuals = self.truth - self.predictions
        with warnings.catch_warnings():  # a level too high for a bin's size gives [0, 100]: said in the docs
            warnings.simplefilter("ignore")
            if self.method == "global":
                bounds = ConformalRegressor().fit(residuals).predict_int(predictions, confidence=level, y_min=0,
                                                                          y_max=100)
            else:
                miss = 100 * (1 - level)
                system = ConformalPredictiveSystem().fit(residuals, bins=self.bins_of(self.predictions))
                bounds = system.predict(predictions, bins=self.bins_of(predictions),
                                        lower_percentiles=miss * (1 - UPPER_TAIL_SHARE),
                                        higher_percentiles=100 - miss * UPPER_TAIL_SHARE, y_min=0, y_max=100)
        return np.asarray(bounds[:, 0], np.float64), np.asarray(bounds[:, 1], np.float64)

    def save(self, path: str | Path) -> Path:
        frame = pd.DataFrame({"prediction": self.predictions, "percentage": self.truth, "method": self.method})
        return csvfiles.write_frame(path, frame)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        if not path.is_file():
            raise IntervalError(f"{path} is missing: intervals need the ensemble's out-of-fold calibration, which "
                                "03_ensemble (ensemble_calibration.csv) or 04_pseudo_label (final_calibration.csv) "
                                "writes next to its model list: rerun that notebook (./run_all.sh --name <run> "
                                "resumes the run)")
        frame = csvfiles.read_frame(path, text_columns=("method",))
        method = str(frame["method"].iloc[0]) if "method" in frame.columns else "mondrian"
        return cls(frame["prediction"].to_numpy(), frame["percentage"].to_numpy(), method)


def coverage_table(low: np.ndarray, high: np.ndarray, truth: np.ndarray) -> pd.DataFrame:
    """Coverage and mean width overall and per true severity class."""
    truth = np.asarray(truth, np.float64)
    covered = (truth >= low) & (truth <= high)
    width = high - low
    classes = _classes(truth)
    rows = [{"class": "all", "slices": len(truth), "coverage": covered.mean(), "mean_width": width.mean()}]
    for name in SEVERITY_CLASSES:
        mask = classes == name
        if mask.any():
            rows.append({"class": name, "slices": int(mask.sum()), "coverage": covered[mask].mean(),
                         "mean_width": width[mask].mean()})
    return pd.DataFrame(rows)


def cross_conformal(predictions, truth, folds, method: str = "mondrian", level: float = 0.9
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each fold's intervals calibrated on the other folds' residuals: what coverage on unseen subjects is."""
    predictions, truth, folds = (np.asarray(a) for a in (predictions, truth, folds))
    if len(np.unique(folds)) < 2:
        raise IntervalError(f"cross-conformal coverage needs at least 2 trained folds (each calibrated on the "
                            f"others); these out-of-fold slices come from {len(np.unique(folds))}: train more "
                            f"folds (setting 'folds')")
    low, high = np.empty(len(truth)), np.empty(len(truth))
    for fold in np.unique(folds):
        held = folds == fold
        calibration = Calibration(predictions[~held], truth[~held], method)
        low[held], high[held] = calibration.intervals(predictions[held], level)
    return low, high


def out_of_fold_coverage(oof: pd.DataFrame, level: float = 0.9
                         ) -> tuple[dict[str, pd.DataFrame], np.ndarray, np.ndarray]:
    """The coverage table of each method (`cross_conformal`, on `oof`'s prediction, percentage and fold columns)
    and the default method's intervals of those slices. With one trained fold there is no other fold to calibrate
    on: no tables, and the intervals are calibrated on the slices' own residuals (shown, not a measured coverage)."""
    predictions, truth, folds = (oof[c].to_numpy() for c in ("prediction", "percentage", "fold"))
    if len(np.unique(folds)) < 2:
        return {}, *Calibration(predictions, truth, METHODS[0]).intervals(predictions, level)
    tables, intervals = {}, {}
    for method in METHODS:
        intervals[method] = cross_conformal(predictions, truth, folds, method, level)
        tables[method] = coverage_table(*intervals[method], truth)
    return tables, *intervals[METHODS[0]]
