"""utils.augment: RandAugment ops on albumentations 2.0.8, normalisation, eval determinism, flip TTA, worker seeds."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from utils import augment
from utils.augment import IMAGENET_MEAN, IMAGENET_STD, build_transform, hflip_tta, randaugment_ops
from utils.data import SliceDataset


def ct_like(size: int = 64, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A bright disc (body) with a dark ellipse (lung) and noise, gray replicated to `channels`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    gray = np.where(xx**2 + yy**2 < 0.2, 220.0, 10.0)
    gray = np.where(((xx - 0.1) / 0.15) ** 2 + (yy / 0.25) ** 2 < 1, 60.0, gray) + rng.normal(0, 8, (size, size))
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], channels, axis=2)


def hand_normalised(image: np.ndarray, mean, std) -> np.ndarray:
    x = image.astype(np.float64) / 255.0
    return ((x - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


def test_building_and_running_raises_no_warning():
    """Wrong albumentations 2.0.8 argument names show up as warnings; none may appear."""
    image = ct_like(48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for channels in (1, 3):
            for magnitude in (0, 1, 9, 30):
                for grayscale in (True, False):
                    transform = build_transform(True, channels, 2, magnitude, grayscale=grayscale, seed=1)
                    for _ in range(6):
                        transform(image[:, :, :channels])
                for op in randaugment_ops(magnitude, grayscale=False):
                    op(image=image[:, :, :channels])


def test_eval_transform_then_normalizer_is_plain_normalisation():
    image = ct_like(32)
    transform = build_transform(False, 3)
    out = transform(image)
    assert out.dtype == torch.uint8 and out.shape == (1, 32, 32)  # gray travels as one uint8 channel
    assert torch.equal(transform(image), out)  # deterministic
    normalised = augment.Normalizer(3)(out[None])[0]
    assert normalised.dtype == torch.float32 and normalised.shape == (3, 32, 32)
    np.testing.assert_allclose(normalised.numpy(), hand_normalised(image, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)
    colour = build_transform(False, 3, grayscale=False)(image)  # colour input keeps its channels
    assert colour.shape == (3, 32, 32)
    torch.testing.assert_close(augment.Normalizer(3)(colour[None])[0], normalised, atol=0, rtol=0)
    gray = augment.Normalizer(1)(build_transform(False, 1)(image[:, :, :1])[None])[0]
    mean1, std1 = np.mean(IMAGENET_MEAN), np.mean(IMAGENET_STD)
    np.testing.assert_allclose(gray.numpy(), hand_normalised(image[:, :, :1], [mean1], [std1]), atol=1e-6)
    custom = augment.Normalizer(3, mean=0.5, std=(0.25, 0.5, 1.0))(out[None])[0]
    np.testing.assert_allclose(custom.numpy(), hand_normalised(image, [0.5] * 3, [0.25, 0.5, 1.0]), atol=1e-6)
    channels_last = augment.Normalizer(3)(out[None].expand(2, 1, 32, 32), channels_last=True)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)  # the model's layout, gray expanded
    torch.testing.assert_close(channels_last[1], normalised, atol=0, rtol=0)


def test_train_transform_keeps_shape_and_changes_pixels():
    image = ct_like(64)
    plain = build_transform(False, 3)(image)
    transform = build_transform(True, 3, n_ops=2, magnitude=9, seed=0)
    outputs = [transform(image) for _ in range(12)]
    assert all(o.shape == (1, 64, 64) and o.dtype == torch.uint8 for o in outputs)
    changed = [not torch.equal(o, plain) for o in outputs]
    assert all(changed)  # every draw applies two real ops
    assert len({o.sum().item() for o in outputs}) > 8  # and they differ from draw to draw
    assert np.asarray(image).flags.writeable and (image == ct_like(64)).all()  # input untouched


def test_gray_fast_path_equals_augmenting_all_channels():
    image = ct_like(64)
    fast = build_transform(True, 3, seed=4)
    assert fast.gray_input
    full = build_transform(True, 3, seed=4)
    full.gray_input = False  # augment the three (equal) channels one by one
    for _ in range(12):
        torch.testing.assert_close(fast(image).expand(3, 64, 64), full(image), atol=0, rtol=0)


def test_magnitude_zero_is_the_identity():
    image = ct_like(48)
    plain = build_transform(False, 3)(image)
    transform = build_transform(True, 3, n_ops=3, magnitude=0, seed=3)
    for _ in range(10):
        torch.testing.assert_close(transform(image), plain)


def test_op_list_and_magnitude_mapping():
    gray_ops, colour_ops = randaugment_ops(30), randaugment_ops(30, grayscale=False)
    assert len(gray_ops) == 9 and len(colour_ops) == 10  # colour (saturation) only for colour input
    assert sum(type(op).__name__ == "ColorJitter" and op.saturation != (1.0, 1.0) for op in colour_ops) == 1
    assert not any(type(op).__name__ == "ColorJitter" and op.saturation != (1.0, 1.0) for op in gray_ops)
    rotate = next(op for op in randaugment_ops(9) if type(op).__name__ == "Rotate")
    assert rotate.limit == pytest.approx((-9.0, 9.0))  # the paper's 0-30 degrees, M/30 of it
    assert next(op for op in gray_ops if type(op).__name__ == "Rotate").limit == pytest.approx((-30.0, 30.0))
    shear = gray_ops[4]
    assert shear.shear["x"] == pytest.approx((-math.degrees(math.atan(0.3)), math.degrees(math.atan(0.3))))
    assert all(op.p == 1.0 for op in gray_ops)
    with pytest.raises(ValueError, match="magnitude"):
        randaugment_ops(31)
    with pytest.raises(ValueError, match="n_ops"):
        build_transform(True, 3, n_ops=10)


def test_each_op_changes_the_image_and_keeps_shape():
    image = ct_like(64, channels=1)
    for op in randaugment_ops(30):
        results = [op(image=image)["image"] for _ in range(4)]
        assert all(r.shape == image.shape and r.dtype == np.uint8 for r in results), type(op).__name__
        assert any(not np.array_equal(r, image) for r in results), type(op).__name__


def test_geometric_ops_fill_with_black():
    image = np.full((40, 40, 1), 200, dtype=np.uint8)
    rotate = next(op for op in randaugment_ops(30) if type(op).__name__ == "Rotate")
    rotate.limit = (30.0, 30.0)
    out = rotate(image=image)["image"]
    assert out[0, 0, 0] == 0 and out[20, 20, 0] == 200  # corners come from outside: CT air is dark


def test_seed_reproducible_and_worker_init_reseeds():
    image = ct_like(32)
    first = [build_transform(True, 3, seed=7)(image) for _ in range(1)]
    again = [build_transform(True, 3, seed=7)(image) for _ in range(1)]
    torch.testing.assert_close(first[0], again[0])

    # Two loader workers start from the same forked random state; worker_init must make them draw differently.
    images = np.stack([image] * 4)
    dataset = SliceDataset(images, None, build_transform(True, 3, seed=11))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=2, worker_init_fn=augment.worker_init, multiprocessing_context="fork"
    )
    batches = [b[0] for b in loader]
    assert not torch.equal(batches[0], batches[1])  # index 0 -> worker 0, index 1 -> worker 1


def test_hflip_tta():
    batch = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    flipped = hflip_tta(batch)
    np.testing.assert_array_equal(flipped.numpy(), batch.numpy()[..., ::-1])
    torch.testing.assert_close(hflip_tta(flipped), batch)
    with pytest.raises(ValueError):
        hflip_tta(batch[0])
