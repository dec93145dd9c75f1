"""Re-sampling under a real 2-process DDP fit: each rank gets its own disjoint share of one global plan."""

import json
import os
from collections import Counter

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_lt.datamodules import ResampledSampler
from tests.datamodules.utils import ToyLT
from tests.helpers import DDP_STRATEGY

COUNTS = (40, 15, 8)  # 63 samples: the 2-rank plan is padded to 64
SEED = 3
EPOCHS = 2


class RecordIndices(LightningModule):
    """Writes the dataset indices each rank receives, per epoch, to ``out_dir/rank{r}_epoch{e}.json``."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(1, 3)
        self.seen: list[int] = []

    def on_train_epoch_start(self) -> None:
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.extend(index.tolist())
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def on_train_epoch_end(self) -> None:
        path = os.path.join(self.out_dir, f"rank{self.global_rank}_epoch{self.current_epoch}.json")
        with open(path, "w") as f:
            json.dump({"indices": self.seen, "world_size": self.trainer.world_size}, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.ddp
def test_ddp_ranks_split_the_single_process_plan(tmp_path):
    dm = ToyLT(counts=COUNTS, batch_size=8, num_workers=0, sampler="class_balanced", seed=SEED)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDP_STRATEGY,
        max_epochs=EPOCHS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(RecordIndices(str(tmp_path)), datamodule=dm)

    targets = [c for c, n in enumerate(COUNTS) for _ in range(n)]
    plans = []
    for epoch in range(EPOCHS):
        runs = []
        for rank in range(2):
            with open(tmp_path / f"rank{rank}_epoch{epoch}.json") as f:
                record = json.load(f)
            assert record["world_size"] == 2
            runs.append(record["indices"])
        single = ResampledSampler(targets, mode="class_balanced", num_replicas=1, rank=0, seed=SEED)
        single.set_epoch(epoch)
        plan = list(single)
        assert len(plan) == 63
        assert [len(r) for r in runs] == [32, 32]
        # rank r received the plan positions r, r + 2, ...: disjoint positions, together the whole plan
        interleaved = [runs[p % 2][p // 2] for p in range(64)]
        assert interleaved[:63] == plan
        assert interleaved[63] == plan[0]  # padding repeats the start of the plan
        assert Counter(runs[0]) + Counter(runs[1]) == Counter(plan + plan[:1])
        plans.append(plan)
    assert plans[0] != plans[1]  # Lightning called set_epoch: a new plan each epoch
