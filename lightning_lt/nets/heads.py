"""Classifier heads: linear and cosine (normalised) classifiers."""

import math
import numbers
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")


class CosineClassifier(nn.Module):
    r"""Cosine-similarity classifier (the ``NormedLinear`` head used with the LDAM loss).

    .. math::
        \mathrm{out}_{ij} = \frac{x_i}{\lVert x_i \rVert} \cdot \frac{W_{:j}}{\lVert W_{:j} \rVert} \in [-1, 1]

    with weight ``W`` of shape ``[in_features, out_features]`` (one column per class), no bias and no scale
    (the loss multiplies by ``s``, e.g. ``LDAMLoss(s=30)``). ``W`` is initialised uniform in ``[-1, 1]`` and
    its columns are renormalised to norm <= 1e-5, then scaled by 1e5 (so every column has norm ~1).

    Args:
        in_features: feature dimension.
        out_features: number of classes.

    Raises:
        ValueError: non-positive sizes.

    Example:
        >>> import torch
        >>> head = CosineClassifier(2, 2)
        >>> with torch.no_grad():
        ...     _ = head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        >>> head(torch.tensor([[3.0, 4.0]])).detach()  # x / |x| = (0.6, 0.8); unit columns (1, 0) and (0, 1)
        tensor([[0.6000, 0.8000]])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1, 1), then renormalise every column (class vector) to unit norm."""
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: Tensor) -> Tensor:
        """Cosine similarities ``[B, out_features]`` between features ``[B, in_features]`` and class vectors."""
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def sigmoid_prior_bias(num_classes: int) -> float:
    """The classifier bias ``b = -log(C - 1)`` of sigmoid-based losses: every ``sigmoid(b) = 1 / C`` at the start.

    Cui et al. (class-balanced loss) initialise the last layer's bias so for the sigmoid and focal losses
    (``model_base._fully_connected`` of richardaecn/class-balanced-loss): with ``C`` one-vs-rest sigmoids the
    initial loss is then ``log C`` for the true class plus about ``1`` for the others, instead of
    ``C log 2`` with a zero bias (``4.6 + 1`` vs ``69`` for ``C = 100``).

    Raises:
        ValueError: ``num_classes < 2``.

    Example:
        >>> round(sigmoid_prior_bias(100), 4)  # sigmoid(-4.5951) = 0.01
        -4.5951
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"Expected `num_classes` >= 2 for a sigmoid prior bias -log(C - 1), got {num_classes!r}")
    return -math.log(num_classes - 1)


HEAD_KINDS = ("linear", "cosine")
HEAD_INITS = ("default", "kaiming_normal")
HEAD_BIAS_INITS = ("default", "zero", "sigmoid_prior")


def build_head(
    kind: Literal["linear", "cosine"],
    in_features: int,
    num_classes: int,
    init: Literal["default", "kaiming_normal"] = "default",
    bias_init: Literal["default", "zero", "sigmoid_prior"] = "default",
) -> nn.Module:
    """Build a classifier head on ``in_features`` features.

    Args:
        kind: ``"linear"`` (``nn.Linear`` with bias) or ``"cosine"`` (:class:`CosineClassifier`, for LDAM).
        in_features: feature dimension (the backbone's ``num_features``).
        num_classes: number of classes.
        init: weight init of the linear head: PyTorch's default, or ``kaiming_normal_`` (fan-in, gain
            ``sqrt(2)``) as LDAM-DRW's ResNet-32 initialises its ``nn.Linear`` (``_weights_init``). Ignored by the
            cosine head.
        bias_init: bias of the linear head: PyTorch's default (uniform in ``+-1 / sqrt(in_features)``, which
            LDAM-DRW keeps), ``"zero"``, or ``"sigmoid_prior"``, the constant :func:`sigmoid_prior_bias`
            ``-log(C - 1)`` of the class-balanced sigmoid / focal loss. The cosine head has no bias: only
            ``"default"``.

    Raises:
        ValueError: unknown ``kind``, ``init`` or ``bias_init``, a bias init for the cosine head, non-positive
            sizes.

    Example:
        >>> build_head("linear", 64, 10)
        Linear(in_features=64, out_features=10, bias=True)
        >>> build_head("cosine", 64, 10)
        CosineClassifier(in_features=64, out_features=10)
        >>> round(build_head("linear", 64, 100, bias_init="sigmoid_prior").bias[0].item(), 4)
        -4.5951
    """
    _check_positive_int("in_features", in_features)
    _check_positive_int("num_classes", num_classes)
    if kind not in HEAD_KINDS:
        raise ValueError(f"Expected `kind` to be one of {HEAD_KINDS}, got {kind!r}")
    if init not in HEAD_INITS:
        raise ValueError(f"Expected `init` to be one of {HEAD_INITS}, got {init!r}")
    if bias_init not in HEAD_BIAS_INITS:
        raise ValueError(f"Expected `bias_init` to be one of {HEAD_BIAS_INITS}, got {bias_init!r}")
    if kind == "cosine":
        if bias_init != "default":
            raise ValueError(
                f"The cosine head has no bias, so `bias_init={bias_init!r}` cannot apply. HINT: use a linear head "
                "for a sigmoid prior bias, or leave `bias_init` at 'default'."
            )
        return CosineClassifier(in_features, num_classes)
    head = nn.Linear(in_features, num_classes)
    if init == "kaiming_normal":
        nn.init.kaiming_normal_(head.weight)
    if bias_init == "zero":
        nn.init.zeros_(head.bias)
    elif bias_init == "sigmoid_prior":
        nn.init.constant_(head.bias, sigmoid_prior_bias(num_classes))
    return head
