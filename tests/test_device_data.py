""".ci/device_data.py: the data carried to a lent GPU machine decodes to exactly the arrays of the original folder."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from utils import config, data, phantoms


@pytest.fixture(scope="module")
def device_data():
    spec = importlib.util.spec_from_file_location("device_data", config.REPO_ROOT / ".ci" / "device_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_data"] = module  # its process pool pickles its functions by module name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["device_data"]


def test_pack_then_unpack_gives_the_pipeline_the_same_arrays_and_labels(device_data, tmp_path):
    original = tmp_path / "original"
    phantoms.generate_phantoms(original, subjects=4, size=64, seed=3)
    device_data.pack(str(original), 48, str(tmp_path / "carried.tar"))
    device_data.unpack(str(tmp_path / "carried.tar"), str(tmp_path / "unpacked"))
    for split in ("Train", "Val", "Test"):
        before = data.load_split(original, split)
        after = data.load_split(tmp_path / "unpacked", split)
        pd.testing.assert_frame_equal(before.drop(columns="path"), after.drop(columns="path"))
        for path_before, path_after in zip(before["path"], after["path"]):
            assert np.array_equal(data.load_image(path_before, 48, 3), data.load_image(path_after, 48, 3))
    # the label file travels byte for byte
    assert (tmp_path / "unpacked" / "Train" / "Train.csv").read_bytes() == \
        data.find_labels_csv(original / "Train", "Train").read_bytes()


def test_a_carry_over_its_size_limit_comes_in_parts_that_unpack_into_one_folder(device_data, tmp_path):
    original = tmp_path / "original"
    phantoms.generate_phantoms(original, subjects=4, size=64, seed=3)
    whole = Path(device_data.pack(str(original), 64, str(tmp_path / "whole.tar"))[0]).stat().st_size
    limit = whole / 2**20 / 2.5  # the whole would need three parts
    parts = device_data.pack(str(original), 64, str(tmp_path / "carried.tar"), max_mib=limit)
    assert len(parts) >= 3 and all(Path(p).stat().st_size <= limit * 2**20 for p in parts)
    for part in parts:
        device_data.unpack(part, str(tmp_path / "unpacked"))
    for split in ("Train", "Val", "Test"):
        assert list(data.load_split(tmp_path / "unpacked", split)["name"]) == \
            list(data.load_split(original, split)["name"])
