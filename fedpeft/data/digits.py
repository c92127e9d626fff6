"""Bundled offline data set ``digits``: scikit-learn's 8x8 handwritten digits, 10 classes.

scikit-learn ships the 1,797 images of the UCI optical digits set inside its wheel, so
this image set needs no download. Pixels (0..16 in the source) are stored as floats in
[0, 1]; a task's collate function upscales them to the model's image size.
"""

from __future__ import annotations

import numpy as np

DIGIT_NAMES = [str(d) for d in range(10)]
DIGITS_TEST_SIZE = 360  # a fifth of the 1,797 images, 36 per class


def read_digits() -> tuple[np.ndarray, list[int]]:
    """Return (images of shape (1797, 8, 8) in [0, 1] as float32, labels 0..9)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    return images, [int(y) for y in bunch.target]
