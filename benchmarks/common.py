"""Helpers shared by the benchmark scripts: timing callbacks and result files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_shared_data(name: str) -> str:
    """``../shared/data/<name>`` relative to the repository root."""
    return str((REPO_ROOT.parent / "shared" / "data" / name).resolve())


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


class TrainThroughput(Callback):
    """Images per second of the training loop (data loading included), from the end of the first batch of
    each epoch to the end of its last batch, so that worker start-up and validation are excluded."""

    def __init__(self, skip_epochs: int = 1) -> None:
        self.skip_epochs = skip_epochs
        self.images = 0
        self.seconds = 0.0
        self._start: float | None = None
        self._last: float | None = None
        self._count = 0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start, self._last, self._count = None, None, 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        synchronize(pl_module.device)
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        else:
            self._count += int(batch[1].shape[0])
        self._last = now

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch >= self.skip_epochs and self._start is not None and self._last > self._start:
            self.images += self._count
            self.seconds += self._last - self._start

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def environment() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, setup: dict[str, Any], rows: Sequence[dict[str, Any]], columns: Sequence[str],
                  notes: Sequence[str] = (), results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results/<name>.json`` (``{"benchmark", "setup", "rows"}``) and a markdown table beside it."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "setup": setup, "rows": list(rows)}, indent=2) + "\n")
    lines = [f"# {name}", "", "| name | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [_fmt(row.get(c)) for c in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Setup:", ""] + [f"- {k}: {v}" for k, v in setup.items()]
    if notes:
        lines += [""] + list(notes)
    (results_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def set_threads() -> None:
    """Use every core for intra-op parallelism (benchmarks run alone on the machine)."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))


def merge_results(name: str, parts: Sequence[str], columns: Sequence[str], notes: Sequence[str] = ()) -> Path:
    """Combine result files of runs made in parallel (one method each) into ``results/<name>.json``.

    The setup of the first part is kept; the other parts' setups are kept under ``setup["parts"]``
    when they differ.
    """
    loaded = [json.loads(Path(p).read_text()) for p in parts]
    setup = dict(loaded[0]["setup"])
    others = {part["benchmark"]: part["setup"] for part in loaded[1:] if part["setup"] != setup}
    if others:
        setup["parts"] = others
    rows = [row for part in loaded for row in part["rows"]]
    return write_results(name, setup, rows, columns, notes)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Merge benchmark result files: common.py NAME PART.json ...")
    parser.add_argument("name")
    parser.add_argument("parts", nargs="+")
    parser.add_argument("--columns", nargs="+", required=True)
    parser.add_argument("--note", action="append", default=[])
    cli = parser.parse_args()
    print(merge_results(cli.name, cli.parts, cli.columns, cli.note))
