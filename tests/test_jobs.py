"""utils.jobs: every (model, fold) a Dask job — same results side by side as one at a time, a failing job named,
finished folds kept, an external scheduler, progress lines."""
import logging
import os

import pandas as pd
import pytest
import torch
from distributed import LocalCluster

from utils import jobs
from utils.config import RunPaths, TrainConfig
from utils.data import load_split
from utils.folds import make_folds, write_folds

TINY = dict(arch="resnet10t", head="reg", pooling="avg", img_size=32, epochs=2, warmup_epochs=0, batch_size=8,
            optimizer="adamw", lr=1e-3, sam="none", save_last_k=1, max_steps_per_epoch=3, device="cpu",
            folds=[0, 1])


@pytest.fixture(scope="module")
def tiny_data(phantom_set):
    return phantom_set


def new_run(folder, data_dir):
    write_folds(make_folds(load_split(data_dir, "Train", require_labels=True), n_folds=3, seed=0),
                RunPaths(folder).folds_csv)
    return folder


def predictions(run_dir, model):
    return {fold: (RunPaths(run_dir).fold(model, fold) / "predictions.csv").read_bytes() for fold in (0, 1)}


@pytest.mark.slow
def test_two_jobs_side_by_side_equal_one_at_a_time(tiny_data, tmp_path, caplog):
    cfg = TrainConfig(model_name="m", **TINY)
    serial, parallel = new_run(tmp_path / "serial", tiny_data), new_run(tmp_path / "parallel", tiny_data)
    assert jobs.run_training([cfg], serial, tiny_data, tmp_path / "cache", jobs.Runner(jobs=1, threads=1)) == \
        ["m fold 0", "m fold 1"]
    with caplog.at_level(logging.INFO, logger="utils"):
        done = jobs.run_training([cfg], parallel, tiny_data, tmp_path / "cache", jobs.Runner(jobs=2, threads=1))
    assert sorted(done) == ["m fold 0", "m fold 1"]
    assert predictions(serial, "m") == predictions(parallel, "m")  # same bytes: Val/Test and held-out slices
    # Dask's default worker environment (malloc trimming, 1 OpenMP thread) halves a torch training: not used
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
    # progress: one line per job per epoch, forwarded from the workers, and the count of finished jobs
    for fold in (0, 1):
        assert f"[m fold {fold}] epoch 2/2" in caplog.text and "valid MAE" in caplog.text
    assert "[train] 2/2 jobs finished" in caplog.text


@pytest.mark.slow
def test_a_failing_job_stops_the_stage_naming_it_and_finished_folds_stay(tiny_data, tmp_path):
    run_dir = new_run(tmp_path / "run", tiny_data)
    good = TrainConfig(model_name="good", **TINY)
    jobs.run_training([good], run_dir, tiny_data, tmp_path / "cache", jobs.Runner(jobs=1))
    kept = predictions(run_dir, "good")
    not_weights = tmp_path / "not_weights.pth"
    not_weights.write_text("not a checkpoint")
    bad = TrainConfig(model_name="bad", pretrained_file=str(not_weights), **TINY)
    with pytest.raises(jobs.JobFailed, match=r"bad fold \d: pretrained_file .*not_weights.pth: not a weights file"):
        jobs.run_training([good, bad], run_dir, tiny_data, tmp_path / "cache", jobs.Runner(jobs=2, threads=1))
    assert predictions(run_dir, "good") == kept  # the finished folds are reused, not lost


@pytest.fixture
def restored_environ():
    """A default LocalCluster's nannies write Dask's pre-spawn environment (MALLOC_TRIM_THRESHOLD_, ...) into this
    process's os.environ, which later workers of the test session would inherit: put it back afterwards."""
    before = dict(os.environ)
    yield
    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)


@pytest.mark.slow
def test_jobs_run_on_an_external_scheduler(tiny_data, tmp_path, monkeypatch, restored_environ):
    cfg = TrainConfig(model_name="m", **{**TINY, "folds": [0]})
    run_dir = new_run(tmp_path / "run", tiny_data)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.setenv(jobs.SCHEDULER_ENV, cluster.scheduler_address)  # the environment variable route
        runner = jobs.Runner()
        assert runner.scheduler == cluster.scheduler_address
        assert jobs.run_training([cfg], run_dir, tiny_data, tmp_path / "cache", runner) == ["m fold 0"]
    frame = pd.read_csv(RunPaths(run_dir).fold("m", 0) / "predictions.csv")
    assert set(frame["split"]) == {"oof", "Val", "Test"}


def test_slots_pin_each_job_process_to_its_gpu():
    # GPU-minor: however many jobs there are, the first ones spread over the cards
    assert jobs.Runner(jobs_per_gpu=3, gpus=2).slots(use_gpu=True) == \
        [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}] * 3
    assert jobs.Runner(gpus=0).slots(use_gpu=True) == [{}]  # no GPU: one job at a time by default
    assert jobs.Runner(jobs=3, gpus=2).slots(use_gpu=False) == [{}, {}, {}]
    with pytest.raises(ValueError, match="at least 1"):
        jobs.Runner(jobs_per_gpu=0)


def test_a_job_out_of_gpu_memory_says_how_to_rerun(monkeypatch, tmp_path):
    from utils import train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine = logging.getLogger("utils")
    monkeypatch.setattr(jobs, "_route_logs_to_client", lambda: (engine, engine.handlers[:]))  # no Dask worker here
    monkeypatch.setattr(jobs, "_job_data", lambda job, cfg: (None, {}, None))
    monkeypatch.setattr(train, "train_fold", out_of_memory)
    job = jobs.TrainJob(TrainConfig(model_name="big", **TINY).to_dict(), 1, str(tmp_path), None, str(tmp_path))
    with pytest.raises(jobs.JobFailed, match=r"big fold 1: OutOfMemoryError: CUDA out of memory.*\n.*--jobs-per-gpu"):
        jobs.run_train_job(job)


def test_cores_are_those_the_process_may_use_not_the_machines(monkeypatch):
    """A 3-CPU job (taskset, a container's or Slurm's cpuset) on a 64-core node: threads and loader workers are
    sized from the 3 CPUs."""
    from utils import machine, train

    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 64)
    assert machine.usable_cores() == 3 and jobs.Runner().cores == 3
    assert train.loader_workers(TrainConfig(num_workers=-1), torch.device("cuda")) == 2


@pytest.mark.slow
def test_a_kept_cluster_serves_the_next_stage_with_its_workers_tuned_for_training(tiny_data, tmp_path):
    """The pipeline's two training stages share one local cluster (its start costs seconds per stage); its workers
    run without Dask's profiler and GIL monitor (10-20 % of a CPU training, docs/dask.md)."""
    from distributed import Client

    run_dir = new_run(tmp_path / "run", tiny_data)
    runner = jobs.Runner(jobs=1, threads=1, keep_cluster=True)
    first, second = (TrainConfig(model_name=name, **{**TINY, "folds": [0]}) for name in ("first", "second"))
    try:
        assert jobs.run_training([first], run_dir, tiny_data, tmp_path / "cache", runner) == ["first fold 0"]
        cluster = runner._cluster
        assert jobs.run_training([second], run_dir, tiny_data, tmp_path / "cache", runner) == ["second fold 0"]
        assert runner._cluster is cluster
        with Client(cluster, set_as_default=False) as client:
            settings = client.run(lambda: (__import__("dask").config.get("distributed.worker.profile.enabled"),
                                           __import__("dask").config.get("distributed.admin.system-monitor.gil.enabled"),
                                           os.environ.get("MALLOC_TRIM_THRESHOLD_")))
        assert list(settings.values()) == [(False, False, None)]
    finally:
        runner.close()
    assert runner._cluster is None and cluster.status.name == "closed"


@pytest.mark.slow
def test_a_job_whose_loader_has_worker_processes_runs_in_a_dask_worker(tiny_data, tmp_path):
    """GPU jobs load with worker processes (loader_workers > 0); a daemonic Dask worker may not start them (the first
    GPU run failed with 'daemonic processes are not allowed to have children'). CPU jobs load in-process, so this
    test asks for a loader worker explicitly."""
    run_dir = new_run(tmp_path / "run", tiny_data)
    cfg = TrainConfig(model_name="loaded", **{**TINY, "folds": [0], "num_workers": 1})
    assert jobs.run_training([cfg], run_dir, tiny_data, tmp_path / "cache", jobs.Runner(jobs=1, threads=1)) == \
        ["loaded fold 0"]
    assert (RunPaths(run_dir).fold("loaded", 0) / "predictions.csv").is_file()
