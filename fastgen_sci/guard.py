"""Guard rails against spread collapse: score the student's ensemble on a fixed validation batch while training.

Distribution-matching students can collapse onto a few modes while their loss looks fine. Every `every`
iterations the guard draws `members` members for the first `cases` evaluation cases (the same noise each
time) and logs, next to the losses:
* guard/ssr: corrected spread-skill ratio against the truth (when the pack has one), ~1 when reliable;
* guard/ssr_worst: the same per channel, the channel's furthest from 1 (on a log scale);
* guard/spread_ratio: student spread / teacher spread, ~1 when the student keeps the teacher's spread;
* guard/spread_ratio_worst: the same per channel, the channel's furthest from 1 (on a log scale);
* guard/teacher_rank_flatness: flatness of the rank of teacher members among the student's (~1 when the
  two ensembles are exchangeable, large when the student's range misses the teacher's draws);
* guard/crps: the student's fair CRPS against the truth (when the pack has one), in model space;
* guard/crps_ratio, guard/crps_ratio_max: the student's fair CRPS over the teacher's per channel (dim 0 of a
  sample with more than one dim; channels of unequal scale count alike), averaged, and the worst channel's.
It warns when the SSR (or, without truth, the spread ratio) falls below `ssr_floor`.

With `keep_best` the trainer keeps the student whose `criterion` is lowest and returns it instead of the last one:
a GAN's spread swings while it trains, so the iteration where training happens to stop should not decide the
result. `select` names the criterion:
* 'crps': the worst channel's CRPS ratio to the teacher (without truth: the worst channel's |log spread ratio|);
* 'crps_spread': the worst channel's CRPS ratio or spread mismatch max(r, 1/r) with r its spread ratio, whichever
  is larger. A proper score barely moves when the spread is 30% short (the fair CRPS of N(0, 0.7^2) against
  N(0, 1) draws is 3% above the optimum); this criterion makes a spread 30% short count as a 43% skill loss.
* 'crps_ssr': the same with r the channel's SSR against the truth: calibration, not the teacher's spread (an
  over-dispersed teacher, SSR 1.1, leaves a student matched to it little room below a band's 1.15).
Without truth every criterion falls back to the worst channel's |log spread ratio|. Select on validation cases,
never on the evaluation cases' truth (the CLI passes the pack's `validation_cases` when it has them, and drops
the truth of evaluation cases from a selecting guard).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .ensemble import sample_ensemble
from .metrics import crps_ensemble, rank_flatness, rank_histogram, spread_skill
from .registry import EvalCases
from .samplers import SamplerSpec

SELECT = ("crps", "crps_spread", "crps_ssr")
FIELDS = ["guard/ssr", "guard/spread_ratio", "guard/spread_ratio_worst", "guard/ssr_worst",
          "guard/teacher_rank_flatness", "guard/crps", "guard/crps_ratio", "guard/crps_ratio_max"]


@dataclass
class SpreadGuard:
    """Spread and teacher-rank scores of the student on a fixed validation batch (see the module doc)."""

    cases: EvalCases
    teacher: Denoiser
    teacher_sampler: SamplerSpec
    student_sampler: SamplerSpec
    every: int = 100
    members: int = 8
    n_cases: int = 8
    ssr_floor: float = 0.5
    seed: int = 0
    keep_best: bool = False
    select: str = "crps"
    device: torch.device | str = "cpu"
    unwrap: Callable[[nn.Module], nn.Module] = lambda m: m  # trained module -> sampleable Denoiser
    fields: list[str] = field(default_factory=lambda: list(FIELDS))
    _teacher_ens: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.select not in SELECT:
            raise ValueError(f"guard select must be one of {list(SELECT)}, got '{self.select}'")
        if self.members < 2:
            raise ValueError(f"guard members must be at least 2 (a spread needs two), got {self.members}")
        self.cases = _first(self.cases, self.n_cases)

    def due(self, iteration: int) -> bool:
        return self.every > 0 and (iteration + 1) % self.every == 0

    @torch.no_grad()
    def __call__(self, iteration: int, student: nn.Module) -> dict[str, float]:
        if self._teacher_ens is None:
            self._teacher_ens = self._ensemble(self.teacher, self.teacher_sampler)
        was_training = student.training
        student.eval()
        try:
            ens = self._ensemble(self.unwrap(student), self.student_sampler)
        finally:
            student.train(was_training)
        row = scores(ens, self._teacher_ens, self.cases.truth)
        ratio = row.get("guard/ssr", row["guard/spread_ratio"])
        if not ratio == ratio or ratio < self.ssr_floor:  # NaN counts as collapsed
            name = "SSR" if "guard/ssr" in row else "spread ratio to the teacher"
            tqdm.write(f"WARNING: iteration {iteration + 1}: the student's spread is collapsing: {name} {ratio:.3g} "
                  f"< guard floor {self.ssr_floor} (teacher-rank flatness {row['guard/teacher_rank_flatness']:.3g}; "
                  "1 is flat)", file=sys.stderr)
        return row

    def criterion(self, row: dict[str, float]) -> float:
        """Lower is better (`select`, module doc); skill and spread targets hold per variable, so per channel."""
        def log_mismatch(key: str) -> float:  # NaN (a collapsed or broken ensemble): infinitely far
            return abs(math.log(max(row[key], 1e-300))) if row[key] == row[key] else math.inf

        spread = log_mismatch("guard/spread_ratio_worst" if "guard/spread_ratio_worst" in row else "guard/spread_ratio")
        if "guard/crps_ratio_max" not in row:
            score = spread
        elif self.select == "crps_spread":
            score = max(row["guard/crps_ratio_max"], math.exp(spread))
        elif self.select == "crps_ssr":
            score = max(row["guard/crps_ratio_max"], math.exp(log_mismatch("guard/ssr_worst")))
        else:
            score = row["guard/crps_ratio_max"]
        return score if score == score else math.inf  # NaN: never the best

    def _ensemble(self, model: Denoiser, sampler: SamplerSpec) -> Tensor:
        return sample_ensemble(model, sampler, self.cases, self.members, seed=self.seed, batch_size=256,
                               device=self.device, progress=False)  # [N, M, *shape]


def scores(student: Tensor, teacher: Tensor, truth: Tensor | None) -> dict[str, float]:
    """Guard scores of ensembles [N, M, *shape] (teacher too) against truth [N, *shape] or None."""
    s, t = student.transpose(0, 1).double(), teacher.transpose(0, 1).double()  # members first
    var_s, var_t = s.var(0), t.var(0)  # [N, *shape]
    spread_ratios = (_per_channel(var_s) / _per_channel(var_t).clamp(min=1e-300)).sqrt()  # [C]
    g = torch.Generator().manual_seed(0)
    counts = sum(rank_histogram(s, t[k], generator=g) for k in range(t.shape[0]))
    row = {"guard/spread_ratio": float((var_s.mean() / var_t.mean().clamp(min=1e-300)).sqrt()),
           "guard/spread_ratio_worst": _furthest_from_one(spread_ratios),
           "guard/teacher_rank_flatness": float(rank_flatness(counts))}
    if truth is not None:
        row["guard/ssr"] = float(spread_skill(s, truth.to(s))["ssr"])
        per_channel = [d for d in range(truth.ndim) if d != 1] if truth.ndim > 2 else None  # S = [N, C, ...]
        row["guard/ssr_worst"] = _furthest_from_one(spread_skill(s, truth.to(s), dims=per_channel)["ssr"].reshape(-1))
        crps_s, crps_t = (crps_ensemble(e, truth.to(e)) for e in (s, t))  # [N, *shape]
        row["guard/crps"] = float(crps_s.mean())
        ratio = _per_channel(crps_s) / _per_channel(crps_t).clamp(min=1e-300)  # [C]
        row["guard/crps_ratio"], row["guard/crps_ratio_max"] = float(ratio.mean()), float(ratio.max())
    return row


def _per_channel(score: Tensor) -> Tensor:
    """[N, C, ...] -> [C] means (a sample with more than one dim has channels first); [N, D] -> [1]."""
    return score.transpose(0, 1).flatten(1).mean(1) if score.ndim > 2 else score.mean().reshape(1)


def _furthest_from_one(ratios: Tensor) -> float:
    """The ratio [C] furthest from 1 on a log scale (NaN and 0 count as furthest)."""
    return float(ratios[ratios.log().abs().nan_to_num(math.inf).argmax()])


def _first(cases: EvalCases, n: int) -> EvalCases:
    """The first n cases (the guard's fixed validation batch)."""
    n = min(n, cases.n)
    cond = None if cases.cond is None else {k: v[:n] for k, v in cases.cond.items()}
    truth = None if cases.truth is None else cases.truth[:n]
    return EvalCases(n=n, shape=cases.shape, cond=cond, truth=truth)
