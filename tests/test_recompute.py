"""recompute_heads: the attention is dropped after forward and recomputed in backward; the hops'
inputs are kept (no hop runs again) unless recompute_hops; a second backward through the same
graph still works."""

import gc

import pydantic
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from diffuser_graph import (
    DiffuserAttention,
    DiffuserConfig,
    PackedBatch,
    PatternSpec,
    diffusion_attention,
)


def _case(engine="block"):
    spec = PatternSpec(window=3, num_global=1, num_random=2, seed=0)
    batch = PackedBatch.from_lengths([20, 13], spec, engine=engine)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(33, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
               for _ in range(3))
    return batch, q, k, v


class _Counting:
    """Wraps a block plan's methods to count their calls (``propagate``: hops of a slice) and
    keep weak references to the storages of the attention parts it makes."""

    def __init__(self, monkeypatch, plan):
        self.calls = {"attention": 0, "propagate": 0}
        methods = {"attention": "attention", "propagate": "propagate_slice"}
        self.storages = []
        for name in self.calls:
            original = getattr(plan, methods[name])

            def counted(*args, _name=name, _original=original):
                self.calls[_name] += 1
                result = _original(*args)
                if _name == "attention":
                    self.storages += [StorageWeakRef(part.untyped_storage())
                                      for part in result if part.numel()]
                return result

            monkeypatch.setattr(plan, methods[name], counted)

    def alive(self):
        return _holding(self.storages)


def _holding(refs):
    """How many of the weakly referenced storages still hold memory (a storage resized to
    nothing holds none)."""
    gc.collect()
    return sum(not ref.expired()
               and torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes() > 0
               for ref in refs)


@pytest.mark.parametrize("recompute_heads, recompute_hops", [(0, False), (2, False), (2, True)])
def test_the_attention_is_freed_after_forward_and_recomputed_once_per_chunk(
        monkeypatch, recompute_heads, recompute_hops):
    batch, q, k, v = _case()
    counting = _Counting(monkeypatch, batch.plan)
    out = diffusion_attention(batch, q, k, v, hops=3, recompute_heads=recompute_heads,
                              recompute_hops=recompute_hops)
    chunks = 2 if recompute_heads else 1
    hops = 3 * chunks * len(batch.plan.slices(q.shape[1] // chunks))  # a slice per length
    assert counting.calls == {"attention": chunks, "propagate": hops}
    if recompute_heads:
        assert counting.alive() == 0  # nothing of the attention is kept for backward
    else:
        assert counting.alive() == len(counting.storages) > 0
    out.square().sum().backward()
    # backward recomputes each chunk's attention, and its hops only with recompute_hops
    assert counting.calls == {"attention": 2 * chunks if recompute_heads else 1,
                              "propagate": hops * (1 + recompute_hops)}


@pytest.mark.parametrize("recompute_hops", [False, True])
def test_recompute_hops_keeps_no_hop_input(monkeypatch, recompute_hops):
    """The hops' inputs are kept between forward and backward, or with recompute_hops not."""
    batch, q, k, v = _case()
    outputs = []
    original = batch.plan.propagate_slice

    def recorded(*args):
        out = original(*args)
        outputs.append(StorageWeakRef(out.untyped_storage()))
        return out

    monkeypatch.setattr(batch.plan, "propagate_slice", recorded)
    out = diffusion_attention(batch, q, k, v, hops=3, recompute_heads=2,
                              recompute_hops=recompute_hops)
    # per chunk and slice, the outputs of hops 1 and 2 are the inputs of hops 2 and 3 (the
    # output of hop 3, the result, is not checked: leaving the layout may keep a view of it)
    inputs = [out for i, out in enumerate(outputs) if i % 3 != 2]
    assert len(inputs) == 2 * 2 * len(batch.plan.slices(2))
    assert _holding(inputs) == (0 if recompute_hops else len(inputs))
    out.sum().backward()


@pytest.mark.parametrize("recompute_hops", [False, True])
@pytest.mark.parametrize("learned", [False, True], ids=["ppr", "learned"])
def test_a_second_backward_through_the_same_graph_gives_the_same_gradients(learned,
                                                                           recompute_hops):
    batch, q, k, v = _case()
    hop_weights = (torch.softmax(torch.randn(4, 4, dtype=torch.float64), -1).requires_grad_()
                   if learned else None)
    inputs = [q, k, v] + ([hop_weights] if learned else [])
    options = dict(hops=3, attn_dropout=0.2, training=True, hop_weights=hop_weights,
                   hop_dropout=0.0 if learned else 0.2)
    torch.manual_seed(3)
    expected = diffusion_attention(batch, q, k, v, **options)
    want = torch.autograd.grad(expected.square().sum(), inputs)
    torch.manual_seed(3)
    out = diffusion_attention(batch, q, k, v, recompute_heads=4, recompute_hops=recompute_hops,
                              **options)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    loss = out.square().sum()
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs)  # the series is built again, same dropout
    for got in (first, second):
        for grad, wanted in zip(got, want, strict=True):
            torch.testing.assert_close(grad, wanted, rtol=0, atol=1e-12)


def test_returned_attention_keeps_its_graph_and_inference_recomputes_nothing(monkeypatch):
    batch, q, k, v = _case()
    out, attention = diffusion_attention(batch, q, k, v, hops=2, recompute_heads=1,
                                         return_attention=True)
    expected, expected_attention = diffusion_attention(batch, q, k, v, hops=2,
                                                       return_attention=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(attention, expected_attention, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(attention.square().sum(), [q, k])  # differentiable as it is
    want = torch.autograd.grad(expected_attention.square().sum(), [q, k])
    for grad, wanted in zip(grads, want, strict=True):
        torch.testing.assert_close(grad, wanted, rtol=0, atol=1e-12)
    counting = _Counting(monkeypatch, batch.plan)
    with torch.no_grad():
        out = diffusion_attention(batch, q, k, v, hops=2, recompute_heads=1)
    # one chunk per head, two hops of its slices (one per length)
    assert counting.calls == {"attention": 4, "propagate": 4 * 2 * len(batch.plan.slices(1))}
    assert counting.alive() == 0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_recompute_hops_needs_chunks_and_double_backward_is_refused():
    batch, q, k, v = _case()
    with pytest.raises(ValueError, match="recompute_hops=True needs recompute_heads > 0"):
        diffusion_attention(batch, q, k, v, recompute_hops=True)
    with pytest.raises(ValueError, match="recompute_hops=True needs recompute_heads > 0"):
        DiffuserAttention(16, 4, recompute_hops=True)
    with pytest.raises(pydantic.ValidationError, match="recompute_hops=true needs"):
        DiffuserConfig(recompute_hops=True)
    out = diffusion_attention(batch, q, k, v, hops=2, recompute_heads=2)
    grad_q, = torch.autograd.grad(out.square().sum(), [q], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_q.sum().backward()  # a gradient penalty would silently miss the attention's part


def test_the_gather_engine_keeps_a_and_z_for_a_hop_not_its_messages():
    batch, q, k, v = _case("gather")
    attention = batch.plan.attention(q, k)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x,
                                                  lambda x: x):
        batch.plan.propagate(attention, batch.plan.enter(v))
    assert sorted(saved) == sorted([tuple(attention[0].shape), tuple(v.shape)])
