"""Helpers shared by the benchmark scripts: timing callbacks and result files."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn

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
    """Write ``results/<name>.json`` (``{"benchmark", "setup", "rows"}``) and a markdown table beside it.

    A cell is ``mean ± std`` when the row has ``<column>_std`` (see :func:`aggregate_seeds`)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "setup": setup, "rows": list(rows)}, indent=2) + "\n")
    lines = [f"# {name}", "", "| name | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [_cell(row, c) for c in columns]
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


def _cell(row: Mapping[str, Any], column: str) -> str:
    """``mean ± std`` when the row has ``<column>_std`` (rows from :func:`aggregate_seeds`), else the value."""
    std = row.get(f"{column}_std")
    return f"{_fmt(row.get(column))} ± {_fmt(std)}" if std is not None else _fmt(row.get(column))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate_seeds(runs: Sequence[Mapping[str, Any]], seed_key: str = "seed") -> dict[str, Any]:
    """One table row from runs of one method with different seeds: mean and sample standard deviation per key.

    Every numeric key present in all runs becomes ``<key>`` (mean over the runs) and ``<key>_std`` (sample
    standard deviation, ``n - 1`` in the denominator; ``None`` for a single run); ``n_seeds`` counts the runs,
    ``seeds`` lists their ``seed_key`` values and ``runs`` keeps the per-seed rows. Other keys (``name``) are
    kept when all runs agree.

    Raises:
        ValueError: no runs, or runs that disagree on a non-numeric key (rows of different methods).

    Example:
        >>> row = aggregate_seeds([{"name": "CE", "seed": 0, "miou": 0.4}, {"name": "CE", "seed": 1, "miou": 0.5}])
        >>> row["name"], round(row["miou"], 4), round(row["miou_std"], 4), row["seeds"]
        ('CE', 0.45, 0.0707, [0, 1])
    """
    if not runs:
        raise ValueError("`runs` is empty: give the rows of at least one seed")
    row: dict[str, Any] = {}
    for key, value in runs[0].items():
        values = [run.get(key) for run in runs]
        if key == seed_key:
            continue
        if all(_is_number(v) for v in values):
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = _sample_std(values) if len(values) > 1 else None
        elif any(v != value for v in values):
            raise ValueError(
                f"The runs disagree on {key!r} ({values}): aggregate the seeds of one method at a time"
            )
        else:
            row[key] = value
    row["n_seeds"] = len(runs)
    row["seeds"] = [run.get(seed_key) for run in runs]
    row["runs"] = [dict(run) for run in runs]
    return row


def effect_in_stds(base: Mapping[str, Any], other: Mapping[str, Any], key: str) -> dict[str, float]:
    """How far ``other`` is from ``base`` on ``key``, in standard deviations, from two rows of :func:`aggregate_seeds`.

    ``diff`` = mean(other) - mean(base); ``pooled_std`` = sqrt((s_base^2 + s_other^2) / 2) and
    ``diff_over_pooled_std`` = diff / pooled_std; when both rows hold the same seeds, the per-seed differences
    ``d_s`` (same seed: same initialisation of the new layers and same data order) give ``paired_std`` (their
    sample std) and ``diff_over_paired_std`` = mean(d) / paired_std (``nan`` where a std is 0 or undefined).

    Example:
        >>> base = aggregate_seeds([{"seed": 0, "x": 1.0}, {"seed": 1, "x": 2.0}])
        >>> other = aggregate_seeds([{"seed": 0, "x": 2.0}, {"seed": 1, "x": 3.5}])
        >>> {k: round(v, 3) for k, v in effect_in_stds(base, other, "x").items()}  # doctest: +NORMALIZE_WHITESPACE
        {'diff': 1.25, 'pooled_std': 0.901, 'diff_over_pooled_std': 1.387, 'paired_std': 0.354,
         'diff_over_paired_std': 3.536}
    """
    diff = other[key] - base[key]
    stds = [base.get(f"{key}_std"), other.get(f"{key}_std")]
    pooled = math.sqrt((stds[0] ** 2 + stds[1] ** 2) / 2) if None not in stds else math.nan
    out = {"diff": diff, "pooled_std": pooled, "diff_over_pooled_std": _ratio(diff, pooled)}
    base_runs = {run.get("seed"): run[key] for run in base.get("runs", [])}
    other_runs = {run.get("seed"): run[key] for run in other.get("runs", [])}
    if len(base_runs) > 1 and base_runs.keys() == other_runs.keys():
        diffs = [other_runs[s] - base_runs[s] for s in base_runs]
        paired = statistics.stdev(diffs)
        out.update(paired_std=paired, diff_over_paired_std=_ratio(statistics.fmean(diffs), paired))
    return out


def _sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (``n - 1``); ``nan`` when a value is not finite (``statistics.stdev`` raises)."""
    if not all(math.isfinite(v) for v in values):
        return math.nan
    return statistics.stdev(values)


def describe_effect(base: Mapping[str, Any], other: Mapping[str, Any], key: str) -> tuple[float, str]:
    """``(d, text)`` for a results note: :func:`effect_in_stds` of ``other`` against ``base`` on ``key`` as
    ``"d = +0.0123, +1.23 pooled stds, +2.34 paired stds"`` (the paired part only when the rows share their seeds).

    Example:
        >>> base = aggregate_seeds([{"seed": 0, "x": 1.0}, {"seed": 1, "x": 2.0}])
        >>> other = aggregate_seeds([{"seed": 0, "x": 2.0}, {"seed": 1, "x": 3.5}])
        >>> describe_effect(base, other, "x")
        (1.25, 'd = +1.2500, +1.39 pooled stds, +3.54 paired stds')
    """
    effect = effect_in_stds(base, other, key)
    text = f"d = {effect['diff']:+.4f}, {effect['diff_over_pooled_std']:+.2f} pooled stds"
    if "diff_over_paired_std" in effect:
        text += f", {effect['diff_over_paired_std']:+.2f} paired stds"
    return effect["diff"], text


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


class InputRenormalization(nn.Module):
    """Feed ``net`` images normalised with other statistics: ``net(x * s_in / s_net + (m_in - m_net) / s_net)``.

    The DataModules normalise with the ImageNet mean / std (``m_in``, ``s_in``); a backbone trained on
    ``(x - m_net) / s_net`` (e.g. EfficientNet-Lite's ``(x * 255 - 127) / 128``) gets its own normalisation back
    exactly (both are per-channel affine maps of the ``[0, 1]`` image). ``num_features`` of ``net`` is exposed.

    Example:
        >>> net = InputRenormalization(nn.Identity(), (0.5,) * 3, (0.25,) * 3, (0.0,) * 3, (1.0,) * 3)
        >>> net(torch.zeros(1, 3, 1, 1)).flatten().tolist()  # the [0, 1] image, 0.5 everywhere
        [0.5, 0.5, 0.5]
    """

    def __init__(self, net: nn.Module, in_mean: Sequence[float], in_std: Sequence[float],
                 net_mean: Sequence[float], net_std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        in_mean_t, in_std_t, net_mean_t, net_std_t = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                                      for v in (in_mean, in_std, net_mean, net_std))
        self.register_buffer("scale", in_std_t / net_std_t, persistent=False)
        self.register_buffer("shift", (in_mean_t - net_mean_t) / net_std_t, persistent=False)
        if hasattr(net, "num_features"):
            self.num_features = net.num_features

    def forward(self, x: Tensor) -> Any:
        return self.net(x * self.scale + self.shift)


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
