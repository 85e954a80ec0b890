"""Every engine computes the same function: held to the dense reference on every pattern kind."""
import pytest
import torch

import diffuser_graph.batch as batch_module
from diffuser_graph import (
    ENGINES,
    DiffuserConfig,
    DiffuserEncoder,
    PackedBatch,
    PatternSpec,
    batch_graphs,
    build_graph,
    choose_engine,
    dense_diffusion_attention,
    dense_mask,
    diffusion_attention,
)
from diffuser_graph.engines import block
from diffuser_graph.reference import dense_attention_matrix

PATTERNS = {
    "window": ([48, 20], PatternSpec(window=3)),
    "window+global+random": ([48, 31], PatternSpec(window=2, num_global=2, num_random=3, seed=1)),
    "explicit globals": ([64], PatternSpec(window=2, global_positions=(5, 6, 40), num_random=2)),
    "dilated+causal": ([40, 13], PatternSpec(window=2, dilation=2, num_random=2, causal=True)),
    "causal window": ([33], PatternSpec(window=4, num_global=1, causal=True)),
    "official": ([96, 70], PatternSpec(kind="official", window=16, num_random=2, num_global=3,
                                       max_len=256)),
    "grid": ([42], PatternSpec(kind="grid", image_size=(6, 7), window=1, num_global=1,
                               num_random=2)),
    # the block engine gathers the local edges of the patterns above; these keep its band
    "wide window": ([48, 31], PatternSpec(window=12, num_global=1, num_random=2)),
    "wide causal window": ([40, 13], PatternSpec(window=16, num_global=1, num_random=2,
                                                 causal=True)),
    "wide grid": ([20], PatternSpec(kind="grid", image_size=(4, 5), window=2, num_random=1)),
}
DIFFUSIONS = [dict(alpha=0.1, hops=5), dict(alpha=0.0, hops=1), dict(alpha=0.5, hops=3),
              dict(kernel="heat", hops=4, t=2.0)]
CONCRETE = [e for e in ENGINES if e != "auto"]


def engines_for(spec):
    return [e for e in CONCRETE if e != "block" or block.supports(spec)]  # every kind today


def qkv(n, dtype=torch.float64, seed=0, heads=2, dim=4, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, dim, generator=gen, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def dense(lengths, spec, q, k, v, **kwargs):
    """The reference, one sequence at a time."""
    outputs, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        outputs.append(dense_diffusion_attention(dense_mask(build_graph(n, spec)), q[part],
                                                 k[part], v[part], **kwargs))
        start += n
    return torch.cat(outputs)


CASES = [(p, e, d) for p in PATTERNS for e in engines_for(PATTERNS[p][1])
         for d in range(len(DIFFUSIONS))]


@pytest.mark.parametrize("pattern,engine,diffusion", CASES)
def test_every_engine_matches_the_dense_reference(pattern, engine, diffusion):
    lengths, spec = PATTERNS[pattern]
    kwargs = DIFFUSIONS[diffusion]
    batch = PackedBatch.from_lengths(lengths, spec, engine=engine)
    q, k, v = qkv(sum(lengths))
    out = diffusion_attention(batch, q, k, v, **kwargs)
    assert batch.engine_name == engine
    torch.testing.assert_close(out, dense(lengths, spec, q, k, v, **kwargs), rtol=0, atol=1e-10)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_gradients_agree_across_engines(pattern):
    lengths, spec = PATTERNS[pattern]
    weights = torch.randn(sum(lengths), 2, 4, dtype=torch.float64)
    grads = {}
    for engine in engines_for(spec):
        q, k, v = qkv(sum(lengths), requires_grad=True)
        batch = PackedBatch.from_lengths(lengths, spec, engine=engine)
        (diffusion_attention(batch, q, k, v, hops=3, kernel="heat") * weights).sum().backward()
        grads[engine] = [q.grad, k.grad, v.grad]
    q, k, v = qkv(sum(lengths), requires_grad=True)
    (dense(lengths, spec, q, k, v, hops=3, kernel="heat") * weights).sum().backward()
    for engine, found in grads.items():
        for name, got, expected in zip("qkv", found, (q.grad, k.grad, v.grad), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10,
                                       msg=f"{engine} d/d{name}")


@pytest.mark.parametrize("diffusion", [dict(hops=3, alpha=0.3), dict(hops=1, alpha=0.5),
                                       dict(hops=2, alpha=1.0), dict(hops=2, alpha=0.0)],
                         ids=["ppr", "one hop", "theta_K = 0", "theta_K = 1"])
@pytest.mark.parametrize("engine", CONCRETE)
def test_gradcheck(engine, diffusion):
    spec = PatternSpec(window=1, num_global=1, num_random=2)
    batch = PackedBatch.from_lengths([7, 5], spec, engine=engine)
    q, k, v = qkv(12, heads=1, dim=3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: diffusion_attention(batch, q, k, v, **diffusion), (q, k, v))


@pytest.mark.parametrize("kernel", ["ppr", "heat"])
@pytest.mark.parametrize("engine", CONCRETE)
def test_gradcheck_with_hop_dropout_and_several_lengths(engine, kernel):
    """Dropout masks drawn afresh after the same seed are the same, so the function is fixed."""
    spec = PatternSpec(window=2, num_global=1, num_random=2)
    batch = PackedBatch.from_lengths([9, 5, 9], spec, engine=engine)
    q, k, v = qkv(23, heads=2, dim=3, requires_grad=True)

    def dropped(q, k, v):
        torch.manual_seed(0)
        return diffusion_attention(batch, q, k, v, hops=3, alpha=0.3, kernel=kernel, t=1.5,
                                   attn_dropout=0.2, hop_dropout=0.3, training=True)

    assert not torch.allclose(dropped(q, k, v), diffusion_attention(batch, q, k, v, hops=3,
                                                                     alpha=0.3, kernel=kernel,
                                                                     t=1.5))
    assert torch.autograd.gradcheck(dropped, (q, k, v))


@pytest.mark.parametrize("engine", CONCRETE)
def test_float32_and_dropout(engine):
    lengths, spec = [50, 9, 130], PatternSpec(window=8, num_global=2, num_random=3)
    batch = PackedBatch.from_lengths(lengths, spec, engine=engine)
    q, k, v = qkv(sum(lengths), dtype=torch.float32)
    out = diffusion_attention(batch, q, k, v)
    expected = dense(lengths, spec, q.double(), k.double(), v.double())
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    kwargs = dict(attn_dropout=0.3, hop_dropout=0.3)
    torch.testing.assert_close(diffusion_attention(batch, q, k, v, **kwargs), out)  # eval
    torch.manual_seed(0)
    assert not torch.allclose(diffusion_attention(batch, q, k, v, training=True, **kwargs), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    lengths, spec = [40], PatternSpec(window=3, num_global=1, num_random=2)
    q, k, v = qkv(40)
    for engine in CONCRETE:
        batch = PackedBatch.from_lengths(lengths, spec, engine=engine)
        out = diffusion_attention(batch, q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype
        expected = dense(lengths, spec, *(x.to(dtype).double() for x in (q, k, v)))
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-2)


def test_a_bare_graph_runs_on_dgl_or_any_engine_asked_for():
    lengths, spec = PATTERNS["window+global+random"]
    g = batch_graphs(lengths, spec)
    q, k, v = qkv(sum(lengths))
    expected = dense(lengths, spec, q, k, v)
    for engine in (None, "dgl", "gather"):
        torch.testing.assert_close(diffusion_attention(g, q, k, v, engine=engine), expected,
                                   rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="engine='block' needs a pattern"):
        diffusion_attention(g, q, k, v, engine="block")


def test_return_attention_is_per_edge_on_every_engine():
    lengths, spec = [30, 45], PatternSpec(window=4, num_global=1, num_random=2)
    q, k, v = qkv(75)
    results = [diffusion_attention(PackedBatch.from_lengths(lengths, spec, engine=e), q, k, v,
                                   return_attention=True) for e in CONCRETE]
    g = batch_graphs(lengths, spec)
    for out, attn in results:
        assert attn.shape == (g.num_edges(), 2)
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=1e-10)
        torch.testing.assert_close(attn, results[0][1], rtol=0, atol=1e-12)
    sums = torch.zeros(75, 2, dtype=torch.float64).index_add_(0, g.edges()[1], results[0][1])
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_auto_chooses_per_device_and_pattern():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    wide, narrow = PatternSpec(window=32, num_random=3), PatternSpec(window=2)
    grid = PatternSpec(kind="grid", image_size=(8, 8))
    assert choose_engine("auto", wide, [4096], cpu) == "block"
    assert choose_engine("auto", narrow, [4096], cpu) == "block"  # its local edges gathered
    assert choose_engine("auto", narrow, [4] * 16, cpu) == "dgl"
    assert choose_engine("auto", grid, [64], cpu) == "block"
    assert choose_engine("auto", PatternSpec(kind="grid", image_size=(2, 2)), [4], cpu) == "dgl"
    assert choose_engine("auto", PatternSpec(kind="official"), [1024], cpu) == "block"
    # DGL has no GPU kernels in its PyPI wheel: every pattern gets a pure-torch engine there.
    assert choose_engine("auto", narrow, [64], cuda) == "block"
    assert choose_engine("auto", grid, [64], cuda) == "block"
    assert choose_engine("auto", None, [64], cuda) == "gather"  # a bare graph: no band known
    assert choose_engine("gather", grid, [64], cpu) == "gather"
    with pytest.raises(ValueError, match="engine must be one of"):
        choose_engine("cuda", wide, [64], cpu)


def test_the_engine_is_chosen_and_planned_once_per_batch(monkeypatch):
    calls = {"choose": 0, "plan": 0}
    choose, plan = batch_module.choose_engine, batch_module.make_plan

    def counting_choose(*args):
        calls["choose"] += 1
        return choose(*args)

    def counting_plan(*args):
        calls["plan"] += 1
        return plan(*args)

    monkeypatch.setattr(batch_module, "choose_engine", counting_choose)
    monkeypatch.setattr(batch_module, "make_plan", counting_plan)
    config = DiffuserConfig(vocab_size=10, num_labels=2, hidden_size=8, num_heads=2,
                            num_layers=2, pattern=PatternSpec(window=16, num_random=1))
    encoder = DiffuserEncoder(config).eval()
    ids = torch.randint(2, 10, (2, 200))
    encoded = encoder(ids)
    assert calls == {"choose": 1, "plan": 1}
    assert encoded.batch.engine_name == "block"  # auto, window 16 at 200 tokens on the CPU
    encoder(ids)
    assert calls == {"choose": 2, "plan": 2}  # a new batch is planned anew


def test_a_layer_refuses_a_batch_of_another_pattern():
    from diffuser_graph import DiffuserAttention

    a, b = PatternSpec(window=4, num_random=2), PatternSpec(window=4, num_random=2, seed=9)
    layer = DiffuserAttention(8, 2, pattern=a).double().eval()
    x = torch.randn(20, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="built for pattern"):
        layer(PackedBatch.from_lengths([20], b), x)
    # A bare graph names no pattern: it is computed as it is (its edges are the pattern).
    unnamed = DiffuserAttention(8, 2).double().eval()
    unnamed.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(build_graph(20, b), x),
                               unnamed(PackedBatch.from_lengths([20], b), x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(engine="tpu", spec=PatternSpec()), "engine must be one of"),
    (dict(engine="auto", spec={"window": 2}), "spec must be a PatternSpec"),
])
def test_bad_batches_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PackedBatch.from_lengths([16], kwargs["spec"], engine=kwargs["engine"])


def test_dgl_refuses_a_device_it_has_no_kernels_for():
    from diffuser_graph.engines.dgl import DGLPlan

    with pytest.raises(ValueError, match="runs on the CPU only"):
        DGLPlan.for_graph(build_graph(8, PatternSpec(window=1)), torch.device("cuda", 0))


@pytest.mark.parametrize("engine", CONCRETE)
def test_hop_dropout_after_the_mix_is_the_authors_recurrence(engine):
    """Z <- dropout((1 - alpha) A Z + alpha V) per hop, written out with the same masks."""
    spec = PatternSpec(window=2, num_global=1, num_random=1)
    batch = PackedBatch.from_lengths([14], spec, engine=engine)
    q, k, v = qkv(14, heads=2, dim=3, requires_grad=True)
    kwargs = dict(hops=3, alpha=0.2, hop_dropout=0.4, training=True)
    torch.manual_seed(5)
    out = diffusion_attention(batch, q, k, v, hop_dropout_at="after_mix", **kwargs)
    torch.manual_seed(5)
    before = diffusion_attention(batch, q, k, v, **kwargs)
    assert not torch.allclose(out, before)
    # dropped after the mix, the output itself is dropped: about 40 % of it is exactly 0
    assert 0.2 < float((out == 0).double().mean()) < 0.6
    assert float((before == 0).double().mean()) < 0.05
    g = build_graph(14, spec)
    attn = dense_attention_matrix(dense_mask(g), q, k)  # (H, N, N)
    torch.manual_seed(5)
    values = v.transpose(0, 1)
    z = 0.8**3 * values
    for j in range(3):  # Horner iterate j is (1 - alpha)^(2 - j) times the paper's Z(j + 1)
        z = (attn @ z) + (0.2 * 0.8 ** (2 - j)) * values
        if engine == "block":  # its masks are drawn in its own layout: compare statistics only
            continue
        z = torch.nn.functional.dropout(z.transpose(0, 1), 0.4, True).transpose(0, 1)
    if engine != "block":
        torch.testing.assert_close(out, z.transpose(0, 1), rtol=0, atol=1e-10)
    assert torch.autograd.gradcheck(lambda q, k, v: _seeded_after_mix(batch, q, k, v, kwargs),
                                    (q, k, v))


def _seeded_after_mix(batch, q, k, v, kwargs):
    torch.manual_seed(5)
    return diffusion_attention(batch, q, k, v, hop_dropout_at="after_mix", **kwargs)


def test_hop_dropout_places_are_checked():
    batch = PackedBatch.from_lengths([8], PatternSpec(window=1))
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match="hop_dropout_at must be one of"):
        diffusion_attention(batch, q, k, v, hop_dropout_at="after")
    with pytest.raises(ValueError, match="needs a fixed kernel"):
        diffusion_attention(batch, q, k, v, hops=2, hop_weights=torch.ones(2, 3,
                                                                          dtype=torch.float64),
                            hop_dropout_at="after_mix")
