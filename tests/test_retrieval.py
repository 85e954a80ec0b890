from collections import Counter

import numpy as np
import pydantic
import pytest
import torch

from diffuser_graph import DiffuserConfig, DiffuserForMatching
from diffuser_graph.tasks import DataError, RetrievalTask, collate, load_task, retrieval
from diffuser_graph.tasks.vocab import decode_bytes

SMALL = RetrievalTask(num_topics=5, topic_words=2, words=30, cues=3, noise_cues=2,
                      train_size=60, val_size=10, test_size=10)
LEXICON = [["alpha", "beta"], ["gamma", "delta"], ["kappa", "omega"], ["sigma", "theta"],
           ["rho", "zeta"]]


def topic_by_hand(text: str) -> int:
    """The topic whose words occur most often (ties impossible by construction)."""
    counts = Counter(next(t for t, words in enumerate(LEXICON) if w in words)
                     for w in text.split() if any(w in words for words in LEXICON))
    (best, n), *rest = counts.most_common()
    assert not rest or rest[0][1] < n
    return best


def test_synthetic_pairs_are_related_exactly_when_topics_agree():
    split = retrieval.generate(SMALL, LEXICON, 200, np.random.default_rng(0))
    assert np.bincount(split.labels).tolist() == [100, 100]
    for first, second, label in zip(split.sequences, split.pairs, split.labels, strict=True):
        a, b = decode_bytes(first), decode_bytes(second)
        assert len(a.split()) == len(b.split()) == 30
        assert (topic_by_hand(a) == topic_by_hand(b)) == bool(label)
        assert topic_by_hand(a) == retrieval.document_topic(a, LEXICON)


def test_generator_is_deterministic_and_builds_a_matching_task():
    data = load_task(SMALL, seed=4)
    again, other = load_task(SMALL, seed=4), load_task(SMALL, seed=5)
    assert data.head == "matching" and data.num_labels == 2
    same = [np.array_equal(a, b) for a, b in zip(data.train.pairs, again.train.pairs, strict=True)]
    other_seed = [np.array_equal(a, b)
                  for a, b in zip(data.train.pairs, other.train.pairs, strict=True)]
    assert all(same) and not all(other_seed)
    lexicon = retrieval.topic_lexicon(SMALL, np.random.default_rng(0))
    words = [w for topic in lexicon for w in topic]
    assert len(set(words)) == 10 and not set(words) & set(retrieval.FILLER)
    batch = collate(data.train, [0, 1, 2])
    assert batch["input_ids_2"].shape[0] == 3 and batch["attention_mask_2"].dtype == torch.bool


def write_tsv(folder, rows, name="new_aan_pairs.{}.tsv"):
    folder.mkdir(exist_ok=True)
    for split in ("train", "eval", "test"):
        (folder / name.format(split)).write_text("".join("\t".join(r) + "\n" for r in rows))


def test_lra_tsv_fixture_is_read(tmp_path):
    rows = [("1.0", "P01-1001", "P02-2002", "a paper on parsing", "parsing, \"again\""),
            ("0", "P03-3003", "W04-4004", "graph methods", "é speech")]
    write_tsv(tmp_path / "aan", rows)
    data = load_task(RetrievalTask(path=str(tmp_path / "aan")), seed=0)
    assert data.head == "matching" and data.train.labels.tolist() == [1, 0] and len(data.test) == 2
    assert decode_bytes(data.val.sequences[0]) == "a paper on parsing"
    assert decode_bytes(data.val.pairs[1]) == "é speech"
    assert data.train.pairs[0][0] == 1  # each document starts with <cls>
    truncated = load_task(RetrievalTask(path=str(tmp_path / "aan"), max_length=5), seed=0)
    assert max(len(s) for s in truncated.train.sequences + truncated.train.pairs) == 5


def test_plain_file_names_and_a_header_are_accepted(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for split in ("train", "val", "test"):
        (folder / f"{split}.tsv").write_text("label\tid1\tid2\ttext1\ttext2\n1\ta\tb\tx\ty\n")
    assert len(load_task(RetrievalTask(path=str(folder)), seed=0).val) == 1


@pytest.mark.parametrize("content,message", [
    ("1\ta\tb\tx\n", ":1: expected 5 tab-separated columns (label, id1, id2, text1, text2), got 4"),
    ("1\ta\tb\tx\ty\n2\ta\tb\tx\ty\n", ":2: label must be 0 or 1, got '2'"),
    ("yes\ta\tb\tx\ty\n", ":1: label must be 0 or 1, got 'yes'"),
    ("", "file has no examples"),
])
def test_lra_tsv_errors_name_file_and_line(tmp_path, content, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    for split in ("train", "eval", "test"):
        (folder / f"new_aan_pairs.{split}.tsv").write_text(content)
    with pytest.raises(DataError) as err:
        load_task(RetrievalTask(path=str(folder)), seed=0)
    assert "new_aan_pairs.train.tsv" in str(err.value) and message in str(err.value)


def test_missing_split_file_is_named(tmp_path):
    write_tsv(tmp_path / "partial", [("1", "a", "b", "x", "y")])
    (tmp_path / "partial" / "new_aan_pairs.test.tsv").unlink()
    with pytest.raises(DataError, match="no test file found .*new_aan_pairs.test.tsv, test.tsv"):
        load_task(RetrievalTask(path=str(tmp_path / "partial")), seed=0)


def test_config_errors():
    with pytest.raises(pydantic.ValidationError, match=r"noise_cues \(5\) .* at most "
                                                       r"num_topics - 1 = 3"):
        RetrievalTask(num_topics=4, noise_cues=5)
    with pytest.raises(pydantic.ValidationError, match="cues"):
        RetrievalTask(cues=1)


def test_two_tower_model_learns_the_synthetic_pairs():
    data = load_task(SMALL.model_copy(update={"train_size": 12, "words": 10}), seed=0)
    config = DiffuserConfig(hidden_size=32, num_heads=2, num_layers=1, ffn_size=32,
                            max_positions=128, dropout=0, attn_dropout=0, hop_dropout=0
                            ).resolved(data.vocab_size, 2)
    torch.manual_seed(0)
    model = DiffuserForMatching(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = collate(data.train, range(12))
    for _ in range(80):
        loss, _ = model(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.05  # memorises a fixed batch: both towers carry gradient
