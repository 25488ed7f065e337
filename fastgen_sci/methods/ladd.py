"""LADD: latent adversarial diffusion distillation (Sauer et al. 2024, arXiv 2403.12015).

Adversarial only: no fake score and no VSD. The student's samples are noised and read by the frozen teacher;
a discriminator on those features (as DMD2's) separates them from noised real data, and the student is
trained to fool it, its gradient reaching x_g through the teacher's input, never the teacher's weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, expand_sigma
from ..features import Discriminator, FeatureTap, logistic
from ..rng import StepRNG
from ..train import Player, Progress
from .dmd2 import Adversarial, discriminator_player, generate, player, require_teacher, training_sigma


@dataclass(frozen=True)
class LADD(Adversarial):
    """LADD hyperparameters: DMD2's shared ones (`Adversarial`); the student updates every `student_every`
    iterations (2-5), the discriminator every iteration; the heads judge every feature position (`patch`),
    as LADD's per-token discriminator heads."""

    student_every: int = 2
    patch: bool = True

    def players(self, *, student: nn.Module, teacher: Denoiser | None = None) -> list[Player]:
        teacher = require_teacher(self, teacher)
        sigma_max = self.sigma_max or teacher.sigma_max
        disc, taps = Discriminator(self.disc_hidden, self.disc_seed), FeatureTap(teacher, self.features)
        gen = partial(generate, G=student, hp=self, sigma_max=sigma_max)
        loss = partial(ladd_student_loss, hp=self, disc=disc, taps=taps, sigma_max=sigma_max)
        return [player(self, "student", student, loss, every=self.student_every),
                discriminator_player(self, disc, taps, gen, sigma_max)]


def ladd_student_loss(G: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, hp: LADD,
                      disc: Discriminator, taps: FeatureTap, sigma_max: float) -> Tensor:
    """softplus(-D(feat(x_g + t eps))): the non-saturating generator loss (per position when hp.patch); per
    sample [B]."""
    x_g = generate(x, cond, rng, G=G, hp=hp, sigma_max=sigma_max)
    t = training_sigma(x.shape[0], hp, rng, sigma_max, x)
    return logistic(disc, taps(x_g + expand_sigma(t, x_g) * rng.randn_like(x_g), t, cond), real=True, patch=hp.patch)
