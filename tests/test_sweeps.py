"""W&B sweeps in configs/sweeps/ run as the W&B agent runs them, and the W&B logger preset works offline.

Sweeps need a W&B server, which tests do not have, so the agent is emulated: parameter values are drawn from the
sweep's distributions, the command line is rendered with the installed wandb's own functions (``${args}`` ->
``--<name>=<str(value)>``) and run in-process with ``WANDB_MODE=offline``, in a temporary working directory.
"""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_lt.cli import LightningLTCLI
from tests.datamodules.test_cifar import make_cifar10
from tests.helpers import REPO_ROOT
from tests.test_configs import data_overrides

wandb = pytest.importorskip("wandb")
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args  # noqa: E402

SWEEPS = sorted((REPO_ROOT / "configs" / "sweeps").glob("*.yaml"))
WANDB_PRESET = REPO_ROOT / "configs" / "loggers" / "wandb.yaml"


@pytest.fixture(scope="module")
def fake_cifar_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cifar")
    make_cifar10(root)
    return str(root)


@pytest.fixture
def offline_cwd(tmp_path, monkeypatch) -> Path:
    """A fresh working directory, W&B offline with its own settings folder, a plain ``sys.argv``."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))  # only if a config forgets save_dir
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no stdout / stderr capture on top of pytest's
    yield cwd
    wandb.finish()  # a run left open by a failed test must not leak into the next
    wandb.teardown()


def draw(spec: dict[str, Any], rng: random.Random) -> Any:
    """One value of a W&B sweep parameter (the distributions these sweep files use)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    distribution = spec.get("distribution", "uniform")
    low, high = spec["min"], spec["max"]
    if distribution == "uniform":
        return rng.uniform(low, high)
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution == "int_uniform":
        return rng.randint(low, high)
    raise ValueError(f"distribution {distribution!r} is not emulated by this test; add it to `draw`")


def agent_command(sweep: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The command line the W&B agent runs, built as ``wandb.wandb_agent.Agent._command_run`` builds it."""
    sweep_vars = create_sweep_command_args({"args": {name: {"value": v} for name, v in values.items()}})
    command = []
    for chunk in create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            assert chunk[2:-1] in sweep_vars, f"macro {chunk} is not one the agent fills in without a server"
            command += sweep_vars[chunk[2:-1]]
        else:
            command.append(chunk)
    return command


def cli_args(command: list[str]) -> list[str]:
    """The arguments of ``lightning-lt`` in ``command``, with ``--config`` files resolved from the repository."""
    assert command[0] == "lightning-lt"
    args = command[1:]
    for i, arg in enumerate(args[:-1]):
        if arg == "--config":
            args[i + 1] = str(REPO_ROOT / args[i + 1])
    return args


def config_value(config: Any, dotted: str) -> Any:
    """``config[a][b][c]`` for ``a.b.c``; a list (``trainer.callbacks``) stands for its last item, as on the
    command line."""
    node = config
    for part in dotted.split("."):
        node = node[-1] if isinstance(node, list) else node
        node = node[part]
    return node


def run_sweep(sweep_file: Path, values: dict[str, Any], cifar_root: str, *extra: str) -> LightningLTCLI:
    sweep = yaml.safe_load(sweep_file.read_text())
    args = cli_args(agent_command(sweep, values))
    base_config = Path(args[args.index("--config") + 1])
    return LightningLTCLI(args=[
        *args,
        *data_overrides(base_config, cifar_root, {}),
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        *extra,
    ])


def test_there_are_sweeps_for_the_main_methods():
    names = {p.stem for p in SWEEPS}
    assert {"cifar10_lt_ldam_drw_lr", "cifar10_lt_sam_rho", "cifar10_lt_la_tau", "camvid_auc_weight",
            "coco_ood_edge_beta"} <= names


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_is_well_formed(sweep_file):
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("maximize", "minimize")
    assert sweep["metric"]["name"].startswith("val/")
    assert sweep["project"] == yaml.safe_load(WANDB_PRESET.read_text())["trainer"]["logger"]["init_args"]["project"]
    command = sweep["command"]
    assert command[:2] == ["lightning-lt", "fit"] and command[-1] == "${args}"
    configs = [command[i + 1] for i, c in enumerate(command) if c == "--config"]
    assert configs[-1] == "configs/loggers/wandb.yaml", "runs must log to W&B for the sweep to see its metric"
    for config in configs:
        assert (REPO_ROOT / config).is_file(), config
    for name, spec in sweep["parameters"].items():
        assert name.split(".")[0] in ("model", "data", "trainer"), name
        if sweep["method"] == "grid":
            assert "values" in spec or "value" in spec, f"grid search needs `values` for {name}"


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.stem)
def test_sweep_runs_as_the_agent_runs_it(sweep_file, fake_cifar_root, offline_cwd):
    torch.set_num_threads(1)
    sweep = yaml.safe_load(sweep_file.read_text())
    rng = random.Random(sweep_file.name)
    values = {name: draw(spec, rng) for name, spec in sweep["parameters"].items()}
    rendered = [f"--{name}={value}" for name, value in values.items()]
    assert all(flag in agent_command(sweep, values) for flag in rendered)  # str() formatting, as documented

    cli = run_sweep(sweep_file, values, fake_cifar_root, "--trainer.fast_dev_run=true")

    for name, value in values.items():
        assert config_value(cli.config["fit"], name) == pytest.approx(value), name
    assert cli.trainer.state.finished


def test_two_sweep_runs_in_one_directory_each_keep_their_config(fake_cifar_root, offline_cwd, monkeypatch):
    """Two agent runs of one sweep, started in the same folder, logging to W&B offline for real (one short epoch,
    not fast_dev_run, which turns loggers off): both finish, each has its own config.yaml with its own value
    next to its checkpoints, W&B wrote one offline run each (with the per-class figure), and the working
    directory holds nothing but ``lightning_logs/``."""
    torch.set_num_threads(1)
    sweep_file = REPO_ROOT / "configs" / "sweeps" / "cifar10_lt_la_tau.yaml"
    name = "model.init_args.loss.init_args.tau"
    runs = {"sweeprun1": 0.5, "sweeprun2": 2.0}
    for run_id, tau in runs.items():
        monkeypatch.setenv("WANDB_RUN_ID", run_id)  # the agent gives every run its id this way
        cli = run_sweep(
            sweep_file, {name: tau}, fake_cifar_root,
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--data.init_args.batch_size=16",
        )
        assert cli.trainer.state.finished
        assert cli.trainer.logger.version == run_id
        wandb.finish()
        wandb.teardown()  # the agent's runs are separate processes (W&B caches settings such as the run id)

    assert sorted(os.listdir(offline_cwd)) == ["lightning_logs"]
    logs = offline_cwd / "lightning_logs"
    for run_id, tau in runs.items():
        run_dir = logs / "lightning-lt" / run_id
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config_value(saved, name) == tau
        assert saved["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
        assert list((run_dir / "checkpoints").glob("*.ckpt"))
        (offline_run,) = (logs / "wandb").glob(f"offline-run-*-{run_id}")
        assert list(offline_run.glob("run-*.wandb"))
        assert list(offline_run.glob("files/media/images/val/per_class_accuracy_*.png")), "figure not logged"
    assert not (logs / "config.yaml").exists()  # nothing shared between the runs
