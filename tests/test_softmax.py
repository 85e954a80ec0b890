"""The joint softmax of the block engine against the softmax of the concatenated parts."""
import math

import pytest
import torch

from diffuser_graph.engines.softmax import joint_softmax, packed_joint_softmax


def parts(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 5, 7), (2, 5, 3), (2, 5, 4)]
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in shapes]


def masks(seed=1):
    g = torch.Generator().manual_seed(seed)
    band = torch.zeros(5, 7, dtype=torch.float64).masked_fill_(
        torch.rand(5, 7, generator=g) < 0.5, -math.inf)
    band[:, 0] = 0.0  # every row keeps a finite score
    glob = torch.zeros(5, 3, dtype=torch.float64)
    glob[2] = -math.inf  # one row has no global key at all
    return [band, glob, None]


def reference(scores, biases):
    shifted = [s if b is None else s + b for s, b in zip(scores, biases, strict=True)]
    joint = torch.cat(shifted, dim=-1)
    return torch.softmax(joint, dim=-1).split([s.shape[-1] for s in scores], dim=-1)


def test_it_equals_the_softmax_of_the_concatenation_and_each_part_is_contiguous():
    scores, biases = parts(), masks()
    out = joint_softmax(scores, biases)
    for got, want in zip(out, reference(scores, biases), strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    total = sum(p.sum(-1) for p in out)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-14)
    assert not (out[0][..., biases[0] == -math.inf]).any()  # masked scores get weight 0


def test_its_gradient_equals_that_of_the_concatenation():
    scores, biases = parts(), masks()
    weights = [torch.randn_like(s) for s in scores]
    grads = torch.autograd.grad(sum((w * p).sum() for w, p in zip(
        weights, joint_softmax(scores, biases), strict=True)), scores)
    want = torch.autograd.grad(sum((w * p).sum() for w, p in zip(
        weights, reference(scores, biases), strict=True)), scores)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)


def test_gradcheck_with_some_parts_unused():
    scores, biases = parts(2), masks(3)
    assert torch.autograd.gradcheck(lambda *s: joint_softmax(s, biases)[::2], scores)


def test_an_empty_part_gets_an_empty_result():
    scores = [torch.randn(2, 4, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.float64)]
    band, empty = joint_softmax(scores)
    assert empty.shape == (2, 0)
    torch.testing.assert_close(band, torch.softmax(scores[0], -1), rtol=0, atol=1e-15)


def test_large_scores_stay_finite_and_inputs_are_not_written():
    scores = [torch.full((1, 2, 3), 1e4), torch.full((1, 2, 2), -1e4)]
    before = [s.clone() for s in scores]
    out = joint_softmax(scores)
    assert all(torch.isfinite(p).all() for p in out)
    torch.testing.assert_close(out[0], torch.full((1, 2, 3), 1 / 3))
    assert all(torch.equal(s, b) for s, b in zip(scores, before, strict=True))


@pytest.mark.parametrize("scores,biases,message", [
    ([], None, "at least one"),
    ([torch.zeros(2, 3), torch.zeros(3, 3)], None, "leading dimensions"),
    ([torch.zeros(2, 3)], [None, None], "2 biases for 1 parts"),
    ([torch.zeros(2, 0)], None, "every part is empty"),
])
def test_bad_arguments_are_refused(scores, biases, message):
    with pytest.raises(ValueError, match=message):
        joint_softmax(scores, biases)


# packed_joint_softmax: the random keys packed, one value per key (the block engine's layout)

def packed_case(dtype=torch.float64, seed=2, globals_=3, random=True):
    """Two stacked tables of 6 rows: a band of 5 with a shared mask, ``globals_`` global keys
    (one row masked off them) and random keys packed by a GatherIndex (some rows have none)."""
    from diffuser_graph.engines.gathered import GatherIndex

    g = torch.Generator().manual_seed(seed)
    batch, n, width = 2, 6, 4
    keys = torch.randint(0, n, (n, width), generator=g).sort(dim=1).values
    mask = (torch.rand(n, width, generator=g) < 0.6) & random
    mask[1] = False  # a row without random keys
    gather = GatherIndex.build(keys, mask, batch, n)
    band_bias = torch.zeros(n, 5).masked_fill_(torch.rand(n, 5, generator=g) < 0.4, -math.inf)
    band_bias[:, 2] = 0.0  # every row keeps a finite score
    global_bias = torch.zeros(n, globals_)
    if globals_:
        global_bias[3] = -math.inf
    scores = (torch.randn(batch * n, 5, generator=g, dtype=dtype) * 4,
              torch.randn(batch, n, globals_, generator=g, dtype=dtype) * 4,
              torch.randn(int(mask.sum()) * batch, generator=g, dtype=dtype) * 4)
    return scores, (band_bias, global_bias), gather


def packed_reference(scores, biases, gather):
    """The softmax of each row's concatenated parts, one row at a time."""
    band, glob, random = scores
    batch, n = gather.shape[:2]
    rows = [torch.cat([band[r] + biases[0][r % n].to(band.dtype),
                       glob.reshape(batch * n, -1)[r] + biases[1][r % n].to(band.dtype),
                       random[gather.bounds[r]:gather.bounds[r + 1]]]).softmax(0)
            for r in range(batch * n)]
    widths = (band.shape[-1], glob.shape[-1])
    return (torch.stack([row[:widths[0]] for row in rows]),
            torch.stack([row[widths[0]:sum(widths)] for row in rows]).view(glob.shape),
            torch.cat([row[sum(widths):] for row in rows]))


@pytest.fixture(params=["compiled", "torch"])
def engine(request, monkeypatch):
    """The compiled loop (skipped without a C compiler) or torch's rectangular path."""
    from diffuser_graph.engines import native

    if request.param == "compiled":
        if native.library() is None:
            pytest.skip("no compiled loops on this machine")
        monkeypatch.setattr(native, "ROWS_PER_THREAD", 2)  # split even these few rows
    else:
        monkeypatch.setattr(native, "available", lambda x: False)
    return request.param


@pytest.mark.parametrize("globals_,random", [(3, True), (0, True), (3, False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_equals_the_softmax_of_each_rows_parts(engine, globals_, random, threads):
    scores, biases, gather = packed_case(globals_=globals_, random=random)
    want = packed_reference(scores, biases, gather)
    torch.set_num_threads(threads)
    try:
        got = packed_joint_softmax(*(s.clone() for s in scores), biases, gather)
    finally:
        torch.set_num_threads(1)
    for part, expected in zip(got, want, strict=True):
        torch.testing.assert_close(part, expected, rtol=0, atol=1e-14)


def test_packed_passes_gradcheck(engine):
    scores, biases, gather = packed_case()
    inputs = [s.detach().requires_grad_() for s in scores]

    def softmax(*parts):  # the compiled loop writes its inputs: give it copies
        return packed_joint_softmax(*(p.clone() for p in parts), biases, gather)

    assert torch.autograd.gradcheck(softmax, inputs)


def test_packed_float32_stays_within_float32_rounding(engine):
    scores64, biases, gather = packed_case(seed=5)
    scores64 = (scores64[0] * 20, scores64[1] * 20, scores64[2] * 20)  # exp over a wide range
    want = packed_reference(scores64, biases, gather)
    got = packed_joint_softmax(*(s.float() for s in scores64), biases, gather)
    for part, expected in zip(got, want, strict=True):
        torch.testing.assert_close(part.double(), expected, rtol=2e-6, atol=1e-7)


def test_packed_spreads_a_nan_over_its_row_only(engine):
    scores, biases, gather = packed_case(dtype=torch.float32)
    scores[2][gather.bounds[0]] = math.nan  # row 0's first random key
    band, glob, random = packed_joint_softmax(*scores, biases, gather)
    assert band[0].isnan().all() and random[:gather.bounds[1]].isnan().all()
    assert not band[1:].isnan().any() and not random[gather.bounds[1]:].isnan().any()
