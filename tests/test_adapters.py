"""Every adapter turns a model in its own convention back into the same EDM denoiser.

The foreign models are the exact posterior-mean predictors of Gaussian data N(0, s^2) written directly in
each convention's own variables (not derived from the adapter's formulas), so a wrong sign, scale or time
map in an adapter breaks the equality.
"""
import math

import pytest
import torch

from fastgen_sci.adapters import (DiscreteEpsilonPrediction, EpsilonPrediction, RectifiedFlow, TrigFlow,
                                  VPrediction, trigflow_velocity, vp_sigma_to_t, vp_t_to_sigma)
from fastgen_sci.denoiser import Denoiser, EDMPrecond, FunctionDenoiser

S = 0.7  # data standard deviation


def edm_exact(x, sigma):
    return S**2 / (S**2 + sigma[:, None] ** 2) * x


def vp_alpha_sigma(t):
    """alpha(t), sigma_t(t) of the VP SDE with beta_d = 19.9, beta_min = 0.1 (Song et al. 2021)."""
    log_alpha = -0.25 * 19.9 * t**2 - 0.5 * 0.1 * t
    alpha = log_alpha.exp()
    return alpha, (1 - alpha**2).sqrt()


class VPEps(torch.nn.Module):
    def forward(self, x_t, t, cond=None):
        a, s = (v[:, None] for v in vp_alpha_sigma(t))
        return s * x_t / (a**2 * S**2 + s**2)  # E[eps | x_t]


class VPV(torch.nn.Module):
    def forward(self, x_t, t, cond=None):
        a, s = (v[:, None] for v in vp_alpha_sigma(t))
        var = a**2 * S**2 + s**2
        return a * (s * x_t / var) - s * (a * S**2 * x_t / var)  # E[alpha eps - sigma_t x0 | x_t]


class DDPMEps(torch.nn.Module):
    def __init__(self, alphas_cumprod):
        super().__init__()
        self.ab = alphas_cumprod

    def forward(self, x_t, t, cond=None):
        assert t.dtype == torch.long
        a, s = self.ab[t].sqrt()[:, None], (1 - self.ab[t]).sqrt()[:, None]
        return s * x_t / (a**2 * S**2 + s**2)


class FlowV(torch.nn.Module):
    def forward(self, x_t, t, cond=None):
        t = t[:, None]
        var = (1 - t) ** 2 * S**2 + t**2
        return t * x_t / var - (1 - t) * S**2 * x_t / var  # E[eps - x0 | x_t]


class TrigF(torch.nn.Module):
    def __init__(self, sigma_d):
        super().__init__()
        self.sd = sigma_d

    def forward(self, x_in, s, cond=None):
        s = s[:, None]
        x_t = x_in * self.sd
        var = torch.cos(s) ** 2 * S**2 + torch.sin(s) ** 2 * self.sd**2
        z = torch.sin(s) * self.sd**2 * x_t / var
        x0 = torch.cos(s) * S**2 * x_t / var
        return (torch.cos(s) * z - torch.sin(s) * x0) / self.sd  # F = E[dx_t/ds] / sigma_d


@pytest.fixture
def points():
    g = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.empty(64).uniform_(math.log(0.01), math.log(50), generator=g)).double()
    x = torch.randn(64, 3, generator=g, dtype=torch.float64) * (S**2 + sigma[:, None] ** 2).sqrt()
    return x, sigma


@pytest.mark.parametrize("make", [
    lambda: EpsilonPrediction(VPEps()),
    lambda: VPrediction(VPV()),
    lambda: RectifiedFlow(FlowV()),
    lambda: TrigFlow(TrigF(0.5), sigma_data=0.5),
], ids=["eps-vp", "v", "flow", "trigflow"])
def test_continuous_adapters_round_trip(make, points):
    x, sigma = points
    adapter = make()
    assert isinstance(adapter, Denoiser)
    torch.testing.assert_close(adapter(x, sigma), edm_exact(x, sigma), rtol=1e-9, atol=1e-9)


def test_discrete_ddpm_adapter_on_its_timesteps():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    adapter = DiscreteEpsilonPrediction(DDPMEps(ab), ab)
    t = torch.tensor([0, 10, 250, 999])
    sigma = ((1 - ab[t]) / ab[t]).sqrt()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(adapter(x, sigma), edm_exact(x, sigma), rtol=1e-9, atol=1e-9)
    assert adapter.timestep(sigma * 1.001).tolist() == t.tolist()  # nearest timestep in log sigma


def test_vp_time_maps_are_inverse():
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(vp_sigma_to_t()(vp_t_to_sigma()(t)), t)
    a, s = vp_alpha_sigma(t)
    torch.testing.assert_close(vp_t_to_sigma()(t), s / a)  # EDM sigma = sigma_t / alpha


def test_trigflow_velocity_of_edm_denoiser_matches_trigflow_model(points):
    x, sigma = points
    sd = 0.5
    s = torch.atan(sigma / sd)
    x_t = torch.cos(s)[:, None] * x
    edm = FunctionDenoiser(lambda xx, ss, cond: edm_exact(xx, ss), sigma_data=sd)
    F = trigflow_velocity(edm, x_t, s)
    torch.testing.assert_close(F, TrigF(sd)(x_t / sd, s), rtol=1e-9, atol=1e-9)


def test_edm_preconditioning_matches_table_1():
    class Zero(torch.nn.Module):
        def forward(self, x, c_noise, cond=None):
            return torch.zeros_like(x)
    D = EDMPrecond(Zero(), sigma_data=0.5)
    x, sigma = torch.ones(2, 1), torch.tensor([0.5, 2.0])
    torch.testing.assert_close(D(x, sigma), (0.25 / (sigma**2 + 0.25))[:, None] * x)  # c_skip x
