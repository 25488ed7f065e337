"""The one contract between networks and methods: an EDM-convention denoiser, plus small capabilities.

A Denoiser D(x; sigma, cond) returns the clean-sample estimate x0_hat for x = x0 + sigma * eps
(Karras et al. 2022). Anything with this shape qualifies; nothing has to subclass anything.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Cond = Optional[Mapping[str, Tensor]]


@runtime_checkable
class Denoiser(Protocol):
    """D(x, sigma, cond) -> x0_hat, with sigma of shape [B] and x of shape [B, ...]."""

    sigma_data: float
    sigma_min: float
    sigma_max: float

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor: ...


@runtime_checkable
class FlowMap(Protocol):
    """Two-time student: maps x at noise level sigma to the trajectory point at level sigma_r."""

    def flow_map(self, x: Tensor, sigma: Tensor, sigma_r: Tensor, cond: Cond = None) -> Tensor: ...


@runtime_checkable
class FeatureTaps(Protocol):
    """Intermediate features for discriminator heads, one tensor [B, ...] per tapped block."""

    def features(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> list[Tensor]: ...


def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a [B, 1, ..., 1] tensor broadcastable against x."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """c_skip, c_out, c_in, c_noise of EDM Table 1."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """Raw network F(c_in x, c_noise, cond) -> Denoiser via D = c_skip x + c_out F (EDM Eq. 7)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__()
        self.net, self.sigma_data, self.sigma_min, self.sigma_max = net, sigma_data, sigma_min, sigma_max

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        sigma = expand_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        F = self.net(c_in * x, c_noise.flatten(), cond)
        return c_skip * x + c_out * F.to(x.dtype)


class FunctionDenoiser(nn.Module):
    """A plain function fn(x, sigma, cond) -> x0_hat with its noise range, e.g. an exact denoiser."""

    def __init__(self, fn: Callable[[Tensor, Tensor, Cond], Tensor], sigma_data: float,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.fn, self.sigma_data, self.sigma_min, self.sigma_max = fn, sigma_data, sigma_min, sigma_max

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        return self.fn(x, sigma, cond)


def ode_velocity(denoiser: Denoiser, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x; sigma)) / sigma (EDM Eq. 3 with sigma(t) = t)."""
    return (x - denoiser(x, sigma, cond)) / expand_sigma(sigma, x)

