"""Image classification with pixels as tokens (LRA "Image"), for the 2-D grid pattern.

Each pixel's grey level is a token and an image of H x W pixels is a sequence of H*W tokens in
row-major order, with no extra token, so ``PatternSpec(kind="grid", image_size=(H, W))`` applies
directly (use ``pooling: mean``). Sources:

- ``digits`` (the default): scikit-learn's bundled 8x8 handwritten digits (1,797 images, grey
  levels 0-16), split deterministically from the seed.
- ``cifar10``: CIFAR-10's python pickle batches (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``) from ``path``, converted to 32x32 grey levels 0-255 with LRA's arithmetic
  (:func:`to_grey`); the validation split is the last ``val_fraction`` of the training images in
  file order, as LRA's (its ``train[:90%]`` / ``train[90%:]``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..checks import Float, UserPath
from .base import DataError, Split, TaskData, check_folder
from .vocab import NUM_SPECIAL

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_SIDE = 32


class ImageTask(BaseModel):
    """Config of pixel-sequence image classification (``task: {name: image, ...}``)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["image"] = "image"
    source: Literal["digits", "cifar10"] = "digits"
    path: UserPath | None = None  # folder of the CIFAR-10 python batches
    val_fraction: Float = Field(default=0.1, gt=0, lt=1)
    test_fraction: Float = Field(default=0.2, gt=0, lt=1)  # digits only: CIFAR has a test batch

    @model_validator(mode="after")
    def _source_needs(self) -> ImageTask:
        if self.source == "cifar10" and self.path is None:
            raise ValueError("source 'cifar10' needs path: the folder with data_batch_1..5 and "
                             "test_batch")
        if self.source == "digits" and self.path is not None:
            raise ValueError(f"path ({self.path}) is only read with source: cifar10; the digits "
                             f"are built in (set source: cifar10, or leave path out)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


def image_size(task: ImageTask) -> tuple[int, int]:
    return (8, 8) if task.source == "digits" else (CIFAR_SIDE, CIFAR_SIDE)


GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)  # tf.image.rgb_to_grayscale


def to_grey(rgb_rows: np.ndarray) -> np.ndarray:
    """CIFAR rows ``(N, 3072)`` (R plane, G plane, B plane) -> ``(N, 1024)`` grey levels 0-255.

    TensorFlow's ``rgb_to_grayscale`` on uint8 images, as LRA runs it, in float32 throughout:
    channels scaled by 1/255, the weighted sum, then back to uint8 by multiplying by 255.5 and
    truncating (``convert_image_dtype``).
    """
    planes = rgb_rows.reshape(-1, 3, CIFAR_SIDE * CIFAR_SIDE).astype(np.float32)
    scaled = planes * np.float32(1.0 / 255)
    grey = (scaled[:, 0] * GREY_WEIGHTS[0] + scaled[:, 1] * GREY_WEIGHTS[1]
            + scaled[:, 2] * GREY_WEIGHTS[2])
    return np.clip(grey * np.float32(255.5), 0, 255).astype(np.uint8).astype(np.int64)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (grey pixels ``(N, 1024)``, labels ``(N,)``)."""
    if not path.is_file():
        raise DataError(path, None, "file does not exist")
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(path, None, f"not a CIFAR-10 python batch: {err}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(path, None, "a CIFAR-10 batch is a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
        raise DataError(path, None, f"b'data' must be (N, 3072) for 32x32 RGB images, got "
                                    f"{data.shape}")
    if len(labels) != len(data) or len(data) == 0:
        raise DataError(path, None, f"{len(data)} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        raise DataError(path, None, f"labels must be 0-9; image {bad[0]} has {labels[bad[0]]}")
    return to_grey(data), labels


def _split(pixels: np.ndarray, labels: np.ndarray, fractions: tuple[float, float],
           rng: np.random.Generator) -> dict[str, Split]:
    """Shuffle once and cut into train / val / test by ``(val_fraction, test_fraction)``."""
    order = rng.permutation(len(labels))
    n_val, n_test = (int(round(f * len(labels))) for f in fractions)
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test],
             "train": order[n_val + n_test:]}
    return {name: Split([pixels[i] + NUM_SPECIAL for i in index], labels[index])
            for name, index in parts.items()}


def load(task: ImageTask, seed: int) -> TaskData:
    rng = np.random.default_rng([seed, 0x1A6E])
    if task.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = digits.data.astype(np.int64)
        splits = _split(pixels, digits.target.astype(np.int64),
                        (task.val_fraction, task.test_fraction), rng)
        levels = 17
    else:
        assert task.path is not None  # required for cifar10 by the config validator
        folder = check_folder(Path(task.path))
        batches = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN]
        pixels = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        first_val = len(labels) - int(round(task.val_fraction * len(labels)))
        splits = {name: Split([row + NUM_SPECIAL for row in pixels[part]], labels[part])
                  for name, part in (("train", slice(0, first_val)),
                                     ("val", slice(first_val, None)))}
        test_pixels, test_labels = read_cifar_batch(folder / CIFAR_TEST)
        splits["test"] = Split([row + NUM_SPECIAL for row in test_pixels], test_labels)
        levels = 256
    return TaskData.from_splits(splits, vocab_size=levels + NUM_SPECIAL, num_labels=10,
                                image_size=image_size(task))
