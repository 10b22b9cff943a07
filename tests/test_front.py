"""The CPU speed front (utils.front): a measured point is the pipeline's recipe, budgets become epochs as computed
by hand, the front is the points nothing beats, and a model that crashes is a row saying so."""
import numpy as np
import pandas as pd
import pytest
import torch

from utils import front, machine
from utils.config import RunPaths, TrainConfig
from utils.folds import make_folds, write_folds


def test_a_point_is_measured_with_the_cpu_recipe_in_its_format():
    cfg = front.recipe("resnet10t", 64, "bf16_cl")
    assert (cfg.head, cfg.pooling, cfg.optimizer, cfg.sam, cfg.batch_size, cfg.amp_dtype, cfg.channels_last) == \
        ("reg", "avg", "adamw", "none", 32, "bfloat16", True)
    torch.set_num_threads(1)
    row = front.measure_point("resnet10t", 32, "fp32", seconds=0.05)
    assert row["train_img_s"] > 0 and row["predict_img_s"] > 0 and row["train_steps"] >= front.MIN_STEPS
    assert row["params_m"] == pytest.approx(4.92, abs=0.01) and row["threads"] == 1
    with pytest.raises(front.FrontError, match="format 'fp8'"):
        front.recipe("resnet10t", 64, "fp8")


@pytest.mark.slow
def test_a_failing_model_is_a_row_with_a_note_and_the_run_goes_on(tmp_path):
    out = tmp_path / "speed.csv"
    table = front.measure_front(["no_such_net", "resnet10t"], [32], ["fp32"], out, seconds=0.05, threads=1,
                                log=lambda line: None)
    failed = table[table["model"] == "no_such_net"].iloc[0]
    assert failed["note"].startswith("failed (exit 1): error: ") and "no_such_net" in failed["note"]
    assert float(table[table["model"] == "resnet10t"].iloc[0]["train_img_s"]) > 0
    again = front.measure_front(["no_such_net", "resnet10t"], [32], ["fp32"], out, seconds=0.05, threads=1,
                                log=lambda line: pytest.fail(f"measured again: {line}"))
    assert len(again) == 2  # what is in the file is not measured again


def test_out_never_overwrites_a_file_that_is_not_a_speed_table(tmp_path):
    submission = tmp_path / "val.csv"
    submission.write_text("Image_0001.png,12\nImage_0002.png,0\n")
    with pytest.raises(front.FrontError, match="not a speed table"):
        front.measure_front(["resnet10t"], [32], ["fp32"], submission, seconds=0.05, threads=1)
    assert submission.read_text() == "Image_0001.png,12\nImage_0002.png,0\n"
    binary = tmp_path / "weights.csv"
    binary.write_bytes(b"\x80\x81\x00\xff" * 10)
    with pytest.raises(front.FrontError, match="cannot be read as a speed table|not a speed table"):
        front.read_speed(binary)


def test_epochs_fill_the_budget():
    assert front.epochs_for(400, 107.7, 2244) == 19  # 400 x 107.7 / 2244 = 19.2
    assert front.epochs_for(400, 76.3, 2244) == 14  # 13.6
    assert front.epochs_for(1, 1, 2244) == 1
    with pytest.raises(front.FrontError):
        front.epochs_for(0, 100, 2244)


def test_the_front_is_the_points_nothing_beats_on_both():
    points = pd.DataFrame({"model": list("abcde"), "seconds": [100, 150, 300, 300, 400],
                           "MAE": [6.0, 6.2, 5.5, 5.4, 5.6]})
    assert front.pareto_front(points, "seconds", "MAE")["model"].tolist() == ["a", "d"]


def test_the_summary_puts_formats_side_by_side():
    rows = [("r", 96, "fp32", 100.0), ("r", 96, "bf16_cl", 220.0), ("m", 96, "fp32", 150.0), ("m", 96, "bf16_cl", 90.0)]
    speed = pd.DataFrame([{"model": m, "size": s, "format": f, "train_img_s": v, "predict_img_s": 2 * v,
                           "params_m": 1.0, "gmacs": 0.1} for m, s, f, v in rows])
    speed.loc[len(speed)] = {"model": "x", "size": 96, "format": "fp32", "train_img_s": np.nan, "predict_img_s": np.nan,
                             "params_m": 1.0, "gmacs": 0.1}  # a point that failed: left out
    table = front.summary(speed).set_index("model")
    assert table.loc["r", "best"] == "bf16_cl" and table.loc["r", "speedup_vs_fp32"] == pytest.approx(2.2)
    assert table.loc["m", "best"] == "fp32" and table.index.tolist() == ["r", "m"]  # fastest first


def test_planned_seconds_come_from_the_speed_table(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "cpu_computes_bf16", lambda: True)
    labels = pd.DataFrame({"name": [f"Image_{i:04d}.png" for i in range(40)], "percentage": np.arange(40) * 2.0,
                           "subject": np.arange(40) // 4})
    paths = RunPaths(tmp_path)
    folds = make_folds(labels, n_folds=5)
    write_folds(folds, paths.folds_csv)
    for name, extra in (("plain", {}), ("fast", {"cpu_bf16": True})):
        for fold in (0, 1):
            paths.fold(name, fold).mkdir(parents=True)
            TrainConfig(model_name=name, arch="resnet10t", img_size=96, epochs=10, **extra).save_yaml(
                paths.fold(name, fold) / "config.yaml")
    speed = pd.DataFrame({"model": ["resnet10t"] * 2, "size": [96, 96], "format": ["fp32_cl", "bf16_cl"],
                          "train_img_s": [100.0, 200.0]})
    table = front.planned_seconds(tmp_path, speed).set_index(["model", "fold"])
    for fold in (0, 1):
        training = int((folds["fold"] != fold).sum())
        assert table.loc[("plain", fold), "planned_seconds"] == pytest.approx(10 * training / 100)
        assert table.loc[("fast", fold), "planned_seconds"] == pytest.approx(10 * training / 200)
    assert front.format_of(TrainConfig(cpu_bf16=True, channels_last=False)) == "bf16"
    monkeypatch.setattr(machine, "cpu_computes_bf16", lambda: False)
    assert front.format_of(TrainConfig(cpu_bf16=True)) == "fp32_cl"  # fp32 where bf16 is not native


def test_a_bf16_recipe_on_a_cpu_without_bf16_is_said_before_it_runs(monkeypatch, caplog):
    from utils import pipeline

    configs = [TrainConfig(model_name="fast", cpu_bf16=True, device="cpu"),
               TrainConfig(model_name="plain", device="cpu")]
    monkeypatch.setattr(machine, "cpu_computes_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="utils.pipeline"):
        pipeline.warn_emulated_bf16(configs)
    assert not caplog.records  # bf16 in hardware: the profile's time holds
    monkeypatch.setattr(machine, "cpu_computes_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="utils.pipeline"):
        pipeline.warn_emulated_bf16(configs)
    (record,) = caplog.records
    assert "cpu_bf16 (fast)" in record.getMessage() and "fp32" in record.getMessage() and "plain" not in \
        record.getMessage()
