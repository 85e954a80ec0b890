"""The block engine's own edge cases: layouts of every pattern kind, the auto rule, the
memory-lean gathered products.

Parity with the other engines on every pattern kind is in test_engines.py."""
import numpy as np
import pytest
import torch

from diffuser_graph import (
    Diffusion,
    PackedBatch,
    PatternSpec,
    build_graph,
    dense_diffusion_attention,
    dense_mask,
    diffusion_attention,
)
from diffuser_graph.engines import block as block_engine
from diffuser_graph.engines.block import block_layout, prefer_block

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


@pytest.mark.parametrize("lengths", [[64], [64, 64], [40, 64, 40]])
def test_one_head_sliced_out_of_several_gives_that_heads_result(lengths):
    # A head sliced from (N, H, D) is strided: the plan layout must not keep those strides
    # (band windows are strided views that assume contiguous rows).
    spec = PATTERNS["window+global+random"][1]
    q, k, v = qkv(sum(lengths), heads=3)
    batch = block(lengths, spec)
    whole = diffusion_attention(batch, q, k, v, alpha=0.1, hops=3)
    for head in range(3):
        one = slice(head, head + 1)
        torch.testing.assert_close(
            diffusion_attention(batch, q[:, one], k[:, one], v[:, one], alpha=0.1, hops=3),
            whole[:, one], rtol=0, atol=1e-12)


@pytest.mark.parametrize("needs_grad", ["q", "v"])
def test_gradients_reach_an_input_alone_when_only_it_needs_one(needs_grad):
    n, spec = PATTERNS["window+global+random"]
    inputs = dict(zip("qkv", (x.detach() for x in qkv(n)), strict=True))
    x = inputs[needs_grad].requires_grad_()
    grads = []
    for batch in (block([n], spec), build_graph(n, spec)):
        diffusion_attention(batch, **inputs, alpha=0.2, hops=3).pow(2).sum().backward()
        grads.append(x.grad)
        x.grad = None
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


def test_layout_holds_exactly_the_graphs_edges():
    n, spec = PATTERNS["wide window, odd length"]
    layout = block_layout(n, spec)
    assert layout.padded > n  # the padded queries attend only to themselves
    rows = layout.band_mask.reshape(layout.padded, -1)
    left = layout.geometry.left
    padded_rows = rows[n:]
    assert padded_rows.sum(dim=1).tolist() == [1] * (layout.padded - n)
    assert padded_rows[:, left:left + layout.geometry.block].diagonal(n % layout.geometry.block
                                                                      ).all()
    band = int(rows[:n].sum())
    globals_ = len(layout.globals)
    global_edges = globals_ * n + (n - globals_) * globals_
    assert band + global_edges + int(layout.random_mask.sum()) == build_graph(n, spec).num_edges()
    assert block_layout(n, spec) is layout  # cached


def test_auto_prefers_block_only_where_it_measured_faster():
    banded = [PatternSpec(window=32), PatternSpec(window=16, causal=True)]
    for spec in banded:
        assert prefer_block(spec, [128] * 16) and prefer_block(spec, [4096])
        assert not prefer_block(spec, [60] * 32)
    gathered = [PatternSpec(window=2), PatternSpec(window=8, causal=True),
                PatternSpec(kind="grid", image_size=(4, 4))]  # local edges without a band
    for spec in gathered:
        assert prefer_block(spec, [16] * 8)
    assert prefer_block(PatternSpec(window=2), [4096])
    assert not prefer_block(PatternSpec(window=1), [4] * 32)
    assert not prefer_block(PatternSpec(kind="grid", image_size=(2, 2)), [4])  # under 8 tokens
    assert prefer_block(PatternSpec(kind="official"), [1024])
    assert not prefer_block(PatternSpec(kind="official"), [128])


NO_BAND = (1, 0, -1)  # BandGeometry.empty(): every local edge gathered


@pytest.mark.parametrize("spec,geometry", [
    (PatternSpec(window=12), (16, 12, 12)),
    (PatternSpec(window=32, num_random=3), (32, 32, 32)),
    (PatternSpec(window=16, causal=True), (16, 16, 0)),
    (PatternSpec(kind="grid", image_size=(4, 5), window=2), (16, 12, 12)),
    (PatternSpec(kind="official"), (32, 32, 32)),
    # a band mostly of holes: 11 edges in 26 keys, 41 (dilated) in 120, 9 in 24, 9 in 42
    (PatternSpec(window=5), NO_BAND),
    (PatternSpec(window=20, dilation=2), NO_BAND),
    (PatternSpec(window=8, causal=True), NO_BAND),
    (PatternSpec(kind="grid", image_size=(8, 12), window=1, num_random=1), NO_BAND),
])
def test_local_edges_lie_in_a_band_unless_it_would_be_mostly_holes(spec, geometry):
    from diffuser_graph.engines.block import band_geometry

    shape = band_geometry(spec)
    assert (shape.block, shape.left, shape.right) == geometry
    n = spec.image_size[0] * spec.image_size[1] if spec.kind == "grid" else 600
    layout = block_layout(n, spec)
    band, gathered = int(layout.band_mask.sum()), int(layout.random_mask.sum())
    if geometry == NO_BAND:
        assert band == 0 and layout.padded == n  # blocks of one query: nothing padded
        local = build_graph(n, spec.model_copy(update={"num_random": 0})).num_edges()
        assert gathered == local + n * spec.num_random  # every local and random edge
    else:
        assert band > 5 * gathered  # most edges are in the band, not gathered
    if spec.kind == "official":  # the authors' globals that fall below n: full rows and columns
        from diffuser_graph.patterns import _official_adjacency

        adj = _official_adjacency(64, 64, 64, 4096)[:n, :n]
        expected = np.flatnonzero(adj.all(axis=0) & adj.all(axis=1))
        assert layout.globals.tolist() == expected.tolist() and len(expected) == 8


def test_causal_globals_are_masked_by_causality():
    spec = PatternSpec(window=2, global_positions=(0, 30), causal=True, num_random=1)
    layout = block_layout(40, spec)
    assert layout.globals.tolist() == [0, 30]
    assert layout.global_keys is not None and layout.global_rows is not None
    assert layout.global_keys[29].tolist() == [True, False]  # query 29 cannot see token 30
    assert layout.global_rows[1, 31:].sum() == 0  # token 30 sees nothing after itself
    q, k, v = qkv(40)
    g = build_graph(40, spec)
    torch.testing.assert_close(diffusion_attention(block([40], spec), q, k, v),
                               dense_diffusion_attention(dense_mask(g), q, k, v),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("spec", [PatternSpec(window=3, num_global=2, num_random=3, seed=1),
                                  PatternSpec(kind="official", window=8, num_global=2,
                                              num_random=2, max_len=40)], ids=str)
def test_scores_equal_q_dot_k_on_every_part_and_pass_gradcheck(spec):
    """The score function of the block engine: each part's entries are q . k / sqrt(D) of its
    query and key, and its one backward (every part's gradient added into dq and dk) is the
    gradient of that."""
    from diffuser_graph.engines.block import _Scores
    from diffuser_graph.engines.gathered import GatherIndex

    n, heads, dim = 37, 2, 3
    layout = block_layout(n, spec)
    layout_gather = GatherIndex.build(layout.random_keys, layout.random_mask, heads,
                                      layout.padded)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(heads, layout.padded, dim, dtype=torch.float64, generator=gen,
                        requires_grad=True) for _ in range(2))
    band, to_globals, random, rows = _Scores.apply(layout, layout_gather, q, k)
    dense = q.detach() @ k.detach().transpose(1, 2) / dim ** 0.5  # (H, padded, padded)
    b, left = layout.geometry.block, layout.geometry.left
    query = torch.arange(layout.padded)
    key = (query // b * b - left)[:, None] + torch.arange(layout.geometry.width)
    inside = (key >= 0) & (key < layout.padded)
    got = band.view(heads, layout.padded, -1)
    torch.testing.assert_close(got[:, inside], dense[:, query[:, None].expand_as(key)[inside],
                                                      key[inside]])
    glob = layout.globals
    torch.testing.assert_close(to_globals, dense[:, :, glob])
    torch.testing.assert_close(rows, dense[:, glob, :])
    row, keyed = layout_gather.row, layout_gather.key
    torch.testing.assert_close(random, dense.reshape(-1, layout.padded)[row, keyed % layout.padded])
    assert torch.autograd.gradcheck(lambda q, k: _Scores.apply(layout, layout_gather, q, k),
                                    (q, k))


def test_gathered_products_match_plain_gathers_and_pass_gradcheck():
    from diffuser_graph.engines import gathered

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, 7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    keys = torch.randint(0, 7, (9, 4), generator=gen).sort(dim=1).values
    mask = torch.rand(9, 4, generator=gen) < 0.7  # ragged rows, one of them empty
    mask[4] = False
    index = gathered.GatherIndex.build(keys, mask, batch=2, rows=7)
    entries = torch.nonzero(mask.expand(2, 9, 4)).tolist()  # (table, query, slot), packed order
    assert index.row.numel() == len(entries)
    a = torch.randn(len(entries), dtype=torch.float64, generator=gen, requires_grad=True)

    def plain_dot(q, k):
        return torch.stack([q[b, i] @ k[b, keys[i, r]] for b, i, r in entries])

    def plain_sum(a, k):
        out = [[torch.zeros(3, dtype=torch.float64) for _ in range(9)] for _ in range(2)]
        for (b, i, r), weight in zip(entries, a, strict=True):
            out[b][i] = out[b][i] + weight * k[b, keys[i, r]]
        return torch.stack([torch.stack(rows) for rows in out])

    flat_q, flat_k = q.detach().reshape(18, 3), k.detach().reshape(14, 3)
    torch.testing.assert_close(index.gather_dot(flat_q, flat_k), plain_dot(q, k).detach())
    total = a.detach().clone()
    assert index.gather_dot(flat_q, flat_k, add_to=total) is total  # accumulated in place
    torch.testing.assert_close(total, plain_dot(q, k).detach() + a.detach())
    torch.testing.assert_close(gathered.gather_sum(a, k, index), plain_sum(a, k))
    assert torch.autograd.gradcheck(lambda a, k: gathered.gather_sum(a, k, index), (a, k))
    # The transposed sum, also from weights ordered by key once.
    expected = torch.zeros(2, 7, 3, dtype=torch.float64)
    for (b, i, r), weight in zip(entries, a.detach(), strict=True):
        expected[b, keys[i, r]] += weight * q[b, i].detach()
    values = q.detach().reshape(18, 3)
    torch.testing.assert_close(index.scatter_sum(a.detach(), values).view(2, 7, 3), expected)
    torch.testing.assert_close(
        index.scatter_sum_by_key(a.detach()[index.by_key], values).view(2, 7, 3), expected)
    # Packing and unpacking the rectangular (queries, R) layout.
    square = index.unpack(a.detach(), fill=-1.0).view(2, 9, 4)
    assert (square[~mask.expand(2, 9, 4)] == -1).all()
    torch.testing.assert_close(index.pack(square.view(18, 4)), a.detach())


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


@pytest.mark.parametrize("spec", [PatternSpec(window=2, num_global=1, num_random=2),  # no band
                                  PatternSpec(window=12, num_global=1, num_random=2)], ids=str)
def test_without_the_compiled_loops_the_torch_path_gives_the_same_values_and_gradients(
        monkeypatch, spec):
    """The path a GPU takes (torch's softmax over a rectangle, sampled_addmm), with and without
    a band."""
    from diffuser_graph.engines import native
    from diffuser_graph.engines.block import band_geometry

    assert bool(band_geometry(spec).width) == (spec.window == 12)
    lengths = [40, 23]
    weights = torch.randn(sum(lengths), 2, 4, dtype=torch.float64)
    grads = []
    for switch in ("1", "0"):
        monkeypatch.setenv(native.SWITCH, switch)
        native.library.cache_clear()
        if switch == "1" and native.library() is None:
            pytest.skip("no C compiler: nothing compiled to compare the torch path with")
        q, k, v = qkv(sum(lengths))
        out = diffusion_attention(block(lengths, spec), q, k, v, alpha=0.1, hops=3)
        (out * weights).sum().backward()
        grads.append([out.detach(), q.grad, k.grad, v.grad])
    native.library.cache_clear()
    for compiled, fallback in zip(*grads, strict=True):
        torch.testing.assert_close(fallback, compiled, rtol=0, atol=1e-10)


@pytest.mark.parametrize("num_global,n,dense", [(1, 60, 0), (2, 60, 2), (1, 600, 1)])
def test_without_a_band_a_single_global_token_is_gathered_in_short_sequences(num_global, n,
                                                                             dense):
    from diffuser_graph.engines.block import band_geometry

    spec = PatternSpec(window=2, num_global=num_global, num_random=1)
    assert not band_geometry(spec).width
    layout = block_layout(n, spec)
    assert len(layout.globals) == dense
    gathered = int(layout.random_mask.sum())
    edges = build_graph(n, spec).num_edges()
    global_edges = dense * n + (n - dense) * dense
    assert gathered + global_edges == edges  # with one global: its row and column gathered
    q, k, v = qkv(n)
    torch.testing.assert_close(diffusion_attention(block([n], spec), q, k, v),
                               dense_diffusion_attention(dense_mask(build_graph(n, spec)), q, k,
                                                         v), rtol=0, atol=1e-10)



@pytest.mark.parametrize("chunk_rows", [2**16, 96], ids=["one slice", "a slice per head"])
@pytest.mark.parametrize("kwargs", DIFFUSIONS, ids=["ppr", "one hop", "alpha 0.5", "heat"])
def test_the_diffusion_keeps_v_itself_and_the_later_iterates(monkeypatch, kwargs, chunk_rows):
    """What the diffusion keeps for the gradient of A is the attention, v itself (not its
    slices' copies in the plan layout, nor a scaled copy theta_K v: the first hop propagates v
    and scales its output) and each slice's later iterates."""
    monkeypatch.setattr(block_engine, "CHUNK_ROWS", chunk_rows)
    n, spec = PATTERNS["window+global+random"]
    batch = block([n], spec)
    q, k, v = qkv(n)
    attention = batch.plan.attention(q, k)
    slices = len(batch.plan.slices(2))
    assert slices == (1 if chunk_rows > 2 * n else 2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = batch.plan.diffuse(attention, v, Diffusion(**kwargs), 0.0)
    assert out.shape == v.shape
    assert len(saved) == len(attention) + 1 + (kwargs["hops"] - 1) * slices
    assert all(x is part for x, part in zip(saved, attention, strict=False))
    assert saved[len(attention)] is v
    later = saved[len(attention) + 1:]  # (pairs, rows, D) per slice
    assert all(x.shape == (2 // slices, n, 4) for x in later)


def test_slices_cut_a_groups_sequences_and_heads_by_rows(monkeypatch):
    """On the CPU a group's (sequence, head) pairs are cut into slices of at most CHUNK_ROWS
    rows (at least one pair each); elsewhere a group is one slice."""
    monkeypatch.setattr(block_engine, "CHUNK_ROWS", 3 * 64)
    spec = PATTERNS["window+global+random"][1]
    plan = block([64, 64, 40], spec).plan
    padded = {group.layout.n: group.layout.padded for group in plan.groups}
    assert padded == {64: 64, 40: 40}  # no band (window 4): no padding
    assert [(piece.layout.n, piece.size) for piece in plan.slices(4)] == [
        (64, 3), (64, 3), (64, 2), (40, 4)]
    assert [piece.size for piece in plan.slices(1)] == [2, 1]
    monkeypatch.setattr(block_engine, "CHUNK_ROWS", 10)  # less than one pair: a pair each
    assert [piece.size for piece in block([64], spec).plan.slices(3)] == [1, 1, 1]
    on_meta = block_engine.BlockPlan([64, 64], spec, torch.device("meta"))
    assert [piece.size for piece in on_meta.slices(4)] == [8]


@pytest.mark.parametrize("learned", [False, True], ids=["ppr", "learned"])
@pytest.mark.parametrize("lengths", [[90], [90, 90, 50], [90, 50, 90]])
def test_sliced_diffusion_gives_the_values_and_gradients_of_one_slice(monkeypatch, lengths,
                                                                      learned):
    """Slices that split heads and sequences (and sequences of one length apart in the batch)
    compute what one batched call computes, and what DGL computes; a second backward through
    the same graph gives the same gradients."""
    spec = PATTERNS["window+global+random"][1]
    q, k, v = qkv(sum(lengths), heads=3)
    gen = torch.Generator().manual_seed(1)
    hop_weights = (torch.softmax(torch.randn(3, 5, generator=gen, dtype=torch.float64), -1)
                   .requires_grad_() if learned else None)
    inputs = [q, k, v] + ([hop_weights] if learned else [])
    results = []
    for chunk_rows in (2**16, 2 * 90):  # one slice per length; two (sequence, head) pairs
        monkeypatch.setattr(block_engine, "CHUNK_ROWS", chunk_rows)
        batch = block(lengths, spec)
        out = diffusion_attention(batch, q, k, v, alpha=0.1, hops=4, hop_weights=hop_weights)
        loss = out.square().sum()
        grads = torch.autograd.grad(loss, inputs, retain_graph=True)
        for again, grad in zip(torch.autograd.grad(loss, inputs), grads, strict=True):
            torch.testing.assert_close(again, grad, rtol=0, atol=0)
        results.append((out, *grads))
    # 180 rows: two pairs of 90 tokens, three of 50
    assert [piece.size for piece in batch.plan.slices(3)] == {
        1: [2, 1], 3: [2, 2, 2, 3]}[len(lengths)]
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    dgl = diffusion_attention(PackedBatch.from_lengths(lengths, spec, engine="dgl"), q, k, v,
                              alpha=0.1, hops=4, hop_weights=hop_weights)
    torch.testing.assert_close(results[1][0], dgl, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dropout, hop_dropout_at", [(0.0, "before_mix"), (0.3, "before_mix"),
                                                     (0.3, "after_mix")])
def test_sliced_diffusion_passes_gradcheck(monkeypatch, dropout, hop_dropout_at):
    """Each slice's adjoint series uses its own hop inputs and dropout masks (the same masks
    on every call: the random state is reset inside)."""
    monkeypatch.setattr(block_engine, "CHUNK_ROWS", 9)  # a (sequence, head) pair per slice
    spec = PatternSpec(window=1, num_global=1, num_random=2, seed=3)
    batch = block([9, 6, 9], spec)  # the 9-token sequences apart
    assert len(batch.plan.slices(2)) == 6
    q, k, v = qkv(24, heads=2, dim=2)

    def attend(q, k, v):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return diffusion_attention(batch, q, k, v, alpha=0.2, hops=3, hop_dropout=dropout,
                                       hop_dropout_at=hop_dropout_at, training=True)

    torch.autograd.gradcheck(attend, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch, tokens", [(1, 64), (1, 63), (2, 64), (4, 64)])
def test_global_products_cut_over_threads_equal_the_plain_products(monkeypatch, threads, batch,
                                                                   tokens):
    """A global token's products with every token, cut into one part per thread when the
    batch has fewer entries than threads, equal the plain batched matmuls (float64)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(batch, 2, tokens, generator=gen, dtype=torch.float64)
    none = rows[:, :0]  # no global token
    assert block_engine._over_tokens(none, torch.ones(batch, tokens, 5)).shape == (batch, 0, 5)
    assert block_engine._per_token(none[..., :5], torch.ones(batch, 5, tokens)).shape == (
        batch, 0, tokens)
    z = torch.randn(batch, tokens, 5, generator=gen, dtype=torch.float64)
    small = torch.randn(batch, 2, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(block_engine._over_tokens(rows, z), rows @ z, rtol=0, atol=1e-12)
    strided = torch.randn(batch, tokens, 10, generator=gen, dtype=torch.float64)[..., ::2]
    torch.testing.assert_close(block_engine._over_tokens(rows, strided), rows @ strided,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(block_engine._per_token(small, z.transpose(1, 2)),
                               small @ z.transpose(1, 2), rtol=0, atol=1e-12)
    wide = torch.randn(batch, 5, tokens, generator=gen, dtype=torch.float64)  # not transposed
    torch.testing.assert_close(block_engine._per_token(small, wide), small @ wide, rtol=0,
                               atol=1e-12)
    parts = block_engine._parts_per_thread(batch, tokens, torch.device("cpu"))
    assert parts == {(2, 1, 64): 2, (3, 1, 63): 3, (3, 1, 64): 1}.get((threads, batch, tokens), 1)
    assert block_engine._parts_per_thread(batch, tokens, torch.device("meta")) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 12)  # the parts must divide evenly
    assert block_engine._parts_per_thread(1, 65536, torch.device("cpu")) == 4
    assert block_engine._parts_per_thread(3, 65536, torch.device("cpu")) == 4
