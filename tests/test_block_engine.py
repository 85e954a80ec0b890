"""The block engine's own edge cases: layouts, the auto rule and the patterns it refuses.

Parity with the other engines on every pattern kind is in test_engines.py."""
import pytest
import torch

from diffuser_graph import (
    PackedBatch,
    PatternSpec,
    build_graph,
    dense_diffusion_attention,
    dense_mask,
    diffusion_attention,
)
from diffuser_graph.engines.block import block_layout, prefer_block, supports

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


def block(lengths, spec):
    return PackedBatch.from_lengths(lengths, spec, engine="block")


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("kwargs", DIFFUSIONS)
def test_block_equals_dgl_and_dense_reference(pattern, kwargs):
    n, spec = PATTERNS[pattern]
    g = build_graph(n, spec)
    q, k, v = qkv(n)
    out = diffusion_attention(block([n], spec), q, k, v, **kwargs)
    torch.testing.assert_close(out, diffusion_attention(g, q, k, v, **kwargs), rtol=0, atol=1e-10)
    torch.testing.assert_close(out, dense_diffusion_attention(dense_mask(g), q, k, v, **kwargs),
                               rtol=0, atol=1e-10)


def test_layout_holds_exactly_the_graphs_edges():
    n, spec = PATTERNS["wide window, odd length"]
    layout = block_layout(n, spec)
    band = int(layout.band_mask.sum())
    globals_ = len(layout.globals)
    global_edges = globals_ * n + (n - globals_) * globals_
    assert band + global_edges + int(layout.random_mask.sum()) == build_graph(n, spec).num_edges()
    assert block_layout(n, spec) is layout  # cached


def test_auto_prefers_block_only_where_it_measured_faster():
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
    with pytest.raises(ValueError, match="engine='block' needs a 1-D window pattern"):
        block([16], spec)


def test_block_engine_gives_no_per_edge_attention_so_return_attention_uses_another():
    n, spec = PATTERNS["window+global+random"]
    q, k, v = qkv(n)
    batch = block([n], spec)
    assert not batch.plan.edge_order and batch.edge_plan.edge_order
    with pytest.raises(ValueError, match="holds attention in blocks"):
        batch.plan.edge_attention(batch.plan.attention(q, k))
    out, attn = diffusion_attention(batch, q, k, v, return_attention=True)
    torch.testing.assert_close(out, diffusion_attention(batch, q, k, v), rtol=0, atol=1e-10)
    assert attn.shape == (build_graph(n, spec).num_edges(), 2)
