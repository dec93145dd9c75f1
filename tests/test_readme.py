"""The README's examples run as written (with a shorter, quieter Trainer)."""

import math
import re
import shlex
import sys

import lightning as L
import pytest
import torch

from lightning_lt.cli import LightningLTCLI
from lightning_lt.datamodules.transforms import ImageNetTrainTransform
from tests.datamodules.utils import write_digit_folder, write_image_folder
from tests.helpers import REPO_ROOT


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_the_two_setup_commands():
    text = (REPO_ROOT / "README.md").read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert "pip install . && lightning-lt fit --config configs/quickstart.yaml" in bash[0]
    assert 'pip install ".[test]" && python -m pytest' in bash[1]


def test_own_project_example_runs(tmp_path, monkeypatch, capsys):
    (code,) = [block for block in python_blocks() if "class MyModule" in block]
    real_trainer = L.Trainer

    def quiet_trainer(**kwargs):
        kwargs.update(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path))
        kwargs["callbacks"][0].start_epoch = 1  # the DRW switch still happens
        return real_trainer(**kwargs)

    monkeypatch.setattr(L, "Trainer", quiet_trainer)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    metrics = namespace["trainer"].callback_metrics
    assert {"val/acc", "val/balanced_acc", "val/acc_many", "val/acc_medium", "val/acc_few"} <= set(metrics)
    assert namespace["trainer"].lightning_module.loss.weight is not None  # DRW switched the loss weights
    assert "tensor(" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["README.md"])
def test_readme_mentions_every_config(name):
    text = (REPO_ROOT / name).read_text()
    for config in sorted((REPO_ROOT / "configs").rglob("*.yaml")):  # presets and sweeps included
        rel = str(config.relative_to(REPO_ROOT / "configs"))
        short = rel.replace("cifar10_lt/", "cifar{10,100}_lt/").replace("cifar100_lt/", "cifar{10,100}_lt/")
        assert rel in text or short in text, f"README does not list configs/{rel}"


def test_segmentation_example_runs(capsys):
    (code,) = [block for block in python_blocks() if "TailMemoryBank(tail_classes=[3, 4]" in block]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "class-4 pixels pasted into image 1: 36" in out


# ---------------------------------------------------------------------------------------------- own data
def own_data_section() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("## Train on your own long-tailed data")
    return text[start : text.index("\n## ", start + 1)]


def section_commands(section: str) -> list[list[str]]:
    """The ``lightning-lt`` commands of the section's bash blocks, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [shlex.split(block.replace("\\\n", " ")) for block in blocks]


#: Training images per class of the generated MNIST-style folder (10 classes of 12 to 20 grayscale PNGs).
DIGIT_COUNTS = [20, 19, 18, 17, 16, 15, 14, 13, 12, 12]
#: What the README's command then quickly runs: 3 steps on CPU, shot groups scaled to the small folder.
QUICK = [
    "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.init_args.batch_size=16", "--data.init_args.num_workers=0",
    "--model.init_args.many_threshold=16", "--model.init_args.few_threshold=13",
]


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers", "ignore:.*smaller than the logging interval",
    "ignore:The dirpath has changed",  # `test` logs to version_1 and loads version_0's checkpoint: expected
)
def test_own_data_section_trains_an_mnist_style_folder(tmp_path, monkeypatch):
    """A new user's MNIST-style folder (grayscale 28x28 PNGs, unequal classes) trains with the README's command and
    no code, validates on held-out training images, logs overall and many / medium / few accuracy, and the
    README's `lightning-lt test` command evaluates the chosen checkpoint on the test folder."""
    fit, test = section_commands(own_data_section())
    assert fit[:4] == ["lightning-lt", "fit", "--config", "configs/folder/own_data.yaml"]
    assert test[:4] == ["lightning-lt", "test", "--config", "configs/folder/own_data.yaml"]
    root = dict(arg.split("=", 1) for arg in fit[4:])["--data.init_args.root"]
    write_digit_folder(str(tmp_path / root), DIGIT_COUNTS, test_per_class=2)
    monkeypatch.chdir(tmp_path)  # the README's relative paths (root, checkpoint) are relative to the working folder
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])

    def run(command: list[str]) -> LightningLTCLI:
        args = [arg.replace("configs/", f"{REPO_ROOT}/configs/", 1) for arg in command[2:]]
        return LightningLTCLI(args=[command[1], *args, *QUICK])

    cli = run(fit)
    dm = cli.datamodule
    held = [math.floor(0.1 * n + 0.5) for n in DIGIT_COUNTS]
    assert dm.class_counts == cli.model.class_counts == [n - h for n, h in zip(DIGIT_COUNTS, held)]
    assert len(dm.val_dataset) == sum(held) and dm.validates_on_test_split is False
    assert dm.train_dataset[0][0].shape == (3, 32, 32)  # grayscale PNGs as 3 channels for ResNet-32
    metrics = cli.trainer.callback_metrics
    for name in ("acc", "balanced_acc", "acc_many", "acc_medium", "acc_few"):
        assert math.isfinite(float(metrics[f"val/{name}"])), name
    assert (tmp_path / "lightning_logs/own_data/version_0/metrics.csv").is_file()
    cli = run(test)
    metrics = cli.trainer.callback_metrics
    for name in ("acc", "balanced_acc", "acc_many", "acc_medium", "acc_few"):
        assert math.isfinite(float(metrics[f"test/{name}"])), name
    assert len(cli.datamodule.test_dataset) == 20


def test_own_data_section_transform_example(tmp_path, monkeypatch):
    """The README's YAML for larger photos parses (a recipe class and a torchvision v2 Compose by class_path) and
    gives batches of one size from photos of several sizes."""
    (snippet,) = re.findall(r"```yaml\n(.*?)```", own_data_section(), flags=re.S)
    (tmp_path / "photos.yaml").write_text(snippet)
    write_image_folder(str(tmp_path / "photos" / "train"), {"cat": 4, "dog": 3}, size=(150, 120))
    write_image_folder(str(tmp_path / "photos" / "train"), {"owl": 3}, size=(130, 170), seed=1)
    write_image_folder(str(tmp_path / "photos" / "test"), {"cat": 1, "dog": 1, "owl": 1}, size=(140, 140), seed=2)
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    cli = LightningLTCLI(args=[
        "--config", str(REPO_ROOT / "configs/folder/own_data.yaml"), "--config", str(tmp_path / "photos.yaml"),
        f"--data.init_args.root={tmp_path / 'photos'}", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
    ], run=False)  # fmt: skip
    dm = cli.datamodule
    assert isinstance(dm.train_transform, ImageNetTrainTransform)
    assert type(dm.eval_transform).__module__.startswith("torchvision.transforms.v2")
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 112, 112) and x.dtype == torch.float32
    assert next(iter(dm.val_dataloader()))[0].shape[1:] == (3, 112, 112)
