"""The scikit-learn handwritten digits: 1,797 real 8x8 images that ship inside the wheel (no download)."""

from __future__ import annotations

import numpy as np

from .examples import LabelledExamples

__all__ = ["load_digits_examples"]


def load_digits_examples() -> LabelledExamples:
    """1,797 digits: images uint8 [1797, 8, 8] in 0..255, labels 0..9, class_names "0".."9", sources "digits#i"."""
    from sklearn.datasets import load_digits  # local: sklearn is slow to import and only needed here

    bunch = load_digits()
    # Pixel values are 0..16; *16 maps them onto 0..256, and the single top value is clipped to 255.
    images = np.clip(np.asarray(bunch.images) * 16.0, 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return LabelledExamples(
        labels=labels,
        class_names=tuple(str(i) for i in range(10)),
        sources=tuple(f"digits#{i}" for i in range(labels.size)),
        images=images,
    )
