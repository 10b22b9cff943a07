"""Ensemble rules: checkpoint/fold/model averaging, clip, round half up, OOF tables, greedy selection."""
import numpy as np
import pandas as pd
import pytest

from utils import ensemble


def test_round_half_up_differs_from_bankers_rounding():
    values = np.array([0.5, 1.5, 2.5, 12.5, 12.49, 99.5, 0.0])
    assert ensemble.round_half_up(values).tolist() == [1, 2, 3, 13, 12, 100, 0]
    assert np.round(values).tolist() != ensemble.round_half_up(values).tolist()  # why the rule is spelled out


def _predictions():
    # model a: fold 0 holds out s1, fold 1 holds out s2; two kept epochs each; both folds predict Val v1.
    rows = []
    for model, offset in (("a", 0.0), ("b", 10.0)):
        for fold, held_out in ((0, "s1"), (1, "s2")):
            for epoch, delta in ((8, -1.0), (9, 1.0)):
                rows.append((model, fold, "oof", held_out, epoch, 20.0 + offset + fold + delta))
                rows.append((model, fold, "Val", "v1", epoch, 50.0 + offset + 2 * fold + delta))
    return pd.DataFrame(rows, columns=["model", "fold", "split", "name", "epoch", "prediction"])


def test_average_checkpoints_and_folds():
    per_model = ensemble.average_checkpoints_and_folds(_predictions()).set_index(["model", "split", "name"])
    # epochs average out the +-1; OOF keeps its one fold; Val averages folds 0 and 1 (+0 and +2 -> +1).
    assert per_model.loc[("a", "oof", "s1"), "prediction"] == 20.0
    assert per_model.loc[("a", "oof", "s2"), "prediction"] == 21.0
    assert per_model.loc[("a", "Val", "v1"), "prediction"] == 51.0
    assert per_model.loc[("b", "Val", "v1"), "n_folds"] == 2


def test_combine_models_mean_clip_round():
    per_model = pd.DataFrame({"model": ["a", "b", "a", "b", "a", "b"], "split": ["Val"] * 6,
                              "name": ["x", "x", "y", "y", "z", "z"],
                              "prediction": [12.0, 13.0, 99.0, 104.0, -3.0, 1.0]})
    out = ensemble.combine_models(per_model).set_index("name")["prediction"]
    assert out["x"] == 13.0  # mean 12.5 rounds half up
    assert out["y"] == 100.0  # mean 101.5 clipped to 100
    assert out["z"] == 0.0  # mean -1 clipped to 0
    raw = ensemble.combine_models(per_model, rounding=False).set_index("name")["prediction"]
    assert raw["x"] == 12.5


def test_combine_models_keeps_only_common_slices_and_rejects_unknown_models():
    per_model = pd.DataFrame({"model": ["a", "a", "b"], "split": ["oof"] * 3, "name": ["s1", "s2", "s1"],
                              "prediction": [1.0, 2.0, 3.0]})
    assert ensemble.combine_models(per_model)["name"].tolist() == ["s1"]
    with pytest.raises(ValueError, match="no predictions for models \\['c'\\]"):
        ensemble.combine_models(per_model, ["a", "c"])


def test_oof_table_matches_hand_computation():
    per_model = ensemble.average_checkpoints_and_folds(_predictions())
    truth = pd.DataFrame({"name": ["s1", "s2"], "percentage": [22.0, 21.0], "fold": [0, 1]})
    table = ensemble.oof_table(per_model, truth, folds=truth).set_index("model")
    # model a predicts 20, 21 -> errors 2, 0; model b predicts 30, 31 -> errors 8, 10
    assert table.loc["a", "MAE"] == pytest.approx(1.0)
    assert table.loc["b", "MAE"] == pytest.approx(9.0)
    assert table.loc["a", "RMSE"] == pytest.approx(np.sqrt(2.0))
    # fold MAEs 2 and 0: the sample sd (ddof=1), as in every fold table of the project (it was ddof=0 here once)
    assert table.loc["a", "fold_MAE_std"] == pytest.approx(np.std([2.0, 0.0], ddof=1))
    assert (table.loc["a", "fold_MAE_min"], table.loc["a", "fold_MAE_max"], table.loc["a", "n_folds"]) == (0.0, 2.0, 2)
    assert table.loc["b", "fold_RMSE_mean"] == pytest.approx(9.0)  # fold RMSEs 8 and 10
    assert table.index[0] == "a"  # sorted by MAE


def test_greedy_selection_stops_when_no_model_helps():
    truth = pd.DataFrame({"name": [f"s{i}" for i in range(6)], "percentage": [0, 10, 20, 30, 40, 50.0]})
    good = truth["percentage"].to_numpy() + np.array([2, -2, 2, -2, 2, -2.0])
    rows = [("good", n, v) for n, v in zip(truth["name"], good)]
    rows += [("opposite", n, v) for n, v in zip(truth["name"], truth["percentage"] - (good - truth["percentage"]))]
    rows += [("bad", n, v + 30) for n, v in zip(truth["name"], truth["percentage"])]
    per_model = pd.DataFrame(rows, columns=["model", "name", "prediction"]).assign(split="oof")
    # good alone: MAE 2; good+opposite: exact (MAE 0); adding bad only hurts.
    assert ensemble.greedy_selection(per_model, truth) == ["good", "opposite"] or \
        ensemble.greedy_selection(per_model, truth) == ["opposite", "good"]
