"""The diffusion value: validation, coefficients, the kernel registry and the series."""
import math

import numpy as np
import pydantic
import pytest
import torch
from scipy.stats import poisson

from diffuser_graph import (
    Diffusion,
    PackedBatch,
    PatternSpec,
    build_graph,
    dense_diffusion_attention,
    dense_mask,
    diffusion_attention,
    kernels,
    register_kernel,
)
from diffuser_graph import diffusion as diffusion_module


def test_coefficients_of_the_paper_kernels():
    ppr = Diffusion(alpha=0.1, hops=5).coefficients
    assert ppr == pytest.approx([0.1 * 0.9**k for k in range(5)] + [0.9**5], abs=1e-15)
    assert math.fsum(ppr) == pytest.approx(1.0, abs=1e-15)
    heat = Diffusion(kernel="heat", t=2.5, hops=6).coefficients
    pmf = poisson.pmf(np.arange(7), 2.5)
    assert heat == pytest.approx(pmf / pmf.sum(), abs=1e-15)
    assert Diffusion.one_hop().coefficients == (0.0, 1.0)


@pytest.mark.parametrize("t,hops", [(1000.0, 5), (1.0, 200), (1e-6, 3), (500.0, 2000)])
def test_heat_weights_are_stable_for_any_t_and_hops(t, hops):
    weights = np.array(Diffusion(kernel="heat", t=t, hops=hops).coefficients)
    assert np.isfinite(weights).all() and weights.min() >= 0
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    pmf = poisson.pmf(np.arange(hops + 1), t)
    if pmf.sum() > 0:  # scipy's pmf underflows to zero for some of these; the weights do not
        np.testing.assert_allclose(weights, pmf / pmf.sum(), rtol=1e-9, atol=1e-300)


def test_apply_is_the_coefficient_series_and_the_ppr_recursion():
    gen = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(9, 9, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    for diffusion in (Diffusion(alpha=0.3, hops=6), Diffusion(kernel="heat", t=1.7, hops=4)):
        series = sum(c * torch.linalg.matrix_power(attn, k) @ v
                     for k, c in enumerate(diffusion.coefficients))
        torch.testing.assert_close(diffusion.apply(lambda z: attn @ z, v), series,
                                   rtol=0, atol=1e-12)
        before = v.clone()  # mixing into each new iterate: the same series, v untouched
        torch.testing.assert_close(diffusion.apply(lambda z: attn @ z, v, in_place=True),
                                   series, rtol=0, atol=1e-12)
        assert torch.equal(v, before)
    z = v  # the paper's recursion, Z(k+1) = (1-a) A Z(k) + a V
    for _ in range(6):
        z = 0.7 * attn @ z + 0.3 * v
    torch.testing.assert_close(Diffusion(alpha=0.3, hops=6).apply(lambda z: attn @ z, v), z,
                               rtol=0, atol=1e-12)


def test_a_kernel_registered_in_one_place_runs_everywhere():
    """A new kernel: truncated geometric weights theta_k ∝ (1 - alpha)^k over k = 0..K."""
    def geometric(d):
        raw = [(1 - d.alpha) ** k for k in range(d.hops + 1)]
        return [w / sum(raw) for w in raw]

    register_kernel("geometric_test", geometric)
    try:
        assert "geometric_test" in kernels()
        spec = PatternSpec(window=2, num_global=1, num_random=2)
        g = build_graph(30, spec)
        gen = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(30, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
        expected_weights = [0.6**k / sum(0.6**j for j in range(5)) for k in range(5)]
        expected = dense_diffusion_attention(dense_mask(g), q, k, v,
                                             coefficients=expected_weights)
        for engine in ("dgl", "block", "gather"):
            out = diffusion_attention(PackedBatch.from_lengths([30], spec, engine=engine), q, k,
                                      v, kernel="geometric_test", alpha=0.4, hops=4)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
        from diffuser_graph import DiffuserConfig
        assert DiffuserConfig(kernel="geometric_test").diffusion.kernel == "geometric_test"
    finally:
        del diffusion_module._KERNELS["geometric_test"]
        diffusion_module._coefficients.cache_clear()
    with pytest.raises(ValueError, match="unknown kernel 'geometric_test'"):
        Diffusion(kernel="geometric_test")


def test_registry_refuses_bad_kernels():
    with pytest.raises(ValueError, match="already registered"):
        register_kernel("ppr", lambda d: [1.0])
    with pytest.raises(ValueError, match="identifier"):
        register_kernel("two words", lambda d: [1.0])
    register_kernel("wrong_length_test", lambda d: [1.0])
    try:
        with pytest.raises(ValueError, match="must give hops \\+ 1 = 4 finite coefficients"):
            _ = Diffusion(kernel="wrong_length_test", hops=3).coefficients
    finally:
        del diffusion_module._KERNELS["wrong_length_test"]


@pytest.mark.parametrize("kwargs,field", [
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(hops=0), "hops"), (dict(hops=2.0), "hops"), (dict(hops=True), "hops"),
    (dict(hops="3"), "hops"), (dict(alpha=True), "alpha"), (dict(kernel="gauss"), "kernel"),
    (dict(t=0.0), "t"), (dict(t=float("inf")), "t"), (dict(tau=1.0), "tau"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        Diffusion(**kwargs)


def test_numpy_scalars_are_numbers():
    d = Diffusion(alpha=np.float32(0.25), hops=np.int64(3), t=np.float64(2.0))
    assert (d.alpha, d.hops, d.t) == (0.25, 3, 2.0) and type(d.hops) is int


def test_the_value_is_frozen_and_hashable():
    d = Diffusion(alpha=0.2)
    with pytest.raises(pydantic.ValidationError):
        d.alpha = 0.3
    assert d == Diffusion(alpha=0.2) and len({d, Diffusion(alpha=0.2)}) == 1


def test_either_a_diffusion_or_loose_settings():
    g = build_graph(10, PatternSpec(window=1))
    q, k, v = (torch.randn(10, 1, 2) for _ in range(3))
    with pytest.raises(ValueError, match="either diffusion= or alpha=, not both"):
        diffusion_attention(g, q, k, v, Diffusion(), alpha=0.2)
    with pytest.raises(ValueError, match="diffusion must be a Diffusion"):
        diffusion_attention(g, q, k, v, {"alpha": 0.2})
    torch.testing.assert_close(diffusion_attention(g, q, k, v, Diffusion(alpha=0.2, hops=2)),
                               diffusion_attention(g, q, k, v, alpha=0.2, hops=2))
