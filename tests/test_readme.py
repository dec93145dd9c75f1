"""The README's examples run as written (with a shorter, quieter Trainer)."""

import re

import lightning as L
import pytest

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
