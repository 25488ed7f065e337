"""Noise-level densities and sigma grids, as pure functions of their arguments."""
from __future__ import annotations

import torch
from torch import Tensor

from .rng import StepRNG


def lognormal_sigma(n: int, *, P_mean: float, P_std: float, rng: StepRNG) -> Tensor:
    """ln sigma ~ N(P_mean, P_std^2) (EDM Sec. 5), shape [n]."""
    return (P_mean + P_std * rng.randn(n)).exp()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM Eq. 5: n noise levels from sigma_max down to sigma_min, then a final 0; shape [n + 1]."""
    i = torch.arange(n, dtype=torch.float64)
    ramp = i / max(n - 1, 1)
    inv_rho = 1 / rho
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])
