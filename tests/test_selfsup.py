"""utils.selfsup: the losses by hand, a tiny pretraining whose weights 02_train loads, and the pipeline's plan."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import selfsup, train
from utils.config import SelfSupSettings, TrainConfig


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
    for method in ("simclr", "simsiam", "byol"):
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
    configured, runs = selfsup.with_pretraining(configs, SelfSupSettings(selfsup_epochs=3), tmp_path)
    assert sorted(p.name for p in runs) == ["resnet10t_3ch_32px_simclr_e3.pth", "resnet18_3ch_32px_simclr_e3.pth"]
    assert configured[0].pretrained_file == configured[1].pretrained_file != configured[2].pretrained_file
    assert configured[3].pretrained_file == "/elsewhere.pth"  # a model with weights of its own keeps them
    _, runs = selfsup.with_pretraining(configs[:1], SelfSupSettings(selfsup_epochs=3, selfsup_method="byol",
                                                                    selfsup_dedup=0.97), tmp_path)
    ((out, cfg),) = runs.items()  # another recipe, another file: the plain one is not reused for it
    assert out.name == "resnet10t_3ch_32px_byol_e3_dedup0.97.pth"
    assert (cfg.method, cfg.epochs, cfg.dedup_correlation) == ("byol", 3, 0.97)


@torch.no_grad()
def test_predictor_loss_and_byol_target_decay_by_hand():
    torch.manual_seed(0)
    cfg = selfsup.SelfSupConfig(arch="resnet10t", img_size=32, method="byol", projection_dim=4)
    model = selfsup.SelfSupModel(cfg).eval()
    z1, z2, t1, t2 = torch.randn(4, 3, 4).unbind(0)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    cos = [sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))
           for u, v in zip(p1.tolist() + p2.tolist(), t2.tolist() + t1.tolist())]
    expected = -(sum(cos[:3]) / 3 + sum(cos[3:]) / 3) / 2
    assert float(selfsup.predictor_loss(model, z1, z2, t1, t2)) == pytest.approx(expected, rel=1e-5)
    # SimSiam: the other view's own embedding is the target
    assert float(selfsup.predictor_loss(model, z1, z2)) == pytest.approx(
        float(selfsup.predictor_loss(model, z1, z2, z1, z2)), rel=1e-6)
    decays = [selfsup.target_decay(step, 5, 0.99) for step in range(5)]
    assert decays[0] == pytest.approx(0.99) and decays[-1] == pytest.approx(1.0)
    assert decays[2] == pytest.approx(0.995) and decays == sorted(decays)  # halfway on the cosine


def test_near_duplicate_slices_are_dropped_against_the_last_kept_one(tmp_path):
    rng = np.random.default_rng(0)
    lung, other = (rng.integers(0, 200, (48, 48, 3)).astype(np.uint8) for _ in range(2))
    brighter = np.clip(lung.astype(int) * 1.1 + 5, 0, 255).astype(np.uint8)  # r ~ 1 with lung: a near-duplicate
    flat = np.full((48, 48, 3), 90, np.uint8)
    images = np.stack([lung, brighter, other, lung, flat, flat])
    assert selfsup.distinct_slices(images, 0.97).tolist() == [0, 2, 3, 4]  # the 2nd flat one repeats the 1st
    assert selfsup.distinct_slices(images, 1.0).tolist() == [0, 1, 2, 3, 4]
    thumbs = [images[i, :, :, 0].reshape(24, 2, 24, 2).mean(axis=(1, 3)).ravel() for i in (0, 1)]
    assert float(np.corrcoef(*thumbs)[0, 1]) > 0.99  # what the 0.97 above dropped, computed by hand
    cfg = selfsup.SelfSupConfig(arch="resnet10t", img_size=32, epochs=1, batch_size=4, dedup_correlation=0.97)
    history = selfsup.pretrain(images, cfg, tmp_path / "dedup.pth", device="cpu")
    assert history["slices"].tolist() == [4]
    with pytest.raises(ValueError, match="got 1 of 3: .*or a higher selfsup_dedup"):  # three copies: one is left
        selfsup.pretrain(np.stack([lung] * 3), cfg, tmp_path / "one.pth", device="cpu")


def test_a_folder_smaller_than_one_batch_still_trains_and_one_slice_is_a_clear_error(tmp_path):
    """CI's real-crop run had 40 slices against the default batch of 128: no batch at all, then a ZeroDivisionError."""
    images = np.random.default_rng(0).integers(0, 255, (5, 40, 40, 3), dtype=np.uint8)
    cfg = selfsup.SelfSupConfig(arch="resnet10t", img_size=32, epochs=1, batch_size=128)
    history = selfsup.pretrain(images, cfg, tmp_path / "small.pth", device="cpu")
    assert np.isfinite(history["loss"]).all() and history["images_per_s"].iloc[0] > 0
    with pytest.raises(ValueError, match="at least 2 unlabelled slices.*selfsup_epochs 0"):
        selfsup.pretrain(images[:1], cfg, tmp_path / "one.pth", device="cpu")
    assert not (tmp_path / "one.pth").exists()
