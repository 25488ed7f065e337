"""Weather scores: per-variable CRPS, spread-skill, rank histograms, energy score and spectra, a student
against its teacher, and the Bayes-optimal floor of the exact benchmark (SCIENCE.md 1-2); plots: plots.py.

Inputs are in physical units: ensembles [N, M, C, H, W] (cases, members, variables), truth [N, C, H, W].
Outputs are JSON-ready dicts of floats and lists. Intervals are 95% percentile bootstraps over cases
(never pixels: pixels of one case are correlated). generator=None means a CPU generator seeded 0.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fastgen_sci.metrics import (bootstrap_ci, crps_ensemble, energy_score, log_spectral_distance,
                                 mean_member_spectrum, paired_bootstrap_ci, radial_power_spectrum,
                                 rank_flatness, rank_histogram, spread_skill)

from .benchmark import bayes_scores

f64 = torch.float64
ALPHA = 0.05  # 95% intervals
UNITS = {"t2m": "K", "2t": "K", "u10": "m/s", "v10": "m/s", "10u": "m/s", "10v": "m/s",
         "tp": "mm/h", "refc": "dBZ", "msl": "Pa", "sp": "Pa"}  # colourbar and axis labels
SSR_DEFINITION = "sqrt((M+1)/M) * spread / skill; spread = sqrt(mean ddof-1 variance), skill = RMSE of ens mean"


# ---------------------------------------------------------------- helpers
def _check(name: str, ens: Tensor, truth: Tensor, variables: Sequence[str], *, min_members: int = 2) -> None:
    """Raise unless ens is [N, M, C, H, W] over the cases and variables of truth [N, C, H, W]."""
    if truth.ndim != 4 or ens.ndim != 5 or ens.shape[:1] + ens.shape[2:] != truth.shape:
        raise ValueError(f"{name} must be [N, M, C, H, W] and truth [N, C, H, W] with the same N, C, H, W; "
                         f"got {name} {tuple(ens.shape)} and truth {tuple(truth.shape)}")
    if len(variables) != truth.shape[1]:
        raise ValueError(f"got {len(variables)} variable names {list(variables)} for C = {truth.shape[1]} channels")
    if ens.shape[1] < min_members:
        raise ValueError(f"{name} needs M >= {min_members} members (fair CRPS, ddof-1 spread); got M = {ens.shape[1]}")


def _members_first(ens: Tensor, c: int) -> Tensor:
    """Variable c of ens [N, M, C, H, W] as a member-first float64 ensemble [M, N, H, W]."""
    return ens[:, :, c].transpose(0, 1).to(f64)


def _generator(generator: Optional[torch.Generator]) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _ci(values: Tensor, *, n_boot: int, generator: torch.Generator) -> tuple[float, list[float]]:
    """Mean of per-case values [N] and its bootstrap interval over cases."""
    mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, alpha=ALPHA, generator=generator)
    return float(mean), [float(lo), float(hi)]


def _bootstrap_stat(per_case: Tensor, stat: Callable[[Tensor], Tensor], *, n_boot: int,
                    generator: torch.Generator) -> tuple[float, list[float]]:
    """stat of the case means of per_case [N, K] and its interval, resampling cases (ratios: SSR, gaps)."""
    N = per_case.shape[0]
    idx = torch.randint(N, (n_boot, N), generator=generator, device=generator.device).to(per_case.device)
    boot = stat(per_case[idx].mean(1))  # [n_boot]
    lo, hi = torch.quantile(boot, torch.tensor([ALPHA / 2, 1 - ALPHA / 2], dtype=f64, device=boot.device))
    return float(stat(per_case.mean(0, keepdim=True))[0]), [float(lo), float(hi)]


def _ssr_stat(M: int) -> Callable[[Tensor], Tensor]:
    """SSR from case means [B, 2] of (mean variance, mean squared error)."""
    return lambda m: math.sqrt((M + 1) / M) * (m[:, 0] / m[:, 1]).sqrt()  # SCIENCE.md 1


def _var_err2(x: Tensor, y: Tensor) -> Tensor:
    """Per-case spatial means of the ddof-1 member variance and of the ensemble-mean squared error [N, 2]."""
    ss = spread_skill(x, y, dims=(1, 2))  # spread, skill [N]
    return torch.stack([ss["spread"] ** 2, ss["skill"] ** 2], 1)


def _field_mean(score: Tensor) -> Tensor:
    return score.mean((-2, -1))  # [N, H, W] -> [N]


# ---------------------------------------------------------------- ensemble against truth
def binned_spread_skill(x: Tensor, y: Tensor, *, n_bins: int = 10) -> dict[str, list]:
    """Corrected spread vs RMSE of the ensemble mean in equal-population spread bins, x [M, *S], y [*S].

    Bins are set by the spread of the first half of the members and both scores come from the second
    half, independent of it given the forecast law; binning and scoring on the same members puts a
    reliable ensemble off the diagonal (regression to the mean). Reliable: spread_corrected = rmse.
    """
    M = x.shape[0]
    if M < 4:
        raise ValueError(f"binned spread-skill splits the members in two halves and needs M >= 4; got M = {M}")
    x, y = x.to(f64), y.to(f64)
    key = x[: M // 2].var(0, correction=1).flatten()  # [P] binning spread
    rest, Mr = x[M // 2:], M - M // 2
    var = rest.var(0, correction=1).flatten()  # [P]
    err2 = ((rest.mean(0) - y) ** 2).flatten()  # [P]
    P = key.numel()
    bins = torch.empty(P, dtype=torch.long, device=x.device)
    bins[key.argsort()] = torch.arange(P, device=x.device) * min(n_bins, P) // P
    count = torch.bincount(bins).to(f64)
    per_bin = lambda v: torch.zeros_like(count).index_add_(0, bins, v) / count  # noqa: E731
    spread = math.sqrt((Mr + 1) / Mr) * per_bin(var).sqrt()
    return {"spread_corrected": spread.tolist(), "rmse": per_bin(err2).sqrt().tolist(),
            "count": count.long().tolist(), "members_scored": Mr}


def _variable_scores(x: Tensor, y: Tensor, *, n_boot: int, generator: torch.Generator) -> dict:
    """Scores of one variable: x [M, N, H, W], y [N, H, W]."""
    M = x.shape[0]
    crps_fair, crps_fair_ci = _ci(_field_mean(crps_ensemble(x, y)), n_boot=n_boot, generator=generator)
    ve = _var_err2(x, y)  # [N, 2]
    ssr, ssr_ci = _bootstrap_stat(ve, _ssr_stat(M), n_boot=n_boot, generator=generator)
    rmse, rmse_ci = _bootstrap_stat(ve[:, 1:], lambda m: m[:, 0].sqrt(), n_boot=n_boot, generator=generator)
    es, es_ci = _ci(energy_score(x.flatten(2), y.flatten(1)), n_boot=n_boot, generator=generator)
    counts = rank_histogram(x, y, generator=generator)  # [M+1]
    return {"crps_fair": crps_fair, "crps_fair_ci": crps_fair_ci,
            "crps_emp": float(crps_ensemble(x, y, fair=False).mean()),
            "rmse": rmse, "rmse_ci": rmse_ci, "mae": float((x.mean(0) - y).abs().mean()),
            "spread": float(ve[:, 0].mean().sqrt()), "skill": rmse, "ssr": ssr, "ssr_ci": ssr_ci,
            "rank_counts": counts.tolist(), "rank_flatness": float(rank_flatness(counts)),
            "energy_fair": es, "energy_fair_ci": es_ci,
            "spread_skill_bins": binned_spread_skill(x, y) if M >= 4 else None}


def ensemble_scores(ens: Tensor, truth: Tensor, variables: Sequence[str], *,
                    generator: Optional[torch.Generator] = None, n_boot: int = 1000) -> dict:
    """Skill and spread of ens [N, M, C, H, W] against truth [N, C, H, W], per variable and pooled.

    'all' holds only dimensionless scores: the mean SSR over variables and the rank histogram pooled over
    variables (CRPS, RMSE, MAE and energy carry each variable's unit and are not averaged).
    """
    _check("ens", ens, truth, variables)
    g = _generator(generator)
    per_var = {v: _variable_scores(_members_first(ens, c), truth[:, c].to(f64), n_boot=n_boot, generator=g)
               for c, v in enumerate(variables)}
    counts = torch.tensor([s["rank_counts"] for s in per_var.values()]).sum(0)  # [M+1]
    return {"members": ens.shape[1], "cases": ens.shape[0], "crps_estimator": "fair",
            "ssr_definition": SSR_DEFINITION, "ci": f"{1 - ALPHA:.0%} percentile bootstrap over cases, "
            f"n_boot = {n_boot}", "variables": per_var,
            "all": {"ssr": float(np.mean([s["ssr"] for s in per_var.values()])),
                    "rank_counts": counts.tolist(), "rank_flatness": float(rank_flatness(counts))}}


# ---------------------------------------------------------------- student against teacher
def mean_spectra(fields: Tensor, variables: Sequence[str]) -> tuple[list[float], dict[str, list[float]]]:
    """Radial power spectrum per member, averaged over members and cases: k (cycles per pixel), {var: P}.

    fields: an ensemble [N, M, C, H, W] or a truth [N, C, H, W] (one member).
    """
    x = fields.unsqueeze(1) if fields.ndim == 4 else fields
    if x.ndim != 5 or x.shape[2] != len(variables):
        raise ValueError(f"fields must be [N, M, C, H, W] or [N, C, H, W] with C = {len(variables)}; "
                         f"got {tuple(fields.shape)}")
    k, P = mean_member_spectrum(x.transpose(0, 1))  # never the spectrum of the ensemble mean; P [N, C, K]
    return k.tolist(), {v: p.tolist() for v, p in zip(variables, P.mean(0))}


def _band_slices(K: int, n_bands: int) -> list[slice]:
    """Shells 1..K-1 (k = 0 dropped) split into n_bands log-spaced bands (octaves at 32 x 32), large first."""
    if K - 1 <= n_bands:
        edges = np.arange(1, K + 1)  # one shell per band
    else:
        edges = np.round(np.geomspace(1, K, n_bands + 1)).astype(int)
        step = np.arange(n_bands + 1)
        edges = np.maximum.accumulate(edges - step) + step  # strictly increasing: a shell or more each
        edges[-1] = K
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _teacher_rank(xs: Tensor, xt: Tensor, *, generator: torch.Generator) -> tuple[Tensor, float]:
    """Ranks of every teacher member among the student members, pooled [M+1], and the null-scaled flatness.

    Pooling M' teacher members over one student ensemble makes the counts Dirichlet-multinomial: under
    the null the flatness has mean (M + M' + 1)/(M + 2), which is divided out so that ~1 means same law.
    """
    M, Mt = xs.shape[0], xt.shape[0]
    counts = sum(rank_histogram(xs, xt[j], generator=generator) for j in range(Mt))
    return counts, float(rank_flatness(counts)) * (M + 2) / (M + Mt + 1)


def versus_teacher(student: Tensor, teacher: Tensor, truth: Tensor, variables: Sequence[str], *,
                   generator: Optional[torch.Generator] = None, n_boot: int = 1000, n_bands: int = 4) -> dict:
    """Student [N, M, C, H, W] against teacher [N, M', C, H, W] on the same cases, truth [N, C, H, W].

    Per variable: teacher-rank histogram (all teacher members pooled) and flatness; member-averaged
    spectra, band ratios student/teacher and log-spectral distances (k = 0 dropped); paired bootstrap
    of the fair-CRPS difference and of the relative gap; the SSR ratio student/teacher.
    'all' averages the dimensionless scores over variables and pools the teacher ranks.
    """
    _check("student", student, truth, variables)
    _check("teacher", teacher, truth, variables)
    g = _generator(generator)
    M, Mt = student.shape[1], teacher.shape[1]
    k = radial_power_spectrum(truth[:1, 0])[0].tolist()  # shell centres, cycles per pixel
    bands = _band_slices(len(k), n_bands)
    per_var, cols = {}, []
    for c, v in enumerate(variables):
        xs, xt, y = _members_first(student, c), _members_first(teacher, c), truth[:, c].to(f64)
        counts, flat = _teacher_rank(xs, xt, generator=g)
        spec = {name: mean_member_spectrum(e)[1].mean(0) for name, e in (("student", xs), ("teacher", xt),
                                                                          ("truth", y[None]))}  # [K] each
        ps, pt, py = (spec[name][1:].cpu() for name in ("student", "teacher", "truth"))  # shells k > 0
        crps = torch.stack([_field_mean(crps_ensemble(xs, y)), _field_mean(crps_ensemble(xt, y))], 1)  # [N, 2]
        diff, lo, hi = paired_bootstrap_ci(crps[:, 0], crps[:, 1], n_boot=n_boot, alpha=ALPHA, generator=g)
        gap = _bootstrap_stat(crps, lambda m: m[:, 0] / m[:, 1] - 1, n_boot=n_boot, generator=g)
        ve = torch.cat([_var_err2(xs, y), _var_err2(xt, y)], 1)  # [N, 4]
        ratio = lambda m: _ssr_stat(M)(m[:, :2]) / _ssr_stat(Mt)(m[:, 2:])  # noqa: E731
        ssr_ratio = _bootstrap_stat(ve, ratio, n_boot=n_boot, generator=g)
        per_var[v] = {
            "teacher_rank_counts": counts.tolist(), "teacher_rank_flatness": flat,
            "spectrum": {name: P.tolist() for name, P in spec.items()},
            "band_ratio": [float(ps[b.start - 1:b.stop - 1].sum() / pt[b.start - 1:b.stop - 1].sum())
                           for b in bands],
            "lsd_db": float(log_spectral_distance(ps, pt)),
            "lsd_student_truth_db": float(log_spectral_distance(ps, py)),
            "lsd_teacher_truth_db": float(log_spectral_distance(pt, py)),
            "crps_fair_student": float(crps[:, 0].mean()), "crps_fair_teacher": float(crps[:, 1].mean()),
            "crps_diff": float(diff), "crps_diff_ci": [float(lo), float(hi)],
            "crps_rel_gap": gap[0], "crps_rel_gap_ci": gap[1],
            "ssr_student": float(_ssr_stat(M)(ve[:, :2].mean(0, keepdim=True))),
            "ssr_teacher": float(_ssr_stat(Mt)(ve[:, 2:].mean(0, keepdim=True))),
            "ssr_ratio": ssr_ratio[0], "ssr_ratio_ci": ssr_ratio[1]}
        cols.append(crps)
    crps_all = torch.cat(cols, 1)  # [N, 2C] (student, teacher) per variable
    mean_gap = lambda m: (m[:, 0::2] / m[:, 1::2] - 1).mean(1)  # noqa: E731
    gap_all = _bootstrap_stat(crps_all, mean_gap, n_boot=n_boot, generator=g)
    pooled = torch.tensor([s["teacher_rank_counts"] for s in per_var.values()]).sum(0)
    avg = lambda key: np.mean([s[key] for s in per_var.values()], axis=0).tolist()  # noqa: E731
    return {"members_student": M, "members_teacher": Mt, "cases": truth.shape[0], "crps_estimator": "fair",
            "ssr_definition": SSR_DEFINITION, "ci": f"{1 - ALPHA:.0%} percentile bootstrap over cases, paired, "
            f"n_boot = {n_boot}", "teacher_rank": "all teacher members pooled; flatness divided by "
            "(M + M' + 1)/(M + 2), its null mean", "k": k,
            "bands": [[k[b.start], k[b.stop - 1]] for b in bands],  # cycles per pixel, first and last shell
            "variables": per_var,
            "all": {"teacher_rank_counts": pooled.tolist(),
                    "teacher_rank_flatness": float(rank_flatness(pooled)) * (M + 2) / (M + Mt + 1),
                    "band_ratio": avg("band_ratio"), "lsd_db": avg("lsd_db"), "ssr_ratio": avg("ssr_ratio"),
                    "crps_rel_gap": gap_all[0], "crps_rel_gap_ci": gap_all[1]}}


# ---------------------------------------------------------------- exact benchmark floor
def reference_scores(posterior_sd, variables: Sequence[str], *, members: Optional[int] = None) -> dict:
    """Bayes-optimal CRPS*, MAE*, RMSE* (of the posterior mean) and SSR* = 1 from per-pixel sds [C, H, W].

    With members = M, 'at_members' adds what an ensemble of M exact draws scores in expectation, keyed
    as in ensemble_scores: fair CRPS = CRPS*, empirical (1 + 1/M) CRPS*, ensemble-mean MAE and RMSE
    sqrt(1 + 1/M) times MAE* and RMSE*, spread RMSE*, skill sqrt(1 + 1/M) RMSE*, SSR 1.
    """
    s = np.asarray(posterior_sd.cpu() if isinstance(posterior_sd, Tensor) else posterior_sd, dtype=np.float64)
    if s.ndim != 3 or s.shape[0] != len(variables) or (s < 0).any():
        raise ValueError(f"posterior_sd must be non-negative [C, H, W] with C = {len(variables)}; got {s.shape}")
    out = {}
    for v, sd in zip(variables, s):
        b = bayes_scores(sd)  # SCIENCE.md 2
        out[v] = {"crps_fair": b["crps"], "mae": b["mae"], "rmse": b["rmse"], "ssr": 1.0}
        if members:
            inflate = math.sqrt(1 + 1 / members)  # the M-member mean errs by N(0, s^2 (1 + 1/M))
            out[v]["at_members"] = {"crps_fair": b["crps"], "crps_emp": (1 + 1 / members) * b["crps"],
                                    "mae": inflate * b["mae"], "rmse": inflate * b["rmse"],
                                    "spread": b["rmse"], "skill": inflate * b["rmse"], "ssr": 1.0}
    return {"members": members, "source": "exact Gaussian posterior (SCIENCE.md 2)", "variables": out}
