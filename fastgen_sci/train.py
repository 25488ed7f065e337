"""The one training loop: players, optimizers, warm-up, EMA, precision, DDP, checkpoints, logs.

A method declares its players (which module, which loss, how often it updates); this loop runs them.
Data order and noise are functions of (seed, iteration), so a resumed run, or a run over N processes,
repeats the uninterrupted single-process run.
"""
from __future__ import annotations

import copy
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from . import checkpoint
from .denoiser import Cond
from .rng import StepRNG, derive_seed


@dataclass(frozen=True)
class Progress:
    """Where training stands, for losses with curricula (ECT stages, sCM warm-up)."""

    iteration: int
    images_seen: int


LossFn = Callable[[nn.Module, Tensor, Cond, StepRNG, Progress], Tensor]  # -> per-sample loss [B]


@dataclass
class Player:
    """One trained network: its loss, its update schedule (iteration % every == phase), its optimizer."""

    name: str
    module: nn.Module
    loss: LossFn
    every: int = 1
    phase: int = 0
    optimizer: str = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema: bool = True
    prepare: Callable[[Tensor, Cond], None] | None = None  # sees the first batch before the optimizer is built

    def updates_at(self, iteration: int) -> bool:
        return iteration % self.every == self.phase


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}


@dataclass
class Trainer:
    """Loop settings; everything a method does not decide.

    Args:
        warmup_images: linear learning-rate warm-up length, in training images.
        ema_halflife_images: EMA half-life in images (EDM2-style); ema_rampup caps it at rampup * images seen.
        precision: 'fp32', 'bf16' or 'fp16' (autocast; fp16 adds loss scaling). GPU paths only by default.
        checkpoint_every: iterations between checkpoints (0: only at the end); keep_checkpoints: how many stay.
    """

    iterations: int = 1000
    batch_size: int = 64
    seed: int = 0
    warmup_images: int = 0
    ema_halflife_images: float = 5000.0
    ema_rampup: float | None = 0.05
    precision: str = "fp32"
    device: str = "auto"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    emas: dict = field(default_factory=dict, init=False, repr=False)

    def fit(self, players: Sequence[Player], dataset, run_dir: str | os.PathLike, guard=None) -> dict:
        """Train the players on `dataset` (items {'x': Tensor, 'cond': {...}}) and return a summary.

        guard: e.g. a `guard.SpreadGuard`; when `guard.due(it)`, `guard(it, student)` scores the first player's
        (averaged) network and its numbers join the log row (columns `guard.fields`). With `guard.keep_best`,
        the network with the lowest `guard.criterion(row)` so far is kept in checkpoints/best.safetensors and
        put back into the first player's (averaged) network when training ends (summary key "selected").
        """
        run_dir = Path(run_dir)
        rank, world = _init_distributed()
        device = resolve_device(self.device)
        if self.batch_size % world:
            raise ValueError(f"trainer.batch_size={self.batch_size} must divide by the {world} processes")
        batches = _BatchIndices(len(dataset), self.batch_size, self.seed, rank, world)
        for p in players:
            p.module.to(device)
            if p.prepare is not None:  # e.g. discriminator heads shaped by the features of a real batch
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(derive_seed(self.seed, 0, 0, 2))  # its initial weights: a function of the seed
                    p.prepare(*_fetch(dataset, batches(0), device))
            p.module.to(device).train()
        opts = {p.name: _make_optimizer(p) for p in players}
        self.emas = {p.name: copy.deepcopy(p.module).eval().requires_grad_(False) for p in players if p.ema}
        wrapped = {p.name: _wrap_ddp(p.module, device) if world > 1 else p.module for p in players}
        scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        start = checkpoint.load_latest(run_dir / "checkpoints", players=players, optimizers=opts,
                                       emas=self.emas, scaler=scaler)
        fields = ["iteration", "images", "seconds"] + [f"{k}/{p.name}" for p in players for k in ("loss", "grad_norm", "lr")]
        fields += list(guard.fields) if guard is not None else []
        log = _MetricsLog(run_dir, start=start, fields=fields, enabled=rank == 0, tensorboard=self.tensorboard)
        best = _BestStudent(run_dir / "checkpoints" / "best.safetensors", start=start, enabled=rank == 0) \
            if guard is not None and getattr(guard, "keep_best", False) else None
        bar = tqdm(total=self.iterations, initial=start, disable=rank != 0 or not self.progress_bar,
                   desc="train", unit="it", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15)
        t0 = time.perf_counter()
        reset_peak_memory(device)
        row: dict = {}
        for it in range(start, self.iterations):
            # --- batch and per-iteration randomness -------------------------------------------
            progress = Progress(iteration=it, images_seen=it * self.batch_size)
            x, cond = _fetch(dataset, batches(it), device)
            torch.manual_seed(derive_seed(self.seed, it, rank, 1))  # dropout and other global draws
            row = {"iteration": it, "images": (it + 1) * self.batch_size}
            # --- one update per scheduled player ---------------------------------------------
            for i, p in enumerate(players):
                if not p.updates_at(it):
                    continue
                rng = StepRNG(self.seed, it, i, rank=rank, world_size=world, device=device)
                lr = p.lr * min(1.0, (it + 1) * self.batch_size / max(self.warmup_images, 1))
                for group in opts[p.name].param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=_AUTOCAST[self.precision], enabled=self.precision != "fp32"):
                    loss = p.loss(wrapped[p.name], x, cond, rng, progress).mean()
                _check_finite(loss, p.name, it)
                opts[p.name].zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opts[p.name])
                grad_norm = torch.nn.utils.clip_grad_norm_(p.module.parameters(), p.grad_clip or math.inf)
                scaler.step(opts[p.name])
                scaler.update()
                if p.name in self.emas:
                    _ema_update(self.emas[p.name], p.module, self._ema_beta(it))
                row |= {f"loss/{p.name}": _mean_over_ranks(loss, world), f"grad_norm/{p.name}": float(grad_norm),
                        f"lr/{p.name}": lr}
            if guard is not None and rank == 0 and guard.due(it):
                scores = guard(it, self.averaged(players[0]))
                row |= scores
                if best is not None:
                    best.offer(it + 1, guard.criterion(scores), self.averaged(players[0]))
            # --- logs, progress and checkpoints ------------------------------------------------
            save_now = (self.checkpoint_every and (it + 1) % self.checkpoint_every == 0) or it + 1 == self.iterations
            row["seconds"] = time.perf_counter() - t0
            log.write(row, flush=save_now or (it + 1) % self.log_every == 0)
            bar.update(1)
            bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in row.items() if k.startswith("loss/")}
                            | {"img/s": f"{(it + 1 - start) * self.batch_size / row['seconds']:.0f}"}, refresh=False)
            if save_now:
                if rank == 0:
                    checkpoint.save(run_dir / "checkpoints", it + 1, players=players, optimizers=opts,
                                    emas=self.emas, scaler=scaler, keep=self.keep_checkpoints)
                if world > 1:
                    dist.barrier()
        bar.close()
        log.close()
        seconds = time.perf_counter() - t0
        done = self.iterations - start
        selected = best.restore(self.averaged(players[0])) if best is not None else None
        return ({"selected": selected} if selected else {}) | {"iterations": self.iterations, "resumed_from": start, "seconds": seconds,
                "iterations_per_second": done / seconds if done else 0.0,
                "images_per_second": done * self.batch_size / seconds if done else 0.0,
                "peak_memory_bytes": peak_memory(device), "peak_memory_of": _PEAK_OF[device.type == "cuda"],
                "final": {k: v for k, v in row.items() if "/" in k}}

    def _ema_beta(self, it: int) -> float:
        halflife = self.ema_halflife_images
        if self.ema_rampup is not None:
            halflife = min(halflife, (it + 1) * self.batch_size * self.ema_rampup)
        return 0.5 ** (self.batch_size / max(halflife, 1e-8))

    def averaged(self, player: Player) -> nn.Module:
        """The EMA copy of a player's network (the network itself when it keeps no EMA)."""
        return self.emas.get(player.name, player.module)


_AUTOCAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> this process's GPU when there is one, else CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


_PEAK_OF = {True: "torch.cuda.max_memory_allocated", False: "process peak resident set (VmHWM)"}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or on CPU the process's VmHWM (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # elsewhere the peak covers the whole process


def peak_memory(device: torch.device) -> int:
    """Peak bytes since reset_peak_memory: CUDA allocations, or the CPU process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _make_optimizer(p: Player) -> torch.optim.Optimizer:
    if p.optimizer not in OPTIMIZERS:
        raise ValueError(f"player '{p.name}': optimizer '{p.optimizer}' unknown; choose one of {sorted(OPTIMIZERS)}")
    params = [q for q in p.module.parameters() if q.requires_grad]
    return OPTIMIZERS[p.optimizer](params, lr=p.lr, betas=tuple(p.betas), weight_decay=p.weight_decay)


@torch.no_grad()
def _ema_update(ema: nn.Module, module: nn.Module, beta: float) -> None:
    for e, p in zip(ema.parameters(), module.parameters()):
        e.lerp_(p.detach(), 1 - beta)
    for e, b in zip(ema.buffers(), module.buffers()):
        e.copy_(b)


def _check_finite(loss: Tensor, name: str, it: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"player '{name}' loss is {loss.item()} at iteration {it}: check the data for "
                                 "NaN/inf and the learning rate; the last checkpoint is intact")


def _mean_over_ranks(loss: Tensor, world: int) -> float:
    value = loss.detach().float().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return float(value)


class _BatchIndices:
    """Global batch `it` = positions [it B, (it + 1) B) of a per-epoch permutation; this rank takes a slice."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        if n == 0:
            raise ValueError("the training dataset is empty")
        self.n, self.B, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    @lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, 7)))

    def __call__(self, it: int) -> list[int]:
        local = self.B // self.world
        start = it * self.B + self.rank * local
        return [int(self._perm(pos // self.n)[pos % self.n]) for pos in range(start, start + local)]


def _fetch(dataset, idx: list[int], device: torch.device) -> tuple[Tensor, Cond]:
    items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else default_collate([dataset[i] for i in idx])
    cond = items.get("cond") or None
    cond = {k: v.to(device, non_blocking=True) for k, v in cond.items()} if cond else None
    return items["x"].to(device, non_blocking=True), cond


class _BestStudent:
    """The network with the lowest guard criterion so far, in a safetensors file that survives a resume."""

    def __init__(self, path: Path, *, start: int, enabled: bool):
        self.path, self.enabled, self.score = path, enabled, math.inf
        if enabled and path.exists():
            if start == 0:  # a fresh run: a file left from an earlier one is not a candidate
                path.unlink()
            else:
                self.score = float(checkpoint.read_metadata(path)["score"])

    def offer(self, iteration: int, score: float, module: nn.Module) -> None:
        if self.enabled and score < self.score:
            self.score = score
            checkpoint.save_weights(module, self.path, {"iteration": str(iteration), "score": repr(score)})

    def restore(self, module: nn.Module) -> dict | None:
        """Load the kept network into `module` (every rank); {'iteration', 'score'}, or None if none was kept."""
        if not self.path.exists():
            return None
        checkpoint.load_weights(module, self.path)
        meta = checkpoint.read_metadata(self.path)
        return {"iteration": int(meta["iteration"]), "score": float(meta["score"])}


class _MetricsLog:
    """metrics.csv, one row per iteration (and TensorBoard when installed); a resume drops rows past it."""

    def __init__(self, run_dir: Path, *, start: int, fields: list[str], enabled: bool, tensorboard: bool):
        self.enabled, self.fields, self.pending, self.path, self.tb = enabled, fields, [], run_dir / "metrics.csv", None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._rewrite(_read_rows(self.path, before=start))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                pass

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict, flush: bool) -> None:
        if not self.enabled:
            return
        self.pending.append({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        if self.tb is not None:
            for k, v in row.items():
                if "/" in k:
                    self.tb.add_scalar(k, v, row["iteration"])
        if flush:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerows(self.pending)
            self.pending = []

    def close(self) -> None:
        if self.enabled and self.tb is not None:
            self.tb.close()


def _read_rows(path: Path, before: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: _num(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return [r for r in rows if r["iteration"] < before]


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        return float(v)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.csv as dicts of numbers."""
    return _read_rows(Path(run_dir) / "metrics.csv", before=2**62)
