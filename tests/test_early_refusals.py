"""Refused before any work, in one line: what can be known before the first notebook runs is checked then (a -p
model_name that merges or orphans models, weights that cannot be had or would run code, too few subjects for the
folds, an output folder that cannot be written), numbers are read as a user writes them, worker processes stop
quietly, and a notebook kernel that dies at start is started once more before the run stops in one line."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from utils import augment, cli, config, models, pipeline
from utils.config import REPO_ROOT, ConfigError, TrainConfig

TINY = {"arch": "resnet10t", "head": "reg", "pooling": "avg", "img_size": 32, "epochs": 1, "warmup_epochs": 0,
        "batch_size": 8, "optimizer": "adamw", "sam": "none", "save_last_k": 1, "randaug_n": 0, "folds": [0],
        "n_folds": 2, "max_steps_per_epoch": 1, "num_workers": 0}


def tiny_profile(folder, models=({"model_name": "m"},), pseudo=(), **params):
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"params": {**TINY, **params}, "models": list(models),
                                    "pseudo_label_models": list(pseudo)}))
    return path


def refused(argv, capsys) -> str:
    """pipeline.main's one error line (exit 1); fails if it printed more."""
    assert pipeline.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def cli_run(args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "utils.pipeline", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def only_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------- -p model_name


def test_a_model_name_given_to_every_model_is_refused_before_anything_runs(tmp_path, capsys):
    err = refused(["--workdir", str(tmp_path), "-p", "model_name", "x"], capsys)  # demo: 2 models
    assert "-p model_name 'x' gives all 2 models of the profile one name" in err
    assert "models` entry" in err and "copy of" in err
    assert list(tmp_path.iterdir()) == []


def test_a_model_name_that_orphans_a_pseudo_label_retrain_is_refused(tmp_path):
    profile = config.load_profile(tiny_profile(tmp_path, pseudo=["m"]))
    with pytest.raises(ConfigError, match=r"^-p model_name 'x' renames 'm', which the profile's pseudo_label_models "
                                          r"retrains: the retrain would silently not run; name each model"):
        config.check_run_settings(profile, {"model_name": "x"}, check_archs=False)
    # a one-model profile without retrains may still be renamed; and without -p nothing changes
    assert config.check_run_settings(config.load_profile(tiny_profile(tmp_path)), {"model_name": "x"},
                                     check_archs=False)["train"][0].model_name == "x"
    settings = config.check_run_settings(profile, {}, check_archs=False)
    assert [c.model_name for c in settings["pseudo"]] == ["m_pl"]


def test_a_retrain_named_like_another_model_is_refused(tmp_path):
    profile = config.load_profile(tiny_profile(tmp_path, models=[{"model_name": "m"}, {"model_name": "m_pl"}],
                                               pseudo=["m"]))
    with pytest.raises(ConfigError, match="the pseudo-label retrain of 'm' is named 'm_pl', like another model"):
        config.check_run_settings(profile, {}, check_archs=False)


# ------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("text, value", [
    ("1e-3", 0.001), ("5E-3", 0.005), ("1e+2", 100.0), ("-2e-5", -2e-5), ("1.5e3", 1500.0), (".5", 0.5),
    ("-.5", -0.5), ("0.001", 0.001), ("3", 3),
    ("1_000", 1000),  # YAML 1.1 reads it as 1000 already, and so does Python: kept
    ("abc", "abc"), ("1e", "1e"), ("e5", "e5"), (".e5", ".e5"), ("1e-3x", "1e-3x"), ("[1e-3, 2]", [0.001, 2]),
])
def test_p_values_are_numbers_as_a_user_writes_them(text, value):
    parsed = pipeline.parse_overrides([["key", text]])["key"]
    assert parsed == value and type(parsed) is type(value)


def test_a_profile_and_p_take_1e_3_as_a_number(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("params:\n  lr: 1e-3\n  weight_decay: 5E-3\n  sam_rho: .5e-1\nmodels:\n  - {model_name: m}\n")
    profile = config.load_profile(path)
    assert profile["params"] == {"lr": 0.001, "weight_decay": 0.005, "sam_rho": 0.05}
    settings = config.check_run_settings(profile, pipeline.parse_overrides([["lr", "2e-4"], ["min_lr", "1e-7"]]),
                                         check_archs=False)
    assert (settings["train"][0].lr, settings["train"][0].min_lr, settings["train"][0].weight_decay) == \
        (2e-4, 1e-7, 0.005)


def test_a_string_that_looks_like_a_number_round_trips_through_a_saved_recipe(tmp_path):
    cfg = TrainConfig(model_name="1e3", arch="1e5")
    cfg.save_yaml(tmp_path / "config.yaml")
    assert TrainConfig.load_yaml(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load("x: 1e3") == {"x": "1e3"}  # other readers of YAML are left as they were


# ------------------------------------------------------------------------------------------- weights


def test_pretrained_offline_is_refused_in_one_line_before_00(tmp_path):
    """A real offline machine: HF_HUB_OFFLINE and an empty HF_HOME, read by huggingface_hub when imported."""
    profile = tiny_profile(tmp_path, arch="resnet18")
    work = tmp_path / "work"
    started = time.perf_counter()
    result = cli_run(["--workdir", work, "--profile", profile, "-p", "pretrained", "true"],
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    seconds = time.perf_counter() - started
    line = only_line(result.stderr)
    assert result.returncode == 1 and "pretrained=true: the weights of 'resnet18'" in line
    assert "HF_HUB_OFFLINE is set" in line and "python -c \"import timm; timm.create_model('resnet18', " \
                                                 "pretrained=True)\"" in line
    assert "-p pretrained_file /path/to/resnet18.safetensors" in line and "-p pretrained false" in line
    assert not (work / "runs").exists() and not (work / "data").exists()  # no notebook ran, nothing was made
    assert seconds < 30, seconds  # the interpreter's imports included; the check itself: next test


def test_pretrained_refusal_is_quick_and_the_same_where_the_model_is_built(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    started = time.perf_counter()
    err = refused(["--workdir", str(tmp_path / "w"), "--profile", str(tiny_profile(tmp_path, arch="resnet18")),
                   "-p", "pretrained", "true"], capsys)
    assert time.perf_counter() - started < 10
    with pytest.raises(models.PretrainedWeightsUnavailable) as built:
        models.build_model("resnet18", pretrained=True)
    assert err == f"error: {built.value}\n"  # one place words it
    assert not (tmp_path / "w" / "runs").exists()


class RunsCode:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_weights_file_that_would_run_code_is_refused_before_00_and_never_run(tmp_path, capsys):
    marker, weights = tmp_path / "marker", tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": RunsCode(marker)}, weights)
    work = tmp_path / "w"
    err = refused(["--workdir", str(work), "--profile", str(tiny_profile(tmp_path)), "-p", "pretrained_file",
                   str(weights)], capsys)
    assert f"pretrained_file {weights}: it holds Python objects besides tensors (posix.system)" in err
    assert "re-save it where it was made as a plain state_dict" in err and ".safetensors" in err
    assert "weights_only=False" not in err and "trusted" not in err
    with pytest.raises(models.PretrainedFileError) as built:
        models.build_model("resnet10t", pretrained_file=weights)
    assert err == f"error: {built.value}\n"
    assert not marker.exists() and not (work / "runs").exists()


@pytest.mark.parametrize("content, fragment", [
    (None, "no such file"),
    (b"not a checkpoint", "not a weights file"),
    ("tensor", "it holds a Tensor, not a state_dict"),
    ("other arch", "could not load weights for 'resnet10t' from it (RuntimeError: Error(s) in loading state_dict"),
])
def test_a_weights_file_that_cannot_be_used_is_refused_before_00(tmp_path, capsys, content, fragment):
    weights = tmp_path / "w.pth"
    if isinstance(content, bytes):
        weights.write_bytes(content)
    elif content == "tensor":
        torch.save(torch.zeros(3), weights)
    elif content == "other arch":
        torch.save(models.build_model("resnet18", head="reg").backbone.state_dict(), weights)
    err = refused(["--workdir", str(tmp_path / "work"), "--profile", str(tiny_profile(tmp_path)),
                   "-p", "pretrained_file", str(weights)], capsys)
    assert f"pretrained_file {weights}: {fragment}" in err, err
    assert not (tmp_path / "work" / "runs").exists()


def test_weights_of_the_arch_pass_the_check(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(models.build_model("resnet10t", head="reg").backbone.state_dict(), weights)
    models.check_weights("resnet10t", False, weights, in_chans=3)
    models.check_weights("resnet10t", False, weights, in_chans=1)  # timm adapts the first convolution


# ------------------------------------------------------------------------------------------- subjects


def write_data(folder, subjects):
    """A Train split of 2 slices per subject."""
    images = folder / "Train" / "Images"
    images.mkdir(parents=True)
    rows = []
    for index, subject in enumerate(subject for subject in subjects for _ in range(2)):
        name = f"Image_{index:04d}.png"
        Image.fromarray(np.full((16, 16), index * 9, dtype=np.uint8)).save(images / name)
        rows.append(f"{name},{index * 3.0},{subject}\r\n")
    (folder / "Train" / "Train.csv").write_text("".join(rows), newline="")
    return folder


def test_data_of_one_subject_is_refused_before_00_naming_the_labels_file(tmp_path, capsys):
    data = write_data(tmp_path / "data", [4])
    work = tmp_path / "w"
    err = refused(["--workdir", str(work), "--data", str(data), "--profile", str(tiny_profile(tmp_path))], capsys)
    assert f"{data / 'Train' / 'Train.csv'}: 1 subject(s); cross-validation needs at least 2 subjects" in err
    assert "n_folds <= 1" not in err and not (work / "runs").exists()


def test_more_folds_than_subjects_is_refused_before_00_naming_p_n_folds(tmp_path, capsys):
    data = write_data(tmp_path / "data", [1, 2, 3])
    err = refused(["--workdir", str(tmp_path / "w"), "--data", str(data), "--profile", str(tiny_profile(tmp_path)),
                   "-p", "n_folds", "5"], capsys)
    assert f"n_folds=5: {data / 'Train' / 'Train.csv'} has 3 subjects, fewer than the folds" in err
    assert "use -p n_folds 3 or fewer" in err and not (tmp_path / "w" / "runs").exists()


def test_a_data_folder_without_train_labels_is_refused_before_00(tmp_path, capsys):
    data = write_data(tmp_path / "data", [1, 2])
    (data / "Train" / "Train.csv").unlink()
    err = refused(["--workdir", str(tmp_path / "w"), "--data", str(data), "--profile", str(tiny_profile(tmp_path))],
                  capsys)
    assert "no label CSV for Train" in err


def test_the_phantom_set_not_made_yet_is_not_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(config.WORKDIR_ENV, str(tmp_path))
    run = pipeline.runs.resolve(str(tiny_profile(tmp_path)), {"n_folds": 40}, check_archs=False)
    pipeline.check_subjects(run)  # the phantom set, made at the run's start, has subjects enough
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------------- read-only folders


def read_only(folder, shell: str) -> list[str]:
    """`shell` run with `folder` read-only: a read-only bind mount in a private mount namespace where root (root
    ignores write bits), else the folder without write bits."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return ["sh", "-c", shell]
    return ["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} "
                                         f"{folder} && {shell}"]


@pytest.fixture
def can_mount(tmp_path):
    if os.geteuid() == 0 and (not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount --bind {tmp_path} {tmp_path}"], capture_output=True).returncode):
        pytest.skip("root without mount namespaces: cannot make a read-only bind mount here")


@pytest.mark.parametrize("read_only_folder", ["", "submissions"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_00(tmp_path, can_mount, read_only_folder):
    work = tmp_path / "work"
    folder = work / read_only_folder
    folder.mkdir(parents=True)
    profile = tiny_profile(tmp_path)
    shell = f"{sys.executable} -m utils.pipeline --workdir {work} --profile {profile}"
    result = subprocess.run(read_only(folder, shell), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    folder.chmod(0o755)
    line = only_line(result.stderr)
    assert result.returncode == 1 and re.search(rf"error: {folder} is not writable: (Read-only file system|"
                                                r"Permission denied); .*pass --workdir DIR", line), line
    assert sorted(p.name for p in work.iterdir()) == sorted(filter(None, [read_only_folder]))


def test_run_all_sh_refuses_a_read_only_workdir_in_one_line(tmp_path, can_mount):
    work = tmp_path / "work"
    work.mkdir()
    shell = f"PYTHON={sys.executable} {REPO_ROOT / 'run_all.sh'} --no-venv --workdir {work} --stages 00_eda"
    result = subprocess.run(read_only(work, shell), capture_output=True, text=True, timeout=120)
    work.chmod(0o755)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert only_line(result.stderr) == (f"error: --workdir {work} cannot be written (read-only or not permitted): "
                                        "pass --workdir DIR, a writable folder (e.g. /kaggle/working)")
    assert list(work.iterdir()) == []


def test_the_write_check_leaves_nothing_and_names_a_folder_it_cannot_make(tmp_path):
    pipeline.check_writable([tmp_path / "a" / "b", tmp_path, tmp_path / "c"])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(pipeline.PipelineError, match=rf"^{tmp_path}/file/runs cannot be made \({tmp_path}/file is "
                                                     r"not writable\): Not a directory; .*pass --workdir DIR"):
        pipeline.check_writable([tmp_path / "file" / "runs"])


# ------------------------------------------------------------------------------------------- worker processes


PHANTOMS_IN_CLI = """
import sys
from utils import cli, phantoms

def main(argv):
    phantoms.generate_phantoms(sys.argv[1], subjects=8, size=32, seed=3, num_workers=2)

sys.exit(cli.run(main))
"""


def test_making_the_phantom_set_with_workers_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-c", PHANTOMS_IN_CLI, str(tmp_path / "ph")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and (tmp_path / "ph" / "Train" / "Train.csv").is_file(), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Terminated" not in result.stderr, result.stderr[-3000:]


class Dispositions(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.tensor([signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                             signal.getsignal(signal.SIGINT) == signal.SIG_IGN])


def test_loader_workers_stop_quietly_and_leave_ctrl_c_to_the_run():
    """train.make_loader's worker_init_fn (augment.worker_init) resets the run's SIGTERM handler (utils.cli), which
    a forked loader worker inherits."""
    previous = signal.signal(signal.SIGTERM, cli._raise_terminated)
    try:
        loader = torch.utils.data.DataLoader(Dispositions(), batch_size=1, num_workers=1,
                                             worker_init_fn=augment.worker_init, multiprocessing_context="fork")
        assert all(batch.all() for batch in loader)
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------- a kernel dying at start


@pytest.fixture
def step(tmp_path):
    (tmp_path / "notebooks").mkdir()
    return pipeline.Step("00_eda", "00_eda", "00_eda", {})


def failing_starts(monkeypatch, failures, error=None):
    import papermill

    calls = []

    def execute_notebook(*args, **kwargs):
        calls.append(kwargs["kernel_name"])
        if len(calls) <= failures:
            raise error or RuntimeError("Kernel died before replying to kernel_info")

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    return calls


def test_a_kernel_that_dies_at_start_is_started_once_more(tmp_path, step, monkeypatch, caplog):
    calls = failing_starts(monkeypatch, 1)
    pipeline._run_notebook(step, tmp_path, set(), "python3")
    assert calls == ["python3", "python3"] and "died at start (Kernel died before replying" in caplog.text


def test_a_kernel_that_dies_at_start_twice_stops_the_run_in_one_line(tmp_path, step, monkeypatch):
    calls = failing_starts(monkeypatch, 2, RuntimeError("Kernel didn't respond in 60 seconds"))
    with pytest.raises(pipeline.PipelineError, match=r"^notebook 00_eda: its kernel \(python3\) died at start twice "
                                                     r"\(Kernel didn't respond in 60 seconds\); likely cause: another "
                                                     r"process took its port.*run the same command again") as error:
        pipeline._run_notebook(step, tmp_path, set(), "python3")
    assert len(calls) == 2 and "\n" not in str(error.value)


def test_a_kernel_that_dies_during_a_cell_is_not_restarted(tmp_path, step, monkeypatch):
    from nbclient.exceptions import DeadKernelError

    calls = failing_starts(monkeypatch, 1, DeadKernelError("Kernel died"))
    with pytest.raises(DeadKernelError):
        pipeline._run_notebook(step, tmp_path, set(), "python3")
    assert len(calls) == 1  # the cells it ran may have done work: not run again behind the user's back


# ------------------------------------------------------------------------------------------- the same pattern elsewhere


def test_an_ensemble_of_models_the_run_does_not_train_is_refused_before_anything_runs(tmp_path):
    profile = config.load_profile(tiny_profile(tmp_path, pseudo=["m"]))
    with pytest.raises(ConfigError, match=r"^-p: models=\['m', 'x'\]: 'x' is not a model this run trains before 03 "
                                          r"\(its models: m\); list some of those, or null for all"):
        config.check_run_settings(profile, {"models": ["m", "x"]}, check_archs=False)
    # a pseudo-label retrain is trained after 03 (which would fail on it): 04 puts it in its original's place itself
    with pytest.raises(ConfigError, match=r"'m_pl' is not a model this run trains before 03 \(a pseudo-label retrain"):
        config.check_run_settings(profile, {"models": ["m_pl"]}, check_archs=False)
    assert config.check_run_settings(profile, {"models": ["m"]}, check_archs=False)["ensemble"].models == ["m"]


def test_pseudo_label_models_as_a_bare_name_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  - {model_name: m}\npseudo_label_models: m\n")
    with pytest.raises(ConfigError, match=r"pseudo_label_models must be a list of model names, e.g. \[m\]"):
        config.load_profile(path)


def test_an_unknown_kernel_is_refused_before_anything_runs(tmp_path, capsys):
    err = refused(["--workdir", str(tmp_path), "--profile", str(tiny_profile(tmp_path)), "--kernel", "nope"], capsys)
    assert "--kernel nope: no such Jupyter kernel here (known: " in err and "python3" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_a_sweep_refuses_folds_the_subjects_cannot_make_and_bad_weights_before_its_lock(tmp_path):
    from utils import sweep

    data = write_data(tmp_path / "data", [1, 2, 3])
    with pytest.raises(sweep.SweepError, match=r"n_folds=5: the Train labels of .* has 3 subjects.*--n-folds 3"):
        sweep.run_sweep([str(tiny_profile(tmp_path))], tmp_path / "run", [0], data_dir=str(data), n_folds=5)
    evil = tmp_path / "evil.pth"
    torch.save({"x": RunsCode(tmp_path / "marker")}, evil)
    with pytest.raises(models.PretrainedFileError, match="holds Python objects"):
        sweep.run_sweep([str(tiny_profile(tmp_path))], tmp_path / "run", [0], data_dir=str(data), n_folds=3,
                        overrides={"pretrained_file": str(evil)})
    assert not (tmp_path / "run").exists() and not (tmp_path / "marker").exists()
    same = tiny_profile(tmp_path)
    with pytest.raises(ConfigError, match="'m' appears in two profiles"):  # one line in its CLI, not a traceback
        sweep.plan_models([str(same), str(same)], {}, folds=[0])


def test_the_benchmark_processes_take_the_shared_worker_initializer(monkeypatch):
    """utils.bench's spawned processes: Ctrl-C is the parent's, which stops them (cli.worker_init)."""
    import queue
    import threading

    from utils import bench

    called = []
    monkeypatch.setattr(cli, "worker_init", lambda *args: called.append(args))
    results = queue.Queue()
    bench._concurrent_worker(None, None, None, None, 1, 0, threading.Barrier(1), results, 0)  # fails at once
    assert called == [()] and results.get_nowait()[0] == "failed"
