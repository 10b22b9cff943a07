"""Nothing silently wrong: each case of the reliability audit (docs/reliability.md) fails with one message naming the
thing and the fix, or gives the right result. Diverged trainings, changed data under the same run, an edited
decode cache, an edited export manifest, odd file names through every CSV, duplicate settings, a full disk,
Ctrl-C and SIGTERM, and what is checked before the pipeline's first notebook."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from utils import config, csvfiles, data, ensemble, files, metrics, pipeline, predict, submission, train
from utils.config import REPO_ROOT, ConfigError, RunPaths, TrainConfig

TINY = dict(model_name="t", arch="resnet10t", head="reg", pooling="avg", img_size=32, epochs=2, warmup_epochs=0,
            batch_size=4, save_last_k=1, folds=[0], sam="none", optimizer="adamw", randaug_n=0, device="cpu",
            num_workers=0, max_steps_per_epoch=2)


def tiny_split(n=16, seed=0, shift=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    images = np.clip(images.astype(int) + shift, 0, 255).astype(np.uint8)
    frame = pd.DataFrame({"name": [f"Image_{i:04d}.png" for i in range(n)],
                          "percentage": [float(i * 6) for i in range(n)],
                          "subject": [i // 2 for i in range(n)], "fold": [i % 2 for i in range(n)]})
    return train.SplitImages(frame, images)


def cli(module, *args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


# ------------------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("lr, optimizer", [(1000.0, "adamw"), (1e5, "sgd")])
def test_a_diverging_training_stops_at_once_naming_model_fold_epoch_and_the_fixes(tmp_path, lr, optimizer):
    cfg = TrainConfig(**{**TINY, "lr": lr, "optimizer": optimizer})
    with pytest.raises(train.TrainingDiverged, match=r"\[t fold 0\] diverged at epoch 1/2: .*lower lr .*clip_grad"):
        train.train_fold(cfg, 0, tiny_split(), tmp_path / "fold0", progress=False)
    assert not (tmp_path / "fold0" / "predictions.csv").exists()  # nothing of it reaches an ensemble


def test_non_finite_predictions_never_reach_an_ensemble_or_a_submission(tmp_path):
    fold_dir = RunPaths(tmp_path).fold("m", 0)
    frame = pd.DataFrame({"split": ["oof", "Val"], "name": ["a.png", "b.png"], "epoch": [1, 1],
                          "prediction": [12.0, float("nan")]})
    csvfiles.write_frame(fold_dir / "predictions.csv", frame, record=True)  # a record that accepts it
    with pytest.raises(ensemble.EnsembleError, match=r"predictions.csv: 1 of 2 predictions are NaN.*b.png.*lower lr"):
        ensemble.load_predictions(tmp_path)
    per_model = pd.DataFrame({"model": ["m", "m"], "split": ["Val", "Val"], "name": ["a", "b"],
                              "prediction": [1.0, np.inf]})
    with pytest.raises(ensemble.EnsembleError, match="cannot be averaged"):
        ensemble.combine_models(per_model)
    disjoint = pd.DataFrame({"model": ["m", "n"], "split": ["Val", "Val"], "name": ["a", "b"], "prediction": [1.0, 2]})
    with pytest.raises(ensemble.EnsembleError, match="no slice in common"):
        ensemble.combine_models(disjoint)
    with pytest.raises(ensemble.EnsembleError, match="refusing to write"):
        ensemble.write_ensemble(pd.DataFrame(columns=["split", "name", "prediction"]), tmp_path / "e", ["m"])
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_the_pipeline_with_a_diverging_lr_exits_with_one_line_and_writes_no_submission(tmp_path, phantom_set):
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"params": {k: v for k, v in TINY.items() if k not in ("model_name", "folds")},
                                       "models": [{"model_name": "m"}]}))
    result = cli("utils.pipeline", "--workdir", tmp_path, "--data", phantom_set, "--profile", profile,
                 "--kernel", "python3", "-p", "lr", "1000", "-p", "folds", "[0]", "-p", "n_folds", "3")
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "m fold 0] diverged at epoch 1" in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "submissions" / "p.csv").exists()
    assert not (tmp_path / "runs" / "p" / "ensemble").exists()


# ------------------------------------------------------------------------------------------- data identity


def test_a_fold_is_never_reused_on_changed_images_or_labels_under_the_same_names(tmp_path):
    cfg = TrainConfig(**TINY)
    train.train_fold(cfg, 0, tiny_split(), tmp_path / "f", progress=False)
    with pytest.raises(train.FoldMismatch, match=r"trained with other data: .*images or labels changed.*--force"):
        train.train_fold(cfg, 0, tiny_split(shift=9), tmp_path / "f", progress=False)  # every image replaced
    relabelled = tiny_split()
    relabelled.frame.loc[3, "percentage"] = 99.0
    with pytest.raises(train.FoldMismatch, match="other data"):
        train.train_fold(cfg, 0, relabelled, tmp_path / "f", progress=False)
    # the same data again: reused
    again = train.train_fold(cfg, 0, tiny_split(), tmp_path / "f", progress=False)
    assert set(again["split"]) == {"oof"}
    # a record another version wrote (another digest format) is not compared as if it were this one's
    record = tmp_path / "f" / train.INPUTS_FILE
    files.write_text(record, json.dumps({**json.loads(record.read_text()), "format": 0}), record=True)
    with pytest.raises(train.FoldMismatch, match=r"another version of this suite \(digest format 0, this version's 1"):
        train.train_fold(cfg, 0, tiny_split(), tmp_path / "f", progress=False)


def test_a_changed_val_image_is_predicted_again_not_reused(tmp_path, caplog):
    caplog.set_level("INFO", logger="utils")
    cfg = TrainConfig(**TINY)
    val = tiny_split(n=4, seed=5)
    first = train.train_fold(cfg, 0, tiny_split(), tmp_path / "f", {"Val": val}, progress=False)
    changed = train.SplitImages(val.frame, val.images.copy())
    changed.images[2] = 255 - changed.images[2]
    again = train.train_fold(cfg, 0, tiny_split(), tmp_path / "f", {"Val": changed}, progress=False)
    name = val.frame["name"][2]
    before = first[(first["split"] == "Val") & (first["name"] == name)]["prediction"].to_numpy()
    after = again[(again["split"] == "Val") & (again["name"] == name)]["prediction"].to_numpy()
    assert len(after) == 1 and after[0] != pytest.approx(before[0])
    assert "1 of them changed since they were predicted" in caplog.text
    gone = train.train_fold(cfg, 0, tiny_split(), tmp_path / "f", {}, progress=False)  # the Val folder removed
    assert set(gone["split"]) == {"oof"}
    assert set(ensemble.read_predictions(tmp_path / "f" / "predictions.csv")["split"]) == {"oof"}


def test_the_data_digest_costs_little_next_to_decoding(tmp_path):
    """The digest hashes the decoded pixels once per cache (checked when opened); here against the decoding it
    follows, on the same machine in the same test (a ratio, not a time)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (224, 224), dtype=np.uint8)).save(folder / f"Image_{i:04d}.png")
    frame = pd.DataFrame({"name": sorted(p.name for p in folder.iterdir())})
    frame["path"] = [str(folder / n) for n in frame["name"]]
    started = time.perf_counter()
    images = data.cached_images(frame, tmp_path / "cache", 96, 3, "Train")
    decoding = time.perf_counter() - started
    started = time.perf_counter()
    data.digest_rows(images)
    assert time.perf_counter() - started < 0.25 * decoding


# ------------------------------------------------------------------------------------------- the decode cache


def test_a_cache_edited_in_place_is_rebuilt_never_trained_on(tmp_path, phantom_set, caplog):
    frame = data.load_split(phantom_set, "Train")
    images = np.array(data.cached_images(frame, tmp_path, 16, 1, "Train"))
    target = data.cache_path(frame, tmp_path, 16, 1, "Train")
    raw = bytearray(target.read_bytes())
    raw[-10:] = bytes(255 - b for b in raw[-10:])  # the same size, other pixels
    stat = target.stat()
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    again = data.cached_images(frame, tmp_path, 16, 1, "Train")
    np.testing.assert_array_equal(again, images)
    assert "differs from its digests" in caplog.text and "rebuilding" in caplog.text


# ------------------------------------------------------------------------------------------- the export


def test_an_export_manifest_must_list_every_file_prediction_loads(tmp_path):
    export = tmp_path / "export"
    weights = export / "models" / "m" / "fold0" / "checkpoint_epoch001.pt"
    files.save_torch({"w": 1}, weights)
    TrainConfig(**TINY).save_yaml(export / "models" / "m" / "config.yaml")
    entry = {"size": weights.stat().st_size, "sha256": files.file_digest(weights)}
    config_file = export / "models" / "m" / "config.yaml"
    manifest = {"format": predict.EXPORT_FORMAT, "run": "runs/x", "ensemble": {"models": ["m"]},
                "models": [{"name": "m", "config": "models/m/config.yaml",
                            "folds": {"0": ["models/m/fold0/checkpoint_epoch001.pt"]}}],
                "files": {"models/m/config.yaml": {"size": config_file.stat().st_size,
                                                   "sha256": files.file_digest(config_file)}}}
    (export / predict.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(predict.PredictError, match=r"checkpoint_epoch001.pt \(model m\) is loaded .* no size and "
                                                   r"digest in the manifest's files.*refused"):
        predict.load_ensemble(export)
    manifest["files"]["models/m/fold0/checkpoint_epoch001.pt"] = entry
    (export / predict.MANIFEST).write_text(json.dumps(manifest))
    assert predict.load_ensemble(export)[0].name == TINY["model_name"]
    del manifest["files"]
    (export / predict.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(predict.PredictError, match="has no 'files'"):
        predict.load_ensemble(export)


# ------------------------------------------------------------------------------------------- CSV files

ODD_NAMES = ["comma,name.png", 'a "quoted" name.png', "new\nline.png", " leading space.png", "ünïcode €.png",
             "semi;colon.png"]


def test_odd_file_names_round_trip_through_the_submission_and_the_scorer(tmp_path):
    rows = pd.DataFrame({"name": ODD_NAMES, "prediction": [float(i * 10) for i in range(len(ODD_NAMES))]})
    sub = tmp_path / "sub.csv"
    submission.write_submission(rows, ODD_NAMES, sub)
    back = csvfiles.read_name_value_rows(sub, "prediction")
    assert sorted(back.names) == sorted(ODD_NAMES) and "Image" not in sub.read_text()
    truth = tmp_path / "truth.csv"
    csvfiles.write_rows(truth, [(n, f"{i * 10 + 1:.1f}", 0) for i, n in enumerate(ODD_NAMES)], line_end="\r\n")
    assert metrics.score_files(sub, truth)["MAE"] == pytest.approx(1.0)
    table = tmp_path / "t.csv"
    csvfiles.write_frame(table, rows.assign(split="Val"))
    pd.testing.assert_frame_equal(csvfiles.read_frame(table, ("name", "split"))[["name", "prediction"]],
                                  rows, check_dtype=False)


def test_a_name_that_is_not_utf8_is_refused_with_the_reason(tmp_path):
    odd = os.fsdecode(b"Image_\xff.png")
    with pytest.raises(csvfiles.CsvError, match=r"not valid UTF-8.*rename the file"):
        csvfiles.format_rows([(odd, 1)])
    folder = tmp_path / "Val"
    folder.mkdir()
    try:
        (folder / odd).write_bytes(b"")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    with pytest.raises(data.DataError, match="not valid UTF-8"):
        predict.find_images([folder])


@pytest.mark.parametrize("payload, fragment", [
    (b"PK\x03\x04zipzipzip", "is a zip archive, not a CSV: unzip it"),
    ("Image_0000.png,1.0\n".encode("utf-16"), "is UTF-16 text"),
    ("Imäge_0000.png,1.0\n".encode("latin-1"), "is not UTF-8 text .*Latin-1"),
])
def test_the_scorer_and_the_label_reader_name_a_file_that_is_no_utf8_csv(tmp_path, payload, fragment):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(payload)
    with pytest.raises(csvfiles.CsvError, match=fragment):
        csvfiles.read_name_value_rows(bad)
    with pytest.raises(data.DataError, match=fragment):
        data.read_labels(bad)
    good = tmp_path / "good.csv"
    good.write_text("Image_0000.png,1.0\n")
    result = cli("utils.metrics", bad, good)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "bad.csv" in result.stderr


def test_images_the_reader_does_not_take_are_named(tmp_path, caplog):
    folder = tmp_path / "data" / "Val" / "Images"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "Image_0000.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "Image_0001.bmp")
    (folder / "notes.txt").write_text("companion files are not worth a word")
    frame = data.load_split(tmp_path / "data", "Val")
    assert list(frame["name"]) == ["Image_0000.png"]
    assert "skipped 1 file(s) that are not PNG/JPEG slices (Image_0001.bmp)" in caplog.text


# ------------------------------------------------------------------------------------------- settings files


@pytest.mark.parametrize("text, key, line", [
    ("params:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\nmodels:\n  - {model_name: m}\n", "lr", 4),
    ("params:\n  lr: 0.1\nparams:\n  epochs: 3\nmodels:\n  - {model_name: m}\n", "params", 3),
    ("models:\n  - {model_name: m, head: reg, head: ldl}\n", "head", 2),
])
def test_a_duplicate_key_in_a_profile_names_the_key_and_the_line(tmp_path, text, key, line):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"p.yaml, line {line}: duplicate key '{key}'"):
        config.load_profile(path)


def test_an_empty_profile_and_a_repeated_p_are_refused_before_the_lock_is_taken(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert pipeline.main(["--workdir", str(tmp_path / "w"), "--profile", str(empty)]) == 1
    assert "empty.yaml is empty" in capsys.readouterr().err
    assert pipeline.main(["--workdir", str(tmp_path / "w"), "-p", "lr", "0.1", "-p", "lr", "0.2"]) == 1
    assert "-p lr is given twice" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # no run folder, no lock


# ------------------------------------------------------------------------------------------- before 00 runs


@pytest.mark.parametrize("args, fragment", [
    (["-p", "device", "cuda:7"], "device='cuda:7': .*on this machine; use device auto or cpu"),
    (["--scheduler", "tcp://127.0.0.1:9"], "no Dask scheduler answers there within 5 s"),
    (["--jobs", "999"], "--jobs 999: this machine lets the run use \\d+ core"),
])
def test_what_the_machine_must_offer_is_checked_before_anything_runs(tmp_path, capsys, args, fragment):
    started = time.perf_counter()
    assert pipeline.main(["--workdir", str(tmp_path)] + args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(fragment, err), err
    assert list(tmp_path.iterdir()) == []  # nothing decoded, generated or written
    assert time.perf_counter() - started < 30


# ------------------------------------------------------------------------------------------- a full disk


DISK_FULL_SCRIPT = r"""
import sys
import torch
from utils import files, train
from utils.config import TrainConfig
sys.path.insert(0, "tests")
from test_refusals import TINY, tiny_split
torch.set_num_threads(1)
try:
    train.train_fold(TrainConfig(**TINY), 0, tiny_split(), sys.argv[1], progress=False)
    print("trained")
except files.DiskFullError as error:
    print("disk full:", error)
"""


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_names_the_file_keeps_nothing_partial_and_the_rerun_resumes(tmp_path):
    """A real full file system: a 3 MiB tmpfs in a private mount namespace (the checkpoint needs ~20 MiB), then the
    same tmpfs grown, and the same command again."""
    if not _can_mount_tmpfs():
        pytest.skip("cannot mount a small tmpfs here (needs root and unshare); "
                    "test_a_simulated_full_disk covers the message")
    script = tmp_path / "train.py"
    script.write_text(DISK_FULL_SCRIPT)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    python = sys.executable
    shell = (f"mount -t tmpfs -o size=3m tmpfs {mnt} && {python} {script} {mnt}/fold; "
             f"echo FILES $(ls -A {mnt}/fold | tr '\\n' ' '); "
             f"mount -o remount,size=200m {mnt} && {python} {script} {mnt}/fold; "
             f"echo FILES $(ls -A {mnt}/fold | tr '\\n' ' ')")
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = result.stdout
    assert "disk full: no space left on device writing" in out and "/fold/" in out, result.stdout + result.stderr
    full_files, after = [line for line in out.splitlines() if line.startswith("FILES")]
    assert ".tmp-" not in full_files and "state.pt" not in full_files and "checkpoint" not in full_files
    assert "trained" in out and "predictions.csv" in after and ".tmp-" not in after


def test_a_simulated_full_disk_is_one_error_naming_the_file(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_space)
    with pytest.raises(files.DiskFullError, match=r"no space left on device writing .*x.csv .*rerun the same"):
        files.write_text(tmp_path / "x.csv", "a,b\n")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- Ctrl-C and SIGTERM


@pytest.mark.slow
def test_sigterm_to_predict_exits_143_in_one_line_and_leaves_no_temporary_files(tmp_path, phantom_set):
    """utils.predict decodes the images into a temporary folder: a SIGTERM (a scheduler's kill) must remove it."""
    from utils import phantoms

    big = tmp_path / "big"
    phantoms.generate_phantoms(big, subjects=6, size=256, seed=1, num_workers=1)
    run_dir = tmp_path / "run"
    weights = RunPaths(run_dir).fold("m", 0)
    cfg = TrainConfig(**TINY)
    train.train_fold(cfg, 0, tiny_split(), weights, progress=False)
    cfg.save_yaml(weights.parent / "config.yaml")
    ensemble.write_ensemble(pd.DataFrame({"split": ["oof"], "name": ["x"], "prediction": [1.0]}),
                            RunPaths(run_dir).ensemble, ["m"])
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "utils.predict", str(run_dir), str(big), "--out",
                                str(tmp_path / "out.csv")], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(temporary), "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not any(temporary.iterdir()):  # decoding has begun
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines() == ["terminated (SIGTERM): what was finished is kept; run the same command "
                                        "again to resume"]
    assert list(temporary.iterdir()) == [] and not (tmp_path / "out.csv").exists()


def terminal_signals() -> None:
    """In the child: SIGINT as a terminal's foreground job has it (a test run from a background shell inherits it
    ignored, and an ignored SIGINT stays ignored in Python)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_signal_while_a_notebook_starts_stops_the_pipeline(tmp_path, phantom_set, sig, code, said):
    """papermill's notebook client takes SIGINT/SIGTERM over while a notebook runs (to shut its kernel down) and
    carried on after it: the signal must still stop the run, with its exit status and its one line last."""
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"params": {**{k: v for k, v in TINY.items() if k != "model_name"},
                                                  "n_folds": 3}, "models": [{"model_name": "m"}]}))
    command = [sys.executable, "-m", "utils.pipeline", "--workdir", str(tmp_path), "--data", str(phantom_set),
               "--profile", str(profile), "--kernel", "python3"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=terminal_signals)
    started = tmp_path / "runs" / "p" / "notebooks" / "01_folds.ipynb"  # papermill writes it as the kernel starts
    deadline = time.time() + 300
    while time.time() < deadline and not started.is_file() and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(said)  # the kernel may add its own shutdown noise before it
    assert not (tmp_path / "submissions" / "p.csv").exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_pipeline_in_one_line_with_130_and_the_rerun_resumes(tmp_path, phantom_set):
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"params": {**{k: v for k, v in TINY.items() if k != "model_name"},
                                                  "epochs": 3, "max_steps_per_epoch": 3, "n_folds": 3},
                                       "models": [{"model_name": "m"}]}))
    command = [sys.executable, "-m", "utils.pipeline", "--workdir", str(tmp_path), "--data", str(phantom_set),
               "--profile", str(profile), "--kernel", "python3"]
    # a terminal's Ctrl-C goes to the whole foreground process group: the run, its kernels and Dask workers
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=terminal_signals)
    history = RunPaths(tmp_path / "runs" / "p").fold("m", 0) / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not history.is_file():  # the training job has finished an epoch
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err + out[-3000:]
    assert err.strip().splitlines() == ["interrupted (Ctrl-C): what was finished is kept; run the same command "
                                        "again to resume"]
    time.sleep(2)  # the job processes end with their run
    assert not list(tmp_path.rglob(".*.tmp-*"))
    rerun = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming after epoch" in rerun.stdout or "already done" in rerun.stdout
