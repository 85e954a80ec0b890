import numpy as np
import pydantic
import pytest
from scipy import ndimage

from diffuser_graph.io import DataError
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


def write_lra_pathfinder(folder, count=10, size=8):
    """A small fixture in the layout of LRA's release: metadata/<n>.npy text lines naming
    imgs/<n>/sample_<k>.png and the label."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for index in range(count):
        part = index // 4  # four images per metadata file, as the release groups them
        (folder / "imgs" / str(part)).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / "imgs" / str(part) / f"sample_{index}.png")
        images.append(pixels)
        labels.append(int(rng.integers(0, 2)))
    (folder / "metadata").mkdir()
    for part in range((count + 3) // 4):
        lines = [f"imgs/{part} sample_{i}.png {i} {labels[i]} 6 0.9"
                 for i in range(part * 4, min(count, part * 4 + 4))]
        (folder / "metadata" / f"{part}.npy").write_text("\n".join(lines) + "\n")
    return images, labels


def test_lra_release_is_read_in_metadata_order_and_cut_80_10_10(tmp_path):
    images, labels = write_lra_pathfinder(tmp_path / "pf", count=20)
    (tmp_path / "pf" / "metadata" / "10.npy").write_text("")  # sorted by number, not by name
    data = load_task(PathfinderTask(path=str(tmp_path / "pf"), size=8), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (16, 2, 2)
    order = [*data.train.sequences, *data.val.sequences, *data.test.sequences]
    assert all(np.array_equal(ids - NUM_SPECIAL, image.ravel()) for ids, image in
               zip(order, images, strict=True))
    assert [*data.train.labels, *data.val.labels, *data.test.labels] == labels
    assert data.image_size == (8, 8)


@pytest.mark.parametrize("problem,message", [
    ("label", r"metadata/0.npy:2: expected '<folder> <file> <index> <label 0/1> \.\.\.'"),
    ("missing", r"metadata/0.npy:1: cannot read .*sample_0.png"),
    ("size", r"sample_0.png: is 8x8 pixels; task.size is 16"),
    ("no metadata", r"metadata: folder does not exist"),
])
def test_lra_release_errors_name_the_file_and_line(tmp_path, problem, message):
    folder = tmp_path / "pf"
    write_lra_pathfinder(folder)
    size = 8
    if problem == "label":
        meta = folder / "metadata" / "0.npy"
        lines = meta.read_text().splitlines()
        lines[1] = "imgs/0 sample_1.png 1 yes"
        meta.write_text("\n".join(lines))
    elif problem == "missing":
        (folder / "imgs" / "0" / "sample_0.png").unlink()
    elif problem == "size":
        size = 16
    else:
        import shutil

        shutil.rmtree(folder / "metadata")
    with pytest.raises(DataError, match=message):
        load_task(PathfinderTask(path=str(folder), size=size), seed=0)
