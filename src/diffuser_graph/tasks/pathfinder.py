"""Pathfinder (LRA): are the two dots joined by one dashed path? A Pathfinder-style generator of
our own, or LRA's released images.

With ``path`` the task reads LRA's released files for one resolution and difficulty (for
example ``lra_release/pathfinder32/curv_contour_length_14``): ``metadata/<n>.npy`` text files
whose lines are ``<image folder> <file name> <index> <label> ...`` and the PNG images they name
(``imgs/<n>/sample_<k>.png``). Examples are taken in the order of the metadata files (by number)
and their lines and cut 80/10/10 into train / val / test. LRA cuts the same proportions of a
TFDS dataset, whose order is its own, so the examples in each split differ from LRA's.
Without ``path``, the generator below draws the images (its numbers are not LRA Pathfinder's:
other paths, contrast, lengths and markers):

Every image (``size`` x ``size`` grey levels, 0 background, 255 ink) holds two long dashed,
smoothly curving paths of ``path_length`` pixels and ``distractors`` shorter ones. Two dots
(3x3 squares) mark path ends: for label 1 both ends of the same path, for label 0 one end of
each long path. Both classes draw the same amount of ink, so only following a path answers.
Longer paths are harder: the dots lie further apart along the curve.

Paths are random walks with unit steps whose heading turns by at most ``max_turn`` degrees per
step; ``dash`` pixels are inked then ``gap`` skipped. A path is redrawn if it leaves the image
or comes within three pixels of another path (gaps included), so paths never touch or cross and
the label is exactly "same connected curve". Pixels are tokens (grey level + 2) in row-major
order, as in the image task, for the 2-D ``grid`` pattern.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..checks import Float, Int, UserPath
from ..io import read_text
from .base import DataError, Split, TaskData, check_folder
from .vocab import NUM_SPECIAL

INK = 255
SEPARATION = 3  # paths stay > 3 pixels apart, so even two dots (3x3) never touch
MAX_TRIES = 20  # walks tried per path before the whole image is started again
TURNS_PER_STEP = 8  # random turns tried at each step before a walk is stuck
MAX_RESTARTS = 50  # whole images started again before the config is declared impossible


class PathfinderTask(BaseModel):
    """Config of the Pathfinder generator (``task: {name: pathfinder, ...}``)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["pathfinder"] = "pathfinder"
    path: UserPath | None = None  # LRA's released files (see above); None: generate
    size: Int = Field(default=32, ge=8)  # image side in pixels; sequences are size**2 tokens
    path_length: Int = Field(default=30, ge=4)  # pixels along each long path (difficulty)
    distractors: Int = Field(default=2, ge=0)  # extra paths without dots
    distractor_length: Int | None = Field(default=None, ge=2)  # None: path_length // 2
    dash: Int = Field(default=2, ge=1)  # inked pixels per dash
    gap: Int = Field(default=1, ge=0)  # skipped pixels between dashes (0: solid lines)
    max_turn: Float = Field(default=30.0, ge=0, le=90)  # degrees of heading change per step
    train_size: Int = Field(default=8000, ge=1)
    val_size: Int = Field(default=1000, ge=1)
    test_size: Int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> PathfinderTask:
        if self.path is None and self.path_length > 2 * self.size:  # the generator's limit
            raise ValueError(f"path_length ({self.path_length}) must be at most 2 * size "
                             f"({2 * self.size}) so that paths fit in the image")
        return self

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.size, self.size)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within Chebyshev distance ``radius`` of ``mask``."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, structure=np.ones((2 * radius + 1,) * 2, dtype=bool))


def grow_path(free: np.ndarray, length: int, max_turn: float,
              rng: np.random.Generator) -> np.ndarray | None:
    """Pixels ``(length, 2)`` (row, col) of a unit-step walk through ``free`` pixels whose
    heading turns by at most ``max_turn`` degrees per step; None if it gets stuck."""
    starts = np.argwhere(free)
    if not len(starts):
        return None
    position = starts[rng.integers(len(starts))].astype(np.float64)
    heading = rng.uniform(0, 2 * np.pi)
    points = [position]
    for _ in range(length - 1):
        turns = np.radians(rng.uniform(-max_turn, max_turn, size=TURNS_PER_STEP))
        steps = position + np.stack([np.sin(heading + turns), np.cos(heading + turns)], axis=1)
        rows, cols = np.round(steps).astype(np.int64).T
        inside = (rows >= 0) & (rows < free.shape[0]) & (cols >= 0) & (cols < free.shape[1])
        ok = np.flatnonzero(inside)[free[rows[inside], cols[inside]]]
        if not len(ok):
            return None
        position, heading = steps[ok[0]], heading + turns[ok[0]]
        points.append(position)
    return np.round(np.array(points)).astype(np.int64)


def place_path(occupied: np.ndarray, length: int, max_turn: float, margin: int,
               rng: np.random.Generator) -> np.ndarray | None:
    """A walk ``margin`` pixels inside the image that keeps ``SEPARATION`` empty pixels from
    ``occupied``; None if ``MAX_TRIES`` walks all get stuck."""
    free = ~dilate(occupied, SEPARATION)
    free[:margin], free[-margin:], free[:, :margin], free[:, -margin:] = False, False, False, False
    for _ in range(MAX_TRIES):
        points = grow_path(free, length, max_turn, rng)
        if points is not None:
            return points
    return None


def ink_path(image: np.ndarray, points: np.ndarray, dash: int, gap: int) -> None:
    """Ink every pixel of the walk whose step lies in a dash (the walk's ends always do)."""
    inked = (np.arange(len(points)) % (dash + gap)) < dash
    inked[[0, -1]] = True
    image[points[inked, 0], points[inked, 1]] = INK


def ink_dot(image: np.ndarray, point: np.ndarray) -> None:
    row, col = point
    image[row - 1:row + 2, col - 1:col + 2] = INK


def make_example(task: PathfinderTask, label: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """One ``(size, size)`` uint8 image with answer ``label``, and its paths (long ones first)."""
    lengths = [task.path_length] * 2 + [task.distractor_length or max(2, task.path_length // 2)
                                        ] * task.distractors
    for _ in range(MAX_RESTARTS):
        occupied = np.zeros(task.image_size, dtype=bool)
        paths = []
        for length in lengths:
            points = place_path(occupied, length, task.max_turn, margin=1, rng=rng)
            if points is None:
                break
            occupied[points[:, 0], points[:, 1]] = True
            paths.append(points)
        if len(paths) == len(lengths):
            break
    else:
        raise ValueError(f"cannot fit {len(lengths)} separate paths of {lengths} pixels in a "
                         f"{task.size}x{task.size} image; use fewer distractors, shorter paths "
                         f"or a larger size")
    image = np.zeros(task.image_size, dtype=np.uint8)
    for points in paths:
        ink_path(image, points, task.dash, task.gap)
    first, second = paths[0], paths[1]
    dots = (first[0], first[-1]) if label == 1 else (first[rng.integers(2) * -1],
                                                     second[rng.integers(2) * -1])
    for dot in dots:
        ink_dot(image, dot)
    return image, paths


def generate(task: PathfinderTask, size: int, rng: np.random.Generator) -> Split:
    """``size`` images, labels balanced and shuffled."""
    labels = rng.permutation(np.arange(size) % 2)
    images = [make_example(task, int(label), rng)[0] for label in labels]
    return Split([image.ravel().astype(np.int64) + NUM_SPECIAL for image in images], labels)


def to_image(ids: np.ndarray, size: int) -> np.ndarray:
    """Token ids ``(size * size,)`` back to the ``(size, size)`` grey-level image."""
    return (np.asarray(ids) - NUM_SPECIAL).reshape(size, size)


LRA_SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def read_lra(folder: Path, size: int) -> dict[str, Split]:
    """LRA's released Pathfinder files in ``folder`` (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    metadata = check_folder(folder / "metadata")
    files = sorted(metadata.glob("*.npy"), key=lambda f: (not f.stem.isdigit(),
                                                          int(f.stem) if f.stem.isdigit() else 0,
                                                          f.name))
    if not files:
        raise DataError(metadata, None, "holds no metadata files (<n>.npy)")
    images, labels = [], []
    for file in files:
        for number, line in enumerate(read_text(file).splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise DataError(file, number, "expected '<folder> <file> <index> <label 0/1>"
                                              f" ...', got {line[:80]!r}")
            image_path = folder / fields[0] / fields[1]
            try:
                with Image.open(image_path) as picture:
                    pixels = np.asarray(picture.convert("L"), dtype=np.int64)
            except (FileNotFoundError, UnidentifiedImageError) as err:
                raise DataError(file, number, f"cannot read {image_path}: {err}") from None
            if pixels.shape != (size, size):
                raise DataError(image_path, None, f"is {pixels.shape[1]}x{pixels.shape[0]} "
                                                  f"pixels; task.size is {size}")
            images.append(pixels.ravel() + NUM_SPECIAL)
            labels.append(int(fields[3]))
    splits, start = {}, 0
    for name, fraction in LRA_SPLITS:
        stop = len(labels) if name == "test" else start + int(round(fraction * len(labels)))
        splits[name] = Split(images[start:stop], np.asarray(labels[start:stop], dtype=np.int64))
        start = stop
    empty = [name for name, split in splits.items() if not len(split)]
    if empty:
        raise DataError(folder, None, f"{len(labels)} examples leave the {empty} split empty")
    return splits


def load(task: PathfinderTask, seed: int) -> TaskData:
    if task.path is not None:
        splits = read_lra(Path(task.path), task.size)
    else:
        rng = np.random.default_rng([seed, 0x9A7F])
        splits = {name: generate(task, getattr(task, f"{name}_size"), rng)
                  for name in ("train", "val", "test")}
    return TaskData.from_splits(splits, vocab_size=256 + NUM_SPECIAL, num_labels=2,
                                image_size=task.image_size)
