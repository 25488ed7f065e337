"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): a two-time student learns the average velocity over [r, t].

Rectified-flow time: z_t = (1 - t) x + t eps, so EDM's sigma = t / (1 - t) and x = z_t / (1 - t). `TimeGap`
makes the one-time student D(x; sigma) two-time: Fourier features of the gap h = t - r, through a
zero-initialised projection, are added to the output of its noise-embedding submodule. Then
u(z_t, t, r) = (z_t - D_h(z_t / (1 - t); sigma_t)) / t: at r = t the flow velocity eps - x, at r = 0 the
one-step map D_{h=t}, and at initialisation the teacher's instantaneous velocity for every r.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, expand_sigma
from ..derivatives import MODES, jvp
from ..rng import StepRNG
from ..train import Player, Progress
from .ect import channel_weights, same_dropout


@dataclass(frozen=True)
class MeanFlow:
    """MeanFlow hyperparameters; `variant` 'ct' (v = eps - x) or 'cd' (v = the teacher's velocity).

    Args:
        embedding: the student's noise-embedding submodule the gap is added to (e.g. 'net.embed').
        sigma_max: the top of t's range, where the one-step map starts (the student sampler's sigma_max); None
            takes the student's own.
        jvp: 'exact' (forward-mode AD) or 'fd' (boundary-aware finite difference, step fd_step in ln sigma).
    """

    P_mean_t: float = -0.6  # logit-normal t and r (METHODS.md); (t, r) <- (max, min)
    P_std_t: float = 1.6
    P_mean_r: float = -4.0
    P_std_r: float = 1.6
    flow_ratio: float = 0.75  # share of the batch with r = t; MeanFlow Tab. 1a: 25% r != t is best
    p: float = 1.0  # adaptive weight 1 / (||Delta|| + c)^p (METHODS.md)
    c: float = 0.1
    balance_channels: bool = False  # velocities weighted per channel by 1 / RMS of the batch's data (ECT's)
    variant: str = "cd"
    jvp: str = "exact"
    fd_step: float = 1e-3
    embedding: str | None = None
    sigma_max: float | None = None
    optimizer: str = "adam"
    lr: float = 1e-4  # MeanFlow Tab. 4 (ImageNet): Adam, lr 1e-4, betas (0.9, 0.95)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self):
        if self.variant not in ("ct", "cd"):
            raise ValueError(f"meanflow variant must be 'ct' or 'cd', got '{self.variant}'")
        if self.jvp not in MODES:
            raise ValueError(f"meanflow jvp must be one of {list(MODES)}, got '{self.jvp}'")
        if not 0 <= self.flow_ratio <= 1:
            raise ValueError(f"meanflow flow_ratio={self.flow_ratio} must be a share between 0 and 1")
        if self.sigma_max is not None and self.sigma_max <= 0:
            raise ValueError(f"meanflow sigma_max={self.sigma_max} must be positive (or null: the student's)")

    def players(self, *, student: nn.Module, teacher: Denoiser | None = None) -> list[Player]:
        if self.variant == "cd" and teacher is None:
            raise ValueError("meanflow variant 'cd' needs a teacher for the instantaneous velocity")
        model = student if isinstance(student, TimeGap) else TimeGap(student, self.embedding)
        loss = partial(meanflow_loss, hp=self, sigma_min=model.sigma_min,
                       sigma_max=self.sigma_max or model.sigma_max, teacher=teacher if self.variant == "cd" else None)
        return [Player("student", model, loss, optimizer=self.optimizer, lr=self.lr, betas=self.betas,
                       weight_decay=self.weight_decay, grad_clip=self.grad_clip)]


class TimeGap(nn.Module):
    """A Denoiser made two-time, D_h(x; sigma): a hook that lives only for the call adds proj(features(h))
    to the output of submodule `embedding`. A Denoiser (h = 0) and a FlowMap."""

    def __init__(self, denoiser: nn.Module, embedding: str | None, features: int = 32):
        super().__init__()
        self.denoiser, self.embedding = denoiser, embedding
        self.sigma_data, self.sigma_min, self.sigma_max = denoiser.sigma_data, denoiser.sigma_min, denoiser.sigma_max
        width = _width(denoiser, embedding)
        self.register_buffer("freqs", torch.logspace(-1, 1, features // 2))  # 0.1 to 10 cycles per unit gap
        self.proj = nn.Linear(2 * (features // 2), width)
        nn.init.zeros_(self.proj.weight)  # zero: the teacher's output at initialisation
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None, gap: Tensor | float = 0.0) -> Tensor:
        """x0_hat with the gap h = t - r [B] (rectified-flow time) in the noise embedding."""
        h = torch.as_tensor(gap, device=x.device).expand(x.shape[0])
        phase = 2 * math.pi * h[:, None].double() * self.freqs.double()  # [B, F/2]; float64: J's steps near t = 1
        emb = self.proj(torch.cat([phase.cos(), phase.sin()], dim=1).to(self.proj.weight.dtype))  # [B, width]

        def add(module, args, out):
            return out + emb.reshape(*emb.shape, *([1] * (out.ndim - 2))).to(out.dtype)

        handle = self.denoiser.get_submodule(self.embedding).register_forward_hook(add)
        try:
            return self.denoiser(x, sigma, cond)
        finally:
            handle.remove()

    def flow_map(self, x: Tensor, sigma: Tensor, sigma_r: Tensor, cond: Cond = None) -> Tensor:
        """z_r = z_t - (t - r) u(z_t, t, r) in EDM variables: D_h + (sigma_r / sigma)(x - D_h), h = t - r."""
        sigma, sigma_r = (torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(x.shape[0])
                          for s in (sigma, sigma_r))
        x0_hat = self(x, sigma, cond, gap=sigma / (1 + sigma) - sigma_r / (1 + sigma_r))
        return x0_hat + expand_sigma(sigma_r / sigma, x) * (x - x0_hat)


def _width(denoiser: nn.Module, path: str | None) -> int:
    """Output width of submodule `path`, or one clear error naming the candidates."""
    try:
        module = denoiser.get_submodule(path) if path else None
    except AttributeError:
        module = None
    if module is None:
        keys = ("emb", "map", "noise", "time")
        names = [n for n, _ in denoiser.named_modules() if any(k in n.rsplit(".", 1)[-1].lower() for k in keys)]
        raise ValueError(f"method.embedding={path!r} is not a submodule of the student {type(denoiser).__name__}; "
                         f"set it to its noise embedding, one of: {', '.join(names) or '(no candidates found)'}")
    width = getattr(module, "out_features", None)
    if not isinstance(width, int):
        raise ValueError(f"method.embedding={path!r} is a {type(module).__name__} without out_features; "
                         "name a Linear-like submodule whose output the gap can be added to")
    return width


def average_velocity(D: nn.Module, z: Tensor, t: Tensor, r: Tensor, cond: Cond,
                     dtype: torch.dtype | None = None) -> Tensor:
    """u(z_t, t, r) = (z_t - D_h(z_t / (1 - t); t / (1 - t))) / t with h = t - r; D sees `dtype` (default z's)."""
    t_ = expand_sigma(t, z)
    return (z - D((z / (1 - t_)).to(dtype or z.dtype), t / (1 - t), cond, gap=t - r).to(z.dtype)) / t_


def sample_t_r(n: int, *, hp: MeanFlow, rng: StepRNG, t_min: float, t_max: float) -> tuple[Tensor, Tensor]:
    """t >= r, logit-normal, t in [t_min, t_max]; a share `flow_ratio` of the batch gets r = t (METHODS.md)."""
    a = torch.sigmoid(hp.P_mean_t + hp.P_std_t * rng.randn(n))
    b = torch.sigmoid(hp.P_mean_r + hp.P_std_r * rng.randn(n))
    t = torch.maximum(a, b).clamp(t_min, t_max)
    r = torch.minimum(torch.minimum(a, b), t)
    return t, torch.where(rng.rand(n) < hp.flow_ratio, t, r)


def time_derivative(D: nn.Module, z: Tensor, t: Tensor, r: Tensor, v: Tensor, cond: Cond, *, mode: str,
                    step: float, t_max: float, seed: int, dtype: torch.dtype | None = None) -> Tensor:
    """J = du/dt along (dz/dt, dt/dt, dr/dt) = (v, 1, 0), no grad (MeanFlow Eq. 8). The finite difference
    steps `step` in logit t = ln sigma (h = step t (1 - t)) and stays in [r, t_max]: central inside,
    forward at t = r, backward at t_max. z and t are shifted in float64, D runs in `dtype` (default z's)."""
    def u(z_: Tensor, t_: Tensor) -> Tensor:
        with same_dropout(seed, z.device):  # every evaluation shares the dropout masks of u itself
            return average_velocity(D, z_, t_, r.double(), cond, dtype=dtype or z.dtype)

    t = t.double()  # near t = 1 a float32 t + h would round away 5% of h (1 - t = 1.25e-3 at sigma 800)
    h = step * t * (1 - t)  # [B]; a fixed 1e-4 in t moves sigma = 800 by 8%
    behind = t - h >= r  # a stencil crossing r would turn the gap negative
    ahead = (t + h <= t_max) | ~behind
    fp32 = torch.autocast(z.device.type, enabled=False) if mode == "fd" else contextlib.nullcontext()
    try:  # a finite difference in bf16/fp16 would be rounding noise: it runs without autocast
        with fp32:
            return jvp(u, (z.double(), t), (v.double(), torch.ones_like(t)), mode=mode, h=h, ahead=ahead.float(),
                       behind=behind.float())
    except (RuntimeError, NotImplementedError) as e:
        if mode == "exact" and any(k in str(e).lower() for k in ("forward", "jvp", "setup_context")):
            raise ValueError(f"the student has no forward-mode AD ({str(e).splitlines()[0]}); run with "
                             "method.jvp=fd") from e
        raise


def adaptive_loss(u: Tensor, u_tgt: Tensor, *, p: float, c: float) -> Tensor:
    """||u - sg(u + lambda Delta)||^2 per sample [B], Delta = u_tgt - sg u, lambda = 1 / (||Delta|| + c)^p."""
    u = u.double().flatten(1)
    delta = u_tgt.double().flatten(1) - u.detach()
    lam = 1 / (delta.norm(dim=1, keepdim=True) + c) ** p  # METHODS.md MeanFlow (the paper: 1 / (||Delta||^2 + c)^p)
    return ((u - (u.detach() + lam * delta)) ** 2).sum(dim=1)


def meanflow_loss(D: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, hp: MeanFlow,
                  sigma_min: float, sigma_max: float, teacher: Denoiser | None = None) -> Tensor:
    """MeanFlow's loss for a two-time denoiser D(x, sigma, cond, gap=h); per sample [B]."""
    t, r = sample_t_r(x.shape[0], hp=hp, rng=rng, t_min=sigma_min / (1 + sigma_min), t_max=sigma_max / (1 + sigma_max))
    t, r = t.to(x.device, torch.float64), r.to(x.device, torch.float64)  # [B]; RF variables in float64
    eps = rng.randn_like(x)
    t_ = t.reshape(-1, *([1] * (x.ndim - 1)))  # [B, 1, ...] float64
    z = (1 - t_) * x + t_ * eps
    with torch.no_grad():  # the instantaneous velocity: eps - x (CT) or the teacher's (CD)
        v = eps - x if teacher is None else (z - teacher((z / (1 - t_)).to(x), t / (1 - t), cond).double()) / t_
    seed = rng.seed()
    with same_dropout(seed, x.device):
        u = average_velocity(D, z, t, r, cond, dtype=x.dtype)
    J = time_derivative(D, z, t, r, v, cond, mode=hp.jvp, step=hp.fd_step, t_max=sigma_max / (1 + sigma_max), seed=seed,
                        dtype=x.dtype)
    u_tgt = v - expand_sigma(t - r, z) * J  # MeanFlow Eq. 10
    if hp.balance_channels and x.ndim > 2:  # variables of unequal scale: Delta (and lambda) in balanced units
        w = channel_weights(x).reshape(1, -1, *([1] * (x.ndim - 2)))
        u, u_tgt = u * w, u_tgt * w
    return adaptive_loss(u, u_tgt, p=hp.p, c=hp.c)
