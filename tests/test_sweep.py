"""utils.sweep: job planning, the pooled cross-validation table, packing, and a tiny end-to-end sweep with resume."""
import numpy as np
import pandas as pd
import pytest
import yaml

from utils import csvfiles, data, jobs, sweep
from utils.config import ConfigError, RunPaths
from utils.folds import make_folds, write_folds

TINY = {"arch": "resnet10t", "img_size": 32, "epochs": 1, "warmup_epochs": 0, "batch_size": 8, "optimizer": "adamw",
        "lr": 1e-3, "sam": "none", "save_last_k": 1, "max_steps_per_epoch": 1, "device": "cpu"}


def write_profile(path, params, models):
    path.write_text(yaml.safe_dump({"params": params, "models": models}))
    return str(path)


def test_plan_models_is_in_profile_order_and_layers_params(tmp_path):
    first = write_profile(tmp_path / "a.yaml", {"epochs": 8, "img_size": 96},
                          [{"model_name": "m1"}, {"model_name": "m2", "img_size": 128, "epochs": 12}])
    second = write_profile(tmp_path / "b.yaml", {"epochs": 5}, [{"model_name": "m3"}])
    configs = sweep.plan_models([first, second], {"epochs": 2, "save_last_k": 1, "warmup_epochs": 0}, folds=[0, 3])
    # every model trains every fold: the jobs are (model, fold) pairs, model-major
    assert [(c.model_name, f) for c in configs for f in c.folds] == [
        ("m1", 0), ("m1", 3), ("m2", 0), ("m2", 3), ("m3", 0), ("m3", 3)]
    # profile params < model entry < command-line overrides
    assert [c.img_size for c in configs] == [96, 128, 512]  # m3: TrainConfig's default
    assert {c.epochs for c in configs} == {2}
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):  # strict, as the pipeline
        sweep.plan_models([first], {"epoch": 2}, folds=[0])


def test_plan_jobs_refuses_a_model_name_in_two_profiles(tmp_path):
    first = write_profile(tmp_path / "a.yaml", {}, [{"model_name": "same"}])
    second = write_profile(tmp_path / "b.yaml", {}, [{"model_name": "same"}])
    with pytest.raises(ValueError, match="'same' appears in two profiles"):
        sweep.plan_models([first, second], {}, folds=[0])


def six_slice_run(folder, percentages):
    """A run folder with 6 slices, 2 per subject and fold (3 folds), for tables checked by hand."""
    paths = RunPaths(folder)
    truth = pd.DataFrame({"name": [f"s{i}" for i in range(6)], "subject": pd.array([0, 0, 1, 1, 2, 2], "Int64"),
                          "percentage": percentages, "fold": [0, 0, 1, 1, 2, 2]})
    truth["severity"] = pd.Categorical(["Normal"] * 6)
    write_folds(truth, paths.folds_csv)
    return paths, truth


def test_cv_table_pools_out_of_fold_predictions(tmp_path):
    paths, truth = six_slice_run(tmp_path, [0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    errors = {0: [1.0, -3.0], 1: [2.0, 2.0], 2: [0.0, 4.0]}
    for fold, errs in errors.items():
        rows = truth[truth["fold"] == fold]
        fold_dir = paths.fold("good", fold)
        fold_dir.mkdir(parents=True)
        # two checkpoints whose mean is truth + err: the table must score the checkpoint average
        pd.concat([pd.DataFrame({"split": "oof", "name": rows["name"], "epoch": epoch,
                                 "prediction": rows["percentage"].to_numpy() + np.array(errs) + shift})
                   for epoch, shift in ((3, -1.0), (4, 1.0))]).to_csv(fold_dir / "predictions.csv", index=False)
    partial = paths.fold("partial", 0)
    partial.mkdir(parents=True)
    partial.joinpath("predictions.csv").write_bytes((paths.fold("good", 0) / "predictions.csv").read_bytes())

    table = sweep.cv_table(tmp_path)
    assert table["model"].tolist() == ["good"]  # "partial" lacks folds 1 and 2
    row = table.iloc[0]
    all_errors = np.array([1.0, -3.0, 2.0, 2.0, 0.0, 4.0])
    assert row["MAE"] == pytest.approx(np.abs(all_errors).mean())
    assert row["RMSE"] == pytest.approx(np.sqrt((all_errors ** 2).mean()))
    fold_maes = [2.0, 2.0, 2.0]
    assert row["fold_MAE_mean"] == pytest.approx(np.mean(fold_maes))
    assert row["fold_MAE_std"] == pytest.approx(0.0)
    assert row["n_folds"] == 3
    assert sweep.cv_table(tmp_path, complete_only=False)["model"].tolist() == ["good", "partial"]


@pytest.fixture(scope="module")
def tiny_data(phantom_set):
    return phantom_set


def test_pack_stores_what_the_reader_decodes(tiny_data, tmp_path):
    packed_path = data.pack_images(tiny_data, [32], tmp_path / "packed.npz")
    frame = data.load_split(tiny_data, "Train", require_labels=True)
    with np.load(packed_path) as packed:  # no pickle needed: names are a unicode array
        assert packed["name"].tolist() == frame["name"].tolist()
        np.testing.assert_array_equal(packed["percentage"], frame["percentage"].to_numpy())
        np.testing.assert_array_equal(packed["images_32"][3], data.load_image(frame["path"].iloc[3], 32, 1)[:, :, 0])
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.slow
def test_sweep_end_to_end_then_a_rerun_trains_nothing(tiny_data, tmp_path, capsys, caplog):
    profile = write_profile(tmp_path / "tiny.yaml", TINY, [{"model_name": "reg", "head": "reg"},
                                                          {"model_name": "ldl", "head": "ldl", "pooling": "hybrid"}])
    packed = data.pack_images(tiny_data, [32], tmp_path / "packed.npz")
    run_dir = tmp_path / "run"
    summary = sweep.run_sweep([profile], run_dir, folds=[0, 1], images=str(packed), n_folds=3,
                              runner=jobs.Runner(jobs=2, threads=1))
    assert sorted(zip(summary["model"], summary["fold"])) == [("ldl", 0), ("ldl", 1), ("reg", 0), ("reg", 1)]
    written = pd.read_csv(run_dir / "cv_summary.csv")
    assert len(written) == 4 and written["n"].gt(0).all()
    # the folds are utils.folds' for that seed, so sweeps and the pipeline's 01_folds agree
    labels = data.load_split(tiny_data, "Train", require_labels=True)
    expected = make_folds(labels, n_folds=3, seed=0)
    assert pd.read_csv(run_dir / "folds.csv")["fold"].tolist() == expected["fold"].tolist()
    # each summary row is the checkpoint-averaged OOF score of its fold, held-out slices only
    for row in written.itertuples():
        predictions = pd.read_csv(RunPaths(run_dir).fold(row.model, row.fold) / "predictions.csv")
        held_out = set(expected.loc[expected["fold"] == row.fold, "name"])
        assert set(predictions["name"]) == held_out and row.n == len(held_out)

    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("models/*/fold*/predictions.csv")}
    again = sweep.run_sweep([profile], run_dir, folds=[0, 1], images=str(packed), n_folds=3,
                            runner=jobs.Runner(jobs=1, threads=1))
    assert len(again) == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # the CLI report: one line per model, the figure saved
    assert sweep.main(["report", str(run_dir)]) == 1  # folds 0 and 1 of 3: no model is complete
    assert sweep.main(["report", str(run_dir), "--all", "--plot", str(tmp_path / "cv.png")]) == 0
    printed = capsys.readouterr().out
    assert "reg " in printed and "ldl " in printed and (tmp_path / "cv.png").stat().st_size > 0
    assert sweep.main(["compare", str(run_dir), "--base", "reg"]) == 0 and "d_MAE_fold1" in capsys.readouterr().out

    # the CV report of utils.explain: interval coverage on held-out folds, per-scan table, a saliency grid
    from utils import explain

    result = explain.cv_report(run_dir, "reg", tiny_data, tmp_path / "figures", per_class=1)
    assert set(result["coverage"]["method"]) == {"mondrian", "global"}
    # at 32 px resnet10t's last feature map is 1x1: no saliency grid (it would be 0 everywhere), said in a warning
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} == {"interval_coverage.png", "per_scan.png"}
    assert "saliency grid skipped: model reg sees 32 px" in caplog.text

    # the same run name with another recipe or other folds is refused, not silently mixed
    with pytest.raises(RuntimeError, match="another recipe .*lr"):
        sweep.run_sweep([profile], run_dir, folds=[0], images=str(packed), overrides={"lr": 0.002}, n_folds=3)
    with pytest.raises(ValueError, match="holds other folds"):
        sweep.run_sweep([profile], run_dir, folds=[0], images=str(packed), n_folds=2)


def test_sweep_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one of data_dir"):
        sweep.run_sweep(["demo"], tmp_path, folds=[0])


def test_a_packed_file_without_the_size_says_how_to_fix_it(tiny_data, tmp_path):
    profile = write_profile(tmp_path / "tiny.yaml", {**TINY, "img_size": 40}, [{"model_name": "reg", "head": "reg"}])
    packed = data.pack_images(tiny_data, [32], tmp_path / "packed.npz")
    with pytest.raises(RuntimeError, match="no 40 px images .* --sizes 40"):
        sweep.run_sweep([profile], tmp_path / "run", folds=[0], images=str(packed), n_folds=3)


def test_paired_table_differences_per_fold_by_hand(tmp_path):
    paths, truth = six_slice_run(tmp_path, [0.0, 80.0, 0.0, 90.0, 5.0, 85.0])
    errors = {"base": [1.0, -10.0], "better": [1.0, -4.0]}  # the same error on every fold: easy sums
    for model, (low, high) in errors.items():
        for fold in (0, 1, 2):
            rows = truth[truth["fold"] == fold]
            frame = pd.DataFrame({"split": "oof", "name": rows["name"], "epoch": 1,
                                  "prediction": rows["percentage"].to_numpy() + np.array([low, high])})
            csvfiles.write_frame(paths.fold(model, fold) / "predictions.csv", frame)
    table = sweep.paired_table(tmp_path, "base").set_index("model")
    assert table.loc["better", "d_MAE_fold1"] == pytest.approx((1 + 4) / 2 - (1 + 10) / 2)
    assert table.loc["better", "d_MAE_helped"] == 3 and table.loc["base", "d_MAE_mean"] == 0
    # class-balanced: Normal/Minimal (error 1) and Critical (-10 vs -4) weigh the same whatever their counts
    assert table.loc["base", "MAE_balanced"] == pytest.approx((1 + 1 + 10) / 3)
    assert table.loc["better", "bias_Critical"] == pytest.approx(-4.0)
    only = sweep.paired_table(tmp_path, "base", models=["better"])
    assert only["model"].tolist() == ["base", "better"]
    assert only["d_MAE_fold1"].tolist() == table["d_MAE_fold1"].tolist()
    with pytest.raises(sweep.SweepError, match="--models 'worse': no out-of-fold predictions"):
        sweep.paired_table(tmp_path, "base", models=["worse"])
    # a model's own predictions rounded, as models <model>@<rule>: two checkpoints at +0.4 and +0.7 on whole labels
    # are +0.55 unrounded, round(+0.55) = +1 once, int(mean(0, 1)) = 0 the seed team's way
    for fold in (0, 1, 2):
        rows = truth[truth["fold"] == fold]
        frame = pd.concat([pd.DataFrame({"split": "oof", "name": rows["name"], "epoch": epoch,
                                         "prediction": rows["percentage"].to_numpy() + error})
                           for epoch, error in ((1, 0.4), (2, 0.7))])
        csvfiles.write_frame(paths.fold("frac", fold) / "predictions.csv", frame)
    rounded = sweep.paired_table(tmp_path, "frac", roundings=["once", "authors"]).set_index("model")
    assert rounded.loc["frac", "MAE"] == pytest.approx(0.55)
    assert rounded.loc["frac@once", "d_MAE_mean"] == pytest.approx(0.45)
    assert rounded.loc["frac@authors", "d_MAE_mean"] == pytest.approx(-0.55)
