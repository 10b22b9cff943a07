"""utils.selfsup: the losses by hand, a tiny pretraining whose weights 02_train loads, and the pipeline's plan."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import selfsup, train
from utils.config import TrainConfig


def test_nt_xent_by_hand():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = (z @ z.T / 0.5).tolist()
    expected = 0.0
    for i in range(6):
        partner = (i + 3) % 6
        denominator = sum(math.exp(similarity[i][j]) for j in range(6) if j != i)
        expected += -math.log(math.exp(similarity[i][partner]) / denominator)
    assert float(selfsup.nt_xent(z1, z2, 0.5)) == pytest.approx(expected / 6, rel=1e-5)
    aligned = torch.eye(3, 4) * 10  # each view exactly its partner, far from the others: near-zero loss
    assert float(selfsup.nt_xent(aligned, aligned, 0.1)) < 1e-3


def test_a_tiny_pretraining_gives_weights_that_training_loads(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 40, 40, 3), dtype=np.uint8)
    for method in ("simclr", "simsiam"):
        cfg = selfsup.SelfSupConfig(arch="resnet10t", img_size=32, epochs=1, batch_size=8, method=method)
        out = tmp_path / f"{method}.pth"
        history = selfsup.pretrain(images, cfg, out, device="cpu")
        assert len(history) == 1 and np.isfinite(history["loss"]).all()
        model = train.build_model_for(TrainConfig(arch="resnet10t", head="reg", pooling="avg", img_size=32,
                                                  pretrained_file=str(out), device="cpu"), torch.device("cpu"))
        saved = torch.load(out, weights_only=True)
        loaded = model.backbone.state_dict()
        assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_the_plan_pretrains_once_per_backbone_and_points_the_models_at_it(tmp_path):
    configs = [TrainConfig(model_name="a", arch="resnet10t", img_size=32), TrainConfig(model_name="b",
               arch="resnet10t", img_size=32, head="ldl"), TrainConfig(model_name="c", arch="resnet18", img_size=32),
               TrainConfig(model_name="d", arch="resnet18", pretrained_file="/elsewhere.pth")]
    configured, runs = selfsup.with_pretraining(configs, epochs=3, method="simclr", out_dir=tmp_path)
    assert sorted(p.name for p in runs) == ["resnet10t_3ch_32px_simclr_e3.pth", "resnet18_3ch_32px_simclr_e3.pth"]
    assert configured[0].pretrained_file == configured[1].pretrained_file != configured[2].pretrained_file
    assert configured[3].pretrained_file == "/elsewhere.pth"  # a model with weights of its own keeps them


def test_a_folder_smaller_than_one_batch_still_trains_and_one_slice_is_a_clear_error(tmp_path):
    """CI's real-crop run had 40 slices against the default batch of 128: no batch at all, then a ZeroDivisionError."""
    images = np.random.default_rng(0).integers(0, 255, (5, 40, 40, 3), dtype=np.uint8)
    cfg = selfsup.SelfSupConfig(arch="resnet10t", img_size=32, epochs=1, batch_size=128)
    history = selfsup.pretrain(images, cfg, tmp_path / "small.pth", device="cpu")
    assert np.isfinite(history["loss"]).all() and history["images_per_s"].iloc[0] > 0
    with pytest.raises(ValueError, match="at least 2 unlabelled slices.*selfsup_epochs 0"):
        selfsup.pretrain(images[:1], cfg, tmp_path / "one.pth", device="cpu")
    assert not (tmp_path / "one.pth").exists()
