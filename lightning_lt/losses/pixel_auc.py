"""Pixel-level multi-class AUC loss of AUCSeg (Han et al., NeurIPS 2024), vectorised over classes.

Every pair of pixels ``(p, q)`` with ``p`` in class ``i`` and ``q`` in another class contributes a
surrogate ``ell(s_i(p) - s_i(q))`` of the pairwise ranking error of class ``i``'s sigmoid score. The
pair means expand into per-class moments of the scores, so the loss costs ``O(pixels x classes)``
time and memory: no pixel pair is ever formed and there is no Python loop over classes. Nor is
there a host synchronisation: nothing is copied to the host and no tensor is sized by the data.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lt.losses.base import check_positive

Transform = Literal["ovo", "ova"]
Surrogate = Literal["square", "hinge", "exp"]
_TRANSFORMS = ("ovo", "ova")
_SURROGATES = ("square", "hinge", "exp")


def _check_auc_args(gamma: float, transform: str, surrogate: str, ignore_index: Optional[int], owner: str) -> None:
    check_positive(gamma, "gamma", owner)
    if transform not in _TRANSFORMS:
        raise ValueError(f"Expected `transform` of {owner} to be one of {_TRANSFORMS}, got {transform!r}.")
    if surrogate not in _SURROGATES:
        raise ValueError(f"Expected `surrogate` of {owner} to be one of {_SURROGATES}, got {surrogate!r}.")
    if surrogate == "hinge" and gamma < 1:
        raise ValueError(
            f"Expected `gamma` >= 1 for surrogate='hinge' of {owner}, got {gamma!r}. Sigmoid scores lie in (0, 1), "
            "so only for gamma >= 1 is max(0, gamma - (a - b)) never clipped, and the hinge is computed exactly "
            "from per-class means only then. HINT: use gamma >= 1, or surrogate='square' / 'exp' for a smaller "
            "margin."
        )
    if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
        raise ValueError(f"Expected `ignore_index` of {owner} to be an int or None, got {ignore_index!r}.")


def _check_inputs(logits: Tensor, target: Tensor, ignore_index: Optional[int], owner: str) -> None:
    if logits.ndim not in (2, 4):
        raise ValueError(
            f"{owner} expects `logits` of shape [batch, classes, height, width] or [pixels, classes], "
            f"got shape {tuple(logits.shape)}."
        )
    if not logits.is_floating_point():
        raise ValueError(f"{owner} expects floating-point `logits`, got dtype {logits.dtype}.")
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(
            f"{owner} needs at least 2 classes (the size of `logits`' dimension 1), got shape {tuple(logits.shape)}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"{owner} expects `target` to hold integer class indices, got dtype {target.dtype}; use `target.long()`."
        )
    if logits.ndim == 4:
        if target.ndim != 3 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"{owner} expects `target` of shape [batch, height, width] with batch = {logits.shape[0]} for "
                f"`logits` of shape {tuple(logits.shape)}, got shape {tuple(target.shape)}."
            )
        check_resizable_logits(logits, target, owner)
    elif target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{owner} expects `target` of shape [pixels] = [{logits.shape[0]}] for `logits` of shape "
            f"{tuple(logits.shape)}, got shape {tuple(target.shape)}."
        )
    _check_target_values(target, num_classes, ignore_index, owner)


#: Devices whose ``torch._assert_async`` checks without blocking the host (CUDA) or at once (CPU).
_ASYNC_ASSERT_DEVICES = ("cpu", "cuda")


def _check_target_values(target: Tensor, num_classes: int, ignore_index: Optional[int], owner: str) -> None:
    """Refuse target values outside ``[0, num_classes)`` that are not ``ignore_index``, without a host
    synchronisation.

    The check is ``torch._assert_async``: on the CPU it fails at once and the ``ValueError`` names the values;
    on CUDA it is a device-side assertion that never blocks the host, so a bad label stops the run at the next
    synchronisation with CUDA's "device-side assert triggered" (as PyTorch's own cross-entropy does; run the
    batch on the CPU, or with ``CUDA_LAUNCH_BLOCKING=1``, to see this message). Other devices check on the host.
    """
    bad = (target < 0) | (target >= num_classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    hint = (
        f"outside [0, {num_classes}) for {num_classes} classes, and `ignore_index` is {ignore_index}. HINT: if "
        "these label unlabelled pixels, set `ignore_index` to that value (e.g. 255); otherwise the logits have "
        "too few channels."
    )
    if target.device.type in _ASYNC_ASSERT_DEVICES:
        try:
            torch._assert_async(~bad.any(), f"{owner} got target values {hint}")
            return
        except RuntimeError:  # CPU tensors: checked at once; name the values below
            pass
    elif not bad.any():
        return
    values = torch.unique(target[bad]).tolist()
    shown = ", ".join(str(v) for v in values[:5]) + (f" (and {len(values) - 5} more)" if len(values) > 5 else "")
    raise ValueError(f"{owner} got target value(s) {shown} {hint}")


def check_resizable_logits(logits: Tensor, target: Tensor, owner: str) -> None:
    """Refuse logits ``[B, C, h, w]`` whose resize to the target's ``[H, W]`` would distort them.

    A network's logits at a lower resolution are the target's size divided by one stride, rounded, so
    ``|h W - w H| <= H + W``; anything further off has another aspect ratio, typically channels-last logits
    ``[B, H, W, C]`` read as ``[B, C, h, w]``.

    Raises:
        ValueError: naming both shapes and the layout to pass.
    """
    (h, w), (height, width) = logits.shape[-2:], target.shape[-2:]
    if (h, w) != (height, width) and abs(h * width - w * height) > height + width:
        raise ValueError(
            f"{owner} got `logits` of shape {tuple(logits.shape)}, read as [batch, classes, height, width], for a "
            f"`target` of shape {tuple(target.shape)}: their spatial sizes ({h}, {w}) and ({height}, {width}) have "
            f"different aspect ratios, so resizing the logits to the target would distort them (channels-last "
            f"logits [batch, height, width, classes] look like this). HINT: pass logits as [batch, classes, "
            f"height, width] (`logits.permute(0, 3, 1, 2)` for channels-last ones), at the target's size or "
            f"at that size divided by the network's stride."
        )


def pixel_auc_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 1.0,
    transform: Transform = "ovo",
    surrogate: Surrogate = "square",
    ignore_index: Optional[int] = None,
) -> Tensor:
    """AUCSeg's pixel-level AUC loss, computed from per-class score moments in ``O(pixels x classes)``.

    Scores are ``s = sigmoid(logits)`` per class; pixels labelled ``ignore_index`` are dropped. With
    ``N_j`` the kept pixels of class ``j``, ``N`` all kept pixels, ``K`` the classes present
    (``N_j > 0``) and ``ell`` the surrogate of a pair ``(a, b) = (s_i(p), s_i(q))``:

    * ``"ovo"``: ``L = 1 / (K (K - 1)) * sum_i sum_{j != i} 1 / (N_i N_j) sum_{p in i} sum_{q in j} ell``
    * ``"ova"``: ``L = sum_i 1 / (N_i (N - N_i)) sum_{p in i} sum_{q not in i} ell``
      (not divided by ``K``, as in the reference implementation),

    with sums over present classes and surrogates ``"square"``: ``(gamma - (a - b))^2 / 2``,
    ``"hinge"``: ``max(0, gamma - (a - b))`` (linear, as ``gamma >= 1`` and ``a, b in (0, 1)``) and
    ``"exp"``: ``exp(-gamma (a - b))``. Each pair mean factorises into means over the two classes,
    e.g. ``E(gamma - a + b)^2 = E(gamma - a)^2 + 2 E(gamma - a) E b + E b^2`` for independent ``a, b``.
    Fewer than two present classes give a zero that is still connected to the graph. The square and exp
    surrogates equal the reference implementation's; its hinge divides the negative-score term by an
    extra ``N_i``, whereas this is the pair mean written above.

    Logits whose spatial size differs from the target's are first resized to it (bilinear,
    ``align_corners=False``); their aspect ratio must be the target's (up to the rounding of a network's
    stride), so that channels-last logits are refused rather than distorted. Half-precision logits are
    computed in float32; float64 stays float64.

    Args:
        logits: ``[B, C, H, W]`` (or flat ``[P, C]``) unnormalised per-class scores, ``C >= 2``.
        target: ``[B, H', W']`` (or ``[P]``) class indices in ``[0, C)`` or ``ignore_index``.
        gamma: margin (``"square"``, ``"hinge"``; ``>= 1`` for the hinge) or scale (``"exp"``), ``> 0``.
        transform: ``"ovo"`` (one-vs-one) or ``"ova"`` (one-vs-all).
        surrogate: ``"square"``, ``"hinge"`` or ``"exp"``.
        ignore_index: label of pixels to drop, or ``None`` to keep every pixel.

    Returns:
        Scalar loss (float32 for half-precision logits, else the logits' dtype).

    Raises:
        ValueError: if ``gamma <= 0``, ``transform``/``surrogate`` is unknown, ``surrogate="hinge"`` with
            ``gamma < 1``, on bad shapes or dtypes (logits whose aspect ratio differs from the target's, e.g.
            channels-last), or on a target value outside ``[0, C)`` that is not ``ignore_index`` (on CUDA a
            device-side assertion instead, so that the loss never blocks the host; see ``_check_target_values``).

    Example:
        >>> logits = torch.tensor([[0.0, 0.0], [1.0986, 0.0], [0.0, 1.0986]])  # sigmoid(1.0986) = 0.75
        >>> print(f"{pixel_auc_loss(logits, torch.tensor([0, 0, 1])).item():.4f}")
        0.3359
    """
    _check_auc_args(gamma, transform, surrogate, ignore_index, "pixel_auc_loss")
    _check_inputs(logits, target, ignore_index, "pixel_auc_loss")
    return _pixel_auc(logits, target, float(gamma), transform, surrogate, ignore_index)


def _pixel_auc(
    logits: Tensor, target: Tensor, gamma: float, transform: str, surrogate: str, ignore_index: Optional[int]
) -> Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    num_classes = logits.shape[1]
    if logits.ndim == 4:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        scores = torch.sigmoid(logits.flatten(2))  # [B, C, P_b]: the layout of the logits, no transpose
        labels = target.flatten(1)  # [B, P_b]
    else:
        scores = torch.sigmoid(logits).t()[None]  # [1, C, P]
        labels = target[None]
    # Dropped pixels go to an extra bin C that is thrown away, which is cheaper than masking [B, C, P].
    labels = labels.long()
    if ignore_index is not None:
        labels = labels.masked_fill(labels == ignore_index, num_classes)
    dtype = scores.dtype
    index = labels[:, None, :].expand_as(scores)

    def class_sums(values: Tensor) -> Tensor:
        """``sums[i, j] = sum_{q in class j} values[i](q)`` for per-class ``values [B, C, P_b]``: ``[C, C]``."""
        out = values.new_zeros(values.shape[0], num_classes, num_classes + 1)
        return out.scatter_add_(2, index, values).sum(0)[:, :num_classes]

    def own_class_sums(values: Tensor) -> Tensor:
        """``sums[i] = sum_{p in class i} values(p)`` for per-pixel ``values [B, P_b]``: ``[C]``."""
        return values.new_zeros(num_classes + 1).index_add_(0, labels.flatten(), values.flatten())[:num_classes]

    flat_labels = labels.flatten()  # N_j, counted in int64 (exact) by index_add_, not bincount (its size syncs)
    counts = torch.zeros(num_classes + 1, dtype=torch.long, device=labels.device)
    counts = counts.index_add_(0, flat_labels, torch.ones_like(flat_labels))[:num_classes].to(dtype)
    present = counts > 0
    num_present = present.sum().to(dtype)  # K
    safe_counts = counts.clamp_min(1)  # absent classes give finite values that are masked out below
    # a_p = s_{y_p}(p): each kept pixel's score for its own class (dropped pixels read class 0, unused).
    own = scores.gather(1, labels.clamp_max(num_classes - 1)[:, None, :]).squeeze(1)  # [B, P_b]
    eye = torch.eye(num_classes, dtype=torch.bool, device=scores.device)
    if transform == "ovo":
        # neg_mean(v)[i] = sum over present j != i of mean_{q in j} v_i(q)
        pair_mask = (present[None, :] & ~eye).to(dtype)  # [i, j]
        num_negatives = num_present - 1  # how many classes j each present i is paired with

        def neg_mean(sums: Tensor) -> Tensor:
            return (sums / safe_counts[None, :] * pair_mask).sum(1)

    else:
        # neg_mean(v)[i] = mean over kept q not in i of v_i(q); the off-diagonal sum avoids a cancellation.
        off_diag = (~eye).to(dtype)
        num_rest = counts.sum() - counts  # N - N_i
        num_negatives = torch.ones((), dtype=dtype, device=scores.device)

        def neg_mean(sums: Tensor) -> Tensor:
            return (sums * off_diag).sum(1) / num_rest.clamp_min(1)

    if surrogate == "exp":
        pos = own_class_sums(torch.exp(-gamma * own)) / safe_counts  # E_{p in i} exp(-gamma a)
        per_class = pos * neg_mean(class_sums(torch.exp(gamma * scores)))
    else:
        margin = gamma - own  # gamma - a, >= 0 for the hinge: every term below is non-negative there
        pos1 = own_class_sums(margin) / safe_counts  # E_{p in i} (gamma - a)
        neg1 = neg_mean(class_sums(scores))  # negatives' E b (summed over classes j for ovo)
        if surrogate == "hinge":
            per_class = num_negatives * pos1 + neg1
        else:
            pos2 = own_class_sums(margin * margin) / safe_counts  # E_{p in i} (gamma - a)^2
            neg2 = neg_mean(class_sums(scores * scores))  # negatives' E b^2 (likewise)
            per_class = 0.5 * (num_negatives * pos2 + 2.0 * pos1 * neg1 + neg2)
    if transform == "ovo":
        valid = present
        factor = (num_present * (num_present - 1)).clamp_min(1)
    else:
        valid = present & (num_rest > 0)
        factor = torch.ones((), dtype=dtype, device=scores.device)
    # With K < 2 every class is masked out: an exact zero with zero gradients, still in the graph.
    return torch.where(valid, per_class, torch.zeros_like(per_class)).sum() / factor


class PixelAUCLoss(nn.Module):
    """AUCSeg's pixel-level AUC loss over sigmoid class scores, in ``O(pixels x classes)``.

    For class ``i`` (``N_i`` kept pixels), scores ``a = s_i(p)`` of its pixels and ``b = s_i(q)`` of
    the other pixels, with ``K`` classes present and ``N`` kept pixels:

    * ``"ovo"``: ``L = 1 / (K (K - 1)) * sum_i sum_{j != i} 1 / (N_i N_j) sum_{p in i} sum_{q in j} ell(a, b)``
    * ``"ova"``: ``L = sum_i 1 / (N_i (N - N_i)) sum_{p in i} sum_{q not in i} ell(a, b)`` (no ``1 / K``,
      as in the reference implementation),

    ``ell = (gamma - (a - b))^2 / 2`` (square), ``max(0, gamma - (a - b))`` (hinge) or
    ``exp(-gamma (a - b))`` (exp). Use it beside the cross-entropy, ``CE + lambda * PixelAUC``. See
    :func:`pixel_auc_loss`.

    Args:
        gamma: margin (square, hinge; ``>= 1`` for the hinge) or scale (exp), ``> 0``.
        transform: ``"ovo"`` (one-vs-one, AUCSeg's default) or ``"ova"`` (one-vs-all).
        surrogate: ``"square"`` (AUCSeg's default), ``"hinge"`` or ``"exp"``.
        ignore_index: label of pixels to drop; ``None`` keeps every pixel (the segmentation task sets it
            to its own ignore index when left ``None``).

    Raises:
        ValueError: if ``gamma <= 0``, ``transform`` or ``surrogate`` is unknown, or ``surrogate="hinge"``
            with ``gamma < 1``; in ``forward`` on bad shapes (logits whose aspect ratio differs from the
            target's, e.g. channels-last ``[B, H, W, C]``) or a target value outside ``[0, C)`` that is not
            ``ignore_index`` (on CUDA a device-side assertion, as in :func:`pixel_auc_loss`).

    Example:
        >>> loss = PixelAUCLoss(ignore_index=255)
        >>> logits = torch.tensor([[[[0.0, 1.0986, 0.0, 3.0]], [[0.0, 0.0, 1.0986, 3.0]]]])  # [1, 2, 1, 4]
        >>> print(f"{loss(logits, torch.tensor([[[0, 0, 1, 255]]])).item():.4f}")
        0.3359
    """

    def __init__(
        self,
        gamma: float = 1.0,
        transform: Transform = "ovo",
        surrogate: Surrogate = "square",
        ignore_index: Optional[int] = None,
    ) -> None:
        super().__init__()
        _check_auc_args(gamma, transform, surrogate, ignore_index, type(self).__name__)
        self.gamma = float(gamma)
        self.transform = transform
        self.surrogate = surrogate
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_inputs(logits, target, self.ignore_index, type(self).__name__)
        return _pixel_auc(logits, target, self.gamma, self.transform, self.surrogate, self.ignore_index)

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, transform={self.transform!r}, surrogate={self.surrogate!r}, "
            f"ignore_index={self.ignore_index}"
        )
