"""The `lightning-lt` command line: linking data facts into the model, errors, checkpoints, summary."""

import importlib.metadata
import subprocess
import sys

import pytest
import torch

from lightning_lt.cli import LightningLTCLI, final_metrics_summary, main
from lightning_lt.tasks import LongTailClassifier
from tests.helpers import REPO_ROOT

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when both `args` and pytest's own `sys.argv` are present."""
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])


def fast_args(tmp_path, *extra: str) -> list[str]:
    return [
        "--config", QUICKSTART,
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=1",
        *extra,
    ]


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("lightning-lt") == "lightning_lt.cli:main"


def test_data_facts_are_linked_into_the_model(tmp_path):
    cli = LightningLTCLI(args=fast_args(tmp_path), run=False)
    assert isinstance(cli.model, LongTailClassifier)
    assert cli.model.num_classes == 10
    assert cli.model.class_counts == [117, 90, 69, 54, 41, 32, 25, 19, 14, 12] == cli.datamodule.class_counts
    assert cli.model.class_names == [str(i) for i in range(10)]
    assert cli.model.loss.log_prior.shape == (10,)  # the loss was built with the linked counts


def test_overrides_reach_the_data_and_loss(tmp_path):
    cli = LightningLTCLI(
        args=fast_args(tmp_path, "--data.init_args.imbalance_factor=5", "--model.init_args.loss.init_args.tau=2.0"),
        run=False,
    )
    assert cli.model.class_counts == cli.datamodule.class_counts
    assert cli.model.class_counts[0] / cli.model.class_counts[-1] == pytest.approx(5, rel=0.1)
    assert cli.model.loss.tau == 2.0


@pytest.mark.parametrize(
    "override, name",
    [
        ("--model.init_args.loss=lightning_lt.losses.NoSuchLoss", "lightning_lt.losses.NoSuchLoss"),
        ("--model.init_args.backbone=lightning_lt.nets.NoSuchNet", "lightning_lt.nets.NoSuchNet"),
    ],
)
def test_unknown_class_names_fail_with_the_name(tmp_path, capsys, override, name):
    with pytest.raises(SystemExit) as exc:
        LightningLTCLI(args=fast_args(tmp_path, override), run=False)
    assert exc.value.code != 0
    assert name in capsys.readouterr().err


def test_fit_prints_summary_and_checkpoint_reloads(tmp_path, caplog):
    with caplog.at_level("INFO"):
        main(["fit", *fast_args(tmp_path, "--trainer.enable_checkpointing=true")])
    assert "Final val metrics:" in caplog.text and "acc_few" in caplog.text
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints, "fit should have saved a checkpoint"
    # hyper-parameters saved by the CLI are the config: the model is rebuilt without arguments
    restored = LongTailClassifier.load_from_checkpoint(checkpoints[-1])
    assert restored.class_counts == [117, 90, 69, 54, 41, 32, 25, 19, 14, 12]
    assert type(restored.backbone).__name__ == "MLP"
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(restored.state_dict()["head.weight"], state["head.weight"])
    # and the test subcommand evaluates it
    main(["test", *fast_args(tmp_path), f"--ckpt_path={checkpoints[-1]}"])


def test_summary_formats_nan():
    text = final_metrics_summary({"val/acc": torch.tensor(0.5), "val/acc_few": torch.tensor(float("nan"))})
    assert "acc           0.5000" in text and "acc_few       nan" in text
    assert final_metrics_summary({}) == ""


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "lightning_lt", "--help"], capture_output=True, text=True, check=True)
    assert "fit" in out.stdout and "test" in out.stdout


# ----------------------------------------------------------------------------------------- two stages
STAGE2_CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
model:
  class_path: lightning_lt.tasks.DecoupledClassifier
  init_args:
    backbone:
      class_path: lightning_lt.nets.MLP
      init_args: {in_features: 64, hidden_features: [128, 128]}
    freeze_backbone: true
    many_threshold: 60
    few_threshold: 20
    optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.05, momentum: 0.9}
data:
  class_path: lightning_lt.datamodules.DigitsLT
  init_args: {imbalance_factor: 10, val_fraction: 0.1, batch_size: 64, num_workers: 0, sampler: class_balanced}
"""


def test_stage2_runs_from_the_stage1_checkpoint_of_the_cli(tmp_path):
    from lightning_lt.tasks import DecoupledClassifier

    main(["fit", *fast_args(tmp_path / "stage1", "--trainer.enable_checkpointing=true")])
    (stage1,) = sorted((tmp_path / "stage1").rglob("*.ckpt"))
    config = tmp_path / "stage2.yaml"
    config.write_text(STAGE2_CONFIG)
    common = ["--config", str(config), f"--trainer.default_root_dir={tmp_path / 'stage2'}"]
    with pytest.raises(ValueError, match="`init_from` is not set"):
        main(["fit", *common])
    # LWS: stage-1 head frozen, per-class scales learned on class-balanced batches
    lws = ["--model.init_args.freeze_head=true", "--model.init_args.learnable_scales=true"]
    main(["fit", *common, f"--model.init_args.init_from={stage1}", "--trainer.enable_checkpointing=true", *lws])
    (stage2,) = sorted((tmp_path / "stage2").rglob("*.ckpt"))
    restored = DecoupledClassifier.load_from_checkpoint(stage2)
    first = torch.load(stage1, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(restored.state_dict()["backbone.layers.1.weight"], first["backbone.layers.1.weight"])
    torch.testing.assert_close(restored.head.weight, first["head.weight"])
    assert not torch.allclose(restored.logit_scales, torch.ones(10))
    # tau-normalisation: nothing to train, tau chosen by `validate`
    tau = ["--model.init_args.freeze_head=true", "--model.init_args.tau_norm=true", f"--model.init_args.init_from={stage1}"]
    cli = LightningLTCLI(args=["validate", *common, *tau])  # tau chosen on the held-out split, not the test split
    assert cli.datamodule.validates_on_test_split is False
    assert float(cli.trainer.callback_metrics["val/tau"]) == pytest.approx(float(cli.model.chosen_tau))
    assert min(abs(float(cli.model.chosen_tau) - 0.1 * i) for i in range(21)) < 1e-6  # on the official grid
    with pytest.raises(ValueError, match="nothing to train.*lightning-lt validate"):
        main(["fit", *common, *tau])
