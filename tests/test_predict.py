"""The Test phase and utils.predict: a split added after training is predicted without training; the export
reproduces the submission byte for byte; bad inputs are refused without a partial output."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from utils import ensemble, files, pipeline, predict
from utils.config import REPO_ROOT, RunPaths

pytestmark = pytest.mark.slow  # every test here uses the two runs of `phases` (~2.5 min)

# No pseudo-label retrain: it would learn from the Test slices too, and the two runs below must train the same.
# 64 px: resnet10t's last feature map is 2x2, what a saliency map needs to localise (utils.explain)
PROFILE = {"params": {"arch": "resnet10t", "head": "reg", "pooling": "avg", "img_size": 64, "epochs": 2,
                      "warmup_epochs": 0, "batch_size": 8, "optimizer": "adamw", "lr": 0.001, "sam": "none",
                      "folds": [0, 1], "n_folds": 3, "save_last_k": 2, "randaug_n": 1, "tta_hflip": True},
           "models": [{"model_name": "a"}, {"model_name": "b", "head": "ldl", "pooling": "hybrid"}]}


def run(workdir, data_dir, profile, name, *extra):
    assert pipeline.main(["--workdir", str(workdir), "--data", str(data_dir), "--profile", str(profile),
                          "--name", name, "--kernel", "python3", *extra]) == 0


@pytest.fixture(scope="module")
def phases(tmp_path_factory, phantom_set):
    """Run `late` trained before Test existed, then rerun for Test; run `early` had Test from the start."""
    root = tmp_path_factory.mktemp("phases")
    full = phantom_set
    partial = root / "partial"
    partial.mkdir()
    for split in ("Train", "Val"):
        (partial / split).symlink_to(full / split)
    profile = root / "p.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    run(root, partial, profile, "late")
    checkpoints = {p: p.stat().st_mtime_ns for p in (root / "runs" / "late" / "models").rglob("*.pt")}
    histories = {p: p.read_bytes() for p in (root / "runs" / "late" / "models").rglob("history.csv")}
    (partial / "Test").symlink_to(full / "Test")  # the Test phase opens
    run(root, partial, profile, "late", "-p", "split", "Test")
    run(root, full, profile, "early", "-p", "split", "Test")
    return root, full, checkpoints, histories


def test_a_new_split_is_predicted_without_training(phases):
    root, _, checkpoints, histories = phases
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints  # no checkpoint rewritten
    assert {p: p.read_bytes() for p in histories} == histories  # no epoch trained
    report = (root / "runs" / "late" / "notebooks" / "02_train__a.ipynb").read_text()
    assert "Test" in report  # the executed report shows the slices predicted per fold and split


def test_the_test_submission_equals_a_run_that_had_test_from_the_start(phases):
    root, full, _, _ = phases
    late, early = ((root / "submissions" / f"{n}.csv").read_bytes() for n in ("late", "early"))
    assert late == early
    assert sorted(line.split(",")[0] for line in late.decode().splitlines()) == \
        sorted(p.name for p in (full / "Test").rglob("*.png"))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "utils.predict", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_predict_with_the_export_reproduces_the_submission_byte_for_byte(phases, tmp_path):
    root, full, _, _ = phases
    export = RunPaths(root / "runs" / "early").export
    assert (export / predict.MANIFEST).is_file()  # 05_submit wrote it
    out = tmp_path / "preds.csv"
    result = cli(export, full / "Test", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "slices/s" in result.stdout
    assert out.read_bytes() == (root / "submissions" / "early.csv").read_bytes()


def test_unrounded_predictions_equal_the_pipelines_own(phases, tmp_path):
    root, full, _, _ = phases
    run_dir = root / "runs" / "early"
    per_model = ensemble.average_checkpoints_and_folds(ensemble.load_predictions(run_dir))
    models = ensemble.read_ensemble_models(RunPaths(run_dir).ensemble)
    own = ensemble.combine_models(per_model[per_model["split"] == "Test"], models, rounding=False)
    rows = predict.predict_images(run_dir, [full / "Test"], rounding=False, progress=False)
    merged = rows.merge(own, on="name")
    assert len(merged) == len(own) > 0
    # float32 predictions near 25: one ulp is 2e-6 (batches of other compositions round differently)
    np.testing.assert_allclose(merged["prediction_x"], merged["prediction_y"], atol=1e-5, rtol=0)


def test_weight_averaged_export_loads_and_predicts(phases, tmp_path):
    root, full, _, _ = phases
    manifest = predict.export_run(root / "runs" / "early", tmp_path / "averaged", average_checkpoints=True)
    assert all(len(names) == 1 for model in manifest["models"] for names in model["folds"].values())
    rows = predict.predict_images(tmp_path / "averaged", [full / "Test"], progress=False)
    assert rows["prediction"].between(0, 100).all()


@pytest.mark.parametrize("case", ["no ensemble", "corrupt export", "missing export file", "unreadable image",
                                  "no images", "not a run"])
def test_bad_inputs_are_refused_and_nothing_is_written(phases, tmp_path, case):
    root, full, _, _ = phases
    source, images = RunPaths(root / "runs" / "early").export, [full / "Test"]
    if case == "no ensemble":
        source = tmp_path / "run"
        (source / "models").mkdir(parents=True)
        fragment = "no finished ensemble"
    elif case in ("corrupt export", "missing export file"):
        source = tmp_path / "export"
        predict.export_run(root / "runs" / "early", source)
        victim = sorted(source.rglob("*.pt"))[0]
        victim.unlink()  # a hard link to the run's file: never write through it
        if case == "corrupt export":
            victim.write_bytes(b"\0" * 10)
        fragment = f"{victim.name} is (corrupt|missing)"
    elif case == "unreadable image":
        images = [tmp_path / "Image_9999.png"]
        images[0].write_bytes(b"")
        fragment = "cannot decode image .*Image_9999.png"
    elif case == "no images":
        (tmp_path / "empty").mkdir()
        images = [tmp_path / "empty"]
        fragment = "no .png/.jpg/.jpeg images"
    else:
        source = tmp_path
        fragment = "neither a run folder"
    out = tmp_path / "preds.csv"
    result = cli(source, *images, "--out", out)
    assert result.returncode == 2 and re.search(fragment, result.stderr), result.stderr
    assert not out.exists() and not list(tmp_path.rglob(".*.tmp-*"))
    files.verify_folder(RunPaths(root / "runs" / "early").fold("a", 0), "")  # the run's files were not touched


# ------------------------------------------------------------------------------------------- intervals, saliency


def test_intervals_come_with_the_export_and_bracket_each_prediction(phases, tmp_path):
    root, full, _, _ = phases
    export = RunPaths(root / "runs" / "early").export
    out = tmp_path / "intervals.csv"
    result = cli(export, full / "Test", "--out", out, "--interval", "0.9")
    assert result.returncode == 0, result.stderr
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert all(len(r) == 4 for r in rows) and len(rows) == len(list((full / "Test").rglob("*.png")))
    assert all(0 <= float(low) <= float(high) <= 100 for _, _, low, high in rows)
    plain = (root / "submissions" / "early.csv").read_text().splitlines()
    assert [",".join(r[:2]) for r in rows] == plain  # the predictions themselves are the submission's


@pytest.mark.parametrize("case, fragment", [
    ("level", "--interval 1.5: the coverage level must lie strictly between 0 and 1"),
    ("no calibration", "holds no interval calibration"),
])
def test_intervals_refused_with_the_reason_and_no_output(phases, tmp_path, case, fragment):
    root, full, _, _ = phases
    source, level = RunPaths(root / "runs" / "early").export, "0.9"
    if case == "level":
        level = "1.5"
    else:
        source = tmp_path / "export"
        predict.export_run(root / "runs" / "early", source)
        manifest = json.loads((source / predict.MANIFEST).read_text())
        manifest["calibration"] = None
        (source / predict.MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "out.csv"
    result = cli(source, full / "Test", "--out", out, "--interval", level)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert not out.exists()


def test_explain_writes_an_overlay_and_a_heatmap_of_the_image_size_per_slice(phases, tmp_path):
    root, full, _, _ = phases
    out = tmp_path / "explained"
    result = subprocess.run([sys.executable, "-m", "utils.explain", str(RunPaths(root / "runs" / "early").export),
                             str(full / "Test"), "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    slices = sorted((full / "Test").rglob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in slices)
    for path in slices:
        heatmap = np.load(out / f"{path.stem}.npy")
        assert heatmap.dtype == np.float32 and heatmap.shape == (48, 48) and (heatmap >= 0).all()
        assert heatmap.max() > 0  # a 2x2 feature map localises: never the all-zero map of a 1x1 one
    rows = pd.read_csv(out / "predictions.csv")
    assert list(rows.columns) == ["name", "prediction", "low", "high"] and len(rows) == len(slices)


def test_explain_on_bad_input_writes_nothing(phases, tmp_path):
    root, _, _, _ = phases
    bad = tmp_path / "Image_9999.png"
    bad.write_bytes(b"")
    out = tmp_path / "explained"
    result = subprocess.run([sys.executable, "-m", "utils.explain", str(RunPaths(root / "runs" / "early").export),
                             str(bad), "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "cannot decode image" in result.stderr
    assert not out.exists() and not list(tmp_path.rglob(".*.tmp-*"))
