"""The expert configs through ``lightning-lt fit`` / ``lightning-lt test`` with the test-distribution presets, and the
``benchmarks/test_agnostic.py`` smoke mode."""

from __future__ import annotations

import json
import sys

import pytest

from lightning_lt.cli import LightningLTCLI
from tests.datamodules.utils import write_image_folder
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*is empty because:UserWarning",
    "ignore:.*GPU available but not used:UserWarning",
    "ignore:.*Checkpoint directory .* exists and is not empty:UserWarning",
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(str(root / "train"), {"a": 12, "b": 6, "c": 3})
    write_image_folder(str(root / "test"), {"a": 4, "b": 4, "c": 4}, seed=1)
    return root


def overrides(root, tmp_path) -> list[str]:
    return [
        "--data=lightning_lt.datamodules.ImageFolderLT", f"--data.init_args.root={root}",
        "--data.init_args.imbalance_factor=1", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
        "--model.init_args.backbone.init_args.depth=8", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip


def test_sade_config_fit_then_test_with_aggregation_over_test_distributions(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    monkeypatch.chdir(REPO_ROOT)
    config = str(REPO_ROOT / "configs" / "cifar10_lt" / "sade.yaml")
    LightningLTCLI(args=["fit", "--config", config, *overrides(tiny_folder, tmp_path), "--trainer.max_epochs=1",
                         "--trainer.limit_val_batches=1"])  # fmt: skip
    (ckpt,) = tmp_path.rglob("last.ckpt")
    cli = LightningLTCLI(args=[
        "test", "--config", config, "--config", str(REPO_ROOT / "configs" / "trainer" / "test_time_aggregation.yaml"),
        *overrides(tiny_folder, tmp_path), f"--ckpt_path={ckpt}", "--trainer.callbacks.init_args.ratios=[2, 1]",
        "--trainer.callbacks.init_args.aggregation.init_args.epochs=1",
    ])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    for name in ("forward2", "uniform", "backward2"):
        assert f"test_dist/{name}/acc" in metrics and f"test_dist/{name}/equal_weights/acc" in metrics
        assert sum(float(metrics[f"test_dist/{name}/expert{e}/weight"]) for e in range(3)) == pytest.approx(1, abs=1e-6)
    assert "test_dist/acc_mean" in metrics and "test_dist/acc_std" in metrics


def test_test_distributions_preset_with_a_single_model_config(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    monkeypatch.chdir(REPO_ROOT)
    cli = LightningLTCLI(args=[
        "test", "--config", str(REPO_ROOT / "configs" / "cifar10_lt" / "la.yaml"),
        "--config", str(REPO_ROOT / "configs" / "trainer" / "test_distributions.yaml"),
        *overrides(tiny_folder, tmp_path),
        "--trainer.callbacks.init_args.ratios=[3, 1]", "--trainer.callbacks.init_args.dirichlet_draws=1",
        "--trainer.callbacks.init_args.dirichlet_ratio=3",
    ])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    for name in ("forward3", "uniform", "backward3", "dirichlet_uniform_0", "dirichlet_backward3_0"):
        assert f"test_dist/{name}/acc" in metrics


def test_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import test_agnostic
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    path = test_agnostic.main(["--smoke", "--results-dir", str(tmp_path), "--threads", "1"])
    rows = json.loads(path.read_text())["rows"]
    assert [row["name"] for row in rows] == ["CE", "LA", "RIDE", "SADE", "SADE+TTA", "DirMixE"]
    for row in rows:
        for key in ("acc_fwd50", "acc_fwd10", "acc_uniform", "acc_bwd10", "acc_bwd50", "acc_mean", "acc_std"):
            assert 0.0 <= row[key] <= 1.0, (row["name"], key)
    assert "SADE+TTA" in (tmp_path / "test_agnostic.md").read_text()
