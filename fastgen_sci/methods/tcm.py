"""TCM: Truncated Consistency Models (Lee et al. 2024, arXiv 2410.14895).

Stage 1 is ECT over the whole noise range. Stage 2 keeps a frozen copy of the stage-1 student as the
consistency function below transition_t and trains the student only on t in [transition_t, sigma_max]:
its target at r < transition_t is the frozen model's output, and a fraction of each batch sits exactly at
transition_t (the boundary loss). The student can spend its capacity on generation instead of denoising.

The frozen copy lives in the trained module (`TCMStudent`), so checkpoints carry it and a resume goes on
with it. It is the live student at the first stage-2 iteration: the paper freezes the stage-1 EMA, which the
loss does not see (the trainer owns it); an EMA kept inside the module measured no better on the toy pack.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, expand_sigma
from ..rng import StepRNG
from ..train import Player, Progress
from .ect import ECT, ect_loss, ect_r, ect_ratio, pseudo_huber, same_dropout, trajectory_pair


@dataclass(frozen=True)
class TCM(ECT):
    """Truncated consistency: ECT, then the student trains on t >= transition_t against a frozen stage-1 copy.

    ECT's fields set stage 1 and the r(t) schedule of both stages; stage 2's defaults are the official code's.

    Args:
        stage1_iterations: iterations of ECT before the student is copied into the frozen model.
        transition_t: t' of the paper; stage 2 trains t in [t', sigma_max].
        t_mean, t_std, t_df: ln t ~ Student-t(t_df) with location t_mean and scale t_std, truncated to
            [ln t', ln sigma_max] (stage 2's density; CIFAR-10 and ImageNet-64 use 0, 0.2, 0.01).
        boundary_prob: fraction of each stage-2 batch at exactly t = t'.
        w_boundary: weight of the boundary loss against the consistency loss (both batch means).
    """

    variant: str = "cd"
    stage1_iterations: int = 1500
    transition_t: float = 1.0
    t_mean: float = 0.0
    t_std: float = 0.2
    t_df: float = 0.01
    boundary_prob: float = 0.25
    w_boundary: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if not self.sigma_min <= self.transition_t < self.sigma_max:
            raise ValueError(f"tcm transition_t={self.transition_t} must lie in [sigma_min, sigma_max)")
        if not 0 <= self.boundary_prob < 1:
            raise ValueError(f"tcm boundary_prob={self.boundary_prob} must be in [0, 1)")

    def players(self, *, student: nn.Module, teacher: Denoiser | None = None) -> list[Player]:
        if self.variant == "cd" and teacher is None:
            raise ValueError("tcm variant 'cd' needs a teacher to take the probability-flow ODE step")
        loss = partial(tcm_loss, hp=self, teacher=teacher if self.variant == "cd" else None)
        return [Player("student", TCMStudent(student), loss, optimizer=self.optimizer, lr=self.lr, betas=self.betas,
                       weight_decay=self.weight_decay, grad_clip=self.grad_clip)]

    def sampleable(self, trained: nn.Module) -> nn.Module:
        """The student without its frozen stage-1 copy."""
        return trained.student


class TCMStudent(nn.Module):
    """What TCM trains: the student (called through) and the frozen stage-1 copy, checkpointed with it."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student, self.frozen = student, copy.deepcopy(student).requires_grad_(False)
        self.register_buffer("frozen_ready", torch.tensor(False))  # set once stage 2 has copied the student in
        self.sigma_data, self.sigma_min, self.sigma_max = student.sigma_data, student.sigma_min, student.sigma_max

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        return self.student(x, sigma, cond)

    def train(self, mode: bool = True) -> TCMStudent:
        super().train(mode)
        self.frozen.eval()  # a fixed function: no dropout in the targets it gives
        return self

    @torch.no_grad()
    def freeze(self) -> None:
        """Copy the student's weights into the frozen model (the first stage-2 iteration)."""
        self.frozen.load_state_dict(self.student.state_dict())
        self.frozen_ready.fill_(True)


def log_student_t(n: int, *, mean: float, std: float, df: float, lo: float, hi: float, rng: StepRNG) -> Tensor:
    """t with ln t ~ Student-t(df, mean, std) truncated to [ln lo, ln hi], by inverse CDF; [n] float64."""
    from scipy import stats

    a, b = stats.t.cdf([(math.log(lo) - mean) / std, (math.log(hi) - mean) / std], df)
    u = rng.rand(n, dtype=torch.float64).cpu().numpy()
    z = stats.t.ppf(a + u * (b - a), df)
    return torch.from_numpy(mean + std * z).exp().clamp(lo, hi).to(rng.device)


def stage2_t(n: int, *, hp: TCM, rng: StepRNG) -> tuple[Tensor, Tensor]:
    """Stage-2 noise levels [n] and the boundary mask [n]: the first round(boundary_prob B) rows of the global
    batch (its rows are in random order already) sit at t = transition_t."""
    t = log_student_t(n, mean=hp.t_mean, std=hp.t_std, df=hp.t_df, lo=hp.transition_t, hi=hp.sigma_max, rng=rng)
    rows = rng.rank * n + torch.arange(n, device=t.device)
    boundary = rows < round(hp.boundary_prob * n * rng.world_size)
    return torch.where(boundary, torch.full_like(t, hp.transition_t), t), boundary


def tcm_loss(f: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, hp: TCM,
             teacher: Denoiser | None = None) -> Tensor:
    """Stage 1: ECT's loss. Stage 2: the truncated consistency loss plus the boundary loss; per sample [B]."""
    if progress.iteration < hp.stage1_iterations:
        return ect_loss(f, x, cond, rng, progress, hp=hp, teacher=teacher)  # a TCM is an ECT
    model = getattr(f, "module", f)  # the TCMStudent under DDP too
    if not model.frozen_ready:
        model.freeze()
    ratio = ect_ratio(progress.images_seen, images_per_stage=hp.images_per_stage, q=hp.q, ratio_limit=hp.ratio_limit)
    t, boundary = stage2_t(x.shape[0], hp=hp, rng=rng)
    t = t.to(x)  # [B]
    r = ect_r(t, ratio, hp.k)  # [B], the schedule continues from stage 1
    y_t, y_r = trajectory_pair(x, t, r, cond, rng, teacher, solver=hp.solver)
    seed = rng.seed()
    with same_dropout(seed, x.device):
        f_t = f(y_t, t, cond)
    with torch.no_grad():
        with same_dropout(seed, x.device):
            f_r = model.student(y_r, r.clamp(min=hp.sigma_min), cond)
        below = r < hp.transition_t  # TCM's parameterisation: the frozen stage-1 model below t'
        if below.any():
            sub = {k: v[below] for k, v in cond.items()} if cond else None
            f_r[below] = model.frozen(y_r[below], r[below].clamp(min=hp.sigma_min), sub).to(f_r.dtype)
    f_r = torch.where(expand_sigma(r, x) > 0, f_r, y_r)  # at r = 0 the target is the endpoint itself
    loss = pseudo_huber(f_t, f_r, x, c=hp.c, balance_channels=hp.balance_channels) / (t - r).double()
    # batch mean = mean(consistency rows) + w_boundary mean(boundary rows) (official code)
    n, n_b = x.shape[0] * rng.world_size, round(hp.boundary_prob * x.shape[0] * rng.world_size)
    weight = torch.where(boundary, hp.w_boundary * n / max(n_b, 1), n / max(n - n_b, 1))
    return loss * weight.to(loss)
