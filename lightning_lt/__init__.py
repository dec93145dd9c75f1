"""lightning-lt: PyTorch Lightning plugins for long-tailed and class-imbalanced learning."""

__version__ = "0.1.0"
