"""The learned kernel: per-head hop weights, PPR at initialisation, held to the dense reference."""
import pytest
import torch

from diffuser_graph import (
    DiffuserAttention,
    Diffusion,
    PackedBatch,
    PatternSpec,
    build_graph,
    dense_mask,
    diffusion_attention,
)
from diffuser_graph.reference import dense_attention_matrix, dense_diffusion_attention

SPEC = PatternSpec(window=3, num_global=1, num_random=2)
ENGINES = ["dgl", "gather", "block"]


def dense_per_head(mask, q, k, v, weights):
    """``sum_j weights[h, j] A_h^j v`` with dense matrices, head by head."""
    attn = dense_attention_matrix(mask, q, k)  # (H, N, N)
    power, out = v.transpose(0, 1), 0
    for j in range(weights.shape[1]):
        out = out + weights[:, j, None, None] * power
        power = attn @ power
    return out.transpose(0, 1)


@pytest.mark.parametrize("engine", ENGINES)
def test_arbitrary_hop_weights_match_the_dense_reference_on_every_engine(engine):
    lengths = [30, 17]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(47, 3, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    weights = torch.randn(3, 5, dtype=torch.float64, generator=gen)  # any sign, any sum
    batch = PackedBatch.from_lengths(lengths, SPEC, engine=engine)
    out = diffusion_attention(batch, q, k, v, Diffusion(kernel="learned", hops=4),
                              hop_weights=weights)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        expected = dense_per_head(dense_mask(build_graph(n, SPEC)), q[rows], k[rows], v[rows],
                                  weights)
        torch.testing.assert_close(out[rows], expected, rtol=0, atol=1e-10)
        start += n


def test_an_untrained_learned_layer_is_ppr_and_its_weights_get_gradients():
    torch.manual_seed(0)
    layer = DiffuserAttention(12, 3, kernel="learned", alpha=0.2, hops=4, pattern=SPEC).double()
    assert layer.hop_logits.shape == (3, 5)
    batch = PackedBatch.from_lengths([40], SPEC)
    x = torch.randn(40, 12, dtype=torch.float64)
    out = layer(batch, x)
    q, k, v = (proj(x).view(40, 3, 4) for proj in (layer.query, layer.key, layer.value))
    ppr = dense_diffusion_attention(dense_mask(build_graph(40, SPEC)), q, k, v, alpha=0.2, hops=4)
    torch.testing.assert_close(out, layer.output(ppr.reshape(40, 12)), rtol=0, atol=1e-10)
    out.square().sum().backward()
    assert layer.hop_logits.grad is not None and layer.hop_logits.grad.abs().min() > 0
    weights = layer.hop_weights()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_hop_weights_are_checked():
    q = k = v = torch.randn(10, 2, 4)
    batch = PackedBatch.from_lengths([10], SPEC)
    for bad in (torch.ones(3, 6), torch.ones(2, 5), torch.ones(2, 6, dtype=torch.long), [1.0]):
        with pytest.raises(ValueError, match="hop_weights must be a float tensor of shape"):
            diffusion_attention(batch, q, k, v, hops=5, hop_weights=bad)


def test_other_kernels_and_attentions_learn_no_weights():
    assert DiffuserAttention(8, 2, kernel="ppr").hop_weights() is None
    assert DiffuserAttention(8, 2, kernel="learned", attention="sparse").hop_logits is None


def test_training_with_the_learned_kernel_writes_and_reloads_its_weights(tmp_path):
    import json

    from diffuser_graph.checkpoint import load_checkpoint, model_from_checkpoint
    from diffuser_graph.train import RunConfig, train
    from runs import TINY

    data = json.loads(json.dumps(TINY))
    data["out_dir"] = str(tmp_path / "run")
    data["model"].update(kernel="learned", alpha=0.3, hop_dropout=0.0)
    data["train"]["lr"] = 0.05
    train(RunConfig.model_validate(data), progress=False)
    saved = json.loads((tmp_path / "run" / "hop_weights.json").read_text())
    assert saved["start"] == pytest.approx([0.3, 0.21, 0.49])
    (layer,) = saved["layers"]  # one layer, two heads, K + 1 = 3 weights each
    assert len(layer) == 2 and all(len(row) == 3 and sum(row) == pytest.approx(1) for row in layer)
    learned = [abs(w - s) for row in layer for w, s in zip(row, saved["start"], strict=True)]
    assert max(learned) > 1e-4  # the weights moved from where they started
    assert (tmp_path / "run" / "hop_weights.png").read_bytes()[:4] == b"\x89PNG"
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt"))
    (attention,) = [m for m in model.modules() if isinstance(m, DiffuserAttention)]
    assert attention.hop_weights().shape == (2, 3)
