"""A dataset of one's own for FedHQ: ``dataset: examples.stripes_data:load``.

The loader returns ``(x_train, y_train, x_test, y_test)`` or a dict with those keys and
``classes``: images as (N, C, H, W) or (N, H, W) arrays (uint8 or float), labels as integers
0..K-1. It is passed ``data_dir`` and ``seed`` if its signature names them. FedHQ standardises
the images per channel with the train statistics (the exported ONNX file records them).

This one draws noisy 12x12 images of three stripe orientations, so it runs anywhere.
"""
from __future__ import annotations

import numpy as np

CLASSES = ("horizontal", "vertical", "diagonal")


def _images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(CLASSES), n)
    x = rng.normal(0.0, 0.35, (n, 12, 12)).astype(np.float32)
    idx = np.arange(12)
    for i, label in enumerate(y):
        k = rng.integers(0, 12)
        if label == 0:
            x[i, k, :] += 2.0
        elif label == 1:
            x[i, :, k] += 2.0
        else:
            x[i, idx, (idx + k) % 12] += 2.0
    return x, y.astype(np.int64)


def load(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x_train, y_train = _images(2400, rng)
    x_test, y_test = _images(300, rng)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "classes": list(CLASSES)}


def one_class(seed: int = 0):
    """What FedHQ refuses in one line: a train split with a single class."""
    x, _ = _images(50, np.random.default_rng(seed))
    return x, np.zeros(50, dtype=np.int64), x, np.zeros(50, dtype=np.int64)
