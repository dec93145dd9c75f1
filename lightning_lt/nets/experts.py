"""Multi-expert backbones of RIDE / SADE / DirMixE: shared early layers, one late branch and classifier per expert.

Both networks return the logits of every expert stacked as ``[E, B, C]``, each already multiplied by the cosine
classifier's scale ``s`` (the official ``_separate_part``: ``NormedLinear(x) * s``; a linear classifier uses
``s = 1``). The multi-expert losses (:mod:`lightning_lt.losses.experts`) take that tensor;
:class:`~lightning_lt.tasks.MultiExpertClassifier` predicts with the (weighted) mean over the experts, as the
official models' ``final_out = stack(outs).mean(1)``.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck as TVBottleneck

from lightning_lt.nets.cifar_resnet import BasicBlock
from lightning_lt.nets.heads import CosineClassifier

__all__ = [
    "ExpertRouter",
    "MultiExpertCIFARResNet",
    "MultiExpertTorchvisionResNet",
    "check_num_experts",
    "expert_resnet_archs",
]


def check_num_experts(num_experts: object, owner: str) -> int:
    """Return ``num_experts`` as an int, or raise unless it is an integer ``>= 2``.

    Example:
        >>> check_num_experts(1, "MultiExpertCIFARResNet")
        Traceback (most recent call last):
        ...
        ValueError: MultiExpertCIFARResNet needs `num_experts` >= 2 (an expert mixture), got 1. HINT: for a single model use CIFARResNet / TorchvisionBackbone with LongTailClassifier.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 2:
        raise ValueError(
            f"{owner} needs `num_experts` >= 2 (an expert mixture), got {num_experts!r}. HINT: for a single model use "
            "CIFARResNet / TorchvisionBackbone with LongTailClassifier."
        )
    return int(num_experts)


def _check_dim(value: Optional[int], name: str, owner: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise ValueError(f"Expected `{name}` of {owner} to be a positive integer or None, got {value!r}")


def _classifiers(num_experts: int, in_features: int, num_classes: int, use_norm: bool) -> nn.ModuleList:
    if use_norm:
        return nn.ModuleList(CosineClassifier(in_features, num_classes) for _ in range(num_experts))
    return nn.ModuleList(nn.Linear(in_features, num_classes) for _ in range(num_experts))


class _ExpertOutputs(nn.Module):
    """The output side shared by the multi-expert networks: a subclass provides ``shared(x)``,
    ``expert_features(shared, index)``, ``linears`` (one classifier per expert), ``s`` and ``num_experts``."""

    def expert_output(self, shared: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """``(pooled features [B, num_features], scaled logits [B, C])`` of expert ``index``."""
        features = self.expert_features(shared, index)
        return features, self.linears[index](features) * self.s

    def forward(self, x: Tensor) -> Tensor:
        """Scaled logits of every expert, ``[E, B, num_classes]``."""
        shared = self.shared(x)
        return torch.stack([self.expert_output(shared, e)[1] for e in range(self.num_experts)])


class MultiExpertCIFARResNet(_ExpertOutputs):
    """The CIFAR ResNet of RIDE / SADE / DirMixE (``ResNet_s`` of their ``*_resnet_cifar.py``) with ``E`` experts.

    Shared: ``conv3x3(3 -> 16) -> BN -> ReLU -> stage 1`` (``n`` blocks of 16 = ``width`` channels). Per expert: stage 2
    (``n`` blocks, stride 2, ``layer2_output_dim`` channels), stage 3 (``n`` blocks, stride 2, ``layer3_output_dim``
    channels), global average pooling, a cosine classifier (``NormedLinear``) times ``s`` (or a linear one,
    then ``s = 1`` as in the official code). ``depth = 6n + 2`` (32: ``n = 5``). Blocks are
    :class:`~lightning_lt.nets.BasicBlock` with the option-A shortcut; every ``Conv2d`` and ``nn.Linear`` weight
    is ``kaiming_normal_`` (the official ``_weights_init``).

    ``reduce_dimension=True`` (every official RIDE / SADE / DirMixE CIFAR config) narrows the expert stages to
    24 and 48 channels (instead of 32 and 64): 3 experts for CIFAR-100 have 0.78M parameters (1.36M without, one
    ResNet-32 0.47M).

    Args:
        num_classes: classes of every expert's classifier.
        num_experts: ``E >= 2``.
        depth: ``6n + 2`` (32 in the literature).
        reduce_dimension: 24 / 48 expert channels instead of 32 / 64 (unless the dims are given).
        layer2_output_dim: channels of the experts' stage 2 (overrides ``reduce_dimension``).
        layer3_output_dim: channels of the experts' stage 3 (overrides ``reduce_dimension``).
        use_norm: cosine classifiers (``True``, the official configs) or linear ones.
        s: scale of the cosine logits (30).
        width: channels of the shared stem and stage 1 (16 in the official code; the expert stages default to
            ``2 * width`` / ``4 * width``, or ``1.5 * width`` / ``3 * width`` with ``reduce_dimension``).

    Raises:
        ValueError: ``num_experts < 2``, a bad ``depth`` / dimension / ``width`` / ``s``.

    Example:
        >>> net = MultiExpertCIFARResNet(10, num_experts=3, reduce_dimension=True)
        >>> tuple(net(torch.zeros(2, 3, 32, 32)).shape), net.num_features
        ((3, 2, 10), 48)
    """

    def __init__(
        self,
        num_classes: int,
        num_experts: int = 3,
        depth: int = 32,
        reduce_dimension: bool = False,
        layer2_output_dim: Optional[int] = None,
        layer3_output_dim: Optional[int] = None,
        use_norm: bool = True,
        s: float = 30.0,
        width: int = 16,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_experts = check_num_experts(num_experts, owner)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"Expected `num_classes` of {owner} to be an integer >= 2, got {num_classes!r}")
        _check_dim(width, "width", owner)
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"Expected `depth` of {owner} of the form 6n + 2 with n >= 1 (e.g. 20, 32), got {depth!r}")
        _check_dim(layer2_output_dim, "layer2_output_dim", owner)
        _check_dim(layer3_output_dim, "layer3_output_dim", owner)
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0):
            raise ValueError(f"Expected `s` of {owner} to be a number > 0, got {s!r}")
        if layer2_output_dim is None:  # 24 / 32 at the official width 16
            layer2_output_dim = 3 * width // 2 if reduce_dimension else 2 * width
        if layer3_output_dim is None:  # 48 / 64 at the official width 16
            layer3_output_dim = 3 * width if reduce_dimension else 4 * width
        n = (int(depth) - 2) // 6
        self.num_classes, self.depth = int(num_classes), int(depth)
        self.use_norm = bool(use_norm)
        self.s = float(s) if use_norm else 1.0
        self.width = int(width)
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, width, n, stride=1)
        self.layer2s = nn.ModuleList(self._stage(width, layer2_output_dim, n, 2) for _ in range(self.num_experts))
        self.layer3s = nn.ModuleList(
            self._stage(layer2_output_dim, layer3_output_dim, n, 2) for _ in range(self.num_experts)
        )
        self.linears = _classifiers(self.num_experts, layer3_output_dim, self.num_classes, self.use_norm)
        self.num_features = layer3_output_dim
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def shared(self, x: Tensor) -> Tensor:
        """The shared stem and stage 1."""
        return self.layer1(F.relu(self.bn1(self.conv1(x))))

    def expert_features(self, shared: Tensor, index: int) -> Tensor:
        """Pooled features ``[B, num_features]`` of expert ``index`` from the shared part's output."""
        out = self.layer3s[index](self.layer2s[index](shared))
        return out.mean(dim=(2, 3))


def expert_resnet_archs() -> list[str]:
    """torchvision models accepted by :class:`MultiExpertTorchvisionResNet` (the ResNet / ResNeXt / wide ResNet
    family).

    Example:
        >>> "resnet50" in expert_resnet_archs(), "resnext50_32x4d" in expert_resnet_archs()
        (True, True)
    """
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if n.startswith(("resnet", "resnext", "wide_resnet"))]


class MultiExpertTorchvisionResNet(_ExpertOutputs):
    """A torchvision ResNet split as RIDE's ``RIDEResNet`` / SADE's ``Expert_ResNet``: shared stem, layer1 and
    layer2; per expert layer3, layer4, average pooling and a cosine classifier times ``s`` (ImageNet-LT, Places-LT,
    iNaturalist).

    The blocks, groups and widths are those of the torchvision ``arch`` (``resnet50``, ``resnext50_32x4d``, ...);
    ``reduce_dimension=True`` gives the experts 192 / 384 planes in layer3 / layer4 instead of 256 / 512, as the
    official ImageNet-LT configs. Initialisation: torchvision's (``weights=None``; nothing is downloaded) for the
    shared part, and torchvision's rule (``kaiming_normal_``, fan-out) for the expert layers. Pooling is adaptive
    (the official ``AvgPool2d(7)`` is the same at 224 pixels).

    Args:
        num_classes: classes of every expert's classifier.
        arch: a torchvision ResNet, one of :func:`expert_resnet_archs`.
        num_experts: ``E >= 2``.
        reduce_dimension: 192 / 384 expert planes (unless the dims are given).
        layer3_output_dim: planes of the experts' layer3 (overrides ``reduce_dimension``).
        layer4_output_dim: planes of the experts' layer4 (overrides ``reduce_dimension``).
        use_norm: cosine classifiers or linear ones (then ``s = 1``).
        s: scale of the cosine logits (30).

    Raises:
        ValueError: ``num_experts < 2``, an unknown ``arch`` (listing the valid ones), bad dimensions.

    Example:
        >>> net = MultiExpertTorchvisionResNet(5, arch="resnet18", num_experts=2, reduce_dimension=True)
        >>> tuple(net(torch.zeros(1, 3, 64, 64)).shape), net.num_features
        ((2, 1, 5), 384)
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "resnet50",
        num_experts: int = 3,
        reduce_dimension: bool = False,
        layer3_output_dim: Optional[int] = None,
        layer4_output_dim: Optional[int] = None,
        use_norm: bool = True,
        s: float = 30.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_experts = check_num_experts(num_experts, owner)
        valid = expert_resnet_archs()
        if arch not in valid:
            raise ValueError(f"Unknown `arch` {arch!r} of {owner}. HINT: use a torchvision ResNet, one of {valid}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"Expected `num_classes` of {owner} to be an integer >= 2, got {num_classes!r}")
        _check_dim(layer3_output_dim, "layer3_output_dim", owner)
        _check_dim(layer4_output_dim, "layer4_output_dim", owner)
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0):
            raise ValueError(f"Expected `s` of {owner} to be a number > 0, got {s!r}")
        if layer3_output_dim is None:
            layer3_output_dim = 192 if reduce_dimension else 256
        if layer4_output_dim is None:
            layer4_output_dim = 384 if reduce_dimension else 512
        base = torchvision.models.get_model(arch, weights=None)
        self.arch, self.num_classes = arch, int(num_classes)
        self.use_norm = bool(use_norm)
        self.s = float(s) if use_norm else 1.0
        self.stem = nn.Sequential(base.conv1, base.bn1, base.relu, base.maxpool)
        self.layer1, self.layer2 = base.layer1, base.layer2
        block = type(base.layer1[0])
        self._groups, self._base_width = base.groups, base.base_width
        expansion = block.expansion
        shared_channels = 128 * expansion  # layer2's output
        self.layer3s = nn.ModuleList(
            self._layer(block, shared_channels, layer3_output_dim, len(base.layer3)) for _ in range(self.num_experts)
        )
        self.layer4s = nn.ModuleList(
            self._layer(block, layer3_output_dim * expansion, layer4_output_dim, len(base.layer4))
            for _ in range(self.num_experts)
        )
        self.num_features = layer4_output_dim * expansion
        self.linears = _classifiers(self.num_experts, self.num_features, self.num_classes, self.use_norm)
        for name, m in self.named_modules():
            if name.startswith(("layer3s", "layer4s")):
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def _layer(self, block: type, in_planes: int, planes: int, blocks: int) -> nn.Sequential:
        """torchvision's ``ResNet._make_layer`` with stride 2 from ``in_planes`` channels."""
        expansion = block.expansion
        downsample = nn.Sequential(
            nn.Conv2d(in_planes, planes * expansion, 1, stride=2, bias=False), nn.BatchNorm2d(planes * expansion)
        )
        kwargs = {"groups": self._groups, "base_width": self._base_width} if block is TVBottleneck else {}
        layers = [block(in_planes, planes, 2, downsample, **kwargs)]
        layers += [block(planes * expansion, planes, **kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def shared(self, x: Tensor) -> Tensor:
        """The shared stem, layer1 and layer2."""
        return self.layer2(self.layer1(self.stem(x)))

    def expert_features(self, shared: Tensor, index: int) -> Tensor:
        """Pooled features ``[B, num_features]`` of expert ``index`` from the shared part's output."""
        return self.layer4s[index](self.layer3s[index](shared)).mean(dim=(2, 3))


class ExpertRouter(nn.Module):
    """RIDE's expert assignment ("routing") module: run the later experts only on the samples that need them.

    After expert ``i`` (``i < E - 1``) a small head reads that expert's pooled features (L2-normalised, a linear layer
    to ``hidden_dim`` units, ReLU) and the ``top_choices`` largest logits of the experts' running mean, and predicts
    whether the next experts would help; at inference a sample continues to expert ``i + 1`` while ``sigmoid > 0.5``
    and its prediction is the mean of the experts it used (RIDE ``model/ldam_drw_resnets/ea_resnet_cifar.py``,
    ``ResNet_s.pred_expert_help`` / ``forward``; the official CIFAR-100 config uses ``top_choices=30``,
    ``pos_weight=100``). Trained with the experts frozen by :meth:`loss`: binary cross-entropy (``pos_weight``) on
    "the running prediction is wrong and a later expert's running prediction is right".

    Args:
        num_experts: ``E >= 2`` (``E - 1`` decisions).
        num_features: pooled feature size of each expert (the backbone's ``num_features``).
        top_choices: how many of the largest logits the head reads (``<= num_classes``).
        hidden_dim: hidden units per decision (16).
        share_fc: one output layer for every decision (the official default) or one each.
        pos_weight: weight of the positive class of the binary cross-entropy.

    Raises:
        ValueError: ``num_experts < 2`` or non-positive sizes.

    Example:
        >>> net = MultiExpertCIFARResNet(10, num_experts=3, depth=8).eval()
        >>> router = ExpertRouter(3, num_features=net.num_features, top_choices=5)
        >>> logits, used = router.route(net, torch.zeros(4, 3, 8, 8))
        >>> tuple(logits.shape), bool(((used >= 1) & (used <= 3)).all())
        ((4, 10), True)
    """

    def __init__(
        self,
        num_experts: int,
        num_features: int,
        top_choices: int = 5,
        hidden_dim: int = 16,
        share_fc: bool = True,
        pos_weight: float = 20.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_experts = check_num_experts(num_experts, owner)
        for name, value in (("num_features", num_features), ("top_choices", top_choices), ("hidden_dim", hidden_dim)):
            _check_dim(value, name, owner)
        if not pos_weight > 0:
            raise ValueError(f"Expected `pos_weight` of {owner} to be > 0, got {pos_weight!r}")
        self.top_choices, self.pos_weight, self.share_fc = int(top_choices), float(pos_weight), bool(share_fc)
        self.hidden = nn.ModuleList(nn.Linear(num_features, hidden_dim) for _ in range(self.num_experts - 1))
        count = 1 if share_fc else self.num_experts - 1
        self.out = nn.ModuleList(nn.Linear(hidden_dim + self.top_choices, 1) for _ in range(count))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def help_logits(self, features: Tensor, mean_logits: Tensor, index: int) -> Tensor:
        """Decision ``index``: the logit ``[B]`` that experts after ``index`` help, from expert ``index``'s pooled
        features ``[B, D]`` and the running mean of the logits ``[B, C]`` of experts ``0 .. index``."""
        if self.top_choices > mean_logits.shape[1]:
            raise ValueError(
                f"ExpertRouter reads the top {self.top_choices} logits but there are {mean_logits.shape[1]} classes. "
                "HINT: use `top_choices` <= the number of classes (RIDE: 30 for CIFAR-100)."
            )
        hidden = F.relu(self.hidden[index](features / features.norm(dim=1, keepdim=True)))
        top = torch.topk(mean_logits, k=self.top_choices, dim=1).values
        out = self.out[0 if self.share_fc else index]
        return out(torch.cat((top, hidden), dim=1)).view(-1)

    def loss(self, expert_features: Tensor, expert_logits: Tensor, target: Tensor) -> Tensor:
        """The router's training loss from the (frozen) experts' pooled features ``[E, B, D]`` and scaled logits
        ``[E, B, C]``: mean over the ``E - 1`` decisions of ``BCE(help_logit_i, wrong_i and right_later_i)``."""
        running = torch.cumsum(expert_logits, dim=0)  # sum of experts 0..i
        correct = running.argmax(dim=2) == target[None, :]  # [E, B]
        loss = expert_logits.new_zeros(())
        for i in range(self.num_experts - 1):
            logit = self.help_logits(expert_features[i], running[i] / (i + 1), i)
            helps = (~correct[i]) & correct[i + 1 :].any(dim=0)
            pos_weight = logit.new_tensor([self.pos_weight])
            loss = loss + F.binary_cross_entropy_with_logits(logit, helps.float(), pos_weight=pos_weight)
        return loss / (self.num_experts - 1)

    @torch.no_grad()
    def route(self, backbone: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """Routed prediction of ``backbone`` (with ``shared`` / ``expert_output``, e.g.
        :class:`MultiExpertCIFARResNet`): ``(mean logits of the experts each sample used [B, C], experts used [B])``.
        Expert ``i`` runs only on the samples still routed to it."""
        shared = backbone.shared(x)
        features, output = backbone.expert_output(shared, 0)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        used = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        for i in range(1, self.num_experts):
            decision = torch.sigmoid(self.help_logits(features, output[active] / i, i - 1)) > 0.5
            active[active.clone()] = decision
            if not bool(active.any()):
                break
            features, logits = backbone.expert_output(shared[active], i)
            output[active] += logits
            used[active] += 1
        return output / used[:, None].to(output.dtype), used
