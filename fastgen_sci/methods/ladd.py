"""LADD: latent adversarial diffusion distillation (Sauer et al. 2024, arXiv 2403.12015).

Adversarial only: no fake score and no VSD. The student's samples are noised and read by the frozen teacher;
a discriminator on those features (as DMD2's) separates them from noised real data, and the student is
trained to fool it, its gradient reaching x_g through the teacher's input, never the teacher's weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, expand_sigma
from ..features import Discriminator, FeatureTap
from ..rng import StepRNG
from ..train import Player, Progress
from .dmd2 import discriminator_player, generate, player, require_teacher, training_sigma


@dataclass(frozen=True)
class LADD:
    """LADD hyperparameters; the student updates every `student_every` iterations (2-5), the discriminator
    every iteration. Fields shared with DMD2 mean the same (sigma_max, sigmas, P_mean/P_std, features)."""

    sigma_max: float | None = None
    sigmas: tuple[float, ...] = ()
    P_mean: float = -1.2
    P_std: float = 1.2
    student_every: int = 2
    features: tuple[str, ...] = ()
    disc_hidden: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-4
    disc_lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float | None = 10.0
    critic_grad_clip: float | None = 10.0
    ema: bool = False

    def __post_init__(self):
        if self.student_every < 1:
            raise ValueError(f"ladd student_every must be at least 1, got {self.student_every}")

    def players(self, *, student: nn.Module, teacher: Denoiser | None = None) -> list[Player]:
        teacher = require_teacher(self, teacher)
        sigma_max = self.sigma_max or teacher.sigma_max
        disc, taps = Discriminator(self.disc_hidden), FeatureTap(teacher, self.features)
        gen = partial(generate, G=student, hp=self, sigma_max=sigma_max)
        loss = partial(ladd_student_loss, hp=self, disc=disc, taps=taps, sigma_max=sigma_max)
        return [player(self, "student", student, loss, every=self.student_every),
                discriminator_player(self, disc, taps, gen, sigma_max)]


def ladd_student_loss(G: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, hp: LADD,
                      disc: Discriminator, taps: FeatureTap, sigma_max: float) -> Tensor:
    """softplus(-D(feat(x_g + t eps))): the non-saturating generator loss; per sample [B]."""
    x_g = generate(x, cond, rng, G=G, hp=hp, sigma_max=sigma_max)
    t = training_sigma(x.shape[0], hp, rng, sigma_max, x)
    return F.softplus(-disc(taps(x_g + expand_sigma(t, x_g) * rng.randn_like(x_g), t, cond)))
