"""Nothing a user owns is lost, nothing changes silently: the export never replaces a folder that is not an earlier
export and never writes into a run; a run's files edited after training are refused by prediction; prediction
skips hidden folders, follows symlinked ones and refuses two images with one name; saliency maps that cannot
localise are refused; label files naming paths; prediction's arguments checked before any work."""
import os

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from utils import data, ensemble, explain, files, pipeline, predict, train
from utils.config import RunPaths, TrainConfig

# resnet10t at 32 px: its last feature map is 1x1 (stride 32), which the saliency test needs
TINY = dict(model_name="t", arch="resnet10t", head="reg", pooling="avg", img_size=32, epochs=1, warmup_epochs=0,
            batch_size=4, save_last_k=1, folds=[0], sam="none", optimizer="adamw", randaug_n=0, device="cpu",
            num_workers=0, max_steps_per_epoch=1)


def write_slices(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run of one model and one fold, trained for one step, with its ensemble written as 03 does."""
    root = tmp_path_factory.mktemp("user_work")
    run_dir = root / "runs" / "x"
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"name": [f"Image_{i:04d}.png" for i in range(8)], "percentage": [i * 10.0 for i in range(8)],
                          "subject": [i // 2 for i in range(8)], "fold": [i % 2 for i in range(8)]})
    split = train.SplitImages(frame, rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
    predictions = train.train_model(TrainConfig(**TINY), run_dir, split, progress=False)
    per_model = ensemble.average_checkpoints_and_folds(predictions.assign(model="t"))
    ensemble.write_ensemble(ensemble.combine_models(per_model, ["t"]), RunPaths(run_dir).ensemble, ["t"])
    ensemble.write_calibration(per_model, ["t"], frame, RunPaths(run_dir).ensemble)
    slices = write_slices(root / "slices", ["Image_0100.png", "Image_0101.png"])
    return run_dir, slices


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- the export


def test_an_export_never_replaces_a_folder_that_is_not_an_earlier_export(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.tex").write_text("months of work")
    assert predict.main(["export", str(run_dir), "--out", str(mine)]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "is not an export of this project" in message and str(mine) in message
    assert tree(mine) == {"notes/thesis.tex": b"months of work"}
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(predict.PredictError, match="is a file, not a folder"):
        predict.export_run(run_dir, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "mine"


def test_an_earlier_export_is_replaced_but_not_files_added_to_it(tiny_run, tmp_path):
    run_dir, slices = tiny_run
    out = tmp_path / "export"
    out.mkdir()  # an empty folder may be filled
    predict.export_run(run_dir, out)
    first = tree(out)
    predict.export_run(run_dir, out)  # an earlier export of this project: replaced whole
    assert tree(out).keys() == first.keys()
    assert predict.predict_images(out, [slices], progress=False)["prediction"].between(0, 100).all()
    (out / "my_results.csv").write_text("a,1\n")
    with pytest.raises(predict.PredictError, match=r"also holds .*my_results.csv \(not in its manifest\)"):
        predict.export_run(run_dir, out)
    assert (out / "my_results.csv").read_text() == "a,1\n"


def test_an_export_never_writes_into_a_run_or_over_one(tiny_run):
    run_dir, _ = tiny_run
    before = tree(run_dir)
    for out, fragment in [(run_dir, "contains the run"), (run_dir.parent, "contains the run"),
                          (run_dir / "models", "lies inside the run"), (run_dir / "ensemble", "lies inside the run"),
                          (run_dir / "models" / "t" / "new", "lies inside the run")]:
        with pytest.raises(predict.PredictError, match=fragment):
            predict.export_run(run_dir, out)
    assert tree(run_dir) == before  # nothing of the run touched
    predict.export_run(run_dir)  # the run's own export/ is where it belongs
    assert (RunPaths(run_dir).export / predict.MANIFEST).is_file()


# ------------------------------------------------------------------------------------------- edited runs


@pytest.mark.parametrize("edit", ["img_size", "tta_hflip", "arch", "ensemble models"])
def test_a_run_file_edited_after_training_is_refused_not_used(tiny_run, tmp_path, edit):
    run_dir, slices = tiny_run
    copy = tmp_path / "run"
    os.system(f"cp -a {run_dir} {copy}")
    target = RunPaths(copy).fold("t", 0) / "config.yaml"
    if edit == "ensemble models":
        target = RunPaths(copy).ensemble / "ensemble_models.txt"
        target.write_text("t\nt\n")  # the same model counted twice: other means for several models
    else:
        saved = yaml.safe_load(target.read_text())
        saved[edit] = {"img_size": 48, "tta_hflip": True, "arch": "resnet18"}[edit]
        target.write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(files.IntegrityError, match=f"{target.name} is corrupt.*(rerun|--force)"):
        predict.predict_images(copy, [slices], progress=False)
    with pytest.raises(files.IntegrityError, match=target.name):
        predict.export_run(copy)


# ------------------------------------------------------------------------------------------- finding images


def test_hidden_folders_are_skipped_and_two_images_with_one_name_are_refused(tmp_path):
    folder = write_slices(tmp_path / "scan", ["Image_0370.png", "Image_0371.png"])
    write_slices(folder / ".ipynb_checkpoints", ["Image_0370.png"])  # Jupyter's copies
    (folder / ".hidden.png").write_bytes(b"")
    found = predict.find_images([folder])
    assert found["name"].tolist() == ["Image_0370.png", "Image_0371.png"] and ".ipynb" not in "".join(found["path"])
    other = write_slices(tmp_path / "other", ["Image_0370.png"])
    with pytest.raises(predict.PredictError, match=r"two images are named 'Image_0370.png' \(.*scan/Image_0370.png "
                                                   r"and .*other/Image_0370.png|other/Image_0370.png and .*scan/"):
        predict.find_images([folder, other])
    assert len(predict.find_images([folder, folder / "Image_0370.png"])) == 2  # one file named twice: one row


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    real = write_slices(tmp_path / "elsewhere" / "scan7", ["Image_0001.png", "Image_0002.png"])
    folder = tmp_path / "patients"
    folder.mkdir()
    (folder / "scan7").symlink_to(real, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a link to its own parent
    assert predict.find_images([folder])["name"].tolist() == ["Image_0001.png", "Image_0002.png"]


def test_label_names_that_are_paths_in_the_images_folder_are_their_file_names(tmp_path):
    images = write_slices(tmp_path / "Train" / "Images", ["Image_0000.png", "Image_0001.png"])
    labels = tmp_path / "Train" / "Train.csv"
    labels.write_text(f"{images / 'Image_0000.png'},0.0,0\nImages/Image_0001.png,10.0,0\n")
    frame = data.load_split(tmp_path, "Train")
    assert frame["name"].tolist() == ["Image_0000.png", "Image_0001.png"]
    labels.write_text(f"{tmp_path / 'somewhere' / 'Image_0000.png'},0.0,0\nImage_0001.png,10.0,0\n")
    with pytest.raises(data.DataError, match=r"is a path outside the images folder .*name each slice by its file "
                                             r"name \(e.g. Image_0000.png\)"):
        data.load_split(tmp_path, "Train")


# ------------------------------------------------------------------------------------------- arguments, saliency


@pytest.mark.parametrize("args, fragment", [(["--out", "FOLDER"], "is a folder: give the CSV file"),
                                            (["--out", "x.csv", "--batch-size", "0"], "--batch-size 0: give 1 or more"),
                                            (["--out", "x.csv", "--batch-size", "-1"], "--batch-size -1"),
                                            (["--out", "x.csv", "--workers", "-2"], "--workers -2")])
def test_predict_arguments_are_checked_before_any_work(tmp_path, capsys, monkeypatch, args, fragment):
    def never(*_args, **_kwargs):
        raise AssertionError("loaded the ensemble before checking the arguments")

    monkeypatch.setattr(predict, "load_ensemble", never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FOLDER").mkdir()
    assert predict.main(["RUN", "IMAGES", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err


def test_saliency_maps_that_cannot_localise_are_refused_before_any_work(tiny_run, tmp_path, capsys):
    run_dir, slices = tiny_run
    assert explain.main([str(run_dir), str(slices), "--out", str(tmp_path / "explained")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is 1x1: a saliency map cannot localise" in err and "img_size >= 64" in err
    assert not (tmp_path / "explained").exists()


def test_force_never_deletes_what_a_run_does_not_write(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "x"
    (run_dir / "models").mkdir(parents=True)
    (run_dir / "analysis.ipynb").write_text("a user's notebook, saved next to the run")
    assert pipeline.main(["--workdir", str(tmp_path), "--name", "x", "--force", "--kernel", "python3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force would delete" in err and "analysis.ipynb" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["analysis.ipynb", "models"]  # not even a lock left
    (run_dir / "analysis.ipynb").unlink()
    (run_dir / ".run_config.yaml.tmp-host-1").write_text("")  # a killed writer's debris is a run's own
    pipeline.check_force(run_dir, force=True)


def test_an_edited_recipe_is_refused_before_a_fold_is_reused(tiny_run, tmp_path):
    # the profile and the saved config.yaml edited alike: the fold would look like the new recipe's
    run_dir, _ = tiny_run
    copy = tmp_path / "run"
    os.system(f"cp -a {run_dir} {copy}")
    saved = RunPaths(copy).fold("t", 0) / "config.yaml"
    saved.write_text(saved.read_text().replace("img_size: 32", "img_size: 48"))
    with pytest.raises(files.IntegrityError, match="config.yaml is corrupt"):
        train.check_same_recipe(TrainConfig(**{**TINY, "img_size": 48}), saved)


def test_a_file_an_older_version_left_unrecorded_is_read_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "fold0"
    files.write_text(folder / "predictions.csv", "x\n", record=True)
    (folder / "config.yaml").write_text("img_size: 32\n")  # written before config.yaml had a record
    with pytest.raises(files.IntegrityError, match="has no integrity record"):
        files.verify(folder / "config.yaml", "rerun")
    assert files.verify(folder / "config.yaml", "rerun", older_ok=True) == folder / "config.yaml"
    assert "older version" in caplog.text


def test_an_edited_calibration_is_refused_by_the_export(tiny_run, tmp_path):
    run_dir, slices = tiny_run
    copy = tmp_path / "run"
    os.system(f"cp -a {run_dir} {copy}")
    calibration = RunPaths(copy).ensemble / ensemble.calibration_name()
    calibration.write_text(calibration.read_text().replace("\n0", "\n9", 1))
    with pytest.raises(files.IntegrityError, match="ensemble_calibration.csv is corrupt"):
        predict.export_run(copy, tmp_path / "export")
    with pytest.raises(files.IntegrityError, match="ensemble_calibration.csv is corrupt"):
        predict.predict_images(copy, [slices], progress=False, level=0.9)
    assert not (tmp_path / "export").exists()


def test_an_averaged_export_of_a_run_rounded_the_authors_way_is_refused(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    copy = tmp_path / "run"
    os.system(f"cp -a {run_dir} {copy}")
    per_model = ensemble.average_checkpoints_and_folds(ensemble.load_predictions(copy).assign(model="t"))
    ensemble.write_ensemble(ensemble.combine_models(per_model, ["t"], "authors"), RunPaths(copy).ensemble, ["t"],
                            rounding="authors")
    with pytest.raises(predict.PredictError, match="cannot repeat: export it without --average-checkpoints"):
        predict.export_run(copy, tmp_path / "export", average_checkpoints=True)
    assert predict.export_run(copy, tmp_path / "export")["ensemble"]["rounding"] == "authors"


def test_weights_are_checked_only_for_models_still_to_train(tmp_path, monkeypatch):
    from utils import models, runs

    checked = []
    monkeypatch.setattr(models, "check_model_weights", lambda configs, made=(): checked.append(
        sorted(c.model_name for c in configs)))
    run = runs.resolve("demo", {"pretrained": True}, run_dir=tmp_path / "run", check_archs=False)
    runner = type("Local", (), {"scheduler": None})()
    pipeline.check_weights(run, runner)
    first = run.train[0]
    for fold in first.folds:  # a rerun: this model's folds are trained, nothing rebuilds it from its weights
        files.write_text(RunPaths(run.paths.run_dir).fold(first.model_name, fold) / "predictions.csv", "x\n")
    pipeline.check_weights(run, runner)
    pipeline.check_weights(run, runner, stages=["03_ensemble", "05_submit"])  # no training stage: nothing to check
    pipeline.check_weights(run, runner, force=True)  # --force retrains everything
    everything = sorted(c.model_name for c in run.train + run.pseudo)
    assert checked == [everything, [n for n in everything if n != first.model_name], everything]


def test_a_dry_run_checks_the_kernel_too(tmp_path, capsys):
    assert pipeline.main(["--workdir", str(tmp_path), "--dry-run", "--kernel", "no-such-kernel"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kernel no-such-kernel: no such Jupyter kernel" in err
