"""Samplers against the exact probability-flow solution, and per-member seeding."""
import math

import pytest
import torch

from fastgen_sci.ensemble import sample_ensemble
from fastgen_sci.noise import karras_sigmas
from fastgen_sci.registry import EvalCases
from fastgen_sci.samplers import SamplerSpec, euler, few_step, flow_map, heun


def exact_flow(x_T, s, sigma_max):
    """PF-ODE of N(0, s^2) data: x(sigma) = x(sigma_max) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2))."""
    return x_T * s / math.sqrt(s**2 + sigma_max**2)


def test_karras_grid():
    sig = karras_sigmas(18, 0.002, 80.0)
    assert len(sig) == 19 and sig[0] == 80.0 and sig[-1] == 0 and abs(sig[-2] - 0.002) < 1e-12
    assert (sig[:-1] > sig[1:]).all()


def test_heun_matches_exact_probability_flow(gaussian_denoiser):
    x_T = torch.randn(1000, 4, dtype=torch.float64) * 80.0
    want = exact_flow(x_T, gaussian_denoiser.s, 80.0)

    def rel_err(sampler, n):
        return float((sampler(gaussian_denoiser, x_T, karras_sigmas(n, 0.002, 80.0)) - want).abs().max() / want.abs().max())

    heun_errs = [rel_err(heun, n) for n in (18, 36, 72, 144)]
    assert heun_errs[-1] < 1e-3, heun_errs  # converges to the exact solution
    for coarse, fine in zip(heun_errs, heun_errs[1:]):
        assert 3.5 < coarse / fine < 5.0, heun_errs  # second order: error / 4 per doubling of steps
    assert rel_err(euler, 18) > 2 * heun_errs[0]  # first order loses to second order on the same grid


def test_heun_with_churn_keeps_the_gaussian_law(gaussian_denoiser):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(20000, 1, generator=g, dtype=torch.float64) * math.sqrt(80.0**2 + 0.7**2)
    out = heun(gaussian_denoiser, x_T, karras_sigmas(40, 0.002, 80.0), S_churn=10, S_max=50,
               randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    assert abs(out.std().item() - 0.7) < 0.02


def test_few_step_one_step_is_the_denoiser_at_sigma_max(gaussian_denoiser):
    x = torch.randn(5, 2, dtype=torch.float64) * 80
    out = few_step(gaussian_denoiser, x, torch.tensor([80.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out, gaussian_denoiser(x, torch.full((5,), 80.0)))


def test_sampler_spec_nfe_and_grid(gaussian_denoiser):
    assert SamplerSpec("heun", steps=18).nfe == 35
    assert SamplerSpec("euler", steps=10).nfe == 10
    two = SamplerSpec("few_step", sigmas=[0.821])
    assert two.nfe == 2 and two.grid(gaussian_denoiser).tolist() == [80.0, 0.821, 0.0]
    with pytest.raises(ValueError, match="unknown"):
        SamplerSpec("dpm")
    with pytest.raises(ValueError, match="decreasing"):
        SamplerSpec("few_step", sigmas=[0.1, 1.0])


class GaussianFlowMap(torch.nn.Module):
    """The exact flow map of N(0, s^2) data, x(sigma_r) = x(sigma) sqrt((s^2 + sigma_r^2) / (s^2 + sigma^2))."""

    def __init__(self, s: float = 0.7):
        super().__init__()
        self.s, self.sigma_data, self.sigma_min, self.sigma_max = s, s, 0.002, 80.0
        self.calls = 0

    def flow_map(self, x, sigma, sigma_r, cond=None):
        self.calls += 1
        ratio = ((self.s**2 + sigma_r**2) / (self.s**2 + sigma**2)).sqrt().reshape(-1, *([1] * (x.ndim - 1)))
        return x * ratio.to(x.dtype)


@pytest.mark.parametrize("sigmas", [[], [2.0], [10.0, 1.0, 0.1]])
def test_flow_map_sampler_follows_the_exact_map_in_any_number_of_steps(sigmas):
    model = GaussianFlowMap()
    noise = torch.randn(500, 3, dtype=torch.float64)
    spec = SamplerSpec("flow_map", sigmas=sigmas)
    out = spec(model, noise)
    torch.testing.assert_close(out, exact_flow(80.0 * noise, model.s, 80.0))
    assert spec.nfe == model.calls == 1 + len(sigmas)
    assert spec.grid(model).tolist() == [80.0, *sigmas, 0.0]
    torch.testing.assert_close(flow_map(model, 80.0 * noise, spec.grid(model)), out)


def test_flow_map_sampler_needs_a_flow_map(gaussian_denoiser):
    with pytest.raises(ValueError, match="flow_map"):
        SamplerSpec("flow_map")(gaussian_denoiser, torch.randn(2, 2))


@pytest.mark.parametrize("spec", [SamplerSpec("few_step", sigmas=[2.0, 0.5]),
                                  SamplerSpec("heun", steps=6, S_churn=5)], ids=["few_step", "heun-churn"])
def test_member_k_is_the_same_whatever_the_batch(gaussian_denoiser, spec):
    cases = EvalCases(n=3, shape=(2, 4))
    runs = [sample_ensemble(gaussian_denoiser, spec, cases, 5, seed=7, batch_size=b, progress=False) for b in (1, 4, 15)]
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], rtol=0, atol=0)
    assert not torch.allclose(runs[0][0, 0], runs[0][0, 1])  # members differ
    other_seed = sample_ensemble(gaussian_denoiser, spec, cases, 5, seed=8, batch_size=4, progress=False)
    assert not torch.allclose(other_seed, runs[0])
    # a larger ensemble extends the smaller one: member k of case c does not depend on M either
    more = sample_ensemble(gaussian_denoiser, spec, cases, 7, seed=7, batch_size=4, progress=False)
    torch.testing.assert_close(more[:, :5], runs[0], rtol=0, atol=0)
