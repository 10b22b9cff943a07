"""utils.bench: one tiny real run (figures and the formulas that link them, with --concurrent 1 2), the paper estimate
and the wall-time schedule by hand."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from utils import bench
from utils.config import TrainConfig, load_profile

TINY = ["--arch", "resnet18", "--img-size", "32", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1",
        "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two torch threads on a 2-core box shared with other jobs spin-wait for each other (10-20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The CLI's in-process entry on the tiny setting, with 1 and 2 concurrent processes (the one spawning run of
    this file: each process imports torch and timm, ~5 s); returns (result, what --json wrote)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench.main(TINY + ["--concurrent", "1", "2", "--json", str(path)])
    return result, json.loads(path.read_text())


@pytest.mark.slow
def test_tiny_run_measures_every_figure(tiny_run):
    result, written = tiny_run
    assert written == json.loads(json.dumps(result))  # the JSON holds the returned figures
    assert (result["arch"], result["img_size"], result["batch_size"], result["device"]) == ("resnet18", 32, 4, "cpu")
    assert (result["optimizer"], result["sam"], result["workers"], result["steps"]) == ("sgd", "sam", 0, 3)
    for key in ("model_img_s", "pipeline_img_s", "bare_img_s", "decode_img_s", "augment_img_s",
                "hours_as_measured", "hours_flop_scaled"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["precision"] == "float32" and result["channels_last"]  # autocast "auto" is GPU-only


@pytest.mark.slow
def test_tiny_run_derived_figures_follow_their_formulas(tiny_run):
    r, _ = tiny_run
    a, b, c = r["model_img_s"], r["pipeline_img_s"], r["bare_img_s"]
    assert r["pipeline_ratio"] == pytest.approx(b / a, rel=1e-12)
    assert r["overhead_pct"] == pytest.approx(100 * (c - a) / c, rel=1e-12)
    assert r["workers_needed"] == math.ceil(a / r["augment_img_s"])
    # the paper profile by hand: 4 models x 50 epochs x 2 folds x 3054*4/5, + the ResNeSt101 retrain on +1301
    steps = r["image_steps"]
    assert sum(steps.values()) == pytest.approx(4 * 50 * 2 * 3054 * 0.8 + 50 * 2 * (3054 * 0.8 + 1301))
    assert r["hours_as_measured"] == pytest.approx(sum(steps.values()) / a / 3600)
    scaled = sum(steps[name] * r["cost_ratio"][name] for name in steps)
    assert r["hours_flop_scaled"] == pytest.approx(scaled / a / 3600)
    # ResNeSt50 at 512 px against the measured ResNet18 at 32 px: ~5.4 / 1.82 GMACs at 224 px x (512/32)^2 pixels
    assert r["cost_ratio"]["resnest50_exp"] == pytest.approx(5.37 / 1.82 * 256, rel=0.02)
    # the wall time: 8 (model, fold) jobs then the retrain's 2, the FLOP-scaled work split evenly over a run's folds
    assert [len(stage) for stage in r["stages"]] == [8, 2]
    assert sum(sum(stage.values()) for stage in r["stages"]) == pytest.approx(scaled)
    assert r["stages"][1]["resnest101_exp_pl fold 0"] == pytest.approx(
        steps["resnest101_exp_pl"] / 2 * r["cost_ratio"]["resnest101_exp_pl"])
    speeds = {int(k): c["aggregate_img_s"] for k, c in r["concurrent"].items()}
    assert r["wall_aggregate_img_s"] == speeds and r["jobs_per_gpu"] == max(speeds, key=speeds.get)
    jobs = [list(stage.values()) for stage in r["stages"]]
    for gpus, key in ((1, "wall_hours_1gpu"), (2, "wall_hours_2gpu")):
        assert r[key] == pytest.approx(bench.estimate_wall_hours(jobs, gpus, r["jobs_per_gpu"], speeds))
    assert r["wall_ratio_2gpu"] == pytest.approx(r["wall_hours_2gpu"] / r["wall_hours_1gpu"])
    assert 0.5 <= r["wall_ratio_2gpu"] < 1


@pytest.mark.slow
def test_tiny_run_concurrent_processes(tiny_run):
    result, written = tiny_run
    assert set(written["concurrent"]) == {"1", "2"}  # JSON keys are strings
    for k in (1, 2):
        c = result["concurrent"][k]
        assert set(c) == {"processes", "threads", "aggregate_img_s", "aggregate_wall_img_s", "per_job_img_s",
                          "per_process_img_s", "speedup"}
        assert c["processes"] == k and len(c["per_process_img_s"]) == k
        assert c["threads"] == 1  # max(1, 1 thread // K): the module runs torch on one thread
        for key in ("aggregate_img_s", "aggregate_wall_img_s", "per_job_img_s", "speedup"):
            assert math.isfinite(c[key]) and c[key] > 0, (k, key)
        assert c["aggregate_img_s"] == pytest.approx(sum(c["per_process_img_s"]))
        assert c["per_job_img_s"] == pytest.approx(c["aggregate_img_s"] / k)
        assert c["aggregate_wall_img_s"] <= c["aggregate_img_s"] * (1 + 1e-9)  # the stricter figure
        assert c["speedup"] == pytest.approx(c["aggregate_img_s"] / result["concurrent"][1]["aggregate_img_s"])
    assert result["concurrent"][1]["speedup"] == 1.0
    table = bench.format_table(result)
    assert "--concurrent" in table and "2 GPUs" in table


def test_concurrency_figures_by_hand():
    # two processes of 10 steps x batch 4: one takes 2 s, the other starts 0.5 s later and takes 3.5 s
    c = bench.concurrency_figures([{"started": 0.0, "ended": 2.0}, {"started": 0.5, "ended": 4.0}], 10, 4)
    assert c["per_process_img_s"] == pytest.approx([20.0, 40 / 3.5])
    assert c["aggregate_img_s"] == pytest.approx(20 + 40 / 3.5)
    assert c["aggregate_wall_img_s"] == pytest.approx(80 / 4.0)  # all images / (latest end - earliest start)
    assert c["per_job_img_s"] == pytest.approx((20 + 40 / 3.5) / 2) and c["processes"] == 2


def test_estimate_without_concurrency_is_one_job_per_gpu_at_the_model_speed():
    cfg = TrainConfig(arch="resnet18", img_size=32)
    e = bench._paper_estimate(cfg, None, "paper", 100.0, {})
    assert e["jobs_per_gpu"] == 1 and e["wall_aggregate_img_s"] == {1: 100.0}
    assert e["wall_hours_1gpu"] == pytest.approx(e["hours_flop_scaled"])  # one GPU, one slot: the plain sum
    assert 0.5 <= e["wall_ratio_2gpu"] < 1
    # with --concurrent: the K of the highest aggregate; a K that failed is left out
    measured = {1: {"aggregate_img_s": 100.0}, 2: {"aggregate_img_s": 150.0}, 4: {"processes": 4, "error": "OOM"}}
    e2 = bench._paper_estimate(cfg, None, "paper", 100.0, measured)
    assert e2["jobs_per_gpu"] == 2 and e2["wall_aggregate_img_s"] == {1: 100.0, 2: 150.0}
    assert e2["wall_hours_1gpu"] < e["wall_hours_1gpu"]


def fake_profile():
    return {"params": {"epochs": 10, "folds": [0, 1], "n_folds": 5},
            "models": [{"model_name": "a", "arch": "resnet18", "epochs": 4}, {"model_name": "b", "folds": [0, 1, 2]}],
            "pseudo_label_models": ["b"]}


def test_paper_image_steps_by_hand():
    # training part of a fold: 100 * 4/5 = 80 slices; pseudo-label retrain adds the 30 unlabelled ones
    assert bench.paper_image_steps(fake_profile(), n_train=100, n_val=30) == \
        pytest.approx({"a": 4 * 2 * 80, "b": 10 * 3 * 80, "b_pl": 10 * 3 * 110})
    # n_folds overrides the profile's: 100 * 9/10 = 90
    assert bench.paper_image_steps(fake_profile(), n_train=100, n_val=30, n_folds=10)["a"] == pytest.approx(4 * 2 * 90)
    # a model without epochs/folds anywhere gets TrainConfig's defaults
    bare = {"models": [{"model_name": "x"}]}
    defaults = TrainConfig()
    assert bench.paper_image_steps(bare, n_train=50) == pytest.approx(
        {"x": defaults.epochs * len(defaults.folds) * 40})


def test_paper_profile_estimate_for_a_given_speed():
    steps = bench.paper_image_steps(load_profile("paper"))
    assert sum(steps.values()) == pytest.approx(1_351_700)  # 977,280 + 374,420, see the tiny-run test
    assert bench.estimate_hours(steps, 100.0) == pytest.approx(1_351_700 / 100 / 3600)
    assert bench.estimate_hours({"a": 3600.0, "b": 7200.0}, 2.0, {"b": 0.5}) == pytest.approx((3600 + 3600) / 2 / 3600)


def test_profile_stages_by_hand():
    steps = bench.paper_image_steps(fake_profile(), n_train=100, n_val=30)  # a 640, b 2400, b_pl 3300
    stages = bench.profile_stages(fake_profile(), steps, {"b": 2.0})
    assert stages == [pytest.approx({"a fold 0": 320, "a fold 1": 320, "b fold 0": 1600, "b fold 1": 1600,
                                     "b fold 2": 1600}),
                      pytest.approx({"b_pl fold 0": 1100, "b_pl fold 1": 1100, "b_pl fold 2": 1100})]
    assert len(bench.profile_stages({**fake_profile(), "pseudo_label_models": []},
                                    bench.paper_image_steps({**fake_profile(), "pseudo_label_models": []}))) == 1


def test_estimate_wall_hours_by_hand():
    h, w, a1 = 3600.0, 7200.0, 4.0  # hours are seconds / 3600
    one = {1: a1}
    # one GPU, one slot: the jobs one after another
    assert bench.estimate_wall_hours([[w, 2 * w, 3 * w]], 1, 1, one) * h == pytest.approx(6 * w / a1)
    # two equal jobs sharing a GPU whose aggregate grows 1.5x: both end at 2w / (1.5 a1)
    shared = {1: a1, 2: 1.5 * a1}
    assert bench.estimate_wall_hours([[w, w]], 1, 2, shared) * h == pytest.approx(2 * w / (1.5 * a1))
    # stages are sequential: the second stage's job waits for the first's, though a slot is free
    assert bench.estimate_wall_hours([[w], [w]], 1, 2, shared) * h == pytest.approx(2 * w / a1)
    # two GPUs halve a stage of two equal jobs at one job per GPU; with two slots per GPU they still go one per GPU
    assert bench.estimate_wall_hours([[w, w]], 2, 1, one) * h == pytest.approx(w / a1)
    assert bench.estimate_wall_hours([[w, w]], 1, 1, one) * h == pytest.approx(2 * w / a1)
    assert bench.estimate_wall_hours([[w, w]], 2, 2, shared) * h == pytest.approx(w / a1)
    # a job speeds up when its neighbour ends: 2w and w at 0.75 a1 each until w is done (t = w / 0.75 a1), then the
    # other has w left, alone at a1
    assert bench.estimate_wall_hours([[2 * w, w]], 1, 2, shared) * h == pytest.approx(w / (0.75 * a1) + w / a1)
    # longest first: 2 GPUs x 1 slot, jobs 1, 1, 2 -> 2 on one GPU, 1 + 1 on the other (in the given order: 3)
    assert bench.estimate_wall_hours([[w, w, 2 * w]], 2, 1, one) * h == pytest.approx(2 * w / a1)
    # k not measured: the aggregate is interpolated (k=3 -> 30 img/s, 10 per job) and clamped above (k=8 -> 40)
    sparse = {"1": 10.0, "4": 40.0}  # string keys, as read back from the JSON
    assert bench.estimate_wall_hours([[w] * 3], 1, 3, sparse) * h == pytest.approx(w / 10)
    assert bench.estimate_wall_hours([[w] * 8], 1, 8, sparse) * h == pytest.approx(w / 5)
    assert bench.estimate_wall_hours([[], [0.0]], 1, 1, one) == 0.0


def test_small_formulas():
    assert bench.overhead_percent(10.0, 9.5) == pytest.approx(5.0)
    assert bench.overhead_percent(10.0, 11.0) == pytest.approx(-10.0)  # negative: the project loop is faster
    assert bench.workers_needed(100.0, 30.0) == 4 and bench.workers_needed(90.0, 30.0) == 3
    assert bench.workers_needed(5.0, 400.0) == 1


def test_forward_macs_match_published_counts_and_scale_with_pixels():
    assert bench.forward_macs("resnet18", 224) / 1e9 == pytest.approx(1.82, rel=0.01)  # timm/torchvision: 1.82 GMACs
    assert bench.forward_macs("resnet18", 64) == pytest.approx(4 * bench.forward_macs("resnet18", 32), rel=1e-9)


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="asam"):
        bench.run_bench(TrainConfig(arch="resnet18", sam="asam", device="cpu"))
    with pytest.raises(ValueError, match="at least 2 folds"):
        bench.paper_image_steps(fake_profile(), n_folds=1)
    with pytest.raises(ValueError, match="not among"):
        bench.paper_image_steps({**fake_profile(), "pseudo_label_models": ["c"]})
    with pytest.raises(ValueError, match="images_per_s"):
        bench.estimate_hours({"a": 1.0}, 0.0)
    with pytest.raises(ValueError, match="at least 1"):
        bench.estimate_wall_hours([[1.0]], 0, 1, {1: 1.0})
    with pytest.raises(ValueError, match="empty"):
        bench.estimate_wall_hours([[1.0]], 1, 1, {})
    with pytest.raises(ValueError, match="speeds > 0"):
        bench.estimate_wall_hours([[1.0]], 1, 1, {1: 0.0})
    with pytest.raises(ValueError, match=">= 0"):
        bench.estimate_wall_hours([[-1.0]], 1, 1, {1: 1.0})
    with pytest.raises(ValueError, match="K must be >= 1"):  # before any process starts
        bench.measure_concurrent(TrainConfig(arch="resnet18", device="cpu"), [0, 2], torch.zeros(1), torch.zeros(1),
                                 1, 0)
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--concurrent", "0"])


def _png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40), value, np.uint8)).convert("RGBA").save(path)


def test_data_option_reads_a_data_set_or_a_folder(tmp_path):
    for i in range(3):
        _png(tmp_path / "set" / "Train" / "Images" / f"Image_{i:04d}.png")
    (tmp_path / "set" / "Train" / "Train.csv").write_text("".join(f"Image_{i:04d}.png,{i}.0,0\r\n" for i in range(3)))
    for i in range(2):
        _png(tmp_path / "set" / "Val" / "Images" / f"Val_{i:04d}.png")
    assert bench._split_counts(tmp_path / "set") == (3, 2)
    assert [p.name for p in bench._source_pngs(tmp_path / "set", tmp_path, 2)] == ["Image_0000.png", "Image_0001.png"]
    assert bench._split_counts(tmp_path / "set" / "Val" / "Images") == (bench.N_TRAIN, bench.N_VAL)  # a bare folder
    assert len(bench._source_pngs(tmp_path / "set" / "Val" / "Images", tmp_path, 5)) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .png"):
        bench._source_pngs(tmp_path / "empty", tmp_path, 2)


def test_phantom_sources_look_like_the_challenge_files(tmp_path):
    paths = bench._source_pngs(None, tmp_path, 2)
    with Image.open(paths[0]) as image:
        assert (image.mode, image.size) == ("RGBA", (512, 512))
        red, green, blue, alpha = (np.asarray(c) for c in image.split())
    assert np.array_equal(red, green) and np.array_equal(red, blue) and (alpha == 255).all() and red.std() > 10


def test_real_slices_decode(shared_dir, tmp_path):
    paths = bench._source_pngs(shared_dir / "sample_slices", tmp_path, 3)
    assert [p.name for p in paths] == ["Image_0000.png", "Image_0001.png", "Image_0002.png"]


@pytest.mark.parametrize("head, sam", [("ldl", "sam"), ("exp", "none")])
def test_bare_loop_does_the_same_math_as_the_project_step(head, sam):
    """(c) is a fair baseline only if it computes the same update as train.StepRunner."""
    from utils import train

    torch.manual_seed(0)
    cfg = TrainConfig(arch="resnet18", head=head, pooling="hybrid", img_size=32, batch_size=4, sam=sam, lr=0.05,
                      device="cpu")
    device = torch.device("cpu")
    project_model = train.build_model_for(cfg, device)
    bare_model = copy.deepcopy(project_model)
    initial = copy.deepcopy(project_model.state_dict())
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0.0, 12.0, 47.5, 100.0])
    train.StepRunner(project_model, train.build_optimizer(project_model, cfg), cfg, device)(images, targets)
    bench._bare_step(bare_model, bare_model, cfg, images, targets)()
    for name, p in project_model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue  # a counter the bare loop does not restore after the 2nd pass; unused when BN momentum is set
        assert torch.allclose(p, bare_model.state_dict()[name], rtol=1e-4, atol=1e-6), name
    moved = max(float((p.detach() - initial[n]).abs().max()) for n, p in project_model.named_parameters())
    assert moved > 1e-3
