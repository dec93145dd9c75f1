"""torchvision semantic segmentation models (DeepLabV3, FCN, LR-ASPP) returning logits (never downloads weights)."""

import numbers
import os
import pickle
from collections import Counter
from collections.abc import Mapping
from typing import Optional

import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn import functional as F

#: The ImageNet classification model whose weights fit each architecture's backbone.
_BACKBONES = {
    "deeplabv3_mobilenet_v3_large": "mobilenet_v3_large",
    "deeplabv3_resnet50": "resnet50",
    "deeplabv3_resnet101": "resnet101",
    "fcn_resnet50": "resnet50",
    "fcn_resnet101": "resnet101",
    "lraspp_mobilenet_v3_large": "mobilenet_v3_large",
}


def available_segmentation_archs() -> list[str]:
    """Names accepted by :class:`TorchvisionSegmentation` (torchvision's semantic segmentation models).

    Example:
        >>> available_segmentation_archs()  # doctest: +NORMALIZE_WHITESPACE
        ['deeplabv3_mobilenet_v3_large', 'deeplabv3_resnet101', 'deeplabv3_resnet50', 'fcn_resnet101',
         'fcn_resnet50', 'lraspp_mobilenet_v3_large']
    """
    names = torchvision.models.list_models(module=torchvision.models.segmentation)
    return sorted(name for name in names if name in _BACKBONES)


def _short(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{f' ... ({len(keys)} in all)' if len(keys) > n else ''}"


def _read_state_dict(path: str, argument: str, hint: str) -> dict[str, Tensor]:
    """Load a state dict from a local file: a plain one, or a checkpoint dict holding it under "state_dict"/"model"."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`{argument}` {path!r} does not exist. {hint} lightning-lt never downloads.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(
            f"Cannot read `{argument}` {path!r} as a torch file of tensors (saved with `torch.save`; loaded with "
            f"`weights_only=True`, so a checkpoint holding arbitrary objects needs its state dict saved on its "
            f"own): {err}"
        ) from err
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"Expected `{argument}` {path!r} to hold a state dict (a non-empty mapping of names to tensors, or a "
            f"checkpoint with one under 'state_dict' or 'model'), got {type(state).__name__}"
        )
    return dict(state)


def _best_prefix(source_keys: list[str], target_keys: set[str]) -> tuple[str, int]:
    """The prefix ``p`` for which most ``p + key`` of ``source_keys`` have ``key`` in ``target_keys``.

    Lets a file saved from a wrapper (``model.``, ``net.model.``, ``module.``) or from a classification model
    (``features.`` of MobileNetV3) match by name. Ties go to the shortest prefix.
    """
    votes: Counter = Counter()
    for key in source_keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in target_keys:
                votes[".".join(parts[:i]) + ("." if i else "")] += 1
    if not votes:
        return "", 0
    prefix, count = min(votes.items(), key=lambda item: (-item[1], len(item[0])))
    return prefix, count


class TorchvisionSegmentation(nn.Module):
    """A torchvision semantic segmentation network whose ``forward`` returns logits at the input resolution.

    ``forward(x)`` maps images ``[B, 3, H, W]`` to logits ``[B, num_classes, H, W]`` (torchvision's ``"out"``).
    Models are built with ``weights=None, weights_backbone=None``: nothing is ever downloaded. Pretrained weights
    come from local files:

    * ``weights_path``: the whole network, loaded strictly: a ``state_dict`` of this module or of the torchvision
      model, or a checkpoint holding one under ``"state_dict"`` / ``"model"`` (e.g. a Lightning checkpoint; the
      prefix such as ``net.`` is found by matching names).
    * ``backbone_weights_path``: an ImageNet classification ``state_dict`` of the matching torchvision model
      (``resnet50`` / ``resnet101`` / ``mobilenet_v3_large``, e.g. the official ``resnet50-*.pth``), loaded into
      the backbone by name; the classifier keys are skipped and reported, backbone keys the file lacks are warned
      about.

    ``num_classes`` comes first so that a config can give the rest and the task call ``net(num_classes)``.

    Args:
        num_classes: number of classes ``C`` (output channels).
        arch: one of :func:`available_segmentation_archs`.
        weights_path: optional local state-dict file of the whole network.
        backbone_weights_path: optional local state-dict file of the ImageNet classification backbone.
        aux_loss: add torchvision's auxiliary FCN head (DeepLabV3 / FCN only); its logits come from
            :meth:`forward_with_aux`, ``forward`` skips it. :class:`~lightning_lt.tasks.SegmentationModule`
            trains it (``aux_weight * CE``, 0.4 by default as MMSegmentation's auxiliary heads).

    Raises:
        ValueError: unknown ``arch`` (the message lists the valid ones), ``num_classes`` < 2, ``aux_loss`` with
            LR-ASPP, or a weights file that is unreadable or does not fit (the message names the file).
        FileNotFoundError: a weights file does not exist.

    Example:
        >>> import torch
        >>> net = TorchvisionSegmentation(5, arch="lraspp_mobilenet_v3_large").eval()
        >>> tuple(net(torch.zeros(1, 3, 64, 48)).shape)
        (1, 5, 64, 48)
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "lraspp_mobilenet_v3_large",
        weights_path: Optional[str] = None,
        backbone_weights_path: Optional[str] = None,
        aux_loss: bool = False,
    ) -> None:
        super().__init__()
        valid = available_segmentation_archs()
        if arch not in valid:
            raise ValueError(f"Unknown `arch` {arch!r}. Valid choices: {valid}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be an integer >= 2, got {num_classes!r}")
        num_classes = int(num_classes)
        if aux_loss and arch.startswith("lraspp"):
            raise ValueError(f"`aux_loss=True` is not available for {arch!r} (LR-ASPP has no auxiliary head)")
        self.num_classes = num_classes
        self.arch = arch
        self.aux_loss = aux_loss
        kwargs = {"aux_loss": True} if aux_loss else {}
        self.model = torchvision.models.get_model(
            arch, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
        )
        if backbone_weights_path is not None:
            self.load_backbone_weights(backbone_weights_path)
        if weights_path is not None:
            self.load_weights(weights_path)

    def load_weights(self, weights_path: str) -> None:
        """Load the whole network strictly from a local file (see the class docstring for the accepted layouts)."""
        state = _read_state_dict(
            weights_path, "weights_path", f"Save one with `torch.save(net.state_dict(), path)` of a {self.arch}."
        )
        own = self.model.state_dict()
        prefix, _ = _best_prefix(list(state), set(own))
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            hint = ""
            if any(k.startswith("aux_classifier.") for k in unexpected):
                hint = " HINT: the file has an auxiliary head: set `aux_loss=True`."
            elif any(k.startswith("aux_classifier.") for k in missing):
                hint = " HINT: the file has no auxiliary head: set `aux_loss=False`."
            raise ValueError(
                f"The state dict in `weights_path` {weights_path!r} does not match {self.arch!r} "
                f"(key prefix {prefix!r} stripped): missing keys {_short(missing)}, unexpected keys "
                f"{_short(unexpected)}. Is `arch` right?{hint}"
            )
        self._load(self.model, state, weights_path, "weights_path")

    def load_backbone_weights(self, backbone_weights_path: str) -> None:
        """Load an ImageNet classification state dict into the backbone, matching keys by name."""
        source = _BACKBONES[self.arch]
        state = _read_state_dict(
            backbone_weights_path,
            "backbone_weights_path",
            f"Save one with `torch.save(torchvision.models.{source}().state_dict(), path)` or download the official "
            f"ImageNet weights yourself.",
        )
        own = self.model.backbone.state_dict()
        prefix, matched = _best_prefix(list(state), set(own))
        if matched == 0:
            raise ValueError(
                f"No key of `backbone_weights_path` {backbone_weights_path!r} matches the {self.arch!r} backbone "
                f"(a torchvision {source!r}): the file has keys like {_short(list(state), 3)}, the backbone "
                f"{_short(list(own), 3)}."
            )
        loaded = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in own}
        skipped = [k for k in state if not (k.startswith(prefix) and k[len(prefix) :] in own)]
        missing = [k for k in own if k not in loaded]
        self._load(self.model.backbone, loaded, backbone_weights_path, "backbone_weights_path", strict=False)
        rank_zero_info(
            f"TorchvisionSegmentation({self.arch!r}): loaded {len(loaded)} of {len(own)} backbone tensors from "
            f"{backbone_weights_path!r} (key prefix {prefix!r}); skipped {len(skipped)} keys not in the backbone: "
            f"{_short(skipped)}"
        )
        if missing:
            rank_zero_warn(
                f"TorchvisionSegmentation({self.arch!r}): `backbone_weights_path` {backbone_weights_path!r} lacks "
                f"{len(missing)} of the {len(own)} backbone tensors, which keep their random initialisation: "
                f"{_short(missing)}. Is it a torchvision {source!r} state dict?",
                category=UserWarning,
            )

    def _load(self, module: nn.Module, state: dict, path: str, argument: str, strict: bool = True) -> None:
        own = module.state_dict()
        wrong = [
            f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if wrong:
            hint = " HINT: is `num_classes` the one the file was trained with?" if argument == "weights_path" else ""
            raise ValueError(
                f"The state dict in `{argument}` {path!r} does not fit {self.arch!r} with num_classes="
                f"{self.num_classes}: shape mismatch for {_short(wrong, 3)}.{hint}"
            )
        module.load_state_dict(state, strict=strict)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes, H, W]`` of images ``[B, 3, H, W]`` (the auxiliary head, if any, is skipped)."""
        if not self.aux_loss:
            return self.model(x)["out"]
        out = self.model.classifier(self.model.backbone(x)["out"])
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Main and auxiliary logits, both ``[B, num_classes, H, W]``; the second is ``None`` without ``aux_loss``."""
        result = self.model(x)
        return result["out"], result.get("aux")
