import pydantic
import pytest
import torch

from diffuser_graph import PatternSpec
from diffuser_graph.model import (
    DiffuserConfig,
    DiffuserForMatching,
    DiffuserForSequenceClassification,
)


def config(**overrides):
    base = dict(vocab_size=12, num_labels=3, hidden_size=16, num_heads=2, num_layers=2,
                ffn_size=32, max_positions=64, dropout=0.0, attn_dropout=0.0, hop_dropout=0.0,
                pattern=PatternSpec(window=1, num_global=1, num_random=1), hops=3)
    return DiffuserConfig(**{**base, **overrides})


def model(seed=0, **overrides):
    torch.manual_seed(seed)
    return DiffuserForSequenceClassification(config(**overrides)).eval()


def batch(lengths=(9, 5, 7), vocab=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), width), generator=gen)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def test_same_parameters_for_every_attention_kind():
    counts = {kind: sum(p.numel() for p in model(attention=kind).parameters())
              for kind in ("diffuser", "sparse", "full")}
    assert len(set(counts.values())) == 1
    names = {kind: [n for n, _ in model(attention=kind).named_parameters()]
             for kind in ("diffuser", "full")}
    assert names["diffuser"] == names["full"]


def test_full_equals_sparse_when_the_pattern_covers_everything():
    ids, mask = batch()
    everything = PatternSpec(window=64)
    full = model(attention="full", pattern=everything)(ids, mask)
    sparse = model(attention="sparse", pattern=everything)(ids, mask)
    torch.testing.assert_close(full, sparse, rtol=1e-5, atol=1e-5)
    diffuser = model(attention="diffuser", pattern=everything)(ids, mask)
    assert not torch.allclose(diffuser, sparse, atol=1e-4)  # diffusion is a different function


@pytest.mark.parametrize("kind", ["diffuser", "sparse", "full"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_never_changes_a_sequence(kind, pooling):
    net = model(attention=kind, pooling=pooling)
    ids, mask = batch()
    together = net(ids, mask)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        alone = net(ids[row:row + 1, :n])
        torch.testing.assert_close(together[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    garbage = ids.masked_fill(~mask, 7)
    torch.testing.assert_close(net(garbage, mask), together, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["diffuser", "sparse", "full"])
def test_tiny_model_overfits_a_fixed_batch(kind):
    torch.manual_seed(0)
    net = DiffuserForSequenceClassification(config(attention=kind, layer_norm="pre"))
    ids, mask = batch(lengths=(12, 10, 8, 12, 9, 11, 7, 12), seed=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        loss, _ = net(ids, mask, labels=labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.05


def test_save_and_load_pretrained(tmp_path):
    net = model(attention="diffuser", kernel="heat")
    ids, mask = batch()
    net.save_pretrained(tmp_path / "m")
    loaded = DiffuserForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == net.config
    torch.testing.assert_close(loaded(ids, mask), net(ids, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds a DiffuserForSequenceClassification"):
        DiffuserForMatching.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DiffuserForSequenceClassification.from_pretrained(tmp_path / "nothing")


def test_matching_head():
    torch.manual_seed(0)
    net = DiffuserForMatching(config(num_labels=2)).eval()
    ids, mask = batch()
    ids2, mask2 = batch(lengths=(4, 9, 6), seed=2)
    loss, logits = net(ids, mask, ids2, mask2, labels=torch.tensor([0, 1, 1]))
    assert logits.shape == (3, 2) and loss.dim() == 0
    swapped = net(ids2, mask2, ids, mask)
    assert not torch.allclose(swapped, logits)  # [u, v, u*v, u-v] is order-aware


def test_bad_inputs_give_clear_errors():
    net = model()
    ids, mask = batch()
    with pytest.raises(ValueError, match="a sequence has 70 tokens but max_positions is 64"):
        net(torch.ones(1, 70, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be in \\[0, 12\\)"):
        net(ids + 20, mask)
    with pytest.raises(ValueError, match="attention_mask must be a tensor shaped like input_ids"):
        net(ids, mask[:, :3])
    with pytest.raises(ValueError, match="input_ids must be a \\(B, L\\) tensor"):
        net(ids[0])
    with pytest.raises(ValueError, match="int64 or int32"):
        net(ids.float(), mask)


def test_recomputed_heads_train_the_same_model():
    ids, mask = batch()
    labels = torch.tensor([0, 2, 1])
    results = []
    for recompute_heads, recompute_hops in ((0, False), (1, False), (1, True)):
        net = model(recompute_heads=recompute_heads, recompute_hops=recompute_hops)
        loss, _ = net(ids, mask, labels=labels)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in net.parameters()]))
    (loss, grads), *recomputed = results
    for loss_recomputed, grads_recomputed in recomputed:
        torch.testing.assert_close(loss_recomputed, loss)
        for grad, want in zip(grads_recomputed, grads, strict=True):
            torch.testing.assert_close(grad, want)


def test_config_validation():
    with pytest.raises(pydantic.ValidationError, match="recompute_heads"):
        config(recompute_heads=-1)
    with pytest.raises(pydantic.ValidationError, match="recompute_hops"):
        config(recompute_hops="sometimes")
    with pytest.raises(pydantic.ValidationError, match="multiple of num_heads"):
        config(hidden_size=10, num_heads=4)
    with pytest.raises(pydantic.ValidationError, match="attention"):
        config(attention="linear")
    with pytest.raises(ValueError, match="needs vocab_size"):
        DiffuserForSequenceClassification(DiffuserConfig(num_labels=2))
    resolved = DiffuserConfig().resolved(20, 4)
    assert (resolved.vocab_size, resolved.num_labels) == (20, 4)
    with pytest.raises(ValueError, match="model.vocab_size is 12 but the task needs 20"):
        config().resolved(20, 3)


def test_encoder_returns_each_layers_attention():
    net = model()
    ids, mask = batch()
    out = net.encoder(ids, mask, return_attention=True)
    assert len(out.attentions) == 2 and out.hidden.shape == (int(mask.sum()), 16)
    for attn in out.attentions:
        assert attn.shape == (out.graph.num_edges(), 2)
        sums = torch.zeros(out.graph.num_nodes(), 2).index_add_(0, out.graph.edges()[1], attn)
        torch.testing.assert_close(sums, torch.ones_like(sums))
    assert net.encoder(ids, mask).attentions == []
