"""DMD2: improved distribution matching distillation (Yin et al. 2024, arXiv 2405.14867).

Players, declared as data and run by the trainer: the one-step (or few-step) student G, a trainable fake
score initialised from the teacher that tracks the student's law by denoising score matching, and a small
discriminator on the frozen teacher's features (when gan_weight > 0). The student updates once every
`student_every` iterations; the critics every iteration.

Student step: x_g = G(sigma_max eps); x_t = x_g + t eps'; the VSD gradient (fake - real denoised estimates,
divided per sample by mean |x_g - real|) is applied through 0.5 ||x_g - sg(x_g - w (fake - real))||^2;
the GAN term lambda_G softplus(-D(feat(x_t))) reaches x_g through the frozen teacher, never its weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, expand_sigma
from ..features import Discriminator, FeatureTap, logistic
from ..noise import lognormal_sigma
from ..rng import StepRNG
from ..train import Player, Progress
from .sft import dsm_loss


@dataclass(frozen=True)
class Adversarial:
    """What DMD2, f-distill and LADD share: the student's grid, the density of t, the alternation, the
    discriminator's taps and every player's optimizer.

    Args:
        sigma_max: where the one-step student starts; None takes the teacher's.
        sigmas: a multi-step student's intermediate levels; its training input at those levels is real data
            noised to the level (the student's grid is [sigma_max, *sigmas]).
        P_mean, P_std: log-normal density of t for the VSD and GAN terms (and DMD2's fake-score DSM).
        student_every: iterations per student update; the critics update every iteration.
        features: teacher module paths tapped for the discriminator; () taps the teacher's output.
        disc_hidden, disc_seed: the discriminator heads' width, and the seed of their initial weights.
        patch: the GAN losses per feature position (PatchGAN, LADD's per-token heads) rather than on the
            position-mean logit (`features.logistic`).
        r1_weight, r1_sigma: the approximate R1 penalty r1_weight (D(feat(x_t + r1_sigma n)) - D(feat(x_t)))^2 on
            noised real data (a smooth discriminator around the data; 0 turns it off, saving a teacher call).
    """

    sigma_max: float | None = None
    sigmas: tuple[float, ...] = ()
    P_mean: float = -1.2
    P_std: float = 1.2
    student_every: int = 5
    features: tuple[str, ...] = ()
    disc_hidden: int = 64
    disc_seed: int = 0
    patch: bool = False
    r1_weight: float = 0.0
    r1_sigma: float = 0.01
    optimizer: str = "adamw"
    lr: float = 1e-4
    disc_lr: float | None = None  # None: lr
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float | None = 10.0  # the student's
    critic_grad_clip: float | None = 10.0
    ema: bool = False

    def __post_init__(self):
        name = type(self).__name__.lower()
        if self.student_every < 1:
            raise ValueError(f"{name} student_every must be at least 1, got {self.student_every}")
        if list(self.sigmas) != sorted(self.sigmas, reverse=True) or any(s <= 0 for s in self.sigmas):
            raise ValueError(f"{name} sigmas {list(self.sigmas)} must be positive and decreasing")
        if self.r1_weight < 0 or self.r1_sigma <= 0:
            raise ValueError(f"{name} needs r1_weight >= 0 and r1_sigma > 0, got {self.r1_weight}, {self.r1_sigma}")


@dataclass(frozen=True)
class DMD2(Adversarial):
    """DMD2 hyperparameters (METHODS.md "DMD2"): the shared ones plus the GAN weight and the fake score's lr.

    Args:
        student_every: 5, DMD2's 1:4 alternation.
        gan_weight: lambda_G of the GAN term; 0 drops the discriminator player.
    """

    student_every: int = 5
    gan_weight: float = 1e-3
    balance_channels: bool = False  # VSD's normaliser per (sample, channel): variables of unequal scale learn alike
    fake_lr: float | None = None  # None: lr

    def __post_init__(self):
        super().__post_init__()
        if self.gan_weight < 0:
            raise ValueError(f"gan_weight must be >= 0, got {self.gan_weight}")

    def players(self, *, student: nn.Module, teacher: Denoiser | None = None) -> list[Player]:
        teacher = require_teacher(self, teacher)
        sigma_max = self.sigma_max or teacher.sigma_max
        fake = fake_score(teacher, student)
        gen = partial(generate, G=student, hp=self, sigma_max=sigma_max)
        disc, taps = (Discriminator(self.disc_hidden, self.disc_seed), FeatureTap(teacher, self.features)) if self.gan_weight > 0 else (None, None)
        loss = partial(dmd2_student_loss, hp=self, teacher=teacher, fake=fake, disc=disc, taps=taps,
                       sigma_max=sigma_max, weight_fn=self.vsd_weight(disc, taps, sigma_max))
        players = [player(self, "student", student, loss, every=self.student_every),
                   player(self, "fake_score", fake, partial(fake_score_loss, generate=gen, hp=self), lr=self.fake_lr)]
        if disc is not None:
            players.append(discriminator_player(self, disc, taps, gen, sigma_max))
        return players

    def vsd_weight(self, disc: Discriminator | None, taps: FeatureTap | None, sigma_max: float):
        """Per-sample weights of the VSD term, fn(x_t, t, cond) -> [B]; None for DMD2 (f-distill's h(r))."""
        return None


def player(hp, name: str, module: nn.Module, loss, *, every: int = 1, lr: float | None = None,
           prepare=None) -> Player:
    """A player with hp's optimizer; the student clips at hp.grad_clip, critics at hp.critic_grad_clip."""
    student = name == "student"
    return Player(name, module, loss, every=every, phase=every - 1,  # critics update before the student
                  optimizer=hp.optimizer, lr=lr or hp.lr, betas=hp.betas, weight_decay=hp.weight_decay,
                  grad_clip=hp.grad_clip if student else hp.critic_grad_clip, ema=hp.ema and student,
                  prepare=prepare)


def require_teacher(hp, teacher: Denoiser | None) -> Denoiser:
    if teacher is None:
        raise ValueError(f"{type(hp).__name__.lower()} matches the teacher's distribution: it needs a teacher")
    if isinstance(teacher, nn.Module):
        teacher.eval().requires_grad_(False)  # gradients reach its input only; no optimizer state
    return teacher


def fake_score(teacher: Denoiser, student: nn.Module) -> nn.Module:
    """The trainable fake score: a copy of the teacher (of the student when the teacher is a formula)."""
    has_weights = isinstance(teacher, nn.Module) and any(True for _ in teacher.parameters())
    return copy.deepcopy(teacher if has_weights else student).train().requires_grad_(True)


def training_sigma(n: int, hp, rng: StepRNG, sigma_max: float, x: Tensor) -> Tensor:
    """t ~ log-normal(P_mean, P_std), clipped below sigma_max; [n] like x."""
    return lognormal_sigma(n, P_mean=hp.P_mean, P_std=hp.P_std, rng=rng).clamp(max=sigma_max).to(x)


def generate(x: Tensor, cond: Cond, rng: StepRNG, *, G: nn.Module, hp, sigma_max: float) -> Tensor:
    """Student samples x_g [B, ...]: G(sigma_max eps), or for a multi-step student, per row a level of its grid
    drawn uniformly, with real data noised to that level as the input below sigma_max."""
    eps = rng.randn_like(x)
    if not hp.sigmas:
        s = torch.full((x.shape[0],), float(sigma_max), dtype=x.dtype, device=x.device)
        return G(expand_sigma(s, x) * eps, s, cond)
    levels = torch.tensor([sigma_max, *hp.sigmas], dtype=x.dtype, device=x.device)
    k = (rng.rand(x.shape[0]) * len(levels)).long().clamp(max=len(levels) - 1).to(x.device)
    s, noised = levels[k], expand_sigma((k > 0).to(x.dtype), x)  # level 0 is pure noise, as in sampling
    return G(noised * x + expand_sigma(s, x) * eps, s, cond)


def vsd_loss(x_g: Tensor, x_t: Tensor, t: Tensor, cond: Cond, *, teacher: Denoiser, fake: nn.Module,
             weight: Tensor | None = None, balance_channels: bool = False) -> Tensor:
    """0.5 ||x_g - sg(x_g - w (fake(x_t) - real(x_t)))||^2 per sample [B], w = 1 / (mean |x_g - real| + 1e-6).

    Its gradient in x_g is w (fake - real) / n_elements: descent moves x_g along real - fake, towards the
    teacher's law. `weight` [B] (f-distill's h(r)) scales each sample's gradient. balance_channels: the mean
    in w runs over each channel (dim 1) separately, so a channel of small scale gets as large a step.
    """
    dt = torch.promote_types(x_g.dtype, torch.float32)  # bf16 networks: the loss in fp32
    with torch.no_grad():
        x_real, x_fake = teacher(x_t, t, cond).to(dt), fake(x_t, t, cond).to(dt)
        gap = (x_g.detach().to(dt) - x_real).abs()
        if balance_channels and x_g.ndim > 2:
            w = 1 / (gap.flatten(2).mean(dim=2) + 1e-6)  # [B, C]
            w = w.reshape(*w.shape, *([1] * (x_g.ndim - 2)))
        else:
            w = expand_sigma(1 / (gap.flatten(1).mean(dim=1) + 1e-6), x_g)  # [B, 1, ...]
        if weight is not None:
            w = w * expand_sigma(weight.to(dt), x_g)
        target = x_g.detach().to(dt) - w * (x_fake - x_real)
    return 0.5 * ((x_g.to(dt) - target) ** 2).flatten(1).mean(dim=1)


def dmd2_student_loss(G: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, hp: DMD2,
                      teacher: Denoiser, fake: nn.Module, disc: Discriminator | None, taps: FeatureTap | None,
                      sigma_max: float, weight_fn=None) -> Tensor:
    """VSD (+ lambda_G x GAN) for the student; per sample [B]. weight_fn(x_t, t, cond) -> [B] (f-distill)."""
    x_g = generate(x, cond, rng, G=G, hp=hp, sigma_max=sigma_max)
    t = training_sigma(x.shape[0], hp, rng, sigma_max, x)
    x_t = x_g + expand_sigma(t, x_g) * rng.randn_like(x_g)
    weight = weight_fn(x_t.detach(), t, cond) if weight_fn is not None else None
    loss = vsd_loss(x_g, x_t, t, cond, teacher=teacher, fake=fake, weight=weight, balance_channels=hp.balance_channels)
    if disc is not None and hp.gan_weight > 0:
        loss = loss + hp.gan_weight * logistic(disc, taps(x_t, t, cond), real=True, patch=hp.patch)
    return loss


def fake_score_loss(fake: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, generate,
                    hp: DMD2) -> Tensor:
    """Denoising score matching of the fake score on (stop-gradient) student samples; per sample [B]."""
    with torch.no_grad():
        x_g = generate(x, cond, rng)
    sigma_data = getattr(fake, "module", fake).sigma_data
    return dsm_loss(fake, x_g, cond, rng, progress, sigma_data=sigma_data, P_mean=hp.P_mean, P_std=hp.P_std)


def discriminator_loss(D: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, generate,
                       taps: FeatureTap, hp, sigma_max: float) -> Tensor:
    """softplus(D(feat(x_g + t eps))) + softplus(-D(feat(x + t eps'))): fake low, real high (per position when
    hp.patch), + the approximate R1 penalty when hp.r1_weight > 0; per sample [B]."""
    with torch.no_grad():
        x_g = generate(x, cond, rng)
        t = training_sigma(x.shape[0], hp, rng, sigma_max, x)
        fake_feats = taps(x_g + expand_sigma(t, x) * rng.randn_like(x), t, cond)
        x_t = x + expand_sigma(t, x) * rng.randn_like(x)
        real_feats = taps(x_t, t, cond)
        if hp.r1_weight > 0:
            near_feats = taps(x_t + hp.r1_sigma * rng.randn_like(x), t, cond)
    loss = logistic(D, fake_feats, real=False, patch=hp.patch) + logistic(D, real_feats, real=True, patch=hp.patch)
    if hp.r1_weight > 0:
        loss = loss + hp.r1_weight * (D(near_feats) - D(real_feats)) ** 2
    return loss


def discriminator_player(hp, disc: Discriminator, taps: FeatureTap, gen, sigma_max: float) -> Player:
    """The discriminator as a player; its heads are shaped by the teacher's features of the first batch."""

    @torch.no_grad()
    def build(x: Tensor, cond: Cond) -> None:  # only the features' shapes matter: no random draw before the
        t = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)  # heads' init, so it is the same on any number
        disc.build(taps(x, t, cond))  # of processes (a local batch of B / world rows would shift the RNG)

    loss = partial(discriminator_loss, generate=gen, taps=taps, hp=hp, sigma_max=sigma_max)
    return player(hp, "discriminator", disc, loss, lr=hp.disc_lr, prepare=build)
