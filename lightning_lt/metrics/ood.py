"""Out-of-distribution scores for multi-label logits, OOD-detection metrics (AUROC, AUPR, FPR95), and EDGE's
measure for choosing an outlier-exposure set."""

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from torchmetrics.utilities import dim_zero_cat

from lightning_lt.losses.multilabel import joint_energy

OOD_SCORES = ("jointenergy", "maxlogit", "maxsigmoid", "energy")
"""Names of the scores :func:`ood_scores` computes; every one is higher for in-distribution inputs."""

_SCORE_FUNCTIONS = {
    "jointenergy": joint_energy,
    "maxlogit": lambda logits: logits.amax(dim=-1),
    "maxsigmoid": lambda logits: torch.sigmoid(logits.amax(dim=-1)),  # sigmoid is monotone: = max_c sigmoid(f_c)
    "energy": lambda logits: torch.logsumexp(logits, dim=-1),
}


def _validate_names(names: Sequence[str], argument: str, allowed: Sequence[str] = ()) -> list[str]:
    if isinstance(names, str):
        raise ValueError(
            f"Expected `{argument}` to be a sequence of score names, got the string {names!r}. HINT: pass a list, "
            f"e.g. [{names!r}]"
        )
    if not isinstance(names, Sequence):
        raise ValueError(f"Expected `{argument}` to be a sequence of score names, got {names!r}")
    out = list(names)
    if not out:
        raise ValueError(f"Expected `{argument}` to name at least one score, got {names!r}")
    for name in out:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Expected `{argument}` to hold non-empty strings, got {name!r}")
        if allowed and name not in allowed:
            raise ValueError(f"Unknown OOD score {name!r} in `{argument}`: valid names are {list(allowed)}")
        if out.count(name) > 1:
            raise ValueError(f"Score {name!r} appears more than once in `{argument}`")
    return out


def ood_scores(logits: Tensor, names: Sequence[str] = OOD_SCORES) -> dict[str, Tensor]:
    r"""Out-of-distribution scores of multi-label logits, each **higher for in-distribution** inputs.

    For the logits :math:`f_1(x), \dots, f_C(x)` of one input (one independent sigmoid per label):

    .. math::
        \mathrm{jointenergy} = \sum_c \log\left(1 + e^{f_c}\right),\quad
        \mathrm{maxlogit} = \max_c f_c,\quad
        \mathrm{maxsigmoid} = \max_c \sigma(f_c),\quad
        \mathrm{energy} = \log \sum_c e^{f_c}

    ``jointenergy`` is JointEnergy (Wang et al., NeurIPS 2021), which sums the evidence of every label;
    ``energy`` is the multiclass free energy :math:`-E(x)` at temperature 1, for comparison. Half-precision
    logits are computed in float32 (``softplus`` and ``logsumexp`` are the stable forms). ``maxsigmoid`` saturates
    at 1.0 in float32 for logits above about 17, so confident inputs tie there (a property of the score).

    Args:
        logits: multi-label logits ``[N, C]``.
        names: the scores to compute, a subset of :data:`OOD_SCORES` (in any order).

    Returns:
        ``{name: scores [N]}`` in the order of ``names``.

    Raises:
        ValueError: ``logits`` not a floating tensor ``[N, C]`` with ``C >= 1``, or an unknown / repeated name
            (the message lists the valid ones).

    Example:
        >>> logits = torch.tensor([[2.0, -1.0, 0.0], [-3.0, -3.0, -3.0]])
        >>> for name, score in ood_scores(logits).items():
        ...     print(name, [round(s, 4) for s in score.tolist()])
        jointenergy [3.1333, 0.1458]
        maxlogit [2.0, -3.0]
        maxsigmoid [0.8808, 0.0474]
        energy [2.1698, -1.9014]
    """
    names = _validate_names(names, "names", allowed=OOD_SCORES)
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim != 2 or logits.shape[1] < 1:
        detail = (
            f"shape {tuple(logits.shape)} and dtype {logits.dtype}" if isinstance(logits, Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"Expected `logits` to be a floating tensor [N, C] with C >= 1, got {detail}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return {name: _SCORE_FUNCTIONS[name](logits) for name in names}


def _dense_rank(x: Tensor) -> Tensor:
    """Order-preserving map of ``x`` onto ``[0, 1]`` (float64) that keeps exactly its ties: ``i / (K - 1)`` for the
    ``i``-th smallest of the ``K`` distinct values. torchmetrics applies a sigmoid to scores outside ``[0, 1]``,
    which would merge large scores into ties (sigmoid(40) == 1.0 in float64); ranks never do.
    """
    _, inverse = torch.unique(x, sorted=True, return_inverse=True)
    top = int(inverse.max()) if inverse.numel() else 0
    return inverse.double() / max(top, 1)


FPR_CONVENTIONS = ("nearest", "at_least")
"""How :class:`OODDetection` picks the ROC point of its FPR at a TPR (see ``fpr_convention`` there)."""


def _fpr_at_tpr(score: Tensor, positive: Tensor, recall_level: float, convention: str = "nearest") -> Tensor:
    """FPR at the ROC point chosen by ``convention`` for ``recall_level``. The points are one per distinct score
    (tied inputs accepted together), from the highest threshold down, with exact counts and TPR in float64:

    - ``"nearest"``: among the points from the highest threshold down to the first that accepts every positive,
      the one whose TPR is nearest ``recall_level``; of several equally near, the lowest threshold (highest FPR);
    - ``"at_least"``: the highest threshold whose TPR reaches ``recall_level`` (``fpr[searchsorted(tpr, level)]``).

    Needs a positive and a negative input."""
    order = torch.argsort(score, descending=True, stable=True)
    score, positive = score[order], positive[order].long()
    end = torch.tensor([score.numel() - 1], device=score.device)
    last_of_tie = torch.cat([torch.nonzero(score[1:] != score[:-1]).flatten(), end])
    tps = positive.cumsum(0)[last_of_tie]  # positives with score >= threshold
    fps = last_of_tie + 1 - tps
    tpr = tps.double() / tps[-1]
    if convention == "at_least":
        level = torch.tensor([recall_level], dtype=torch.float64, device=tpr.device)
        index = int(torch.searchsorted(tpr, level, side="left")[0])
    else:
        last = int(torch.searchsorted(tps, tps[-1:], side="left")[0])  # first point accepting every positive
        distance = (tpr[: last + 1] - recall_level).abs()
        index = last - int(torch.argmin(distance.flip(0)))  # argmin takes the first minimum: the lowest threshold
    return fps[index].double() / fps[-1]


class OODDetection(Metric):
    r"""Out-of-distribution detection quality of one or more scores: AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR.

    Every score must be **higher for in-distribution (ID)** inputs (as :func:`ood_scores` returns them). The scores
    and the OOD flags are kept (list states gathered across processes, ``dist_reduce_fx="cat"``), so the DDP result
    equals the single-process result on the union of the data. With ID as the positive class and :math:`s` a score:

    - ``auroc_<score>``: area under the ROC curve of :math:`s` for ID vs OOD
      (= :math:`P(s_{ID} > s_{OOD}) + \tfrac12 P(s_{ID} = s_{OOD})`);
    - ``aupr_in_<score>``: average precision of :math:`s` with ID positive,
      :math:`\sum_n (R_n - R_{n-1}) P_n` over the distinct thresholds (scikit-learn's ``average_precision_score``);
    - ``aupr_out_<score>``: average precision of :math:`-s` with OOD positive;
    - ``fpr95_<score>``: the fraction of OOD inputs accepted as ID (:math:`s \ge t`) at the threshold :math:`t`
      whose TPR (accepted ID / all ID, in float64) is 95%, chosen among the ROC points (one per distinct score,
      tied inputs accepted together) by ``fpr_convention``:

      * ``"nearest"`` (default): the point whose TPR is **nearest** 95% (it may be below), and of several
        equally near the lowest threshold, i.e. the highest FPR; only points down to the first that accepts every
        ID input count. This is ``fpr_and_fdr_at_recall`` of the JointEnergy and EDGE code (and of Outlier
        Exposure's ``anom_utils``), with ID positive and the score higher for ID, so numbers compare with
        theirs;
      * ``"at_least"``: the highest threshold whose TPR reaches 95%, i.e. the lowest FPR with TPR >= 95%:
        ``fpr[np.searchsorted(tpr, 0.95, side="left")]`` with ``fpr, tpr, _ = roc_curve(is_id, s,
        drop_intermediate=False)`` (scikit-learn); it is never above ``"nearest"`` when the nearest TPR is >= 95%.

      E.g. 20 ID inputs scoring 1, ..., 20 and OOD inputs 10.5, 2.5, 1.5, 0.5: TPR is 19/20 = 95% from t = 2
      down to t = 1.5. ``"at_least"`` takes t = 2 (OOD 10.5 and 2.5 accepted: FPR 0.5), ``"nearest"`` t = 1.5
      (FPR 0.75). With 10 ID inputs, TPR 0.9 is nearer 0.95 than 1.0 is (in float64), so ``"nearest"`` stops at
      9 accepted ID inputs where ``"at_least"`` must accept all 10.

    Ties are handled exactly (the curves have one point per distinct score; no binning). With another
    ``recall_level`` than 0.95 the FPR key is named after it: ``fpr90_<score>`` for 0.9, ``fpr97.5_<score>`` for
    0.975. Without any ID or any OOD input the four values of every score are ``nan``, with a warning (never 0).

    Args:
        score_names: names of the scores, the keys of the dict passed to :meth:`update` (or the column order of a
            ``[N, S]`` tensor); any distinct names, by default :data:`OOD_SCORES`.
        recall_level: the fraction of ID inputs that must be accepted for the FPR, in ``(0, 1]``.
        fpr_convention: ``"nearest"`` (the published multi-label OOD code's) or ``"at_least"`` (see above).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: empty, repeated or non-string ``score_names``, ``recall_level`` outside ``(0, 1]``, or an
            unknown ``fpr_convention``.

    Example:
        >>> metric = OODDetection(["maxlogit"])
        >>> scores = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.5, 0.0])
        >>> is_ood = torch.tensor([0, 0, 1, 0, 1, 1])
        >>> metric.update({"maxlogit": scores}, is_ood)
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'auroc_maxlogit': 0.8333, 'aupr_in_maxlogit': 0.8056, 'aupr_out_maxlogit': 0.8667, 'fpr95_maxlogit': 0.3333}

        The two conventions on the 20-ID-input example above:

        >>> scores = torch.cat([torch.arange(1.0, 21.0), torch.tensor([10.5, 2.5, 1.5, 0.5])])
        >>> is_ood = torch.tensor([0] * 20 + [1] * 4)
        >>> for convention in ("nearest", "at_least"):
        ...     metric = OODDetection(["s"], fpr_convention=convention)
        ...     metric.update(scores, is_ood)
        ...     print(convention, metric.compute()["fpr95_s"].item())
        nearest 0.75
        at_least 0.5
    """

    is_differentiable = False
    full_state_update = False

    scores: list[Tensor]
    is_ood: list[Tensor]

    def __init__(
        self,
        score_names: Sequence[str] = OOD_SCORES,
        recall_level: float = 0.95,
        fpr_convention: str = "nearest",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.score_names = _validate_names(score_names, "score_names")
        if (
            isinstance(recall_level, bool)
            or not isinstance(recall_level, numbers.Real)
            or not math.isfinite(recall_level)
            or not 0 < recall_level <= 1
        ):
            raise ValueError(f"Expected `recall_level` to be a number in (0, 1], got {recall_level!r}")
        self.recall_level = float(recall_level)
        if fpr_convention not in FPR_CONVENTIONS:
            raise ValueError(
                f"Unknown `fpr_convention` {fpr_convention!r}: choose 'nearest' (the TPR nearest `recall_level`, as "
                f"the JointEnergy / EDGE code) or 'at_least' (the first TPR >= `recall_level`, as scikit-learn)"
            )
        self.fpr_convention = fpr_convention
        self.fpr_key = f"fpr{self.recall_level * 100:g}"
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_ood", default=[], dist_reduce_fx="cat")

    def update(self, scores: Union[Mapping[str, Tensor], Tensor], is_ood: Tensor) -> None:
        """Accumulate a batch.

        Args:
            scores: ``{name: [N]}`` with exactly the keys ``score_names`` (e.g. ``ood_scores(logits, names)``), or a
                tensor ``[N, S]`` whose columns follow ``score_names`` (``[N]`` for one score); higher = ID.
            is_ood: ``[N]`` flags, bool or integers in ``{0, 1}``: 1 / True for out-of-distribution inputs.

        Raises:
            ValueError: missing or unexpected score names, wrong shapes or dtypes, ``nan`` scores, or flags other
                than 0 / 1 (the message names them).
        """
        names = self.score_names
        if isinstance(scores, Mapping):
            missing = [n for n in names if n not in scores]
            unexpected = [k for k in scores if k not in names]
            if missing or unexpected:
                raise ValueError(
                    f"Expected `scores` to have exactly the keys `score_names`={names}, missing {missing}, "
                    f"unexpected {unexpected}. HINT: compute them with `ood_scores(logits, metric.score_names)`."
                )
            columns = [scores[n] for n in names]
            for name, column in zip(names, columns):
                if not isinstance(column, Tensor) or column.ndim != 1:
                    detail = f"shape {tuple(column.shape)}" if isinstance(column, Tensor) else type(column).__name__
                    raise ValueError(f"Expected `scores[{name!r}]` to be a 1-D tensor [N], got {detail}")
            if len({c.shape[0] for c in columns}) > 1:
                raise ValueError(f"Expected every score to have the same length, got {[c.shape[0] for c in columns]}")
            scores = torch.stack(columns, dim=1)
        elif isinstance(scores, Tensor):
            if scores.ndim == 1 and len(names) == 1:
                scores = scores[:, None]
            if scores.ndim != 2 or scores.shape[1] != len(names):
                raise ValueError(
                    f"Expected `scores` to be a tensor [N, {len(names)}] (one column per name in {names}), got shape "
                    f"{tuple(scores.shape)}"
                )
        else:
            raise ValueError(f"Expected `scores` to be a dict of tensors or a tensor, got {type(scores).__name__}")
        if not scores.is_floating_point():
            raise ValueError(f"Expected floating-point `scores`, got dtype {scores.dtype}")
        if not isinstance(is_ood, Tensor) or is_ood.ndim != 1 or is_ood.shape[0] != scores.shape[0]:
            detail = f"shape {tuple(is_ood.shape)}" if isinstance(is_ood, Tensor) else type(is_ood).__name__
            raise ValueError(
                f"Expected `is_ood` to be a tensor [N] with N={scores.shape[0]} like the scores, got {detail}"
            )
        if is_ood.dtype != torch.bool:
            bad = (is_ood != 0) & (is_ood != 1)
            if bool(bad.any()):
                values = torch.unique(is_ood[bad])[:5].tolist()
                raise ValueError(f"Expected `is_ood` to hold 0 / 1 (or bool), found {values}")
        nan = torch.isnan(scores)
        if bool(nan.any()):
            bad_names = [n for n, has_nan in zip(names, nan.any(dim=0).tolist()) if has_nan]
            raise ValueError(f"Found nan in the scores {bad_names}. HINT: check the model's logits for nan / overflow.")
        # float32 at least; float64 stays float64 so that its ties are the caller's ties
        self.scores.append(scores.to(torch.promote_types(scores.dtype, torch.float32)))
        self.is_ood.append(is_ood.to(torch.uint8))

    def compute(self) -> dict[str, Tensor]:
        """``auroc_<s>``, ``aupr_in_<s>``, ``aupr_out_<s>``, ``fpr95_<s>`` (0-dim float32) for every score ``s``."""
        keys = ("auroc", "aupr_in", "aupr_out", self.fpr_key)
        if not isinstance(self.scores, list) or self.scores:  # after a DDP sync the states are tensors
            scores, is_ood = dim_zero_cat(self.scores), dim_zero_cat(self.is_ood).bool()
        else:
            scores = torch.zeros(0, len(self.score_names), device=self.device)
            is_ood = torch.zeros(0, dtype=torch.bool, device=self.device)
        num_ood = int(is_ood.sum())
        num_id = is_ood.numel() - num_ood
        if num_id == 0 or num_ood == 0:
            rank_zero_warn(
                f"{type(self).__name__}: {num_id} in-distribution and {num_ood} OOD inputs; AUROC, AUPR and FPR need "
                f"both, so they are nan. HINT: evaluate on a set that mixes ID and OOD inputs (`is_ood`).",
                category=UserWarning,
            )
            nan = torch.tensor(float("nan"), device=scores.device)
            return {f"{key}_{name}": nan.clone() for name in self.score_names for key in keys}
        is_id = (~is_ood).long()
        out: dict[str, Tensor] = {}
        for j, name in enumerate(self.score_names):
            rank = _dense_rank(scores[:, j])  # same order and ties, in [0, 1]: no sigmoid inside torchmetrics
            negated_rank = _dense_rank(-scores[:, j])  # negation is exact: the reversed order, the same ties
            out[f"auroc_{name}"] = binary_auroc(rank, is_id, thresholds=None, validate_args=False).float()
            out[f"aupr_in_{name}"] = binary_average_precision(rank, is_id, thresholds=None, validate_args=False).float()
            out[f"aupr_out_{name}"] = binary_average_precision(
                negated_rank, is_ood.long(), thresholds=None, validate_args=False
            ).float()
            out[f"{self.fpr_key}_{name}"] = _fpr_at_tpr(rank, is_id, self.recall_level, self.fpr_convention).float()
        return out


# ------------------------------------------------------------------------------------ choosing an OE set
def _mean_singular_values(batches: Sequence[Tensor], argument: str) -> Tensor:
    """Mean over the batches of the singular values (decreasing) of each batch's ``[B, features]`` matrix."""
    spectra = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, Tensor) or batch.ndim < 2 or not batch.is_floating_point() or batch.shape[0] < 1:
            detail = f"shape {tuple(batch.shape)}, dtype {batch.dtype}" if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(f"Expected `{argument}[{i}]` to be a floating tensor [B, ...] with B >= 1, got {detail}")
        flat = batch.reshape(batch.shape[0], -1)
        spectra.append(torch.linalg.svdvals(flat.to(torch.promote_types(flat.dtype, torch.float32))))
    lengths = sorted({len(spectrum) for spectrum in spectra})
    if len(lengths) > 1:
        raise ValueError(
            f"The batches of `{argument}` have {lengths} singular values (min(batch size, features)): their spectra "
            f"cannot be averaged. HINT: give every batch the same size, e.g. a DataLoader with drop_last=True."
        )
    return torch.stack(spectra).mean(dim=0)


def oe_dilation_distance(
    id_features: Sequence[Tensor], oe_features: Sequence[Tensor], k: Optional[int] = None
) -> Tensor:
    r"""EDGE's measure of an outlier-exposure (OE) set: how far the singular values of its features are from the
    in-distribution (ID) ones.

    The ``b``-th ID and OE feature batches are paired (as many pairs as the shorter list has batches; the rest
    is unused), each flattened to a matrix ``[B, D]``; with :math:`\sigma(X)` the singular values of :math:`X`
    in decreasing order and :math:`n` pairs:

    .. math::
        \bar\sigma_{ID} = \frac1n \sum_b \sigma(X^{ID}_b),\quad
        \bar\sigma_{OE} = \frac1n \sum_b \sigma(X^{OE}_b),\quad
        d = \big\lVert \bar\sigma_{ID}[{:}k] - \bar\sigma_{OE}[{:}k] \big\rVert_2

    i.e. the paper's dilation distance :math:`\lVert \Sigma^k_{in} - \Sigma^k_{out} \rVert_F` of the top-``k``
    singular values, averaged over batches. ``k=None`` uses all of them: what the reference script (``oe.py`` of
    Yuchen-Sunflower/EDGE) computes in effect. It adds each batch's spectrum into a ``[batch, oe_batch]`` buffer,
    so every row holds the whole spectrum, and reports the norm of the first ``k`` rows: ``sqrt(k)`` times
    ``d(k=None)``, so the same ranking of OE sets for any ``k``. Features are not centred (as there).

    Args:
        id_features: ID feature batches ``[B, ...]`` (e.g. a backbone's pooled features), all of one size.
        oe_features: OE feature batches ``[B, ...]``, all of one size, with as many singular values as the ID ones.
        k: number of leading singular values compared; ``None`` for all.

    Returns:
        ``d``, a 0-dim tensor (float32, or float64 for float64 features).

    Raises:
        ValueError: no pair of batches, a batch that is not a floating tensor ``[B, ...]``, batches with different
            numbers of singular values (the message says to use equal batch sizes), or ``k`` not in
            ``[1, number of singular values]``.

    Example:
        >>> id_batch = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # singular values 3, 1
        >>> oe_batch = torch.tensor([[0.0, 2.0], [2.0, 0.0]])  # 2, 2
        >>> print(f"{oe_dilation_distance([id_batch], [oe_batch]).item():.4f}")  # |(3, 1) - (2, 2)|
        1.4142
        >>> print(f"{oe_dilation_distance([id_batch], [oe_batch], k=1).item():.4f}")  # |3 - 2|
        1.0000
    """
    if isinstance(id_features, Tensor) or isinstance(oe_features, Tensor):
        raise ValueError(
            "Expected `id_features` and `oe_features` to be sequences of feature batches, got a tensor. HINT: pass "
            "[features] for a single batch, or features.split(batch_size) for several."
        )
    pairs = min(len(id_features), len(oe_features))
    if pairs == 0:
        raise ValueError(
            f"Expected at least one ID and one OE feature batch, got {len(id_features)} and {len(oe_features)}"
        )
    mean_id = _mean_singular_values(list(id_features)[:pairs], "id_features")
    mean_oe = _mean_singular_values(list(oe_features)[:pairs], "oe_features")
    if len(mean_id) != len(mean_oe):
        raise ValueError(
            f"The ID batches have {len(mean_id)} singular values and the OE batches {len(mean_oe)}: they cannot be "
            "compared. HINT: use the same batch size for both (the reference uses 64 and 64)."
        )
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= len(mean_id)):
        raise ValueError(f"Expected `k` to be None or an integer in [1, {len(mean_id)}] (singular values), got {k!r}")
    count = len(mean_id) if k is None else int(k)
    mean_oe = mean_oe.to(mean_id.dtype)
    return torch.linalg.vector_norm(mean_id[:count] - mean_oe[:count])


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable) -> list[Tensor]:
    """``model(images)`` of every batch of ``loader`` (in eval mode, on the model's device), as CPU tensors.

    A batch is a tensor of images or a tuple / list whose first entry is (``(images, targets, ...)``). The
    model's training mode is restored afterwards.
    """
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = []
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            out.append(model(images.to(device)).detach().cpu())
        return out
    finally:
        model.train(was_training)


def rank_oe_sets(
    model: nn.Module, id_loader: Iterable, oe_loaders: Mapping[str, Iterable], k: Optional[int] = None
) -> list[tuple[str, float]]:
    """Candidate outlier-exposure sets ordered by :func:`oe_dilation_distance` to the ID data, smallest first.

    The features are ``model``'s outputs (e.g. the backbone's pooled features), from the same ID batches for
    every candidate (the first ones, as many as the candidate has batches). Use loaders with equal batch sizes and
    ``drop_last=True``. A smaller distance means an OE spectrum closer to the ID one.

    Args:
        model: feature extractor ``[B, 3, H, W] -> [B, D]``.
        id_loader: loader of ID images (e.g. the training set, evaluation transform, no shuffling).
        oe_loaders: ``{name: loader}`` of the candidate OE sets.
        k: see :func:`oe_dilation_distance`.

    Returns:
        ``[(name, distance), ...]`` in increasing distance.

    Raises:
        ValueError: no candidate, or the errors of :func:`oe_dilation_distance`.
    """
    if not oe_loaders:
        raise ValueError("Expected at least one candidate in `oe_loaders` ({name: loader})")
    id_features = extract_features(model, id_loader)
    distances = {
        name: float(oe_dilation_distance(id_features, extract_features(model, loader), k))
        for name, loader in oe_loaders.items()
    }
    return sorted(distances.items(), key=lambda item: item[1])
