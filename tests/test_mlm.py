"""Masked-LM pretraining: the corruption, the loss on chosen tokens only, and that it learns."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffuser_graph import DiffuserConfig, PatternSpec
from diffuser_graph.model import DiffuserForMaskedLM
from diffuser_graph.tasks import IGNORE_INDEX, MLMTask, collate, load_task
from diffuser_graph.tasks.base import Masking
from diffuser_graph.tasks.vocab import BYTE_MASK_ID, CLS_ID, PAD_ID

SPECIALS = (PAD_ID, CLS_ID, BYTE_MASK_ID)


def masking(seed=0, probability=0.15):
    return Masking(probability, BYTE_MASK_ID, SPECIALS, 259, seed)


def test_corruption_rates_specials_and_determinism():
    rule = masking()
    ids = np.concatenate([[CLS_ID], np.random.default_rng(1).integers(2, 258, 200_000)])
    inputs, labels = rule.apply(ids, (7,))
    chosen = labels != IGNORE_INDEX
    assert labels[0] == IGNORE_INDEX and inputs[0] == CLS_ID  # specials are never chosen
    assert abs(chosen.mean() - 0.15) < 0.005
    assert np.array_equal(labels[chosen], ids[chosen])
    masked = inputs[chosen] == BYTE_MASK_ID
    kept = inputs[chosen] == ids[chosen]
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(kept.mean() - 0.1 - 0.1 / 256) < 0.01  # a random token can be the same one
    swapped = inputs[chosen][~masked & ~kept]
    assert swapped.min() >= 2 and swapped.max() < 258  # random ordinary bytes, not specials
    assert np.array_equal(inputs[~chosen], ids[~chosen])
    again = rule.apply(ids, (7,))
    assert np.array_equal(again[0], inputs) and np.array_equal(again[1], labels)
    assert not np.array_equal(rule.apply(ids, (8,))[1], labels)  # another draw
    assert not np.array_equal(masking(seed=1).apply(ids, (7,))[1], labels)  # another seed


def test_a_short_sequence_gets_at_least_one_chosen_token():
    rule = masking(probability=0.01)
    for key in range(50):
        _, labels = rule.apply(np.array([CLS_ID, 40, 41]), (key,))
        assert (labels != IGNORE_INDEX).sum() >= 1


def test_training_draws_new_masks_and_evaluation_keeps_one():
    data = load_task(MLMTask(seq_len=64, max_bytes=20_000), seed=0)
    assert data.head == "mlm" and data.vocab_size == 259 and data.unit == "char"
    assert all(len(s) == 64 and s[0] == CLS_ID for s in data.train.sequences)
    evaluation = [collate(data.val, range(4))["labels"] for _ in range(2)]
    assert torch.equal(*evaluation)
    draws = [collate(data.train, range(4), draw)["labels"] for draw in (0, 1, 0)]
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = DiffuserConfig(vocab_size=259, hidden_size=32, num_heads=2, num_layers=2,
                            ffn_size=64, max_positions=64, dropout=0.0, attn_dropout=0.0,
                            hop_dropout=0.0, pattern=PatternSpec(window=3, num_random=1),
                            hops=3, pad_token_id=0)
    return DiffuserForMaskedLM(config).eval()


def test_the_loss_is_on_chosen_tokens_only_and_starts_near_uniform():
    data = load_task(MLMTask(seq_len=64, max_bytes=20_000), seed=0)
    batch = collate(data.val, range(8))
    model = tiny_model()
    loss, logits = model(**batch)
    chosen = batch["labels"] != IGNORE_INDEX
    expected = F.cross_entropy(logits[chosen], batch["labels"][chosen])
    torch.testing.assert_close(loss, expected)
    assert abs(float(loss) - math.log(259)) < 0.1  # nats
    changed = batch["labels"].clone()
    changed[~chosen] = 5  # labels where nothing was chosen would change the loss if counted
    assert not torch.allclose(model(batch["input_ids"], batch["attention_mask"],
                                    labels=changed)[0], loss)


def test_bad_settings():
    with pytest.raises(ValueError, match="mask_probability"):
        MLMTask(mask_probability=0.0)
    with pytest.raises(ValueError, match="cannot make one example"):
        load_task(MLMTask(seq_len=4096, max_bytes=100), seed=0)


@pytest.mark.slow
def test_mlm_small_learns_well_below_the_unigram_baseline(tmp_path):
    from pathlib import Path

    from diffuser_graph.config import load_config
    from diffuser_graph.train import RunConfig, train

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "mlm-small.yaml",
                         RunConfig, ["train.max_steps=400", "train.eval_every=200",
                                     "train.threads=2", f"out_dir={tmp_path / 'run'}"])
    results = train(config, progress=False)
    test = results["test"]
    assert test["bits_per_char"] < test["unigram_bits_per_char"] - 0.8, test
