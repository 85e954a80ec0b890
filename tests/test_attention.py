import itertools

import pytest
import torch

from diffuser_graph import (
    DiffuserAttention,
    PackedBatch,
    PatternSpec,
    batch_graphs,
    build_graph,
    dense_attention_matrix,
    dense_diffusion_attention,
    dense_mask,
    diffusion_attention,
    diffusion_operator,
    edge_attention,
)
from diffuser_graph.engines import block as block_engine

PATTERNS = {
    "window": (48, PatternSpec(window=3)),
    "window+global+random": (48, PatternSpec(window=2, num_global=2, num_random=3, seed=1)),
    "dilated+causal": (40, PatternSpec(window=2, dilation=2, num_random=2, causal=True)),
    "official": (96, PatternSpec(kind="official", window=16, num_random=2, num_global=3,
                                 max_len=256)),
    "grid": (42, PatternSpec(kind="grid", image_size=(6, 7), window=1, num_global=1,
                             num_random=2)),
}
DIFFUSIONS = [
    dict(kernel="ppr", alpha=0.1, hops=5),
    dict(kernel="ppr", alpha=0.5, hops=3),
    dict(kernel="ppr", alpha=0.0, hops=1),
    dict(kernel="ppr", alpha=1.0, hops=2),
    dict(kernel="heat", t=1.0, hops=4),
    dict(kernel="heat", t=3.0, hops=8),
]


def random_qkv(n, heads=2, dim=4, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, dim, generator=gen, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


@pytest.mark.parametrize("pattern,diffusion",
                         list(itertools.product(PATTERNS, range(len(DIFFUSIONS)))))
def test_matches_dense_reference(pattern, diffusion):
    n, spec = PATTERNS[pattern]
    kwargs = DIFFUSIONS[diffusion]
    g = build_graph(n, spec)
    q, k, v = random_qkv(n)
    out = diffusion_attention(g, q, k, v, **kwargs)
    expected = dense_diffusion_attention(dense_mask(g), q, k, v, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_default_official_pattern_matches_dense_reference():
    g = build_graph(300, PatternSpec(kind="official"))
    q, k, v = random_qkv(300, heads=2, dim=8)
    torch.testing.assert_close(diffusion_attention(g, q, k, v),
                               dense_diffusion_attention(dense_mask(g), q, k, v),
                               rtol=0, atol=1e-10)


def test_edge_attention_is_the_masked_softmax():
    n, spec = PATTERNS["window+global+random"]
    g = build_graph(n, spec)
    q, k, _ = random_qkv(n)
    attn = edge_attention(g, q, k)
    src, dst = g.edges()
    dense = dense_attention_matrix(dense_mask(g), q, k)
    torch.testing.assert_close(attn, dense[:, dst, src].T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", ["ppr", "heat"])
def test_gradcheck(kernel):
    g = build_graph(12, PatternSpec(window=1, num_global=1, num_random=2))
    q, k, v = random_qkv(12, heads=2, dim=3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: diffusion_attention(g, q, k, v, kernel=kernel, hops=3, alpha=0.2, t=1.5),
        (q, k, v))


def test_ppr_closed_form_and_its_limit():
    """Z(k+1) = (1-a) A Z(k) + a V gives the truncated series; K -> inf gives a(I-(1-a)A)^-1."""
    n, spec = PATTERNS["window+global+random"]
    g = build_graph(n, spec)
    q, k, v = random_qkv(n)
    attn = dense_attention_matrix(dense_mask(g), q, k)  # (H, N, N)
    alpha, hops = 0.3, 6
    series = sum(alpha * (1 - alpha) ** i * torch.linalg.matrix_power(attn, i) for i in range(hops))
    series = series + (1 - alpha) ** hops * torch.linalg.matrix_power(attn, hops)
    out = diffusion_attention(g, q, k, v, alpha=alpha, hops=hops)
    torch.testing.assert_close(out, torch.einsum("hvu,uhd->vhd", series, v), rtol=0, atol=1e-10)
    eye = torch.eye(n, dtype=torch.float64)
    limit = alpha * torch.linalg.inv(eye - (1 - alpha) * attn)
    out_long = diffusion_attention(g, q, k, v, alpha=alpha, hops=120)
    torch.testing.assert_close(out_long, torch.einsum("hvu,uhd->vhd", limit, v), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kwargs", DIFFUSIONS)
def test_operator_rows_sum_to_one(kwargs):
    n, spec = PATTERNS["grid"]
    g = build_graph(n, spec)
    q, k, _ = random_qkv(n)
    ones = torch.ones(n, 2, 1, dtype=torch.float64)
    torch.testing.assert_close(diffusion_attention(g, q, k, ones, **kwargs), ones,
                               rtol=0, atol=1e-12)
    operator = diffusion_operator(dense_attention_matrix(dense_mask(g), q, k), **kwargs)
    torch.testing.assert_close(operator.sum(-1), torch.ones(2, n, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_one_hop_no_teleport_is_plain_sparse_attention():
    n, spec = PATTERNS["window"]
    g = build_graph(n, spec)
    q, k, v = random_qkv(n)
    attn = dense_attention_matrix(dense_mask(g), q, k)
    torch.testing.assert_close(diffusion_attention(g, q, k, v, alpha=0.0, hops=1),
                               torch.einsum("hvu,uhd->vhd", attn, v), rtol=0, atol=1e-12)


def test_diffusion_reaches_tokens_k_hops_away():
    """With a window of 1, the output at token 0 depends on token K but not on token K+1."""
    g = build_graph(20, PatternSpec(window=1))
    q, k, v = random_qkv(20)
    base = diffusion_attention(g, q, k, v, hops=3)
    for token, expect_change in ((3, True), (4, False)):
        v2 = v.clone()
        v2[token] += 1.0
        changed = not torch.allclose(diffusion_attention(g, q, k, v2, hops=3)[0], base[0],
                                     rtol=0, atol=1e-14)
        assert changed == expect_change


def test_batched_equals_per_sequence():
    spec = PATTERNS["window+global+random"][1]
    lengths = [17, 5, 30]
    g = batch_graphs(lengths, spec)
    q, k, v = random_qkv(sum(lengths))
    out = diffusion_attention(g, q, k, v, hops=4)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        single = diffusion_attention(build_graph(n, spec), q[part], k[part], v[part], hops=4)
        torch.testing.assert_close(out[part], single, rtol=0, atol=1e-12)
        start += n


def test_padded_form_equals_packed_and_ignores_padding():
    torch.manual_seed(0)
    spec = PatternSpec(window=2, num_global=1, num_random=2)
    layer = DiffuserAttention(16, 4, hops=3).double().eval()
    lengths = [9, 4, 12]
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    packed = PackedBatch.from_mask(mask, spec)
    out = layer(packed, x)
    for b, n in enumerate(lengths):
        single = layer(build_graph(n, spec), x[b, :n])
        torch.testing.assert_close(out[b, :n], single, rtol=0, atol=1e-12)
    garbage = x.clone()
    garbage[~mask] = 1e6 * torch.randn(int((~mask).sum()), 16, dtype=torch.float64)
    out_garbage = layer(packed, garbage)
    torch.testing.assert_close(out_garbage[mask], out[mask], rtol=0, atol=0)
    assert torch.all(out_garbage[~mask] == 0)


def test_return_attention_rows_sum_to_one():
    n, spec = PATTERNS["official"]
    g = build_graph(n, spec)
    q, k, v = random_qkv(n, dtype=torch.float32)
    out, attn = diffusion_attention(g, q, k, v, return_attention=True)
    assert out.shape == (n, 2, 4) and attn.shape == (g.num_edges(), 2)
    sums = torch.zeros(n, 2).index_add_(0, g.edges()[1], attn)
    torch.testing.assert_close(sums, torch.ones(n, 2))


def test_dropout_only_in_training():
    g = build_graph(30, PatternSpec(window=2))
    q, k, v = random_qkv(30)
    kwargs = dict(attn_dropout=0.3, hop_dropout=0.3)
    eval_out = diffusion_attention(g, q, k, v, **kwargs)
    torch.testing.assert_close(eval_out, diffusion_attention(g, q, k, v), rtol=0, atol=0)
    torch.manual_seed(1)
    train_out = diffusion_attention(g, q, k, v, training=True, **kwargs)
    assert not torch.allclose(train_out, eval_out)


def test_float32_matches_float64():
    n, spec = PATTERNS["window+global+random"]
    g = build_graph(n, spec)
    q, k, v = random_qkv(n)
    out64 = diffusion_attention(g, q, k, v)
    out32 = diffusion_attention(g, q.float(), k.float(), v.float())
    torch.testing.assert_close(out32, out64.float(), rtol=1e-5, atol=1e-5)


def test_module_shapes_and_gradients():
    g = batch_graphs([10, 6], PatternSpec(window=2, num_random=1))
    layer = DiffuserAttention(32, 4, kernel="heat", hops=3)
    x = torch.randn(16, 32, requires_grad=True)
    out, attn = layer(g, x, return_attention=True)
    assert out.shape == (16, 32) and attn.shape == (g.num_edges(), 4)
    out.sum().backward()
    assert x.grad is not None and layer.query.weight.grad.abs().sum() > 0
    assert "hops=3" in repr(layer)


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=1.5), "alpha\n  Input should be less than or equal to 1"),
    (dict(alpha=-0.1), "alpha"),
    (dict(hops=0), "hops\n  Input should be greater than or equal to 1"),
    (dict(hops=2.0), "hops"),
    (dict(kernel="gauss"), "unknown kernel 'gauss'; registered kernels: ppr, heat"),
    (dict(kernel="heat", t=0.0), "t\n  Input should be greater than 0"),
    (dict(attn_dropout=1.0), "attn_dropout"),
    (dict(hop_dropout=-0.1), "hop_dropout"),
])
def test_bad_diffusion_arguments(kwargs, message):
    g = build_graph(8, PatternSpec(window=1))
    q, k, v = random_qkv(8)
    with pytest.raises(ValueError, match=message):
        diffusion_attention(g, q, k, v, **kwargs)


def test_bad_tensors():
    g = build_graph(8, PatternSpec(window=1))
    q, k, v = random_qkv(8)
    cases = [
        ((q[:7], k[:7], v[:7]), "N=7 rows but the batch has 8 tokens"),
        ((q, k[:, :1], v), "q and k must have the same shape"),
        ((q, k, v[:, :1]), "v must have the same N and H"),
        ((q, k.float(), v), "one dtype"),
        ((q[..., 0], k, v), "q must be a \\(N, H, D\\) tensor"),
        ((q.long(), k.long(), v.long()), "float64, float32, bfloat16 or float16 tensor"),
        ((q, k, v.to(torch.complex128)), "v must be a float64"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            diffusion_attention(g, *args)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        DiffuserAttention(30, 4)
    with pytest.raises(ValueError, match="alpha"):
        DiffuserAttention(32, 4, alpha=2.0)
    layer = DiffuserAttention(32, 4)
    with pytest.raises(ValueError, match="x must be \\(N, 32\\)"):
        layer(build_graph(5, PatternSpec(window=1)), torch.randn(5, 16))


def test_full_attention_equals_graph_attention_over_every_pair_and_checks_lengths():
    from diffuser_graph.attention import full_attention

    lengths = [5, 3]
    q, k, v = random_qkv(8)
    everything = batch_graphs(lengths, PatternSpec(window=10))
    torch.testing.assert_close(full_attention(lengths, q, k, v),
                               diffusion_attention(everything, q, k, v, alpha=0.0, hops=1),
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="N=8 rows but lengths sum to 9"):
        full_attention([5, 4], q, k, v)
    with pytest.raises(ValueError, match="attn_dropout"):
        full_attention(lengths, q, k, v, attn_dropout=1.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[6, 6], [6, 4]])
def test_full_attention_with_and_without_padding_matches_the_pattern(lengths, causal):
    from diffuser_graph.attention import full_attention

    q, k, v = random_qkv(sum(lengths))
    everything = batch_graphs(lengths, PatternSpec(window=10, causal=causal))
    torch.testing.assert_close(full_attention(lengths, q, k, v, causal=causal),
                               diffusion_attention(everything, q, k, v, alpha=0.0, hops=1),
                               rtol=0, atol=1e-12)


def test_full_attention_on_equal_lengths_runs_the_fused_kernel():
    from torch.profiler import ProfilerActivity, profile

    from diffuser_graph.attention import full_attention

    q, k, v = (x.float() for x in random_qkv(2 * 64))
    for lengths, fused in (([64, 64], True), ([64, 60, 4], False)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            full_attention(lengths, q, k, v)
        names = {event.key for event in prof.key_averages()}
        assert ("aten::_scaled_dot_product_flash_attention" in names) is fused


def _recompute_case(engine):
    spec = PatternSpec(window=3, num_global=1, num_random=2, seed=0)
    batch = PackedBatch.from_lengths([20, 13], spec, engine=engine)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(33, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
               for _ in range(3))
    hop_weights = torch.softmax(torch.randn(3, 4, dtype=torch.float64, generator=gen), dim=-1)
    return batch, q, k, v, hop_weights.requires_grad_()


@pytest.mark.parametrize("recompute_hops", [False, True], ids=["keep-hops", "recompute-hops"])
@pytest.mark.parametrize("learned", [False, True], ids=["ppr", "learned"])
@pytest.mark.parametrize("engine", ["dgl", "block", "block, a slice per head", "gather"])
def test_recomputed_heads_give_the_same_values_and_gradients(monkeypatch, engine, learned,
                                                             recompute_hops):
    if engine.startswith("block,"):
        monkeypatch.setattr(block_engine, "CHUNK_ROWS", 20)
    batch, q, k, v, hop_weights = _recompute_case(engine.split(",")[0])
    if engine.startswith("block,"):
        assert len(batch.plan.slices(3)) == 6
    inputs = [q, k, v, hop_weights] if learned else [q, k, v]
    weights = torch.randn(33, 3, 4, dtype=torch.float64)

    def run(recompute_heads):
        out = diffusion_attention(batch, q, k, v, hops=3, alpha=0.2,
                                  recompute_heads=recompute_heads,
                                  recompute_hops=recompute_hops and recompute_heads > 0,
                                  hop_weights=hop_weights if learned else None)
        return out, torch.autograd.grad((out * weights).sum(), inputs)

    expected, expected_grads = run(0)
    for recompute_heads in (1, 2, 5):
        out, grads = run(recompute_heads)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        for grad, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("recompute_hops", [False, True], ids=["keep-hops", "recompute-hops"])
def test_recomputed_heads_replay_their_dropout_in_backward(recompute_hops):
    batch, q, k, v, _ = _recompute_case("block")
    options = dict(hops=3, alpha=0.2, attn_dropout=0.3, hop_dropout=0.3, training=True)
    torch.manual_seed(7)
    out = diffusion_attention(batch, q, k, v, recompute_heads=2, recompute_hops=recompute_hops,
                              **options)
    grads = torch.autograd.grad(out.square().sum(), [q, k, v])
    torch.manual_seed(7)  # the same masks, drawn chunk by chunk and kept for backward
    chunks = [diffusion_attention(batch, q[:, heads], k[:, heads], v[:, heads], **options)
              for heads in (slice(0, 2), slice(2, 3))]
    expected = torch.cat(chunks, dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for grad, want in zip(grads, torch.autograd.grad(expected.square().sum(), [q, k, v]),
                          strict=True):
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


def test_recomputed_heads_pass_gradcheck_and_refuse_a_negative_count():
    batch, q, k, v, _ = _recompute_case("block")
    assert torch.autograd.gradcheck(
        lambda q, k, v: diffusion_attention(batch, q, k, v, hops=2, recompute_heads=2),
        (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: diffusion_attention(batch, q, k, v, hops=2, recompute_heads=2,
                                            recompute_hops=True), (q, k, v))
    with pytest.raises(ValueError, match="recompute_heads must be >= 0"):
        diffusion_attention(batch, q, k, v, recompute_heads=-1)
    with pytest.raises(ValueError, match="recompute_heads must be an integer"):
        DiffuserAttention(12, 3, recompute_heads=1.5)
    with pytest.raises(ValueError, match="recompute_hops must be True or False"):
        diffusion_attention(batch, q, k, v, recompute_heads=1, recompute_hops=1)
    with pytest.raises(ValueError, match="recompute_hops must be True or False"):
        DiffuserAttention(12, 3, recompute_heads=1, recompute_hops="yes")
