"""SFT: train a teacher by denoising score matching with EDM's weighting (Karras et al. 2022, Sec. 5)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..denoiser import Cond, expand_sigma
from ..noise import lognormal_sigma
from ..rng import StepRNG
from ..train import Player, Progress


@dataclass(frozen=True)
class SFT:
    """Denoising score matching; P_mean/P_std from EDM (CorrDiff's residual model uses P_mean = 0)."""

    P_mean: float = -1.2
    P_std: float = 1.2
    cond_dropout: float = 0.0  # probability of zeroing a sample's condition (classifier-free guidance)
    optimizer: str = "adam"
    lr: float = 1e-3  # EDM CIFAR-10 (Tab. 7)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None

    def players(self, *, student: nn.Module, teacher: nn.Module | None = None) -> list[Player]:
        loss = partial(dsm_loss, sigma_data=student.sigma_data, P_mean=self.P_mean, P_std=self.P_std,
                       cond_dropout=self.cond_dropout)
        return [Player("student", student, loss, optimizer=self.optimizer, lr=self.lr, betas=self.betas,
                       weight_decay=self.weight_decay, grad_clip=self.grad_clip)]


def drop_cond(cond: Cond, p: float, rng: StepRNG) -> Cond:
    """Zero each sample's condition with probability p (Ho & Salimans 2022)."""
    if not cond or p <= 0:
        return cond
    n = next(iter(cond.values())).shape[0]
    keep = (rng.rand(n) >= p).float()
    return {k: v * keep.to(v).reshape(-1, *([1] * (v.ndim - 1))) for k, v in cond.items()}


def dsm_loss(D: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, sigma_data: float,
             P_mean: float, P_std: float, cond_dropout: float = 0.0) -> Tensor:
    """lambda(sigma) ||D(x + sigma eps; sigma) - x||^2 averaged over elements, per sample [B] (EDM Eq. 2, 8)."""
    sigma = lognormal_sigma(x.shape[0], P_mean=P_mean, P_std=P_std, rng=rng).to(x)  # [B]
    noisy = x + expand_sigma(sigma, x) * rng.randn_like(x)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # EDM Tab. 1 lambda(sigma)
    x0_hat = D(noisy, sigma, drop_cond(cond, cond_dropout, rng))
    return weight * ((x0_hat.float() - x.float()) ** 2).flatten(1).mean(dim=1)
