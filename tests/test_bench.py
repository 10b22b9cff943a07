"""utils.bench: one tiny real run (figures and the formulas that link them) and the paper estimate by hand."""
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
    """The CLI's in-process entry on the tiny setting; returns (result, what --json wrote)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench.main(TINY + ["--json", str(path)])
    return result, json.loads(path.read_text())


def test_tiny_run_measures_every_figure(tiny_run):
    result, written = tiny_run
    assert written == json.loads(json.dumps(result))  # the JSON holds the returned figures
    assert (result["arch"], result["img_size"], result["batch_size"], result["device"]) == ("resnet18", 32, 4, "cpu")
    assert (result["optimizer"], result["sam"], result["workers"], result["steps"]) == ("sgd", "sam", 0, 3)
    for key in ("model_img_s", "pipeline_img_s", "bare_img_s", "decode_img_s", "augment_img_s",
                "hours_as_measured", "hours_flop_scaled"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert not result["amp"] and not result["channels_last"]  # bf16/channels_last are CUDA-only


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
    assert r["cost_ratio"]["resnest50_exp_hybrid"] == pytest.approx(5.37 / 1.82 * 256, rel=0.02)


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
    assert max(float((p.detach() - initial[n]).abs().max()) for n, p in project_model.named_parameters()) > 1e-3  # it moved
