"""f-distill: DMD2 with the VSD term weighted by an f-divergence (Xu et al. 2025, arXiv 2502.15681).

The discriminator's logit estimates log r, r = p_teacher / p_student at x_t. Each sample's VSD gradient is
multiplied by h(r) = f''(r) r^2, so the divergence f is minimised instead of reverse KL (h = 1). r is
normalised per noise-level bin by a running mean (E_student[r] = 1 at every t), clipped to [0.1, 20], and h is
normalised by its batch mean. The running means are a buffer of the discriminator, so they are checkpointed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..denoiser import Cond
from ..features import Discriminator, FeatureTap
from .dmd2 import DMD2

H = {  # h(r) = f''(r) r^2 up to a constant (f-distill Tab. 1)
    "reverse_kl": lambda r: torch.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: 1 - 1 / (1 + r),
    "sq_hellinger": lambda r: r.sqrt(),
    "jeffreys": lambda r: r + 1,
}


@dataclass(frozen=True)
class FDistill(DMD2):
    """DMD2's fields plus the divergence and the density-ratio normalisation (METHODS.md "f-distill")."""

    divergence: str = "js"
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    bins: int = 10  # log-sigma bins over P_mean +- 3 P_std
    momentum: float = 0.99  # of the per-bin running mean of r

    def __post_init__(self):
        super().__post_init__()
        if self.divergence not in H:
            raise ValueError(f"f_distill divergence '{self.divergence}' unknown; valid: {', '.join(H)}")
        if self.gan_weight <= 0:
            raise ValueError("f_distill estimates the density ratio with the discriminator: gan_weight must be > 0")

    def vsd_weight(self, disc: Discriminator | None, taps: FeatureTap | None, sigma_max: float):
        disc.register_buffer("ratio_mean", torch.ones(self.bins, dtype=torch.float64))

        @torch.no_grad()
        def weight(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
            r = disc(taps(x_t, t, cond)).double().clamp(max=80).exp()  # [B]
            b = sigma_bin(t, P_mean=self.P_mean, P_std=self.P_std, bins=self.bins)
            update_running_mean(disc.ratio_mean, r, b, self.momentum)
            return f_weight(r / disc.ratio_mean[b], self.divergence, self.ratio_min, self.ratio_max).to(x_t)

        return weight


def sigma_bin(t: Tensor, *, P_mean: float, P_std: float, bins: int) -> Tensor:
    """Index [B] of each t's bin among `bins` equal bins of ln t over [P_mean - 3 P_std, P_mean + 3 P_std]."""
    lo, width = P_mean - 3 * P_std, 6 * P_std / bins
    return ((t.double().log() - lo) / width).floor().long().clamp(0, bins - 1)


@torch.no_grad()
def update_running_mean(mean: Tensor, r: Tensor, b: Tensor, momentum: float) -> None:
    """mean[k] <- momentum mean[k] + (1 - momentum) mean(r in bin k), for the bins present in the batch."""
    for k in b.unique().tolist():
        mean[k] = momentum * mean[k] + (1 - momentum) * r[b == k].mean().to(mean)


def f_weight(r: Tensor, divergence: str, ratio_min: float = 0.1, ratio_max: float = 20.0) -> Tensor:
    """h(clip(r)) normalised to batch mean 1; [B]."""
    h = H[divergence](r.clamp(ratio_min, ratio_max))
    return h / h.mean().clamp(min=math.ulp(1.0))
