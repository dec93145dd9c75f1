"""Fault tolerance: atomic checkpoint files, and `lightning-lt fit` killed (SIGKILL) then resumed.

Kill-and-resume: the uninterrupted run and the killed run are separate `python -m lightning_lt fit` processes with
the same config (deterministic CPU training, `num_workers: 0`); the killed one SIGKILLs itself right after the
checkpoint of epoch `E` was written (tests/fault_helpers.py::KillAfter), a third process resumes it with
`--ckpt_path last`, and every tensor of the final `last.ckpt` state_dict must equal the uninterrupted run's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_lt.checkpoint import AtomicCheckpointIO, atomic_torch_save
from lightning_lt.cli import LightningLTCLI
from tests.datamodules.test_cifar import make_cifar10
from tests.datamodules.test_segmentation import make_camvid
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
)

# --------------------------------------------------------------------------------------------- atomic saves


def test_atomic_save_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    checkpoint = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 4}
    io.save_checkpoint(checkpoint, path)
    loaded = io.load_checkpoint(path)
    assert loaded["epoch"] == 4 and torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    io.save_checkpoint({"epoch": 5}, path)  # overwrites
    assert io.load_checkpoint(path)["epoch"] == 5
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(checkpoint, path, storage_options={"a": 1})


def half_write_then_die(obj, f, *args, **kwargs):
    """`torch.save` killed half-way: half of the bytes reach the file, then the process "dies"."""
    import io as _io

    buffer = _io.BytesIO()
    REAL_TORCH_SAVE(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    raise KeyboardInterrupt("killed during the save")


REAL_TORCH_SAVE = torch.save


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(1000)}, path)
    monkeypatch.setattr(torch, "save", half_write_then_die)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial temporary file was removed


def test_the_same_kill_corrupts_a_plain_torch_save(tmp_path, monkeypatch):
    """The failure the plugin prevents: writing in place leaves a truncated, unloadable `last.ckpt`."""
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 1, "w": torch.ones(1000)}, path)
    monkeypatch.setattr(torch, "save", half_write_then_die)
    with pytest.raises(KeyboardInterrupt), open(path, "wb") as f:
        torch.save({"epoch": 2, "w": torch.zeros(1000)}, f)
    monkeypatch.undo()
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("save_last", [True, "link"])
def test_trainer_checkpoints_with_atomic_io(tmp_path, save_last):
    """ModelCheckpoint's files, `last.ckpt` as a copy or as a symbolic link, go through the plugin and load."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=save_last, save_top_k=-1, every_n_epochs=1)
    trainer = Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, plugins=[AtomicCheckpointIO()],
        callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(BoringModel())
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_symlink() == (save_last == "link")
    assert torch.load(last, weights_only=False)["epoch"] == 1
    BoringModel.load_from_checkpoint(last)


def cli_trainer(tmp_path, *extra):
    args = [
        "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false", "--trainer.max_epochs=1", *extra,
    ]
    return LightningLTCLI(args=args, run=False).trainer


def test_cli_uses_atomic_checkpoint_io_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    assert type(cli_trainer(tmp_path).strategy.checkpoint_io) is AtomicCheckpointIO
    # other plugins given by the user are kept, and the atomic IO is added to them
    trainer = cli_trainer(tmp_path, "--trainer.plugins=lightning.pytorch.plugins.environments.LightningEnvironment")
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "LightningEnvironment"
    # a CheckpointIO given by the user replaces it
    trainer = cli_trainer(tmp_path, "--trainer.plugins=lightning.pytorch.plugins.io.TorchCheckpointIO")
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO


def test_checkpointing_preset_is_a_valid_partial_config(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    trainer = cli_trainer(tmp_path, "--config", str(REPO_ROOT / "configs" / "trainer" / "checkpointing.yaml"))
    (checkpoint,) = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint.save_last is True and checkpoint._every_n_epochs == 1


# ------------------------------------------------------------------------------------------- kill and resume


def fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m lightning_lt fit --config <config>` in a fresh process, single-threaded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "lightning_lt", "fit", "--config", str(config), *extra]
    return subprocess.run(command, cwd=config.parent, env=env, capture_output=True, text=True, timeout=600)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def trainer_config(run_dir: Path, max_epochs: int, checkpoint: dict, extra_callbacks=()) -> dict:
    return {
        "max_epochs": max_epochs,
        "accelerator": "cpu",
        "devices": 1,
        "deterministic": True,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(run_dir),
        "limit_train_batches": 3,
        "limit_val_batches": 1,
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True, **checkpoint}},
            *extra_callbacks,
        ],
    }


def kill_and_resume(tmp_path: Path, make_config, kill: dict, checkpoint: dict):
    """Runs uninterrupted, killed (KillAfter(**kill)) and resumed fits; returns the final state_dicts of the
    uninterrupted and the resumed run and the killed run's last checkpoint."""
    full = fit(write_config(tmp_path / "full.yaml", make_config(tmp_path / "full", checkpoint, [])))
    assert full.returncode == 0, full.stderr[-3000:]
    killer = {"class_path": "tests.fault_helpers.KillAfter", "init_args": kill}
    killed_config = write_config(tmp_path / "killed.yaml", make_config(tmp_path / "killed", checkpoint, [killer]))
    killed = fit(killed_config)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL, not a clean exit
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    at_kill = torch.load(last, map_location="cpu", weights_only=False)
    # resume the same run, now without the killer: the config is the same but for it
    resume_config = write_config(tmp_path / "resume.yaml", make_config(tmp_path / "killed", checkpoint, []))
    resumed = fit(resume_config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final_full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    final_resumed = torch.load(last, map_location="cpu", weights_only=False)
    return final_full, final_resumed, at_kill


def assert_equal_states(full: dict, resumed: dict) -> None:
    assert full["epoch"] == resumed["epoch"] and full["global_step"] == resumed["global_step"]
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    different = [k for k, v in full["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not different, f"tensors that differ after the resume: {different}"


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cifar")
    make_cifar10(root)
    return str(root)


CLS_EPOCHS, CLS_KILL_EPOCH = 4, 1  # SSE-SAM's stage 2 starts at epoch ceil(gamma * 4) = 2, after the kill


def classification_config(cifar_root: str):
    def make(run_dir: Path, checkpoint: dict, extra_callbacks: list) -> dict:
        ssesam = {"class_path": "lightning_lt.callbacks.SSESAM",
                  "init_args": {"rho_head": 0.05, "rho_tail": 0.1, "tail_threshold": 100, "gamma": 0.5}}
        return {
            "seed_everything": 0,
            "trainer": trainer_config(run_dir, CLS_EPOCHS, checkpoint, [ssesam, *extra_callbacks]),
            "model": {
                "class_path": "lightning_lt.tasks.LongTailClassifier",
                "init_args": {
                    "backbone": {"class_path": "lightning_lt.nets.MLP",
                                 "init_args": {"in_features": 3072, "hidden_features": [16]}},
                    "loss": {"class_path": "lightning_lt.losses.CrossEntropyLoss"},
                    "optimizer": {"class_path": "torch.optim.SGD",
                                  "init_args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005}},
                },
            },
            "data": {
                "class_path": "lightning_lt.datamodules.CIFAR10LT",
                "init_args": {"root": cifar_root, "imbalance_factor": 100, "batch_size": 32, "num_workers": 0},
            },
        }

    return make


def test_kill_and_resume_classification_sse_sam(tmp_path, cifar_root):
    full, resumed, at_kill = kill_and_resume(
        tmp_path, classification_config(cifar_root), {"epoch": CLS_KILL_EPOCH}, {"every_n_epochs": 1}
    )
    assert at_kill["epoch"] == CLS_KILL_EPOCH  # killed right after that epoch's checkpoint
    (sse_state,) = [v for k, v in at_kill["callbacks"].items() if k.startswith("SSESAM")]
    assert sse_state["stage"] == 1  # the switch to stage 2 (epoch 2) happens in the resumed run
    assert full["epoch"] == CLS_EPOCHS - 1
    assert_equal_states(full, resumed)
    # the comparison means something only if training after the kill moved the weights
    moved = [k for k, v in full["state_dict"].items() if v.is_floating_point() and not torch.equal(v, at_kill["state_dict"][k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("head.") for k in moved), moved
    (full_sse,) = [v for k, v in full["callbacks"].items() if k.startswith("SSESAM")]
    (resumed_sse,) = [v for k, v in resumed["callbacks"].items() if k.startswith("SSESAM")]
    assert full_sse["stage"] == resumed_sse["stage"] == 2


@pytest.fixture(scope="module")
def camvid_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("camvid")
    make_camvid(root, counts=(6, 2, 2))
    return str(root)


SEG_EPOCHS, SEG_KILL_EPOCH = 3, 0


def segmentation_config(camvid_root: str):
    def make(run_dir: Path, checkpoint: dict, extra_callbacks: list) -> dict:
        bank = {"class_path": "lightning_lt.callbacks.TailMemoryBank",
                "init_args": {"memory_size": 2, "p_sample": 1.0, "p_resize": 1.0}}
        return {
            "seed_everything": 0,
            "trainer": trainer_config(run_dir, SEG_EPOCHS, checkpoint, [bank, *extra_callbacks]),
            "model": {
                "class_path": "lightning_lt.tasks.SegmentationModule",
                "init_args": {
                    "net": {"class_path": "tests.fault_helpers.TinySegNet"},
                    "tail_classes": [2, 6, 7, 9, 10],
                    "log_per_class": False,
                    "plot_per_class": False,
                    "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}},
                },
            },
            "data": {
                "class_path": "lightning_lt.datamodules.CamVid",
                "init_args": {"root": camvid_root, "crop_size": [16, 16], "eval_size": [16, 16], "batch_size": 2,
                              "num_workers": 0},
            },
        }

    return make


def test_kill_and_resume_segmentation_memory_bank(tmp_path, camvid_root):
    full, resumed, at_kill = kill_and_resume(
        tmp_path, segmentation_config(camvid_root), {"epoch": SEG_KILL_EPOCH}, {"every_n_epochs": 1}
    )
    assert at_kill["epoch"] == SEG_KILL_EPOCH
    moved = [k for k, v in full["state_dict"].items() if v.is_floating_point() and not torch.equal(v, at_kill["state_dict"][k])]
    assert len(moved) > 0
    (bank_state,) = [v for k, v in at_kill["callbacks"].items() if k.startswith("TailMemoryBank")]
    assert bank_state["batches_seen"] > 0
    assert_equal_states(full, resumed)


def test_kill_mid_epoch_and_resume_completes(tmp_path, cifar_root):
    """A checkpoint every 2 optimizer steps (3 steps an epoch), killed after step 4 (the middle of epoch 1):
    the resumed run completes and ends with the same epoch and step count as the uninterrupted run."""
    make = classification_config(cifar_root)
    full, resumed, at_kill = kill_and_resume(tmp_path, make, {"step": 4}, {"every_n_train_steps": 2})
    assert (at_kill["epoch"], at_kill["global_step"]) == (1, 4)
    assert full["global_step"] == resumed["global_step"] == CLS_EPOCHS * 3
    assert full["epoch"] == resumed["epoch"] == CLS_EPOCHS - 1


def test_mid_epoch_resume_repeats_the_first_k_batches_and_skips_the_last_k(tmp_path):
    """What the README states for a checkpoint after k batches of an epoch (plain DataLoader, Lightning 2.6):
    the resumed run replays the epoch's identical order from its start for the remaining N - k batches, so the
    first k batches are trained twice and the last k are skipped; later epochs are unchanged."""
    from lightning.pytorch import LightningModule
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    class Interrupted(Exception):
        pass

    class Record(LightningModule):
        def __init__(self, stop_at=None):
            super().__init__()
            self.layer, self.seen, self.stop_at = torch.nn.Linear(1, 1), [], stop_at

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch[0].flatten().tolist()))
            if self.stop_at is not None and self.global_step == self.stop_at:
                raise Interrupted  # the process dies here; the checkpoint of step k stays
            return self.layer(batch[0].float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self):
            data = TensorDataset(torch.arange(16)[:, None])
            return DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=0))

    def run(root, stop_at=None, ckpt_path=None):
        module = Record(stop_at)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
        trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=root, callbacks=[checkpoint] if ckpt_path is None else [])
        try:
            trainer.fit(module, ckpt_path=ckpt_path)
        except Interrupted:
            pass
        return module.seen

    full = run(tmp_path / "full")
    run(tmp_path / "killed", stop_at=4)
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    epoch0 = [b for e, b in full if e == 0]
    k = 3
    assert [b for e, b in resumed if e == 0] == epoch0[: len(epoch0) - k]  # first k again, last k skipped
    assert [b for e, b in resumed if e == 1] == [b for e, b in full if e == 1]
