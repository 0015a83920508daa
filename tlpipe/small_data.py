"""What changes where the data are small: whether the validation split is big enough to decide anything.

Validation decides the head only where it holds `train.min_val_per_class` images per class on average
(`validation_decides`). Where it is smaller, the head (params.yaml `train.head`) is fitted on train + val: the
Keras head for the median number of epochs early stopping kept across cross-validation's folds, the linear
probe as always. Calibration then comes from cross-validation's out-of-fold probabilities instead of val
(tlpipe.evaluation.held_out_calibration), and fine-tuning is not shipped: nothing held out could show that it
is not worse.
"""

from __future__ import annotations

import numpy as np


def validation_decides(y_val: np.ndarray, n_classes: int, min_val_per_class: int) -> bool:
    """Whether the validation split is big enough to early-stop, calibrate and judge fine-tuning on."""
    return len(y_val) >= min_val_per_class * n_classes


def small_validation_reason(y_val: np.ndarray, n_classes: int, min_val_per_class: int) -> str:
    return (
        f"the validation split has {len(y_val)} images for {n_classes} classes "
        f"({len(y_val) / n_classes:.1f} per class, under train.min_val_per_class: {min_val_per_class})"
    )


def median_epochs(best_epochs: list[int]) -> int:
    """The number of epochs to train for without early stopping: the median of those cross-validation's folds
    kept (rounded up, at least 1)."""
    return max(1, int(np.ceil(np.median(best_epochs))))
