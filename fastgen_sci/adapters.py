"""Foreign conventions become Denoisers here: one small class per convention, nothing else.

Every adapter maps EDM's (x, sigma) with x = x0 + sigma * eps to the model's own variables, calls the
model once, and maps its output back to x0_hat. The wrapped model keeps its own signature
model(x_model, t_model, cond).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .denoiser import Cond, expand_sigma


def vp_sigma_to_t(beta_d: float = 19.9, beta_min: float = 0.1) -> Callable[[Tensor], Tensor]:
    """Inverse of the VP-SDE schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Tab. 1)."""

    def sigma_to_t(sigma: Tensor) -> Tensor:
        return ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d

    return sigma_to_t


def vp_t_to_sigma(beta_d: float = 19.9, beta_min: float = 0.1) -> Callable[[Tensor], Tensor]:
    """VP-SDE schedule sigma(t) (EDM Tab. 1), the inverse of `vp_sigma_to_t`."""
    return lambda t: (torch.exp(0.5 * beta_d * t**2 + beta_min * t) - 1).sqrt()


class _Adapter(nn.Module):
    def __init__(self, model: nn.Module, sigma_data: float, sigma_min: float, sigma_max: float):
        super().__init__()
        self.model, self.sigma_data, self.sigma_min, self.sigma_max = model, sigma_data, sigma_min, sigma_max


class _VPAdapter(_Adapter):
    """A continuous-time VP model; `sigma_to_t` maps EDM's sigma to its time (default: VP-SDE)."""

    def __init__(self, model: nn.Module, sigma_to_t: Callable[[Tensor], Tensor] | None = None,
                 sigma_data: float = 1.0, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(model, sigma_data, sigma_min, sigma_max)
        self.sigma_to_t = sigma_to_t or vp_sigma_to_t()


class EpsilonPrediction(_VPAdapter):
    """Continuous-time VP model eps(x_t, t) with x_t = alpha x0 + sigma_t eps, alpha^2 + sigma_t^2 = 1."""

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        s = expand_sigma(sigma, x)
        eps_hat = self.model(x / (1 + s**2).sqrt(), self.sigma_to_t(s.flatten()), cond)
        return x - s * eps_hat  # x = x0 + sigma eps in EDM's variables


class DiscreteEpsilonPrediction(_Adapter):
    """DDPM model eps(x_t, t) on integer timesteps t with cumulative products alphas_cumprod[t]."""

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor, sigma_data: float = 1.0):
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # EDM sigma of each timestep
        super().__init__(model, sigma_data, float(sigmas.min()), float(sigmas.max()))
        self.register_buffer("log_sigmas", sigmas.log())

    def timestep(self, sigma: Tensor) -> Tensor:
        """Nearest timestep in log sigma (the model only knows its training timesteps)."""
        return (sigma.log()[:, None] - self.log_sigmas[None, :]).abs().argmin(dim=1)

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        t = self.timestep(expand_sigma(sigma, x).flatten())
        s = expand_sigma(self.log_sigmas[t].exp(), x)
        return x - s * self.model(x / (1 + s**2).sqrt(), t, cond)


class VPrediction(_VPAdapter):
    """VP model v(x_t, t) = alpha eps - sigma_t x0 (Salimans & Ho 2022)."""

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        s = expand_sigma(sigma, x)
        alpha, sigma_t = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
        x_t = alpha * x
        return alpha * x_t - sigma_t * self.model(x_t, self.sigma_to_t(s.flatten()), cond)


class RectifiedFlow(_Adapter):
    """Flow-matching model v(x_t, t) = eps - x0 with x_t = (1 - t) x0 + t eps, t in [0, 1]."""

    def __init__(self, model: nn.Module, sigma_data: float = 1.0, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__(model, sigma_data, sigma_min, sigma_max)

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        s = expand_sigma(sigma, x)
        t = s / (1 + s)  # sigma = t / (1 - t)
        x_t = x / (1 + s)
        return x_t - t * self.model(x_t, t.flatten(), cond)


class TrigFlow(_Adapter):
    """TrigFlow model F(x_t / sigma_d, s) with x_t = cos(s) x0 + sin(s) z, z ~ N(0, sigma_d^2) (sCM Eq. 1)."""

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__(model, sigma_data, sigma_min, sigma_max)

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        s = torch.atan(expand_sigma(sigma, x) / self.sigma_data)  # sigma = sigma_d tan(s)
        x_t = torch.cos(s) * x
        F = self.model(x_t / self.sigma_data, s.flatten(), cond)
        return torch.cos(s) * x_t - torch.sin(s) * self.sigma_data * F  # sCM Eq. 3


def trigflow_velocity(denoiser: Callable, x_t: Tensor, s: Tensor, cond: Cond = None,
                      sigma_data: float | None = None) -> Tensor:
    """F of an EDM denoiser at TrigFlow point (x_t, s): (cos(s) x_t - x0_hat) / (sin(s) sigma_d)."""
    sigma_d = sigma_data if sigma_data is not None else denoiser.sigma_data
    s_ = expand_sigma(s, x_t)
    x0_hat = denoiser(x_t / torch.cos(s_), sigma_d * torch.tan(s_).flatten(), cond)
    return (torch.cos(s_) * x_t - x0_hat) / (torch.sin(s_) * sigma_d)


__all__ = ["EpsilonPrediction", "DiscreteEpsilonPrediction", "VPrediction", "RectifiedFlow", "TrigFlow",
           "trigflow_velocity", "vp_sigma_to_t", "vp_t_to_sigma"]
