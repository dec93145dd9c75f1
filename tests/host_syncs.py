"""Count the host syncs that lightning_lt's own code makes, for the "no host syncs in training steps" tests.

On a GPU, every operation that copies a device value to the host (``.item()``, ``bool(t)``, ``int(t)``,
``.tolist()``) or whose output size depends on the data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``) blocks the host until the device has caught up. ``torch.cuda.set_sync_debug_mode``
catches them on CUDA only; on the CPU this module patches those entry points on ``torch.Tensor`` / ``torch``
and records each call whose caller is a file of the ``lightning_lt`` package (calls from torch, Lightning
or the test itself are not counted).

Example::

    with HostSyncCounter() as syncs:
        module.training_step(batch, 0)
    assert syncs.calls == [], syncs.report()
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

import lightning_lt

PACKAGE_DIR = str(Path(lightning_lt.__file__).resolve().parent)

#: (owner, attribute) pairs patched: host copies and data-dependent output sizes.
_TENSOR_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
                   "masked_select", "any", "all")
_TORCH_FUNCTIONS = ("nonzero", "unique", "masked_select", "argwhere", "bincount", "repeat_interleave")


def _caller_in_package(depth: int = 2) -> str | None:
    """``file:line`` of the first frame outside this module, if it lies in the lightning_lt package."""
    frame = sys._getframe(depth)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None:
        return None
    filename = str(Path(frame.f_code.co_filename).resolve())
    return f"{filename}:{frame.f_lineno}" if filename.startswith(PACKAGE_DIR) else None


class HostSyncCounter:
    """Context manager recording host syncs made by lightning_lt code (``calls``: ``(what, where)`` pairs).

    ``any`` / ``all`` are recorded only when their result is converted to a Python value (that is where a
    GPU would block); as reductions they stay on the device. Boolean-mask indexing (``t[mask]``) is recorded
    through ``Tensor.__getitem__``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def _record(self, what: str) -> None:
        where = _caller_in_package(3)
        if where is not None:
            self.calls.append((what, where))

    def _wrap(self, what: str, original: Callable) -> Callable:
        counter = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter._record(what)
            return original(*args, **kwargs)

        return wrapper

    def _wrap_getitem(self, original: Callable) -> Callable:
        counter = self

        def getitem(tensor: torch.Tensor, index: Any) -> Any:
            items = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
                counter._record("Tensor.__getitem__[bool mask]")
            return original(tensor, index)

        return getitem

    def __enter__(self) -> "HostSyncCounter":
        for name in _TENSOR_METHODS:
            if name in ("any", "all"):
                continue  # reductions stay on the device; their conversion is caught by __bool__
            original = getattr(torch.Tensor, name)
            self._saved.append((torch.Tensor, name, original))
            setattr(torch.Tensor, name, self._wrap(f"Tensor.{name}", original))
        original = torch.Tensor.__getitem__
        self._saved.append((torch.Tensor, "__getitem__", original))
        torch.Tensor.__getitem__ = self._wrap_getitem(original)  # type: ignore[method-assign]
        for name in _TORCH_FUNCTIONS:
            original = getattr(torch, name)
            self._saved.append((torch, name, original))
            setattr(torch, name, self._wrap(f"torch.{name}", original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def report(self) -> str:
        """One line per recorded call, for assertion messages."""
        return "host syncs in lightning_lt code:\n" + "\n".join(f"  {what} at {where}" for what, where in self.calls)
