"""vf-lightning: train, align, merge, repair and prune networks without retraining."""

__version__ = "0.1.0"
