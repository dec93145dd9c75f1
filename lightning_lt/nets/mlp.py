"""A small multilayer perceptron backbone (flattens its input)."""

import math
import numbers
from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Multilayer perceptron feature extractor: ``Flatten -> [Linear -> ReLU -> Dropout] x len(hidden_features)``.

    Meant for tabular data and quick experiments (e.g. the 8 x 8 digits quickstart). With an empty
    ``hidden_features`` it only flattens, and ``num_features = in_features``.

    Args:
        in_features: size of the flattened input.
        hidden_features: width of each hidden layer; the last one is ``num_features``.
        dropout: dropout probability after each ReLU (0 disables it).

    Raises:
        ValueError: non-positive sizes or ``dropout`` outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> net = MLP(in_features=64, hidden_features=(32, 16))
        >>> net.num_features, tuple(net(torch.zeros(5, 1, 8, 8)).shape)
        (16, (5, 16))
    """

    def __init__(
        self, in_features: int = 64, hidden_features: Sequence[int] = (128, 128), dropout: float = 0.0
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden_features]
        names = ["in_features"] + [f"hidden_features[{i}]" for i in range(len(hidden_features))]
        for name, size in zip(names, sizes):
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, got {size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)
        self.in_features = int(in_features)
        self.num_features = int(sizes[-1])

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, num_features]`` of inputs ``[B, ...]`` with ``in_features`` elements per sample."""
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(
                f"Expected inputs with {self.in_features} elements per sample (`in_features`), "
                f"got shape {tuple(x.shape)}"
            )
        return self.layers(x)
