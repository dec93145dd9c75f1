"""Row ``memory-bank-ddp`` of ``benchmarks/scale.py``: what the AUCSeg memory bank sends between DDP ranks.

Two CPU processes (gloo), an ADE20K-like stream: 512 x 512 crops, 150 classes, tail classes 26-149 (124),
AUCSeg's ADE20K bank (5 entries per class, ``p_sample=0.05``, ``p_resize=0.4``). The labels are synthetic (no
ADE20K here): each crop is a few large regions of head classes 0-25, ``Poisson(3)`` tail objects (ellipses of
1/2000 to 1/20 of the crop, log-uniform), their classes drawn with Zipf frequencies (``p_k ~ 1 / (k + 1)`` over
the tail classes in order), 2 % ignored pixels. These occupancy numbers are assumptions, not ADE20K's measured
statistics.

Part 1 (bytes): bank-only steps, ``batch`` crops per process (ADE20K's 16 per GPU by default). Each step feeds
the same crops to two banks with the same seed: the library's :class:`~lightning_lt.callbacks.TailMemoryBank`
(boxes gathered first, then only the kept entries broadcast as bytes) and ``PickledExchangeBank`` below, the
exchange before issue 13 (every new entry of every rank pickled by ``all_gather_object``). The bytes a rank
receives are counted inside each bank call by wrapping ``torch.distributed``'s ``all_gather`` / ``broadcast``
(what arrives from the other rank: ``all_gather`` slots of other ranks, broadcasts from other ranks; the
``all_gather_object`` of the old exchange goes through ``all_gather``). ``bytes_kept_per_step`` is the size of
the entries the step leaves in the bank (pixels float32 + masks, all ranks' survivors). Measured after
``warmup`` steps, when the bank holds most of its 620 entries. At the end both banks must be identical.

Part 2 (step time): a training step of LR-ASPP MobileNetV3-Large (from scratch, 150 classes, cross-entropy,
SGD, torch DDP over gloo) on ``model_batch`` crops per process, without bank, with the library's bank and
with the pickled exchange, alternating in rotating order; the median step time of each, averaged over the
ranks. ``step_time_ratio`` = with the bank / without. The smallest torchvision segmentation network makes the
ratio conservative: AUCSeg's networks are far heavier per image, the bank's work is not.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import tempfile
import time
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp
import torch.nn.functional as F

import lightning_lt.callbacks.memory_bank as memory_bank
from lightning_lt.callbacks import TailMemoryBank
from lightning_lt.callbacks.memory_bank import Entry

ROW = "memory-bank-ddp"
NUM_CLASSES, HEAD, IGNORE = 150, 26, 255
TAIL = list(range(HEAD, NUM_CLASSES))


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"crop": 64, "batch": 4, "warmup": 3, "measured": 4, "model_batch": 2, "rounds": 2, "pool": 8}
    return {"crop": 512, "batch": 16, "warmup": 40, "measured": 30, "model_batch": 4, "rounds": 5, "pool": 48}


def crops(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` float32 images ``[3, size, size]`` and masks, as described in the module docstring."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    grid = torch.randint(0, HEAD, (n, 1, 4, 4), generator=g).float()  # head-class regions
    masks = F.interpolate(grid, size=(size, size), mode="nearest")[:, 0].long()
    zipf = 1.0 / torch.arange(1, len(TAIL) + 1, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        count = int(torch.poisson(torch.tensor(3.0), generator=g))
        for c in torch.multinomial(zipf, count, replacement=True, generator=g).tolist() if count else []:
            share = math.exp(math.log(1 / 2000) + float(torch.rand(1, generator=g)) * math.log(100))
            aspect = math.exp(float(torch.randn(1, generator=g)) * 0.5)
            a = math.sqrt(share * size * size / math.pi * aspect)
            b = share * size * size / (math.pi * a)
            cy, cx = (float(torch.rand(1, generator=g)) * size for _ in range(2))
            masks[i][((ys - cy) / b) ** 2 + ((xs - cx) / a) ** 2 <= 1] = TAIL[c]
    masks[torch.rand(n, size, size, generator=g) < 0.02] = IGNORE
    return images, masks


class PickledExchangeBank(TailMemoryBank):
    """The DDP exchange before issue 13 (same bank, same random numbers and slots): every rank crops every new
    entry, and all of them go to every rank through ``all_gather_object`` (pickled float32 crops and masks on the
    CPU); each rank then writes the surviving ones."""

    def _update_distributed(self, images, masks, resize, boxes, generator, world_size, rank) -> None:
        mine = {(b, t): resize.entry(images[b], masks[b], self.tail_classes[t], box)
                for b, row in enumerate(boxes.tolist()) for t, box in enumerate(row) if box[0] >= 0}
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, (images.shape[0], {key: Entry(e.pixels.cpu(), e.mask.cpu(), *e[2:])
                                                             for key, e in mine.items()}))
        starts = [sum(n for n, _ in gathered[:r]) for r in range(world_size)]
        present = torch.zeros(sum(n for n, _ in gathered), len(self.tail_classes), dtype=torch.bool)
        for start, (_, part) in zip(starts, gathered):
            for b, t in part:
                present[start + b, t] = True
        self.last_new = int(present.sum())
        bank = self._fit(images, resize.out_size, len(present))
        uniforms = memory_bank._uniforms(generator, present.shape, images.device)
        writer, filled = memory_bank._plan(present.to(images.device), bank.filled, uniforms, self.memory_size)
        into = bank.unkept(writer, len(present)).tolist()
        writes = []
        for t, row in enumerate(writer.tolist()):
            for m, n in enumerate(row):
                if n >= 0:
                    r = max(r for r in range(world_size) if starts[r] <= n)
                    writes.append(((t, m), into[n], gathered[r][1][(n - starts[r], t)], self.tail_classes[t]))
        bank.store(writes, self.num_classes)
        self._bank = bank._replace(filled=filled)


class KeptCountingBank(TailMemoryBank):
    """The library's bank, recording the entries that each step keeps (``last_kept``: count and bytes)."""

    def _exchange(self, made, survivors, headers, rank, device):
        areas = [max(0, box[2] - box[0]) * max(0, box[3] - box[1]) for _, _, _, box in survivors]
        self.last_kept = (len(survivors), sum(area * (3 * 4 + 1) for area in areas))  # float32 pixels + mask bytes
        return super()._exchange(made, survivors, headers, rank, device)


class ReceivedBytes:
    """Counts the bytes this rank receives through ``all_gather`` and ``broadcast`` while :meth:`counting`."""

    def __init__(self, rank: int) -> None:
        self.rank, self.total, self.active = rank, 0, False
        all_gather, broadcast = c10d.all_gather, c10d.broadcast

        def counting_all_gather(tensor_list, tensor, *args, **kwargs):
            result = all_gather(tensor_list, tensor, *args, **kwargs)
            if self.active:
                self.total += sum(t.numel() * t.element_size() for i, t in enumerate(tensor_list) if i != self.rank)
            return result

        def counting_broadcast(tensor, src=None, *args, **kwargs):
            result = broadcast(tensor, src, *args, **kwargs)
            if self.active and src != self.rank:
                self.total += tensor.numel() * tensor.element_size()
            return result

        for module in (dist, c10d):  # all_gather_object calls c10d's; the bank calls torch.distributed's
            module.all_gather, module.broadcast = counting_all_gather, counting_broadcast

    @contextmanager
    def counting(self) -> Iterator[None]:
        self.total, self.active = 0, True
        try:
            yield
        finally:
            self.active = False


def banks_equal(bank: TailMemoryBank, other: TailMemoryBank) -> bool:
    return bank.entries.keys() == other.entries.keys() and all(
        len(bank.entries[c]) == len(other.entries[c])
        and all(torch.equal(e.pixels, f.pixels) and torch.equal(e.mask, f.mask) and e[2:] == f[2:]
                for e, f in zip(bank.entries[c], other.entries[c]))
        for c in bank.entries
    )


def worker(rank: int, world_size: int, port: int, cfg: dict[str, Any], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(cfg["threads"])
    pool_images, pool_masks = crops(cfg["pool"], cfg["crop"], seed=rank)
    order = torch.Generator().manual_seed(100 + rank)

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randperm(cfg["pool"], generator=order)[:size]
        return pool_images[pick], pool_masks[pick]

    received = ReceivedBytes(rank)
    bank_args = {"tail_classes": TAIL, "num_classes": NUM_CLASSES, "ignore_index": IGNORE, "memory_size": 5,
                 "p_sample": 0.05, "p_resize": 0.4, "seed": 0}
    banks = {"new": KeptCountingBank(**bank_args), "old": PickledExchangeBank(**bank_args)}
    stats: dict[str, list] = {"new_bytes": [], "old_bytes": [], "kept_bytes": [], "kept": [], "new_entries": [],
                              "new_seconds": [], "old_seconds": []}
    for step in range(cfg["warmup"] + cfg["measured"]):
        images, masks = batch(cfg["batch"])
        for mode in (("new", "old") if step % 2 else ("old", "new")):
            bank = banks[mode]
            bank.last_kept = (0, 0)
            dist.barrier()
            start = time.perf_counter()
            with received.counting():
                bank.update_and_paste(images.clone(), masks.clone(), world_size, rank)
            seconds = time.perf_counter() - start
            if step < cfg["warmup"]:
                continue
            stats[f"{mode}_bytes"].append(received.total)
            stats[f"{mode}_seconds"].append(seconds)
            if mode == "new":
                stats["kept"].append(bank.last_kept[0])
                stats["kept_bytes"].append(bank.last_kept[1])
            else:
                stats["new_entries"].append(bank.last_new)
    stats["banks_identical"] = banks_equal(banks["new"], banks["old"])
    stats["bank_entries"] = sum(banks["new"].num_entries().values())

    import torchvision
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    modes = ["none", "new", "old"]
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for round_ in range(cfg["rounds"] + 1):  # round 0 warms up
        for mode in modes[round_ % 3:] + modes[: round_ % 3]:
            images, masks = batch(cfg["model_batch"])
            dist.barrier()
            start = time.perf_counter()
            if mode != "none":
                banks[mode].update_and_paste(images, masks, world_size, rank)
            loss = F.cross_entropy(model(images)["out"], masks, ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if round_:
                seconds[mode].append(time.perf_counter() - start)
    stats["step_seconds"] = {m: statistics.median(s) for m, s in seconds.items()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(stats))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = settings(getattr(args, "quick", False))
    cfg["threads"] = max(1, (os.cpu_count() or 2) // 2)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(worker, args=(2, free_port(), cfg, out_dir), nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(2)]
    load_after = os.getloadavg()[0]
    mean = statistics.fmean
    received = mean(mean(r["new_bytes"]) for r in ranks)
    old_received = mean(mean(r["old_bytes"]) for r in ranks)
    kept = mean(ranks[0]["kept_bytes"])
    step = {m: mean(r["step_seconds"][m] for r in ranks) for m in ("none", "new", "old")}
    row = {
        "name": ROW,
        "bytes_received_per_rank_step": round(received),
        "bytes_kept_per_step": round(kept),
        "ratio": received / kept,
        "old_bytes_received_per_rank_step": round(old_received),
        "old_ratio": old_received / kept,
        "kept_fraction": sum(ranks[0]["kept"]) / sum(ranks[0]["new_entries"]),
        "bank_seconds_per_step": mean(mean(r["new_seconds"]) for r in ranks),
        "old_bank_seconds_per_step": mean(mean(r["old_seconds"]) for r in ranks),
        "step_time_ratio": step["new"] / step["none"],
        "old_step_time_ratio": step["old"] / step["none"],
        "target_ratio": 2.0,
    }
    setup = {
        "processes": 2, "backend": "gloo", "threads_per_process": cfg["threads"], "crop": [cfg["crop"]] * 2,
        "batch_per_process": cfg["batch"], "classes": NUM_CLASSES, "tail_classes": len(TAIL), "memory_size": 5,
        "p_sample": 0.05, "p_resize": 0.4, "warmup_steps": cfg["warmup"], "measured_steps": cfg["measured"],
        "bank_entries_at_end": ranks[0]["bank_entries"], "new_entries_per_step": mean(ranks[0]["new_entries"]),
        "banks_identical": all(r["banks_identical"] for r in ranks),
        "step_time": {"model": "lraspp_mobilenet_v3_large (scratch), CE, SGD, DDP", "batch_per_process":
                      cfg["model_batch"], "rounds": cfg["rounds"], "median_seconds": step},
        "labels": "synthetic: 4x4 head-class regions, Poisson(3) tail ellipses of 1/2000-1/20 of the crop, "
                  "Zipf tail classes, 2% ignored",
        "quick": bool(getattr(args, "quick", False)),
        "load_average_1min": [round(load_before, 1), round(load_after, 1)],
        "note": "bytes are exact counts; times (bank_seconds, step_time_ratio) are disturbed when the load average "
                "exceeds the 2 cores (other jobs on the machine) and compare the modes only within the run, "
                "which alternates them step by step",
    }
    if not setup["banks_identical"]:
        raise RuntimeError("the library's bank and the pickled exchange's bank differ: the exchange is wrong")
    return row, setup
