"""benchmarks/decoupling.py: the validation split of its data module and a smoke run of the whole script."""

import json

import numpy as np
import pytest

from tests.test_benchmarks_common import QUIET_BENCHMARK_RUN, _load

pytestmark = QUIET_BENCHMARK_RUN


@pytest.fixture(scope="module")
def decoupling():
    return _load("decoupling")


def test_validation_comes_from_unused_images_then_from_the_class_itself(decoupling, tmp_path):
    decoupling.make_smoke_folder(tmp_path, per_class=12, test_per_class=2, size=8)
    dm = decoupling.CIFAR10JpegLT(str(tmp_path), imbalance_factor=4.0, val_per_class=3)
    split = dm.split()
    train = [f for f, _ in split["train"]]
    val = [f for f, _ in split["val"]]
    assert not set(train) & set(val) and len(val) == 30
    assert [sum(label == c for _, label in split["val"]) for c in range(10)] == [3] * 10
    profile = [12, 10, 8, 7, 6, 5, 4, 4, 3, 3]  # imbalance_counts(12, 10, 4): classes 0 and 1 leave 0 and 2 unused
    assert dm.class_counts == [n - max(0, 3 - (12 - n)) for n in profile]  # 9, 9, 9, 7, ...: the shortfall trains less
    dm.setup("fit")
    assert len(dm.train_eval_dataloader().dataset) == sum(dm.class_counts) == len(dm.train_dataset)
    assert dm.train_eval_dataset.images is dm.train_dataset.images  # the same images, decoded once
    assert np.array_equal(dm.train_eval_dataset[0][0].numpy(), dm.train_eval_dataset[0][0].numpy())  # no augmentation


def test_smoke_run_writes_every_row_and_key(decoupling, tmp_path):
    result = decoupling.main(["--smoke", "--threads", "1", "--results-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "decoupling-smoke.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["CE", "cRT", "LWS", "tau-norm", "WB", "MiSLAS"] == [r["name"] for r in result["rows"]]
    for row in rows:
        assert {"acc", "acc_many", "acc_medium", "acc_few", "tau"} <= set(row)
        assert 0 <= row["acc"] <= 1 and 0 <= row["balanced_acc"] <= 1
        assert (row["tau"] is not None) == (row["name"] == "tau-norm")
        assert ("beats_stage1" in row) == (row["name"] != "CE")
    assert rows[-1]["stage1"] == "mixup" and "beats_own_stage1" in rows[-1]
    assert (tmp_path / "decoupling-smoke.md").read_text().count("\n| ") == 7
