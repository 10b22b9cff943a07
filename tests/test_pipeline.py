"""End to end: all six notebooks through papermill on a tiny phantom set, the submission's bytes, resume, CLI errors."""
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from utils import pipeline
from utils.config import REPO_ROOT

TINY_PROFILE = {
    "description": "test",
    "params": {"img_size": 32, "epochs": 1, "warmup_epochs": 0, "batch_size": 8, "lr": 0.001, "optimizer": "adamw",
               "sam": "sam", "folds": [0, 1], "n_folds": 3, "save_last_k": 1, "randaug_n": 1, "num_workers": 0},
    "models": [{"model_name": "a_ldl", "arch": "resnet18", "head": "ldl", "pooling": "hybrid"},
               {"model_name": "b_reg", "arch": "resnet18", "head": "reg", "pooling": "avg"}],
    "pseudo_label_models": ["a_ldl"],
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, phantom_set):
    root = tmp_path_factory.mktemp("pipeline")
    data = phantom_set
    profile = root / "tiny.yaml"
    profile.write_text(yaml.safe_dump(TINY_PROFILE))
    argv = ["--workdir", str(root), "--data", str(data), "--profile", str(profile), "--name", "tiny",
            "--kernel", "python3"]
    assert pipeline.main(argv) == 0
    return root, data, argv


def executed_text(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "\n".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o.get("text", []))
                     for c in cells if c["cell_type"] == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_submission_bytes(tiny_run):
    root, data, _ = tiny_run
    csv = root / "submissions" / "tiny.csv"
    lines = csv.read_bytes().decode().split("\n")
    assert lines[-1] == "" and all(lines[:-1])  # LF-terminated rows, no blank lines
    rows = [line.split(",") for line in lines[:-1]]
    val_images = sorted(p.name for p in (data / "Val").rglob("*.png"))
    assert [r[0] for r in rows] == val_images  # no header, sorted, every Val image exactly once
    values = [float(r[1]) for r in rows]
    assert all(0 <= v <= 100 and v == int(v) for v in values)  # clipped and rounded half up
    assert (root / "submissions" / "tiny.zip").is_file()


@pytest.mark.slow
def test_every_stage_left_an_executed_notebook(tiny_run):
    root, _, _ = tiny_run
    executed = sorted(p.stem for p in (root / "runs" / "tiny" / "notebooks").glob("*.ipynb"))
    assert executed == ["00_eda", "01_folds", "02_train__a_ldl", "02_train__a_ldl_pl", "02_train__b_reg",
                        "03_ensemble", "04_pseudo_label", "04_pseudo_label__after_retraining", "05_submit",
                        "06_explain"]
    run = root / "runs" / "tiny"
    assert (run / "pseudo" / "pseudo_labels.csv").is_file() and (run / "pseudo" / "table3.csv").is_file()
    assert (run / "ensemble" / "final_models.txt").read_text().split() == ["a_ldl_pl", "b_reg"]
    assert sorted(p.name for p in (run / "figures").glob("*.png"))  # figures saved next to the notebooks
    assert "scored against Val labels: MAE" in executed_text(run / "notebooks" / "05_submit.ipynb")


@pytest.mark.slow
def test_rerun_reuses_finished_folds(tiny_run):
    root, _, argv = tiny_run
    checkpoints = sorted((root / "runs" / "tiny" / "models").rglob("checkpoint_epoch*.pt"))
    before = {p: p.stat().st_mtime_ns for p in checkpoints}
    assert pipeline.main(argv + ["--stages", "02_train"]) == 0
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == before
    text = executed_text(root / "runs" / "tiny" / "notebooks" / "02_train__a_ldl.ipynb")
    assert text.count("already done: reusing") == 2


@pytest.mark.parametrize("args, message", [
    (["--profile", "no_such_profile"], "profile 'no_such_profile' not found"),
    (["-p", "no_such_param", "3"], "-p: unknown setting .no_such_param."),
    (["--data", "/no/such/folder"], "no such folder"),
])
def test_argument_errors_are_clear(tmp_path, capsys, args, message):
    assert pipeline.main(["--workdir", str(tmp_path), "--stages", "00_eda"] + args) == 1
    assert re.search(message, capsys.readouterr().err)


def test_run_all_sh_rejects_bad_arguments():
    result = subprocess.run([str(REPO_ROOT / "run_all.sh"), "--stages", "nope"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and "unknown stages" in result.stderr


@pytest.mark.slow
def test_cpu_profile_on_a_few_real_crops(shared_dir, tmp_path):
    """The `cpu` profile end to end on ~40 real crops of 8 subjects, 1 epoch at 32 px (Train only: OOF submission),
    with the self-supervised pretraining step on (BYOL, 1 epoch, on the crops left after near-duplicate removal):
    its weights become the model's pretrained_file."""
    import pandas as pd

    labels = pd.read_csv(shared_dir / "crops" / "Train" / "Train.csv", header=None, names=["name", "pct", "subject"])
    chosen = labels[labels["subject"].isin(sorted(labels["subject"].unique())[:8])].groupby("subject").head(5)
    images = tmp_path / "crops" / "Train" / "Images"
    images.mkdir(parents=True)
    for name in chosen["name"]:
        (images / name).symlink_to(shared_dir / "crops" / "Train" / "Images" / name)
    chosen.to_csv(tmp_path / "crops" / "Train" / "Train.csv", header=False, index=False, lineterminator="\r\n")
    argv = ["--workdir", str(tmp_path), "--data", str(tmp_path / "crops"), "--profile", "cpu", "--name", "cpu_tiny",
            "--kernel", "python3", "-p", "epochs", "1", "-p", "warmup_epochs", "0", "-p", "save_last_k", "1",
            "-p", "img_size", "32", "-p", "selfsup_epochs", "1", "-p", "selfsup_method", "byol",
            "-p", "selfsup_dedup", "0.95"]
    assert pipeline.main(argv) == 0
    weights = tmp_path / "runs" / "cpu_tiny" / "selfsup" / "resnet10t_3ch_32px_byol_e1_dedup0.95.pth"
    history = pd.read_csv(tmp_path / "runs" / "cpu_tiny" / "selfsup" / f"{weights.name}.history.csv")
    assert weights.is_file() and 2 <= history["slices"].iloc[0] < len(chosen)  # near-duplicates left out
    trained = yaml.safe_load((tmp_path / "runs" / "cpu_tiny" / "models" / "r10t_reg_avg" / "fold0" / "config.yaml")
                             .read_text())
    assert trained["pretrained_file"] == str(weights)
    rows = (tmp_path / "submissions" / "cpu_tiny.csv").read_text().splitlines()
    held_out = pd.read_csv(tmp_path / "runs" / "cpu_tiny" / "folds.csv").query("fold in [0, 1]")["name"]
    assert sorted(r.split(",")[0] for r in rows) == sorted(held_out)  # out-of-fold rows of the two trained folds
    submit = tmp_path / "runs" / "cpu_tiny" / "notebooks" / "05_submit.ipynb"
    assert "OUT-OF-FOLD predictions on Train" in executed_text(submit)


@pytest.mark.slow
def test_the_notebooks_opened_in_jupyter_train_and_submit_by_themselves_in_order(tmp_path, phantom_set, monkeypatch):
    """What a user does in Jupyter: run 00 -> 05 with their defaults (the demo profile, role 'train'): 02 trains the
    profile's models, 04 labels Val and retrains the pseudo-label model itself, 05 writes the submission. Only the
    data and a shorter schedule are set, as a user would in the parameters cell."""
    import papermill

    monkeypatch.setenv("PERCOVID_WORKDIR", str(tmp_path))  # the kernels inherit it: outputs under tmp_path
    overrides = {"epochs": 1, "img_size": 32, "save_last_k": 1, "warmup_epochs": 0, "max_steps_per_epoch": 2,
                 "n_folds": 3, "num_workers": 0}
    for stem in pipeline.STAGES:
        notebook = REPO_ROOT / "notebooks" / f"{stem}.ipynb"
        wanted = {"overrides": overrides, "data_dir": str(phantom_set)}
        papermill.execute_notebook(str(notebook), str(tmp_path / f"{stem}.ipynb"), parameters=wanted,
                                   kernel_name="python3", cwd=str(REPO_ROOT / "notebooks"), progress_bar=False)
    run = tmp_path / "runs" / "interactive_demo"
    assert (run / "ensemble" / "final_models.txt").read_text().split() == ["resnet18_ldl_hybrid_pl",
                                                                           "resnet18_reg_avg_sam"]
    rows = (tmp_path / "submissions" / "interactive_demo.csv").read_text().splitlines()
    assert sorted(r.split(",")[0] for r in rows) == sorted(p.name for p in (phantom_set / "Val").rglob("*.png"))
    assert "scored against Val labels" in executed_text(tmp_path / "05_submit.ipynb")


def test_relative_paths_on_the_command_line_are_the_callers(tmp_path, monkeypatch):
    """run_all.sh runs in the checkout: a relative --data, --profile FILE or -p pretrained_file is taken from the
    folder it was called from (PERCOVID_CALLER_DIR), not from the checkout."""
    monkeypatch.setenv(pipeline.CALLER_DIR_ENV, str(tmp_path))
    args = pipeline.parse_args(["--data", "data", "--profile", "p/mine.yaml", "-p", "pretrained_file", "w.pth",
                                "-p", "epochs", "3"])
    assert args.data == str(tmp_path / "data") and args.profile == str(tmp_path / "p" / "mine.yaml")
    assert args.param == [["pretrained_file", str(tmp_path / "w.pth")], ["epochs", "3"]]
    assert pipeline.parse_args(["--profile", "cpu", "--data", "/abs/data"]).profile == "cpu"  # a name stays one
    assert pipeline.parse_args(["--data", "/abs/data"]).data == "/abs/data"
