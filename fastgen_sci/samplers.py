"""Samplers as pure functions of (denoiser, starting noise, sigma grid, cond).

`x` is the starting point at sigmas[0], i.e. sigmas[0] * N(0, I). Stochastic steps draw fresh noise
through `randn_like`, so a `MemberRNG.randn_like` makes every member's path independent of batching.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .denoiser import Cond, Denoiser, FlowMap
from .noise import karras_sigmas

RandnLike = Callable[[Tensor], Tensor]


def _at(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.to(x.dtype).to(x.device).expand(x.shape[0])


@torch.no_grad()
def euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond = None) -> Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM Eq. 3)."""
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, _at(s_cur, x), cond)) / s_cur
        x = x + (s_next - s_cur) * d
    return x


@torch.no_grad()
def heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond = None, *, S_churn: float = 0.0,
         S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
         randn_like: RandnLike = torch.randn_like) -> Tensor:
    """EDM Algorithm 2: Heun's 2nd-order steps, optional churn; the last step to sigma = 0 is Euler."""
    n = len(sigmas) - 1
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= s_cur <= S_max else 0.0
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:  # EDM Alg. 2 lines 5-6: raise the noise level to s_hat
            x = x + (s_hat**2 - s_cur**2).sqrt() * S_noise * randn_like(x)
        d = (x - denoiser(x, _at(s_hat, x), cond)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:  # EDM Alg. 2 lines 9-11: second-order correction
            d_next = (x_next - denoiser(x_next, _at(s_next, x), cond)) / s_next
            x_next = x + (s_next - s_hat) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def few_step(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond = None, *,
             randn_like: RandnLike = torch.randn_like) -> Tensor:
    """Consistency multistep sampling (CM Alg. 1): denoise, re-noise to the next sigma, repeat."""
    x0_hat = denoiser(x, _at(sigmas[0], x), cond)
    for s_next in sigmas[1:]:
        if s_next <= 0:
            break
        x = x0_hat + s_next * randn_like(x0_hat)
        x0_hat = denoiser(x, _at(s_next, x), cond)
    return x0_hat


@torch.no_grad()
def flow_map(model: FlowMap, x: Tensor, sigmas: Tensor, cond: Cond = None) -> Tensor:
    """Flow-map steps x <- model.flow_map(x, sigma_i, sigma_i+1) along the grid (two-time students, e.g. MeanFlow)."""
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = model.flow_map(x, _at(s_cur, x), _at(s_next, x), cond)
    return x


@dataclass(frozen=True)
class SamplerSpec:
    """Which sampler and which sigma grid: `heun`/`euler` over a Karras grid, or `few_step`/`flow_map`.

    Args:
        sigmas: `few_step`'s and `flow_map`'s intermediate levels after sigma_max: [] is one step, [0.821] two.
        sigma_min, sigma_max: grid ends; None takes the denoiser's own range.
    """

    name: str = "heun"
    steps: int = 18
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    sigmas: Sequence[float] = ()
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler name '{self.name}' unknown; choose one of {sorted(SAMPLERS)}")
        if list(self.sigmas) != sorted(self.sigmas, reverse=True) or any(s <= 0 for s in self.sigmas):
            raise ValueError(f"sampler sigmas {list(self.sigmas)} must be positive and decreasing")

    def grid(self, denoiser: Denoiser) -> Tensor:
        """The sigma grid, ending in 0 (float64)."""
        hi = self.sigma_max if self.sigma_max is not None else denoiser.sigma_max
        if self.name in STEP_LISTS:
            return torch.tensor([hi, *self.sigmas, 0.0], dtype=torch.float64)
        lo = self.sigma_min if self.sigma_min is not None else denoiser.sigma_min
        return karras_sigmas(self.steps, lo, hi, self.rho)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        if self.name in STEP_LISTS:
            return 1 + len(self.sigmas)
        return 2 * self.steps - 1 if self.name == "heun" else self.steps

    def __call__(self, denoiser: Denoiser, noise: Tensor, cond: Cond = None,
                 randn_like: RandnLike = torch.randn_like) -> Tensor:
        """Sample from unit noise [B, ...]: the first grid level scales it."""
        sigmas = self.grid(denoiser)
        x = noise * float(sigmas[0])
        if self.name == "euler":
            return euler(denoiser, x, sigmas, cond)
        if self.name == "few_step":
            return few_step(denoiser, x, sigmas, cond, randn_like=randn_like)
        if self.name == "flow_map":
            if not isinstance(denoiser, FlowMap):
                raise ValueError(f"sampler 'flow_map' needs a two-time model with .flow_map(x, sigma, sigma_r, cond) "
                                 f"(e.g. a MeanFlow student); a {type(denoiser).__name__} has none: use few_step")
            return flow_map(denoiser, x, sigmas, cond)
        return heun(denoiser, x, sigmas, cond, S_churn=self.S_churn, S_min=self.S_min, S_max=self.S_max,
                    S_noise=self.S_noise, randn_like=randn_like)


SAMPLERS = {"euler": euler, "heun": heun, "few_step": few_step, "flow_map": flow_map}
STEP_LISTS = ("few_step", "flow_map")  # samplers whose grid is [sigma_max, *sigmas, 0]
