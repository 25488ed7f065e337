"""Weather plots of the scores in metrics.py: rank histograms (truth among members, teacher among student),
member-averaged radial spectra, binned spread-skill, and sample maps (truth, members, means, spreads).

Each plot_* writes one PNG into out_dir (headless Agg backend) and returns its path; axis and colour-bar
units come from `units=` or metrics.UNITS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from torch import Tensor

from .metrics import UNITS, f64


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
