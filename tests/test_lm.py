import json
import math

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from diffuser_graph import DiffuserConfig, DiffuserEncoder, DiffuserForCausalLM, PatternSpec
from diffuser_graph.cli import main
from diffuser_graph.config import ConfigError
from diffuser_graph.tasks import DataError, LMTask, collate, lm, load_task
from diffuser_graph.tasks.vocab import BYTE_VOCAB_SIZE
from diffuser_graph.train import RunConfig, train

CAUSAL = PatternSpec(window=2, num_global=1, num_random=2, causal=True, seed=3)


def lm_config(**overrides):
    base = dict(vocab_size=20, num_labels=20, hidden_size=16, num_heads=2, num_layers=2,
                ffn_size=32, max_positions=64, dropout=0.0, attn_dropout=0.0, hop_dropout=0.0,
                pattern=CAUSAL, hops=6)
    return DiffuserConfig(**{**base, **overrides})


@pytest.mark.parametrize("attention,engine", [("diffuser", "dgl"), ("diffuser", "auto"),
                                              ("sparse", "dgl"), ("full", "dgl")])
def test_a_future_token_never_changes_earlier_outputs(attention, engine):
    torch.manual_seed(0)
    net = DiffuserForCausalLM(lm_config(attention=attention, engine=engine)).eval()
    ids = torch.randint(2, 20, (1, 40))
    with torch.no_grad():
        before = net(ids)
        for position in (5, 17, 39):
            changed = ids.clone()
            changed[0, position] = 2 + (changed[0, position] - 1) % 18  # another token
            after = net(changed)
            assert torch.equal(after[0, :position], before[0, :position])
            assert not torch.allclose(after[0, position:], before[0, position:])


def test_the_causality_check_catches_a_non_causal_pattern():
    torch.manual_seed(0)
    encoder = DiffuserEncoder(lm_config(pattern=CAUSAL.model_copy(update={"causal": False})))
    ids = torch.randint(2, 20, (1, 40))
    changed = ids.clone()
    changed[0, 30] = 2 + (changed[0, 30] - 1) % 18
    with torch.no_grad():
        assert not torch.allclose(encoder(ids).hidden[:30], encoder(changed).hidden[:30])
    with pytest.raises(ValueError, match="needs model.pattern.causal: true"):
        DiffuserForCausalLM(lm_config(pattern=PatternSpec(window=2)))


def test_loss_is_next_token_cross_entropy_and_ignores_padding():
    torch.manual_seed(0)
    net = DiffuserForCausalLM(lm_config()).eval()
    ids = torch.randint(2, 20, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False
    labels = torch.randint(2, 20, (2, 12)).masked_fill(~mask, -100)
    loss, logits = net(ids.masked_fill(~mask, 0), mask, labels)
    assert logits.shape == (2, 12, 20) and not logits[1, 7:].any()
    expected = F.cross_entropy(torch.cat([logits[0], logits[1, :7]]),
                               torch.cat([labels[0], labels[1, :7]]))
    assert torch.allclose(loss, expected, atol=1e-6)
    short = net(ids[1:, :7], labels=labels[1:, :7])[1]
    assert torch.allclose(short[0], logits[1, :7], atol=1e-5)  # padding never leaks in
    with pytest.raises(ValueError, match=r"labels must be \(B, L\)"):
        net(ids, mask, labels[:, :5])


def test_tied_head_overfits_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    net = DiffuserForCausalLM(lm_config())
    assert net.lm_head.weight is net.encoder.tokens.weight
    ids = torch.randint(2, 20, (4, 24))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        loss, _ = net(ids[:, :-1], labels=ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.1
    net.save_pretrained(tmp_path / "lm")
    loaded = DiffuserForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert loaded.lm_head.weight is loaded.encoder.tokens.weight
    assert torch.equal(loaded(ids).detach(), net.eval()(ids).detach())


def test_text_file_is_chunked_into_shifted_examples(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(60)).encode()
    (tmp_path / "corpus.txt").write_bytes(text)
    data = load_task(LMTask(path=str(tmp_path / "corpus.txt"), seq_len=16, val_fraction=0.1,
                            test_fraction=0.1), seed=0)
    assert data.head == "lm" and data.num_labels == data.vocab_size == BYTE_VOCAB_SIZE == 258
    n_val = n_test = int(len(text) * 0.1)
    train_part = text[:len(text) - n_val - n_test]
    assert len(data.train) == (len(train_part) - 1) // 16
    for inputs, targets in zip(data.train.sequences, data.train.targets, strict=True):
        assert len(inputs) == 16 and np.array_equal(inputs[1:], targets[:-1])
    rebuilt = np.concatenate(data.train.sequences + [data.train.targets[-1][-1:]])
    assert data.decode(rebuilt) == train_part[:len(rebuilt)].decode()
    test_part = text[len(text) - n_test:]
    used = len(data.test) * 16  # the tail that cannot fill a chunk is dropped
    assert data.decode(np.concatenate(data.test.targets)) == test_part[1:used + 1].decode()
    batch = collate(data.val, [0, 1])
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 16)


def test_folder_of_splits_and_the_unigram_baseline(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.txt").write_text("ab" * 40)
    (folder / "valid.txt").write_text("ab" * 10)
    (folder / "test.txt").write_text("aab" * 10)
    data = load_task(LMTask(path=str(folder), seq_len=8), seed=0)
    assert [len(s) for _, s in data.splits()] == [9, 2, 3]
    # 9 chunks predict 72 train bytes, 36 a and 36 b; add-one smoothing over 258 symbols
    p = (36 + 1) / (72 + 258)
    assert data.baseline("val")["unigram_bits_per_char"] == pytest.approx(-math.log2(p))


@pytest.mark.parametrize("content,message", [
    (b"", "corpus.txt: file is empty"),
    (b"good line\nbad \xff byte\n", "corpus.txt:2: not UTF-8 text"),
    (b"too short", "cannot make one example of seq_len 64"),
])
def test_text_file_errors_name_the_file(tmp_path, content, message):
    (tmp_path / "corpus.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_task(LMTask(path=str(tmp_path / "corpus.txt"), seq_len=64), seed=0)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match="nothing.txt: file does not exist"):
        load_task(LMTask(path=str(tmp_path / "nothing.txt")), seed=0)
    (tmp_path / "train.txt").write_text("x" * 100)
    with pytest.raises(DataError, match=r"no val file found \(looked for valid.txt, val.txt\)"):
        load_task(LMTask(path=str(tmp_path)), seed=0)
    with pytest.raises(pydantic.ValidationError, match="val_fraction"):
        LMTask(val_fraction=0.6, test_fraction=0.5)


@pytest.mark.parametrize("corpus", ["python-docs", "python-source"])
def test_embedded_corpora_are_deterministic_text(corpus):
    text, source = lm.python_corpus(corpus)
    again, _ = lm.python_corpus(corpus)
    assert text == again and len(text) > 200_000 and "sha256" in source
    assert text.decode("utf-8").count("\n") > 5_000
    data = load_task(LMTask(corpus=corpus, seq_len=128, max_bytes=50_000), seed=0)
    assert sum(len(s) for _, s in data.splits()) == sum(
        (n - 1) // 128 for n in (45_000, 2_500, 2_500))
    assert "train/val/test 45000/2500/2500 bytes" in data.source


def test_training_reports_bits_per_char(tmp_path, capsys):
    from diffuser_graph.config import load_config

    config = load_config("configs/lm-small.yaml", RunConfig, [
        "task.max_bytes=12000", "train.max_steps=4", "train.eval_every=2", "train.log_every=1",
        f"out_dir={tmp_path / 'lm'}"])
    results = train(config, progress=False)
    test = results["test"]
    assert test["bits_per_char"] == pytest.approx(test["loss"] / math.log(2))
    assert 0 < test["unigram_bits_per_char"] < 8 and "pydoc_data.topics" in results["data"]
    records = [json.loads(line) for line in (tmp_path / "lm" / "metrics.jsonl").open()]
    assert all("bits_per_char" in r for r in records)
    saved = json.loads((tmp_path / "lm" / "results.json").read_text())
    assert saved["test"]["bits_per_char"] == test["bits_per_char"]
    capsys.readouterr()
    best = str(tmp_path / "lm" / "best.pt")
    assert main(["sample", "--checkpoint", best, "--prompt", "The ", "--tokens", "20"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The ") and len(text.encode("utf-8", "replace")) >= 4 + 1
    assert main(["sample", "--checkpoint", best, "--prompt", ""]) == 2
    assert "--prompt must not be empty" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    non_causal = load_config("configs/lm-small.yaml", RunConfig, [
        "model.pattern.causal=false", f"out_dir={tmp_path / 'bad'}", "task.max_bytes=12000"])
    with pytest.raises(ConfigError, match="causal: true"):
        train(non_causal, progress=False)


def test_generate_extends_greedily_or_by_sampling():
    torch.manual_seed(0)
    net = DiffuserForCausalLM(lm_config())
    prompt = torch.randint(2, 20, (2, 5))
    greedy = net.generate(prompt, 6, temperature=0)
    assert greedy.shape == (2, 11) and torch.equal(greedy[:, :5], prompt)
    logits = net.eval()(greedy[:, :-1])
    assert torch.equal(logits.argmax(-1)[:, 4:], greedy[:, 5:])  # each step is the argmax
    draws = [net.generate(prompt, 6, temperature=1.0, top_k=3,
                          generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    top3 = net(draws[0][:, :-1]).topk(3, dim=-1).indices  # samples are among the 3 likeliest
    assert all(int(draws[0][b, t + 1]) in top3[b, t].tolist()
               for b in range(2) for t in range(4, 10))
    with pytest.raises(ValueError, match="exceed max_positions"):
        net.generate(prompt, 100)


def test_sample_and_generate_reject_bad_arguments(tmp_path, capsys):
    from diffuser_graph import DiffuserForSequenceClassification
    from diffuser_graph.checkpoint import save_checkpoint

    classifier = DiffuserForSequenceClassification(lm_config(pattern=PatternSpec(window=2)))
    path = tmp_path / "classifier.pt"
    save_checkpoint(path, classifier, step=0)
    assert main(["sample", "--checkpoint", str(path), "--prompt", "x"]) == 2
    assert ("holds a DiffuserForSequenceClassification, not a DiffuserForCausalLM"
            in capsys.readouterr().err)
    legacy = tmp_path / "legacy.pt"  # written before checkpoints recorded the model class
    torch.save({"model": classifier.state_dict(), "step": 0,
                "model_config": classifier.config.model_dump_json()}, legacy)
    assert main(["sample", "--checkpoint", str(legacy), "--prompt", "x"]) == 2
    assert "do not fit a DiffuserForCausalLM" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(path), "--prompt", "x", "--tokens", "0"]) == 2
    assert "--tokens and --top-k must be at least 1" in capsys.readouterr().err
    net = DiffuserForCausalLM(lm_config())
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        net.generate(torch.randint(2, 20, (1, 3)), 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k >= 1"):
        net.generate(torch.randint(2, 20, (1, 3)), 2, top_k=0)
