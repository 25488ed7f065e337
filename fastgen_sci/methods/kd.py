"""KD: knowledge distillation of the teacher's ODE (Luhman & Luhman 2021, arXiv 2101.02388).

The student regresses f(sigma_max eps, sigma_max) onto the endpoint of the teacher's deterministic sampler
(EDM Heun) started from the same noise. A few-step student also regresses f at the teacher's ODE point at
each of its intermediate levels onto the same endpoint, which is what few-step sampling feeds it.

The pairs are computed once into a bank. The loss sees batches without dataset indices, so the bank takes
its conditions from the run's first batches: pair k is row k of the first ceil(pairs / B) batches, with noise
seeded by (seed, k). Those batches are fixed by the data, the trainer's seed and the batch size, so the bank is
too. Each batch's part is computed when the batch arrives and stored under `cache_dir` (safetensors, keyed by
the teacher's weights, the sampler settings, pairs, seed and batch size); a rerun or a resume loads the parts.
Unconditional pairs depend on noise alone, so a resume without the cache recomputes them exactly.
"""
from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..denoiser import Cond, Denoiser
from ..noise import karras_sigmas
from ..registry import frozen
from ..rng import StepRNG, derive_seed
from ..samplers import heun
from ..train import Player, Progress


@dataclass(frozen=True)
class KD:
    """Knowledge distillation: regress the student onto the teacher's ODE endpoints from the same noise.

    The teacher's ODE is EDM Heun over `steps` Karras levels, as the default teacher sampler.

    Args:
        pairs: size of the bank of (noise, condition) -> endpoint pairs.
        sigma_min, sigma_max: the teacher grid's ends; None takes the teacher's own (sigma_max is where the
            student starts).
        sigmas: the student's intermediate levels after sigma_max, as `student_sampler.sigmas` ([] one step).
        seed: seeds the pairs' noise (the CLI passes the run's seed).
        cache_dir: where the bank's parts are stored; None keeps them in memory only.
    """

    pairs: int = 50_000
    steps: int = 18
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    sigmas: tuple[float, ...] = ()
    seed: int = 0
    cache_dir: str | None = None
    optimizer: str = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self):
        if self.pairs < 1:
            raise ValueError(f"kd pairs must be at least 1, got {self.pairs}")
        if list(self.sigmas) != sorted(self.sigmas, reverse=True) or any(s <= 0 for s in self.sigmas):
            raise ValueError(f"kd sigmas {list(self.sigmas)} must be positive and decreasing")

    def players(self, *, student: nn.Module, teacher: Denoiser | None = None) -> list[Player]:
        if teacher is None:
            raise ValueError("kd regresses onto the teacher's ODE endpoints: it needs a teacher")
        if isinstance(teacher, nn.Module):
            frozen(teacher)  # eval mode: no dropout in the paths
        loss = partial(kd_loss, bank=PairBank(teacher, hp=self))
        return [Player("student", student, loss, optimizer=self.optimizer, lr=self.lr, betas=self.betas,
                       weight_decay=self.weight_decay, grad_clip=self.grad_clip)]


@torch.no_grad()
def teacher_path(teacher: Denoiser, x: Tensor, cond: Cond, grid: Tensor, levels: Tensor) -> Tensor:
    """Heun solve of x from grid[0] along `grid`, kept at each of `levels` and at 0; [n, L + 1, ...]."""
    states, start = [x], 0
    for s in [*levels[1:].tolist(), 0.0]:
        stop = int((grid == s).nonzero()[0])
        x = heun(teacher, x, grid[start:stop + 1], cond)  # EDM Alg. 2, the last step to 0 is Euler
        states.append(x)
        start = stop
    return torch.stack(states, dim=1)


class PairBank:
    """The teacher's ODE paths of the first `pairs` training rows, one part per batch, cached as safetensors."""

    def __init__(self, teacher: Denoiser, *, hp: KD):
        self.teacher, self.hp, self.filled, self.bar = teacher, hp, 0, None
        hi = hp.sigma_max if hp.sigma_max is not None else teacher.sigma_max
        lo = hp.sigma_min if hp.sigma_min is not None else teacher.sigma_min
        self.levels = torch.tensor([hi, *hp.sigmas], dtype=torch.float64)  # [L], where the student is trained
        karras = karras_sigmas(hp.steps, lo, hi, hp.rho)
        self.grid = torch.cat([karras, self.levels]).unique().flip(0)  # the teacher grid through every level
        self.key, self.bank = None, None

    def draw(self, x: Tensor, cond: Cond, rng: StepRNG, iteration: int) -> tuple[Tensor, Cond]:
        """Paths [B, L + 1, ...] and conditions of B pairs drawn uniformly from the bank filled so far."""
        B, world = x.shape[0], rng.world_size
        n_parts = math.ceil((self.hp.pairs - rng.rank * B) / (B * world))  # parts: the run's first batches
        if n_parts < 1:
            raise ValueError(f"kd pairs={self.hp.pairs} leaves process {rng.rank} without pairs; use at least "
                             f"trainer.batch_size={B * world} pairs")
        self.key = self.key or self._key(x, B * world)
        for j in range(self.filled, min(iteration + 1, n_parts)):  # parts arrive in order: append each
            part = self._part(j, x, cond, rng, now=j == iteration)
            self.bank = part if self.bank is None else {k: torch.cat([self.bank[k], part[k]]) for k in part}
            self.filled = j + 1
        paths = self.bank["paths"]
        idx = (rng.rand(B, dtype=torch.float64) * len(paths)).long().clamp(max=len(paths) - 1).to(paths.device)
        conds = {k[5:]: v[idx] for k, v in self.bank.items() if k.startswith("cond.")}
        return paths[idx], conds or None

    def _part(self, j: int, x: Tensor, cond: Cond, rng: StepRNG, now: bool) -> dict[str, Tensor]:
        """This process's rows of batch j among the first `pairs` (row k of the run: noise seeded by (seed, k)).

        `now`: batch j is the batch in hand (`cond` is its); else an earlier batch, loaded from the cache.
        """
        B, world = x.shape[0], rng.world_size
        k = [j * B * world + rng.rank * B + b for b in range(B)]
        rows = [b for b in range(B) if k[b] < self.hp.pairs]
        path = self._path(j, rng)
        if path is not None and path.exists():
            part = {name: v.to(x.device) for name, v in load_file(str(path)).items()}
            part["paths"] = part["paths"].to(x)
            stored = {name[5:]: v for name, v in part.items() if name.startswith("cond.")}
            if not now or all(torch.equal(v, cond[name][rows]) for name, v in stored.items()):
                return part
        if cond is not None and not now:
            raise ValueError(f"kd: resuming needs the teacher pairs of batch {j} (their conditions come from "
                             f"that batch), but {path or 'method.cache_dir=null'} holds none; keep the cache "
                             "when resuming, or restart the run")
        part_cond = {name: v[rows] for name, v in cond.items()} if cond else None
        noise = torch.stack([torch.randn(x.shape[1:], generator=_generator(self.hp.seed, k[b])) for b in rows]).to(x)
        grid = self.grid.to(x.device)
        part = {"paths": teacher_path(self.teacher, noise * float(self.levels[0]), part_cond, grid, self.levels)}
        part |= {f"cond.{name}": v for name, v in (part_cond or {}).items()}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({name: v.detach().cpu().contiguous() for name, v in part.items()}, str(path))
        self._progress(len(rows), rng)
        return part

    def _progress(self, n: int, rng: StepRNG) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.hp.pairs, desc="kd teacher pairs", unit="pair", leave=False,
                            disable=rng.rank != 0, mininterval=0.5 if sys.stderr.isatty() else 15)
        self.bar.update(n)
        if self.bar.n >= self.hp.pairs // rng.world_size:
            self.bar.close()

    def _path(self, j: int, rng: StepRNG) -> Path | None:
        if self.hp.cache_dir is None:
            return None
        name = f"part-{j:06d}-{rng.rank}of{rng.world_size}.safetensors"
        return Path(self.hp.cache_dir).expanduser() / f"kd-{self.key}" / name

    @torch.no_grad()
    def _key(self, x: Tensor, global_batch: int) -> str:
        """Hash of the teacher's weights (or, for a formula, its outputs), the sampler, pairs, seed and batch size."""
        h = hashlib.sha256(type(self.teacher).__name__.encode())
        state = getattr(self.teacher, "state_dict", dict)()
        for name, v in state.items():
            h.update(name.encode() + v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        if not state:  # a closed-form teacher: fingerprint what it computes
            probe = torch.randn(4, *x.shape[1:], generator=_generator(0)).to(x)
            h.update(self.teacher(probe * 2, torch.full((4,), 2.0).to(x)).double().cpu().numpy().tobytes())
        h.update(repr((self.grid.tolist(), self.levels.tolist(), self.hp.pairs, self.hp.seed, global_batch)).encode())
        return h.hexdigest()[:16]


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


def kd_loss(f: nn.Module, x: Tensor, cond: Cond, rng: StepRNG, progress: Progress, *, bank: PairBank) -> Tensor:
    """0.5 * mean over elements of (f(x_s, s) - endpoint)^2 at each student level s, averaged over levels; [B].

    `x` only sets shape and device: the pairs (and their conditions) come from the bank.
    """
    paths, cond = bank.draw(x, cond, rng, progress.iteration)  # [B, L + 1, ...]
    B, L = paths.shape[0], paths.shape[1] - 1
    x_s = paths[:, :L].transpose(0, 1).reshape(L * B, *paths.shape[2:])  # level-major [L B, ...]
    sigma = bank.levels.to(x).repeat_interleave(B)  # [L B]
    cond = {k: v.repeat(L, *[1] * (v.ndim - 1)) for k, v in cond.items()} if cond else None
    target = paths[:, L].repeat(L, *[1] * (paths.ndim - 2))  # the endpoint, [L B, ...]
    err = (f(x_s, sigma, cond).to(target.dtype) - target) ** 2  # the teacher's sample as regression target
    return 0.5 * err.flatten(1).mean(dim=1).reshape(L, B).mean(dim=0)
