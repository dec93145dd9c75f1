"""Out-of-distribution scores for multi-label logits, and OOD-detection metrics (AUROC, AUPR, FPR95)."""

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
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


def _fpr_at_tpr(score: Tensor, positive: Tensor, recall_level: float) -> Tensor:
    """FPR at the highest threshold whose TPR reaches ``recall_level``: scikit-learn's ROC points
    (``roc_curve(..., drop_intermediate=False)``, one per distinct score, ties together) computed from exact counts,
    then ``fpr[searchsorted(tpr, recall_level, side="left")]``. Needs a positive and a negative sample."""
    order = torch.argsort(score, descending=True, stable=True)
    score, positive = score[order], positive[order].long()
    end = torch.tensor([score.numel() - 1], device=score.device)
    last_of_tie = torch.cat([torch.nonzero(score[1:] != score[:-1]).flatten(), end])
    zero = last_of_tie.new_zeros(1)
    tps = torch.cat([zero, positive.cumsum(0)[last_of_tie]])  # positives with score >= threshold
    fps = torch.cat([zero, last_of_tie + 1]) - tps
    tpr = tps.double() / tps[-1]
    fpr = fps.double() / fps[-1]
    index = torch.searchsorted(tpr, torch.tensor([recall_level], dtype=torch.float64, device=tpr.device), side="left")
    return fpr[index[0]]


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
    - ``fpr95_<score>``: the fraction of OOD inputs accepted as ID (:math:`s \ge t`) at the highest threshold
      :math:`t` that accepts at least 95% of the ID inputs. On scikit-learn's ROC points (one per distinct score,
      tied inputs accepted together) this is ``fpr[np.searchsorted(tpr, 0.95, side="left")]`` with
      ``fpr, tpr, _ = roc_curve(is_id, s, drop_intermediate=False)``: TPR is computed in float64 as
      ``accepted ID / all ID``, so 19 of 20 ID inputs count as 95%.

    Ties are handled exactly as scikit-learn does (the curves have one point per distinct score; no binning).
    With another ``recall_level`` than 0.95 the FPR key is named after it: ``fpr90_<score>`` for 0.9,
    ``fpr97.5_<score>`` for 0.975. Without any ID or any OOD input the four values of every score are ``nan``,
    with a warning (never 0).

    Args:
        score_names: names of the scores, the keys of the dict passed to :meth:`update` (or the column order of a
            ``[N, S]`` tensor); any distinct names, by default :data:`OOD_SCORES`.
        recall_level: the fraction of ID inputs that must be accepted for the FPR, in ``(0, 1]``.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: empty, repeated or non-string ``score_names``, or ``recall_level`` outside ``(0, 1]``.

    Example:
        >>> metric = OODDetection(["maxlogit"])
        >>> scores = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.5, 0.0])
        >>> is_ood = torch.tensor([0, 0, 1, 0, 1, 1])
        >>> metric.update({"maxlogit": scores}, is_ood)
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'auroc_maxlogit': 0.8333, 'aupr_in_maxlogit': 0.8056, 'aupr_out_maxlogit': 0.8667, 'fpr95_maxlogit': 0.3333}
    """

    is_differentiable = False
    full_state_update = False

    scores: list[Tensor]
    is_ood: list[Tensor]

    def __init__(self, score_names: Sequence[str] = OOD_SCORES, recall_level: float = 0.95, **kwargs: Any) -> None:
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
            out[f"{self.fpr_key}_{name}"] = _fpr_at_tpr(rank, is_id, self.recall_level).float()
        return out
