"""Saliency (utils.explain) against the truth the phantoms know: their lesion masks."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from utils import explain, phantoms, predict, train
from utils.config import TrainConfig


@pytest.mark.slow
def test_the_heatmap_of_a_model_trained_on_phantoms_falls_on_the_infected_lung(tmp_path):
    """A resnet10t trained on 240 phantom slices (64 px, 12 epochs, ~45 s on 2 cores): on its held-out slices with
    at least 5 % infection, the share of the Grad-CAM map's mass inside the infection mask exceeds the infected
    share of the image, on average and on most slices."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images, masks, labels = [], [], []
    for i in range(240):
        infection = float(rng.uniform(0, 0.6)) if i % 4 else 0.0
        image, lung, infected = phantoms.render_slice(rng, 64, phantoms.draw_anatomy(rng),
                                                      z=float(rng.uniform(0.3, 0.7)), infection=infection)
        images.append(image)
        masks.append(infected)
        labels.append(100 * infected.sum() / lung.sum())
    frame = pd.DataFrame({"name": [f"Image_{i:04d}.png" for i in range(240)], "percentage": labels,
                          "subject": np.arange(240) // 4, "fold": (np.arange(240) // 4) % 5})
    cfg = TrainConfig(model_name="s", arch="resnet10t", head="reg", pooling="avg", img_size=64, epochs=12,
                      warmup_epochs=1, batch_size=16, lr=3e-3, optimizer="adamw", sam="none", save_last_k=1,
                      folds=[0], randaug_n=1, randaug_m=5, device="cpu", num_workers=0)
    split = train.SplitImages(frame, np.repeat(np.stack(images)[..., None], 3, axis=3))
    train.train_fold(cfg, 0, split, tmp_path / "fold0", progress=False)
    chosen = [i for i in np.flatnonzero(frame["fold"].to_numpy() == 0) if labels[i] >= 5]
    for i in chosen:
        Image.fromarray(images[i]).save(tmp_path / frame["name"][i])
    held_out = pd.DataFrame({"name": frame["name"][chosen], "path": [str(tmp_path / n) for n in frame["name"][chosen]]})
    model = predict.EnsembleModel(cfg, {0: [train.checkpoint_path(tmp_path / "fold0", cfg.epochs - 1)]})
    maps = explain.heatmaps([model], held_out, device="cpu", progress=False)
    inside = np.array([m[masks[i]].sum() / m.sum() for m, i in zip(maps, chosen)])
    area = np.array([masks[i].mean() for i in chosen])
    assert len(chosen) >= 20 and all(m.shape == (64, 64) and (m >= 0).all() for m in maps)
    assert inside.mean() > 1.2 * area.mean() and (inside > area).mean() >= 0.8, (inside.mean(), area.mean())


def test_output_names_never_collide():
    names = ["a.png", "a.jpg", "b.png", "c.png", "c.png"]  # a stem twice; a full name twice (two folders)
    stems = explain.output_stems(names)
    assert stems == ["a.png", "a.jpg", "b", "c.png.3", "c.png.4"] and len(set(stems)) == len(names)
    assert explain.heatmaps([], pd.DataFrame({"name": [], "path": []})) == []  # nothing asked, nothing decoded


def test_scans_csv_forms(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("Image_0001.png,scan_A\nImage_0002.png,007\n")  # no header; subjects are identifiers
    assert explain.read_scans(plain).to_dict("list") == {"name": ["Image_0001.png", "Image_0002.png"],
                                                         "subject": ["scan_A", "007"]}
    headed = tmp_path / "headed.csv"
    headed.write_text("Image,Subject\nImage_0001.png,007\n")
    assert explain.read_scans(headed)["subject"].tolist() == ["007"]
    labels = tmp_path / "Train.csv"
    labels.write_text("Image_0001.png,12.5,3\nImage_0002.png,0,3\n")  # the challenge's label file
    assert explain.read_scans(labels)[["name", "percentage"]].values.tolist() == [["Image_0001.png", 12.5],
                                                                                  ["Image_0002.png", 0.0]]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,subject\nImage_0001.png,\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 2: .* is not a name,subject row"):
        explain.read_scans(bad)
