"""The SAM-family configs and README examples: they parse through the CLI into the published settings, and run.

(``tests/test_configs.py`` runs every config, these included, with ``fast_dev_run`` on fake CIFAR data.)
"""

import re
import sys

import lightning as L
import pytest
import torch
import yaml

from lightning_lt.callbacks import SAM, SSESAM, DeferredReweighting, ImbSAM, OptimizerStages
from lightning_lt.callbacks.sam import tail_classes_of
from lightning_lt.cli import LightningLTCLI
from lightning_lt.optim import SAM as SAMOptimizer
from lightning_lt.optim import StepRho
from tests.helpers import REPO_ROOT
from tests.test_readme import python_blocks

CONFIGS = REPO_ROOT / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")

# (dataset, config) -> callback class and its arguments (methods.md: Saddle-LongTail rho table, ImbSAM, SSE-SAM)
EXPECTED = {
    ("cifar10_lt", "sam_ce"): (SAM, {"rho": 0.1}),
    ("cifar10_lt", "sam_ldam_drw"): (SAM, {"rho": 0.8}),
    ("cifar100_lt", "sam_ce"): (SAM, {"rho": 0.2}),
    ("cifar100_lt", "sam_ldam_drw"): (SAM, {"rho": 0.8}),
    # CIFAR-10-LT IF=100 has no class under 20 images: eta 100 there
    # tail_weight: the official code's factor on the tail loss (ImbSAM 2, SSE-SAM 1)
    ("cifar10_lt", "imbsam_ce"): (ImbSAM, {"rho": 0.05, "tail_threshold": 100, "tail_weight": 2.0}),
    ("cifar10_lt", "imbsam_ldam_drw"): (ImbSAM, {"rho": 0.05, "tail_threshold": 100, "tail_weight": 2.0}),
    ("cifar100_lt", "imbsam_ce"): (ImbSAM, {"rho": 0.05, "tail_threshold": 20, "tail_weight": 2.0}),
    ("cifar100_lt", "imbsam_ldam_drw"): (ImbSAM, {"rho": 0.05, "tail_threshold": 20, "tail_weight": 2.0}),
    **{
        (dataset, f"ssesam_{base}"): (
            SSESAM, {"rho_head": 0.05, "rho_tail": 0.10, "tail_threshold": 100, "gamma": 0.7, "tail_weight": 1.0}
        )
        for dataset in ("cifar10_lt", "cifar100_lt")
        for base in ("ce", "ldam_drw")
    },
}

# the tail classes each callback will find from the data module's class counts (n_c < tail_threshold)
EXPECTED_TAIL = {
    ("cifar10_lt", 100): [8, 9],  # 83 and 50 images
    ("cifar100_lt", 20): list(range(70, 100)),  # the 30 few-shot classes
    ("cifar100_lt", 100): list(range(35, 100)),  # medium- and few-shot classes
}


def config_path(key) -> str:
    dataset, name = key
    return str(CONFIGS / dataset / f"{name}.yaml")


def base_name(name: str) -> str:
    return name.split("_", 1)[1]  # sam_ldam_drw -> ldam_drw


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when both `args` and pytest's own `sys.argv` are present."""
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])


def parse(*args: str, tmp_path) -> LightningLTCLI:
    return LightningLTCLI(args=[*args, f"--trainer.default_root_dir={tmp_path}"], run=False)


def callbacks_of(trainer, cls) -> list:
    return [c for c in trainer.callbacks if type(c) is cls]


def test_the_twelve_configs_exist():
    found = {(p.parent.name, p.stem) for p in CONFIGS.rglob("*sam_*.yaml") if p.parent.name != "sweeps"}
    assert found == set(EXPECTED)


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}/{k[1]}")
def test_config_parses_into_the_callback(key, tmp_path):
    cls, expected = EXPECTED[key]
    # CIFAR data modules read no file at construction, so the config's `root: data` is fine here
    cli = parse("--config", config_path(key), tmp_path=tmp_path)
    (callback,) = callbacks_of(cli.trainer, cls)
    for name, value in expected.items():
        assert getattr(callback, name) == value, name
    assert callback.adaptive is False and callback.sam_every == 1
    if cls is SAM:
        assert callback.rho_schedule is None
        assert [callback.rho_at(e) for e in (0, 160, 199)] == [expected["rho"]] * 3
    else:
        tail = tail_classes_of(cli.datamodule.class_counts, callback.tail_threshold, cls.__name__)
        assert tail == EXPECTED_TAIL[(key[0], callback.tail_threshold)]
    if cls is SSESAM:
        assert callback.switch_epoch(cli.trainer) == 140  # ceil(0.7 * 200)
    # LDAM-DRW configs keep DRW from epoch 160; CE configs have none
    drw = callbacks_of(cli.trainer, DeferredReweighting)
    assert len(drw) == (1 if key[1].endswith("ldam_drw") else 0)
    assert cli.trainer.max_epochs == 200
    assert cli.model.class_counts == cli.datamodule.class_counts  # linked by the CLI


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}/{k[1]}")
def test_config_is_its_base_config_plus_one_callback(key):
    """Same model, data and LDAM-DRW schedule as ce.yaml / ldam_drw.yaml; one SAM-family callback added."""
    cls, expected = EXPECTED[key]
    config = yaml.safe_load(open(config_path(key)))
    base = yaml.safe_load(open(CONFIGS / key[0] / f"{base_name(key[1])}.yaml"))
    added = config["trainer"]["callbacks"].pop()
    assert added == {"class_path": f"lightning_lt.callbacks.{cls.__name__}", "init_args": expected}
    assert config == base


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}/{k[1]}")
def test_config_header(key):
    lines = open(config_path(key)).read().splitlines()
    dataset, name = key
    assert lines[0].startswith(f"# CIFAR-{'10' if dataset == 'cifar10_lt' else '100'}-LT (imbalance factor 100): ")
    assert lines[1].startswith(f"# Run: lightning-lt fit --config configs/{dataset}/{name}.yaml ")
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert "Published" in header
    if not name.startswith("sam_"):
        assert "ResNet-34, batch 64, SGD lr 0.01" in header and "wd 1e-3, cosine" in header
    if key == ("cifar10_lt", "imbsam_ce") or key == ("cifar10_lt", "imbsam_ldam_drw"):
        assert "tail_threshold 100" in header and "no class under 20" in header
    if name.startswith("imbsam_"):
        assert "tail_weight 2.0 reproduces the official ImbSAM step" in header
    if name.startswith("ssesam_"):
        assert "tail_weight 1.0 reproduces the official SSE-SAM step" in header


# ------------------------------------------------------------------------------------ OptimizerStages

STAGES_YAML = """\
trainer:
  callbacks:
    - class_path: lightning_lt.callbacks.OptimizerStages
      init_args:
        stages: {0: null, 100: {class_path: lightning_lt.optim.SAM, init_args: {rho: 0.05}}}
"""


def toy_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return model, closure


def test_optimizer_stages_yaml_parses_into_wrapper_factories(tmp_path):
    snippet = tmp_path / "stages.yaml"
    snippet.write_text(STAGES_YAML)
    cli = parse("--config", QUICKSTART, "--config", str(snippet), tmp_path=tmp_path)
    (callback,) = callbacks_of(cli.trainer, OptimizerStages)
    assert list(callback.stages) == [0, 100]
    assert callback.stages[0] is None
    factory = callback.stages[100]
    assert callable(factory)

    # the factory builds a working SAM around any base optimizer, equal to building it by hand
    model, closure = toy_problem()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapper = factory(base)
    assert isinstance(wrapper, SAMOptimizer) and wrapper.base_optimizer is base and wrapper.rho == 0.05
    assert factory(torch.optim.SGD(model.parameters(), lr=0.1)) is not wrapper  # a new wrapper each call
    wrapper.step(closure)
    wrapper.step(closure)

    reference_model, reference_closure = toy_problem()
    reference = SAMOptimizer(torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    reference.step(reference_closure)
    reference.step(reference_closure)
    for got, want in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_optimizer_stages_yaml_switches_to_sam_during_fit(tmp_path):
    snippet = tmp_path / "stages.yaml"
    snippet.write_text(STAGES_YAML.replace("100:", "1:"))  # SGD in epoch 0, SAM from epoch 1
    cli = LightningLTCLI(args=[
        "fit", "--config", QUICKSTART, "--config", str(snippet), f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.max_epochs=2",
    ])
    (callback,) = callbacks_of(cli.trainer, OptimizerStages)
    assert callback.stage == 1
    assert not isinstance(cli.trainer.optimizers[0], SAMOptimizer)  # the base optimizer is given back at fit end
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


# ------------------------------------------------------------------------------------------- README


def readme_yaml_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "lightning_lt.callbacks" in b]


def test_readme_yaml_snippets_parse(tmp_path):
    blocks = readme_yaml_blocks()
    assert len(blocks) == 2
    found = []
    for i, block in enumerate(blocks):
        snippet = tmp_path / f"snippet{i}.yaml"
        snippet.write_text(block)
        cli = parse("--config", QUICKSTART, "--config", str(snippet), tmp_path=tmp_path)
        found += [c for c in cli.trainer.callbacks if isinstance(c, (OptimizerStages, SAM))]
    stages, sam = found
    assert isinstance(stages, OptimizerStages) and list(stages.stages) == [100]
    assert stages.stage_at(99, None) == -1  # before the first key: the module's own optimizer
    assert isinstance(stages.stages[100](torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)), SAMOptimizer)
    assert isinstance(sam, SAM) and isinstance(sam.rho_schedule, StepRho)
    assert [sam.rho_at(e) for e in (0, 159, 160, 199)] == [0.05, 0.05, 0.1, 0.1]


def test_readme_sam_examples_run(tmp_path, monkeypatch, capsys):
    blocks = [b for b in python_blocks() if "Trainer(" in b and "SAM(" in b]
    assert len(blocks) == 2  # SAM, then ImbSAM continuing it
    real_trainer = L.Trainer
    trainers = []

    def quiet_trainer(**kwargs):
        kwargs.update(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path))
        trainers.append(real_trainer(**kwargs))
        return trainers[-1]

    monkeypatch.setattr(L, "Trainer", quiet_trainer)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    sam_trainer, imbsam_trainer = trainers
    assert [type(c).__name__ for c in sam_trainer.callbacks if isinstance(c, (SAM, ImbSAM))] == ["SAM"]
    assert [type(c).__name__ for c in imbsam_trainer.callbacks if isinstance(c, (SAM, ImbSAM))] == ["ImbSAM"]
    assert all(trainer.current_epoch == 2 and "val/acc" in trainer.callback_metrics for trainer in trainers)
    assert "train/loss" in sam_trainer.callback_metrics  # the ImbSAM example's training_step does not log
    assert type(imbsam_trainer.lightning_module).__name__ == "DigitsImbModule"
    assert capsys.readouterr().out.count("tensor(") == 2


def test_readme_plain_pytorch_loop_runs(capsys):
    (block,) = [b for b in python_blocks() if "from lightning_lt.optim import" in b]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert type(namespace["optimizer"]).__name__ == "ImbSAM"
    assert "last batch loss" in capsys.readouterr().out
