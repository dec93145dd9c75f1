"""SAM-family callbacks under 2-process CPU DDP: the weights equal a reference of the documented semantics.

Each rank r trains on its own batch ``X_r``: half of the data set's rows, as Lightning's DistributedSampler
hands them out (it shuffles training data even with ``shuffle=False``, seeded, a new order every epoch;
the test records the rows each rank really got and builds the reference from them). For every group
with ``rho > 0`` the perturbation uses that rank's *local* gradient (the first pass runs under
``no_sync``); the gradients that make the update (the pass at ``w + e``, and the ``rho = 0`` head pass of
ImbSAM / SSE-SAM stage 2) are averaged over the ranks (DDP all-reduce mean); then SGD (momentum, weight
decay) steps. Group losses are ``sum_{i in group} l_i / B_r`` over the rank's own batch, the tail one times
the method's tail weight (ImbSAM 2, SSE-SAM 1), in every pass.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.callbacks import SAM, SSESAM, ImbSAM, OptimizerStages
from lightning_lt.optim import SAM as SAMOptimizer
from tests.optim.sam_reference import ReferenceSGD, gradient, perturbed, problem
from tests.helpers import DDP_STRATEGY

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.filterwarnings(
        "ignore:.*does not have many workers:UserWarning",
        "ignore:.*smaller than the logging interval:UserWarning",
        "ignore:.*GPU available but not used:UserWarning",
    ),
]

CLASS_COUNTS = [50, 50, 5, 5]  # classes 2 and 3 are the tail with tail_threshold=10 (sam_reference.TAIL)
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-3
WORLD, B = 2, 12  # per-rank batch size: one step per epoch on 2 * B rows
# ddp_fork, not ddp_spawn: the same DDPStrategy (gloo, one process per rank), but forked workers end with
# os._exit. With ddp_spawn a worker here sometimes aborts while its interpreter shuts down after a finished
# fit ("terminate called without an active exception", SIGABRT; ~1 fit in 12, plain SGD without any SAM
# callback too, and still with destroy_process_group() in teardown), and a spawn fit costs 8-20 s of
# imports on 2 cores against ~0.2-1 s forked.
STRATEGY = DDP_STRATEGY


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """``2B`` rows of classes 0-3 (7 tail samples of classes 2 and 3)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * B, problem()[0].shape[1], generator=g) * 1.5
    even = torch.tensor([0, 1, 0, 1, 2, 0, 1, 0, 1, 0, 1, 0])
    odd = torch.tensor([2, 3, 0, 3, 1, 2, 0, 1, 3, 0, 2, 1])
    y = torch.stack([even, odd], dim=1).flatten()  # row 2k: even[k], row 2k + 1: odd[k]
    return x, y


class DDPModule(L.LightningModule):
    """Linear classifier (the weights of sam_reference.problem); records its rows and final weights per rank."""

    def __init__(self, out_dir: str, protocol: bool):
        super().__init__()
        params = problem()[2]
        self.weight = nn.Parameter(params[0].clone())
        self.bias = nn.Parameter(params[1].clone())
        self.class_counts = CLASS_COUNTS
        self.protocol = protocol
        self.out_dir = out_dir
        self.rows: list[list[int]] = []

    def forward(self, x):
        return x @ self.weight + self.bias

    def on_train_batch_start(self, batch, batch_idx):
        self.rows.append(batch[2].tolist())

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        per_sample = F.cross_entropy(self(x), y, reduction="none")
        if self.protocol:
            return {"loss": per_sample.mean(), "per_sample_loss": per_sample, "target": y}
        return per_sample.mean()

    def on_fit_end(self):
        record = {
            "rows": self.rows,
            "weight": self.weight.detach().clone(),
            "bias": self.bias.detach().clone(),
            "optimizer": type(self.trainer.optimizers[0]).__name__,
        }
        torch.save(record, Path(self.out_dir, f"rank{self.global_rank}.pt"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def train_dataloader(self):
        x, y = dataset()
        return DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=B, shuffle=False)


# ------------------------------------------------------------------------------------- reference


def local_gradient(step: dict, params, x, y, perturb_with=None) -> list[torch.Tensor]:
    """One rank's update direction ``sum_g grad L_g(w + e_g)`` for the step's method.

    ``perturb_with(group)`` overrides the gradient that makes the perturbation (for the negative control).
    """

    tail_weight = step.get("tail_weight", 1.0)

    def at_perturbed(group, rho):
        if rho == 0:
            return gradient(params, x, y, group, tail_weight)
        g = gradient(params, x, y, group, tail_weight) if perturb_with is None else perturb_with(group)
        return gradient(perturbed(params, g, rho, step.get("adaptive", False)), x, y, group, tail_weight)

    method = step["method"]
    if method == "sgd":
        return gradient(params, x, y, None)
    if method == "sam":
        return at_perturbed(None, step["rho"])
    head = at_perturbed("head", step["rho_head"])
    tail = at_perturbed("tail", step["rho_tail"])
    return [h + t for h, t in zip(head, tail)]


def ddp_reference(steps: list[dict], rows: list[list[list[int]]], global_perturbation: bool = False):
    """Weights after ``steps`` (one dict per step); ``rows[r][k]``: the rows of rank r at step k.

    ``global_perturbation=True`` perturbs with the rank-averaged gradient instead (a wrong reference
    that shows the test can tell the two apart).
    """
    x_all, y_all = dataset()
    params = problem()[2]
    sgd = ReferenceSGD(LR, MOMENTUM, WEIGHT_DECAY)
    for k, step in enumerate(steps):
        batches = [(x_all[rows[r][k]], y_all[rows[r][k]]) for r in range(WORLD)]
        perturb_with = None
        if global_perturbation:

            def perturb_with(group, params=params, batches=batches, tail_weight=step.get("tail_weight", 1.0)):
                grads = [gradient(params, x, y, group, tail_weight) for x, y in batches]
                return [sum(parts) / WORLD for parts in zip(*grads)]

        per_rank = [local_gradient(step, params, x, y, perturb_with) for x, y in batches]
        params = sgd.step(params, [sum(parts) / WORLD for parts in zip(*per_rank)])
    return params


SAM_STEP = {"method": "sam", "rho": 0.1}
CASES = {
    "sam": (lambda: SAM(rho=0.1), False, [SAM_STEP, SAM_STEP]),
    "asam": (
        lambda: SAM(rho=1.0, adaptive=True),
        False,
        [{"method": "sam", "rho": 1.0, "adaptive": True}] * 2,
    ),
    "imbsam": (
        lambda: ImbSAM(rho=0.1, tail_threshold=10),
        True,
        [{"method": "headtail", "rho_head": 0.0, "rho_tail": 0.1, "tail_weight": 2.0}] * 2,
    ),
    # gamma 0.5 of 2 epochs: epoch 0 is stage 1 (4 passes), epoch 1 stage 2 (ImbSAM)
    "ssesam_stage1_then_2": (
        lambda: SSESAM(rho_head=0.1, rho_tail=0.2, tail_threshold=10, gamma=0.5),
        True,
        [
            {"method": "headtail", "rho_head": 0.1, "rho_tail": 0.2},
            {"method": "headtail", "rho_head": 0.0, "rho_tail": 0.2},
        ],
    ),
    "optimizer_stages_sgd_then_sam": (
        lambda: OptimizerStages({0: None, 1: functools.partial(SAMOptimizer, rho=0.1)}),
        False,
        [{"method": "sgd"}, SAM_STEP],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_update_equals_reference(tmp_path, case):
    make_callback, protocol, steps = CASES[case]
    module = DDPModule(str(tmp_path), protocol)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=STRATEGY, max_epochs=len(steps), callbacks=[make_callback()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module)

    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    rows = [record["rows"] for record in records]
    # Lightning's DistributedSampler (it shuffles training data, seeded) splits the rows between the ranks
    for k in range(len(steps)):
        assert sorted(rows[0][k] + rows[1][k]) == list(range(WORLD * B)), k
    assert all(record["optimizer"] == "SGD" for record in records)  # the base optimizer after fit

    # both ranks hold the same weights (the update gradients were all-reduced) ...
    for name in ("weight", "bias"):
        assert torch.equal(records[0][name], records[1][name]), name
    # ... equal to the reference built from the documented DDP semantics
    expected = ddp_reference(steps, rows)
    torch.testing.assert_close(records[0]["weight"], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(records[0]["bias"], expected[1], atol=1e-6, rtol=0)
    # the launcher hands rank 0's weights back to the main process
    torch.testing.assert_close(module.weight.detach(), expected[0], atol=1e-6, rtol=0)

    # the data makes the local-perturbation semantics observable: a rank-averaged perturbation differs
    wrong = ddp_reference(steps, rows, global_perturbation=True)
    assert (wrong[0] - expected[0]).abs().max() > 1e-4
