"""sCM: continuous-time consistency training and distillation in TrigFlow (Lu & Song 2024, arXiv 2410.11081).

The student f(x_t, s) = cos(s) x_t - sin(s) sigma_d F(x_t, s) is pushed along cos(s) df/ds, the change of its
own output along the probability-flow ODE (sCT: the conditional velocity cos(s) z - sin(s) x; sCD: the
teacher's), until f is constant on trajectories. F is the TrigFlow velocity of the EDM student
(`adapters.trigflow_velocity`), so df/ds differentiates through its whole preconditioning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..adapters import trigflow_velocity
from ..denoiser import Cond, Denoiser, expand_sigma
from ..derivatives import MODES, jvp
from ..noise import lognormal_sigma
from ..rng import StepRNG
from ..train import Player, Progress
from .ect import same_dropout


@dataclass(frozen=True)
class SCT:
    """sCT, continuous-time consistency training in TrigFlow; the paper's CIFAR-10 settings (App. G)."""

    P_mean: float = -1.0
    P_std: float = 1.4
    c: float = 0.1  # tangent normalisation g / (rms(g) + c)
    warmup_iterations: int = 10_000  # tangent warm-up H: w = min(1, iteration / H)
    jvp: str = "exact"  # 'exact' (forward-mode AD) or 'fd' (central finite difference)
    optimizer: str = "radam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self):
        if self.jvp not in MODES:
            raise ValueError(f"{type(self).__name__.lower()} jvp must be one of {list(MODES)}, got '{self.jvp}'")

    def players(self, *, student: nn.Module, teacher: Denoiser | None = None) -> list[Player]:
        return [self._player(student, teacher=None)]  # sCT never asks the teacher

    def _player(self, student: nn.Module, teacher: Denoiser | None) -> Player:
        loss = partial(scm_loss, hp=self, teacher=teacher)
        return Player("student", SCMStudent(student), loss, optimizer=self.optimizer, lr=self.lr, betas=self.betas,
                      weight_decay=self.weight_decay, grad_clip=self.grad_clip)

    def sampleable(self, trained: nn.Module) -> nn.Module:
        """The EDM student without its log-variance head."""
        return trained.student


@dataclass(frozen=True)
class SCD(SCT):
    """sCD, continuous-time consistency distillation in TrigFlow: the teacher's velocity gives dx_t/ds."""

    def players(self, *, student: nn.Module, teacher: Denoiser | None = None) -> list[Player]:
        if teacher is None:
            raise ValueError("scd needs a teacher: its velocity is the direction of the consistency tangent")
        return [self._player(student, teacher=teacher)]


class LogVar(nn.Module):
    """Adaptive weighting u(sigma): MLP on Fourier features of c_noise = ln(sigma) / 4, zero at start (EDM2)."""

    def __init__(self, features: int = 32, hidden: int = 32, seed: int = 0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(features // 2, generator=torch.Generator().manual_seed(seed)))
        with torch.random.fork_rng(devices=[]):  # its first layer's init: a function of `seed`, not of the global RNG
            torch.manual_seed(seed)
            self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, sigma: Tensor) -> Tensor:
        phase = 2 * math.pi * (sigma.log() / 4).to(self.freqs.dtype)[:, None] * self.freqs  # [B, features/2]
        return self.mlp(torch.cat([phase.cos(), phase.sin()], dim=1)).squeeze(1)  # [B]


class SCMStudent(nn.Module):
    """What sCM trains: the EDM student (called through) and its log-variance head."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student, self.logvar = student, LogVar()
        self.sigma_data, self.sigma_min, self.sigma_max = student.sigma_data, student.sigma_min, student.sigma_max

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        return self.student(x, sigma, cond)


def tangent_jvp(F_of, x_t: Tensor, s: Tensor, dxds: Tensor, *, mode: str) -> Tensor:
    """J = cos(s) sin(s) dF/ds along (dx_t/ds, 1), no grad: the scaled tangents of sCM Alg. 1 ("JVP rearrangement").

    `fd` steps s by h = max(1e-6, 1e-3 s): central, backward where s + h would reach pi/2.
    """
    cs = s.cos() * s.sin()  # [B]
    h = (1e-3 * s.abs()).clamp(min=1e-6)  # [B], the step in s
    try:
        return jvp(F_of, (x_t, s), (expand_sigma(cs, x_t) * dxds, cs), mode=mode, h=h / cs,
                   ahead=(s + h < math.pi / 2).double())
    except (RuntimeError, NotImplementedError) as e:
        if mode != "exact" or isinstance(e, torch.OutOfMemoryError):
            raise
        raise ValueError(f"sCM: forward-mode JVP failed through the student ({str(e).splitlines()[0][:120]}); "
                         "set method.jvp=fd for the finite-difference derivative") from e


def scm_loss(net: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, hp: SCT,
             teacher: Denoiser | None = None) -> Tensor:
    """e^{-u(s)} mean((F - sg F - g)^2) + u(s) with g the normalised tangent (sCM Alg. 1); per sample [B]."""
    model = getattr(net, "module", net)  # the SCMStudent itself under DDP
    sigma_d = model.sigma_data
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    sigma = lognormal_sigma(x.shape[0], P_mean=hp.P_mean, P_std=hp.P_std, rng=rng).to(x)
    sigma = sigma.clamp(model.sigma_min, model.sigma_max)  # keeps s off 0 and pi/2
    s = torch.atan(sigma / sigma_d)  # [B], sigma = sigma_d tan(s)
    cos, sin = expand_sigma(s.cos(), x), expand_sigma(s.sin(), x)
    z = rng.randn_like(x) * sigma_d
    x_t = cos * x + sin * z  # sCM Eq. 1
    with torch.no_grad():
        dxds = cos * z - sin * x if teacher is None else sigma_d * trigflow_velocity(teacher, x_t, s, cond, sigma_d)
    seed = rng.seed()

    def F_of(x_t: Tensor, s: Tensor) -> Tensor:  # each evaluation with the same dropout masks
        with same_dropout(seed, x.device):
            return trigflow_velocity(model, x_t, s, cond, sigma_d)

    with same_dropout(seed, x.device):
        F = trigflow_velocity(net, x_t, s, cond, sigma_d).to(x.dtype)  # [B, ...], with grad
    J = tangent_jvp(F_of, x_t, s, dxds.to(x.dtype), mode=hp.jvp)
    w = min(1.0, progress.iteration / hp.warmup_iterations) if hp.warmup_iterations > 0 else 1.0  # tangent warm-up
    F_sg = F.detach()
    g = -cos**2 * (sigma_d * F_sg - dxds) - w * (cos * sin * x_t + sigma_d * J.to(x.dtype))  # sCM Alg. 1
    rms = g.pow(2).flatten(1).mean(dim=1).sqrt()  # METHODS.md: rms; Alg. 1 writes ||g||
    g = g / expand_sigma(rms + hp.c, g)
    u = model.logvar(sigma).to(x.dtype)  # [B]
    mse = (F - F_sg - g).pow(2).flatten(1).mean(dim=1)
    # sCM Eq. 8 / Alg. 1: the prior weighting 1/(sigma_d tan s) is the cos(s) in g = cos(s) df/ds; none further
    return torch.exp(-u) * mse + u
