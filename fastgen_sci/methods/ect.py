"""ECT: Easy Consistency Tuning (Geng et al. 2024, arXiv 2406.14548), with its consistency-distillation variant.

The student f(y_t, t) is pulled towards its own stop-gradient value at a smaller noise level r on the
same trajectory; t - r shrinks stage by stage until f maps any noisy point to the trajectory's end.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, expand_sigma
from ..noise import lognormal_sigma
from ..rng import StepRNG
from ..train import Player, Progress


@dataclass(frozen=True)
class ECT:
    """ECT hyperparameters as in the paper; `variant` 'ct' (consistency training) or 'cd' (distillation)."""

    P_mean: float = -1.1
    P_std: float = 2.0
    q: float = 2.0  # t - r halves each stage
    k: float = 8.0  # the 8 of (1 + 8 sigmoid(-t))
    images_per_stage: int = 100_000
    ratio_limit: float = 0.999
    c: float = 1e-8  # pseudo-Huber constant; 0.06 for EDM2-size networks
    variant: str = "ct"
    solver: str = "euler"  # cd: the teacher's step from t to r, 'euler' (ECT) or 'heun' (CM's CD, 2 calls)
    balance_channels: bool = False  # weight channels (dim 1) by 1 / RMS of the batch's targets, mean weight 1
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    optimizer: str = "radam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self):
        if self.variant not in ("ct", "cd"):
            raise ValueError(f"ect variant must be 'ct' or 'cd', got '{self.variant}'")
        if self.solver not in ("euler", "heun"):
            raise ValueError(f"ect solver must be 'euler' or 'heun', got '{self.solver}'")

    def players(self, *, student: nn.Module, teacher: Denoiser | None = None) -> list[Player]:
        if self.variant == "cd" and teacher is None:
            raise ValueError("ect variant 'cd' needs a teacher to take the probability-flow ODE step")
        loss = partial(ect_loss, hp=self, teacher=teacher if self.variant == "cd" else None)
        return [Player("student", student, loss, optimizer=self.optimizer, lr=self.lr, betas=self.betas,
                       weight_decay=self.weight_decay, grad_clip=self.grad_clip)]


def ect_ratio(images_seen: int, *, images_per_stage: int, q: float, ratio_limit: float) -> float:
    """ratio = 1 - q^-(stage + 1), stage = floor(images_seen / images_per_stage), capped at ratio_limit."""
    stage = images_seen // images_per_stage
    return min(1 - q ** -(stage + 1), ratio_limit)


def ect_r(t: Tensor, ratio: float, k: float = 8.0) -> Tensor:
    """r = t - t (1 - ratio)(1 + k sigmoid(-t)), clamped at 0 (ECT Sec. 3.3)."""
    return (t - t * (1 - ratio) * (1 + k * torch.sigmoid(-t))).clamp(min=0)


@contextlib.contextmanager
def same_dropout(seed: int, device: torch.device):
    """Run the enclosed network call with a fixed RNG state, so two calls share dropout masks."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def euler_step(teacher: Denoiser, y_t: Tensor, t: Tensor, r: Tensor, cond: Cond) -> Tensor:
    """One Euler step of the teacher's probability-flow ODE from t to r (EDM Eq. 3)."""
    t_, r_ = expand_sigma(t, y_t), expand_sigma(r, y_t)
    return y_t + (r_ - t_) * (y_t - teacher(y_t, t, cond)) / t_


def heun_step(teacher: Denoiser, y_t: Tensor, t: Tensor, r: Tensor, cond: Cond) -> Tensor:
    """One Heun step of the teacher's probability-flow ODE from t to r (EDM Alg. 1); Euler where r = 0."""
    t_, r_ = expand_sigma(t, y_t), expand_sigma(r, y_t)
    D_t = teacher(y_t, t, cond)  # one call serves both slopes
    y_e = y_t + (r_ - t_) * (y_t - D_t) / t_  # the Euler step, as euler_step computes it
    d_t = (y_t - D_t) / t_
    r_safe = r.clamp(min=torch.finfo(r.dtype).tiny)
    d_r = (y_e - teacher(y_e, r_safe, cond)) / expand_sigma(r_safe, y_t)
    return torch.where(r_ > 0, y_t + (r_ - t_) * (d_t + d_r) / 2, y_e)


def channel_weights(x: Tensor) -> Tensor:
    """Inverse RMS of each channel of x [B, C, ...] over the batch, normalised to mean 1; [C] float64."""
    rms = x.double().transpose(0, 1).flatten(1).pow(2).mean(dim=1).sqrt()
    w = 1 / rms.clamp(min=1e-12)
    return w / w.mean()


def ect_loss(f: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, hp: ECT,
             teacher: Denoiser | None = None) -> Tensor:
    """Pseudo-Huber distance between f(y_t, t) and sg f(y_r, r), weighted by 1/(t - r); per sample [B]."""
    ratio = ect_ratio(progress.images_seen, images_per_stage=hp.images_per_stage, q=hp.q,
                      ratio_limit=hp.ratio_limit)
    t = lognormal_sigma(x.shape[0], P_mean=hp.P_mean, P_std=hp.P_std, rng=rng).clamp(hp.sigma_min, hp.sigma_max)
    t = t.to(x)  # [B]
    r = ect_r(t, ratio, hp.k)  # [B]
    y_t, y_r = trajectory_pair(x, t, r, cond, rng, teacher, solver=hp.solver)
    seed = rng.seed()
    with same_dropout(seed, x.device):
        f_t = f(y_t, t, cond)
    with torch.no_grad(), same_dropout(seed, x.device):
        f_r = f(y_r, r.clamp(min=hp.sigma_min), cond)
    f_r = torch.where(expand_sigma(r, x) > 0, f_r, y_r)  # at r = 0 the target is the endpoint itself
    return pseudo_huber(f_t, f_r, x, c=hp.c, balance_channels=hp.balance_channels) / (t - r).double()


def trajectory_pair(x: Tensor, t: Tensor, r: Tensor, cond: Cond, rng: StepRNG,
                    teacher: Denoiser | None, solver: str = "euler") -> tuple[Tensor, Tensor]:
    """(y_t, y_r) on one trajectory: shared noise (CT), or y_r one teacher ODE step from y_t (CD)."""
    eps = rng.randn_like(x)
    y_t = x + expand_sigma(t, x) * eps
    step = {"euler": euler_step, "heun": heun_step}[solver]
    with torch.no_grad():
        y_r = x + expand_sigma(r, x) * eps if teacher is None else step(teacher, y_t, t, r, cond)
    return y_t, y_r


def pseudo_huber(f_t: Tensor, f_r: Tensor, x: Tensor, *, c: float, balance_channels: bool) -> Tensor:
    """sqrt(d^2 + c^2) - c with d = ||f_t - f_r||_2 per sample, in float64 (ECT); channels optionally balanced."""
    diff = f_t.double() - f_r.double()
    if balance_channels:
        diff = diff * channel_weights(x).reshape(1, -1, *([1] * (x.ndim - 2)))
    d = diff.flatten(1).norm(dim=1)
    return (d**2 + c**2).sqrt() - c
