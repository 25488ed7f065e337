"""Weather scores and plots: per-variable CRPS, spread-skill, rank histograms, energy score and spectra,
a student against its teacher, and the Bayes-optimal floor of the exact benchmark (SCIENCE.md 1-2).

Inputs are in physical units: ensembles [N, M, C, H, W] (cases, members, variables), truth [N, C, H, W].
Outputs are JSON-ready dicts of floats and lists. Intervals are 95% percentile bootstraps over cases
(never pixels: pixels of one case are correlated). generator=None means a CPU generator seeded 0.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

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


# ---------------------------------------------------------------- plots
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir, name: str) -> Path:
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _unit(v: str, units: Optional[Mapping[str, str]]) -> str:
    return (units or {}).get(v, UNITS.get(v, ""))


def plot_rank_histograms(scores_by_model: Mapping[str, dict], out_dir, *,
                         versus: Optional[dict] = None) -> Path:
    """Rank of the truth among the members per variable and model; a second row of teacher ranks if given."""
    plt = _pyplot()
    variables = list(next(iter(scores_by_model.values()))["variables"])
    rows = 2 if versus else 1
    fig, axes = plt.subplots(rows, len(variables), figsize=(3.6 * len(variables), 3.0 * rows), squeeze=False,
                             constrained_layout=True)
    for ax, v in zip(axes[0], variables):
        for name, sc in scores_by_model.items():
            n = np.asarray(sc["variables"][v]["rank_counts"], dtype=float)
            ax.step(np.arange(n.size), n / n.sum(), where="mid",
                    label=f"{name} (M={sc['members']}, δ={sc['variables'][v]['rank_flatness']:.3g})")
        for M in {sc["members"] for sc in scores_by_model.values()}:
            ax.axhline(1 / (M + 1), color="k", ls="--", lw=0.8)
        ax.set(title=f"{v}: rank of truth", xlabel="rank among members", ylabel="frequency")
        ax.legend(fontsize=7)
    if versus:
        for ax, v in zip(axes[1], variables):
            s = versus["variables"][v]
            n = np.asarray(s["teacher_rank_counts"], dtype=float)
            ax.step(np.arange(n.size), n / n.sum(), where="mid", color="C3",
                    label=f"M={versus['members_student']}, M'={versus['members_teacher']}, "
                          f"δ={s['teacher_rank_flatness']:.3g}")
            ax.axhline(1 / n.size, color="k", ls="--", lw=0.8, label="flat (same law)")
            ax.set(title=f"{v}: rank of teacher among student", xlabel="rank among student members",
                   ylabel="frequency")
            ax.legend(fontsize=7)
    fig.suptitle("Rank histograms (U shape: under-dispersed; dome: over-dispersed)")
    return _save(fig, out_dir, "rank_histograms.png")


def plot_spectra(spectra: Mapping[str, tuple], out_dir, *, units: Optional[Mapping[str, str]] = None) -> Path:
    """Log-log member-averaged radial spectra per variable; spectra: {name: (k, {var: P})} (from mean_spectra)."""
    plt = _pyplot()
    variables = list(next(iter(spectra.values()))[1])
    fig, axes = plt.subplots(1, len(variables), figsize=(3.8 * len(variables), 3.3), squeeze=False,
                             constrained_layout=True)
    for ax, v in zip(axes[0], variables):
        for i, (name, (k, P)) in enumerate(spectra.items()):
            style = dict(color="k", lw=1.6) if name == "truth" else dict(color=f"C{i}", lw=1.0)
            ax.loglog(np.asarray(k)[1:], np.asarray(P[v])[1:], label=name, **style)  # k = 0 is the mean
        ax.xaxis.set_minor_formatter(_pyplot().NullFormatter())  # minor labels collide on a short axis
        u = _unit(v, units)
        ax.set(title=v, xlabel="wavenumber (cycles per grid point)", ylabel=f"power ({u}²)" if u else "power")
        ax.legend(fontsize=7)
    fig.suptitle("Radially averaged power spectra (per member, averaged over members and cases)")
    return _save(fig, out_dir, "spectra.png")


def plot_spread_skill(scores_by_model: Mapping[str, dict], out_dir, *,
                      units: Optional[Mapping[str, str]] = None) -> Path:
    """Binned spread-skill per variable: corrected spread vs RMSE of the ensemble mean, diagonal = reliable."""
    plt = _pyplot()
    variables = list(next(iter(scores_by_model.values()))["variables"])
    fig, axes = plt.subplots(1, len(variables), figsize=(3.6 * len(variables), 3.4), squeeze=False,
                             constrained_layout=True)
    for ax, v in zip(axes[0], variables):
        top = 0.0
        for name, sc in scores_by_model.items():
            b = sc["variables"][v]["spread_skill_bins"]
            if b is None:
                continue
            ax.plot(b["spread_corrected"], b["rmse"], "o-", ms=3, label=f"{name} (SSR {sc['variables'][v]['ssr']:.2f})")
            top = max(top, *b["spread_corrected"], *b["rmse"])
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="reliable")
        u = f" ({_unit(v, units)})" if _unit(v, units) else ""
        ax.set(title=v, xlabel=f"spread × sqrt((M+1)/M){u}", ylabel=f"RMSE of ensemble mean{u}")
        ax.legend(fontsize=7)
    fig.suptitle("Spread-skill in equal-population spread bins (above the diagonal: overconfident)")
    return _save(fig, out_dir, "spread_skill.png")


def _grid(lat, lon, H: int, W: int) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Coordinates for pcolormesh: lon/lat in degrees if given (1-D or [H, W]), else pixel indices."""
    if lat is None or lon is None:
        return np.arange(W), np.arange(H), "x (grid points)", "y (grid points)"
    lat, lon = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    if lat.ndim == 1:
        lon, lat = np.meshgrid(lon, lat)
    return lon, lat, "longitude (°E)", "latitude (°N)"


def plot_sample_maps(truth: Tensor, models: Mapping[str, Tensor], variables: Sequence[str], lat, lon, out_dir,
                     case: int = 0, *, units: Optional[Mapping[str, str]] = None) -> Path:
    """Rows = variables; columns truth | member 0 per model | ensemble mean per model | spread per model.

    Fields share one colour scale per row (robust 1-99% range), spreads another starting at 0.
    """
    plt = _pyplot()
    H, W = truth.shape[-2:]
    X, Y, xlabel, ylabel = _grid(lat, lon, H, W)
    ens = {n: e[case].to(f64).cpu().numpy() for n, e in models.items()}  # [M, C, H, W]
    ncol = 1 + 3 * len(ens)
    fig, axes = plt.subplots(len(variables), ncol, figsize=(2.5 * ncol + 1.5, 2.3 * len(variables)),
                             squeeze=False, constrained_layout=True)
    for r, v in enumerate(variables):
        fields = [("truth", truth[case, r].to(f64).cpu().numpy())]
        fields += [(f"{n} member 0", e[0, r]) for n, e in ens.items()]
        fields += [(f"{n} ens. mean", e[:, r].mean(0)) for n, e in ens.items()]
        spreads = [(f"{n} spread (sd)", e[:, r].std(0, ddof=1)) for n, e in ens.items()]
        lo, hi = np.percentile(np.stack([f for _, f in fields]), [1, 99])
        cmap = "RdBu_r" if lo < 0 < hi else "RdYlBu_r"
        if lo < 0 < hi:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        smax = max(float(s.max()) for _, s in spreads)
        for c, (title, f) in enumerate(fields + spreads):
            ax = axes[r, c]
            is_spread = c >= len(fields)
            im = ax.pcolormesh(X, Y, f, shading="auto", cmap="viridis" if is_spread else cmap,
                               vmin=0 if is_spread else lo, vmax=smax if is_spread else hi)
            ax.set_title(f"{v}: {title}", fontsize=8)
            ax.set_xlabel(xlabel if r == len(variables) - 1 else "", fontsize=7)
            ax.set_ylabel(ylabel if c == 0 else "", fontsize=7)
            ax.tick_params(labelsize=6)
            if c == len(fields) - 1 or c == ncol - 1:  # one colour bar per shared scale
                span = axes[r, :len(fields)] if not is_spread else axes[r, len(fields):]
                fig.colorbar(im, ax=list(span), shrink=0.9, label=_unit(v, units) or "value")
    fig.suptitle(f"Case {case}: truth, members, ensemble means and spreads")
    return _save(fig, out_dir, "sample_maps.png")
