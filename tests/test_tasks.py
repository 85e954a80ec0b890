import json
from pathlib import Path

import numpy as np
import pydantic
import pytest

from diffuser_graph.tasks import (
    CLS_ID,
    DataError,
    ImageTask,
    ListOpsTask,
    MultiHopTask,
    TextTask,
    collate,
    image,
    listops,
    load_task,
    multihop,
    text,
)
from diffuser_graph.tasks.vocab import decode_bytes

SMALL_LISTOPS = ListOpsTask(max_depth=4, max_args=5, min_length=10, max_length=60,
                            train_size=200, val_size=30, test_size=30)


@pytest.mark.parametrize("expression,value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 [MAX 1 8 ] 5 ]", 3),
    ("[MED 1 2 9 ]", 2),
    ("[MED 1 2 8 9 ]", 5),  # int(np.median) of an even count: (2 + 8) / 2
    ("[MED 1 2 3 9 ]", 2),  # (2 + 3) / 2 = 2.5 -> 2
    ("[SM 7 8 9 ]", 4),
    ("[SM [MAX 9 1 ] [MIN 5 6 ] ]", 4),
    ("7", 7),
])
def test_listops_evaluation_by_hand(expression, value):
    assert listops.evaluate(listops.parse(expression.split())) == value


def test_listops_generator_is_deterministic_and_labels_are_correct():
    data = load_task(SMALL_LISTOPS, seed=3)
    again = load_task(SMALL_LISTOPS, seed=3)
    other = load_task(SMALL_LISTOPS, seed=4)
    assert all(np.array_equal(a, b)
               for a, b in zip(data.train.sequences, again.train.sequences, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(data.train.sequences,
                                                        other.train.sequences, strict=True))
    for ids, label in zip(data.train.sequences, data.train.labels, strict=True):
        assert ids[0] == CLS_ID and 10 <= len(ids) - 1 <= 60
        assert listops.evaluate(listops.parse(listops.decode(ids).split())) == label
    assert data.vocab_size == len(listops.VOCAB) and data.num_labels == 10
    assert len(set(data.train.labels.tolist())) >= 8  # every answer occurs


def test_listops_generator_reports_impossible_lengths():
    task = ListOpsTask(max_depth=2, max_args=2, min_length=50, max_length=60, train_size=2,
                       val_size=1, test_size=1)
    with pytest.raises(ValueError, match="found only 0 of 2 expressions"):
        load_task(task, seed=0)


def write_lra(folder, rows_by_split, header="Source\tTarget"):
    folder.mkdir(exist_ok=True)
    for split, rows in rows_by_split.items():
        lines = [header] + [f"{source}\t{target}" for source, target in rows]
        (folder / listops.LRA_FILES[split]).write_text("\n".join(lines) + "\n")


def test_lra_tsv_fixture_is_read(tmp_path):
    rows = [("( ( [MAX 2 9 ) ( [MIN 4 7 ] ) 0 ] )", 9), ("[SM 7 8 9 ]", 4)]
    write_lra(tmp_path / "lra", {split: rows for split in listops.LRA_FILES})
    data = load_task(ListOpsTask(path=str(tmp_path / "lra")), seed=0)
    assert data.test.labels.tolist() == [9, 4]
    assert listops.decode(data.test.sequences[0]) == "[MAX 2 9 [MIN 4 7 ] 0 ]"


@pytest.mark.parametrize("lines,message", [
    (["Src\tTgt"], ":1: header must be"),
    (["Source\tTarget", "[MAX 1 2 ]"], ":2: expected 2 tab-separated columns"),
    (["Source\tTarget", "[MAX 1 2 ]\tx"], ":2: label must be an integer"),
    (["Source\tTarget", "[MAX 1 2 ]\t12"], ":2: label must be in 0-9"),
    (["Source\tTarget", "[MAX 1 2\t2"], ":2: malformed expression"),
    (["Source\tTarget", "[FOO 1 2 ]\t2"], "unknown token"),
    (["Source\tTarget", "[MAX 1 2 ]\t1"], ":2: label 1 disagrees"),
    (["Source\tTarget"], "no examples"),
    ([], "file is empty"),
])
def test_lra_tsv_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "basic_train.tsv"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError, match=message) as info:
        listops.read_lra_tsv(path)
    assert "basic_train.tsv" in str(info.value)


def test_lra_folder_without_files(tmp_path):
    with pytest.raises(DataError, match="basic_train.tsv: file does not exist"):
        load_task(ListOpsTask(path=str(tmp_path)), seed=0)


def test_text_synthetic_labels_follow_the_cues():
    task = TextTask(train_size=50, val_size=5, test_size=5, synthetic_words=80, max_length=600)
    data = load_task(task, seed=1)
    for ids, label in zip(data.train.sequences, data.train.labels, strict=True):
        words = decode_bytes(ids).split()
        positive = sum(w in text.POSITIVE for w in words)
        negative = sum(w in text.NEGATIVE for w in words)
        assert positive + negative == task.synthetic_cues
        assert label == int(positive > negative)
    assert data.vocab_size == 258 and data.num_labels == 2
    assert 0.2 < data.train.labels.mean() < 0.8


def test_text_readers_csv_jsonl_tsv(tmp_path):
    (tmp_path / "train.csv").write_text('text,label\n"héllo, world",1\nbye,0\n')
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "ok", "label": 2}) + "\n")
    (tmp_path / "test.tsv").write_text("Source\tTarget\nabc\t0\n")
    data = load_task(TextTask(path=str(tmp_path), max_length=5), seed=0)
    assert decode_bytes(data.train.sequences[0]) == "hél"  # 4 bytes after <cls>: h, é (2), l
    assert len(data.train.sequences[0]) == 5
    assert data.num_labels == 3 and data.val.labels.tolist() == [2]
    assert decode_bytes(data.test.sequences[0]) == "abc"


@pytest.mark.parametrize("name,content,message", [
    ("train.csv", "body,label\nx,1\n", ":1: header must name 'text' and 'label'"),
    ("train.csv", "text,label\nx,1,2\n", ":2: expected 2 columns, got 3"),
    ("train.csv", "text,label\nx,good\n", ":2: label must be a non-negative integer"),
    ("train.csv", "text,label\nx,-1\n", ":2: label must be a non-negative integer"),
    ("train.jsonl", '{"text": "x"}\n', ":1: each JSON line needs"),
    ("train.jsonl", "{not json\n", ":1: not valid JSON"),
    ("train.csv", "", "file is empty"),
    ("train.csv", "text,label\n", "file has no examples"),
])
def test_text_reader_errors_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message) as info:
        text.read_file(tmp_path / name, max_length=32)
    assert name in str(info.value)


def test_text_folder_missing_split(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nx,1\n")
    with pytest.raises(DataError, match="no val file found"):
        load_task(TextTask(path=str(tmp_path)), seed=0)


def test_collate_pads_and_masks():
    data = load_task(SMALL_LISTOPS, seed=0)
    batch = collate(data.train, [0, 1, 2])
    lengths = [len(data.train.sequences[i]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][~batch["attention_mask"]] == 0).all()
    assert batch["labels"].tolist() == data.train.labels[:3].tolist()


def test_task_config_errors_name_the_key():
    with pytest.raises(pydantic.ValidationError, match="min_length"):
        ListOpsTask(min_length=100, max_length=50)
    with pytest.raises(pydantic.ValidationError, match="max_dept"):
        ListOpsTask(max_dept=3)


# --- image -----------------------------------------------------------------------------------

def test_digits_are_pixel_sequences_for_the_grid_pattern():
    data = load_task(ImageTask(), seed=0)
    assert data.image_size == (8, 8) and data.vocab_size == 19 and data.num_labels == 10
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert all(len(s) == 64 for s in data.train.sequences)
    assert min(int(s.min()) for s in data.train.sequences) >= 2  # ids 0, 1 stay reserved
    again = load_task(ImageTask(), seed=0)
    assert np.array_equal(again.test.labels, data.test.labels)
    assert not np.array_equal(load_task(ImageTask(), seed=1).test.labels, data.test.labels)


def write_cifar(folder, images_per_batch=4, corrupt=None):
    import pickle

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in (*image.CIFAR_TRAIN, image.CIFAR_TEST):
        batch = {b"data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, images_per_batch))}
        if corrupt == name:
            batch[b"data"] = batch[b"data"][:, :1000]
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar_fixture_in_the_standard_format(tmp_path):
    write_cifar(tmp_path / "cifar")
    data = load_task(ImageTask(source="cifar10", path=str(tmp_path / "cifar"), val_fraction=0.25),
                     seed=0)
    assert data.image_size == (32, 32) and data.vocab_size == 258
    assert len(data.test) == 4 and len(data.train) + len(data.val) == 20 and len(data.val) == 5
    assert all(len(s) == 1024 for s in data.test.sequences)
    # LRA validates on the last images of the training batches, in file order
    import pickle

    last = [pickle.loads((tmp_path / "cifar" / name).read_bytes()) for name in
            ("data_batch_4", "data_batch_5")]
    expected = np.concatenate([last[0][b"data"][-1:], last[1][b"data"]])
    assert [list(s) for s in data.val.sequences] == [
        list(row + image.NUM_SPECIAL) for row in image.to_grey(expected)]
    assert list(data.val.labels) == [last[0][b"labels"][-1], *last[1][b"labels"]]


def tensorflow_grey(r, g, b):
    """tf.image.rgb_to_grayscale on uint8 pixels, step by step in float32: convert_image_dtype
    (x * (1/255)), the weighted sum, convert_image_dtype back (x * 255.5, saturating cast)."""
    f32 = np.float32
    channels = [f32(c) * f32(1.0 / 255) for c in (r, g, b)]
    grey = (channels[0] * f32(0.2989) + channels[1] * f32(0.5870)) + channels[2] * f32(0.1140)
    return int(min(max(grey * f32(255.5), 0), 255))  # int() truncates, as the cast does


def test_grey_levels_are_tensorflows_arithmetic():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (400, 3))
    rgb = np.repeat(pixels.T.astype(np.uint8)[None], 1024, axis=2).reshape(1, 3, 400 * 1024)
    rgb = rgb.reshape(3, 400, 1024).transpose(1, 0, 2).reshape(400, 3072)
    grey = image.to_grey(rgb)[:, 0]
    assert grey.tolist() == [tensorflow_grey(*p) for p in pixels]
    assert image.to_grey(np.full((1, 3072), 255, np.uint8))[0, 0] == 255
    green = np.zeros((1, 3072), np.uint8)
    green[0, 1024:2048] = 255
    assert image.to_grey(green)[0, 0] == 149  # 0.5870 * 255.5 = 149.98, truncated (rounding: 150)
    rounded = np.round(pixels @ np.array([0.2989, 0.5870, 0.1140]))
    assert 0.15 < np.mean(rounded != grey) < 0.35  # about a quarter differ from plain rounding


@pytest.mark.parametrize("problem,message", [
    ("missing", "data_batch_3: file does not exist"),
    ("shape", "data_batch_2: b'data' must be \\(N, 3072\\)"),
    ("labels", "test_batch: labels must be 0-9"),
    ("garbage", "data_batch_1: not a CIFAR-10 python batch"),
])
def test_cifar_errors_name_the_file(tmp_path, problem, message):
    import pickle

    folder = tmp_path / "cifar"
    write_cifar(folder, corrupt="data_batch_2" if problem == "shape" else None)
    if problem == "missing":
        (folder / "data_batch_3").unlink()
    if problem == "labels":
        batch = pickle.loads((folder / "test_batch").read_bytes())
        batch[b"labels"][1] = 11
        (folder / "test_batch").write_bytes(pickle.dumps(batch))
    if problem == "garbage":
        (folder / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=message):
        load_task(ImageTask(source="cifar10", path=str(folder)), seed=0)


def test_cifar_needs_a_path():
    with pytest.raises(pydantic.ValidationError, match="needs path"):
        ImageTask(source="cifar10")


# --- multi-hop probe ---------------------------------------------------------------------------

def test_multihop_by_hand():
    s = lambda x: multihop.FIRST_SYMBOL + x  # noqa: E731
    f, a, q = multihop.FILLER, multihop.ARROW, multihop.QUERY
    sequence = np.array([CLS_ID, s(2), a, s(7), f, s(0), a, s(2), f, s(7), a, s(4), f, q, s(0)])
    assert multihop.answer(sequence) == 4  # 0 -> 2 -> 7 -> 4


def test_multihop_generator_is_correct_and_deterministic():
    task = MultiHopTask(seq_len=128, num_symbols=12, chain=3, distractors=5, train_size=300,
                        val_size=10, test_size=10)
    data = load_task(task, seed=0)
    for sequence, label in zip(data.train.sequences, data.train.labels, strict=True):
        assert len(sequence) == 128 and sequence[0] == CLS_ID
        assert sequence[-2] == multihop.QUERY
        assert int(np.sum(sequence == multihop.ARROW)) == 8  # chain + distractor facts
        assert multihop.answer(sequence) == label
    assert data.num_labels == 12 and data.vocab_size == 17
    assert np.array_equal(load_task(task, seed=0).train.labels, data.train.labels)
    assert 0.02 < np.bincount(data.train.labels, minlength=12).max() / 300 < 0.2


def test_multihop_config_errors():
    with pytest.raises(pydantic.ValidationError, match="num_symbols"):
        MultiHopTask(num_symbols=5, chain=3, distractors=4)
    with pytest.raises(pydantic.ValidationError, match="seq_len"):
        MultiHopTask(seq_len=20, chain=3, distractors=5)


def test_small_probe_is_out_of_one_hop_reach_but_within_diffusion_reach():
    """configs/multihop-small.yaml reads the answer at token 0: two one-hop layers reach few
    positions from there, two layers of K-hop diffusion reach all of them."""
    from diffuser_graph import build_graph, khop_receptive_field
    from diffuser_graph.config import load_config
    from diffuser_graph.train import RunConfig

    config = load_config(Path(__file__).parents[1] / "configs" / "multihop-small.yaml", RunConfig)
    model, n = config.model, config.task.seq_len
    g = build_graph(n, model.pattern)
    hops_to_cls = khop_receptive_field(g, 0, n)
    assert np.mean(hops_to_cls <= model.num_layers) < 0.2
    assert np.all(hops_to_cls <= model.num_layers * model.hops)
