import numpy as np
import pydantic
import pytest
from scipy import ndimage

from diffuser_graph.tasks import PathfinderTask, load_task, pathfinder
from diffuser_graph.tasks.vocab import NUM_SPECIAL

SMALL = PathfinderTask(size=16, path_length=14, distractors=1, train_size=40, val_size=10,
                       test_size=10)
EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def test_dashes_by_hand():
    image = np.zeros((3, 10), dtype=np.uint8)
    straight = np.array([(1, col) for col in range(1, 9)])
    pathfinder.ink_path(image, straight, dash=2, gap=1)
    assert np.flatnonzero(image[1]).tolist() == [1, 2, 4, 5, 7, 8]  # steps 0,1 3,4 6,7
    image[:] = 0
    pathfinder.ink_path(image, straight[:6], dash=2, gap=2)
    assert np.flatnonzero(image[1]).tolist() == [1, 2, 5, 6]  # the last step is always inked
    assert not image[[0, 2]].any()


def dots_connected(image: np.ndarray, paths: list) -> bool:
    """Independent answer: are the two 3x3 dots in one 8-connected blob of ink?"""
    components, _ = ndimage.label(image > 0, structure=EIGHT_NEIGHBOURS)
    dot_pixels = ndimage.binary_erosion(image > 0, structure=EIGHT_NEIGHBOURS)  # dot centres
    labels = set(components[dot_pixels].tolist())
    assert dot_pixels.sum() == 2, "exactly two dot centres expected"
    return len(labels) == 1


@pytest.mark.parametrize("seed", range(3))
def test_labels_are_whether_the_dots_are_joined(seed):
    rng = np.random.default_rng(seed)
    task = SMALL.model_copy(update={"gap": 0})  # solid paths: ink connectivity is the answer
    for label in [0, 1] * 20:
        image, paths = pathfinder.make_example(task, label, rng)
        assert dots_connected(image, paths) == bool(label)
        assert len(paths) == 3 and [len(p) for p in paths] == [14, 14, 7]


def test_dashed_paths_never_touch_and_the_dots_sit_on_path_ends():
    rng = np.random.default_rng(0)
    for label in [0, 1] * 20:
        image, paths = pathfinder.make_example(SMALL, label, rng)
        for i, a in enumerate(paths):  # different paths keep more than 3 pixels apart
            for b in paths[i + 1:]:
                assert np.abs(a[:, None] - b[None]).max(axis=-1).min() > 3
        ends = [tuple(p[e]) for p in paths[:2] for e in (0, -1)]
        centres = [tuple(c) for c in np.argwhere(
            ndimage.binary_erosion(image > 0, structure=EIGHT_NEIGHBOURS))]
        assert len(centres) == 2 and set(centres) <= set(ends)
        same_path = {centres[0], centres[1]} in ({ends[0], ends[1]}, {ends[2], ends[3]})
        assert same_path == bool(label)
        on_paths = np.zeros_like(image, dtype=bool)
        for p in paths:
            on_paths[p[:, 0], p[:, 1]] = True
        assert not (image.astype(bool) & ~ndimage.binary_dilation(on_paths, EIGHT_NEIGHBOURS)).any()


def test_generator_is_deterministic_balanced_and_fair():
    data = load_task(SMALL, seed=1)
    again, other = load_task(SMALL, seed=1), load_task(SMALL, seed=2)
    assert all(np.array_equal(a, b)
               for a, b in zip(data.train.sequences, again.train.sequences, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(data.train.sequences,
                                                        other.train.sequences, strict=True))
    assert data.image_size == (16, 16) and data.num_labels == 2
    assert data.vocab_size == 256 + NUM_SPECIAL
    assert np.bincount(data.train.labels).tolist() == [20, 20]
    images = np.stack([pathfinder.to_image(s, 16) for s in data.train.sequences])
    assert set(np.unique(images)) == {0, 255}
    ink = (images > 0).sum(axis=(1, 2))
    by_label = [ink[data.train.labels == k].mean() for k in (0, 1)]
    assert abs(by_label[0] - by_label[1]) < 0.1 * by_label[0]  # the ink does not give it away


def test_impossible_configs_are_refused():
    with pytest.raises(pydantic.ValidationError, match="path_length"):
        PathfinderTask(size=8, path_length=20)
    crowded = PathfinderTask(size=8, path_length=12, distractors=6)
    with pytest.raises(ValueError, match=r"cannot fit 8 separate paths .* 8x8 image"):
        pathfinder.make_example(crowded, 1, np.random.default_rng(0))
