"""Warm-starting from Hugging Face RoBERTa/BERT: exact copies, diffusion of their attention,
tokenizers, conversion and fine-tuning from the command line. Every checkpoint and tokenizer
here is tiny, random and made in the test (nothing is downloaded)."""
import json

import numpy as np
import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from diffuser_graph import DiffuserEncoder, PatternSpec, diffusion_operator  # noqa: E402
from diffuser_graph.checkpoint import load_checkpoint  # noqa: E402
from diffuser_graph.cli import main  # noqa: E402
from diffuser_graph.hf import ConversionError, from_hf, tiled_positions  # noqa: E402
from diffuser_graph.model import (  # noqa: E402
    DiffuserForMaskedLM,
    DiffuserForSequenceClassification,
    load_pretrained,
)
from diffuser_graph.tasks import DataError, TextTask, load_task  # noqa: E402
from diffuser_graph.tasks.vocab import HFTokenizer  # noqa: E402
from diffuser_graph.train import RunConfig, read_metrics, train  # noqa: E402

TEXTS = ["the film was a delight from start to end", "a dull and tedious plot",
         "brilliant acting and a moving story", "the camera work was clumsy", "long and awful",
         "some scenes were superb while others dragged on"] * 3
FAMILIES = {
    "roberta": dict(config=transformers.RobertaConfig, pad=1, max_positions=34, eps=1e-5,
                    types=1),
    "bert": dict(config=transformers.BertConfig, pad=0, max_positions=32, eps=1e-12, types=2),
}
HEADS = {"base": "{}Model", "classifier": "{}ForSequenceClassification",
         "masked": "{}ForMaskedLM"}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    (root / "roberta").mkdir()
    bpe.save_model(str(root / "roberta"))
    transformers.RobertaTokenizerFast(
        vocab_file=str(root / "roberta" / "vocab.json"),
        merges_file=str(root / "roberta" / "merges.txt")).save_pretrained(root / "roberta")
    words = sorted({w for text in TEXTS for w in text.split()})
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(root / "bert" / "vocab.txt")
                                   ).save_pretrained(root / "bert")
    return {name: root / name for name in FAMILIES}


def hf_model(family, head, vocab_size, seed=0, **extra):
    spec = FAMILIES[family]
    config = spec["config"](
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=spec["max_positions"],
        pad_token_id=spec["pad"], layer_norm_eps=spec["eps"], type_vocab_size=spec["types"],
        num_labels=3, attn_implementation="eager", **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, HEADS[head].format(family.capitalize()))(config)
    with torch.no_grad():  # random LayerNorm and biases too, so that no copy can be skipped
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizers):
    """Each family x head saved in the save_pretrained layout."""
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for family in FAMILIES:
        vocab = len(HFTokenizer(tokenizers[family])._tokenizer)
        for head in HEADS:
            folder = root / f"{family}-{head}"
            hf_model(family, head, vocab).save_pretrained(folder)
            folders[family, head] = folder
    return folders


def batch(family, tokenizers):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizers[family])
    encoded = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_a_converted_model_computes_what_the_checkpoint_computes(family, head, attention,
                                                                 checkpoints, tokenizers):
    ids, mask = batch(family, tokenizers)
    reference = transformers.AutoModel if head == "base" else None
    theirs = (reference or getattr(transformers, HEADS[head].format(family.capitalize()))
              ).from_pretrained(checkpoints[family, head], attn_implementation="eager").eval()
    everything = PatternSpec(window=ids.shape[1])  # sparse attention over every pair
    ours = from_hf(checkpoints[family, head], attention=attention, pattern=everything)
    real = mask.bool()
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask, output_hidden_states=True)
        if head == "classifier":
            torch.testing.assert_close(ours(ids, mask), expected.logits, rtol=0, atol=1e-5)
        elif head == "masked":
            torch.testing.assert_close(ours(ids, mask)[real], expected.logits[real], rtol=0,
                                       atol=1e-5)
        hidden = ours.backbone(ids, mask).hidden
        torch.testing.assert_close(hidden, expected.hidden_states[-1][real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusion_applies_the_ppr_series_of_the_checkpoints_own_attention(family, checkpoints,
                                                                          tokenizers):
    """Layer by layer: our Diffuser layer equals the checkpoint's layer with its attention
    probabilities A replaced by sum_k theta_k A^k (dense, from output_attentions)."""
    ids, mask = batch(family, tokenizers)
    theirs = transformers.AutoModel.from_pretrained(checkpoints[family, "base"],
                                                    attn_implementation="eager").eval()
    alpha, hops = 0.3, 4
    ours = from_hf(checkpoints[family, "base"], pattern=PatternSpec(window=ids.shape[1]),
                   alpha=alpha, hops=hops).double()
    theirs = theirs.double()
    real = mask.bool()
    with torch.no_grad():
        out = theirs(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        batch_plan = ours.pack(ids, mask)
        for index, (mine, layer) in enumerate(zip(ours.layers, theirs.encoder.layer,
                                                  strict=True)):
            x = out.hidden_states[index]  # (B, L, hidden): the layer's input
            probs = out.attentions[index]  # (B, H, L, L)
            expected_rows = []
            for b in range(ids.shape[0]):
                n = int(real[b].sum())
                attn = probs[b, :, :n, :n] / probs[b, :, :n, :n].sum(-1, keepdim=True)
                operator = diffusion_operator(attn, alpha=alpha, hops=hops)  # (H, n, n)
                values = layer.attention.self.value(x[b, :n]).view(n, 4, 8).transpose(0, 1)
                context = (operator @ values).transpose(0, 1).reshape(n, 32)
                attended = layer.attention.output(context, x[b, :n])
                expected_rows.append(layer.output(layer.intermediate(attended), attended))
            mine_out = mine(batch_plan, x[real])
            torch.testing.assert_close(mine_out, torch.cat(expected_rows), rtol=0, atol=1e-10)


def test_positions_beyond_the_table_repeat_the_pretrained_ones(checkpoints):
    theirs = transformers.AutoModel.from_pretrained(checkpoints["roberta", "base"])
    table = theirs.embeddings.position_embeddings.weight  # 34 rows: 2 offset + 32 learned
    ours = from_hf(checkpoints["roberta", "base"], max_positions=100)
    rows = ours.positions.weight.detach()
    assert rows.shape[0] == 100 and ours.config.position_offset == 2
    torch.testing.assert_close(rows[:34], table)
    torch.testing.assert_close(rows[34:66], table[2:34])
    torch.testing.assert_close(rows[66:100], torch.cat([table[2:34], table[2:4]]))
    assert torch.equal(tiled_positions(table, 10, 2), table[:10])  # fewer rows: the first ones
    ids = torch.randint(5, 100, (1, 98))
    assert ours(ids).hidden.shape == (98, 32)  # 98 tokens, where the checkpoint took 32


def test_tokenizers_give_the_checkpoints_ids_and_specials(tokenizers, tmp_path):
    for family, (cls_id, sep_id, pad_id) in (("roberta", (0, 2, 1)), ("bert", (2, 3, 0))):
        tokenizer = HFTokenizer(tokenizers[family])
        reference = transformers.AutoTokenizer.from_pretrained(tokenizers[family])
        assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id) == (cls_id, sep_id, pad_id)
        (tmp_path / family).mkdir()
        for split in ("train", "val", "test"):
            (tmp_path / family / f"{split}.csv").write_text(
                "text,label\n" + "".join(f'"{text}",{i % 2}\n' for i, text in enumerate(TEXTS)))
        data = load_task(TextTask(path=str(tmp_path / family), tokenizer=str(tokenizers[family]),
                                  max_length=8), seed=0)
        expected = reference(TEXTS[0], truncation=True, max_length=8)["input_ids"]
        assert data.train.sequences[0].tolist() == expected
        assert data.vocab_size == len(reference) and data.pad_id == pad_id
        assert data.decode(data.train.sequences[1]) == reference.decode(
            reference(TEXTS[1], truncation=True, max_length=8)["input_ids"],
            skip_special_tokens=True)


def test_bad_sources_and_overrides_give_one_clear_error(tmp_path, checkpoints, tokenizers):
    with pytest.raises(ConversionError, match="not a Hugging Face checkpoint folder"):
        from_hf(tmp_path)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20,
                                                   n_positions=8)).save_pretrained(gpt2)
    with pytest.raises(ConversionError, match="'GPT2Model' model; supported: RobertaModel"):
        from_hf(gpt2)
    with pytest.raises(ConversionError, match="hidden_size=64 \\(the checkpoint has 32\\), "
                                              "num_heads=8 \\(the checkpoint has 4\\)"):
        from_hf(checkpoints["roberta", "base"], hidden_size=64, num_heads=8)
    with pytest.raises(ConversionError, match="num_labels=5 \\(the checkpoint's head has 3\\)"):
        from_hf(checkpoints["bert", "classifier"], num_labels=5)
    with pytest.raises(ConversionError, match="overrides are invalid: .*hops"):
        from_hf(checkpoints["bert", "base"], hops=0)
    with pytest.raises(DataError, match="no usable tokenizer here"):
        HFTokenizer(checkpoints["roberta", "base"])  # a model folder, not a tokenizer
    with pytest.raises(DataError, match="this folder does not exist"):
        load_task(TextTask(tokenizer=str(tmp_path / "none")), seed=0)


def test_classes_follow_the_checkpoint(checkpoints):
    assert type(from_hf(checkpoints["bert", "base"])) is DiffuserEncoder
    assert type(from_hf(checkpoints["bert", "classifier"])) is DiffuserForSequenceClassification
    masked = from_hf(checkpoints["roberta", "masked"])
    assert type(masked) is DiffuserForMaskedLM
    assert masked.head.decoder.weight is masked.encoder.tokens.weight  # tied, as RoBERTa's
    config = masked.config  # the authors' attention by default, the checkpoint's shape
    assert (config.attention, config.pattern.kind, config.alpha, config.hops) == (
        "diffuser", "official", 0.1, 5)
    assert (config.layer_norm, config.layer_norm_eps, config.pad_token_id) == ("post", 1e-5, 1)


def test_convert_then_fine_tune_resume_export_and_reload(tmp_path, checkpoints, tokenizers,
                                                         capsys):
    converted = tmp_path / "converted"
    assert main(["convert", str(checkpoints["roberta", "masked"]), str(converted),
                 "pattern.window=4", "pattern.kind=window", "pattern.num_random=1",
                 "max_positions=66"]) == 0
    assert "DiffuserForMaskedLM" in capsys.readouterr().out
    reloaded = load_pretrained(converted)
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    reference = from_hf(checkpoints["roberta", "masked"], pattern=PatternSpec(
        window=4, num_random=1), max_positions=66)
    torch.testing.assert_close(reloaded.eval()(ids), reference(ids), rtol=0, atol=0)
    assert main(["convert", str(checkpoints["roberta", "masked"]), str(converted)]) == 2
    assert "already exists" in capsys.readouterr().err

    data = tmp_path / "reviews"
    data.mkdir()
    for split in ("train", "val", "test"):
        (data / f"{split}.csv").write_text("text,label\n" + "".join(
            f'"{text}",{int("dull" in text or "awful" in text or "clumsy" in text)}\n'
            for text in TEXTS))
    run = {"seed": 0, "out_dir": str(tmp_path / "run"),
           "task": {"name": "text", "path": str(data), "tokenizer": str(tokenizers["roberta"]),
                    "max_length": 16},
           "model": {"init_from": str(converted), "hops": 2},
           "train": {"batch_size": 6, "max_steps": 8, "eval_every": 4, "log_every": 2,
                     "lr": 0.001, "warmup_steps": 1, "threads": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    assert main(["train", str(path), "--quiet", "--stop-after", "4"]) == 0
    assert "starting from the encoder of" in capsys.readouterr().err
    assert main(["train", str(path), "--quiet", "--resume"]) == 0
    straight = RunConfig.model_validate({**run, "out_dir": str(tmp_path / "straight")})
    train(straight, progress=False)
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("run", "straight"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == read_metrics(
        tmp_path / "straight" / "metrics.jsonl")
    saved = json.loads(load_checkpoint(tmp_path / "run" / "best.pt")["model_config"])
    assert (saved["hidden_size"], saved["hops"], saved["position_offset"]) == (32, 2, 2)

    exported = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run" / "best.pt"), str(exported)]) == 0
    assert (exported / "model.safetensors").is_file()
    model = load_pretrained(exported).eval()
    assert type(model) is DiffuserForSequenceClassification
    from diffuser_graph.checkpoint import model_from_checkpoint

    original = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt")).eval()
    ids = torch.tensor(np.array([[0, 20, 21, 22, 2]]))
    torch.testing.assert_close(model(ids), original(ids), rtol=0, atol=0)

    run["model"]["hidden_size"] = 64
    path.write_text(yaml.safe_dump({**run, "out_dir": str(tmp_path / "clash")}))
    assert main(["train", str(path)]) == 2
    assert "fixes hidden_size (64; the weights have 32)" in capsys.readouterr().err
