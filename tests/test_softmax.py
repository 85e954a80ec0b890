"""The joint softmax of the block engine against the softmax of the concatenated parts."""
import math

import pytest
import torch

from diffuser_graph.engines.softmax import joint_softmax


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
