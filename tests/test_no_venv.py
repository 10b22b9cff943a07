"""Kaggle / Colab mode: `./run_all.sh --no-venv --workdir DIR` runs in the current Python environment from a read-only
checkout on read-only data (a Kaggle dataset and /kaggle/input), every output under the workdir; and the check of
what the environment lacks never touches torch."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from utils import requirements
from utils.config import REPO_ROOT

PROFILE = {"params": {"arch": "resnet10t", "head": "reg", "pooling": "avg", "img_size": 32, "epochs": 1,
                      "warmup_epochs": 0, "batch_size": 8, "optimizer": "adamw", "sam": "none", "save_last_k": 1,
                      "randaug_n": 0, "folds": [0], "n_folds": 3, "max_steps_per_epoch": 2},
           "models": [{"model_name": "m"}]}
# what a run reads of the checkout (the rest is documentation and tests)
CHECKOUT = ("utils", "notebooks", "run_all.sh", "requirements.txt", "pyproject.toml")


def test_only_what_is_missing_is_installed_and_torch_never(tmp_path):
    installed = {"torch": "2.0.1", "numpy": "2.1.0", "pandas": "1.5.0", "albumentations": "2.0.8"}.get
    to_install, notes = requirements.check(["torch>=2.2,<=2.14.1  # a comment", "numpy>=1.26", "pandas>=2.1",
                                            "albumentations==2.0.8", "timm>=1.0.9,<2", "", "# only a comment"],
                                           installed)
    assert to_install == ["pandas>=2.1", "timm>=1.0.9,<2"]  # too old, and missing; torch only reported
    assert len(notes) == 1 and notes[0].startswith("torch 2.0.1: the project asks for torch>=2.2")


def test_install_refuses_without_torchvision_rather_than_fetch_one(tmp_path, monkeypatch, capsys):
    """timm needs torchvision: pip would fetch a build that may not match the platform's torch."""
    versions = {"torch": "2.4.0"}
    monkeypatch.setattr(requirements, "_installed_version", versions.get)
    wanted = tmp_path / "requirements.txt"
    wanted.write_text("surely-not-installed-package>=1.0\n")
    assert requirements.main([str(wanted), "--install"]) == 1
    assert "torchvision not installed here" in capsys.readouterr().err


def _read_only_command(checkout, data, shell: str) -> list[str]:
    """The command that runs `shell` with `checkout` and `data` read-only: bind mounts in a private mount namespace
    where root (root ignores write bits), else a copy without write bits."""
    if os.geteuid() != 0:
        for folder in (checkout, data):
            subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
        return ["sh", "-c", shell]
    mounts = " && ".join(f"mount --bind {f} {f} && mount -o remount,bind,ro {f}" for f in (checkout, data))
    return ["unshare", "-m", "sh", "-c", f"{mounts} && {shell}"]


@pytest.mark.slow
def test_a_read_only_checkout_on_read_only_data_runs_with_every_output_in_the_workdir(tmp_path, phantom_set):
    if os.geteuid() == 0 and (not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount --bind {tmp_path} {tmp_path}"], capture_output=True).returncode):
        pytest.skip("root without mount namespaces: cannot make a read-only bind mount here")
    checkout, data, work = tmp_path / "checkout", tmp_path / "data", tmp_path / "work"
    for name in CHECKOUT:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            checkout.mkdir(exist_ok=True)
            shutil.copy2(source, checkout / name)
    shutil.copytree(phantom_set, data)
    (work / "profiles").mkdir(parents=True)
    (work / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(PROFILE))
    before = sorted(str(p.relative_to(checkout)) for p in checkout.rglob("*"))
    # called from the folder above, every path relative to it (run_all.sh itself runs in the checkout)
    shell = (f"cd {tmp_path} && PYTHON={sys.executable} ./checkout/run_all.sh --no-venv --workdir work --data data "
             f"--profile work/profiles/tiny.yaml --name ro")
    env = {k: v for k, v in os.environ.items() if k not in ("PERCOVID_WORKDIR", "PYTHONPATH")}
    result = subprocess.run(_read_only_command(checkout, data, shell), capture_output=True, text=True, timeout=900,
                            env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submission: " in result.stdout and (work / "submissions" / "ro.csv").is_file()
    assert (work / "runs" / "ro" / "notebooks" / "05_submit.ipynb").is_file()
    assert (work / "data" / "cache").is_dir()  # the decode cache in the workdir too
    assert sorted(str(p.relative_to(checkout)) for p in checkout.rglob("*")) == before  # nothing written there
