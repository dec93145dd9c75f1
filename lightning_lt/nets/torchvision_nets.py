"""torchvision classification models as feature extractors (never downloads weights)."""

import os
from collections.abc import Mapping
from typing import Optional

import torch
import torchvision
from torch import Tensor, nn

# Heads are replaced by ``nn.Identity``; these models are left out: googlenet / inception_v3 return auxiliary
# logits in training mode and squeezenet's head is a convolution.
_EXCLUDED = ("googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1")
_HEAD_ATTRS = ("fc", "classifier", "head", "heads")


def available_archs() -> list[str]:
    """Names accepted by :class:`TorchvisionBackbone` (torchvision classification models with a linear head).

    Example:
        >>> "resnet50" in available_archs(), "inception_v3" in available_archs()
        (True, False)
    """
    return [name for name in torchvision.models.list_models(module=torchvision.models) if name not in _EXCLUDED]


def _strip_head(model: nn.Module, arch: str) -> tuple[int, str]:
    """Replace the final ``nn.Linear`` by ``nn.Identity``; return its ``in_features`` and state-dict key prefix."""
    for attr in _HEAD_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features, f"{attr}."
        if isinstance(head, nn.Sequential) and len(head) > 0:
            name, last = list(head.named_children())[-1]
            if isinstance(last, nn.Linear):
                setattr(head, name, nn.Identity())
                return last.in_features, f"{attr}.{name}."
    raise ValueError(f"Cannot find a linear classifier head in torchvision model {arch!r}")  # pragma: no cover


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model with its last linear layer replaced by ``nn.Identity``.

    ``forward(x)`` returns features ``[B, num_features]`` (e.g. 2048 for ``resnet50``, 512 for ``resnet18``).
    Models are built with ``weights=None``: nothing is ever downloaded. To start from pretrained weights, pass
    ``weights_path``, a local file holding a state dict, either of the full torchvision model (e.g. an official
    ``resnet50-*.pth``: the classifier keys are dropped) or of a :class:`TorchvisionBackbone` (``model.`` prefix).

    Args:
        arch: torchvision model name, one of :func:`available_archs` (``resnet18`` ... ``resnet152``,
            ``resnext50_32x4d``, ``wide_resnet50_2``, ``convnext_tiny``, ``vit_b_16``, ...).
        weights_path: optional path of a local state-dict file (``torch.save(model.state_dict(), path)``).

    Raises:
        ValueError: unknown ``arch`` (the message lists the valid ones), or a state dict that does not match.
        FileNotFoundError: ``weights_path`` does not exist.

    Example:
        >>> import torch
        >>> net = TorchvisionBackbone("resnet18")
        >>> net.num_features, tuple(net(torch.zeros(1, 3, 64, 64)).shape)
        (512, (1, 512))
    """

    def __init__(self, arch: str = "resnet50", weights_path: Optional[str] = None) -> None:
        super().__init__()
        valid = available_archs()
        if arch not in valid:
            resnets = [a for a in valid if "resne" in a]
            others = [a for a in valid if "resne" not in a]
            raise ValueError(f"Unknown `arch` {arch!r}. Valid choices: ResNets {resnets}; others {others}.")
        self.arch = arch
        self.model = torchvision.models.get_model(arch, weights=None)
        self.num_features, self._head_prefix = _strip_head(self.model, arch)
        self.weights_path = weights_path
        if weights_path is not None:
            self.load_weights(weights_path)

    def load_weights(self, weights_path: str) -> None:
        """Load a local state-dict file (see the class docstring for the accepted layouts)."""
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"`weights_path` {weights_path!r} does not exist. Save one with "
                f"`torch.save(torchvision.models.{self.arch}().state_dict(), path)` or download the official "
                f"weights yourself; lightning-lt never downloads."
            )
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(
                f"Expected `weights_path` {weights_path!r} to hold a state dict (a mapping of names to tensors), "
                f"got {type(state).__name__}"
            )
        if state and all(k.startswith("model.") for k in state):  # saved from a TorchvisionBackbone
            state = {k[len("model.") :]: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(self._head_prefix)}
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(
                f"The state dict in `weights_path` {weights_path!r} does not fit torchvision {self.arch!r}: {err}"
            ) from err
        if missing or unexpected:
            raise ValueError(
                f"The state dict in `weights_path` {weights_path!r} does not match torchvision {self.arch!r}: "
                f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected keys "
                f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Is `arch` right?"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, num_features]`` of images ``[B, 3, H, W]``."""
        return self.model(x)
