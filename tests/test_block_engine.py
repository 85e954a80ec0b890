import pytest
import torch

from diffuser_graph import (DiffuserAttention, PatternSpec, batch_graphs, block_diffusion_attention,
                            build_graph, dense_diffusion_attention, dense_mask, diffusion_attention)
from diffuser_graph.block_engine import block_layout, supports

PATTERNS = {
    "window": (70, PatternSpec(window=3)),
    "window+global+random": (90, PatternSpec(window=4, num_global=2, num_random=3, seed=1)),
    "explicit globals": (64, PatternSpec(window=2, global_positions=(5, 6, 40), num_random=2)),
    "shorter than the window": (7, PatternSpec(window=32, num_global=1)),
    "scarce random keys": (12, PatternSpec(window=2, num_random=20)),
    "wide window, odd length": (131, PatternSpec(window=20, num_global=1, num_random=4)),
}
DIFFUSIONS = [dict(alpha=0.1, hops=5), dict(alpha=0.0, hops=1), dict(alpha=0.5, hops=3),
              dict(kernel="heat", hops=4, t=2.0)]


def qkv(n, dtype=torch.float64, seed=0, heads=2, dim=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, dim, generator=gen, dtype=dtype).requires_grad_()
            for _ in range(3)]


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("kwargs", DIFFUSIONS)
def test_block_equals_dgl_and_dense_reference(pattern, kwargs):
    n, spec = PATTERNS[pattern]
    g = build_graph(n, spec)
    q, k, v = qkv(n)
    block = block_diffusion_attention([n], spec, q, k, v, **kwargs)
    torch.testing.assert_close(block, diffusion_attention(g, q, k, v, **kwargs), rtol=0, atol=1e-10)
    torch.testing.assert_close(block, dense_diffusion_attention(dense_mask(g), q, k, v, **kwargs),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("pattern", ["window+global+random", "explicit globals"])
def test_gradients_equal_dgl(pattern):
    n, spec = PATTERNS[pattern]
    g = build_graph(n, spec)
    weights = torch.randn(n, 2, 4, dtype=torch.float64)
    grads = []
    for run in (lambda q, k, v: block_diffusion_attention([n], spec, q, k, v, hops=3),
                lambda q, k, v: diffusion_attention(g, q, k, v, hops=3)):
        q, k, v = qkv(n)
        (run(q, k, v) * weights).sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for block_grad, dgl_grad in zip(*grads):
        torch.testing.assert_close(block_grad, dgl_grad, rtol=0, atol=1e-10)


def test_gradcheck():
    spec = PatternSpec(window=1, num_global=1, num_random=2)
    q, k, v = qkv(10, heads=1, dim=3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_diffusion_attention([10], spec, q, k, v, hops=3, kernel="heat"),
        (q, k, v))


def test_float32_and_batches():
    spec = PatternSpec(window=8, num_global=2, num_random=3)
    lengths = [50, 9, 130]
    q, k, v = qkv(sum(lengths), dtype=torch.float32)
    block = block_diffusion_attention(lengths, spec, q, k, v)
    dgl_out = diffusion_attention(batch_graphs(lengths, spec), q, k, v)
    torch.testing.assert_close(block, dgl_out, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    n, spec = PATTERNS["window+global+random"]
    q, k, v = qkv(n)
    kwargs = dict(attn_dropout=0.3, hop_dropout=0.3)
    evaluation = block_diffusion_attention([n], spec, q, k, v, **kwargs)
    torch.testing.assert_close(evaluation, block_diffusion_attention([n], spec, q, k, v))
    torch.manual_seed(0)
    assert not torch.allclose(block_diffusion_attention([n], spec, q, k, v, training=True,
                                                        **kwargs), evaluation)


def test_module_engines_agree_and_auto_falls_back():
    torch.manual_seed(0)
    spec = PatternSpec(window=4, num_global=1, num_random=2)
    layers = {engine: DiffuserAttention(16, 2, hops=3, engine=engine, pattern=spec).double()
              for engine in ("dgl", "block", "auto")}
    state = layers["dgl"].state_dict()
    for layer in layers.values():
        layer.load_state_dict(state)
        layer.eval()
    g = batch_graphs([30, 12], spec)
    x = torch.randn(42, 16, dtype=torch.float64)
    reference = layers["dgl"](g, x)
    for engine in ("block", "auto"):
        assert layers[engine].block_capable
        torch.testing.assert_close(layers[engine](g, x), reference, rtol=0, atol=1e-10)
    grid = PatternSpec(kind="grid", image_size=(4, 4))
    assert not DiffuserAttention(16, 2, engine="auto", pattern=grid).block_capable


def test_auto_prefers_block_only_where_it_measured_faster():
    from diffuser_graph.block_engine import prefer_block

    wide, medium, narrow = (PatternSpec(window=w) for w in (32, 8, 2))
    assert prefer_block(wide, [128] * 16) and prefer_block(wide, [4096])
    assert not prefer_block(wide, [60] * 32)
    assert prefer_block(medium, [256] * 8) and not prefer_block(medium, [128] * 16)
    assert not prefer_block(narrow, [4096])
    assert not prefer_block(PatternSpec(kind="official"), [4096])


@pytest.mark.parametrize("spec", [PatternSpec(kind="grid", image_size=(4, 4)),
                                  PatternSpec(kind="official"), PatternSpec(window=2, causal=True),
                                  PatternSpec(window=2, dilation=2)])
def test_unsupported_patterns_are_refused_clearly(spec):
    assert not supports(spec)
    with pytest.raises(ValueError, match="block engine needs kind='window'"):
        block_layout(16, spec)
    with pytest.raises(ValueError, match="engine='block' needs"):
        DiffuserAttention(16, 2, engine="block", pattern=spec)


def test_bad_arguments():
    spec = PatternSpec(window=2)
    q, k, v = qkv(10)
    with pytest.raises(ValueError, match="N=10 rows but the lengths sum to 12"):
        block_diffusion_attention([12], spec, q, k, v)
    with pytest.raises(ValueError, match="engine must be one of"):
        DiffuserAttention(16, 2, engine="cuda")
    with pytest.raises(ValueError, match="alpha"):
        block_diffusion_attention([10], spec, q, k, v, alpha=2.0)
    with pytest.raises(ValueError, match="one dtype"):
        block_diffusion_attention([10], spec, q, k.float(), v)
    with pytest.raises(ValueError, match="hop_dropout must be a probability"):
        block_diffusion_attention([10], spec, q, k, v, hop_dropout=1.5)
