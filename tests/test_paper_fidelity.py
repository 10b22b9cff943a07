"""The seed team's code as settings (docs/paper.md), each against a hand computation: the three roundings, what f2
reads, their RandAugment at M 15, SAM's BatchNorm updates, their learning-rate schedule; the `paper` and
`paper_text` profiles validate and run end to end at toy size."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from utils import augment, ensemble, models, pipeline, predict, runs, sam, train
from utils.config import ConfigError, EnsembleSettings, TrainConfig, load_profile


def checkpoints(values, model="m", fold=0):
    return pd.DataFrame({"model": model, "fold": fold, "split": "Val", "name": "a.png",
                         "epoch": range(len(values)), "prediction": values})


# ------------------------------------------------------------------------------------------- rounding


def test_the_three_roundings_on_a_case_that_tells_them_apart():
    per_model = ensemble.average_checkpoints_and_folds(checkpoints([2.4, 2.4, 2.7]))
    value = {rule: ensemble.combine_models(per_model, ["m"], rounding=rule)["prediction"].item()
             for rule in ("none", "once", "authors")}
    assert value == {"none": pytest.approx(2.5), "once": 3.0, "authors": 2.0}  # round(2.5); int(mean(2, 2, 3))
    assert ensemble.combine_models(per_model, ["m"], rounding=True)["prediction"].item() == 3.0  # true is once


def test_the_authors_ensemble_rounds_the_mean_of_every_checkpoint_integer_half_up():
    # their combine_results.py: 2.6, 2.6, 2.4 -> 3, 3, 2 and 2.4 -> 2: mean of (3, 3, 2, 2) = 2.5 -> 3 (half up),
    # where one model alone truncates: int(mean(3, 3, 2)) = 2; a negative checkpoint counts as 0
    per_model = ensemble.average_checkpoints_and_folds(pd.concat([checkpoints([2.6, 2.6, 2.4]),
                                                                  checkpoints([2.4], model="n")]))
    assert ensemble.combine_models(per_model, ["m"], rounding="authors")["prediction"].item() == 2.0
    assert ensemble.combine_models(per_model, ["m", "n"], rounding="authors")["prediction"].item() == 3.0
    negative = ensemble.average_checkpoints_and_folds(checkpoints([-3.0, 1.6]))
    assert ensemble.combine_models(negative, ["m"], rounding="authors")["prediction"].item() == 1.0  # int(1)


def test_rounding_settings_take_the_old_spelling_and_refuse_others():
    assert EnsembleSettings(rounding=True).rounding == "once" and EnsembleSettings(rounding=False).rounding == "none"
    assert EnsembleSettings(rounding="authors").rounding == "authors"
    with pytest.raises(ConfigError, match="rounding='half': choose one of none, once, authors"):
        EnsembleSettings(rounding="half")


# ------------------------------------------------------------------------------------------- f2


@pytest.mark.parametrize("f2_input", ["probs", "logits"])
def test_f2_reads_the_tensor_its_setting_names(f2_input):
    torch.manual_seed(0)
    net = models.build_model("resnet10t", head="exp", pooling="avg", f2_input=f2_input).eval()
    seen = {}
    net.head_reg.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0].detach()))
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    expected = out["logits"] if f2_input == "logits" else out["logits"].softmax(dim=1)
    torch.testing.assert_close(seen["x"], expected)
    torch.testing.assert_close(out["reg"], seen["x"] @ net.head_reg.weight[0] + net.head_reg.bias)
    if f2_input == "probs":  # initialised as the expectation; on the logits PyTorch's default, as the seed code
        torch.testing.assert_close(out["reg"], out["expectation"])
    else:
        assert net.head_reg.weight.abs().max() <= 1 / math.sqrt(101)


# ------------------------------------------------------------------------------------------- their RandAugment


def test_authors_randaugment_at_m15_leaves_colour_unchanged_and_rotates_by_exactly_15_degrees():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    for op in ("color", "contrast", "brightness", "sharpness"):
        value = augment.authors_value(op, 15)
        assert value == pytest.approx(1.0)
        assert np.array_equal(np.asarray(augment.authors_op(image, op, value)), np.asarray(image)), op
    assert augment.authors_value("rotate", 15) == 15.0
    rotated = {sign: np.asarray(image.rotate(sign * 15.0)) for sign in (1, -1)}
    transform = augment.AuthorsRandAugment(n_ops=1, magnitude=15, ops=("rotate",))
    outcomes = set()
    for seed in range(40):
        transform.set_random_state(np.random.default_rng(seed), __import__("random").Random(seed))
        out = transform.apply(np.asarray(image)[:, :, None])[:, :, 0]
        match = [name for name, ref in (("+15", rotated[1]), ("-15", rotated[-1]), ("kept", np.asarray(image)))
                 if np.array_equal(out, ref)]
        assert len(match) == 1, seed  # exactly one of: rotated by +15, by -15, or not applied (p 0.5)
        outcomes.add(match[0])
    assert outcomes == {"+15", "-15", "kept"}


def test_authors_pixels_scale_with_the_image_side():
    # their translate is 50 px at M 15 on a 512 px slice: a 64 px image moves by 50 / 8 = 6.25 px (PIL's affine)
    image = np.zeros((64, 64, 1), np.uint8)
    image[:, 40:] = 255
    transform = augment.AuthorsRandAugment(n_ops=1, magnitude=15, ops=("translate_x",))
    shifted = set()
    for seed in range(30):
        transform.set_random_state(np.random.default_rng(seed), __import__("random").Random(seed))
        shifted.add(int(np.argmax(transform.apply(image)[0, :, 0] > 0)))
    assert shifted == {40, 34, 46}  # not applied, or 6 px either way (PIL rounds 6.25 to the nearest pixel)


def test_training_flips_come_after_randaugment_and_flip_both_axes():
    cfg = TrainConfig(randaug_n=0, train_flips=True)
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, axis=2)
    seen = set()
    for seed in range(40):
        out = augment.training_transform(cfg, seed=seed)(image)[0].numpy()
        seen.add(next(name for name, ref in (("none", image[:, :, 0]), ("h", image[:, ::-1, 0]),
                                            ("v", image[::-1, :, 0]), ("hv", image[::-1, ::-1, 0]))
                      if np.array_equal(out, ref)))
    assert seen == {"none", "h", "v", "hv"}
    assert augment.training_transform(TrainConfig(randaug_n=0)).augment is None  # the suite's default: no flips


# ------------------------------------------------------------------------------------------- SAM and BatchNorm


class Residual(nn.Module):
    """h = w x + b; out = BN(h) + h, loss = mean(out): the batch-normalised part has mean 0, so the gradient is
    (mean x, 1) for (w, b) and (0, 1) for BN's (scale, shift) at any weights; BN's running mean follows the batch mean
    of h."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.bn = nn.BatchNorm1d(1, momentum=0.1)
        with torch.no_grad():
            self.linear.weight.fill_(2.0)
            self.linear.bias.fill_(0.5)

    def forward(self, x):
        h = self.linear(x)
        return self.bn(h) + h


@pytest.mark.parametrize("bn_update", ["first", "both"])
def test_sam_moves_batchnorm_statistics_once_or_twice_by_the_hand_computed_amount(bn_update):
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]])  # mean 3
    model = Residual().train()
    optimizer = sam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    sam.sam_train_step(model, optimizer, lambda: model(x).mean(), bn_update=bn_update)
    # pass 1 at (w, b) = (2, 0.5): batch mean of h = 2 * 3 + 0.5 = 6.5; running mean 0.9 * 0 + 0.1 * 6.5
    first = 0.1 * 6.5
    # the climb: gradient (3, 1, 0, 1) for (w, b, scale, shift), e = 0.05 g / sqrt(11); pass 2's batch mean of h
    # at (w, b) + e
    e_w, e_b = 0.05 * 3 / math.sqrt(11), 0.05 / math.sqrt(11)
    second = 0.9 * first + 0.1 * ((2 + e_w) * 3 + 0.5 + e_b)
    expected = first if bn_update == "first" else second
    assert model.bn.running_mean.item() == pytest.approx(expected, rel=1e-6)
    assert model.bn.num_batches_tracked.item() == (1 if bn_update == "first" else 2)


# ------------------------------------------------------------------------------------------- learning rate


def test_the_authors_schedule_starts_at_0_and_follows_their_cosine():
    # their LR_Scheduler: lr = base T / warm-up iterations, then 0.5 base (1 + cos(pi (T - warm-up) / rest))
    cfg = TrainConfig(lr=1e-3, warmup_lr=0.0, min_lr=0.0, epochs=5, warmup_epochs=2, sam="none")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = train.build_scheduler(optimizer, cfg, steps_per_epoch=10)
    for step in range(50):
        scheduler.step_update(step)
        lr = optimizer.param_groups[0]["lr"]
        theirs = 1e-3 * step / 20 if step < 20 else 0.5 * 1e-3 * (1 + math.cos((step - 20) / 30 * math.pi))
        assert lr == pytest.approx(theirs, abs=1e-12), step


# ------------------------------------------------------------------------------------------- the profiles


@pytest.mark.parametrize("name", ["paper", "paper_text"])
def test_the_paper_profiles_validate(name):
    run = runs.resolve(name, {}, check_archs=True)
    assert {c.f2_input for c in run.train} == {"logits"} and run.settings["ensemble"].rounding == "authors"
    assert {(c.randaug_style, c.randaug_m, c.train_flips, c.sam_bn_update, c.warmup_lr, c.min_lr)
            for c in run.train} == {("authors", 15, True, "both", 0.0, 0.0)}
    assert {c.model_name: c.batch_size for c in run.train if "resnest101" in c.model_name}.popitem()[1] == 4
    poolings = {c.arch: c.pooling for c in run.train}
    assert poolings["resnext50_32x4d"] == "avg"
    assert poolings["resnest50d"] == poolings["resnest101e"] == ("avg" if name == "paper" else "hybrid")
    assert len(load_profile(name)["models"]) == 4 and len(run.pseudo) == 1


TOY = ["-p", "arch", "resnet10t", "-p", "img_size", "32", "-p", "epochs", "1", "-p", "warmup_epochs", "0",
       "-p", "save_last_k", "1", "-p", "max_steps_per_epoch", "1", "-p", "pretrained", "false", "-p", "n_folds", "2",
       "-p", "batch_size", "4", "-p", "device", "cpu", "-p", "num_workers", "0"]


@pytest.mark.parametrize("name", ["paper", "paper_text"])
def test_the_paper_profiles_dry_run_in_one_call(tmp_path, capsys, name):
    assert pipeline.main(["--profile", name, "--workdir", str(tmp_path), "--dry-run", "--kernel", "python3",
                          "-p", "pretrained", "false"]) == 0
    plan = capsys.readouterr().out
    assert "resnest101" in plan and "04_pseudo_label" in plan and not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper", "paper_text"])
def test_the_paper_profiles_run_end_to_end_at_toy_size(tmp_path, phantom_set, name):
    assert pipeline.main(["--profile", name, "--workdir", str(tmp_path), "--data", str(phantom_set),
                          "--kernel", "python3", "--jobs", "1", *TOY]) == 0
    run_dir = tmp_path / "runs" / name
    saved = yaml.safe_load((run_dir / "run_config.yaml").read_text())["settings"]
    assert saved["ensemble"]["rounding"] == "authors"
    submission = (tmp_path / "submissions" / f"{name}.csv").read_text().splitlines()
    assert submission and all(float(line.split(",")[1]).is_integer() for line in submission)
    assert (run_dir / "ensemble" / "final_rounding.txt").read_text().strip() == "authors"
    # utils.predict repeats the run's rounding: its export predicts the submission's values
    rows = predict.predict_images(run_dir / "export", [phantom_set / "Val"], progress=False)
    submitted = dict(line.split(",") for line in submission)
    assert len(rows) == len(submitted)
    assert all(float(submitted[name]) == value for name, value in zip(rows["name"], rows["prediction"]))
