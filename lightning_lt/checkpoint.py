"""Atomic checkpoint files: a process killed while saving never leaves a checkpoint that fails to load."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save(obj, path)`` that replaces ``path`` only with a complete, flushed file.

    The object is written to a temporary file in the same directory (``.<name>.<random>.tmp``), flushed and
    ``fsync``-ed, then renamed onto ``path`` with :func:`os.replace` (atomic on POSIX and Windows within one file
    system), and the directory entry is synced. A crash or ``SIGKILL`` at any point leaves either the previous
    file at ``path`` or the new one, never a truncated one; at worst a stray ``*.tmp`` file stays behind. If
    ``path`` is a symbolic link (``ModelCheckpoint(save_last="link")``), the link itself is replaced by the file.

    Example:
        >>> import tempfile, os, torch
        >>> folder = tempfile.mkdtemp()
        >>> atomic_torch_save({"w": torch.ones(2)}, os.path.join(folder, "a.ckpt"))
        >>> torch.load(os.path.join(folder, "a.ckpt"))["w"].tolist(), os.listdir(folder)
        ([1.0, 1.0], ['a.ckpt'])
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.lexists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Persist a rename in ``folder`` (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` with atomic local saves.

    Local checkpoints are written by :func:`atomic_torch_save`: temporary file in the checkpoint's directory,
    ``fsync``, :func:`os.replace` onto the target. A run killed during a save (SIGKILL, out of memory, pre-emption)
    keeps the previous ``last.ckpt`` intact, so ``--ckpt_path last`` always finds a loadable checkpoint.
    Lightning's own ``TorchCheckpointIO`` serialises into memory and lets ``fsspec`` move a temporary file from the
    system temp folder, which is a non-atomic copy when that folder is on another file system, and never syncs.
    Remote paths (``s3://``, ``gs://``, ...) keep Lightning's behaviour (object stores replace whole objects).
    Loading and removing are Lightning's.

    ``lightning-lt`` uses this plugin unless the Trainer is given another ``CheckpointIO`` plugin. In Python:
    ``Trainer(plugins=[AtomicCheckpointIO()])``.

    Example:
        >>> import tempfile, os, torch
        >>> io = AtomicCheckpointIO()
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoints", "last.ckpt")
        >>> io.save_checkpoint({"epoch": 3}, path)
        >>> io.load_checkpoint(path)["epoch"]
        3
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by {type(self).__name__}, got "
                f"{storage_options!r}. HINT: leave `storage_options` unset."
            )
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        if isinstance(path, str) and path.startswith("file://"):
            path = path[len("file://") :]
        atomic_torch_save(checkpoint, path)
